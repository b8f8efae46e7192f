#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>

#include "cluster/scheduler.hpp"

namespace nibble::cluster {
namespace {

std::vector<int32_t> tokens(int n, int32_t first = 10) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = first + i;
  return v;
}

SchedulerConfig small_config() {
  SchedulerConfig c;
  c.max_batch_tokens = 32;
  c.max_running = 4;
  c.prefill_chunk = 16;
  c.max_queue = 3;
  c.block_size = 4;
  c.num_blocks = 16;
  c.context = 64;
  return c;
}

// Blocks in use by the plan's entries never overlap.
void expect_disjoint_tables(const StepPlan& plan) {
  std::set<int32_t> seen;
  for (int32_t b : plan.block_tables) {
    if (b < 0) continue;
    EXPECT_TRUE(seen.insert(b).second) << "block " << b << " used twice";
  }
}

TEST(Scheduler, ChunkedPrefillThenDecode) {
  Scheduler s(small_config());
  ASSERT_EQ(s.submit(1, tokens(20), 5), Admission::accepted);
  auto step = s.next_step();
  ASSERT_TRUE(step);
  ASSERT_EQ(step->entries.size(), 1u);
  EXPECT_EQ(step->entries[0].tokens.size(), 16u);  // one prefill chunk
  EXPECT_EQ(step->entries[0].start_pos, 0);
  EXPECT_FALSE(step->entries[0].sample);
  step = s.next_step();
  EXPECT_EQ(step->entries[0].tokens.size(), 4u);
  EXPECT_EQ(step->entries[0].start_pos, 16);
  EXPECT_TRUE(step->entries[0].sample);
  s.append_token(1, 99);
  step = s.next_step();
  ASSERT_EQ(step->entries[0].tokens, std::vector<int32_t>{99});
  EXPECT_EQ(step->entries[0].start_pos, 20);
  EXPECT_TRUE(step->entries[0].sample);
}

TEST(Scheduler, RequestsJoinARunningBatchWithinTheTokenBudget) {
  Scheduler s(small_config());
  ASSERT_EQ(s.submit(1, tokens(3), 8), Admission::accepted);
  auto step = s.next_step();
  s.append_token(1, 50);
  ASSERT_EQ(s.submit(2, tokens(40), 8), Admission::accepted);
  step = s.next_step();
  ASSERT_EQ(step->entries.size(), 2u);
  EXPECT_EQ(step->entries[0].seq_id, 1u);  // decode first
  EXPECT_EQ(step->entries[0].tokens.size(), 1u);
  EXPECT_EQ(step->entries[1].seq_id, 2u);
  EXPECT_EQ(step->entries[1].tokens.size(), 16u);
  EXPECT_LE(step->n_tokens(), 32);
  expect_disjoint_tables(*step);
}

TEST(Scheduler, AdmissionControl) {
  Scheduler s(small_config());
  EXPECT_EQ(s.submit(1, {}, 4), Admission::invalid);
  EXPECT_EQ(s.submit(1, tokens(60), 10), Admission::too_long);
  for (uint64_t id = 1; id <= 3; ++id) EXPECT_EQ(s.submit(id, tokens(4), 4), Admission::accepted);
  EXPECT_EQ(s.submit(2, tokens(4), 4), Admission::invalid) << "duplicate id";
  EXPECT_EQ(s.submit(4, tokens(4), 4), Admission::overloaded);
  ASSERT_TRUE(s.next_step());  // moves the queue into the running batch
  EXPECT_EQ(s.submit(4, tokens(4), 4), Admission::accepted);
}

TEST(Scheduler, CancelFreesBlocks) {
  Scheduler s(small_config());
  ASSERT_EQ(s.submit(1, tokens(16), 4), Admission::accepted);
  ASSERT_TRUE(s.next_step());
  EXPECT_EQ(s.free_blocks(), 12);
  EXPECT_TRUE(s.cancel(1));
  EXPECT_EQ(s.free_blocks(), 16);
  EXPECT_FALSE(s.cancel(1));
  EXPECT_FALSE(s.next_step());
}

TEST(Scheduler, OutOfBlocksPreemptsTheNewestAndResumesItLater) {
  SchedulerConfig c = small_config();
  c.num_blocks = 6;  // 24 positions
  c.max_queue = 8;
  Scheduler s(c);
  ASSERT_EQ(s.submit(1, tokens(8), 12), Admission::accepted);  // 2 blocks, grows to 5
  ASSERT_EQ(s.submit(2, tokens(8), 12), Admission::accepted);
  ASSERT_EQ(s.submit(3, tokens(8), 12), Admission::accepted);
  auto step = s.next_step();
  ASSERT_EQ(step->entries.size(), 3u);  // 6 blocks used
  EXPECT_EQ(s.free_blocks(), 0);
  for (const auto& e : step->entries) s.append_token(e.seq_id, 7);
  // Sequence 1 needs a third block: the newest (3) must give its blocks up.
  step = s.next_step();
  ASSERT_TRUE(step);
  ASSERT_EQ(step->preempted, std::vector<uint64_t>{3});
  EXPECT_EQ(s.waiting(), 1);
  for (const auto& e : step->entries) EXPECT_NE(e.seq_id, 3u);
  expect_disjoint_tables(*step);
  // Once 1 and 2 finish, 3 is recomputed from position 0 with its generated token included.
  s.finish(1);
  s.finish(2);
  step = s.next_step();
  ASSERT_EQ(step->entries.size(), 1u);
  EXPECT_EQ(step->entries[0].seq_id, 3u);
  EXPECT_EQ(step->entries[0].start_pos, 0);
  EXPECT_EQ(step->entries[0].tokens.size(), 9u);
  EXPECT_EQ(step->entries[0].tokens.back(), 7);
  EXPECT_TRUE(step->entries[0].sample);
}

// Random workload: every request completes, the token budget and block limits always hold, and
// every sequence's positions advance contiguously.
TEST(Scheduler, RandomWorkloadCompletesEveryRequest) {
  SchedulerConfig c = small_config();
  c.num_blocks = 20;
  c.max_queue = 100;
  Scheduler s(c);
  std::mt19937 rng(3);
  std::map<uint64_t, int> remaining;  // tokens still to generate
  std::map<uint64_t, int64_t> next_pos;
  for (uint64_t id = 1; id <= 40; ++id) {
    const int prompt = 1 + static_cast<int>(rng() % 30), gen = 1 + static_cast<int>(rng() % 20);
    ASSERT_EQ(s.submit(id, tokens(prompt), gen), Admission::accepted);
    remaining[id] = gen;
  }
  int steps = 0;
  while (!remaining.empty()) {
    ASSERT_LT(++steps, 10000) << "no progress";
    auto step = s.next_step();
    ASSERT_TRUE(step) << "requests waiting but nothing scheduled";
    EXPECT_LE(step->n_tokens(), c.max_batch_tokens);
    expect_disjoint_tables(*step);
    for (uint64_t p : step->preempted) next_pos[p] = 0;
    for (const auto& e : step->entries) {
      EXPECT_EQ(e.start_pos, next_pos[e.seq_id]) << "sequence " << e.seq_id;
      next_pos[e.seq_id] = e.start_pos + static_cast<int64_t>(e.tokens.size());
      if (!e.sample) continue;
      if (--remaining[e.seq_id] == 0) {
        remaining.erase(e.seq_id);
        s.finish(e.seq_id);
      } else {
        s.append_token(e.seq_id, 5);
      }
    }
  }
  EXPECT_EQ(s.free_blocks(), c.num_blocks);
  EXPECT_EQ(s.running(), 0);
  EXPECT_EQ(s.waiting(), 0);
}

}  // namespace
}  // namespace nibble::cluster

