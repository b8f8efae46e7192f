#pragma once
// Group-wise INT4 weights (kernels/int4_groups.hpp) repacked into the order the tensor-core GEMV
// streams them (Marlin's idea: the layout is the kernel's, made once at load). The row-major layout
// has the GEMV read, per pipeline stage, 128 rows x 128 bytes k / 2 bytes apart (128 separate lines a
// block, ~16k across the GPU at once) plus the stage's scales and zeros in 2- and 1-byte pieces from
// two more arrays. Tiled, a block's stage is one contiguous chunk that 16-byte copies read straight
// through, scales and zeros included:
//
//   chunk (t, s) for rows 128 t .. 128 t + 127 and inputs 256 s .. 256 s + 255, at byte
//   (t * stages + s) * int4_tiles_chunk_bytes(group), stages = ceil(k / 256):
//     [r * 128 + 16 u, + 16)            row 128 t + r's 16 nibble bytes of its 32-input run 8 s + u,
//                                       unchanged (int4_groups.hpp's order inside a run)
//     16384 + 4 * (r * gps + j)          row 128 t + r's (scale, zero) of its group gps * s + j
//                                        (gps = 256 / group groups a stage) as one uint32:
//                                        fp16 scale bits | (0x6400 + zero) << 16, i.e. fp16(1024 + zero)
//   Rows past n_out and runs past k are zero bytes (a weight of exactly 0: scale 0).
//
// The same weights, so every kernel that reads both layouts computes the same bits from either.
#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels {

constexpr int64_t kInt4TileRows = 128;                                         // weight rows a chunk
constexpr int64_t kInt4TileInputs = 256;                                       // inputs a chunk
constexpr int64_t kInt4TileNibbleBytes = kInt4TileRows * kInt4TileInputs / 2;  // 16384

// A group's (scale, zero) as a chunk stores it.
inline uint32_t int4_tile_pair(uint16_t scale_bits, int zero) {
  return static_cast<uint32_t>(scale_bits) | (static_cast<uint32_t>(0x6400 + zero) << 16);
}
// Bytes of one chunk at `group` (32, 64 or 128): 16384 of nibbles + 512 * 256 / group of pairs.
inline int64_t int4_tiles_chunk_bytes(int64_t group) {
  return kInt4TileNibbleBytes + kInt4TileRows * (kInt4TileInputs / group) * 4;
}
// Bytes of a whole [n_out, k] matrix (0 for a bad group or shape).
int64_t int4_tiles_bytes(int64_t n_out, int64_t k, int64_t group);

// quants, scales, zeros: [n_out, k] in int4_groups.hpp's layout (group 32, 64 or 128 dividing k,
// zeros 0..31); tiles: [int4_tiles_bytes(n_out, k, group)] bytes, every byte written.
// Returns invalid_argument for a null pointer, a bad group or k, n_out < 0.
Status int4_tiles_from_groups(const uint8_t* quants, const uint16_t* scales, const uint8_t* zeros,
                              int64_t n_out, int64_t k, int64_t group, uint8_t* tiles);

// GGUF Q4_K in the same chunks, for the Q4_K tensor-core kernels: chunk (t, s) holds super-block s
// of rows 128 t .. 128 t + 127, int4_tiles_chunk_bytes(32) bytes:
//   [r * 128, + 128)          the block's 128 qs bytes, unchanged
//   16384 + 4 * (8 r + j)     sub-block j's scale and min as the kernels stage them: fp16(d * scale)
//                             | fp16(-(dmin * min)) << 16 (each rounded to nearest even)
// Rows past n_out are zero bytes (weights of exactly 0).
int64_t q4_k_tiles_bytes(int64_t n_out, int64_t k);
// blocks: [n_out, k / 256] BlockQ4_K; tiles: [q4_k_tiles_bytes(n_out, k)] bytes, every byte written.
// Returns invalid_argument for a null pointer, k not a multiple of 256, n_out < 0.
Status q4_k_tiles_from_blocks(const uint8_t* blocks, int64_t n_out, int64_t k, uint8_t* tiles);

// The reference dequantization of the tiled form: y[r][j] = float(q - z) * float(s), equal bit for
// bit to dequantize_int4_groups of the weights it was made from. y: [n_out, k] floats.
Status dequantize_int4_tiles(const uint8_t* tiles, int64_t n_out, int64_t k, int64_t group, float* y);

}  // namespace nibble::kernels
