#pragma once
// CUDA RMSNorm on fp16 rows with fp32 math, optionally fused with the residual add that precedes
// it in the Llama block:
//   residual == nullptr:  y = x / sqrt(mean(x²) + eps) * weight
//   residual != nullptr:  h = fp16(x + residual); residual ← h; y = h / sqrt(mean(h²) + eps) * weight
// (the norm sees exactly the fp16 values written back, so the stream and the normed input agree).
// Matches kernels::rms_norm (same scale formula and multiplication order) up to fp32 summation
// order and the final rounding to fp16.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// All pointers are device pointers.
// x:        [rows, n] __half, row-major
// residual: [rows, n] __half, or nullptr; read and overwritten with x + residual when given
// weight:   [n] float
// y:        [rows, n] __half; may alias x or residual (each element is read and written by one thread)
// rows >= 0 (0: nothing to do), n >= 1, eps >= 0. Enqueues one kernel on `stream` (asynchronous).
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status rms_norm_f16(const __half* x, __half* residual, const float* weight, __half* y, int64_t rows,
                    int64_t n, float eps, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
