#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "tests/support/test_support.hpp"
#include "worker/sampler.hpp"

namespace nibble::worker {
namespace {

std::vector<float> logits_of(std::initializer_list<float> v) { return std::vector<float>(v); }

// Constrained sampling's shortcut (sample_allowed): a draw from the whole row kept when allowed, else a
// draw from the masked row, is the masked distribution exactly; with top-k the row is masked first. Each
// token's frequency over 200000 draws within 5 standard deviations of the masked softmax (top-k: of the
// k best allowed); never a refused token; greedy: the masked argmax.
TEST(Sampler, SampleAllowedIsTheMaskedDistribution) {
  const std::vector<float> logits = {2.0f, 0.5f, 1.5f, -1.0f, 1.0f, 0.0f};
  const std::vector<bool> allowed_tokens = {false, true, true, false, true, true};
  const auto allowed = [&](int32_t t) { return allowed_tokens[static_cast<size_t>(t)]; };
  const auto mask = [&](float* row) {
    for (size_t t = 0; t < logits.size(); ++t)
      if (!allowed_tokens[t]) row[t] = -std::numeric_limits<float>::infinity();
  };
  const auto expected = [&](int top_k) {
    std::vector<std::pair<float, size_t>> kept;
    for (size_t t = 0; t < logits.size(); ++t)
      if (allowed_tokens[t]) kept.emplace_back(logits[t], t);
    std::sort(kept.rbegin(), kept.rend());
    if (top_k > 0) kept.resize(static_cast<size_t>(top_k));
    std::vector<double> p(logits.size(), 0.0);
    double sum = 0;
    for (const auto& [l, t] : kept) sum += p[t] = std::exp(static_cast<double>(l));
    for (double& v : p) v /= sum;
    return p;
  };
  for (const int top_k : {0, 2}) {
    SamplingParams params;
    params.temperature = 1.0f;
    params.top_k = top_k;
    params.seed = 77;
    Sampler sampler(params);
    std::vector<float> scratch;
    std::vector<int64_t> counts(logits.size(), 0);
    constexpr int kDraws = 200000;
    for (int i = 0; i < kDraws; ++i)
      ++counts[static_cast<size_t>(sample_allowed(sampler, logits.data(), static_cast<int64_t>(logits.size()),
                                                  {}, allowed, mask, scratch))];
    const std::vector<double> p = expected(top_k);
    for (size_t t = 0; t < logits.size(); ++t) {
      const double sigma = std::sqrt(std::max(p[t] * (1 - p[t]), 1e-12) / kDraws);
      EXPECT_NEAR(static_cast<double>(counts[t]) / kDraws, p[t], 5 * sigma)
          << "top_k " << top_k << ", token " << t;
      if (!allowed_tokens[t]) {
        EXPECT_EQ(counts[t], 0) << t;
      }
    }
  }
  SamplingParams greedy;
  Sampler argmax(greedy);
  std::vector<float> scratch;
  EXPECT_EQ(sample_allowed(argmax, logits.data(), 6, {}, allowed, mask, scratch), 2);  // 0 is refused
}

TEST(Sampler, GreedyPicksArgmaxRegardlessOfSeed) {
  const auto logits = test::random_floats(1001, 7, -5.0f, 5.0f);
  const auto best = std::max_element(logits.begin(), logits.end()) - logits.begin();
  for (uint64_t seed : {0ull, 1ull, 99ull}) {
    Sampler s({.temperature = 0.0f, .seed = seed});
    EXPECT_EQ(s.sample(logits.data(), 1001, {}), best);
  }
}

TEST(Sampler, SameSeedSameSequenceDifferentSeedDifferent) {
  const auto logits = test::random_floats(257, 3, -2.0f, 2.0f);
  auto draw = [&](uint64_t seed) {
    Sampler s({.temperature = 1.0f, .seed = seed});
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) out.push_back(s.sample(logits.data(), 257, {}));
    return out;
  };
  EXPECT_EQ(draw(5), draw(5));
  EXPECT_NE(draw(5), draw(6));
}

TEST(Sampler, TemperatureDistributionMatchesSoftmax) {
  const auto logits = logits_of({1.0f, 2.0f, 0.5f, -1.0f, 1.5f});
  const float temperature = 0.7f;
  std::vector<double> want(5);
  double sum = 0.0;
  for (int i = 0; i < 5; ++i) sum += want[i] = std::exp(logits[i] / temperature);
  for (double& w : want) w /= sum;

  Sampler s({.temperature = temperature, .seed = 11});
  const auto dist = s.distribution(logits.data(), 5, {});
  ASSERT_EQ(dist.size(), 5u);
  for (const auto& tp : dist) EXPECT_NEAR(tp.p, want[tp.id], 1e-6);

  std::vector<int> counts(5, 0);
  const int trials = 200000;
  for (int i = 0; i < trials; ++i) ++counts[s.sample(logits.data(), 5, {})];
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(counts[i] / double(trials), want[i], 0.005) << "token " << i;
}

TEST(Sampler, TopKKeepsOnlyTheKBest) {
  const auto logits = logits_of({0.1f, 3.0f, 2.0f, -1.0f, 2.5f, 0.0f});
  Sampler s({.temperature = 1.0f, .top_k = 2, .seed = 1});
  const auto dist = s.distribution(logits.data(), 6, {});
  ASSERT_EQ(dist.size(), 2u);
  EXPECT_EQ(dist[0].id, 1);
  EXPECT_EQ(dist[1].id, 4);
  for (int i = 0; i < 1000; ++i) {
    const int32_t t = s.sample(logits.data(), 6, {});
    EXPECT_TRUE(t == 1 || t == 4);
  }
}

TEST(Sampler, TopPKeepsTheSmallestSetReachingP) {
  // Probabilities 0.5, 0.3, 0.15, 0.05 (logits are their logs).
  const auto logits = logits_of({std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)});
  Sampler s({.temperature = 1.0f, .top_p = 0.75f, .seed = 1});
  const auto dist = s.distribution(logits.data(), 4, {});
  ASSERT_EQ(dist.size(), 2u);  // 0.5 + 0.3 >= 0.75
  EXPECT_NEAR(dist[0].p, 0.5 / 0.8, 1e-6);
  EXPECT_NEAR(dist[1].p, 0.3 / 0.8, 1e-6);
}

