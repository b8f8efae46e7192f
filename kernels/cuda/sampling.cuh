#pragma once
// CUDA token sampling over rows of fp32 logits, matching worker::Sampler:
//   - argmax_rows: greedy, ties to the lowest id (std::max_element's first maximum);
//   - sample_rows: per-row temperature → top-k → top-p → min-p, then one draw by inverse CDF over
//     the kept candidates in the sampler's order (logit descending, id ascending), driven by a
//     uniform number in [0, 1) the caller supplies per row (e.g. worker::Sampler::uniform()), so a
//     row's id equals the CPU sampler's for the same u. Rows with temperature <= 0 take the argmax.
// Arithmetic follows Sampler::distribution (float logits / temperature, double softmax over the
// top-k candidates, the top-p cut at the first cumulative probability >= top_p, min-p relative to
// the top probability, probabilities renormalized and rounded to float, cumulated in double) except
// that the GPU sums in a different order: results differ from the CPU's only when u or top_p lies
// within ~1e-12 of a cumulative boundary.
// Not handled here: logit bias and penalties (apply_logit_adjustments to the logits first: few entries)
// and NaN logits (undefined on the CPU too); ±inf logits are fine for the greedy path.
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// One row's settings; the meaning and the "off" values of worker::SamplingParams.
struct SamplingRowParams {
  float temperature = 0.0f;  // <= 0: greedy
  int32_t top_k = 0;         // <= 0: off
  float top_p = 1.0f;        // >= 1: off; expected in (0, 1]
  float min_p = 0.0f;        // <= 0: off; expected in [0, 1)
};

// All pointers are device pointers.
// logits: [rows, n_vocab] float, row-major
// ids:    [rows] int32 output: the argmax of each row
// rows >= 0 (0: nothing to do), n_vocab >= 1. Enqueues one kernel on `stream`.
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status argmax_rows(const float* logits, int64_t rows, int64_t n_vocab, int32_t* ids, cudaStream_t stream);

// One token's change to its logit before sampling (worker::LogitAdjustment, the same layout): a logit
// bias, then the repetition penalty, then the presence and frequency penalties.
struct LogitAdjustment {
  int32_t id;
  float bias;
  float penalty;   // > 0; 1 for a token only biased
  float subtract;  // 0 for a token only biased
};

// The logit adjustments of each row, in worker::apply_logit_adjustments's float operations:
// v += bias; v = v > 0 ? v / penalty : v * penalty; v -= subtract.
// logits:      [rows, n_vocab] float, modified in place
// adjustments: [offsets[rows]]: row r's are adjustments[offsets[r] .. offsets[r + 1]), distinct ids
//              within a row (worker::logit_adjustments); ids outside [0, n_vocab) are skipped; may be
//              nullptr when no row has any
// offsets:     [rows + 1] int32, offsets[0] = 0, non-decreasing
// rows >= 0 (0: nothing to do), n_vocab >= 1. Enqueues one kernel on `stream`.
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status apply_logit_adjustments(float* logits, int64_t rows, int64_t n_vocab,
                               const LogitAdjustment* adjustments, const int32_t* offsets,
                               cudaStream_t stream);

// Scratch bytes sample_rows needs for rows × n_vocab (two sorted-key buffers of 8 bytes per logit,
// the segment offsets and CUB's sort storage). Asks CUB, so it needs the CUDA runtime and a device:
// returns device_error without one, invalid_argument for bad sizes.
Status sample_rows_workspace_bytes(int64_t rows, int64_t n_vocab, size_t* bytes);

// logits:    [rows, n_vocab] float, row-major (not modified)
// params:    [rows] SamplingRowParams
// uniforms:  [rows] double in [0, 1), one draw per row (unused by greedy rows)
// ids:       [rows] int32 output
// workspace: sample_rows_workspace_bytes(rows, n_vocab) bytes, 16-byte aligned
// rows * n_vocab < 2^31. Enqueues a key-building kernel, CUB's segmented radix sort (every row's
// candidates sorted by (logit / temperature descending, id ascending)) and a selection kernel, in
// order on `stream`. Returns invalid_argument (nothing launched) for a bad argument, device_error if
// a launch fails.
Status sample_rows(const float* logits, const SamplingRowParams* params, const double* uniforms, int64_t rows,
                   int64_t n_vocab, int32_t* ids, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream);

// The distribution sample_rows draws from, as dense rows: what speculative::dense_distribution
// computes on the host (worker::Sampler::distribution's kept candidates, each probability
// renormalized and rounded to float, zeros elsewhere; one-hot on the argmax for greedy rows), for
// the speculative acceptance kernel. The same keys, sort and workspace as sample_rows.
// probs: [rows, n_vocab] float output; the other arguments as sample_rows's.
Status distribution_rows(const float* logits, const SamplingRowParams* params, int64_t rows, int64_t n_vocab,
                         float* probs, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
