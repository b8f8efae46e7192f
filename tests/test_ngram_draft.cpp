// Prompt-lookup drafts (speculative/ngram_draft): the continuation of the latest, longest earlier
// occurrence of the sequence's end; sampled requests' proposals are point masses, which the acceptance
// rule turns into exactly the target's distribution; at temperature 0 the engine's output with them is
// the output without them.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>
#include <random>

#include "cluster/local_engine.hpp"
#include "model/random_model.hpp"
#include "speculative/ngram_draft.hpp"
#include "speculative/rejection_sampler.hpp"
#include "speculative/speculator.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::speculative {
namespace {

TEST(NgramDraft, ContinuationOfTheLatestLongestMatch) {
  using V = std::vector<int32_t>;
  // The last 3 tokens (7 8 9) occurred at 1 and at 6: the latest wins.
  EXPECT_EQ(ngram_continuation(V{5, 7, 8, 9, 1, 2, 7, 8, 9, 3, 4, 7, 8, 9}, 1, 4, 2), (V{3, 4}));
  // k past the end: as many as there are.
  EXPECT_EQ(ngram_continuation(V{1, 2, 3, 1, 2}, 1, 4, 5), (V{3, 1, 2}));
  // The longest suffix that occurs decides: "2 9" occurs nowhere before, "9" does (after 4).
  EXPECT_EQ(ngram_continuation(V{4, 9, 6, 2, 9}, 1, 4, 2), (V{6, 2}));
  EXPECT_EQ(ngram_continuation(V{4, 9, 6, 2, 9}, 2, 4, 2), V{});  // min_n 2: no match
  // A longer match beats a later shorter one: "1 2" at 0 (-> 5) over "2" at 3 (-> 6).
  EXPECT_EQ(ngram_continuation(V{1, 2, 5, 2, 6, 1, 2}, 1, 2, 1), (V{5}));
  EXPECT_EQ(ngram_continuation(V{1, 2, 5, 2, 6, 1, 2}, 1, 1, 1), (V{6}));
  EXPECT_EQ(ngram_continuation(V{3}, 1, 4, 4), V{});
  EXPECT_EQ(ngram_continuation(V{}, 1, 4, 4), V{});
  EXPECT_EQ(ngram_continuation(V{1, 1, 1, 1}, 1, 4, 0), V{});
  EXPECT_THROW(NgramDraft(32, 3, 2), std::invalid_argument);
}

TEST(NgramDraft, SampledProposalsArePointMassesAndGreedyOnesHaveNoRows) {
  NgramDraft drafts(10, 1, 3);
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 1, 2};
  worker::SamplingParams greedy, sampled;
  greedy.temperature = 0.0f;
  sampled.temperature = 0.8f;
  const std::vector<int32_t> none = {9, 8};
  const std::vector<Proposal> p = drafts.propose(
      {{7, tokens, &greedy, 3}, {8, tokens, &sampled, 2}, {9, none, &sampled, 2}, {10, tokens, &sampled, 0}});
  ASSERT_EQ(p.size(), 3u);  // k 0: no proposal
  EXPECT_EQ(p[0].seq_id, 7u);
  EXPECT_EQ(p[0].tokens, (std::vector<int32_t>{3, 4, 1}));
  EXPECT_TRUE(p[0].probs.empty());
  EXPECT_EQ(p[1].tokens, (std::vector<int32_t>{3, 4}));
  ASSERT_EQ(p[1].probs.size(), 20u);
  for (size_t row = 0; row < 2; ++row)
    for (int32_t t = 0; t < 10; ++t)
      EXPECT_EQ(p[1].probs[row * 10 + static_cast<size_t>(t)], t == p[1].tokens[row] ? 1.0f : 0.0f);
  EXPECT_TRUE(p[2].tokens.empty());  // nothing to look up
  EXPECT_TRUE(p[2].probs.empty());
}

