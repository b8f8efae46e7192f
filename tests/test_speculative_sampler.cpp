// The speculative acceptance rule: its output must be distributed exactly as the target's, which a
// chi-square test checks over 100k simulated generations; rules that skip the residual step must
// fail that same test.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numbers>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "speculative/rejection_sampler.hpp"
#include "tests/support/test_support.hpp"
#include "worker/sampler.hpp"

namespace nibble::speculative {
namespace {

using worker::Sampler;
using worker::SamplingParams;

constexpr double kLargestUniform = 1.0 - 0x1.0p-53;  // the largest value Sampler::uniform() returns

// ---------------------------------------------------------------------------------------------
// Statistics

// P(X >= x) for X ~ chi-square with df degrees of freedom, exact for integer df:
//   even df = 2m: e^{-h} sum_{i<m} h^i / i!                       (h = x / 2)
//   odd df = 2m+1: erfc(sqrt h) + e^{-h} sum_{i=1..m} h^{i-1/2} / Gamma(i + 1/2)
double chi_square_sf(double x, int df) {
  if (!(x > 0.0)) return 1.0;
  if (std::isinf(x)) return 0.0;
  const double h = x / 2.0;
  double sum = 0.0;
  if (df % 2 == 0) {
    double term = std::exp(-h);
    for (int i = 0; i < df / 2; ++i) {
      sum += term;
      term *= h / (i + 1);
    }
  } else {
    sum = std::erfc(std::sqrt(h));
    double term = std::exp(-h) * std::sqrt(h) * 2.0 / std::sqrt(std::numbers::pi);  // Gamma(3/2) = sqrt(pi)/2
    for (int i = 1; i <= df / 2; ++i) {
      sum += term;
      term *= h / (i + 0.5);
    }
  }
  return std::min(1.0, sum);
}

// The statistic above which a chi-square(df) test rejects at p-value `alpha` (bisection on the sf).
double chi_square_critical(int df, double alpha) {
  double lo = 0.0, hi = 1.0;
  while (chi_square_sf(hi, df) > alpha) hi *= 2.0;
  for (int i = 0; i < 200; ++i) {
    const double mid = 0.5 * (lo + hi);
    (chi_square_sf(mid, df) > alpha ? lo : hi) = mid;
  }
  return hi;
}

// The bound: a chi-square goodness-of-fit test at p-value 1e-6. If the rule is exact the statistic
// is chi-square distributed, so one check fails by chance with probability 1e-6 (all 3 x 7 checks
// together: 2e-5), independent of the seeds chosen here. With 2 of the 12 tokens at p = 0 a
// position has 9 degrees of freedom and the critical value is 44.8 (expected value 9); the (t_0,
// t_1) pair has about 99 and 181. A rule whose error is d at a token of probability p adds about
// N d^2 / p: with N = 100k, d = 0.01 at p = 0.1 alone contributes 100. (TV distance is printed too;
// its sampling noise is about sqrt(V / N) / 2 = 0.005 here.)
constexpr double kAlpha = 1e-6;

struct GoodnessOfFit {
  double statistic = 0.0;
  int df = 0;
  double p_value = 1.0;
  double critical = 0.0;
  double tv = 0.0;  // total-variation distance between the empirical and expected distributions
  bool passes() const { return p_value >= kAlpha; }
};

// Pearson's chi-square of `counts` against `probs`. Cells with expected count >= 5 are bins of their
// own and the others are pooled into one bin, so the chi-square approximation holds. A count in a
// cell of probability 0 is an impossible token: statistic infinity.
GoodnessOfFit goodness_of_fit(const std::vector<int64_t>& counts, const std::vector<double>& probs) {
  int64_t n = 0;
  for (int64_t c : counts) n += c;
  GoodnessOfFit g;
  double pooled_expected = 0.0;
  int64_t pooled_observed = 0;
  int bins = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    const double expected = probs[i] * static_cast<double>(n);
    g.tv += 0.5 * std::abs(static_cast<double>(counts[i]) / static_cast<double>(n) - probs[i]);
    if (probs[i] == 0.0) {
      if (counts[i] != 0) g.statistic = std::numeric_limits<double>::infinity();
      continue;
    }
    if (expected < 5.0) {
      pooled_expected += expected;
      pooled_observed += counts[i];
      continue;
    }
    const double d = static_cast<double>(counts[i]) - expected;
    g.statistic += d * d / expected;
    ++bins;
  }
  if (pooled_expected > 0.0) {
    const double d = static_cast<double>(pooled_observed) - pooled_expected;
    g.statistic += d * d / pooled_expected;
    ++bins;
  }
  g.df = std::max(1, bins - 1);
  g.p_value = chi_square_sf(g.statistic, g.df);
  g.critical = chi_square_critical(g.df, kAlpha);
  return g;
}

// ---------------------------------------------------------------------------------------------
// Random distributions and the rules under test

// Dirichlet(1, ..., 1) via normalized exponentials, with `zeros` entries forced to 0 so that the
// draft proposes tokens the target never emits (p = 0 < q) and misses tokens it does (q = 0 < p).
std::vector<float> random_distribution(std::mt19937_64& rng, int64_t n, int zeros) {
  std::exponential_distribution<double> exp1(1.0);
  std::vector<double> w(static_cast<size_t>(n));
  for (double& x : w) x = exp1(rng);
  for (int z = 0; z < zeros; ++z) w[std::uniform_int_distribution<size_t>(0, w.size() - 1)(rng)] = 0.0;
  double sum = 0.0;
  for (double x : w) sum += x;
  std::vector<float> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) out[i] = static_cast<float>(w[i] / sum);
  return out;
}

