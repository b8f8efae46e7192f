#pragma once
// Cutting one tensor-parallel shard out of a pipeline stage's bound weights, with the split
// arithmetic of tensor_shard.hpp. Shared by the CPU forward pass (LlamaModel) and the GPU one
// (CudaLlamaModel), so that both hold exactly the same slices of every matrix.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "model/llama_config.hpp"
#include "model/llama_weights.hpp"
#include "worker/tensor_shard.hpp"

namespace nibble::worker {

// What one shard of a stage owns (see LlamaModel's class comment for the Megatron split).
struct ModelShard {
  HeadShard heads;                    // query heads and the KV heads they read
  ShardRange ff;                      // rows of ffn_gate/ffn_up, input columns of ffn_down
  ShardRange vocab;                   // rows of output and token_embd
  std::vector<int64_t> vocab_counts;  // [shard.size] output rows of every shard
  // The stage's config with this shard's local n_head, n_head_kv and n_ff (n_embd, n_vocab and
  // head_dim stay whole). Size the KV cache from this.
  model::LlamaConfig config;
};

// The largest block size among the layers' ffn_down types (mixed quantizations use several): the
// ffn rows must be split into whole blocks of it so that ffn_down's column slices stay aligned.
size_t ffn_down_granularity(const std::vector<model::LlamaLayerWeights>& layers);

// stage: the whole model's config with n_layer set to the stage's count. Throws
// std::invalid_argument (from the split functions) when the model cannot be split that way.
ModelShard plan_shard(const model::LlamaConfig& stage, TensorShard shard, size_t ffn_granularity);

// Rows [begin, begin + count) of w: a view into the same memory, or for a matrix that owns its
// memory (e.g. HF q/k permuted at load) a copy, so that the other shards' rows are freed.
model::WeightMatrix row_slice(const model::WeightMatrix& w, int64_t begin, int64_t count);
// Columns (input features) [begin, begin + count) of every row of w, copied into owned memory:
// [n_out, count] in w's type (F32 for an act-order matrix, whose stored columns are not in input
// order). Throws std::invalid_argument unless begin and count are whole blocks of the type.
model::WeightMatrix column_slice(const model::WeightMatrix& w, int64_t begin, int64_t count);

// Replaces weights' layer matrices by the shard's slices (column-parallel q/k/v and gate/up rows,
// row-parallel attn_output and ffn_down columns), and on the first / last stage token_embd /
// output by the shard's vocabulary rows. Norms stay whole.
void slice_weights(model::LlamaWeights& weights, const ModelShard& shard, int64_t head_dim, bool first_stage,
                   bool last_stage);

}  // namespace nibble::worker
