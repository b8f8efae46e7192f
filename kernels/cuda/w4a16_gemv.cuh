#pragma once
// CUDA decode GEMV for GGUF Q4_0 weights and fp16 activations (fp32 accumulation):
//   y[m, n_out] = x[m, k] · W[n_out, k]ᵀ,  1 <= m <= 32 (the memory-bound decode shape).
// Weights are read straight from the GGUF layout (kernels::BlockQ4_0, 18 bytes per 32 elements:
// fp16 scale d, element j in the low nibble of qs[j] and element j+16 in the high nibble, value
// (q - 8) * d); no repacking.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// Largest number of activation rows one call handles.
constexpr int64_t kW4A16GemvMaxM = 32;

// All pointers are device pointers.
// w: [n_out, k / 32] Q4_0 blocks (BlockQ4_0), rows k / 32 * 18 bytes apart, 2-byte aligned
// x: [m, k] __half, row-major (rows k apart), 16-byte aligned
// y: [m, n_out] float, row-major (rows n_out apart)
// k must be a multiple of 32 and 1 <= m <= 32. Enqueues one kernel on `stream` (asynchronous).
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status w4a16_gemv_q4_0(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream);

}  // namespace nibble::kernels::cuda
