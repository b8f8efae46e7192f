#pragma once
// W4A8 decode GEMV: group-wise INT4 weights (kernels/int4_groups.hpp's layout) times activations
// quantized to 8 bits per 32 inputs (kernels/activation_q8.hpp's rule, applied on the device), on
// integer dot products: dp4a multiplies four 8-bit pairs and adds them in one instruction, so a
// weight costs about half an instruction plus its share of the nibble masks. llama.cpp's CUDA backend
// multiplies Q4_0 by Q8_1 activations the same way at small batches. Why: the fp16-activation
// CUDA-core GEMV's main loop issues ~6.3 instructions a weight (docs/perf/gpu.md), which caps it under
// an H200's copy bandwidth; this one's issues ~0.8 at one row.
//
// Each block first quantizes the m activation rows into shared memory (a 16-byte load of 8 inputs a
// thread, the block's amax and sum over 4 lanes; each warp's first row of weights is prefetched to L2
// meanwhile), then each warp takes output rows in turn (at most two blocks an SM): lane l
// reads 32-input runs l, l + 32, ... of its row with 16-byte loads, and per activation row adds
// d_x * s * (dot(q, xq) - z * sum(xq)) in fp32; a warp reduction ends the row.
//
// Numerics: not W4A16. The activations are rounded to 8 bits per 32 inputs (the CPU backend's Q8_0
// activations round the same way); the integer sums are exact. The CPU reference is
// kernels::w4a8_gemv_int4_groups_reference, which quantizes by the same float steps.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

constexpr int64_t kW4A8GemvMaxM = 4;

// All pointers are device pointers.
// quants: [n_out, k / 2] bytes, 16-byte aligned; scales: [n_out, k / group] fp16, 2-byte aligned;
// zeros: [n_out, k / group] bytes; group 32, 64 or 128 dividing k.
// x: [m, k] __half, 16-byte aligned; y: [m, n_out] float, every element written.
// 1 <= m <= kW4A8GemvMaxM; the m rows' 8-bit copies (m * k * 1.75 bytes with their scales, sums and
// the padding that keeps the lanes' reads on distinct banks) must fit in an SM's shared memory (k up
// to ~33000 at m = 4, ~130000 at m = 1). programmatic: dependent_launch.cuh's programmatic launch.
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status w4a8_gemv_int4_groups(const uint8_t* quants, const __half* scales, const uint8_t* zeros, int64_t group,
                             int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                             cudaStream_t stream, bool programmatic = false);

// The same on GGUF Q4_K super-blocks as stored (llama.cpp's vec_dot_q4_K_q8_1 arithmetic): per
// 32-input sub-block j, d_x * (d * scale_j * dot(q, xq) - dmin * min_j * sum(xq)).
// blocks: [n_out, k / 256] BlockQ4_K, 16-byte aligned; k a multiple of 256; the rest as above (the
// 8-bit copies take m * k * 1.35 bytes here: k up to ~43000 at m = 4).
// CPU reference: kernels::w4a8_gemv_q4_k_reference.
Status w4a8_gemv_q4_k(const uint8_t* blocks, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                      cudaStream_t stream, bool programmatic = false);

}  // namespace nibble::kernels::cuda