enum class Rule {
  exact,                 // speculative::verify
  resample_from_target,  // broken: on rejection draw from p instead of norm(max(0, p - q))
  keep_draft_token,      // broken: no rejection at all, every draft token is emitted
};

const char* rule_name(Rule rule) {
  switch (rule) {
    case Rule::exact:
      return "exact";
    case Rule::resample_from_target:
      return "resample-from-p";
    case Rule::keep_draft_token:
      return "keep-draft";
  }
  return "?";
}

// draft: [k]; q: [k, V]; p: [k + 1, V]; uniforms: [k + 1] (the same draws verify() takes).
Verification run_rule(Rule rule, std::span<const int32_t> draft, std::span<const float> q,
                      std::span<const float> p, int64_t n_vocab, std::span<const double> uniforms) {
  if (rule == Rule::exact) return verify(draft, q, p, n_vocab, uniforms);
  const size_t k = draft.size();
  Verification out;
  for (size_t i = 0; i < k; ++i) {
    const int32_t x = draft[i];
    const double qx = q[i * n_vocab + x];
    const double px = p[i * n_vocab + x];
    if (rule == Rule::keep_draft_token || (qx > 0.0 && uniforms[i] * qx < px)) {
      out.tokens.push_back(x);
      ++out.accepted;
      continue;
    }
    out.tokens.push_back(sample_dense(p.data() + i * n_vocab, n_vocab, uniforms[k]));  // the bug
    return out;
  }
  out.tokens.push_back(sample_dense(p.data() + k * n_vocab, n_vocab, uniforms[k]));
  return out;
}

// ---------------------------------------------------------------------------------------------
// The distribution test

constexpr int64_t kVocab = 12;
constexpr int kTrials = 100000;
constexpr int kLength = 6;  // output positions checked per trial (k = 5: the whole first window)

struct Simulation {
  std::vector<GoodnessOfFit> positions;  // [kLength]: output position j against p_j
  GoodnessOfFit pair;                    // (t_0, t_1) jointly against p_0 x p_1
  double mean_accepted = 0.0;            // in the first verify call
  std::vector<int64_t> first_window_accepted;
  bool passes() const {
    bool ok = pair.passes();
    for (const auto& g : positions) ok = ok && g.passes();
    return ok;
  }
  double worst_p_value() const {
    double worst = pair.p_value;
    for (const auto& g : positions) worst = std::min(worst, g.p_value);
    return worst;
  }
};

