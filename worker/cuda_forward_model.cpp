// CudaForwardModel (worker/forward_model.hpp): built into nibble_worker_cuda, the real GPU model or
// its stub, so that it links in every build.
#include <stdexcept>

#include "worker/forward_model.hpp"

namespace nibble::worker {

namespace {
struct CudaCache final : ForwardCache {
  CudaCache(const model::LlamaConfig& config, int64_t num_blocks, int64_t block_size, int device,
            const KvCacheTypes& types)
      : cache(config, num_blocks, block_size, device, types) {}
  CudaKvCache cache;
};
}  // namespace

std::unique_ptr<ForwardCache> CudaForwardModel::make_cache(int64_t num_blocks, int64_t block_size) const {
  return std::make_unique<CudaCache>(model_.shard_config(), num_blocks, block_size, device_,
                                     model_.kv_cache_types());
}

void CudaForwardModel::forward_stage(const ForwardBatch& batch, ForwardCache& cache, const float* hidden_in,
                                     std::vector<float>& out) {
  auto* own = dynamic_cast<CudaCache*>(&cache);
  if (own == nullptr) throw std::logic_error("CudaForwardModel: a cache made by another kind of model");
  if (hidden_in == nullptr && model_.is_first_stage() && model_.is_last_stage()) {
    model_.forward(batch, own->cache, out);  // the whole model (CUDA graphs where they apply)
  } else {
    model_.forward_stage(batch, own->cache, hidden_in, out);
  }
}

void CudaForwardModel::forward_stage_argmax(const ForwardBatch& batch, ForwardCache& cache,
                                            const float* hidden_in, std::vector<int32_t>& ids) {
  auto* own = dynamic_cast<CudaCache*>(&cache);
  if (own == nullptr) throw std::logic_error("CudaForwardModel: a cache made by another kind of model");
  model_.forward_stage_greedy(batch, own->cache, hidden_in, ids);  // argmax_rows on the device
}

void CudaForwardModel::forward_stage_sample(const ForwardBatch& batch, ForwardCache& cache,
                                            const float* hidden_in, const std::vector<SamplingParams>& params,
                                            const std::vector<double>& uniforms,
                                            const TokenHistories& histories, std::vector<int32_t>& ids) {
  auto* own = dynamic_cast<CudaCache*>(&cache);
  if (own == nullptr) throw std::logic_error("CudaForwardModel: a cache made by another kind of model");
  if (hidden_in == nullptr && model_.is_first_stage() && model_.is_last_stage()) {
    model_.forward_sample(batch, own->cache, params, uniforms, ids, histories);  // on the device
  } else {
    ForwardModel::forward_stage_sample(batch, cache, hidden_in, params, uniforms, histories,
                                       ids);  // a pipeline stage
  }
}

void CudaForwardModel::forward_draft_sample(const ForwardBatch& batch, ForwardCache& cache,
                                            const std::vector<SamplingParams>& params,
                                            const std::vector<double>& uniforms,
                                            const std::vector<KeptRowRef>& keep, std::vector<int32_t>& ids) {
  auto* own = dynamic_cast<CudaCache*>(&cache);
  if (own == nullptr) throw std::logic_error("CudaForwardModel: a cache made by another kind of model");
  model_.forward_draft_sample(batch, own->cache, params, uniforms, keep, ids);
}

bool CudaForwardModel::keeps_draft_distributions() const {
  return model_.is_first_stage() && model_.is_last_stage() && model_.shard().size == 1;
}

void CudaForwardModel::forward_stage_verify(const ForwardBatch& batch, ForwardCache& cache,
                                            const float* hidden_in, const std::vector<VerifySequence>& seqs,
                                            std::vector<int32_t>& accepted,
                                            std::vector<std::vector<int32_t>>& tokens) {
  auto* own = dynamic_cast<CudaCache*>(&cache);
  if (own == nullptr) throw std::logic_error("CudaForwardModel: a cache made by another kind of model");
  model_.forward_stage_verify(batch, own->cache, hidden_in, seqs, accepted, tokens);
}

}  // namespace nibble::worker
