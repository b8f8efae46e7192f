#pragma once
// CUDA prefill GEMM for GGUF Q4_0 weights and fp16 activations on tensor cores (WMMA 16×16×16,
// fp32 accumulation): y[m, n_out] = x[m, k] · W[n_out, k]ᵀ for any m >= 1 (the many-row shape;
// w4a16_gemv is the better choice for m <= 8 or so). Weights are read straight from the GGUF layout
// (kernels::BlockQ4_0, 18 bytes per 32 elements, no repacking) and dequantized tile by tile into
// shared memory as fp16.
//
// Numerics: a dequantized weight (q - 8) · d needs up to 14 significant bits, so rounding it to fp16
// for the tensor cores costs up to 2^-11 relative per weight (the GEMV keeps it exact in fp32). The
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
// k must be a multiple of 32, m >= 1, n_out >= 0. Enqueues one kernel on `stream` (asynchronous).
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status w4a16_gemm_q4_0(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream);

}  // namespace nibble::kernels::cuda