TEST(Sampler, MinPDropsTokensBelowAFractionOfTheTop) {
  const auto logits = logits_of({std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)});
  Sampler s({.temperature = 1.0f, .min_p = 0.2f, .seed = 1});  // threshold 0.1
  const auto dist = s.distribution(logits.data(), 4, {});
  ASSERT_EQ(dist.size(), 3u);
  EXPECT_EQ(dist[2].id, 2);
}

TEST(Sampler, RepetitionPenaltyChangesTheGreedyChoice) {
  const auto logits = logits_of({1.0f, 2.0f, 1.8f});
  const std::vector<int32_t> history = {1};
  Sampler plain({.temperature = 0.0f});
  EXPECT_EQ(plain.sample(logits.data(), 3, history), 1);
  Sampler penalized({.temperature = 0.0f, .repetition_penalty = 1.5f});
  EXPECT_EQ(penalized.sample(logits.data(), 3, history), 2);  // 2.0 / 1.5 < 1.8
  // Only the last repeat_last_n tokens count.
  Sampler short_window({.temperature = 0.0f, .repetition_penalty = 1.5f, .repeat_last_n = 1});
  const std::vector<int32_t> old_history = {1, 0};
  EXPECT_EQ(short_window.sample(logits.data(), 3, old_history), 1);
}

TEST(Sampler, ImpossibleParametersAreRejected) {
  EXPECT_THROW(Sampler({.temperature = -1.0f}), std::invalid_argument);
  EXPECT_THROW(Sampler({.top_p = 0.0f}), std::invalid_argument);
  EXPECT_THROW(Sampler({.top_p = 1.5f}), std::invalid_argument);
  EXPECT_THROW(Sampler({.min_p = 1.0f}), std::invalid_argument);
  EXPECT_THROW(Sampler({.top_k = -2}), std::invalid_argument);
  EXPECT_THROW(Sampler({.repetition_penalty = 0.0f}), std::invalid_argument);
}

// A step verifies its drafts where the logits are only at temperature > 0 without a penalty, with k
// of the draft's distributions at hand as host rows or as rows the draft kept; verify_sequence draws
// the k + 1 uniforms the host's verification would, and hands over host rows or the kept store.
class RowsKeptElsewhere final : public KeptRows {
 public:
  explicit RowsKeptElsewhere(int64_t rows) : KeptRows(rows, 10) {}
  const float* device_data() const override { return nullptr; }
  void copy_to_host(int64_t, int64_t, std::vector<float>&) const override {}
};

TEST(Sampler, VerifiableOnTheModelWithHostOrKeptDistributions) {
  SamplingParams sampled;
  sampled.temperature = 0.7f;
  SamplingParams greedy;
  SamplingParams penalized = sampled;
  penalized.repetition_penalty = 1.1f;
  const int64_t n_vocab = 10;
  EXPECT_TRUE(verifiable_on_model(sampled, 3, 30, n_vocab));
  EXPECT_FALSE(verifiable_on_model(sampled, 3, 29, n_vocab));   // two and a bit rows
  EXPECT_TRUE(verifiable_on_model(sampled, 3, 0, n_vocab, 3));  // kept rows instead
  EXPECT_TRUE(verifiable_on_model(sampled, 3, 0, n_vocab, 4));
  EXPECT_FALSE(verifiable_on_model(sampled, 3, 0, n_vocab, 2));
  EXPECT_FALSE(verifiable_on_model(sampled, 0, 30, n_vocab, 3));  // nothing to verify
  EXPECT_FALSE(verifiable_on_model(greedy, 3, 30, n_vocab, 3));
  EXPECT_FALSE(verifiable_on_model(penalized, 3, 30, n_vocab, 3));

  sampled.seed = 5;
  Sampler sampler(sampled), same(sampled);
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5};
  const std::vector<float> probs(30, 0.1f);
  std::vector<double> uniforms;
  const VerifySequence host = verify_sequence(sampler, tokens, 3, probs, n_vocab, uniforms);
  ASSERT_EQ(uniforms.size(), 4u);
  for (const double u : uniforms) EXPECT_EQ(u, same.uniform());
  EXPECT_EQ(host.drafts.size(), 3u);
  EXPECT_EQ(host.drafts[0], 3);
  EXPECT_EQ(host.draft_probs.size(), 30u);
  EXPECT_EQ(host.kept_probs, nullptr);
  const RowsKeptElsewhere kept(3);
  std::vector<double> more;
  const VerifySequence device = verify_sequence(sampler, tokens, 3, {}, n_vocab, more, &kept);
  ASSERT_EQ(more.size(), 4u);
  EXPECT_EQ(more[0], same.uniform());
  EXPECT_TRUE(device.draft_probs.empty());
  EXPECT_EQ(device.kept_probs, &kept);
}

}  // namespace
}  // namespace nibble::worker
