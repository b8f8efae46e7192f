#include "speculative/rejection_sampler.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace nibble::speculative {

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

// Mass of norm(max(0, p - q)) at v, unnormalized. In float64 so that p == q gives exactly 0.
double residual(const float* p, const float* q, int64_t v) {
  return std::max(0.0, static_cast<double>(p[v]) - static_cast<double>(q[v]));
}

// The final token after a rejection at a position with target row p and draft row q.
int32_t sample_residual(const float* p, const float* q, int64_t n_vocab, double u) {
  double total = 0.0;
  for (int64_t v = 0; v < n_vocab; ++v) total += residual(p, q, v);
  // Sum 0 means p <= q everywhere, i.e. p == q: then the rejection probability was 0 in exact
  // arithmetic, and p is the right distribution to fall back on.
  if (!(total > 0.0)) return sample_dense(p, n_vocab, u);
  const double target = u * total;
  double cumulative = 0.0;
  int64_t last = -1;
  for (int64_t v = 0; v < n_vocab; ++v) {
    const double r = residual(p, q, v);
    if (r <= 0.0) continue;
    cumulative += r;
    last = v;
    if (target < cumulative) return static_cast<int32_t>(v);
  }
  return static_cast<int32_t>(last);  // u * total rounded up to the total
}

}  // namespace

int32_t sample_dense(const float* probs, int64_t n, double u) {
  if (n <= 0) fail("sample_dense: empty distribution");
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (!(probs[i] >= 0.0f)) {
      fail("sample_dense: probability " + std::to_string(i) + " is " + std::to_string(probs[i]));
    }
    total += probs[i];
  }
  if (!(total > 0.0) || !std::isfinite(total))
    fail("sample_dense: probabilities sum to " + std::to_string(total));
  const double target = u * total;
  double cumulative = 0.0;
  int64_t last = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (probs[i] == 0.0f) continue;  // a zero-probability id is never returned, even for u = 0
    cumulative += probs[i];
    last = i;
    if (target < cumulative) return static_cast<int32_t>(i);
  }
  return static_cast<int32_t>(last);  // u * total rounded up to the total
}

void dense_distribution(const worker::Sampler& sampler, const float* logits, int64_t n_vocab,
                        std::span<const int32_t> history, std::span<float> out) {
  if (n_vocab <= 0 || out.size() != static_cast<size_t>(n_vocab)) {
    fail("dense_distribution: output has " + std::to_string(out.size()) + " entries for a vocabulary of " +
         std::to_string(n_vocab));
  }
  std::fill(out.begin(), out.end(), 0.0f);
  for (const worker::TokenProbability& tp : sampler.distribution(logits, n_vocab, history)) out[tp.id] = tp.p;
}

std::vector<float> dense_distribution(const worker::Sampler& sampler, const float* logits, int64_t n_vocab,
                                      std::span<const int32_t> history) {
  std::vector<float> out(static_cast<size_t>(std::max<int64_t>(n_vocab, 0)));
  dense_distribution(sampler, logits, n_vocab, history, out);
  return out;
}

std::vector<float> dense_distributions(const worker::Sampler& sampler, const float* logits, int64_t n_rows,
                                       int64_t n_vocab, std::span<const int32_t> history,
                                       std::span<const int32_t> draft_tokens) {
  if (n_rows < 0 || n_vocab <= 0) fail("dense_distributions: bad shape");
  if (n_rows > static_cast<int64_t>(draft_tokens.size()) + 1) {
    fail("dense_distributions: " + std::to_string(n_rows) + " rows need " + std::to_string(n_rows - 1) +
         " draft tokens, got " + std::to_string(draft_tokens.size()));
  }
  // The penalty only looks at the last repeat_last_n tokens, so the tail of the history followed
  // by the draft tokens is enough: row i's context is its first (tail + i) entries.
  const size_t tail = std::min(history.size(), static_cast<size_t>(sampler.params().repeat_last_n));
  std::vector<int32_t> context(history.end() - static_cast<std::ptrdiff_t>(tail), history.end());
  context.insert(context.end(), draft_tokens.begin(), draft_tokens.end());

  std::vector<float> out(static_cast<size_t>(n_rows * n_vocab));
  for (int64_t i = 0; i < n_rows; ++i) {
    dense_distribution(sampler, logits + i * n_vocab, n_vocab,
                       std::span<const int32_t>(context.data(), tail + static_cast<size_t>(i)),
                       std::span<float>(out.data() + i * n_vocab, static_cast<size_t>(n_vocab)));
  }
  return out;
}

