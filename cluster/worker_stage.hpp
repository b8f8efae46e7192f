#pragma once
// What WorkerService drives on one worker rank: its tensor shard of its pipeline stage (a
// worker::ForwardModel: the CPU's LlamaModel or a GPU's CudaLlamaModel) together with that stage's
// KV cache. The service needs only this: run a step's batch with host hidden states in and host
// logits or hidden states out, so one service serves both backends.
#include <cstdint>
#include <memory>
#include <vector>

#include "model/llama_config.hpp"
#include "worker/forward_model.hpp"

namespace nibble::cluster {

class WorkerStage {
 public:
  // model: the shard (not owned); the stage's cache: num_blocks x block_size, on the model's device.
  WorkerStage(worker::ForwardModel& model, int64_t num_blocks, int64_t block_size)
      : model_(model), cache_(model.make_cache(num_blocks, block_size)) {}
  // The whole model's hyperparameters (n_embd of the hidden states, n_vocab of the logits).
  const model::LlamaConfig& config() const { return model_.config(); }
  bool is_first_stage() const { return model_.is_first_stage(); }
  bool is_last_stage() const { return model_.is_last_stage(); }
  // As LlamaModel::forward_stage, on the stage's own KV cache. hidden_in: host [tokens, n_embd] or
  // null on the first stage; out: host logits [logit rows, n_vocab] on the last stage, hidden
  // states [tokens, n_embd] elsewhere.
  void forward_stage(const worker::ForwardBatch& batch, const float* hidden_in, std::vector<float>& out) {
    model_.forward_stage(batch, *cache_, hidden_in, out);
  }
  // The last stage's pass with only each logit row's argmax back (ForwardModel::forward_stage_argmax).
  void forward_stage_argmax(const worker::ForwardBatch& batch, const float* hidden_in,
                            std::vector<int32_t>& ids) {
    model_.forward_stage_argmax(batch, *cache_, hidden_in, ids);
  }
  // The last stage's pass with each logit row sampled (ForwardModel::forward_stage_sample).
  void forward_stage_sample(const worker::ForwardBatch& batch, const float* hidden_in,
                            const std::vector<worker::SamplingParams>& params,
                            const std::vector<double>& uniforms, const worker::TokenHistories& histories,
                            std::vector<int32_t>& ids) {
    model_.forward_stage_sample(batch, *cache_, hidden_in, params, uniforms, histories, ids);
  }
  // Whether the model verifies sampled drafts where its logits are (ForwardModel::verifies_drafts:
  // a GPU's last stage), and that pass (ForwardModel::forward_stage_verify; hidden_in as above).
  bool verifies_drafts() const { return model_.verifies_drafts(); }
  // The LoRA adapter a batch names by `slot`, loaded or removed while the job runs
  // (ForwardModel::set_lora / remove_lora, on the CPU's model and the GPU's alike).
  void set_lora(int32_t slot, const model::LoraAdapter& adapter, float user_scale) {
    model_.set_lora(slot, adapter, user_scale);
  }
  void remove_lora(int32_t slot) { model_.remove_lora(slot); }
  void forward_stage_verify(const worker::ForwardBatch& batch, const float* hidden_in,
                            const std::vector<worker::VerifySequence>& seqs, std::vector<int32_t>& accepted,
                            std::vector<std::vector<int32_t>>& tokens) {
    model_.forward_stage_verify(batch, *cache_, hidden_in, seqs, accepted, tokens);
  }

 private:
  worker::ForwardModel& model_;
  std::unique_ptr<worker::ForwardCache> cache_;
};

}  // namespace nibble::cluster
