#pragma once
// GGUF Q4_0 blocks to group-wise INT4 on the device (the layout of kernels/int4_groups.hpp, which the
// W4A16 kernels read): what kernels::int4_groups_from_blocks does on the host for Q4_0, for weights
// that are made on the device (the dummy load format's). The nibble bytes move unchanged, a group's
// scale is its first block's and every zero is 8. That is exact only when every block of a group has
// the group's scale; a block that does not sets *mismatch to 1, and then the output must not be used.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// All pointers are device pointers.
// blocks:   [n_out, k / 32] BlockQ4_0, 2-byte aligned
// quants:   [n_out, k / 2] bytes, 16-byte aligned
// scales:   [n_out, k / group] fp16 bits
// zeros:    [n_out, k / group] bytes
// mismatch: [1] int32, only ever set (to 1); the caller clears it
// group: 32, 64 or 128, dividing k. Returns invalid_argument (nothing launched) for a bad argument,
// device_error if the launch fails. Enqueues one kernel on `stream`.
Status int4_groups_from_q4_0(const uint8_t* blocks, int64_t n_out, int64_t k, int64_t group, uint8_t* quants,
                             uint16_t* scales, uint8_t* zeros, int32_t* mismatch, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
