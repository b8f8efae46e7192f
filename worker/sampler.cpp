#include "worker/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace nibble::worker {

void validate(const SamplingParams& p) {
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  if (!std::isfinite(p.temperature) || p.temperature < 0.0f) fail("temperature must be >= 0");
  if (p.top_k < 0) fail("top_k must be >= 0");
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) fail("top_p must be in (0, 1]");
  if (!(p.min_p >= 0.0f && p.min_p < 1.0f)) fail("min_p must be in [0, 1)");
  if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty))
    fail("repetition_penalty must be > 0");
  if (!std::isfinite(p.presence_penalty)) fail("presence_penalty must be finite");
  if (!std::isfinite(p.frequency_penalty)) fail("frequency_penalty must be finite");
  if (p.repeat_last_n < 0) fail("repeat_last_n must be >= 0");
  const std::vector<bool> repeated = repeated_tokens(p.logit_bias);
  for (size_t i = 0; i < p.logit_bias.size(); ++i) {
    if (p.logit_bias[i].token < 0)
      fail("logit_bias: token " + std::to_string(p.logit_bias[i].token) + " is negative");
    if (!std::isfinite(p.logit_bias[i].bias)) fail("logit_bias: a bias must be finite");
    if (repeated[i]) fail("logit_bias: token " + std::to_string(p.logit_bias[i].token) + " twice");
  }
}

namespace {
bool penalizes(const SamplingParams& p) {
  return p.repeat_last_n > 0 &&
         (p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f);
}
}  // namespace

bool adjusts_logits(const SamplingParams& params) { return !params.logit_bias.empty() || penalizes(params); }

std::vector<LogitAdjustment> logit_adjustments(const SamplingParams& params, std::span<const int32_t> history,
                                               int64_t n_vocab) {
  std::vector<LogitAdjustment> out;
  for (const TokenBias& b : params.logit_bias) {
    if (b.token < n_vocab) out.push_back({b.token, b.bias, 1.0f, 0.0f});
  }
  if (penalizes(params)) {
    const size_t window = std::min(history.size(), static_cast<size_t>(params.repeat_last_n));
    std::vector<int32_t> seen;
    for (size_t i = history.size() - window; i < history.size(); ++i)
      if (history[i] >= 0 && history[i] < n_vocab) seen.push_back(history[i]);
    std::sort(seen.begin(), seen.end());
    for (size_t i = 0; i < seen.size();) {
      size_t count = 1;
      while (i + count < seen.size() && seen[i + count] == seen[i]) ++count;
      // llama.cpp's llama_sampler_penalties: logit -= count * freq + (count > 0) * present.
      out.push_back({seen[i], 0.0f, params.repetition_penalty,
                     static_cast<float>(count) * params.frequency_penalty + params.presence_penalty});
      i += count;
    }
  }
  // One entry a token, ascending: a biased token in the window keeps its bias and takes the penalties.
  std::stable_sort(out.begin(), out.end(),
                   [](const LogitAdjustment& a, const LogitAdjustment& b) { return a.id < b.id; });
  std::vector<LogitAdjustment> merged;
  for (const LogitAdjustment& a : out) {
    if (!merged.empty() && merged.back().id == a.id) {
      merged.back().penalty = a.penalty;
      merged.back().subtract = a.subtract;
    } else {
      merged.push_back(a);
    }
  }
  return merged;
}

void apply_logit_adjustments(std::span<const LogitAdjustment> adjustments, float* logits) {
  for (const LogitAdjustment& a : adjustments) {
    float v = logits[a.id] + a.bias;
    v = v > 0.0f ? v / a.penalty : v * a.penalty;
    logits[a.id] = v - a.subtract;
  }
}

void apply_logit_adjustments(const SamplingParams& params, std::span<const int32_t> history, float* logits,
                             int64_t n_vocab) {
  apply_logit_adjustments(logit_adjustments(params, history, n_vocab), logits);
}

bool verifiable_on_model(const SamplingParams& params, int k, size_t draft_probs, int64_t n_vocab,
                         int64_t kept_rows) {
  return k > 0 && params.temperature > 0.0f && !adjusts_logits(params) &&
         (draft_probs >= static_cast<size_t>(k) * static_cast<size_t>(n_vocab) || kept_rows >= k);
}

