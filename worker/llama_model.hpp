#pragma once
// Llama forward pass on the CPU over a batch of tokens that may belong to several sequences.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "model/gguf.hpp"
#include "model/llama_checkpoint.hpp"
#include "model/llama_config.hpp"
#include "model/llama_weights.hpp"
#include "model/lora_adapter.hpp"
#include "worker/kv_cache.hpp"
#include "worker/lora_weights.hpp"
#include "worker/tensor_shard.hpp"

namespace nibble::worker {

// One step's worth of tokens. Every token's K/V is written to the cache before attention, so a
// sequence's tokens in one batch see each other causally (prefill chunks, speculative verification).
struct ForwardBatch {
  std::vector<int32_t> tokens;        // [n]
  std::vector<int32_t> positions;     // [n]
  std::vector<int32_t> seq_index;     // [n] row of block_tables
  std::vector<int32_t> block_tables;  // [n_seqs, max_blocks_per_seq]
  int64_t max_blocks_per_seq = 0;
  std::vector<int32_t> logit_rows;  // indices into tokens whose logits are wanted
  // [n_seqs] per block-table row: 0 the base model, a the model's LoRA adapter a (add_lora's index);
  // empty: every sequence on the base model.
  std::vector<int32_t> seq_adapters;

  // Appends one sequence's tokens at positions start_pos.., as row table_row of block_tables (the
  // caller appends the table), wanting logits for its last `logits_for_last` tokens (0: none) and its
  // first `logits_for_first` (a prompt's own log-probabilities); a row both ask for is listed once.
  void add_sequence(std::span<const int32_t> seq_tokens, int32_t start_pos, int32_t table_row,
                    int32_t logits_for_last, int32_t logits_for_first = 0);

  // The common single-sequence case: tokens at positions start_pos.., logits for the last one or
  // for all.
  static ForwardBatch single(const std::vector<int32_t>& tokens, int32_t start_pos,
                             const std::vector<int32_t>& block_table, bool all_logits);
};

// The inputs of a layer's weight matrices, as an observer sees them (see set_input_observer).
enum class MatrixInput {
  attn_qkv,     // attn_q, attn_k, attn_v: the attention-normed hidden states, [rows, n_embd]
  attn_output,  // attn_output: the attention heads' outputs, [rows, q_dim]
  ffn_gate_up,  // ffn_gate, ffn_up: the FFN-normed hidden states, [rows, n_embd]
  ffn_down,     // ffn_down: silu(gate) * up, [rows, n_ff]
};
// layer: the model's layer index; x: [rows, k], valid only during the call.
using MatrixInputObserver =
    std::function<void(int64_t layer, MatrixInput input, const float* x, int64_t rows, int64_t k)>;

// A pipeline stage holds the layers [begin, end) of the model (all of them by default). The first
// stage embeds tokens; later stages start from the hidden states the previous stage produced. The
// last stage applies the output norm and head; earlier stages hand on their hidden states instead.
struct LayerRange {
  int64_t begin = 0;
  int64_t end = -1;  // -1: through the last layer
};

// With a TensorShard of size T > 1 the model holds one Megatron shard and forward() is a collective
// over the T shards (every shard runs the same batches in the same order):
//   attn_q/k/v      column-parallel: the shard's query heads and the KV heads they read
//                   (split_heads; KV heads replicated when T > n_head_kv)
//   attn_output     row-parallel: the input columns of the shard's query heads, then reducer.sum
//   ffn_gate/up     column-parallel: the shard's n_ff rows (split_rows, whole weight blocks)
//   ffn_down        row-parallel: the matching input columns, then reducer.sum
//   output          vocabulary-parallel (split_vocab), logits gathered to full rows
//   token_embd     vocabulary-parallel too: each shard looks up the tokens it owns, one all-reduce
//                  sum assembles the rows
//   the norms are replicated.
// Row-parallel slices are copied out of the file mapping at load (a column range of every row is
// not contiguous); everything else points into the mapping as before.
class LlamaModel {
 public:
  // Opens and validates a GGUF file, or a Hugging Face checkpoint when `path` is a directory (throws
  // model::GgufError, HfCheckpointError or SafetensorsError). See the constructor for shard.
  static std::unique_ptr<LlamaModel> load(const std::string& path, TensorShard shard = {},
                                          ShardReducer* reducer = nullptr, LayerRange layers = {});
  // shard: which tensor-parallel shard to bind (the whole model by default). reducer: the group's
  // collectives, required when shard.size > 1 (unused otherwise); not owned, must outlive the
  // model. layers: the pipeline stage's layers (see LayerRange). Throws std::invalid_argument when
  // the model cannot be split that way.
  explicit LlamaModel(std::shared_ptr<const model::LlamaCheckpoint> checkpoint, TensorShard shard = {},
                      ShardReducer* reducer = nullptr, LayerRange layers = {});
  explicit LlamaModel(std::shared_ptr<const model::GgufFile> file, TensorShard shard = {},
                      ShardReducer* reducer = nullptr, LayerRange layers = {});

