#pragma once
// Group-wise INT4 weights on the device (kernels/int4_groups.hpp's row-major layout) repacked there
// into the tensor-core GEMV's chunks (kernels/int4_tiles.hpp): what kernels::int4_tiles_from_groups
// does on the host, for weights that are already on the device (uploaded or generated there). The
// same bytes, moved; pairs packed as int4_tile_pair.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// All pointers are device pointers.
// quants: [n_out, k / 2] bytes, 16-byte aligned
// scales: [n_out, k / group] fp16 bits, 2-byte aligned
// zeros:  [n_out, k / group] bytes (0..31)
// tiles:  [int4_tiles_bytes(n_out, k, group)] bytes, 16-byte aligned, every byte written
// group: 32, 64 or 128, dividing k. Returns invalid_argument (nothing launched) for a bad argument,
// device_error if a launch fails. Enqueues a memset and two kernels on `stream`.
Status int4_tiles_from_groups(const uint8_t* quants, const uint16_t* scales, const uint8_t* zeros,
                              int64_t n_out, int64_t k, int64_t group, uint8_t* tiles, cudaStream_t stream);

// GGUF Q4_K blocks on the device into the Q4_K chunks of kernels/int4_tiles.hpp (what
// kernels::q4_k_tiles_from_blocks does on the host; pairs by w4a16::q4_k_packed_scale_min, the bits
// the Q4_K tensor-core kernels stage from the blocks as stored).
// blocks: [n_out, k / 256] BlockQ4_K, 16-byte aligned; tiles: [q4_k_tiles_bytes(n_out, k)] bytes,
// 16-byte aligned, every byte written; k a multiple of 256. Returns invalid_argument (nothing
// launched) for a bad argument, device_error if a launch fails. A memset and one kernel on `stream`.
Status q4_k_tiles_from_blocks(const uint8_t* blocks, int64_t n_out, int64_t k, uint8_t* tiles,
                              cudaStream_t stream);

}  // namespace nibble::kernels::cuda
