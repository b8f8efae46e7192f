#pragma once
// A model's forward pass with its KV caches, whatever runs it: the CPU (LlamaModel with a thread
// pool) or a GPU (CudaLlamaModel on a device). The engines above (the local continuous-batching
// engine, the draft, the speculation cost model, a worker rank's stage) need only this: make a
// cache, run a batch with host hidden states in and host logits or hidden states out. One code path
// then serves both backends, and speculative decoding runs on the GPU as it runs on the CPU.
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "model/llama_config.hpp"
#include "worker/cuda_llama_model.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"
#include "worker/sampler.hpp"

namespace nibble::worker {

// A KV cache made by a ForwardModel; only that model's forward_stage takes it.
class ForwardCache {
 public:
  virtual ~ForwardCache() = default;
};

class ForwardModel {
 public:
  virtual ~ForwardModel() = default;
  // The whole model's hyperparameters (n_embd of hidden states, n_vocab of logits), and this
  // shard's (local heads, ffn rows and stage layers).
  virtual const model::LlamaConfig& config() const = 0;
  virtual const model::LlamaConfig& shard_config() const = 0;
  virtual bool is_first_stage() const = 0;
  virtual bool is_last_stage() const = 0;
  // A cache of num_blocks blocks of block_size positions for this model's shard.
  virtual std::unique_ptr<ForwardCache> make_cache(int64_t num_blocks, int64_t block_size) const = 0;
  // LlamaModel::forward_stage's contract (hidden_in: host [tokens, n_embd] or null on the first
  // stage; out: host logits on the last stage, hidden states elsewhere). Throws std::logic_error for
  // a cache another kind of model made.
  virtual void forward_stage(const ForwardBatch& batch, ForwardCache& cache, const float* hidden_in,
                             std::vector<float>& out) = 0;
  // A whole model's pass: logits [batch.logit_rows.size(), n_vocab].
  void forward(const ForwardBatch& batch, ForwardCache& cache, std::vector<float>& logits) {
    forward_stage(batch, cache, nullptr, logits);
  }
  // The last stage's pass where only each logit row's argmax is wanted (ties to the lowest id, as
  // worker::Sampler at temperature 0): ids resized to [batch.logit_rows.size()]; hidden_in as in
  // forward_stage. What greedy decoding and greedy verification need; a GPU finds it on the device,
  // so only ids come back. The default runs forward_stage() and scans the logits on the host.
  virtual void forward_stage_argmax(const ForwardBatch& batch, ForwardCache& cache, const float* hidden_in,
                                    std::vector<int32_t>& ids);
  // The same for a whole model.
  void forward_argmax(const ForwardBatch& batch, ForwardCache& cache, std::vector<int32_t>& ids) {
    forward_stage_argmax(batch, cache, nullptr, ids);
  }
  // The last stage's pass with every logit row sampled: row r's id is what
  // Sampler(params[r]).sample_with_uniform(logits of row r, n_vocab, histories[r], uniforms[r])
  // picks (greedy rows: the argmax after the bias and penalties), ids resized to [batch.logit_rows.size()].
  // What plain sampled decoding needs; a GPU samples (and applies the bias and penalties) on the device
  // (kernels/cuda/sampling), so only ids come back where the logits would be n_vocab floats a row.
  // params, uniforms: [batch.logit_rows.size()] (uniforms in [0, 1), e.g. each row's
  // Sampler::uniform()); histories: each row's tokens so far, for the penalties: empty when no row
  // adjusts its logits (worker::adjusts_logits), else one a row. Throws std::invalid_argument for a size
  // mismatch, a uniform outside [0, 1) or adjustments without histories. The default runs forward_stage() and
  // samples on the host.
  virtual void forward_stage_sample(const ForwardBatch& batch, ForwardCache& cache, const float* hidden_in,
                                    const std::vector<SamplingParams>& params,
                                    const std::vector<double>& uniforms, const TokenHistories& histories,
                                    std::vector<int32_t>& ids);
  void forward_sample(const ForwardBatch& batch, ForwardCache& cache,
                      const std::vector<SamplingParams>& params, const std::vector<double>& uniforms,
                      std::vector<int32_t>& ids, const TokenHistories& histories = {}) {
    forward_stage_sample(batch, cache, nullptr, params, uniforms, histories, ids);
  }
  // Whether forward_stage_verify runs here: a GPU's last stage, whole or a tensor shard (its logits
  // are gathered on the device) or the last of several pipeline stages. The default: no (verify
  // forward_stage()'s logits on the host).
  virtual bool verifies_drafts() const { return false; }
  // The last stage's pass that verifies sampled draft tokens where the logits are, with
  // speculative/rejection_sampler.hpp's rule and the same uniforms, so that only ids come back (a GPU:
  // kernels/cuda/distribution_rows and speculative_accept). seqs: one per sequence of the batch, in
  // batch order, each with k >= 1 drafts and exactly k + 1 logit rows (its verification positions);
  // params temperature > 0 and no logit bias or penalty; draft_probs [k, n_vocab] the draft's dense
  // distributions; uniforms [k + 1] in [0, 1). Fills accepted[s] (0..k) and tokens[s] (the accepted
  // drafts, then the drawn token). hidden_in as in forward_stage (a last stage's input). Only where
  // verifies_drafts(); the default throws std::logic_error.
  using VerifySequence = worker::VerifySequence;
  virtual void forward_stage_verify(const ForwardBatch& batch, ForwardCache& cache, const float* hidden_in,
                                    const std::vector<VerifySequence>& seqs, std::vector<int32_t>& accepted,
                                    std::vector<std::vector<int32_t>>& tokens);
  // The same for a whole model.
  void forward_verify(const ForwardBatch& batch, ForwardCache& cache, const std::vector<VerifySequence>& seqs,
                      std::vector<int32_t>& accepted, std::vector<std::vector<int32_t>>& tokens) {
    forward_stage_verify(batch, cache, nullptr, seqs, accepted, tokens);
  }
  // Whether, as a draft, this model keeps its sampled proposals' distributions where it makes them
  // (a whole model on a GPU), so that only ids cross to the host and a target on that device
  // verifies against them there (VerifySequence::kept_probs). The default: no.
  virtual bool keeps_draft_distributions() const { return false; }
  // A store of `rows` rows of n_vocab floats for forward_draft_sample. The default throws
  // std::logic_error (only where keeps_draft_distributions()).
  virtual std::shared_ptr<KeptRows> make_kept_rows(int64_t rows);
  // A draft's whole-model pass: per logit row r, its dense distribution q (what
  // speculative::dense_distribution makes of the row's logits: one-hot on the argmax at temperature
  // 0) into keep[r] (a store from this model's make_kept_rows; rows == nullptr: not kept), and ids[r]
  // drawn from q with uniforms[r] as speculative::sample_dense draws (unused at temperature 0). No
  // logit bias or penalty. Only where keeps_draft_distributions(); the default throws std::logic_error.
  virtual void forward_draft_sample(const ForwardBatch& batch, ForwardCache& cache,
                                    const std::vector<SamplingParams>& params,
                                    const std::vector<double>& uniforms, const std::vector<KeptRowRef>& keep,
                                    std::vector<int32_t>& ids);
  // The LoRA adapters a serving job loads and unloads while it runs (LlamaModel::set_lora and
  // remove_lora: slot is the index batches name). set_lora's default throws std::runtime_error (a model
  // without adapters); remove_lora's does nothing (such a model holds none).
  virtual void set_lora(int32_t slot, const model::LoraAdapter& adapter, float user_scale);
  virtual void remove_lora(int32_t slot);