// Generates kLength tokens kTrials times, speculatively: from output position n the draft samples
// x_i ~ q_{n+i} (i < k), the rule verifies them against p_n..p_{n+k}, and generation continues after
// the emitted tokens. Per-position distributions do not depend on the prefix, so if the rule is
// exact, output position j is distributed as p_j, independently of the other positions.
// q, p: [kLength + k, kVocab], different for every position.
Simulation simulate(Rule rule, int k, const std::vector<float>& q, const std::vector<float>& p,
                    uint64_t seed) {
  Sampler draft_rng({.temperature = 1.0f, .seed = seed});
  Sampler verify_rng({.temperature = 1.0f, .seed = seed + 1});
  std::vector<std::vector<int64_t>> counts(kLength, std::vector<int64_t>(kVocab, 0));
  std::vector<int64_t> pair_counts(kVocab * kVocab, 0);
  Simulation sim;
  sim.first_window_accepted.assign(k + 1, 0);
  std::vector<int32_t> draft(k), out;
  std::vector<double> uniforms(k + 1);
  int64_t accepted_sum = 0;
  for (int trial = 0; trial < kTrials; ++trial) {
    out.clear();
    while (static_cast<int>(out.size()) < kLength) {
      const size_t n = out.size();
      for (int i = 0; i < k; ++i) draft[i] = sample_dense(&q[(n + i) * kVocab], kVocab, draft_rng.uniform());
      for (double& u : uniforms) u = verify_rng.uniform();
      const Verification v = run_rule(
          rule, draft, std::span<const float>(&q[n * kVocab], static_cast<size_t>(k * kVocab)),
          std::span<const float>(&p[n * kVocab], static_cast<size_t>((k + 1) * kVocab)), kVocab, uniforms);
      if (n == 0) {
        accepted_sum += v.accepted;
        ++sim.first_window_accepted[v.accepted];
      }
      out.insert(out.end(), v.tokens.begin(), v.tokens.end());
    }
    for (int j = 0; j < kLength; ++j) ++counts[j][out[j]];
    ++pair_counts[out[0] * kVocab + out[1]];
  }
  for (int j = 0; j < kLength; ++j) {
    sim.positions.push_back(
        goodness_of_fit(counts[j], std::vector<double>(&p[j * kVocab], &p[(j + 1) * kVocab])));
  }
  std::vector<double> pair_probs(kVocab * kVocab);
  for (int a = 0; a < kVocab; ++a) {
    for (int b = 0; b < kVocab; ++b) pair_probs[a * kVocab + b] = double(p[a]) * double(p[kVocab + b]);
  }
  sim.pair = goodness_of_fit(pair_counts, pair_probs);
  sim.mean_accepted = static_cast<double>(accepted_sum) / kTrials;
  return sim;
}

void print(Rule rule, int k, const Simulation& sim) {
  std::printf("  k=%d %-16s", k, rule_name(rule));
  for (int j = 0; j < kLength; ++j) {
    std::printf(" pos%d X2=%.4g(df %d, crit %.1f, TV %.4f)", j, sim.positions[j].statistic,
                sim.positions[j].df, sim.positions[j].critical, sim.positions[j].tv);
  }
  std::printf(" pair X2=%.4g(df %d, crit %.1f) worst p=%.3g\n", sim.pair.statistic, sim.pair.df,
              sim.pair.critical, sim.worst_p_value());
}

class SpeculativeDistribution : public ::testing::TestWithParam<int> {};

