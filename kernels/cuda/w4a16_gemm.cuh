#pragma once
// CUDA prefill GEMM for 4-bit weights (GGUF Q4_0 and Q4_K, group-wise INT4) and fp16 activations on tensor
// cores (WMMA 16×16×16, fp32 accumulation): y[m, n_out] = x[m, k] · W[n_out, k]ᵀ for any m >= 1 (the many-row
// shape; w4a16_gemv is the better choice for m <= 8 or so). Weights are read in the layouts the GEMV reads
// (the same readers, kernels/cuda/w4a16_weights.cuh) and dequantized tile by tile into shared memory
// as fp16.
//
// Numerics: a dequantized weight (q - 8) · d needs up to 14 significant bits (Q4_K's more), so rounding it to
// fp16 for the tensor cores costs up to 2^-11 relative per weight (the GEMV keeps it exact in fp32). The
// error stays below 2^-11 · Σ|x · w| (typically far below: the roundings have random signs).
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// All pointers are device pointers.
// w: [n_out, k / 32] Q4_0 blocks (BlockQ4_0), rows k / 32 * 18 bytes apart, 2-byte aligned
// x: [m, k] __half, row-major (rows k apart), 16-byte aligned
// y: [m, n_out] float, row-major (rows n_out apart)
// k must be a multiple of 32, m >= 1, n_out >= 0. Enqueues one kernel on `stream` (asynchronous);
// programmatic: as a programmatic dependent launch (kernels/cuda/dependent_launch.cuh; the same
// results). Returns invalid_argument (nothing launched) for a bad argument, device_error if the
// launch fails.
Status w4a16_gemm_q4_0(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic = false);

// Group-wise INT4 (kernels/int4_groups.hpp); arguments as w4a16_gemv_int4_groups's, any m >= 1.
Status w4a16_gemm_int4_groups(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                              int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                              cudaStream_t stream, bool programmatic = false);

// The same product on mma.sync tensor-core instructions with cp.async double buffering (64 x 128
// output tiles, B fragments dequantized from the nibbles in registers): the candidate to replace the
// WMMA kernel above once a GPU run shows it faster (`nibble bench-gpu` times both). Arguments and
// numerics as w4a16_gemm_int4_groups's.
Status w4a16_gemm_int4_groups_mma(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                  int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                  float* y, cudaStream_t stream, bool programmatic = false);

// GGUF Q4_K blocks as stored; arguments as w4a16_gemv_q4_k's (16-byte aligned, k % 256 == 0), any m >= 1.
Status w4a16_gemm_q4_k(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic = false);
// GGUF Q8_0 blocks as stored; arguments as w4a16_gemv_q8_0's (2-byte aligned, k % 32 == 0), any m >= 1.
Status w4a16_gemm_q8_0(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic = false);
// GGUF Q6_K in planes; arguments as w4a16_gemv_q6_k's (16-byte aligned, k % 256 == 0), any m >= 1.
Status w4a16_gemm_q6_k(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic = false);

}  // namespace nibble::kernels::cuda
