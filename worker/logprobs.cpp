#include "worker/logprobs.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

namespace nibble::worker {

TokenLogprobs token_logprobs(const float* logits, int64_t n_vocab, int32_t token, int top_n) {
  if (n_vocab <= 0 || token < 0 || token >= n_vocab || top_n < 0 || top_n > kMaxTopLogprobs)
    throw std::invalid_argument("token_logprobs: bad vocabulary size, token or top_n");
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n_vocab; ++i) max_logit = std::max(max_logit, logits[i]);
  double sum = 0.0;
  for (int64_t i = 0; i < n_vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - max_logit);
  const double log_norm = static_cast<double>(max_logit) + std::log(sum);
  const auto logprob = [&](int64_t i) {
    return static_cast<float>(static_cast<double>(logits[i]) - log_norm);
  };
  TokenLogprobs out;
  out.logprob = logprob(token);
  const auto n = static_cast<int64_t>(std::min<int64_t>(top_n, n_vocab));
  if (n == 0) return out;
  std::vector<int32_t> ids(static_cast<size_t>(n_vocab));
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  for (int64_t i = 0; i < n; ++i)
    out.top.emplace_back(ids[static_cast<size_t>(i)], logprob(ids[static_cast<size_t>(i)]));
  return out;
}

}  // namespace nibble::worker
