#include "worker/forward_model.hpp"

#include <stdexcept>

namespace nibble::worker {

namespace {
struct CpuCache final : ForwardCache {
  CpuCache(const model::LlamaConfig& config, int64_t num_blocks, int64_t block_size)
      : cache(config, num_blocks, block_size) {}
  KvCache cache;
};
}  // namespace

std::unique_ptr<ForwardCache> CpuForwardModel::make_cache(int64_t num_blocks, int64_t block_size) const {
  return std::make_unique<CpuCache>(model_.shard_config(), num_blocks, block_size);
}

void CpuForwardModel::forward_stage(const ForwardBatch& batch, ForwardCache& cache, const float* hidden_in,
                                    std::vector<float>& out) {
  auto* own = dynamic_cast<CpuCache*>(&cache);
  if (own == nullptr) throw std::logic_error("CpuForwardModel: a cache made by another kind of model");
  model_.forward_stage(batch, own->cache, pool_, hidden_in, out);
}

}  // namespace nibble::worker