TEST_P(SpeculativeDistribution, EmittedTokensAreDistributedAsTheTargetAndBrokenRulesAreCaught) {
  const int k = GetParam();
  std::mt19937_64 rng(1000 + k);
  std::vector<float> p, q;
  for (int pos = 0; pos < kLength + k; ++pos) {
    const auto pp = random_distribution(rng, kVocab, 2);
    const auto qq = random_distribution(rng, kVocab, 2);
    p.insert(p.end(), pp.begin(), pp.end());
    q.insert(q.end(), qq.begin(), qq.end());
  }

  const auto start = std::chrono::steady_clock::now();
  const Simulation exact = simulate(Rule::exact, k, q, p, 77 + k);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("  k=%d: %d trials x %d tokens in %.3f s\n", k, kTrials, kLength, seconds);
  print(Rule::exact, k, exact);
  for (int j = 0; j < kLength; ++j) {
    EXPECT_TRUE(exact.positions[j].passes())
        << "output position " << j << ": chi-square " << exact.positions[j].statistic << " > "
        << exact.positions[j].critical << " (df " << exact.positions[j].df << ")";
  }
  EXPECT_TRUE(exact.pair.passes()) << "(t0, t1): chi-square " << exact.pair.statistic << " > "
                                   << exact.pair.critical;

  // Accepted count of the first window: P(accepted >= i) = prod_{j<i} beta_j, beta_j = sum min(p_j, q_j)
  // (for k = 1 the mean is beta_0). Checked within 5 standard errors.
  double mean = 0.0, second = 0.0, reach = 1.0;
  for (int i = 1; i <= k; ++i) {
    double beta = 0.0;
    for (int v = 0; v < kVocab; ++v) beta += std::min(p[(i - 1) * kVocab + v], q[(i - 1) * kVocab + v]);
    reach *= beta;
    mean += reach;
    second += (2 * i - 1) * reach;
  }
  const double standard_error = std::sqrt((second - mean * mean) / kTrials);
  std::printf("  k=%d: mean accepted %.4f, expected %.4f (se %.4f)\n", k, exact.mean_accepted, mean,
              standard_error);
  EXPECT_NEAR(exact.mean_accepted, mean, 5 * standard_error);

  // The same check must reject rules that skip the residual step: this proves the test has teeth.
  for (Rule broken : {Rule::resample_from_target, Rule::keep_draft_token}) {
    const Simulation sim = simulate(broken, k, q, p, 77 + k);
    print(broken, k, sim);
    EXPECT_FALSE(sim.positions[0].passes())
        << rule_name(broken) << ": first token chi-square " << sim.positions[0].statistic
        << " <= " << sim.positions[0].critical;
    EXPECT_FALSE(sim.passes()) << rule_name(broken);
  }
}

INSTANTIATE_TEST_SUITE_P(DraftLengths, SpeculativeDistribution, ::testing::Values(1, 3, 5),
                         [](const auto& param_info) { return "k" + std::to_string(param_info.param); });

TEST(SpeculativeStatistics, ChiSquareTailIsExact) {
  // Table values: P(chi2_1 >= 3.841459) = 0.05, P(chi2_10 >= 18.307038) = 0.05,
  // P(chi2_11 >= 31.264) = 0.001; and P(chi2_2 >= x) = e^{-x/2} exactly.
  EXPECT_NEAR(chi_square_sf(3.841459, 1), 0.05, 1e-6);
  EXPECT_NEAR(chi_square_sf(18.307038, 10), 0.05, 1e-6);
  EXPECT_NEAR(chi_square_sf(31.264, 11), 0.001, 1e-6);
  EXPECT_NEAR(chi_square_critical(2, 1e-6), 2.0 * std::log(1e6), 1e-9);
  EXPECT_NEAR(chi_square_critical(9, 1e-6), 44.8, 0.1);
}

// ---------------------------------------------------------------------------------------------
// Properties of the rule

