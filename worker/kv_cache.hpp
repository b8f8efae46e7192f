#pragma once
// Paged KV cache storage and the allocator of its blocks. A sequence owns a list of fixed-size
// blocks (its block table); position p lives in block table[p / block_size]. Storage knows nothing
// of sequences, so a coordinator can own the tables and send them with each step.
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/quant_types.hpp"
#include "model/llama_config.hpp"

namespace nibble::worker {

// The storage types of a cache's K and V rows (llama.cpp's --cache-type-k and --cache-type-v): F16, or
// a quantized type. One type converts to both sides, the common case (vLLM's kv_cache_dtype).
struct KvCacheTypes {
  kernels::DType k = kernels::DType::F16;
  kernels::DType v = kernels::DType::F16;
  KvCacheTypes() = default;
  KvCacheTypes(kernels::DType both) : k(both), v(both) {}  // NOLINT(google-explicit-constructor)
  KvCacheTypes(kernels::DType k_type, kernels::DType v_type) : k(k_type), v(v_type) {}
  bool quantized() const { return k != kernels::DType::F16 || v != kernels::DType::F16; }
  // "q8_0" when both sides are, else "k q8_0, v q4_0".
  std::string name() const;
  bool operator==(const KvCacheTypes&) const = default;
};

// llama.cpp's attention rotation for quantized caches (on by default since its PR 21038;
// LLAMA_ATTN_ROT_DISABLE=1 turns it off): Q and K after RoPE are multiplied by an orthonormal
// Walsh-Hadamard matrix per block of k_block values of each head, V per block of v_block, and the
// attention's output back by the same v_block (kernels/hadamard). q·k and the output are unchanged; the
// cache's blocks hold values with their outliers spread out, which quantize better. 0: that side is not
// rotated (llama.cpp rotates K and V each when its own type is quantized).
struct KvRotation {
  int64_t k_block = 0;
  int64_t v_block = 0;
  bool operator==(const KvRotation&) const = default;
};

class KvCache {
 public:
  // Stores n_blocks blocks of block_size positions for every layer, K and V, each as its type: F16
  // (fp16 bits, llama.cpp's default) or, as llama.cpp's --cache-type-k/-v, Q8_0 (blocks of 32 values:
  // an fp16 scale and 32 int8, 34 bytes for fp16's 64), Q5_1 (24 bytes), Q5_0 (22), Q4_1 (20), Q4_0 or
  // IQ4_NL (18); the quantized types need a head_dim that is a multiple of 32. Throws
  // std::invalid_argument otherwise (unsupported() says why).
  KvCache(const model::LlamaConfig& config, int64_t n_blocks, int64_t block_size = 16,
          KvCacheTypes types = {});

  int64_t n_blocks() const { return n_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t kv_dim() const { return kv_dim_; }
  const KvCacheTypes& types() const { return types_; }
  // k, v of one layer as F16 (that side's type F16): [n_blocks, block_size, kv_dim] fp16 bits
  uint16_t* k(int64_t layer) { return reinterpret_cast<uint16_t*>(k_bytes(layer)); }
  uint16_t* v(int64_t layer) { return reinterpret_cast<uint16_t*>(v_bytes(layer)); }
  // k, v of one layer as stored: [n_blocks, block_size, k_row_bytes()] (v_row_bytes()) bytes
  uint8_t* k_bytes(int64_t layer) { return k_.data() + layer * n_blocks_ * block_size_ * k_row_bytes_; }
  uint8_t* v_bytes(int64_t layer) { return v_.data() + layer * n_blocks_ * block_size_ * v_row_bytes_; }
  int64_t k_row_bytes() const { return k_row_bytes_; }  // one position's K of one layer
  int64_t v_row_bytes() const { return v_row_bytes_; }
  // Bytes per block across all layers, K and V: what sizing from a memory budget divides by.
  static int64_t bytes_per_block(const model::LlamaConfig& config, int64_t block_size,
                                 KvCacheTypes types = {});
  // Why a cache of these types cannot hold this model's K and V (empty: it can).
  static std::string unsupported(const model::LlamaConfig& config, const KvCacheTypes& types);
  // The rotation llama.cpp applies with a cache of these types, for heads of a multiple of 64 values:
  // a quantized K's in blocks of the largest power of two dividing head_dim, a quantized V's in blocks
  // of 64; none for an F16 side.
  static KvRotation rotation(const model::LlamaConfig& config, const KvCacheTypes& types);

 private:
  int64_t n_blocks_, block_size_, kv_dim_, k_row_bytes_, v_row_bytes_;
  KvCacheTypes types_;
  std::vector<uint8_t> k_, v_;
};

// Hands out block ids; a sequence's table grows as it does and returns its blocks when it ends.
class BlockAllocator {
 public:
  explicit BlockAllocator(int64_t n_blocks);
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  // Grows `table` to cover n_positions; false (table unchanged) when not enough blocks are free.
  bool reserve(std::vector<int32_t>& table, int64_t n_positions, int64_t block_size);
  // Shrinks `table` to cover n_positions (speculative rollback), freeing whole unused blocks.
  void truncate(std::vector<int32_t>& table, int64_t n_positions, int64_t block_size);
  void release(std::vector<int32_t>& table) { truncate(table, 0, 1); }

 private:
  std::vector<int32_t> free_;
};

}  // namespace nibble::worker