Verification verify(std::span<const int32_t> draft_tokens, std::span<const float> draft_probs,
                    std::span<const float> target_probs, int64_t n_vocab, std::span<const double> uniforms) {
  const size_t k = draft_tokens.size();
  if (n_vocab <= 0) fail("verify: n_vocab must be positive");
  const auto v = static_cast<size_t>(n_vocab);
  if (draft_probs.size() != k * v) {
    fail("verify: draft_probs has " + std::to_string(draft_probs.size()) + " entries, expected [" +
         std::to_string(k) + ", " + std::to_string(v) + "]");
  }
  if (target_probs.size() != (k + 1) * v) {
    fail("verify: target_probs has " + std::to_string(target_probs.size()) + " entries, expected [" +
         std::to_string(k + 1) + ", " + std::to_string(v) + "]");
  }
  if (uniforms.size() != k + 1) {
    fail("verify: " + std::to_string(uniforms.size()) + " uniforms for " + std::to_string(k) +
         " draft tokens (need k + 1)");
  }
  for (double u : uniforms) {
    if (!(u >= 0.0 && u < 1.0)) fail("verify: uniform " + std::to_string(u) + " is outside [0, 1)");
  }
  for (size_t i = 0; i < k; ++i) {
    if (draft_tokens[i] < 0 || draft_tokens[i] >= n_vocab) {
      fail("verify: draft token " + std::to_string(draft_tokens[i]) + " at position " + std::to_string(i) +
           " is outside the vocabulary (" + std::to_string(n_vocab) + ")");
    }
  }

  Verification result;
  result.tokens.reserve(k + 1);
  for (size_t i = 0; i < k; ++i) {
    const float* q = draft_probs.data() + i * v;
    const float* p = target_probs.data() + i * v;
    const int32_t x = draft_tokens[i];
    const double qx = q[x];
    const double px = p[x];
    // r < p/q without dividing; q(x) = 0 would make that "accept whenever p(x) > 0", but such a
    // token was not sampled from q, so accepting it would break the guarantee.
    if (qx > 0.0 && uniforms[i] * qx < px) {
      result.tokens.push_back(x);
      ++result.accepted;
      continue;
    }
    result.tokens.push_back(sample_residual(p, q, n_vocab, uniforms[k]));
    return result;
  }
  result.tokens.push_back(sample_dense(target_probs.data() + k * v, n_vocab, uniforms[k]));  // bonus
  return result;
}

Verification verify(std::span<const int32_t> draft_tokens, std::span<const float> draft_probs,
                    std::span<const float> target_probs, int64_t n_vocab, worker::Sampler& rng) {
  std::vector<double> uniforms(draft_tokens.size() + 1);
  for (double& u : uniforms) u = rng.uniform();
  return verify(draft_tokens, draft_probs, target_probs, n_vocab, uniforms);
}

int32_t greedy_token(const worker::Sampler& sampler, const float* logits, int64_t n_vocab,
                     std::span<const int32_t> history) {
  if (worker::adjusts_logits(sampler.params()))
    return sampler.distribution(logits, n_vocab, history).front().id;
  return static_cast<int32_t>(std::max_element(logits, logits + n_vocab) - logits);
}

Verification verify_logits(worker::Sampler& sampler, const float* target_logits, int64_t n_vocab,
                           std::span<const int32_t> history, std::span<const int32_t> draft_tokens,
                           std::span<const float> draft_probs) {
  const auto k = static_cast<int64_t>(draft_tokens.size());
  if (sampler.params().temperature > 0.0f) {
    const std::vector<float> p =
        dense_distributions(sampler, target_logits, k + 1, n_vocab, history, draft_tokens);
    return verify(draft_tokens, draft_probs, p, n_vocab, sampler);
  }
  Verification v;
  std::vector<int32_t> context(history.begin(), history.end());
  for (int64_t i = 0; i <= k; ++i) {
    const int32_t best = greedy_token(sampler, target_logits + i * n_vocab, n_vocab, context);
    v.tokens.push_back(best);
    if (i == k || draft_tokens[static_cast<size_t>(i)] != best) break;
    ++v.accepted;
    if (worker::adjusts_logits(sampler.params())) context.push_back(best);
  }
  return v;
}

Verification verify_argmax(std::span<const int32_t> target_argmax, std::span<const int32_t> draft_tokens) {
  if (target_argmax.size() != draft_tokens.size() + 1) {
    fail("verify_argmax: " + std::to_string(target_argmax.size()) + " target rows for " +
         std::to_string(draft_tokens.size()) + " draft tokens (need k + 1)");
  }
  Verification v;
  for (size_t i = 0; i < target_argmax.size(); ++i) {
    v.tokens.push_back(target_argmax[i]);
    if (i == draft_tokens.size() || draft_tokens[i] != target_argmax[i]) break;
    ++v.accepted;
  }
  return v;
}

}  // namespace nibble::speculative
