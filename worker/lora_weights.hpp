#pragma once
// A LoRA adapter (model/lora_adapter.hpp) as one tensor shard of one pipeline stage computes it, and
// the adapted product's update. Under the Megatron split (LlamaModel's class comment) the update
// splits as the matrix does: a column-parallel matrix (q/k/v, gate/up, the vocabulary-parallel head)
// keeps the shard's rows of B and the whole A; a row-parallel one (attn_output, ffn_down) keeps the
// shard's columns of A and the whole B, so that each shard's B (A_s x_s) is a partial sum that the
// all-reduce after the matrix adds up with W_s x_s.
#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "kernels/quant_types.hpp"
#include "kernels/thread_pool.hpp"
#include "model/lora_adapter.hpp"
#include "worker/weight_shard.hpp"

namespace nibble::worker {

// y += scale * B (A x) for one matrix, the factors as kernels/lora.hpp takes them: fp16, transposed
// (vLLM likewise keeps adapters in the model's 16-bit type; decode reads them every step).
struct LoraProduct {
  int64_t rank = 0, k = 0, n_out = 0;
  float scale = 1;
  std::vector<kernels::f16_bits> a_t;  // [k, rank]: Aᵀ
  std::vector<kernels::f16_bits> b_t;  // [rank, n_out]: Bᵀ
};

struct ShardLora {
  std::vector<std::array<std::optional<LoraProduct>, 7>> layers;  // [stage layers][model::LayerMatrix]
  std::optional<LoraProduct> output;                              // last stage only
};

// Throws std::invalid_argument naming the adapter's file unless it has `whole`'s layers and each of its
// matrices the whole model's shape (a shard cuts it afterwards: shard_lora).
void check_lora_fits(const model::LoraAdapter& adapter, const model::LlamaConfig& whole);

// The stage's layers [layer_begin, layer_end) of `adapter`, scaled by user_scale as llama.cpp scales
// (LoraAdapter::scale), cut to `shard`'s share (null: unsharded); the head's update only when
// last_stage. head_dim: the model's, for the head ranges.
ShardLora shard_lora(const model::LoraAdapter& adapter, float user_scale, const ModelShard* shard,
                     int64_t head_dim, int64_t layer_begin, int64_t layer_end, bool last_stage);

// y[r] += p.scale * B (A x[r]) for the rows r listed.
// x: [*, p.k]; y: [*, p.n_out]; rows: the rows of x and y that take this update.
void add_lora_product(const LoraProduct& p, const float* x, const std::vector<int64_t>& rows, float* y,
                      kernels::ThreadPool& pool);

}  // namespace nibble::worker
