#include <gtest/gtest.h>

#include <set>

#include "worker/cuda_llama_model.hpp"
#include "worker/kv_cache.hpp"

namespace nibble::worker {
namespace {

TEST(BlockAllocator, ReserveGrowsTablesWithDistinctBlocks) {
  BlockAllocator alloc(10);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(alloc.reserve(a, 33, 16));  // 3 blocks
  ASSERT_TRUE(alloc.reserve(b, 16, 16));  // 1 block
  EXPECT_EQ(a.size(), 3u);
  EXPECT_EQ(b.size(), 1u);
  EXPECT_EQ(alloc.free_blocks(), 6);
  std::set<int32_t> all(a.begin(), a.end());
  all.insert(b.begin(), b.end());
  EXPECT_EQ(all.size(), 4u);
  ASSERT_TRUE(alloc.reserve(a, 40, 16));  // still 3 blocks
  EXPECT_EQ(alloc.free_blocks(), 6);
}

TEST(BlockAllocator, ReserveFailsWithoutChangingTheTable) {
  BlockAllocator alloc(2);
  std::vector<int32_t> a;
  EXPECT_FALSE(alloc.reserve(a, 48, 16));
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(alloc.free_blocks(), 2);
}

TEST(BlockAllocator, TruncateAndReleaseReturnBlocks) {
  BlockAllocator alloc(8);
  std::vector<int32_t> a;
  ASSERT_TRUE(alloc.reserve(a, 8 * 16, 16));
  EXPECT_EQ(alloc.free_blocks(), 0);
  alloc.truncate(a, 17, 16);  // keeps 2 blocks
  EXPECT_EQ(a.size(), 2u);
  EXPECT_EQ(alloc.free_blocks(), 6);
  alloc.release(a);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(alloc.free_blocks(), 8);
}

TEST(KvCache, LayersDoNotOverlap) {
  model::LlamaConfig c;
  c.n_layer = 3;
  c.n_head = 4;
  c.n_head_kv = 2;
  c.head_dim = 8;
  KvCache cache(c, 5, 4);
  EXPECT_EQ(cache.kv_dim(), 16);
  EXPECT_EQ(cache.k(1) - cache.k(0), 5 * 4 * 16);
  EXPECT_EQ(cache.v(2) - cache.v(1), 5 * 4 * 16);
  EXPECT_EQ(KvCache::bytes_per_block(c, 4), 2 * 3 * 4 * 16 * 2);
}

// The Q8_0 cache: each position's row of kv_dim values as kv_dim / 32 blocks of 34 bytes (fp16's 64),
// so a block of positions costs 17/32 of fp16's; heads that are not whole blocks of 32 are refused.
TEST(KvCache, Q8_0RowsAreBlocksOf32) {
  model::LlamaConfig c;
  c.n_layer = 3;
  c.n_head = 8;
  c.n_head_kv = 2;
  c.head_dim = 64;
  KvCache cache(c, 5, 4, kernels::DType::Q8_0);
  EXPECT_EQ(cache.types(), (KvCacheTypes{kernels::DType::Q8_0, kernels::DType::Q8_0}));
  EXPECT_EQ(cache.k_row_bytes(), 4 * 34);
  EXPECT_EQ(cache.v_row_bytes(), 4 * 34);
  EXPECT_EQ(cache.k_bytes(1) - cache.k_bytes(0), 5 * 4 * 4 * 34);
  EXPECT_EQ(cache.v_bytes(2) - cache.v_bytes(1), 5 * 4 * 4 * 34);
  EXPECT_EQ(KvCache::bytes_per_block(c, 4, kernels::DType::Q8_0) * 32, KvCache::bytes_per_block(c, 4) * 17);
  EXPECT_EQ(KvCache::unsupported(c, kernels::DType::Q8_0), "");
  c.head_dim = 40;
  EXPECT_NE(KvCache::unsupported(c, kernels::DType::Q8_0).find("heads of 40 values"), std::string::npos);
  EXPECT_THROW(KvCache(c, 5, 4, kernels::DType::Q8_0), std::invalid_argument);
  EXPECT_THROW(KvCache(c, 5, 4, kernels::DType::Q4_0), std::invalid_argument);
}

TEST(KvCache, TakesLlamaCppsCacheTypes) {
  model::LlamaConfig c;
  c.n_layer = 1;
  c.n_head = 4;
  c.n_head_kv = 2;
  c.head_dim = 32;
  using kernels::DType;
  for (const auto& [type, block_bytes] :
       {std::pair{DType::Q8_0, 34}, std::pair{DType::Q5_1, 24}, std::pair{DType::Q5_0, 22},
        std::pair{DType::Q4_1, 20}, std::pair{DType::Q4_0, 18}, std::pair{DType::IQ4_NL, 18}}) {
    EXPECT_EQ(KvCache::unsupported(c, type), "") << kernels::type_name(type);
    EXPECT_EQ(KvCache(c, 2, 4, type).k_row_bytes(), 2 * block_bytes) << kernels::type_name(type);
  }
  // Each side its own type (llama.cpp's --cache-type-k / --cache-type-v): Q8_0 K, Q4_0 V.
  const KvCache mixed(c, 3, 4, KvCacheTypes{DType::Q8_0, DType::Q4_0});
  EXPECT_EQ(mixed.k_row_bytes(), 2 * 34);
  EXPECT_EQ(mixed.v_row_bytes(), 2 * 18);
  EXPECT_EQ(KvCache::bytes_per_block(c, 4, {DType::Q8_0, DType::Q4_0}), 1 * 4 * 2 * (34 + 18));
  EXPECT_EQ((KvCacheTypes{DType::Q8_0, DType::Q4_0}).name(), "k q8_0, v q4_0");
  EXPECT_EQ(KvCacheTypes(DType::Q5_1).name(), "q5_1");
  EXPECT_NE(KvCache::unsupported(c, {DType::Q8_0, DType::Q6_K}).find("q6_K"), std::string::npos);
  EXPECT_NE(KvCache::unsupported(c, DType::Q4_K)
                .find("a KV cache of type q4_K (f16, q8_0, q5_1, q5_0, q4_1, q4_0 or iq4_nl)"),
            std::string::npos)
      << KvCache::unsupported(c, DType::Q4_K);
}

// A GPU cache's bytes per block, what a GPU worker sizes its cache by: the CPU cache's, plus one layer's
// fp16 working copy of each quantized side (CudaKvCache reads a quantized layer through it).
TEST(KvCache, GpuBytesPerBlockCountTheWorkingCopies) {
  model::LlamaConfig c;
  c.n_layer = 80;
  c.n_head = 64;
  c.n_head_kv = 8;
  c.head_dim = 128;
  using kernels::DType;
  EXPECT_EQ(CudaKvCache::bytes_per_block(c, 16), KvCache::bytes_per_block(c, 16));
  EXPECT_EQ(CudaKvCache::bytes_per_block(c, 16, DType::Q8_0),
            KvCache::bytes_per_block(c, 16, DType::Q8_0) + 2 * 16 * 1024 * 2);
  EXPECT_EQ(CudaKvCache::bytes_per_block(c, 16, {DType::Q8_0, DType::F16}),
            KvCache::bytes_per_block(c, 16, {DType::Q8_0, DType::F16}) + 16 * 1024 * 2);
  // Llama-70B's shape: a Q8_0 cache holds 1.84x the positions of fp16's in the same device memory.
  const double ratio = static_cast<double>(CudaKvCache::bytes_per_block(c, 16)) /
                       static_cast<double>(CudaKvCache::bytes_per_block(c, 16, DType::Q8_0));
  EXPECT_NEAR(ratio, 1.84, 0.01);
}

// llama.cpp's attention rotation: quantized caches only, heads of a multiple of 64; K by the largest power
// of two dividing the head (64 ... 128), V by 64.
TEST(KvCache, RotationIsLlamaCppsForTheHeadSize) {
  model::LlamaConfig c;
  using kernels::DType;
  const auto rotation = [&](int64_t head_dim, DType type) {
    c.head_dim = head_dim;
    return KvCache::rotation(c, type);
  };
  EXPECT_EQ(rotation(64, DType::Q8_0), (KvRotation{64, 64}));
  EXPECT_EQ(rotation(128, DType::Q4_0), (KvRotation{128, 64}));
  EXPECT_EQ(rotation(256, DType::IQ4_NL), (KvRotation{256, 64}));
  EXPECT_EQ(rotation(192, DType::Q5_1), (KvRotation{64, 64}));
  EXPECT_EQ(rotation(128, DType::F16), KvRotation{});
  c.head_dim = 128;  // each side by its own type, as llama.cpp's attn_rot_k / attn_rot_v
  EXPECT_EQ(KvCache::rotation(c, {DType::Q8_0, DType::F16}), (KvRotation{128, 0}));
  EXPECT_EQ(KvCache::rotation(c, {DType::F16, DType::Q4_0}), (KvRotation{0, 64}));
  EXPECT_EQ(rotation(32, DType::Q8_0), KvRotation{});
  EXPECT_EQ(rotation(96, DType::Q8_0), KvRotation{});
}

}  // namespace
}  // namespace nibble::worker
