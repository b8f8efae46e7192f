#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

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
  // These tests pin the batching, chunking and preemption rules; prefix caching has its own below.
  c.prefix_caching = false;
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

namespace nibble::cluster {
namespace {

SchedulerConfig caching_config() {
  SchedulerConfig c = small_config();
  c.prefix_caching = true;
  c.max_queue = 100;
  return c;
}

// A prompt's whole blocks computed by one sequence are shared by the next sequence that begins with the
// same tokens: it starts after them, its table begins with the same block ids, and it computes the rest.
TEST(SchedulerPrefixCache, ASecondPromptStartsAfterTheSharedWholeBlocks) {
  Scheduler s(caching_config());
  std::vector<int32_t> first = tokens(14), second = tokens(14);
  second[13] = 999;  // differs in the fourth block only
  ASSERT_EQ(s.submit(1, first, 4), Admission::accepted);
  auto step = s.next_step();
  ASSERT_TRUE(step);
  ASSERT_EQ(step->entries.size(), 1u);
  const std::vector<int32_t> table1(step->block_tables.begin(), step->block_tables.begin() + 4);
  ASSERT_EQ(s.submit(2, second, 4), Admission::accepted);
  step = s.next_step();  // 1 awaits its token: only 2 runs
  ASSERT_TRUE(step);
  ASSERT_EQ(step->entries.size(), 1u);
  const StepEntry& e = step->entries[0];
  EXPECT_EQ(e.seq_id, 2u);
  EXPECT_EQ(e.start_pos, 12);  // three whole blocks of 4 shared
  EXPECT_EQ(e.tokens, std::vector<int32_t>(second.begin() + 12, second.end()));
  EXPECT_TRUE(e.sample);
  const std::vector<int32_t> table2(step->block_tables.begin(), step->block_tables.begin() + 4);
  EXPECT_EQ(std::vector<int32_t>(table2.begin(), table2.begin() + 3),
            std::vector<int32_t>(table1.begin(), table1.begin() + 3));
  EXPECT_NE(table2[3], table1[3]);  // its own fourth block
  EXPECT_EQ(s.free_blocks(), 16 - 5);
}

// A sequence whose prompt tokens' logits are wanted (prompt logprobs) computes its whole prompt even
// when its blocks are cached, and does not wait for a block another sequence computes; a later
// ordinary one still shares the blocks it computed.
TEST(SchedulerPrefixCache, ASequenceThatReusesNoPrefixComputesItsWholePrompt) {
  Scheduler s(caching_config());
  ASSERT_EQ(s.submit(1, tokens(14), 4), Admission::accepted);
  auto step = s.next_step();
  ASSERT_TRUE(step);
  ASSERT_EQ(s.submit(2, tokens(14), 4, /*reuse_prefix=*/false), Admission::accepted);
  step = s.next_step();  // 1 awaits its token: only 2 runs
  ASSERT_TRUE(step);
  ASSERT_EQ(step->entries.size(), 1u);
  EXPECT_EQ(step->entries[0].seq_id, 2u);
  EXPECT_EQ(step->entries[0].start_pos, 0);
  EXPECT_EQ(step->entries[0].tokens, tokens(14));
  EXPECT_EQ(s.free_blocks(), 16 - 8);  // four blocks each
  ASSERT_EQ(s.submit(3, tokens(14), 4), Admission::accepted);
  step = s.next_step();
  ASSERT_TRUE(step);
  ASSERT_EQ(step->entries.size(), 1u);
  EXPECT_EQ(step->entries[0].start_pos, 12);
  // Two at once: the one that reuses nothing does not wait for the other's blocks.
  Scheduler both(caching_config());
  ASSERT_EQ(both.submit(1, tokens(14), 4), Admission::accepted);
  ASSERT_EQ(both.submit(2, tokens(14), 4, /*reuse_prefix=*/false), Admission::accepted);
  step = both.next_step();
  ASSERT_TRUE(step);
  ASSERT_EQ(step->entries.size(), 2u);
  EXPECT_EQ(step->entries[1].start_pos, 0);
  EXPECT_EQ(step->entries[1].tokens, tokens(14));
}

// Requests that arrive together with the same long prompt: the second waits while the first computes
// the blocks it would otherwise compute side by side, then starts after them (its last block is its
// own); an unrelated prompt behind it goes ahead meanwhile. Without prefix caching both run at once.
TEST(SchedulerPrefixCache, ABurstOfOnePromptComputesItsBlocksOnce) {
  SchedulerConfig c = caching_config();
  c.num_blocks = 32;
  for (const bool caching : {true, false}) {
    SCOPED_TRACE(caching ? "caching" : "no caching");
    c.prefix_caching = caching;
    Scheduler s(c);
    ASSERT_EQ(s.submit(1, tokens(40), 2), Admission::accepted);
    ASSERT_EQ(s.submit(2, tokens(40), 2), Admission::accepted);
    ASSERT_EQ(s.submit(3, tokens(6, 500), 2), Admission::accepted);
    auto step = s.next_step();
    ASSERT_TRUE(step);
    std::vector<uint64_t> ids;
    for (const StepEntry& e : step->entries) ids.push_back(e.seq_id);
    if (!caching) {
      EXPECT_EQ(ids, (std::vector<uint64_t>{1, 2}));  // 16 + 16 tokens: the budget of 32
      continue;
    }
    EXPECT_EQ(ids, (std::vector<uint64_t>{1, 3}));  // 2 waits, 3 goes ahead
    s.append_token(3, 9);
    for (const int32_t start : {16, 32}) {  // 1's next chunks; 2 still waits
      step = s.next_step();
      ASSERT_TRUE(step);
      bool saw1 = false;
      for (const StepEntry& e : step->entries) {
        EXPECT_NE(e.seq_id, 2u) << "at " << start;
        if (e.seq_id == 1) {
          saw1 = true;
          EXPECT_EQ(e.start_pos, start);
        }
        if (e.sample) s.append_token(e.seq_id, 9);
      }
      EXPECT_TRUE(saw1);
    }
    // 1 has computed its prompt (its last block stays its own): 2 starts after 9 shared blocks.
    bool saw2 = false;
    for (int i = 0; i < 2 && !saw2; ++i) {
      step = s.next_step();
      ASSERT_TRUE(step);
      for (const StepEntry& e : step->entries) {
        if (e.seq_id == 2) {
          saw2 = true;
          EXPECT_EQ(e.start_pos, 36);
          EXPECT_EQ(e.tokens.size(), 4u);
        }
        if (e.sample) s.append_token(e.seq_id, 9);
      }
    }
    EXPECT_TRUE(saw2);
  }
}

// A prompt cached whole still computes its last token (its logits give the next one): the match stops
// a block short, and that block is the sequence's own.
TEST(SchedulerPrefixCache, AWholeCachedPromptStillComputesItsLastBlock) {
  Scheduler s(caching_config());
  ASSERT_EQ(s.submit(1, tokens(16), 2), Admission::accepted);
  ASSERT_TRUE(s.next_step());
  s.append_token(1, 5);
  ASSERT_TRUE(s.finish(1));
  EXPECT_EQ(s.idle_cached_blocks(), 4);  // all four whole blocks of the prompt
  EXPECT_EQ(s.free_blocks(), 16);        // idle cached blocks count as free
  ASSERT_EQ(s.submit(2, tokens(16), 2), Admission::accepted);
  auto step = s.next_step();
  ASSERT_TRUE(step);
  EXPECT_EQ(step->entries[0].start_pos, 12);
  EXPECT_EQ(step->entries[0].tokens, std::vector<int32_t>({22, 23, 24, 25}));
  // A one-block prompt has nothing before its last token to share.
  ASSERT_EQ(s.submit(3, tokens(4), 2), Admission::accepted);
  step = s.next_step();
  ASSERT_TRUE(step);
  EXPECT_EQ(step->entries[0].seq_id, 3u);
  EXPECT_EQ(step->entries[0].start_pos, 0);
}

// Draft tokens a step verifies are never shared: a block is offered only once every token in it is
// confirmed, and a block of confirmed tokens is offered in the sequence's next plan.
TEST(SchedulerPrefixCache, DraftTokensAreNotSharedUntilAccepted) {
  SchedulerConfig c = caching_config();
  Scheduler s(c);
  ASSERT_EQ(s.submit(1, tokens(4), 20), Admission::accepted);
  ASSERT_TRUE(s.next_step());
  s.append_token(1, 50);             // tokens 10..13, 50
  s.set_draft(1, {51, 52, 53, 54});  // positions 5..8 if accepted
  auto step = s.next_step();
  ASSERT_TRUE(step);
  ASSERT_EQ(step->entries[0].n_draft, 4);  // writes positions 4..8
  // Another sequence whose prompt is the first sequence with its drafts accepted: only the first block
  // (the prompt) is shared, not positions 4..7 holding 50 and three drafts.
  std::vector<int32_t> guess = tokens(4);
  for (int32_t t : {50, 51, 52, 53, 54, 55}) guess.push_back(t);
  ASSERT_EQ(s.submit(2, guess, 2), Admission::accepted);
  auto other = s.next_step();
  ASSERT_TRUE(other);
  ASSERT_EQ(other->entries.size(), 1u);
  EXPECT_EQ(other->entries[0].seq_id, 2u);
  EXPECT_EQ(other->entries[0].start_pos, 4);
  // Once accepted, the first sequence's second block is confirmed and offered in its next plan.
  s.accept_tokens(1, 3, 60);  // 51, 52, 53 accepted; 60 sampled: positions 4..7 are 50..53
  ASSERT_TRUE(s.next_step());
  ASSERT_EQ(s.submit(3, guess, 2), Admission::accepted);
  s.append_token(2, 7);
  auto third = s.next_step();
  ASSERT_TRUE(third);
  bool saw3 = false;
  for (const StepEntry& e : third->entries) {
    if (e.seq_id != 3) continue;
    saw3 = true;
    EXPECT_EQ(e.start_pos, 8);  // two blocks: the prompt and 50, 51, 52, 53
  }
  EXPECT_TRUE(saw3);
}

// A preempted sequence comes back after its own cached prefix when nothing evicted it.
TEST(SchedulerPrefixCache, APreemptedSequenceResumesAfterItsCachedBlocks) {
  SchedulerConfig c = caching_config();
  c.num_blocks = 6;
  Scheduler s(c);
  ASSERT_EQ(s.submit(1, tokens(8), 12), Admission::accepted);
  ASSERT_EQ(s.submit(2, tokens(8, 200), 12), Admission::accepted);
  ASSERT_EQ(s.submit(3, tokens(8, 400), 12), Admission::accepted);
  auto step = s.next_step();
  ASSERT_EQ(step->entries.size(), 3u);
  for (const auto& e : step->entries) s.append_token(e.seq_id, 7);
  step = s.next_step();  // 1 needs a third block: 3 is preempted, its two prompt blocks stay cached
  ASSERT_EQ(step->preempted, std::vector<uint64_t>{3});
  EXPECT_EQ(s.idle_cached_blocks(), 0);  // 1 took the free one... and 3's two went to 1 and 2's growth
  s.finish(1);
  s.finish(2);
  step = s.next_step();
  ASSERT_TRUE(step);
  ASSERT_EQ(step->entries.size(), 1u);
  EXPECT_EQ(step->entries[0].seq_id, 3u);
  // Its blocks were taken for 1 and 2's growth: recomputed from 0 (the rule without a cache).
  EXPECT_EQ(step->entries[0].start_pos, 0);
  // Now preempt-free: finish 3 and submit its prompt plus its token again: it starts after 2 blocks.
  s.append_token(3, 7);
  s.finish(3);
  std::vector<int32_t> again = tokens(8, 400);
  again.push_back(7);
  ASSERT_EQ(s.submit(4, again, 2), Admission::accepted);
  step = s.next_step();
  ASSERT_TRUE(step);
  EXPECT_EQ(step->entries[0].start_pos, 8);
  EXPECT_EQ(step->entries[0].tokens, std::vector<int32_t>{7});
}

// The scheduler against a simulated KV cache, with and without prefix caching and with drafts: every
// position a step writes gets the identity of its whole prefix (the tokens before it and its own, as
// its K/V depend on them); every position an entry attends to (before its start) must hold the
// identity of its own sequence's prefix there. A block shared or evicted wrongly, a draft shared
// before it was accepted, or a block written while another sequence reads it fails this.
class SchedulerKvSimulation : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(SchedulerKvSimulation, EveryEntryReadsWhatItsOwnPrefixWrote) {
  const auto [caching, drafts] = GetParam();
  SchedulerConfig c = small_config();
  c.prefix_caching = caching;
  c.num_blocks = 20;
  c.max_queue = 500;
  Scheduler s(c);
  std::mt19937 rng(caching * 2 + drafts + 11);
  // Prompts from three "system prompts" (0, 5 and 11 tokens) and random tails over a tiny vocabulary,
  // so that whole blocks repeat across requests.
  const std::vector<std::vector<int32_t>> systems = {{}, {1, 2, 3, 4, 5}, {9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8}};
  std::map<uint64_t, std::vector<int32_t>> seq_tokens;  // what the scheduler must have for each
  std::map<uint64_t, int> remaining;
  std::vector<std::vector<int32_t>> past;  // ended sequences' tokens: later prompts continue them
  uint64_t next_id = 1;
  // identity of the prefix tokens[0..p] (FNV-style; equal prefixes give equal values)
  const auto identity = [](const std::vector<int32_t>& t, size_t p) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i <= p; ++i) h = (h ^ static_cast<uint64_t>(t[i] + 7)) * 1099511628211ull;
    return h;
  };
  // A deterministic "model": the next token is a function of the whole prefix (as greedy decoding is),
  // so requests that share a prompt generate the same tokens and continue each other's blocks.
  const auto model_next = [&](const std::vector<int32_t>& t) {
    return static_cast<int32_t>((identity(t, t.size() - 1) >> 17) % 3);
  };
  const auto submit_one = [&] {
    std::vector<int32_t> prompt;
    if (!past.empty() && rng() % 2 == 0) {  // a later turn: an earlier conversation, cut somewhere
      const std::vector<int32_t>& before = past[rng() % past.size()];
      prompt.assign(before.begin(), before.begin() + 1 + static_cast<long>(rng() % before.size()));
    } else {
      prompt = systems[rng() % systems.size()];
    }
    const int tail = static_cast<int>(rng() % 6) + (prompt.empty() ? 1 : 0);
    for (int i = 0; i < tail; ++i) prompt.push_back(static_cast<int32_t>(rng() % 3));
    if (static_cast<int64_t>(prompt.size()) > c.context - 17)
      prompt.resize(static_cast<size_t>(c.context - 17));
    const int gen = 1 + static_cast<int>(rng() % 16);
    ASSERT_EQ(s.submit(next_id, prompt, gen), Admission::accepted);
    seq_tokens[next_id] = prompt;
    remaining[next_id] = gen;
    ++next_id;
  };
  std::map<std::pair<int32_t, int>, uint64_t> kv;  // (block, offset) -> identity written there
  int64_t shared_positions = 0;                    // positions first entries skipped (prefix cache)
  std::set<uint64_t> seen;                         // sequences that have had an entry
  for (int i = 0; i < 30; ++i) ASSERT_NO_FATAL_FAILURE(submit_one());
  int steps = 0;
  while (!remaining.empty()) {
    ASSERT_LT(++steps, 20000) << "no progress";
    if (next_id <= 400 && (remaining.size() < 8 || rng() % 3 == 0)) {
      ASSERT_NO_FATAL_FAILURE(submit_one());
    }
    auto step = s.next_step();
    ASSERT_TRUE(step) << "requests waiting but nothing scheduled";
    EXPECT_LE(step->n_tokens(), c.max_batch_tokens);
    // Reads first (attention over positions before each entry), then the step's writes: no block an
    // entry writes is in any other entry's table this step.
    std::map<int32_t, uint64_t> writer;
    for (const StepEntry& e : step->entries) {
      const int32_t* table = step->block_tables.data() + e.table_row * step->max_blocks_per_seq;
      for (int64_t p = e.start_pos; p < e.start_pos + static_cast<int64_t>(e.tokens.size()); ++p)
        writer[table[p / c.block_size]] = e.seq_id;
    }
    for (const StepEntry& e : step->entries) {
      const int32_t* table = step->block_tables.data() + e.table_row * step->max_blocks_per_seq;
      for (int64_t b = 0; b < step->max_blocks_per_seq && table[b] >= 0; ++b) {
        const auto w = writer.find(table[b]);
        EXPECT_TRUE(w == writer.end() || w->second == e.seq_id)
            << "block " << table[b] << " written by " << w->second << " read by " << e.seq_id;
      }
      std::vector<int32_t>& known = seq_tokens.at(e.seq_id);
      const size_t n_known = e.tokens.size() - static_cast<size_t>(e.n_draft);
      ASSERT_LE(static_cast<size_t>(e.start_pos) + n_known, known.size());
      EXPECT_TRUE(std::equal(e.tokens.begin(), e.tokens.begin() + static_cast<long>(n_known),
                             known.begin() + e.start_pos))
          << "sequence " << e.seq_id << " at " << e.start_pos;
      for (int64_t p = 0; p < e.start_pos; ++p) {
        const auto it = kv.find({table[p / c.block_size], static_cast<int>(p % c.block_size)});
        ASSERT_TRUE(it != kv.end()) << "sequence " << e.seq_id << " reads position " << p << " never written";
        ASSERT_EQ(it->second, identity(known, static_cast<size_t>(p)))
            << "sequence " << e.seq_id << " reads another prefix's K/V at position " << p;
      }
      if (!seen.count(e.seq_id)) shared_positions += e.start_pos;  // a first entry after a cached prefix
    }
    for (const StepEntry& e : step->entries) {
      seen.insert(e.seq_id);
      const int32_t* table = step->block_tables.data() + e.table_row * step->max_blocks_per_seq;
      std::vector<int32_t> fed(seq_tokens.at(e.seq_id).begin(),
                               seq_tokens.at(e.seq_id).begin() + e.start_pos);
      fed.insert(fed.end(), e.tokens.begin(), e.tokens.end());
      for (int64_t p = e.start_pos; p < static_cast<int64_t>(fed.size()); ++p)
        kv[{table[p / c.block_size], static_cast<int>(p % c.block_size)}] =
            identity(fed, static_cast<size_t>(p));
    }
    // Results: sample, accept part of the drafts, finish some, cancel a few, propose new drafts.
    for (const StepEntry& e : step->entries) {
      if (!e.sample) continue;
      std::vector<int32_t>& known = seq_tokens.at(e.seq_id);
      if (e.n_draft > 0) {  // greedy verification: drafts count while they are the model's tokens
        int32_t accepted = 0;
        for (auto d = e.tokens.end() - e.n_draft; d != e.tokens.end() && *d == model_next(known); ++d) {
          known.push_back(*d);
          ++accepted;
        }
        const int32_t next = model_next(known);
        s.accept_tokens(e.seq_id, accepted, next);
        known.push_back(next);
        remaining[e.seq_id] -= accepted + 1;
      } else {
        const int32_t next = model_next(known);
        s.append_token(e.seq_id, next);
        known.push_back(next);
        remaining[e.seq_id] -= 1;
      }
      if (remaining[e.seq_id] <= 0 || rng() % 40 == 0) {
        remaining.erase(e.seq_id);
        past.push_back(known);
        s.finish(e.seq_id);
        continue;
      }
      if (drafts && rng() % 2 == 0) {  // the model's next tokens, one of them wrong half the time
        std::vector<int32_t> guess = known, d;
        for (size_t i = 1 + rng() % 4; i > 0; --i) {
          d.push_back(model_next(guess));
          guess.push_back(d.back());
        }
        if (rng() % 2 == 0) {
          int32_t& wrong = d[rng() % d.size()];
          wrong = (wrong + 1) % 3;
        }
        s.set_draft(e.seq_id, d);
      }
    }
    // Now and then a waiting request is cancelled before it runs.
    if (rng() % 25 == 0 && !remaining.empty()) {
      auto it = remaining.begin();
      std::advance(it, static_cast<long>(rng() % remaining.size()));
      if (!s.awaiting_token(it->first)) {
        s.cancel(it->first);
        remaining.erase(it);
      }
    }
  }
  EXPECT_EQ(s.free_blocks(), c.num_blocks);
  EXPECT_EQ(s.running(), 0);
  EXPECT_EQ(s.waiting(), 0);
  if (caching) {
    EXPECT_GT(s.idle_cached_blocks(), 0);
    EXPECT_GT(shared_positions, 0) << "no entry ever started after a shared prefix";
  } else {
    EXPECT_EQ(s.idle_cached_blocks(), 0);
    EXPECT_EQ(shared_positions, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(CachingAndDrafts, SchedulerKvSimulation,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()), [](const auto& p) {
                           return std::string(std::get<0>(p.param) ? "caching" : "no_caching") +
                                  (std::get<1>(p.param) ? "_drafts" : "");
                         });

}  // namespace
}  // namespace nibble::cluster