TEST(SpeculativeVerify, IdenticalDraftAndTargetAcceptEverything) {
  std::mt19937_64 rng(5);
  Sampler draft_rng({.temperature = 1.0f, .seed = 1});
  Sampler verify_rng({.temperature = 1.0f, .seed = 2});
  for (int k : {1, 3, 5}) {
    std::vector<float> p;
    for (int i = 0; i <= k; ++i) {
      const auto row = random_distribution(rng, kVocab, 3);
      p.insert(p.end(), row.begin(), row.end());
    }
    const std::span<const float> q(p.data(), static_cast<size_t>(k * kVocab));  // q_i = p_i
    std::vector<int32_t> draft(k);
    for (int trial = 0; trial < 10000; ++trial) {
      for (int i = 0; i < k; ++i) draft[i] = sample_dense(&p[i * kVocab], kVocab, draft_rng.uniform());
      const Verification v = verify(draft, q, p, kVocab, verify_rng);
      ASSERT_EQ(v.accepted, k);
      ASSERT_EQ(v.tokens.size(), static_cast<size_t>(k + 1));
      ASSERT_TRUE(std::equal(draft.begin(), draft.end(), v.tokens.begin()));
      ASSERT_GT(p[k * kVocab + v.tokens.back()], 0.0f);  // the bonus token comes from p_k
    }
  }
  // The same through real Samplers: equal logits and parameters give equal distributions.
  const int64_t n_vocab = 300;
  const int k = 4;
  const auto logits = test::random_floats(static_cast<size_t>((k + 1) * n_vocab), 9, -4.0f, 4.0f);
  Sampler target({.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .repetition_penalty = 1.3f, .seed = 3});
  const std::vector<int32_t> history = {5, 17, 42};
  std::vector<int32_t> draft;
  for (int i = 0; i < k; ++i) {
    std::vector<int32_t> context = history;
    context.insert(context.end(), draft.begin(), draft.end());
    const auto row = dense_distribution(target, &logits[i * n_vocab], n_vocab, context);
    draft.push_back(sample_dense(row.data(), n_vocab, draft_rng.uniform()));
  }
  const auto p = dense_distributions(target, logits.data(), k + 1, n_vocab, history, draft);
  const std::span<const float> q(p.data(), static_cast<size_t>(k * n_vocab));
  for (int trial = 0; trial < 100; ++trial) EXPECT_EQ(verify(draft, q, p, n_vocab, target).accepted, k);
}

// Temperature 0: p_i and q_i are one-hot argmaxes, and the rule reduces to "accept while the draft
// token is the target's argmax; at the first mismatch emit the target's argmax (or the bonus
// argmax after k matches)", whatever the uniforms.
TEST(SpeculativeVerify, TemperatureZeroIsGreedyVerificationForAnyUniforms) {
  const int64_t n_vocab = 500;
  const int k = 5;
  const Sampler greedy({.temperature = 0.0f});
  for (int matching = 0; matching <= k; ++matching) {
    const auto target_logits = test::random_floats(static_cast<size_t>((k + 1) * n_vocab), 100 + matching);
    auto draft_logits = test::random_floats(static_cast<size_t>(k * n_vocab), 200 + matching);
    std::vector<int32_t> argmax(k + 1), draft(k);
    for (int i = 0; i <= k; ++i) {
      const float* row = &target_logits[i * n_vocab];
      argmax[i] = static_cast<int32_t>(std::max_element(row, row + n_vocab) - row);
    }
    for (int i = 0; i < k; ++i) {
      // The draft's greedy choice: the target's argmax for the first `matching` positions, then
      // something else; its own logits make it the draft's argmax, so q_i(x_i) = 1.
      draft[i] = i < matching ? argmax[i] : (argmax[i] + 1 + i) % n_vocab;
      draft_logits[i * n_vocab + draft[i]] = 10.0f;
    }
    const auto p = dense_distributions(greedy, target_logits.data(), k + 1, n_vocab, {}, draft);
    const auto q = dense_distributions(greedy, draft_logits.data(), k, n_vocab, {}, draft);
    for (int i = 0; i < k; ++i) ASSERT_EQ(q[i * n_vocab + draft[i]], 1.0f);

    std::vector<int32_t> want(argmax.begin(), argmax.begin() + matching + 1);  // matches, then argmax
    for (double u : {0.0, 0.25, 0.5, 0.999, kLargestUniform}) {
      const std::vector<double> uniforms(k + 1, u);
      const Verification v = verify(draft, q, p, n_vocab, uniforms);
      EXPECT_EQ(v.accepted, matching) << "u = " << u;
      EXPECT_EQ(v.tokens, want) << "u = " << u;
    }
    for (uint64_t seed = 0; seed < 50; ++seed) {
      Sampler rng({.temperature = 0.0f, .seed = seed});
      const Verification v = verify(draft, q, p, n_vocab, rng);
      EXPECT_EQ(v.accepted, matching);
      EXPECT_EQ(v.tokens, want);
    }
  }
  // A draft token the draft itself could not have proposed (q = 0) is rejected; the target's
  // argmax is emitted instead.
  const auto logits = test::random_floats(static_cast<size_t>(2 * n_vocab), 7);
  const auto p = dense_distributions(greedy, logits.data(), 2, n_vocab, {}, std::vector<int32_t>{0});
  const int32_t best = static_cast<int32_t>(std::max_element(p.begin(), p.begin() + n_vocab) - p.begin());
  std::vector<float> q(n_vocab, 0.0f);
  q[(best + 1) % n_vocab] = 1.0f;
  const std::vector<int32_t> unlikely = {static_cast<int32_t>((best + 2) % n_vocab)};
  for (double u : {0.0, 0.5, kLargestUniform}) {
    const Verification v = verify(unlikely, q, p, n_vocab, std::vector<double>{u, u});
    EXPECT_EQ(v.accepted, 0);
    EXPECT_EQ(v.tokens, std::vector<int32_t>{best});
  }
}

