#pragma once
// Token sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty, reproducible
// from a seed. Filters apply in the order penalty → temperature → top-k → top-p → min-p (as vLLM
// does), so speculative decoding can apply the same transformation to draft and target.
#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "worker/kept_rows.hpp"

namespace nibble::worker {

struct SamplingParams {
  float temperature = 0.0f;         // <= 0: greedy (argmax)
  int32_t top_k = 0;                // <= 0: off
  float top_p = 1.0f;               // >= 1: off
  float min_p = 0.0f;               // <= 0: off
  float repetition_penalty = 1.0f;  // 1: off; llama.cpp rule: positive logits divided, negative multiplied
  int32_t repeat_last_n = 64;       // how many recent tokens the penalty looks at
  uint64_t seed = 0;
};

// Throws std::invalid_argument naming an impossible parameter (negative temperature, top_p outside
// (0, 1], ...).
void validate(const SamplingParams& params);

// Each sampled row's tokens so far (prompt and generated), for the repetition penalty of a batched
// sampler (ForwardModel::forward_sample, CudaLlamaModel::forward_sample).
using TokenHistories = std::vector<std::span<const int32_t>>;

// The tokens the repetition penalty applies to: the distinct ids in [0, n_vocab) among the last
// repeat_last_n of history, ascending; empty when the penalty is off (1, or repeat_last_n 0).
std::vector<int32_t> penalized_tokens(const SamplingParams& params, std::span<const int32_t> history,
                                      int64_t n_vocab);
// The penalty on one logit row (llama.cpp's rule): each penalized token's logit divided by the
// penalty when positive, multiplied by it otherwise. logits: [n_vocab].
void apply_repetition_penalty(const SamplingParams& params, std::span<const int32_t> history, float* logits,
                              int64_t n_vocab);

// One sequence's sampled draft tokens to verify where the logits are (ForwardModel::forward_verify,
// CudaLlamaModel::forward_verify).
struct VerifySequence {
  SamplingParams params;               // temperature > 0, no repetition penalty
  std::span<const int32_t> drafts;     // [k], k >= 1
  std::span<const float> draft_probs;  // [k, n_vocab]: the draft's dense distributions (host)
  std::span<const double> uniforms;    // [k + 1] in [0, 1)
  // Instead of draft_probs (then empty): the same rows kept where the draft made them (rows 0..k-1
  // of a store of at least k rows of n_vocab), not owned.
  const KeptRows* kept_probs = nullptr;
};

// Whether a sequence's step can be verified where the logits are: it verifies k >= 1 drafts at
// temperature > 0 without a repetition penalty, and the draft's k distributions are at hand, as
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

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  const SamplingParams& params() const { return params_; }

  // logits: [n_vocab]; history: tokens so far (prompt and generated), for the penalty. Draws exactly
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
