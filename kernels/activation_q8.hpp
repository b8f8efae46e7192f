#pragma once
// Activations as 8-bit integers in blocks of 32, for products on integer dot products (dp4a): the
// rule of llama.cpp's Q8_0 (quantize_row_q8_0_ref) on fp16 inputs, with the scale kept in fp32:
// per block, d = amax / 127 and q = roundf(x * (1 / d)) (0 where amax is 0). The CUDA W4A8 GEMV
// (kernels/cuda/w4a8_gemv) quantizes on the device by exactly these float steps, so both get the same
// bytes; here is its CPU reference.
#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels {

constexpr int64_t kQ8ActivationBlock = 32;

// x: [k] fp16 bits, k a multiple of 32; q: [k]; d: [k / 32] scales.
void quantize_activations_q8(const f16_bits* x, int64_t k, int8_t* q, float* d);

// The W4A8 product on group-wise INT4 weights (kernels/int4_groups.hpp's layout): each activation row
// quantized as above, then per 32-input run y[r][o] += d_x * s * (sum_i q_i * xq_i - z * sum_i xq_i),
// the integer sums exact, accumulated in double. quants, scales, zeros: [n_out, k] in int4_groups.hpp's
// layout (group 32, 64 or 128 dividing k); x: [m, k] fp16 bits; y: [m, n_out].
// Returns invalid_argument for a null pointer or a bad shape.
Status w4a8_gemv_int4_groups_reference(const uint8_t* quants, const f16_bits* scales, const uint8_t* zeros,
                                       int64_t group, int64_t n_out, int64_t k, const f16_bits* x, int64_t m,
                                       float* y);

// The same on GGUF Q4_K super-blocks: y[r][o] = sum_i w_i * d_x * xq_i in double, w the CPU's
// dequantization (kernels::dequantize_row). blocks: [n_out, k / 256] BlockQ4_K; k a multiple of 256.
Status w4a8_gemv_q4_k_reference(const uint8_t* blocks, int64_t n_out, int64_t k, const f16_bits* x, int64_t m,
                                float* y);

}  // namespace nibble::kernels