TEST(SpeculativeVerify, SameSeedSameTokensAndExactlyKPlusOneDraws) {
  std::mt19937_64 rng(11);
  const int k = 4;
  std::vector<float> p, q;
  for (int i = 0; i <= k; ++i) {
    const auto row = random_distribution(rng, kVocab, 1);
    p.insert(p.end(), row.begin(), row.end());
  }
  for (int i = 0; i < k; ++i) {
    const auto row = random_distribution(rng, kVocab, 1);
    q.insert(q.end(), row.begin(), row.end());
  }
  auto run = [&](uint64_t seed) {
    Sampler draft_rng({.temperature = 1.0f, .seed = 1000});
    Sampler verify_rng({.temperature = 1.0f, .seed = seed});
    std::vector<Verification> out;
    std::vector<int32_t> draft(k);
    for (int trial = 0; trial < 500; ++trial) {
      for (int i = 0; i < k; ++i) draft[i] = sample_dense(&q[i * kVocab], kVocab, draft_rng.uniform());
      out.push_back(verify(draft, q, p, kVocab, verify_rng));
    }
    return out;
  };
  auto tokens = [](const std::vector<Verification>& v) {
    std::vector<int32_t> all;
    for (const auto& x : v) {
      all.insert(all.end(), x.tokens.begin(), x.tokens.end());
      all.push_back(-1);
    }
    return all;
  };
  EXPECT_EQ(tokens(run(42)), tokens(run(42)));
  EXPECT_NE(tokens(run(42)), tokens(run(43)));

  // The Sampler overload draws exactly k + 1 uniforms in order, whatever the outcome, and gives
  // what the explicit-uniforms overload gives for those draws.
  Sampler draft_rng({.temperature = 1.0f, .seed = 3});
  std::vector<int32_t> draft(k);
  int rejections = 0;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    for (int i = 0; i < k; ++i) draft[i] = sample_dense(&q[i * kVocab], kVocab, draft_rng.uniform());
    Sampler a({.temperature = 1.0f, .seed = seed});
    Sampler b({.temperature = 1.0f, .seed = seed});
    std::vector<double> uniforms(k + 1);
    for (double& u : uniforms) u = b.uniform();
    const Verification va = verify(draft, q, p, kVocab, a);
    const Verification vb = verify(draft, q, p, kVocab, uniforms);
    EXPECT_EQ(va.tokens, vb.tokens);
    EXPECT_EQ(va.accepted, vb.accepted);
    EXPECT_EQ(a.uniform(), b.uniform()) << "stream position differs after verify (seed " << seed << ")";
    rejections += va.accepted < k;
  }
  EXPECT_GT(rejections, 0);  // the early-exit path was exercised
}

