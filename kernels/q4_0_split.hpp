#pragma once
// Q4_0 weights repacked for the GPU's 16-byte loads. A GGUF Q4_0 block is 18 bytes (fp16 scale, 16
// nibble bytes), so consecutive blocks are only 2-byte aligned and a warp reading them needs nine
// 2-byte loads per block. Split into a quant array and a scale array, each block's 16 nibble bytes
// are one aligned 16-byte load, and a warp's 32 blocks are 512 contiguous bytes. Same bytes in all
// (18 per 32 weights), same values: the nibble order within a block is GGUF's (element j in the low
// nibble of byte j, element j + 16 in its high nibble).
#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels {

// blocks: [n_out, k / 32] GGUF Q4_0 blocks (BlockQ4_0)
// quants: [n_out, k / 2] bytes: block b of row r at quants + r * k / 2 + 16 * b
// scales: [n_out, k / 32] fp16 bits: block b's d
// k must be a multiple of 32 (invalid_argument otherwise, or for a null pointer or n_out < 0).
Status split_q4_0(const void* blocks, int64_t n_out, int64_t k, uint8_t* quants, uint16_t* scales);

// The inverse, for tests: back to GGUF blocks. Same shapes and errors.
Status join_q4_0(const uint8_t* quants, const uint16_t* scales, int64_t n_out, int64_t k, void* blocks);

}  // namespace nibble::kernels
