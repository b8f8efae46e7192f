// RankLayout and the sharding arithmetic: pure functions, no MPI.
#include <gtest/gtest.h>

#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel/rank_layout.hpp"
#include "parallel/sharding.hpp"

namespace nibble::parallel {
namespace {

// Expects fn to throw E whose message contains every one of the fragments.
template <typename E, typename Fn>
void expect_throw_with(Fn&& fn, const std::vector<std::string>& fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected an exception";
  } catch (const E& error) {
    for (const auto& fragment : fragments) {
      EXPECT_NE(std::string(error.what()).find(fragment), std::string::npos)
          << "'" << fragment << "' missing from: " << error.what();
    }
  }
}

// The ranges of all parts, in order, tile [0, n) exactly.
void expect_partition(const std::vector<ShardRange>& parts, size_t n) {
  size_t next = 0;
  for (const auto& part : parts) {
    EXPECT_EQ(part.begin, next);
    next = part.end();
  }
  EXPECT_EQ(next, n);
}

TEST(RankLayout, SevenRanksAsThreeByTwo) {
  const RankLayout layout(7, 3, 2);
  EXPECT_EQ(layout.num_workers(), 6);

  const RankInfo coordinator = layout.rank(0);
  EXPECT_EQ(coordinator.role, Role::coordinator);
  EXPECT_EQ(coordinator.stage, -1);
  EXPECT_EQ(coordinator.tp_rank, -1);
  EXPECT_TRUE(coordinator.tensor_group.empty());
  EXPECT_FALSE(coordinator.prev_stage_peer.has_value());

  const RankInfo first = layout.rank(2);  // worker 1: stage 0, tp_rank 1
  EXPECT_EQ(first.role, Role::worker);
  EXPECT_EQ(first.stage, 0);
  EXPECT_EQ(first.tp_rank, 1);
  EXPECT_EQ(first.tensor_group, (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(first.pipeline_group, (std::vector<int>{2, 5}));
  EXPECT_FALSE(first.prev_stage_peer.has_value());
  EXPECT_EQ(first.next_stage_peer, 5);
  EXPECT_TRUE(first.is_first_stage);
  EXPECT_FALSE(first.is_last_stage);

  const RankInfo last = layout.rank(5);  // worker 4: stage 1, tp_rank 1
  EXPECT_EQ(last.worker_index, 4);
  EXPECT_EQ(last.stage, 1);
  EXPECT_EQ(last.tp_rank, 1);
  EXPECT_EQ(last.tensor_group, (std::vector<int>{4, 5, 6}));
  EXPECT_EQ(last.prev_stage_peer, 2);
  EXPECT_FALSE(last.next_stage_peer.has_value());
  EXPECT_TRUE(last.is_last_stage);
  EXPECT_EQ(last.local_rank, -1);  // only the MPI helper knows it
}

TEST(RankLayout, EveryShapeIsConsistent) {
  for (int tensor = 1; tensor <= 5; ++tensor) {
    for (int pipeline = 1; pipeline <= 4; ++pipeline) {
      SCOPED_TRACE("T=" + std::to_string(tensor) + " P=" + std::to_string(pipeline));
      const RankLayout layout(1 + tensor * pipeline, tensor, pipeline);
      std::set<std::pair<int, int>> seen;  // (stage, tp_rank) of every worker
      for (int world_rank = 1; world_rank < layout.world_size(); ++world_rank) {
        const RankInfo info = layout.rank(world_rank);
        ASSERT_EQ(info.role, Role::worker);
        EXPECT_TRUE(seen.insert({info.stage, info.tp_rank}).second);
        EXPECT_EQ(layout.world_rank_of(info.stage, info.tp_rank), world_rank);
        ASSERT_EQ(info.tensor_group.size(), static_cast<size_t>(tensor));
        ASSERT_EQ(info.pipeline_group.size(), static_cast<size_t>(pipeline));
        EXPECT_EQ(info.tensor_group[info.tp_rank], world_rank);
        EXPECT_EQ(info.pipeline_group[info.stage], world_rank);
        for (int member : info.tensor_group) EXPECT_EQ(layout.rank(member).stage, info.stage);
        for (int member : info.pipeline_group) EXPECT_EQ(layout.rank(member).tp_rank, info.tp_rank);
        EXPECT_EQ(info.is_first_stage, info.stage == 0);
        EXPECT_EQ(info.is_last_stage, info.stage == pipeline - 1);
        EXPECT_EQ(info.prev_stage_peer.has_value(), !info.is_first_stage);
        EXPECT_EQ(info.next_stage_peer.has_value(), !info.is_last_stage);
        if (info.next_stage_peer) {
          // Neighbours point at each other.
          EXPECT_EQ(layout.rank(*info.next_stage_peer).prev_stage_peer, world_rank);
          EXPECT_EQ(layout.rank(*info.next_stage_peer).stage, info.stage + 1);
        }
      }
      EXPECT_EQ(seen.size(), static_cast<size_t>(tensor * pipeline));
    }
  }
}

TEST(RankLayout, RejectsMismatchedWorldSize) {
  expect_throw_with<std::invalid_argument>([] { RankLayout(6, 2, 2); }, {"world size 6", "mpirun -np 5"});
  expect_throw_with<std::invalid_argument>([] { RankLayout(4, 2, 2); }, {"world size 4", "= 5 ranks"});
  expect_throw_with<std::invalid_argument>([] { RankLayout(1, 0, 1); }, {"must be >= 1"});
  expect_throw_with<std::invalid_argument>([] { RankLayout(3, 2, -1); }, {"must be >= 1"});
  EXPECT_NO_THROW(RankLayout(2, 1, 1));
}

TEST(RankLayout, ADraftRankIsTheLastWorldRank) {
  const RankLayout layout(6, 2, 2, /*draft_rank=*/true);
  EXPECT_TRUE(layout.has_draft_rank());
  EXPECT_EQ(layout.draft_world_rank(), 5);
  EXPECT_EQ(layout.num_workers(), 4);
  const RankInfo draft = layout.rank(5);
  EXPECT_EQ(draft.role, Role::draft);
  EXPECT_EQ(draft.stage, -1);
  EXPECT_TRUE(draft.tensor_group.empty());
  EXPECT_EQ(layout.rank(4).role, Role::worker);  // the workers keep their places
  EXPECT_EQ(layout.rank(4).stage, 1);
  EXPECT_EQ(layout.rank(4).tp_rank, 1);
  EXPECT_EQ(layout.describe(), "1 coordinator + 2 stages x 2 tensor ranks + 1 draft rank = 6 ranks");
  EXPECT_EQ(RankLayout(5, 2, 2).draft_world_rank(), -1);
  expect_throw_with<std::invalid_argument>([] { RankLayout(5, 2, 2, true); },
                                           {"+ 1 draft rank", "mpirun -np 6"});
}

TEST(RankLayout, RejectsRanksOutsideTheWorld) {
  const RankLayout layout(5, 2, 2);
  EXPECT_THROW(layout.rank(-1), std::out_of_range);
  EXPECT_THROW(layout.rank(5), std::out_of_range);
  EXPECT_THROW(layout.world_rank_of(2, 0), std::out_of_range);
  EXPECT_THROW(layout.world_rank_of(0, 2), std::out_of_range);
}

TEST(SplitHeads, ReplicatesKvHeadsWhenTensorExceedsThem) {
  // 8 query heads, 2 KV heads, T = 4: each rank has 2 query heads; ranks 0,1 read KV head 0.
  const size_t expected_kv[] = {0, 0, 1, 1};
  for (size_t rank = 0; rank < 4; ++rank) {
    const HeadShard shard = split_heads(8, 2, 4, rank);
    EXPECT_EQ(shard.q_heads, (ShardRange{rank * 2, 2}));
    EXPECT_EQ(shard.kv_heads, (ShardRange{expected_kv[rank], 1}));
    EXPECT_TRUE(shard.kv_replicated);
  }
}

TEST(SplitHeads, SplitsKvHeadsWhenDivisible) {
  // Llama 3 8B: 32 query heads, 8 KV heads, T = 4: 8 query heads and 2 KV heads per rank.
  const HeadShard shard = split_heads(32, 8, 4, 3);
  EXPECT_EQ(shard.q_heads, (ShardRange{24, 8}));
  EXPECT_EQ(shard.kv_heads, (ShardRange{6, 2}));
  EXPECT_FALSE(shard.kv_replicated);
  // Multi-head attention (n_head_kv == n_head) splits both identically.
  const HeadShard mha = split_heads(32, 32, 8, 5);
  EXPECT_EQ(mha.q_heads, mha.kv_heads);
}

TEST(SplitHeads, EveryQueryHeadFindsItsKvHeadOnItsRank) {
  for (size_t n_head : {1u, 4u, 8u, 12u, 32u, 40u, 64u}) {
    for (size_t n_head_kv = 1; n_head_kv <= n_head; ++n_head_kv) {
      if (n_head % n_head_kv != 0) continue;
      const size_t group = n_head / n_head_kv;  // query heads per KV head
      for (size_t tensor : {1u, 2u, 3u, 4u, 5u, 6u, 8u, 16u, 32u, 64u}) {
        SCOPED_TRACE("n_head=" + std::to_string(n_head) + " n_head_kv=" + std::to_string(n_head_kv) +
                     " T=" + std::to_string(tensor));
        const bool possible = n_head % tensor == 0 && (n_head_kv % tensor == 0 || tensor % n_head_kv == 0);
        if (!possible) {
          EXPECT_THROW(split_heads(n_head, n_head_kv, tensor, 0), std::invalid_argument);
          continue;
        }
        std::vector<ShardRange> q_parts;
        std::vector<ShardRange> kv_parts;
        for (size_t rank = 0; rank < tensor; ++rank) {
          const HeadShard shard = split_heads(n_head, n_head_kv, tensor, rank);
          q_parts.push_back(shard.q_heads);
          kv_parts.push_back(shard.kv_heads);
          EXPECT_EQ(shard.q_heads.count, n_head / tensor);
          EXPECT_EQ(shard.kv_replicated, n_head_kv % tensor != 0);
          for (size_t head = shard.q_heads.begin; head < shard.q_heads.end(); ++head) {
            const size_t kv = head / group;
            EXPECT_TRUE(kv >= shard.kv_heads.begin && kv < shard.kv_heads.end())
                << "rank " << rank << " head " << head;
          }
        }
        expect_partition(q_parts, n_head);
        if (n_head_kv % tensor == 0) {
          expect_partition(kv_parts, n_head_kv);
        } else {
          // Replicated: each KV head sits on exactly T / n_head_kv consecutive ranks.
          for (size_t rank = 0; rank < tensor; ++rank) {
            EXPECT_EQ(kv_parts[rank], (ShardRange{rank / (tensor / n_head_kv), 1}));
          }
        }
      }
    }
  }
}

TEST(SplitHeads, RejectsImpossibleSplits) {
  expect_throw_with<std::invalid_argument>([] { split_heads(32, 8, 3, 0); },
                                           {"32 query heads", "tensor size 3"});
  // 12 heads / 3 KV heads over T = 2: query heads split, but 3 KV heads neither split nor replicate.
  expect_throw_with<std::invalid_argument>([] { split_heads(12, 3, 2, 0); }, {"3 KV heads", "tensor size 2"});
  expect_throw_with<std::invalid_argument>([] { split_heads(8, 3, 2, 0); }, {"multiple of n_head_kv"});
  EXPECT_THROW(split_heads(8, 0, 2, 0), std::invalid_argument);
  EXPECT_THROW(split_heads(8, 2, 4, 4), std::invalid_argument);
  EXPECT_THROW(split_heads(8, 2, 0, 0), std::invalid_argument);
}

TEST(SplitRows, EvenSplitsOnBlockBoundaries) {
  for (size_t tensor : {1u, 2u, 4u, 7u, 8u}) {
    std::vector<ShardRange> parts;
    for (size_t rank = 0; rank < tensor; ++rank) parts.push_back(split_rows(14336, tensor, rank, 256));
    expect_partition(parts, 14336);
    for (const auto& part : parts) {
      EXPECT_EQ(part.begin % 256, 0u);
      EXPECT_EQ(part.count, 14336 / tensor);
    }
  }
  EXPECT_EQ(split_rows(4096, 4, 2), (ShardRange{2048, 1024}));
  EXPECT_EQ(split_rows(96, 3, 1, 32), (ShardRange{32, 32}));
}

TEST(SplitRows, RejectsSplitsOffBlockBoundaries) {
  // Llama 2 7B's n_ff 11008 over T = 8 is 1376 rows: fine for Q4_0 (32) but not for K-quants (256).
  EXPECT_NO_THROW(split_rows(11008, 8, 0, 32));
  expect_throw_with<std::invalid_argument>([] { split_rows(11008, 8, 0, 256); },
                                           {"11008", "tensor size 8", "256"});
  EXPECT_THROW(split_rows(10, 3, 0), std::invalid_argument);
  EXPECT_THROW(split_rows(64, 2, 0, 0), std::invalid_argument);
  EXPECT_THROW(split_rows(64, 2, 2), std::invalid_argument);
}

TEST(SplitVocab, FirstRanksGetTheRemainder) {
  EXPECT_EQ(split_vocab(32000, 3, 0), (ShardRange{0, 10667}));
  EXPECT_EQ(split_vocab(32000, 3, 1), (ShardRange{10667, 10667}));
  EXPECT_EQ(split_vocab(32000, 3, 2), (ShardRange{21334, 10666}));
  for (size_t n_vocab : {5u, 7u, 32000u, 128256u, 151936u}) {
    for (size_t tensor = 1; tensor <= 5; ++tensor) {
      std::vector<ShardRange> parts;
      for (size_t rank = 0; rank < tensor; ++rank) parts.push_back(split_vocab(n_vocab, tensor, rank));
      expect_partition(parts, n_vocab);
      for (const auto& part : parts) EXPECT_LE(parts.front().count - part.count, 1u);
    }
  }
  EXPECT_THROW(split_vocab(2, 3, 0), std::invalid_argument);
  EXPECT_THROW(split_vocab(32000, 3, 3), std::invalid_argument);
}

TEST(SplitLayers, EarlierStagesGetTheExtra) {
  EXPECT_EQ(split_layers(32, 3, 0), (ShardRange{0, 11}));
  EXPECT_EQ(split_layers(32, 3, 1), (ShardRange{11, 11}));
  EXPECT_EQ(split_layers(32, 3, 2), (ShardRange{22, 10}));
  const size_t expected_counts[] = {2, 1, 1, 1};
  for (size_t stage = 0; stage < 4; ++stage)
    EXPECT_EQ(split_layers(5, 4, stage).count, expected_counts[stage]);
  for (size_t n_layer : {1u, 16u, 22u, 32u, 80u}) {
    for (size_t pipeline = 1; pipeline <= n_layer && pipeline <= 8; ++pipeline) {
      std::vector<ShardRange> parts;
      for (size_t stage = 0; stage < pipeline; ++stage)
        parts.push_back(split_layers(n_layer, pipeline, stage));
      expect_partition(parts, n_layer);
    }
  }
  expect_throw_with<std::invalid_argument>([] { split_layers(3, 4, 0); }, {"3 layers", "4 pipeline stages"});
  EXPECT_THROW(split_layers(32, 0, 0), std::invalid_argument);
}

}  // namespace
}  // namespace nibble::parallel