TEST(SpeculativeVerify, ResidualExcludesWhatTheDraftAlreadyCovers) {
  // p = (0.5, 0.5, 0), q = (0.9, 0, 0.1). Residual max(0, p - q) = (0, 0.5, 0): after a rejection
  // only token 1 can come out, for any final uniform.
  const std::vector<float> p = {0.5f, 0.5f, 0.0f, 1.0f / 3, 1.0f / 3, 1.0f / 3};
  const std::vector<float> q = {0.9f, 0.0f, 0.1f};
  for (double u : {0.0, 0.3, 0.7, kLargestUniform}) {
    // Token 2 has p = 0: always rejected.
    Verification v = verify(std::vector<int32_t>{2}, q, p, 3, std::vector<double>{0.0, u});
    EXPECT_EQ(v.accepted, 0);
    EXPECT_EQ(v.tokens, std::vector<int32_t>{1});
    // Token 0 has p/q = 5/9: accepted iff r < 5/9.
    v = verify(std::vector<int32_t>{0}, q, p, 3, std::vector<double>{0.55, u});
    EXPECT_EQ(v.accepted, 1);
    v = verify(std::vector<int32_t>{0}, q, p, 3, std::vector<double>{0.56, u});
    EXPECT_EQ(v.tokens, std::vector<int32_t>{1});
  }
  // k = 0: one token from p_0.
  const std::vector<float> p0 = {0.0f, 1.0f};
  EXPECT_EQ(verify({}, {}, p0, 2, std::vector<double>{0.0}).tokens, std::vector<int32_t>{1});
}

TEST(SpeculativeVerify, RejectsMalformedInputs) {
  const std::vector<float> q = {0.5f, 0.5f};
  const std::vector<float> p = {0.5f, 0.5f, 0.5f, 0.5f};
  const std::vector<int32_t> draft = {1};
  const std::vector<double> uniforms = {0.1, 0.2};
  EXPECT_NO_THROW(verify(draft, q, p, 2, uniforms));
  EXPECT_THROW(verify(draft, q, std::span<const float>(p.data(), 3), 2, uniforms), std::invalid_argument);
  EXPECT_THROW(verify(draft, std::span<const float>(q.data(), 1), p, 2, uniforms), std::invalid_argument);
  EXPECT_THROW(verify(draft, q, p, 2, std::vector<double>{0.1}), std::invalid_argument);
  EXPECT_THROW(verify(draft, q, p, 2, std::vector<double>{0.1, 1.0}), std::invalid_argument);
  EXPECT_THROW(verify(std::vector<int32_t>{2}, q, p, 2, uniforms), std::invalid_argument);
  EXPECT_THROW(verify(std::vector<int32_t>{-1}, q, p, 2, uniforms), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Helpers

TEST(SpeculativeSampleDense, InverseCdfSkipsZerosAndScalesBySum) {
  const std::vector<float> probs = {0.0f, 2.0f, 0.0f, 6.0f, 0.0f};  // sums to 8: (0.25, 0.75)
  EXPECT_EQ(sample_dense(probs.data(), 5, 0.0), 1);
  EXPECT_EQ(sample_dense(probs.data(), 5, 0.2499), 1);
  EXPECT_EQ(sample_dense(probs.data(), 5, 0.25), 3);
  EXPECT_EQ(sample_dense(probs.data(), 5, kLargestUniform), 3);
  // A uniform grid of u gives the exact proportions.
  const std::vector<float> p = {0.1f, 0.0f, 0.2f, 0.3f, 0.4f};
  std::vector<int> counts(5, 0);
  for (int i = 0; i < 1000; ++i) ++counts[sample_dense(p.data(), 5, (i + 0.5) / 1000)];
  EXPECT_EQ(counts, (std::vector<int>{100, 0, 200, 300, 400}));

  const std::vector<float> zeros = {0.0f, 0.0f};
  const std::vector<float> negative = {0.5f, -0.1f, 0.6f};
  const std::vector<float> nan = {0.5f, std::nanf("")};
  EXPECT_THROW(sample_dense(zeros.data(), 2, 0.5), std::invalid_argument);
  EXPECT_THROW(sample_dense(negative.data(), 3, 0.5), std::invalid_argument);
  EXPECT_THROW(sample_dense(nan.data(), 2, 0.5), std::invalid_argument);
  EXPECT_THROW(sample_dense(p.data(), 0, 0.5), std::invalid_argument);
}

TEST(SpeculativeDenseDistribution, MatchesTheSamplerAndItsPenaltyHistory) {
  const int64_t n_vocab = 200;
  const auto logits = test::random_floats(static_cast<size_t>(3 * n_vocab), 21, -3.0f, 3.0f);
  const Sampler s({.temperature = 0.7f,
                   .top_k = 50,
                   .top_p = 0.9f,
                   .min_p = 0.01f,
                   .repetition_penalty = 1.5f,
                   .repeat_last_n = 3,
                   .seed = 0});
  const std::vector<int32_t> history = {1, 2, 3, 4, 5, 6, 7};
  const auto dense = dense_distribution(s, logits.data(), n_vocab, history);
  const auto sparse = s.distribution(logits.data(), n_vocab, history);
  double sum = 0.0;
  size_t nonzero = 0;
  for (float v : dense) {
    sum += v;
    nonzero += v != 0.0f;
  }
  EXPECT_NEAR(sum, 1.0, 1e-6);
  EXPECT_EQ(nonzero, sparse.size());
  for (const auto& tp : sparse) EXPECT_EQ(dense[tp.id], tp.p);

  // Row i is penalized with the history followed by the first i draft tokens (and only the last
  // repeat_last_n of those).
  const std::vector<int32_t> draft = {10, 11};
  const auto rows = dense_distributions(s, logits.data(), 3, n_vocab, history, draft);
  for (int i = 0; i < 3; ++i) {
    std::vector<int32_t> context = history;
    context.insert(context.end(), draft.begin(), draft.begin() + i);
    const auto want = dense_distribution(s, &logits[i * n_vocab], n_vocab, context);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), rows.begin() + i * n_vocab)) << "row " << i;
  }
  EXPECT_THROW(dense_distributions(s, logits.data(), 3, n_vocab, history, std::vector<int32_t>{10}),
               std::invalid_argument);
}

}  // namespace
}  // namespace nibble::speculative

