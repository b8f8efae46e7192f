#pragma once
// Small CUDA data-movement kernels of the forward pass: fp16 → fp32 widening (the embedding rows
// become the fp32 residual stream) and a gather of selected fp16 rows (the rows whose logits are
// wanted, before the head). Both are exact.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// All pointers are device pointers. x: [n] __half; y: [n] float. n >= 0 (0: nothing to do).
// Enqueues one kernel on `stream`. Returns invalid_argument (nothing launched) for a bad argument,
// device_error if the launch fails.
Status f16_to_f32(const __half* x, float* y, int64_t n, cudaStream_t stream);

// src:  [src_rows, n_cols] __half
// rows: [n_rows] int32 indices into src's rows; an index outside [0, src_rows) gives a zero row
//       and sets *error_flag = 1 (when given; the flag is only ever set)
// dst:  [n_rows, n_cols] __half (must not overlap src)
// n_rows >= 0 (0: nothing to do), n_cols >= 1. Enqueues one kernel on `stream`. Returns
// invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status gather_rows_f16(const __half* src, int64_t src_rows, int64_t n_cols, const int32_t* rows,
                       int64_t n_rows, __half* dst, int32_t* error_flag, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