namespace nibble::cluster {
namespace {

// With steps in flight (pipeline micro-batches), a sequence waiting for its sampled token is left
// out of the next plans and never preempted; prompt chunks that do not sample keep flowing.
TEST(Scheduler, SequencesAwaitingATokenSitOutAndAreNeverPreempted) {
  SchedulerConfig c = small_config();
  c.num_blocks = 6;  // 24 positions
  Scheduler s(c);
  ASSERT_EQ(s.submit(1, tokens(4), 8), Admission::accepted);
  auto first = s.next_step();
  ASSERT_TRUE(first && first->entries.size() == 1 && first->entries[0].sample);
  EXPECT_TRUE(s.awaiting_token(1));
  // Another plan while step 1 is in flight: sequence 1 is not in it.
  ASSERT_EQ(s.submit(2, tokens(20), 2), Admission::accepted);
  auto second = s.next_step();
  ASSERT_TRUE(second);
  for (const StepEntry& e : second->entries) EXPECT_NE(e.seq_id, 1u);
  EXPECT_FALSE(s.awaiting_token(2));  // a 16-token chunk of 20: no sample yet
  // Sequence 2's next chunk can be planned while the first chunk is still in flight.
  auto third = s.next_step();
  ASSERT_TRUE(third);
  ASSERT_EQ(third->entries.size(), 1u);
  EXPECT_EQ(third->entries[0].seq_id, 2u);
  EXPECT_EQ(third->entries[0].start_pos, 16);
  EXPECT_TRUE(s.awaiting_token(2));
  // Both await: nothing can run.
  EXPECT_FALSE(s.next_step());
  // Sequence 1 (older) needs a second block while 2 (newer) holds the other 5: 2 awaits its token,
  // so it is not preempted; 1 steps back to the queue instead.
  s.append_token(1, 50);
  EXPECT_FALSE(s.next_step());
  EXPECT_TRUE(s.awaiting_token(2));
  EXPECT_EQ(s.running(), 1);
  EXPECT_EQ(s.waiting(), 1);
  s.append_token(2, 60);
  auto fourth = s.next_step();
  ASSERT_TRUE(fourth);
  ASSERT_EQ(fourth->entries.size(), 1u);
  EXPECT_EQ(fourth->entries[0].seq_id, 2u);
  EXPECT_EQ(fourth->entries[0].start_pos, 20);
  // finish/cancel clear the state too.
  EXPECT_TRUE(s.finish(1));
  EXPECT_FALSE(s.awaiting_token(1));
}

}  // namespace
}  // namespace nibble::cluster
