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
//     [r * 128 + 16 u, + 16)            row 128 t + r's 32 levels of its 32-input run 8 s + u, in the
//                                       mma fragments' order (int4_tile_nibble_index below)
//     16384 + 4 * (r * gps + j)          row 128 t + r's (scale, zero) of its group gps * s + j
//                                        (gps = 256 / group groups a stage) as one uint32:
//                                        fp16 scale bits | (0x6400 + zero) << 16, i.e. fp16(1024 + zero)
//   Rows past n_out and runs past k are zero bytes (a weight of exactly 0: scale 0).
//
// The same weights, so every kernel that reads both layouts computes the same bits from either.
//
// Inside a run's 16 bytes (four little-endian 32-bit words) the levels are in Marlin's interleave: word
// t holds the eight levels that lane t of an mma.sync.m16n8k16 quad holds as B fragments for the run's
// two 16-deep steps (inputs 16 s + 2t, + 1, + 8, + 9 for s = 0, 1), ordered so that an and-or with
// 0x000F000F (after a shift by 8 s) makes a fragment's two fp16 values 1024 + q and one with 0x00F000F0
// the other fragment's 1024 + 16 q: one 32-bit shared-memory load and a few logic ops per eight levels
// (kernels/cuda/w4a16_weights.cuh, int4_tile_word_b_fragments).
#include <cstdint>

#include "kernels/host_device.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels {

// Where input i (0..31) of a run lies in the run's 16 bytes of a chunk, as a nibble index n (byte n / 2,
// low nibble when n is even; word n / 8, bits 4 (n % 8) ..): input 16 s + 8 c + 2 t + e is nibble
// 4 e + 2 s + c of word t.
NIBBLE_HOST_DEVICE constexpr int int4_tile_nibble_index(int i) {
  const int s = i / 16, c = (i % 16) / 8, t = (i % 8) / 2, e = i % 2;
  return 8 * t + 4 * e + 2 * s + c;
}
// One run's 16 bytes as four little-endian words: from int4_groups.hpp's order (input j in the low
// nibble of byte j, input j + 16 in its high nibble) to a chunk's.
NIBBLE_HOST_DEVICE inline void int4_tile_words_from_run(const uint32_t (&run)[4], uint32_t (&out)[4]) {
  out[0] = out[1] = out[2] = out[3] = 0;
  for (int i = 0; i < 32; ++i) {
    const uint32_t level = (run[(i % 16) / 4] >> (8 * (i % 4) + 4 * (i / 16))) & 0xFu;
    const int n = int4_tile_nibble_index(i);
    out[n / 8] |= level << (4 * (n % 8));
  }
}
// Sub-block u of a Q4_K super-block as a chunk's run: its 32 levels (input i in qs byte 32 (u / 2) + i,
// the low nibble for even u, the high one for odd u; qs32: those 32 bytes as little-endian words,
// high = u % 2) in the fragment order above.
NIBBLE_HOST_DEVICE inline void q4_k_tile_words_from_sub_block(const uint32_t (&qs32)[8], int high,
                                                              uint32_t (&out)[4]) {
  out[0] = out[1] = out[2] = out[3] = 0;
  for (int i = 0; i < 32; ++i) {
    const uint32_t level = (qs32[i / 4] >> (8 * (i % 4) + 4 * high)) & 0xFu;
    const int n = int4_tile_nibble_index(i);
    out[n / 8] |= level << (4 * (n % 8));
  }
}
// Input i's level from a chunk's run (its four little-endian words).
NIBBLE_HOST_DEVICE inline int int4_tile_level(const uint32_t (&words)[4], int i) {
  const int n = int4_tile_nibble_index(i);
  return static_cast<int>((words[n / 8] >> (4 * (n % 8))) & 0xFu);
}

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
//   [r * 128 + 16 u, + 16)    the block's sub-block u (32 levels) in the fragment order
//                             (q4_k_tile_words_from_sub_block)
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
