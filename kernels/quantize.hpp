#pragma once
// Round-to-nearest quantizers with GGML's rounding rules, so that files Nibble writes load in
// llama.cpp and vice versa. These are reference-quality (scalar) and used at model-build time and
// for activations inside the matmul.
#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels {

// x: [n] floats, n a multiple of the block size of `type`; out: row_bytes(type, n) bytes.
// Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (llama.cpp's quantize_row_*_ref), Q2_K ... Q6_K
// (llama.cpp's quantize_row_q2_K_ref ... quantize_row_q6_K_ref), IQ4_NL and IQ4_XS (quantize_iq4_nl /
// quantize_iq4_xs without importance, what llama-quantize writes), Q8_1 and Q8_K.
Status quantize_row(DType type, const float* x, void* out, int64_t n);

// A row as llama.cpp writes it into a quantized KV cache (its CPU from_float, the _ref quantizers): as
// quantize_row except IQ4_NL, whose reference (quantize_row_iq4_nl_ref) skips llama-quantize's search
// over 15 scales and keeps its first indices. x: [n]; out: row_bytes(type, n) bytes.
Status quantize_cache_row(DType type, const float* x, void* out, int64_t n);

// Activations as llama.cpp's CPU matmuls and flash attention convert them to their vec_dot type (its x86
// quantize_row_q8_0 / _q8_1): Q8_0 and Q8_1 as quantize_row but q = x · (127 / amax) rounded half to
// even, where the reference (quantize_row, llama.cpp's _ref) divides by d and rounds ties away from
// zero: the two differ on exact ties, which are common when x holds a 4- or 5-bit KV cache's levels.
// Q8_K is quantize_row's (llama.cpp's x86 conversion is its reference). x: [n]; out: row_bytes(type, n).
Status quantize_activations(DType type, const float* x, void* out, int64_t n);

// quantize_row with importance weights (an imatrix row: importance: [n], one per column, the mean
// square of that input over the calibration tokens), as llama.cpp's quantize_row_*_impl: Q4_0, Q4_1,
// Q5_0, Q5_1, Q2_K ... Q6_K, IQ4_NL and IQ4_XS weigh each element's error by its importance (GGML's
// bytes for the same weights); F32, F16, BF16 and Q8_0 ignore it, as GGML does; the activation types
// (Q8_1, Q8_K) are unsupported_type. A null importance is quantize_row.
Status quantize_row_weighted(DType type, const float* x, const float* importance, void* out, int64_t n);

// llama.cpp's Q4_K sub-block fit (make_qkx2_quants with Q4_K's importance weights): the scale and
// offset that best represent x: [32] as scale * q - offset, q in 0..15, offset >= 0. Returns the
// scale and stores the offset in *offset. Exposed for calibrated quantizers that refit sub-blocks.
float fit_q4_k_sub_block(const float* x, float* offset);
// The same for Q5_K (make_qkx2_quants' Q5_K parameters: q in 0..31).
float fit_q5_k_sub_block(const float* x, float* offset);
// llama.cpp's Q2_K sub-block fit (make_qkx2_quants, weights |x|, absolute error): scale and offset for
// x: [16] as scale * q - offset, q in 0..3.
float fit_q2_k_sub_block(const float* x, float* offset);
// llama.cpp's Q6_K sub-block fit (make_qx_quants, weights x²): the signed scale for x: [16] as scale * v,
// v in −32..31.
float fit_q6_k_sub_block(const float* x);
// llama.cpp's Q3_K sub-block fit (make_q3_quants, weights x²): the signed scale that best represents
// x: [16] as scale * v, v in −4..3.
float fit_q3_k_sub_block(const float* x);

// Reference dequantization for every DType (IQ4_XS as llama.cpp's dequantize_row_iq4_xs). src:
// row_bytes(type, n) bytes; y: [n] floats.
Status dequantize_row(DType type, const void* src, float* y, int64_t n);

}  // namespace nibble::kernels