  // The whole model's hyperparameters (logits are always [*, config().n_vocab]).
  const model::LlamaConfig& config() const { return config_; }
  // This shard's share: n_head, n_head_kv, n_ff and n_layer are the local counts (equal to config()
  // when unsharded). Size the KV cache from this: it holds only the shard's KV heads and layers.
  const model::LlamaConfig& shard_config() const { return shard_config_; }
  TensorShard shard() const { return shard_; }
  LayerRange layers() const { return {layer_begin_, layer_end_}; }
  bool is_first_stage() const { return layer_begin_ == 0; }
  bool is_last_stage() const { return layer_end_ == config_.n_layer; }
  const model::LlamaCheckpoint& checkpoint() const { return *checkpoint_; }
  // The GGUF file (which also holds the tokenizer). Throws std::logic_error for a model loaded from
  // a Hugging Face checkpoint; file_ptr() is null then.
  const model::GgufFile& file() const;
  std::shared_ptr<const model::GgufFile> file_ptr() const { return checkpoint_->gguf(); }

  // Runs the batch through the model, filling the cache at the batch's positions.
  // logits: resized to [batch.logit_rows.size(), n_vocab]
  // Throws std::invalid_argument for tokens or positions out of range.
  void forward(const ForwardBatch& batch, KvCache& cache, kernels::ThreadPool& pool,
               std::vector<float>& logits) {
    forward_stage(batch, cache, pool, nullptr, logits);
  }
  // One pipeline stage's part of forward(). hidden_in: [batch.tokens.size(), n_embd] from the
  // previous stage, or null on the first stage (which embeds batch.tokens). out: on the last stage
  // the logits as in forward(); on earlier stages resized to [batch.tokens.size(), n_embd], the
  // hidden states for the next stage.
  void forward_stage(const ForwardBatch& batch, KvCache& cache, kernels::ThreadPool& pool,
                     const float* hidden_in, std::vector<float>& out);

  // Calibrated quantization (worker/calibrated_quantize): forward passes then hand every matrix
  // input to `observer` before the matmul (an empty function turns it off; the normal path pays one
  // test per matmul), and quantized layers replace their float weights so that later layers are
  // calibrated on their outputs.
  void set_input_observer(MatrixInputObserver observer) { observer_ = std::move(observer); }
  // Replaces one matrix of `layer` (the model's index, inside this stage) by float weights
  // values: [n_out, k] in the matrix's shape. Unsharded models only; throws std::invalid_argument
  // otherwise or for a wrong size.
  void set_layer_matrix(int64_t layer, model::LayerMatrix which, const std::vector<float>& values);

