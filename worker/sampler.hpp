#pragma once
// Token sampling: greedy, temperature, top-k, top-p, min-p, logit bias and the repetition, presence
// and frequency penalties, reproducible from a seed. Logits change in the order bias → penalties (as
// llama.cpp's sampler chain), then temperature → top-k → top-p → min-p (as vLLM's), so speculative
// decoding can apply the same transformation to draft and target.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "worker/kept_rows.hpp"

namespace nibble::worker {

// A token's logit bias (OpenAI's logit_bias; llama.cpp's --logit-bias).
struct TokenBias {
  int32_t token = 0;
  float bias = 0.0f;
  bool operator==(const TokenBias&) const = default;
};

struct SamplingParams {
  float temperature = 0.0f;         // <= 0: greedy (argmax)
  int32_t top_k = 0;                // <= 0: off
  float top_p = 1.0f;               // >= 1: off
  float min_p = 0.0f;               // <= 0: off
  float repetition_penalty = 1.0f;  // 1: off; llama.cpp rule: positive logits divided, negative multiplied
  // llama.cpp's penalties on the same window: presence subtracted once from each token found in it,
  // frequency once per time it is found. 0: off.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t repeat_last_n = 64;           // how many recent tokens (prompt and generated) the penalties look at
  std::vector<TokenBias> logit_bias{};  // added to those tokens' logits before the penalties; distinct tokens
  uint64_t seed = 0;
};

// For each of a list of token biases (TokenBias, protocol::TokenBias: anything with .token), whether an
// earlier one biases the same token. Sorted once, not compared pairwise: a row's settings are validated
// on every sampling step.
template <class Bias>
std::vector<bool> repeated_tokens(const std::vector<Bias>& biases) {
  std::vector<size_t> order(biases.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return biases[a].token < biases[b].token; });
  std::vector<bool> repeated(biases.size());
  for (size_t k = 1; k < order.size(); ++k)
    if (biases[order[k]].token == biases[order[k - 1]].token) repeated[order[k]] = true;
  return repeated;
}

// Throws std::invalid_argument naming an impossible parameter (negative temperature, top_p outside
// (0, 1], ...).
void validate(const SamplingParams& params);

// Each sampled row's tokens so far (prompt and generated), for the repetition penalty of a batched
// sampler (ForwardModel::forward_sample, CudaLlamaModel::forward_sample).
using TokenHistories = std::vector<std::span<const int32_t>>;

// Whether any logit changes before temperature: a logit bias, or a penalty with a window. Such rows
// need their token histories (TokenHistories) and are sampled, or verified, on the host's or the
// GPU's general path, never by argmax alone.
bool adjusts_logits(const SamplingParams& params);

// One token's change to its logit, in this order (the same float operations on the host and on a GPU,
// kernels::cuda::apply_logit_adjustments): v += bias; v = v > 0 ? v / penalty : v * penalty;
// v -= subtract. A token that is only biased has penalty 1 and subtract 0; one only penalized, bias 0.
struct LogitAdjustment {
  int32_t id = 0;
  float bias = 0.0f;
  float penalty = 1.0f;   // the repetition penalty for a token in the window
  float subtract = 0.0f;  // count * frequency_penalty + presence_penalty for a token found count > 0 times
  bool operator==(const LogitAdjustment&) const = default;
};

// A row's adjustments: the biased tokens and the distinct ids in [0, n_vocab) among the last
// repeat_last_n of history, ascending by id, one entry each; empty when adjusts_logits is false.
std::vector<LogitAdjustment> logit_adjustments(const SamplingParams& params, std::span<const int32_t> history,
                                               int64_t n_vocab);
// logits: [n_vocab]; adjustments: ids in [0, n_vocab).
void apply_logit_adjustments(std::span<const LogitAdjustment> adjustments, float* logits);
// The two above, on one logit row. logits: [n_vocab].
void apply_logit_adjustments(const SamplingParams& params, std::span<const int32_t> history, float* logits,
                             int64_t n_vocab);