 private:
  std::vector<float> argmax_logits_;  // forward_argmax's and forward_sample's scratch (n_vocab floats a row)
};

// forward_stage_sample's argument checks (shared by its implementations).
void check_sample_rows(const ForwardBatch& batch, const std::vector<SamplingParams>& params,
                       const std::vector<double>& uniforms, const TokenHistories& histories);

// The CPU model (not owned) on a thread pool (not owned).
class CpuForwardModel final : public ForwardModel {
 public:
  CpuForwardModel(LlamaModel& model, kernels::ThreadPool& pool) : model_(model), pool_(pool) {}
  const model::LlamaConfig& config() const override { return model_.config(); }
  const model::LlamaConfig& shard_config() const override { return model_.shard_config(); }
  bool is_first_stage() const override { return model_.is_first_stage(); }
  bool is_last_stage() const override { return model_.is_last_stage(); }
  std::unique_ptr<ForwardCache> make_cache(int64_t num_blocks, int64_t block_size) const override;
  void forward_stage(const ForwardBatch& batch, ForwardCache& cache, const float* hidden_in,
                     std::vector<float>& out) override;
  void set_lora(int32_t slot, const model::LoraAdapter& adapter, float user_scale) override {
    model_.set_lora(slot, adapter, user_scale);
  }
  void remove_lora(int32_t slot) override { model_.remove_lora(slot); }

