#pragma once
// CUDA residual add and RMSNorm on an fp32 residual stream, the join of the CUDA forward pass: the
// projections (w4a16_gemv/gemm, cuBLAS) write fp32, the residual stream stays fp32 as on the CPU,
// and the normed activations the next projections read are fp16:
//   delta != nullptr:  residual ← residual + delta   (fp32, kernels::add_inplace's rounding)
//   y = fp16(residual / sqrt(mean(residual²) + eps) * weight)
// The scale formula and multiplication order are kernels::rms_norm's; the sum of squares is fp32
// (the CPU sums in double), so y differs from fp16(CPU) by the final rounding plus ~1e-6 relative.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// All pointers are device pointers.
// residual: [rows, n] float, read (and written when delta is given)
// delta:    [rows, n] float, or nullptr (then residual is only read)
// weight:   [n] float
// y:        [rows, n] __half
// (residual, delta and y must not overlap.)
// rows >= 0 (0: nothing to do), n >= 1, eps >= 0. Enqueues one kernel on `stream` (each row on a cluster of
// up to 8 blocks, split by n alone, so a row's bits do not depend on the other rows).
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
// programmatic: launched as a programmatic dependent launch (dependent_launch.cuh): it may start while
// the kernel before it finishes, and waits for it before touching memory; the same results.
Status add_rms_norm_f32(float* residual, const float* delta, const float* weight, __half* y, int64_t rows,
                        int64_t n, float eps, cudaStream_t stream, bool programmatic = false);

}  // namespace nibble::kernels::cuda
