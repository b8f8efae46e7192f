#pragma once
// One 32-value block of a quantized KV cache (kernels/cuda/kv_cache_quant.cuh), quantized and
// dequantized as the CPU does it: GGML's *_ref rules, kernels::quantize_cache_row's bytes and
// kernels::dequantize_row's values bit for bit. __host__ __device__, so that test_kv_cache_blocks checks
// them on the host against the CPU functions; every float operation rounds once (no FMA contraction),
// divisions are IEEE.
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/w4a16_weights.cuh"
#include "kernels/quant_types.hpp"

namespace nibble::kernels::cuda::kv_quant {

using w4a16::add_rn;
using w4a16::mul_rn;
using w4a16::sub_rn;

__host__ __device__ inline float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// 1 / d, or 0 for a zero scale (GGML's id).
__host__ __device__ inline float inverse_or_zero(float d) { return d != 0.0f ? div_rn(1.0f, d) : 0.0f; }
__host__ __device__ inline uint16_t half_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }
__host__ __device__ inline float bits_half(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// The value of largest magnitude, with its sign (the first on a tie), as kernels' signed_absmax.
__host__ __device__ inline float signed_absmax(const float* x) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < kQK4_0; ++j) {
    if (fabsf(x[j]) > amax) {
      amax = fabsf(x[j]);
      max = x[j];
    }
  }
  return max;
}
__host__ __device__ inline void min_max(const float* x, float& min, float& max) {
  min = max = x[0];
  for (int j = 1; j < kQK4_0; ++j) {
    min = x[j] < min ? x[j] : min;
    max = max < x[j] ? x[j] : max;
  }
}
// 32 levels (0..31) into Q5_0 / Q5_1's low nibbles (Q4_0's order) and fifth bits.
__host__ __device__ inline void pack_q5(const int (&levels)[kQK4_0], uint8_t (&qh)[4], uint8_t (&qs)[16]) {
  uint32_t high = 0;
  for (int j = 0; j < kQK4_0; ++j) high |= static_cast<uint32_t>((levels[j] >> 4) & 1) << j;
  for (int j = 0; j < 16; ++j)
    qs[j] = static_cast<uint8_t>((levels[j] & 0xF) | ((levels[j + 16] & 0xF) << 4));
  for (int i = 0; i < 4; ++i) qh[i] = static_cast<uint8_t>(high >> (8 * i));
}
__host__ __device__ inline int level32(const uint8_t (&qs)[16], int j) {
  return j < 16 ? qs[j] & 0xF : qs[j - 16] >> 4;
}
// GGML's best_index_int8 over kIQ4Values (the upper index on a tie), the table read as w4a16's.
__host__ __device__ inline int nearest_iq4_index(float x) {
  if (x <= w4a16::iq4_value(0)) return 0;
  if (x >= w4a16::iq4_value(15)) return 15;
  int lo = 0, hi = 15;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (x < w4a16::iq4_value(static_cast<uint32_t>(mid))) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return sub_rn(x, w4a16::iq4_value(static_cast<uint32_t>(hi - 1))) <
                 sub_rn(w4a16::iq4_value(static_cast<uint32_t>(hi)), x)
             ? hi - 1
             : hi;
}

