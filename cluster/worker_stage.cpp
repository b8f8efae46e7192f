#include "cluster/worker_stage.hpp"

namespace nibble::cluster {

CpuWorkerStage::CpuWorkerStage(worker::LlamaModel& model, kernels::ThreadPool& pool, int64_t num_blocks,
                               int64_t block_size)
    : model_(model), pool_(pool), cache_(model.shard_config(), num_blocks, block_size) {}

void CpuWorkerStage::forward_stage(const worker::ForwardBatch& batch, const float* hidden_in,
                                   std::vector<float>& out) {
  model_.forward_stage(batch, cache_, pool_, hidden_in, out);
}

CudaWorkerStage::CudaWorkerStage(worker::CudaLlamaModel& model, int device, int64_t num_blocks,
                                 int64_t block_size)
    : model_(model), cache_(model.shard_config(), num_blocks, block_size, device) {}

void CudaWorkerStage::forward_stage(const worker::ForwardBatch& batch, const float* hidden_in,
                                    std::vector<float>& out) {
  model_.forward_stage(batch, cache_, hidden_in, out);
}

}  // namespace nibble::cluster
