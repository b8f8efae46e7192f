#pragma once
// GGUF Q6_K weights repacked for the GPU's 16-byte loads. A Q6_K super-block is 210 bytes (128 bytes of
// low nibbles ql, 64 of high bit pairs qh, 16 int8 sub-block scales, an fp16 d), so consecutive blocks
// are only 2-byte aligned and a kernel reading them as stored needs 2-byte loads. Here each row's
// super-blocks are cut into pieces of 64 weights, the 16 weights of each quarter that share one
// sub-block scale: piece (h, s) of a super-block (h the half, s = 0 / 1, piece index 2h + s) holds
// weights 128h + 32q + 16s + i, q = 0..3 (the quarter), i = 0..15, whose bytes are
//   ql_lo: ql[64h + 16s + i]       (quarter 0 in the low nibbles, quarter 2 in the high ones)
//   ql_hi: ql[64h + 32 + 16s + i]  (quarter 1 low, quarter 3 high)
//   qh:    qh[32h + 16s + i]       (bits 2q, 2q + 1: quarter q's high bits)
//   scales: scales[8h + s + 2q], q = 0..3 (one int8 each)
// (GGUF's dequantize_row_q6_K: weight 128h + 32q + l is d * scales[8h + l / 16 + 2q] * (level - 32),
// level = the nibble of ql | the 2 bits of qh << 4.) Each part is a plane of its own, [n_out, pieces]
// row-major, so a warp's 32 consecutive pieces read 512 consecutive bytes of each. Same bytes in all
// (210 per 256 weights), same values. The planes' offsets depend on the matrix's row count: a row range is
// not a pointer offset, so the kernels take the whole matrix (the n_out it was repacked with).
#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels {

// Byte offsets of the planes in one buffer for an [n_out, k] matrix (k a multiple of 256), the first
// three 16-byte aligned where the buffer is:
//   ql_lo, ql_hi, qh: [n_out, k / 64] 16-byte pieces; scales: [n_out, k / 64] 4-byte words (byte q:
//   quarter q's int8 scale); d: [n_out, k / 256] fp16 bits.
struct Q6KPlanesLayout {
  int64_t ql_lo = 0, ql_hi = 0, qh = 0, scales = 0, d = 0;
  int64_t bytes = 0;  // all of it: n_out * k * 210 / 256
};
Q6KPlanesLayout q6_k_planes_layout(int64_t n_out, int64_t k);

// blocks: [n_out, k / 256] GGUF Q6_K super-blocks (BlockQ6_K); out: q6_k_planes_layout(n_out, k).bytes.
// invalid_argument for null pointers, n_out < 0, or k not a positive multiple of 256.
Status q6_k_planes_from_blocks(const void* blocks, int64_t n_out, int64_t k, uint8_t* out);

// Rows row0 .. row0 + rows - 1 of an [n_out, k] matrix's planes from those rows' blocks (blocks: [rows,
// k / 256]): a matrix stacked from parts, each repacked into its place (q6_k_planes_from_blocks is the
// whole matrix at once). invalid_argument as above, or for rows outside [0, n_out).
Status q6_k_planes_rows_from_blocks(const void* blocks, int64_t rows, int64_t k, int64_t n_out, int64_t row0,
                                    uint8_t* out);

// The inverse, for tests: back to GGUF super-blocks. Same shapes and errors.
Status q6_k_blocks_from_planes(const uint8_t* planes, int64_t n_out, int64_t k, void* blocks);

}  // namespace nibble::kernels
