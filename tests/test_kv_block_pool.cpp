// The coordinator's KV block pool (cluster/kv_block_pool.hpp): reference counts, the cache of whole
// blocks by content (exact: a block is found only after the same blocks before it), least recently
// released eviction that takes the blocks cached after an evicted one with it, and the plain
// allocator it is with prefix caching off.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "cluster/kv_block_pool.hpp"

namespace nibble::cluster {
namespace {

std::vector<int32_t> iota_tokens(int n, int32_t first) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), first);
  return v;
}

TEST(KvBlockPool, AllocatesTheLowestIdsFirstAndCountsWhatItHandsOut) {
  KvBlockPool pool(6, 4, true);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(pool.reserve(a, 9));  // 3 blocks
  EXPECT_EQ(a, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_TRUE(pool.reserve(a, 12));  // still 3
  EXPECT_EQ(a.size(), 3u);
  EXPECT_FALSE(pool.reserve(b, 16));  // 4 > 3 available: unchanged
  EXPECT_TRUE(b.empty());
  ASSERT_TRUE(pool.reserve(b, 12));
  EXPECT_EQ(pool.available(), 0);
  EXPECT_EQ(pool.held(), 6);
  pool.truncate(a, 5);  // keeps 2 blocks
  EXPECT_EQ(a, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(pool.available(), 1);
  pool.release(a);
  pool.release(b);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(pool.available(), 6);
  EXPECT_EQ(pool.idle_cached(), 0);  // nothing was published
}

TEST(KvBlockPool, PublishedBlocksAreSharedByTheSamePrefixOnly) {
  KvBlockPool pool(16, 4, true);
  const std::vector<int32_t> prompt = iota_tokens(14, 100);
  std::vector<int32_t> first;
  ASSERT_TRUE(pool.reserve(first, 14));  // 4 blocks, the last one partly filled
  pool.publish(first, prompt, 14);       // 3 whole blocks
  // The same tokens: the 3 whole blocks, the same ids, held twice now.
  std::vector<int32_t> again = pool.match(prompt, 100);
  EXPECT_EQ(again, (std::vector<int32_t>(first.begin(), first.begin() + 3)));
  // At most max_tokens: 11 tokens are 2 whole blocks.
  std::vector<int32_t> shorter = pool.match(prompt, 11);
  EXPECT_EQ(shorter.size(), 2u);
  // A different second block: only the first block matches, and a different first token none.
  std::vector<int32_t> branch = prompt;
  branch[5] = 7;
  std::vector<int32_t> one = pool.match(branch, 100);
  EXPECT_EQ(one, std::vector<int32_t>{first[0]});
  std::vector<int32_t> other = prompt;
  other[0] = 7;
  EXPECT_TRUE(pool.match(other, 100).empty());
  // A block's content after a different first block is not the same block: tokens 4..7 alone do not
  // match at position 0.
  EXPECT_TRUE(pool.match(std::vector<int32_t>(prompt.begin() + 4, prompt.end()), 100).empty());
  // Each release gives back one hold; the blocks stay cached (idle) once nobody holds them.
  for (auto* t : {&again, &shorter, &one}) pool.release(*t);
  EXPECT_EQ(pool.held(), 4);
  pool.release(first);
  EXPECT_EQ(pool.held(), 0);
  EXPECT_EQ(pool.idle_cached(), 3);
  EXPECT_EQ(pool.available(), 16);
  EXPECT_EQ(pool.match(prompt, 100).size(), 3u);  // still cached
}

// Sequences of different LoRA adapters compute different K/V for the same tokens: a prefix is shared
// only within one adapter.
TEST(KvBlockPool, PrefixesAreSharedWithinOneAdapterOnly) {
  KvBlockPool pool(16, 4, true);
  const std::vector<int32_t> prompt = iota_tokens(9, 100);
  std::vector<int32_t> base, adapted;
  ASSERT_TRUE(pool.reserve(base, 9));
  pool.publish(base, prompt, 9);
  EXPECT_TRUE(pool.match(prompt, 100, 1).empty());
  ASSERT_TRUE(pool.reserve(adapted, 9));
  pool.publish(adapted, prompt, 9, 1);
  std::vector<int32_t> again_base = pool.match(prompt, 100);
  std::vector<int32_t> again_adapted = pool.match(prompt, 100, 1);
  EXPECT_EQ(again_base, (std::vector<int32_t>(base.begin(), base.begin() + 2)));
  EXPECT_EQ(again_adapted, (std::vector<int32_t>(adapted.begin(), adapted.begin() + 2)));
  EXPECT_TRUE(pool.match(prompt, 100, 2).empty());
  for (auto* t : {&base, &adapted, &again_base, &again_adapted}) pool.release(*t);
  EXPECT_EQ(pool.idle_cached(), 4);
}

TEST(KvBlockPool, ContentAnotherBlockHoldsStaysPrivateAndSoDoesWhatFollows) {
  KvBlockPool pool(16, 4, true);
  const std::vector<int32_t> prompt = iota_tokens(12, 1);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(pool.reserve(a, 12));
  ASSERT_TRUE(pool.reserve(b, 12));  // computed the same prompt in the same step, separately
  pool.publish(a, prompt, 12);
  pool.publish(b, prompt, 12);  // all three already cached as a's: b's stay private
  pool.release(b);
  EXPECT_EQ(pool.idle_cached(), 0);  // b's blocks went back to the free list
  EXPECT_EQ(pool.match(prompt, 12), a);
}

TEST(KvBlockPool, EvictsTheLeastRecentlyReleasedAndTheBlocksCachedAfterIt) {
  KvBlockPool pool(6, 2, true);
  const std::vector<int32_t> x = iota_tokens(6, 10), y = iota_tokens(4, 50);
  std::vector<int32_t> tx, ty;
  ASSERT_TRUE(pool.reserve(tx, 6));
  pool.publish(tx, x, 6);  // x: 3 blocks
  ASSERT_TRUE(pool.reserve(ty, 4));
  pool.publish(ty, y, 4);  // y: 2 blocks
  pool.release(tx);        // x's blocks released last first: its tail is older than its head
  pool.release(ty);
  EXPECT_EQ(pool.idle_cached(), 5);
  EXPECT_EQ(pool.available(), 6);
  // Two new blocks: the free one, then x's tail (the least recently released).
  std::vector<int32_t> t;
  ASSERT_TRUE(pool.reserve(t, 4));
  std::vector<int32_t> held_x = pool.match(x, 6);
  EXPECT_EQ(held_x.size(), 2u);  // x's first two blocks remain
  pool.release(held_x);
  pool.release(t);
  // Take everything but one: what is left cached is a whole prefix.
  std::vector<int32_t> big;
  ASSERT_TRUE(pool.reserve(big, 10));
  EXPECT_EQ(pool.available(), 1);
  EXPECT_EQ(pool.idle_cached(), 1);
  const size_t x_left = pool.match(x, 6).size(), y_left = pool.match(y, 4).size();
  EXPECT_EQ(x_left + y_left, 1u);
  EXPECT_TRUE(x_left == 1 || y_left == 1);
}

TEST(KvBlockPool, EvictingABlockForgetsEveryBlockCachedAfterIt) {
  KvBlockPool pool(4, 2, true);
  const std::vector<int32_t> x = iota_tokens(8, 10);
  std::vector<int32_t> tx;
  ASSERT_TRUE(pool.reserve(tx, 8));
  pool.publish(tx, x, 8);
  // Release the head first, so that the head is the least recently released. (The scheduler releases
  // a table from its last block, so a block cached after another is released before it: this takes
  // a table in two parts.)
  std::vector<int32_t> head(tx.begin(), tx.begin() + 1), rest(tx.begin() + 1, tx.end());
  pool.release(head);
  pool.release(rest);
  std::vector<int32_t> none;
  ASSERT_TRUE(pool.reserve(none, 2));  // evicts the head: its three followers go with it
  EXPECT_EQ(pool.idle_cached(), 0);
  EXPECT_EQ(pool.available(), 3);
  EXPECT_TRUE(pool.match(x, 8).empty());
  // The evicted ids are reused for other content without any stale entry finding them.
  std::vector<int32_t> z;
  ASSERT_TRUE(pool.reserve(z, 6));
  const std::vector<int32_t> other = iota_tokens(6, 90);
  pool.publish(z, other, 6);
  EXPECT_TRUE(pool.match(x, 8).empty());
  EXPECT_EQ(pool.match(other, 6), z);
}

TEST(KvBlockPool, WithoutPrefixCachingNothingIsShared) {
  KvBlockPool pool(4, 2, false);
  const std::vector<int32_t> x = iota_tokens(4, 10);
  std::vector<int32_t> t;
  ASSERT_TRUE(pool.reserve(t, 4));
  pool.publish(t, x, 4);
  EXPECT_TRUE(pool.match(x, 4).empty());
  pool.release(t);
  EXPECT_EQ(pool.idle_cached(), 0);
  EXPECT_EQ(pool.available(), 4);
}

TEST(KvBlockPool, RefusesMisuse) {
  EXPECT_THROW(KvBlockPool(4, 0, true), std::invalid_argument);
  KvBlockPool pool(4, 2, true);
  std::vector<int32_t> t;
  ASSERT_TRUE(pool.reserve(t, 4));
  EXPECT_THROW(pool.publish(t, iota_tokens(3, 1), 4), std::logic_error);  // tokens shorter than published
  std::vector<int32_t> copy = t;
  pool.release(t);
  EXPECT_THROW(pool.release(copy), std::logic_error);  // released twice
}

}  // namespace
}  // namespace nibble::cluster
