#pragma once
// The exact speculative-decoding acceptance rule (Leviathan et al. 2023, "Fast Inference from
// Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
// Decoding with Speculative Sampling"). A draft proposes k tokens x_i ~ q_i; the target scores them
// in one forward pass, giving p_0..p_k. Each x_i is accepted with probability min(1, p_i(x_i) /
// q_i(x_i)); at the first rejection j one token is drawn from norm(max(0, p_j - q_j)), and when all
// k are accepted a bonus token is drawn from p_k. The emitted tokens are then distributed exactly as
// if the target alone had sampled them, whatever the draft.
//
// Distributions are dense float32 rows over the whole vocabulary (what a GPU kernel would hold), the
// output of the same worker::Sampler transformation (penalty → temperature → top-k → top-p → min-p)
// for draft and target: the guarantee is about that transformed target distribution.
#include <cstdint>
#include <span>
#include <vector>

#include "worker/sampler.hpp"

namespace nibble::speculative {

// A token drawn from `probs` by inverse CDF: the first id whose cumulative probability exceeds
// u * sum(probs). probs: [n], non-negative; they need not sum to exactly 1 (u is scaled by their
// float64 sum, so float32 rounding never favours the last token). u: in [0, 1). Never returns an id
// with probability 0. Throws std::invalid_argument when n <= 0, an entry is negative or NaN, or the
// sum is not positive and finite.
int32_t sample_dense(const float* probs, int64_t n, double u);

// The distribution sampler.sample() would draw from for this logits row, as a dense vector (zeros
// outside the support; one-hot argmax at temperature 0). Computed by Sampler::distribution: softmax
// in float64 over the kept candidates, stored as float32.
// logits: [n_vocab]; history: tokens before this position (for the repetition penalty);
// out: [n_vocab], overwritten.
void dense_distribution(const worker::Sampler& sampler, const float* logits, int64_t n_vocab,
                        std::span<const int32_t> history, std::span<float> out);
std::vector<float> dense_distribution(const worker::Sampler& sampler, const float* logits, int64_t n_vocab,
                                      std::span<const int32_t> history);

// Dense distributions of n_rows consecutive positions whose context grows by the draft tokens: row i
// is scored after `history` followed by draft_tokens[0..i), so the repetition penalty sees what
// non-speculative decoding would have seen at that position. For the target pass n_rows = k + 1.
// logits: [n_rows, n_vocab]; draft_tokens: [>= n_rows - 1]. Returns [n_rows, n_vocab].
// Throws std::invalid_argument when draft_tokens is too short.
std::vector<float> dense_distributions(const worker::Sampler& sampler, const float* logits, int64_t n_rows,
                                       int64_t n_vocab, std::span<const int32_t> history,
                                       std::span<const int32_t> draft_tokens);

// One sequence's verification result.
struct Verification {
  // [accepted + 1]: the accepted draft prefix, then the resampled (first rejection) or bonus token.
  std::vector<int32_t> tokens;
  int accepted = 0;  // draft tokens accepted, 0..k
};

// Verifies k = draft_tokens.size() proposed tokens (k may be 0: then one token is drawn from p_0).
// draft_tokens: [k], each x_i drawn from q_i; draft_probs: [k, n_vocab] row-major, q_0..q_{k-1};
// target_probs: [k + 1, n_vocab] row-major, p_0..p_k (p_k is the bonus position);
// uniforms: [k + 1] draws in [0, 1): uniforms[i] decides x_i (accept iff uniforms[i] * q_i(x_i) <
// p_i(x_i); a token with q_i(x_i) = 0 cannot have been proposed by the draft and is rejected),
// uniforms[k] draws the final token (residual at the first rejection, else bonus). Uniforms past
// the first rejection are unused. When the residual max(0, p_j - q_j) sums to 0 (p_j == q_j), the
// final token is drawn from p_j. At temperature 0 (one-hot p and q) the result does not depend on
// the uniforms: accept while x_i is the target's argmax, then emit the target's argmax.
// Throws std::invalid_argument for mismatched sizes, a draft token outside [0, n_vocab) or a
// uniform outside [0, 1).
Verification verify(std::span<const int32_t> draft_tokens, std::span<const float> draft_probs,
                    std::span<const float> target_probs, int64_t n_vocab, std::span<const double> uniforms);

// The same, drawing the k + 1 uniforms from the sequence's sampler stream: always exactly k + 1
// calls to rng.uniform(), in the order uniforms[0..k] above, all made before any is used and
// whatever the outcome (also at temperature 0). The stream thus advances by a count that depends
// on k only, so the same seed gives the same tokens, and a batched GPU kernel that is handed the
// same [k + 1] draws per sequence gives the same result.
Verification verify(std::span<const int32_t> draft_tokens, std::span<const float> draft_probs,
                    std::span<const float> target_probs, int64_t n_vocab, worker::Sampler& rng);

// The token sampler.sample() would pick at temperature 0 for this row: the argmax after the
// repetition penalty, found without building a distribution (the hot path of greedy speculation).
// logits: [n_vocab]. Requires sampler.params().temperature <= 0.
int32_t greedy_token(const worker::Sampler& sampler, const float* logits, int64_t n_vocab,
                     std::span<const int32_t> history);

// Verification straight from the target's logits, what the engines call. At temperature 0 it
// compares argmaxes only (draft_probs may then be empty: proposals are the draft's argmaxes) and
// draws no uniforms; otherwise it builds the dense distributions (dense_distributions) and runs
// verify(..., rng) above. target_logits: [k + 1, n_vocab]; history: tokens before the first verified
// position; draft_tokens: [k]; draft_probs: [k, n_vocab] (temperature > 0).
Verification verify_logits(worker::Sampler& sampler, const float* target_logits, int64_t n_vocab,
                           std::span<const int32_t> history, std::span<const int32_t> draft_tokens,
                           std::span<const float> draft_probs);

// verify_logits at temperature 0 without a repetition penalty, from the target's argmaxes alone (a
// GPU finds them on the device): accept while draft_tokens[i] == target_argmax[i], then emit the
// target's argmax at the first mismatch (or the bonus position). target_argmax: [k + 1]; draft_tokens:
// [k]. Throws std::invalid_argument when the sizes do not match.
Verification verify_argmax(std::span<const int32_t> target_argmax, std::span<const int32_t> draft_tokens);

}  // namespace nibble::speculative