 private:
  LlamaModel& model_;
  kernels::ThreadPool& pool_;
};

// The GPU model (not owned); its caches live on `device`. In a build without CUDA the model cannot
// exist (CudaLlamaModel's constructor throws CudaUnavailable), so neither can this.
class CudaForwardModel final : public ForwardModel {
 public:
  CudaForwardModel(CudaLlamaModel& model, int device) : model_(model), device_(device) {}
  const model::LlamaConfig& config() const override { return model_.config(); }
  const model::LlamaConfig& shard_config() const override { return model_.shard_config(); }
  bool is_first_stage() const override { return model_.is_first_stage(); }
  bool is_last_stage() const override { return model_.is_last_stage(); }
  std::unique_ptr<ForwardCache> make_cache(int64_t num_blocks, int64_t block_size) const override;
  void forward_stage(const ForwardBatch& batch, ForwardCache& cache, const float* hidden_in,
                     std::vector<float>& out) override;
  void forward_stage_argmax(const ForwardBatch& batch, ForwardCache& cache, const float* hidden_in,
                            std::vector<int32_t>& ids) override;
  void forward_stage_sample(const ForwardBatch& batch, ForwardCache& cache, const float* hidden_in,
                            const std::vector<SamplingParams>& params, const std::vector<double>& uniforms,
                            const TokenHistories& histories, std::vector<int32_t>& ids) override;
  // On the device (CudaLlamaModel::forward_stage_verify) on the last stage, sharded or not.
  bool verifies_drafts() const override { return model_.is_last_stage(); }
  void forward_stage_verify(const ForwardBatch& batch, ForwardCache& cache, const float* hidden_in,
                            const std::vector<VerifySequence>& seqs, std::vector<int32_t>& accepted,
                            std::vector<std::vector<int32_t>>& tokens) override;
  // On the device too (CudaLlamaModel::forward_draft_sample), for a whole, unsharded model.
  bool keeps_draft_distributions() const override;
  std::shared_ptr<KeptRows> make_kept_rows(int64_t rows) override { return model_.make_kept_rows(rows); }
  void forward_draft_sample(const ForwardBatch& batch, ForwardCache& cache,
                            const std::vector<SamplingParams>& params, const std::vector<double>& uniforms,
                            const std::vector<KeptRowRef>& keep, std::vector<int32_t>& ids) override;
  void set_lora(int32_t slot, const model::LoraAdapter& adapter, float user_scale) override {
    model_.set_lora(slot, adapter, user_scale);
  }
  void remove_lora(int32_t slot) override { model_.remove_lora(slot); }

 private:
  CudaLlamaModel& model_;
  int device_;
};

}  // namespace nibble::worker
