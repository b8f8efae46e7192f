#pragma once
// INT4 weights in groups, the layout of GPTQ, AWQ and Marlin-style GPU kernels: 4-bit levels q and,
// for each group of `group` consecutive inputs of a row, one fp16 scale s and one zero z:
//   w[r][j] = (q[r][j] - z[r][j / group]) * s[r][j / group]
// The nibbles of each run of 32 inputs are in GGUF Q4_0's order (input j in the low nibble of byte
// j, input j + 16 in its high nibble), so a run is one aligned 16-byte load, as in
// kernels/q4_0_split.hpp (which is this layout at group 32 with every zero 8).
//
// The CPU model holds such weights as Q4_0 blocks (symmetric, zero 8) or as Q8_0 blocks of
// "level minus zero" (asymmetric GPTQ and AWQ, model/hf_quantized.hpp). int4_groups_from_blocks
// recovers the 4-bit form from those blocks exactly, so a GPU reads 4.125 bits a weight at group 128
// instead of Q8_0's 8.5 (or Q4_0's 4.5), and computes the same products: float(q - z) * s equals
// Q8_0's float(qs) * d and Q4_0's float(q - 8) * d.
#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels {

// The widest group (128, 64 or 32 inputs, dividing k) at which `blocks` are exactly INT4 with one
// scale and one zero per group: every block of a group has the same scale bits, and its values (Q4_0:
// q - 8; Q8_0: qs) span at most 15 (zeros are kept in 0..31, see int4_groups_from_blocks). 0 when
// not even group 32 holds them (a Q8_0 block spanning more than 15, another type, k % 32 != 0).
// blocks: [n_out, k / 32] Q4_0 or Q8_0 blocks
int64_t int4_group_size(DType type, const void* blocks, int64_t n_out, int64_t k);

// blocks: [n_out, k / 32] Q4_0 or Q8_0 blocks, representable at `group` (see int4_group_size)
// quants: [n_out, k / 2] bytes, the 16 bytes of run b of row r at quants + r * k / 2 + 16 * b
// scales: [n_out, k / group] fp16 bits
// zeros:  [n_out, k / group] bytes; each group's zero is 8 when its values fit [-8, 7] (always for
//         Q4_0), otherwise minus its smallest value (0 when that is positive)
// Returns invalid_argument for a null pointer, a group other than 32, 64 or 128 or not dividing k, a
// type other than Q4_0 and Q8_0, or blocks that this group cannot hold exactly (nothing is promised
// about the outputs then).
Status int4_groups_from_blocks(DType type, const void* blocks, int64_t n_out, int64_t k, int64_t group,
                               uint8_t* quants, uint16_t* scales, uint8_t* zeros);

// The reference dequantization: y[r][j] = float(q - z) * float(s), the arithmetic of the GPU kernels.
// quants, scales, zeros: as above; y: [n_out, k] floats. Same argument errors (no type).
Status dequantize_int4_groups(const uint8_t* quants, const uint16_t* scales, const uint8_t* zeros,
                              int64_t n_out, int64_t k, int64_t group, float* y);

}  // namespace nibble::kernels