namespace nibble::speculative {
namespace {

// Greedy verification from the target's argmaxes alone (what a GPU hands back) equals
// verify_logits at temperature 0 on the full logits, for drafts that agree for a while and then
// not, and for every k; a wrong count of rows is refused.
TEST(SpeculativeArgmax, VerifyArgmaxEqualsGreedyVerifyLogits) {
  std::mt19937 rng(12);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n_vocab = 301;
  Sampler sampler(SamplingParams{});  // temperature 0
  for (int trial = 0; trial < 200; ++trial) {
    const int k = trial % 6;
    std::vector<float> logits(static_cast<size_t>((k + 1) * n_vocab));
    for (float& v : logits) v = normal(rng);
    std::vector<int32_t> argmax, drafts;
    for (int i = 0; i <= k; ++i) {
      const float* row = logits.data() + i * n_vocab;
      argmax.push_back(static_cast<int32_t>(std::max_element(row, row + n_vocab) - row));
    }
    const int agree = static_cast<int>(rng() % (k + 1));  // drafts match the first `agree` argmaxes
    for (int i = 0; i < k; ++i)
      drafts.push_back(i < agree ? argmax[static_cast<size_t>(i)]
                                 : static_cast<int32_t>((argmax[static_cast<size_t>(i)] + 1) % n_vocab));
    const Verification want = verify_logits(sampler, logits.data(), n_vocab, {}, drafts, {});
    const Verification got = verify_argmax(argmax, drafts);
    ASSERT_EQ(got.accepted, want.accepted) << "trial " << trial;
    ASSERT_EQ(got.tokens, want.tokens) << "trial " << trial;
    ASSERT_EQ(got.accepted, agree);
  }
  const std::vector<int32_t> two = {1, 2};
  EXPECT_THROW(verify_argmax(two, two), std::invalid_argument);
}

}  // namespace
}  // namespace nibble::speculative