__host__ __device__ inline void quantize(const float* x, BlockQ8_0& out) {
  float amax = 0.0f;
  for (int j = 0; j < kQK8_0; ++j) amax = fmaxf(amax, fabsf(x[j]));
  const float d = div_rn(amax, 127.0f);
  const float inv_d = inverse_or_zero(d);
  out.d = half_bits(d);
  for (int j = 0; j < kQK8_0; ++j) out.qs[j] = static_cast<int8_t>(roundf(mul_rn(x[j], inv_d)));
}
__host__ __device__ inline void quantize(const float* x, BlockQ4_0& out) {
  const float d = div_rn(signed_absmax(x), -8.0f);
  const float inv_d = inverse_or_zero(d);
  out.d = half_bits(d);
  for (int j = 0; j < 16; ++j) {
    const int lo = static_cast<int8_t>(add_rn(mul_rn(x[j], inv_d), 8.5f));
    const int hi = static_cast<int8_t>(add_rn(mul_rn(x[j + 16], inv_d), 8.5f));
    out.qs[j] = static_cast<uint8_t>((lo < 15 ? lo : 15) | ((hi < 15 ? hi : 15) << 4));
  }
}
__host__ __device__ inline void quantize(const float* x, BlockQ4_1& out) {
  float min, max;
  min_max(x, min, max);
  const float d = div_rn(sub_rn(max, min), 15.0f);
  const float inv_d = inverse_or_zero(d);
  out.d = half_bits(d);
  out.m = half_bits(min);
  for (int j = 0; j < 16; ++j) {
    const int lo = static_cast<int8_t>(add_rn(mul_rn(sub_rn(x[j], min), inv_d), 0.5f));
    const int hi = static_cast<int8_t>(add_rn(mul_rn(sub_rn(x[j + 16], min), inv_d), 0.5f));
    out.qs[j] = static_cast<uint8_t>((lo < 15 ? lo : 15) | ((hi < 15 ? hi : 15) << 4));
  }
}
__host__ __device__ inline void quantize(const float* x, BlockQ5_0& out) {
  const float d = div_rn(signed_absmax(x), -16.0f);
  const float inv_d = inverse_or_zero(d);
  out.d = half_bits(d);
  int levels[kQK4_0];
  for (int j = 0; j < kQK4_0; ++j) {
    const int l = static_cast<int8_t>(add_rn(mul_rn(x[j], inv_d), 16.5f));
    levels[j] = l < 31 ? l : 31;
  }
  pack_q5(levels, out.qh, out.qs);
}
__host__ __device__ inline void quantize(const float* x, BlockQ5_1& out) {
  float min, max;
  min_max(x, min, max);
  const float d = div_rn(sub_rn(max, min), 31.0f);
  const float inv_d = inverse_or_zero(d);
  out.d = half_bits(d);
  out.m = half_bits(min);
  int levels[kQK4_0];
  for (int j = 0; j < kQK4_0; ++j)
    levels[j] = static_cast<uint8_t>(add_rn(mul_rn(sub_rn(x[j], min), inv_d), 0.5f));
  pack_q5(levels, out.qh, out.qs);
}
// quantize_row_iq4_nl_ref: the largest magnitude at the table's end, one least-squares scale (weights
// x²), the first indices kept.
__host__ __device__ inline void quantize(const float* x, BlockIQ4_NL& out) {
  const float max = signed_absmax(x);
  if (fabsf(max) < 1e-15f) {
    out.d = half_bits(0.0f);
    for (int j = 0; j < 16; ++j) out.qs[j] = 0;
    return;
  }
  const float id = div_rn(1.0f, div_rn(max, w4a16::iq4_value(0)));
  float sum_qx = 0.0f, sum_q2 = 0.0f;
  int levels[kQK4_0];
  for (int j = 0; j < kQK4_0; ++j) {
    levels[j] = nearest_iq4_index(mul_rn(id, x[j]));
    const float q = w4a16::iq4_value(static_cast<uint32_t>(levels[j]));
    const float w = mul_rn(x[j], x[j]);
    sum_qx = add_rn(sum_qx, mul_rn(mul_rn(w, q), x[j]));
    sum_q2 = add_rn(sum_q2, mul_rn(mul_rn(w, q), q));
  }
  const float d = sum_q2 > 0.0f ? div_rn(sum_qx, sum_q2) : 0.0f;
  out.d = half_bits(d);
  if (d == 0.0f) {
    for (int j = 0; j < kQK4_0; ++j) levels[j] = 0;
  }
  for (int j = 0; j < 16; ++j) out.qs[j] = static_cast<uint8_t>(levels[j] | (levels[j + 16] << 4));
}

// The 32 values a block holds, as kernels::dequantize_row computes them.
__host__ __device__ inline void dequantize(const BlockQ8_0& b, float* y) {
  const float d = bits_half(b.d);
  for (int j = 0; j < kQK8_0; ++j) y[j] = mul_rn(static_cast<float>(b.qs[j]), d);
}
__host__ __device__ inline void dequantize(const BlockQ4_0& b, float* y) {
  const float d = bits_half(b.d);
  for (int j = 0; j < kQK4_0; ++j) y[j] = mul_rn(static_cast<float>(level32(b.qs, j) - 8), d);
}
__host__ __device__ inline void dequantize(const BlockQ4_1& b, float* y) {
  const float d = bits_half(b.d), m = bits_half(b.m);
  for (int j = 0; j < kQK4_0; ++j) y[j] = add_rn(mul_rn(static_cast<float>(level32(b.qs, j)), d), m);
}
__host__ __device__ inline int level5(const uint8_t (&qs)[16], const uint8_t (&qh)[4], int j) {
  const uint32_t high = static_cast<uint32_t>(qh[0]) | static_cast<uint32_t>(qh[1]) << 8 |
                        static_cast<uint32_t>(qh[2]) << 16 | static_cast<uint32_t>(qh[3]) << 24;
  return level32(qs, j) | static_cast<int>((high >> j) & 1) << 4;
}
__host__ __device__ inline void dequantize(const BlockQ5_0& b, float* y) {
  const float d = bits_half(b.d);
  for (int j = 0; j < kQK4_0; ++j) y[j] = mul_rn(static_cast<float>(level5(b.qs, b.qh, j) - 16), d);
}
__host__ __device__ inline void dequantize(const BlockQ5_1& b, float* y) {
  const float d = bits_half(b.d), m = bits_half(b.m);
  for (int j = 0; j < kQK4_0; ++j) y[j] = add_rn(mul_rn(static_cast<float>(level5(b.qs, b.qh, j)), d), m);
}
__host__ __device__ inline void dequantize(const BlockIQ4_NL& b, float* y) {
  const float d = bits_half(b.d);
  for (int j = 0; j < kQK4_0; ++j)
    y[j] = mul_rn(d, w4a16::iq4_value(static_cast<uint32_t>(level32(b.qs, j))));
}

}  // namespace nibble::kernels::cuda::kv_quant
