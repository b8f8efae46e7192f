#pragma once
// The exact speculative-decoding acceptance rule on the device, for a batch of sequences, so that only
// token ids cross to the host: speculative/rejection_sampler.hpp's verify() with the same uniforms.
// For sequence s with k = draft_counts[s] proposals x_0..x_{k-1}:
//   accept x_i while uniforms[s][i] * q_i(x_i) < p_i(x_i) (a token with q_i(x_i) = 0 is rejected);
//   at the first rejection j, draw from norm(max(0, p_j - q_j)) (from p_j when that is all zero);
//   after k acceptances, draw the bonus from p_k;
// both draws by inverse CDF with uniforms[s][k] (the first id whose cumulative mass exceeds u times
// the total; never an id of mass 0). The probability rows are dense (kernels/cuda/sampling.cuh's
// distribution_rows makes them from logits). Results equal verify()'s except when u * total lies
// within ~1e-12 (relative) of a cumulative boundary: the GPU sums in a different order.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// All pointers are device pointers.
// draft_tokens: [seqs, k_max] int32 (entries past draft_counts[s] unused)
// draft_counts: [seqs] int32, each in 0..k_max
// draft_probs:  [seqs, k_max, n_vocab] float, q_0..q_{k-1} (rows past the count unused)
// target_probs: [seqs, k_max + 1, n_vocab] float, p_0..p_k
// uniforms:     [seqs, k_max + 1] double in [0, 1)
// out_tokens:   [seqs, k_max + 1] int32: the accepted prefix, then the drawn token (later entries
//               untouched)
// out_accepted: [seqs] int32: draft tokens accepted, 0..k; -1 for a sequence whose count or any of
//               its draft tokens is out of range, or whose final target row sums to 0 (then
//               *bad_input is set to 1; the caller clears it)
// bad_input:    [1] int32
// seqs >= 0, k_max >= 0, n_vocab >= 1. Enqueues one kernel (a block per sequence) on `stream`.
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status speculative_accept(const int32_t* draft_tokens, const int32_t* draft_counts, const float* draft_probs,
                          const float* target_probs, const double* uniforms, int64_t seqs, int64_t k_max,
                          int64_t n_vocab, int32_t* out_tokens, int32_t* out_accepted, int32_t* bad_input,
                          cudaStream_t stream);

// The draft's side: one draw per row from its dense distribution by the same inverse CDF
// (speculative/rejection_sampler.hpp's sample_dense: the first id of positive probability whose
// running sum exceeds u times the row's total, in id order), so that a draft on the GPU proposes
// what it would on the host (up to the rounding of the double sums, which the device adds in 256
// chunks: a draw can differ only where u times the total lies within ~1e-16 of a boundary) and keeps
// its distributions where they were made.
// probs:    [rows, n_vocab] float >= 0 (distribution_rows's output)
// uniforms: [rows] double in [0, 1)
// ids:      [rows] int32 output; -1 for a row that sums to 0 (not a distribution)
// rows >= 0 (0: nothing to do), n_vocab >= 1. Enqueues one kernel (a block per row) on `stream`.
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status sample_dense_rows(const float* probs, const double* uniforms, int64_t rows, int64_t n_vocab,
                         int32_t* ids, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