  // Adds a LoRA adapter that batches may name (ForwardBatch::seq_adapters), scaled by user_scale as
  // llama.cpp scales it, cut to this shard and stage. Returns its index, 1 for the first. Every shard
  // of a group adds the same adapters in the same order. Throws std::invalid_argument for an adapter
  // of another model's shape.
  int32_t add_lora(const model::LoraAdapter& adapter, float user_scale = 1.0f);
  // A serving job's adapters change while it runs (vLLM's /v1/load_lora_adapter): set_lora puts an
  // adapter at index `slot` (>= 1: an empty slot, a loaded one it replaces, or past the last, the
  // slots between left empty), remove_lora empties a slot (the others keep their indices; an empty or
  // unknown slot stays as it is). Batches that name an empty slot are refused. Same checks and throws
  // as add_lora.
  void set_lora(int32_t slot, const model::LoraAdapter& adapter, float user_scale = 1.0f);
  void remove_lora(int32_t slot);
  int32_t n_loras() const { return static_cast<int32_t>(loras_.size()); }
  bool has_lora(int32_t slot) const {
    return slot >= 1 && slot <= n_loras() && loras_[static_cast<size_t>(slot - 1)].has_value();
  }
  // The adapter of every sequence of a batch whose seq_adapters is empty (llama.cpp's --lora: one
  // model, adapted throughout); 0, the default, leaves such batches on the base model.
  void set_default_lora(int32_t adapter);

  // The types of the KV caches made for this model (KvCache's: F16, the default, or quantized types as
  // llama.cpp's --cache-type-k/-v, e.g. Q8_0, vLLM's 8-bit kv_cache_dtype). Only what new caches are: a
  // pass follows the cache it is given. Throws std::invalid_argument for a type the model's heads cannot
  // take.
  void set_kv_cache_types(const KvCacheTypes& types);
  const KvCacheTypes& kv_cache_types() const { return kv_cache_types_; }
  // Whether a quantized cache holds Q, K and V rotated as llama.cpp's does (KvCache::rotation; on by
  // default, as llama.cpp's): off is llama.cpp with LLAMA_ATTN_ROT_DISABLE=1. A cache must be filled
  // and read with the same setting.
  void set_kv_cache_rotation(bool on) { kv_cache_rotation_ = on; }
  bool kv_cache_rotation() const { return kv_cache_rotation_; }

 private:
  void matmul(const model::WeightMatrix& w, const float* x, int64_t m, float* y, kernels::ThreadPool& pool);
  // The adapters' updates of one product: layer (local) and which, or kHeadLayer (which unused) for
  // the output head. rows_by_adapter: [n_loras()] the rows of x and y each adapter updates.
  static constexpr int64_t kHeadLayer = -1;
  void add_lora_products(int64_t layer, model::LayerMatrix which, const float* x,
                         const std::vector<std::vector<int64_t>>& rows_by_adapter, float* y,
                         kernels::ThreadPool& pool);

  std::shared_ptr<const model::LlamaCheckpoint> checkpoint_;
  // Replaces weights_ by this shard's slices (see the class comment).
  void bind_shard();

  model::LlamaConfig config_;
  model::LlamaConfig shard_config_;
  model::LlamaWeights weights_;
  TensorShard shard_;
  int64_t layer_begin_ = 0, layer_end_ = 0;      // weights_.layers holds only these
  int64_t embd_begin_ = 0;                       // first token id of this shard's token_embd rows
  ShardReducer* reducer_ = nullptr;              // null when unsharded (no collectives)
  MatrixInputObserver observer_;                 // empty unless calibrating
  std::vector<int64_t> vocab_counts_;            // [shard.size] output rows per shard
  std::optional<ModelShard> plan_;               // this shard's share when sharded
  std::vector<std::optional<ShardLora>> loras_;  // the adapters by index - 1 (nullopt: removed)
  int32_t default_lora_ = 0;                     // set_default_lora's
  KvCacheTypes kv_cache_types_;
  bool kv_cache_rotation_ = true;
  // This batch's rows by adapter, [n_loras()] (empty: no row names one): the tokens' rows, and the
  // logit rows' (rows of the head's input).
  std::vector<std::vector<int64_t>> lora_rows_, lora_logit_rows_;
  // Scratch reused across calls: [n, dim] activations (dims local to the shard).
  std::vector<float> x_, h_, q_, k_, v_, attn_, gate_, up_, picked_, local_logits_;
  std::vector<float> gathered_;  // [m, k] the input in an act-order matrix's column order
};

}  // namespace nibble::worker