// One sequence's sampled draft tokens to verify where the logits are (ForwardModel::forward_verify,
// CudaLlamaModel::forward_verify).
struct VerifySequence {
  SamplingParams params;               // temperature > 0, no logit adjustments
  std::span<const int32_t> drafts;     // [k], k >= 1
  std::span<const float> draft_probs;  // [k, n_vocab]: the draft's dense distributions (host)
  std::span<const double> uniforms;    // [k + 1] in [0, 1)
  // Instead of draft_probs (then empty): the same rows kept where the draft made them (rows 0..k-1
  // of a store of at least k rows of n_vocab), not owned.
  const KeptRows* kept_probs = nullptr;
};

// Whether a sequence's step can be verified where the logits are: it verifies k >= 1 drafts at
// temperature > 0 without logit adjustments, and the draft's k distributions are at hand, as
// draft_probs floats on the host or kept_rows rows where the draft made them.
bool verifiable_on_model(const SamplingParams& params, int k, size_t draft_probs, int64_t n_vocab,
                         int64_t kept_rows = 0);

class Sampler;
// The VerifySequence of a sequence whose step fed `tokens`, the last k of them its drafts, with its
// k + 1 uniforms drawn from `sampler` now into `uniforms` (speculative::verify draws as many, in the
// same order), which the result points into. draft_probs: at least [k, n_vocab]; or, when kept is
// set (at least k rows), empty: the draft's distributions are kept's.
VerifySequence verify_sequence(Sampler& sampler, std::span<const int32_t> tokens, int k,
                               std::span<const float> draft_probs, int64_t n_vocab,
                               std::vector<double>& uniforms, const KeptRows* kept = nullptr);

struct TokenProbability {
  int32_t id;
  float p;
};

class Sampler;

// A draw from `logits` with every token `allowed` refuses masked out (constrained output: JSON, grammars,
// min_tokens), with the sampler's transformation. Without truncation (top-k, top-p, min-p off, or greedy)
// a draw from the unmasked row that `allowed` takes is kept, and only otherwise is the row masked
// (`mask`, on a copy in `scratch`) and drawn from again: p(x) + (1 - Z) p(x) / Z = p(x) / Z for an allowed
// x, Z the allowed mass, which is the masked distribution exactly (greedy: the argmax, if allowed, is the
// masked argmax); checking one token costs far less than masking them all. With truncation the row is
// masked first (the truncation then applies to what is allowed). Draws one or two uniforms.
// logits: [n_vocab]; mask: sets the refused entries of its [n_vocab] argument to -infinity.
int32_t sample_allowed(Sampler& sampler, const float* logits, int64_t n_vocab,
                       std::span<const int32_t> history, const std::function<bool(int32_t)>& allowed,
                       const std::function<void(float*)>& mask, std::vector<float>& scratch);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  const SamplingParams& params() const { return params_; }

  // logits: [n_vocab]; history: tokens so far (prompt and generated), for the penalties. Draws exactly
  // one uniform per call (also when one candidate is left, or at temperature 0), so that a sampler
  // fed this stream's draws one per row (ForwardModel::forward_sample, on the GPU) picks the same ids.
  int32_t sample(const float* logits, int64_t n_vocab, std::span<const int32_t> history);
  // The id sample() picks with the uniform u in [0, 1) (inverse CDF over distribution()), no draw.
  int32_t sample_with_uniform(const float* logits, int64_t n_vocab, std::span<const int32_t> history,
                              double u) const;
  // The distribution sample() draws from, as (id, probability) pairs with p > 0, summing to 1. At
  // temperature 0 it is the one-hot argmax.
  std::vector<TokenProbability> distribution(const float* logits, int64_t n_vocab,
                                             std::span<const int32_t> history) const;
  // A uniform draw in [0, 1) from this sampler's stream (mt19937_64 is fully specified, so the same
  // seed gives the same stream on every platform).
  double uniform();

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace nibble::worker
