#pragma once
// Llama forward pass on the CPU over a batch of tokens that may belong to several sequences.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "model/gguf.hpp"
#include "model/llama_config.hpp"
#include "model/llama_weights.hpp"
#include "worker/kv_cache.hpp"

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

  // The common single-sequence case: tokens at positions start_pos.., logits for the last one or
  // for all.
  static ForwardBatch single(const std::vector<int32_t>& tokens, int32_t start_pos,
                             const std::vector<int32_t>& block_table, bool all_logits);
};

class LlamaModel {
 public:
  // Opens and validates the GGUF file (throws model::GgufError).
  static std::unique_ptr<LlamaModel> load(const std::string& path);
  explicit LlamaModel(std::shared_ptr<const model::GgufFile> file);

  const model::LlamaConfig& config() const { return config_; }
  const model::GgufFile& file() const { return *file_; }
  std::shared_ptr<const model::GgufFile> file_ptr() const { return file_; }

  // Runs the batch through the model, filling the cache at the batch's positions.
  // logits: resized to [batch.logit_rows.size(), n_vocab]
  // Throws std::invalid_argument for tokens or positions out of range.
  void forward(const ForwardBatch& batch, KvCache& cache, kernels::ThreadPool& pool,
               std::vector<float>& logits);

 private:
  void matmul(const model::WeightMatrix& w, const float* x, int64_t m, float* y, kernels::ThreadPool& pool);

  std::shared_ptr<const model::GgufFile> file_;
  model::LlamaConfig config_;
  model::LlamaWeights weights_;
  // Scratch reused across calls: [n, dim] activations.
  std::vector<float> x_, h_, q_, k_, v_, attn_, gate_, up_, picked_;
};

}  // namespace nibble::worker
