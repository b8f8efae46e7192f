#include <gtest/gtest.h>

#include <set>

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

}  // namespace
}  // namespace nibble::worker
