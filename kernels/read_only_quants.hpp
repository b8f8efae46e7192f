#pragma once
// The GGUF tensor types Nibble reads but does not write: llama.cpp's sub-4-bit i-quants (IQ2_XXS, IQ2_XS,
// IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M: runs of weights as points of fixed lattices, kernels/iq_grids.hpp),
// the ternary TQ1_0 / TQ2_0 and MXFP4. Their dequantization (bit for bit llama.cpp's dequantize_row_*) and
// their dot products with quantized activations (Q8_K; Q8_0 for MXFP4), the integer sums of llama.cpp's
// ggml_vec_dot_*. Their kernels (read_only_quants_impl.hpp, compiled into every kernel set) are llama.cpp's
// AVX2 products where AVX2 is on, plain loops elsewhere; several activation rows share each decoded
// super-block. Not packed: these files are for fitting a model into less memory, not for Nibble's INT4 speed.
#include <cstdint>

#include "kernels/quant_types.hpp"

namespace nibble::kernels {

// True for the types above.
bool is_read_only_type(DType type);

// Dequantizes n_blocks blocks of a read-only type. blocks: [n_blocks] of the type; y: [n_blocks ·
// block_elems]. False (nothing written) for another type.
bool dequantize_read_only_blocks(DType type, const void* blocks, float* y, int64_t n_blocks);

// Dot product of one weight row with one activation row, k elements (a multiple of the type's block).
// w_row: [k / block_elems] blocks of `type`; x_row: [k / 256] BlockQ8_K (MXFP4: [k / 32] BlockQ8_0).
// 0 for another type.
float dot_read_only(DType type, const uint8_t* w_row, const uint8_t* x_row, int64_t k);

// y[r, o] for activation rows r in [0, m) and weight rows o in [o_begin, o_end): dot_read_only of each pair,
// with the same float operations, each weight super-block decoded once for all m rows. w: [n_out] rows of
// `type`, w_stride bytes apart; x: [m] activation rows as dot_read_only takes them, x_stride bytes apart;
// y: [m, y_stride] floats.
void matmul_read_only_rows(DType type, const uint8_t* w, int64_t w_stride, const uint8_t* x, int64_t x_stride,
                           float* y, int64_t y_stride, int64_t m, int64_t k, int64_t o_begin, int64_t o_end);

}  // namespace nibble::kernels
