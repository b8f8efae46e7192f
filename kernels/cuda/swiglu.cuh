#pragma once
// CUDA SwiGLU on fp16 with fp32 math: out = silu(gate) * up = gate / (1 + exp(-gate)) * up, the
// formula of kernels::swiglu (same operation order), rounded to fp16.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// All pointers are device pointers.
// gate, up: [n] __half (e.g. [tokens, n_ff] flattened)
// out:      [n] __half; may alias gate or up (element i is read and written by one thread)
// n >= 0 (0: nothing to do). Enqueues one kernel on `stream` (asynchronous).
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status swiglu_f16(const __half* gate, const __half* up, __half* out, int64_t n, cudaStream_t stream);

// The same on the fp32 outputs of the gate and up projections (the forward pass's FFN epilogue: one
// rounding, to the fp16 input of ffn_down). gate and up may be column ranges of one fused
// [rows, 2 * n_ff] projection output.
// gate, up: [rows, in_stride] float, row r's n_ff values at gate + r * in_stride (likewise up)
// out:      [rows, n_ff] __half (must not overlap gate or up)
// rows >= 0 (0: nothing to do), n_ff >= 1, in_stride >= n_ff. Enqueues one kernel on `stream`.
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
// programmatic: launched as a programmatic dependent launch (dependent_launch.cuh): it may start while
// the kernel before it finishes, and waits for it before touching memory; the same results.
Status swiglu_f32_to_f16(const float* gate, const float* up, int64_t in_stride, __half* out, int64_t rows,
                         int64_t n_ff, cudaStream_t stream, bool programmatic = false);

}  // namespace nibble::kernels::cuda
