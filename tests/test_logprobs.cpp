// worker::token_logprobs against log-softmax computed here in long double: the chosen token's value,
// the top tokens in order (ties by lower id), fewer when the vocabulary is smaller, bad arguments refused.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "worker/logprobs.hpp"

namespace nibble::worker {
namespace {

std::vector<long double> reference(const std::vector<float>& logits) {
  long double sum = 0;
  for (float v : logits) sum += std::exp(static_cast<long double>(v));
  std::vector<long double> out;
  for (float v : logits) out.push_back(static_cast<long double>(v) - std::log(sum));
  return out;
}

TEST(TokenLogprobs, MatchLogSoftmaxAndListTheMostLikelyTokens) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  for (const int64_t n_vocab : {int64_t{1}, int64_t{7}, int64_t{1001}}) {
    std::vector<float> logits(static_cast<size_t>(n_vocab));
    for (float& v : logits) v = normal(rng) + 30.0f;  // large logits: the max is subtracted first
    const std::vector<long double> want = reference(logits);
    const auto token = static_cast<int32_t>(rng() % n_vocab);
    const TokenLogprobs got = token_logprobs(logits.data(), n_vocab, token, 5);
    EXPECT_NEAR(got.logprob, static_cast<double>(want[static_cast<size_t>(token)]), 1e-5);
    ASSERT_EQ(got.top.size(), static_cast<size_t>(std::min<int64_t>(5, n_vocab)));
    std::vector<int32_t> order(static_cast<size_t>(n_vocab));
    for (int32_t i = 0; i < n_vocab; ++i) order[static_cast<size_t>(i)] = i;
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    for (size_t i = 0; i < got.top.size(); ++i) {
      EXPECT_EQ(got.top[i].first, order[i]);
      EXPECT_NEAR(got.top[i].second, static_cast<double>(want[static_cast<size_t>(order[i])]), 1e-5);
    }
    double total = 0;
    for (long double v : want) total += std::exp(static_cast<double>(v));
    EXPECT_NEAR(total, 1.0, 1e-9);
  }
}

TEST(TokenLogprobs, TiesGoToTheLowerIdAndZeroTopIsJustTheToken) {
  const std::vector<float> logits = {1.0f, 3.0f, 3.0f, 2.0f};
  const TokenLogprobs got = token_logprobs(logits.data(), 4, 3, 3);
  ASSERT_EQ(got.top.size(), 3u);
  EXPECT_EQ(got.top[0].first, 1);
  EXPECT_EQ(got.top[1].first, 2);
  EXPECT_EQ(got.top[2].first, 3);
  EXPECT_EQ(got.top[0].second, got.top[1].second);
  EXPECT_EQ(got.logprob, got.top[2].second);
  EXPECT_TRUE(token_logprobs(logits.data(), 4, 0, 0).top.empty());
}

TEST(TokenLogprobs, RefusesBadArguments) {
  const std::vector<float> logits = {0.0f, 1.0f};
  EXPECT_THROW(token_logprobs(logits.data(), 2, 2, 1), std::invalid_argument);
  EXPECT_THROW(token_logprobs(logits.data(), 2, -1, 1), std::invalid_argument);
  EXPECT_THROW(token_logprobs(logits.data(), 2, 0, kMaxTopLogprobs + 1), std::invalid_argument);
  EXPECT_THROW(token_logprobs(logits.data(), 0, 0, 1), std::invalid_argument);
}

}  // namespace
}  // namespace nibble::worker
