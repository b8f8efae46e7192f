#pragma once
// What WorkerService drives on one worker rank: its tensor shard of its pipeline stage, on the CPU
// (worker::LlamaModel) or on a GPU (worker::CudaLlamaModel), together with that stage's KV cache.
// The service needs only this: run a step's batch with host hidden states in and host logits or
// hidden states out, so one service serves both backends.
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "model/llama_config.hpp"
#include "worker/cuda_llama_model.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"

namespace nibble::cluster {

class WorkerStage {
 public:
  virtual ~WorkerStage() = default;
  // The whole model's hyperparameters (n_embd of the hidden states, n_vocab of the logits).
  virtual const model::LlamaConfig& config() const = 0;
  virtual bool is_first_stage() const = 0;
  virtual bool is_last_stage() const = 0;
  // As LlamaModel::forward_stage, on the stage's own KV cache. hidden_in: host [tokens, n_embd] or
  // null on the first stage; out: host logits [logit rows, n_vocab] on the last stage, hidden
  // states [tokens, n_embd] elsewhere.
  virtual void forward_stage(const worker::ForwardBatch& batch, const float* hidden_in,
                             std::vector<float>& out) = 0;
};

// The CPU model (not owned) with a KvCache of num_blocks x block_size sized from its shard_config.
class CpuWorkerStage final : public WorkerStage {
 public:
  CpuWorkerStage(worker::LlamaModel& model, kernels::ThreadPool& pool, int64_t num_blocks,
                 int64_t block_size);
  const model::LlamaConfig& config() const override { return model_.config(); }
  bool is_first_stage() const override { return model_.is_first_stage(); }
  bool is_last_stage() const override { return model_.is_last_stage(); }
  void forward_stage(const worker::ForwardBatch& batch, const float* hidden_in,
                     std::vector<float>& out) override;

 private:
  worker::LlamaModel& model_;
  kernels::ThreadPool& pool_;
  worker::KvCache cache_;
};

// The GPU model (not owned) with a CudaKvCache on the model's device. Throws CudaUnavailable in a
// build without CUDA.
class CudaWorkerStage final : public WorkerStage {
 public:
  CudaWorkerStage(worker::CudaLlamaModel& model, int device, int64_t num_blocks, int64_t block_size);
  const model::LlamaConfig& config() const override { return model_.config(); }
  bool is_first_stage() const override { return model_.is_first_stage(); }
  bool is_last_stage() const override { return model_.is_last_stage(); }
  void forward_stage(const worker::ForwardBatch& batch, const float* hidden_in,
                     std::vector<float>& out) override;

 private:
  worker::CudaLlamaModel& model_;
  worker::CudaKvCache cache_;
};

}  // namespace nibble::cluster
