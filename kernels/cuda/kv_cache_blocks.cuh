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

// A block read straight from the cache by the decode attention (attention_decode_quantized): its bytes
// as 32-bit words, byte i at bits 8 (i % 4) of word i / 4. Blocks are only 2-byte aligned (a row is
// kv_dim / 32 blocks of an even size), so the kernel loads the aligned words that cover the block and
// shifts them into place: block_words.
constexpr int kBlockWords = 9;  // the largest block, Q8_0's 34 bytes
// Block bytes of a cache type (the types kv_cache_quant_type admits).
__host__ __device__ constexpr int block_bytes(DType type) {
  return type == DType::Q8_0   ? 34
         : type == DType::Q5_1 ? 24
         : type == DType::Q5_0 ? 22
         : type == DType::Q4_1 ? 20
                               : 18;  // Q4_0, IQ4_NL
}
// Aligned words to load for a block of `bytes` starting `offset` (0 or 2) bytes into the first.
__host__ __device__ constexpr int covering_words(int bytes, int offset) { return (offset + bytes + 3) / 4; }
// The block's words from the covering words `aligned` (kBlockWords + 1 of them, those past
// covering_words zero) and the block's byte offset in the first (0 or 2).
__host__ __device__ inline void block_words(const uint32_t (&aligned)[kBlockWords + 1], int offset,
                                            uint32_t (&w)[kBlockWords]) {
  const unsigned shift = 8u * static_cast<unsigned>(offset);
  NIBBLE_DEVICE_UNROLL
  for (int i = 0; i < kBlockWords; ++i) {
#if defined(__CUDA_ARCH__)
    w[i] = __funnelshift_r(aligned[i], aligned[i + 1], shift);
#else
    w[i] = shift == 0 ? aligned[i] : (aligned[i] >> shift) | (aligned[i + 1] << (32u - shift));
#endif
  }
}
__host__ __device__ inline uint32_t word_byte(const uint32_t (&w)[kBlockWords], int i) {
  return (w[i / 4] >> (8 * (i % 4))) & 0xFFu;
}
// Bytes i, i + 1 (i even: never across two words).
__host__ __device__ inline uint16_t word_half(const uint32_t (&w)[kBlockWords], int i) {
  return static_cast<uint16_t>(w[i / 4] >> (8 * (i % 4)));
}
// Level j (0..15) of 16 nibble bytes starting at byte `qs` (Q4_0's order).
__host__ __device__ inline int word_level(const uint32_t (&w)[kBlockWords], int qs, int j) {
  return j < 16 ? static_cast<int>(word_byte(w, qs + j) & 0xF)
                : static_cast<int>(word_byte(w, qs + j - 16) >> 4);
}
// The 32 values of a block given as words, bit for bit dequantize() of the same bytes.
__host__ __device__ inline void dequantize_words(DType type, const uint32_t (&w)[kBlockWords],
                                                 float (&y)[kQK4_0]) {
  const float d = bits_half(word_half(w, 0));
  switch (type) {
    case DType::Q8_0:
      NIBBLE_DEVICE_UNROLL
      for (int j = 0; j < kQK8_0; ++j)
        y[j] = mul_rn(static_cast<float>(static_cast<int8_t>(word_byte(w, 2 + j))), d);
      break;
    case DType::Q4_0:
      NIBBLE_DEVICE_UNROLL
      for (int j = 0; j < kQK4_0; ++j) y[j] = mul_rn(static_cast<float>(word_level(w, 2, j) - 8), d);
      break;
    case DType::Q4_1: {
      const float m = bits_half(word_half(w, 2));
      NIBBLE_DEVICE_UNROLL
      for (int j = 0; j < kQK4_0; ++j) y[j] = add_rn(mul_rn(static_cast<float>(word_level(w, 4, j)), d), m);
      break;
    }
    case DType::Q5_0: {
      const uint32_t high = static_cast<uint32_t>(word_half(w, 2)) | static_cast<uint32_t>(word_half(w, 4))
                                                                         << 16;
      NIBBLE_DEVICE_UNROLL
      for (int j = 0; j < kQK4_0; ++j) {
        const int level = word_level(w, 6, j) | static_cast<int>((high >> j) & 1) << 4;
        y[j] = mul_rn(static_cast<float>(level - 16), d);
      }
      break;
    }
    case DType::Q5_1: {
      const float m = bits_half(word_half(w, 2));
      const uint32_t high = w[1];
      NIBBLE_DEVICE_UNROLL
      for (int j = 0; j < kQK4_0; ++j) {
        const int level = word_level(w, 8, j) | static_cast<int>((high >> j) & 1) << 4;
        y[j] = add_rn(mul_rn(static_cast<float>(level), d), m);
      }
      break;
    }
    default:  // IQ4_NL
      NIBBLE_DEVICE_UNROLL
      for (int j = 0; j < kQK4_0; ++j)
        y[j] = mul_rn(d, w4a16::iq4_value(static_cast<uint32_t>(word_level(w, 2, j))));
      break;
  }
}

}  // namespace nibble::kernels::cuda::kv_quant