VerifySequence verify_sequence(Sampler& sampler, std::span<const int32_t> tokens, int k,
                               std::span<const float> draft_probs, int64_t n_vocab,
                               std::vector<double>& uniforms, const KeptRows* kept) {
  uniforms.clear();
  for (int j = 0; j <= k; ++j) uniforms.push_back(sampler.uniform());
  const auto kk = static_cast<size_t>(k);
  if (kept != nullptr) return {sampler.params(), tokens.last(kk), {}, uniforms, kept};
  return {sampler.params(), tokens.last(kk), draft_probs.first(kk * static_cast<size_t>(n_vocab)), uniforms};
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) { validate(params); }

double Sampler::uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

std::vector<TokenProbability> Sampler::distribution(const float* logits, int64_t n_vocab,
                                                    std::span<const int32_t> history) const {
  std::vector<float> adjusted(logits, logits + n_vocab);
  apply_logit_adjustments(params_, history, adjusted.data(), n_vocab);
  if (params_.temperature <= 0.0f) {
    const auto best = std::max_element(adjusted.begin(), adjusted.end()) - adjusted.begin();
    return {{static_cast<int32_t>(best), 1.0f}};
  }

  std::vector<TokenProbability> c(n_vocab);
  for (int64_t i = 0; i < n_vocab; ++i) c[i] = {static_cast<int32_t>(i), adjusted[i] / params_.temperature};
  auto by_logit = [](const TokenProbability& a, const TokenProbability& b) {
    return a.p > b.p || (a.p == b.p && a.id < b.id);
  };
  size_t keep = c.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < keep) keep = params_.top_k;
  std::partial_sort(c.begin(), c.begin() + static_cast<std::ptrdiff_t>(keep), c.end(), by_logit);
  c.resize(keep);

  // Softmax in float64 over the kept candidates (sorted, largest first).
  const double max_logit = c.front().p;
  std::vector<double> probs(c.size());
  double sum = 0.0;
  for (size_t i = 0; i < c.size(); ++i) sum += probs[i] = std::exp(static_cast<double>(c[i].p) - max_logit);
  for (double& p : probs) p /= sum;

  if (params_.top_p < 1.0f) {
    double cumulative = 0.0;
    size_t cut = probs.size();
    for (size_t i = 0; i < probs.size(); ++i) {
      cumulative += probs[i];
      if (cumulative >= params_.top_p) {
        cut = i + 1;
        break;
      }
    }
    probs.resize(cut);
  }
  if (params_.min_p > 0.0f) {
    const double threshold = probs.front() * params_.min_p;
    size_t cut = 1;
    while (cut < probs.size() && probs[cut] >= threshold) ++cut;
    probs.resize(cut);
  }
  double kept_mass = 0.0;
  for (double p : probs) kept_mass += p;
  std::vector<TokenProbability> out(probs.size());
  for (size_t i = 0; i < probs.size(); ++i) out[i] = {c[i].id, static_cast<float>(probs[i] / kept_mass)};
  return out;
}

int32_t Sampler::sample(const float* logits, int64_t n_vocab, std::span<const int32_t> history) {
  const double u = uniform();
  return sample_with_uniform(logits, n_vocab, history, u);
}

int32_t Sampler::sample_with_uniform(const float* logits, int64_t n_vocab, std::span<const int32_t> history,
                                     double u) const {
  const std::vector<TokenProbability> dist = distribution(logits, n_vocab, history);
  if (dist.size() == 1) return dist.front().id;
  double cumulative = 0.0;
  for (const auto& tp : dist) {
    cumulative += tp.p;
    if (u < cumulative) return tp.id;
  }
  return dist.back().id;  // rounding left u just above the total
}

int32_t sample_allowed(Sampler& sampler, const float* logits, int64_t n_vocab,
                       std::span<const int32_t> history, const std::function<bool(int32_t)>& allowed,
                       const std::function<void(float*)>& mask, std::vector<float>& scratch) {
  const SamplingParams& p = sampler.params();
  if (p.temperature <= 0.0f || (p.top_k <= 0 && p.top_p >= 1.0f && p.min_p <= 0.0f)) {
    const int32_t first = sampler.sample(logits, n_vocab, history);
    if (allowed(first)) return first;
  }
  scratch.assign(logits, logits + n_vocab);
  mask(scratch.data());
  return sampler.sample(scratch.data(), n_vocab, history);
}

}  // namespace nibble::worker