// A point-mass proposal x is accepted with probability p(x), otherwise the residual (p without x) is
// drawn: the first emitted token is distributed as p, whatever x is. 200000 draws, each frequency
// within 5 standard deviations of p.
TEST(NgramDraft, PointMassProposalsEmitTheTargetsDistribution) {
  constexpr int64_t kVocab = 7;
  std::mt19937_64 rng(17);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<float> p(2 * kVocab);
  double sum = 0;
  for (int64_t t = 0; t < kVocab; ++t)
    sum += p[static_cast<size_t>(t)] = static_cast<float>(0.05 + uniform(rng));
  for (int64_t t = 0; t < kVocab; ++t)
    p[static_cast<size_t>(t)] = static_cast<float>(p[static_cast<size_t>(t)] / sum);
  for (int64_t t = 0; t < kVocab; ++t) p[static_cast<size_t>(kVocab + t)] = 1.0f / kVocab;  // the bonus row
  for (const int32_t x : {0, 3, 6}) {
    std::vector<float> q(kVocab, 0.0f);
    q[static_cast<size_t>(x)] = 1.0f;
    std::vector<int64_t> counts(kVocab, 0);
    constexpr int kDraws = 200000;
    for (int i = 0; i < kDraws; ++i) {
      const double u[2] = {uniform(rng), uniform(rng)};
      const Verification v = verify(std::vector<int32_t>{x}, q, p, kVocab, u);
      ++counts[static_cast<size_t>(v.tokens.front())];
    }
    for (int64_t t = 0; t < kVocab; ++t) {
      const double expected = p[static_cast<size_t>(t)];
      const double sigma = std::sqrt(expected * (1 - expected) / kDraws);
      EXPECT_NEAR(static_cast<double>(counts[static_cast<size_t>(t)]) / kDraws, expected, 5 * sigma)
          << "proposal " << x << ", token " << t;
    }
  }
}

// The engine with prompt lookup: at temperature 0 the same tokens as plain decoding, for every k, with
// proposals made (the prompts repeat themselves); the same seed gives the same sampled tokens twice.
TEST(NgramDraft, GreedyEngineOutputIsUnchangedAndSampledRunsRepeat) {
  test::TempDir tmp;
  const std::string path = (tmp.path() / "target.gguf").string();
  model::write_random_llama(path, model::llama_shape_by_name("tiny"), kernels::DType::Q8_0, 5);
  auto target = worker::LlamaModel::load(path);
  auto tokenizer = model::Tokenizer::from_gguf(target->file());
  const int64_t n_vocab = target->config().n_vocab;
  const auto run = [&](int k, float temperature) {
    kernels::ThreadPool pool(2);
    cluster::SchedulerConfig config;
    config.num_blocks = 256;
    config.block_size = 16;
    config.max_batch_tokens = 128;
    config.prefill_chunk = 32;
    config.context = 512;
    NgramDraft lookup(n_vocab, 1, 3);
    std::unique_ptr<Speculator> speculator;
    if (k > 0) {
      SpeculatorSettings settings;
      settings.max_draft_tokens = k;
      settings.adaptive = false;
      settings.max_batch = 1000;
      speculator = std::make_unique<Speculator>(lookup, settings);
    }
    cluster::LocalEngine engine(*target, *tokenizer, pool, config, speculator.get());
    for (int i = 0; i < 5; ++i) {
      cluster::EngineRequest r;
      r.id = static_cast<uint64_t>(i);
      r.prompt.push_back(1);
      for (int rep = 0; rep < 3; ++rep)  // a phrase three times: lookups find it
        for (int t = 0; t < 4 + i; ++t)
          r.prompt.push_back(3 + (i * 131 + t * 17) % static_cast<int32_t>(n_vocab - 3));
      r.sampling.temperature = temperature;
      // Sampled from the two likeliest tokens: a random model's greedy text repeats itself (so lookups
      // find it), and so does text drawn near it, where a draw from the whole vocabulary may never repeat.
      r.sampling.top_k = 2;
      r.sampling.seed = 1000 + static_cast<uint64_t>(i);
      r.limits.max_tokens = 30;
      r.limits.ignore_eos = true;
      EXPECT_EQ(engine.submit(r), cluster::Admission::accepted);
    }
    std::map<uint64_t, std::vector<int32_t>> tokens;
    for (int steps = 0; !engine.idle() && steps < 20000; ++steps)
      for (cluster::EngineResult& result : engine.step()) tokens[result.id] = result.tokens;
    return std::make_pair(tokens, speculator ? speculator->stats() : SpeculatorStats{});
  };
  const auto plain = run(0, 0.0f);
  ASSERT_EQ(plain.first.size(), 5u);
  for (const int k : {1, 3, 5}) {
    const auto lookup = run(k, 0.0f);
    EXPECT_EQ(lookup.first, plain.first) << "k " << k;
    EXPECT_GT(lookup.second.proposed, 0u) << "k " << k;
    EXPECT_LE(lookup.second.accepted, lookup.second.proposed);
  }
  const auto sampled = run(3, 1.0f);
  EXPECT_GT(sampled.second.proposed, 0u);
  EXPECT_EQ(run(3, 1.0f).first, sampled.first);
}

}  // namespace
}  // namespace nibble::speculative
