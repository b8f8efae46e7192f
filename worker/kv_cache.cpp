#include "worker/kv_cache.hpp"

#include <stdexcept>

#include "kernels/attention.hpp"

namespace nibble::worker {

namespace {

const kernels::DType kF16 = kernels::DType::F16;

// Why one side of a cache cannot be of `type` (empty: it can).
std::string unsupported_side(const model::LlamaConfig& config, kernels::DType type) {
  // llama.cpp's --cache-type-k/-v types (its attention's, tests/data/llama-cpp-kv-cache).
  if (type != kF16 && !kernels::paged_attention_quantized_takes(type))
    return std::string("a KV cache of type ") + kernels::type_name(type) +
           " (f16, q8_0, q5_1, q5_0, q4_1, q4_0 or iq4_nl)";
  if (type != kF16 && config.head_dim % 32 != 0)
    return std::string("a ") + kernels::type_name(type) + " KV cache for heads of " +
           std::to_string(config.head_dim) + " values (it needs a multiple of 32)";
  return "";
}

}  // namespace

std::string KvCacheTypes::name() const {
  if (k == v) return kernels::type_name(k);
  return std::string("k ") + kernels::type_name(k) + ", v " + kernels::type_name(v);
}

std::string KvCache::unsupported(const model::LlamaConfig& config, const KvCacheTypes& types) {
  if (std::string why = unsupported_side(config, types.k); !why.empty()) return why;
  return unsupported_side(config, types.v);
}

KvRotation KvCache::rotation(const model::LlamaConfig& config, const KvCacheTypes& types) {
  if (config.head_dim % 64 != 0) return {};
  int64_t k_block = 64;
  while (config.head_dim % (2 * k_block) == 0) k_block *= 2;
  return {types.k != kF16 ? k_block : 0, types.v != kF16 ? 64 : 0};
}

KvCache::KvCache(const model::LlamaConfig& config, int64_t n_blocks, int64_t block_size, KvCacheTypes types)
    : n_blocks_(n_blocks), block_size_(block_size), kv_dim_(config.kv_dim()), types_(types) {
  if (n_blocks <= 0 || block_size <= 0) throw std::invalid_argument("KV cache needs at least one block");
  if (const std::string why = unsupported(config, types); !why.empty())
    throw std::invalid_argument("cannot make " + why);
  k_row_bytes_ = kernels::row_bytes(types.k, kv_dim_);
  v_row_bytes_ = kernels::row_bytes(types.v, kv_dim_);
  k_.assign(static_cast<size_t>(n_blocks * block_size * k_row_bytes_ * config.n_layer), 0);
  v_.assign(static_cast<size_t>(n_blocks * block_size * v_row_bytes_ * config.n_layer), 0);
}

int64_t KvCache::bytes_per_block(const model::LlamaConfig& config, int64_t block_size, KvCacheTypes types) {
  return config.n_layer * block_size *
         (kernels::row_bytes(types.k, config.kv_dim()) + kernels::row_bytes(types.v, config.kv_dim()));
}

BlockAllocator::BlockAllocator(int64_t n_blocks) {
  free_.reserve(n_blocks);
  // Highest id last so the lowest ids are handed out first (easier to read in traces).
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

bool BlockAllocator::reserve(std::vector<int32_t>& table, int64_t n_positions, int64_t block_size) {
  const int64_t needed = (n_positions + block_size - 1) / block_size;
  const int64_t extra = needed - static_cast<int64_t>(table.size());
  if (extra <= 0) return true;
  if (extra > free_blocks()) return false;
  for (int64_t i = 0; i < extra; ++i) {
    table.push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void BlockAllocator::truncate(std::vector<int32_t>& table, int64_t n_positions, int64_t block_size) {
  const int64_t keep = (n_positions + block_size - 1) / block_size;
  while (static_cast<int64_t>(table.size()) > keep) {
    free_.push_back(table.back());
    table.pop_back();
  }
}

}  // namespace nibble::worker
