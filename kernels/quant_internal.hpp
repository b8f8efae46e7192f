#pragma once
// Block-format helpers shared by the quantizers and the scalar kernels. Everything here has internal
// linkage (static) on purpose: the SIMD translation units are compiled with other -m flags, and a
// shared inline (COMDAT) definition could otherwise be resolved to an AVX2-compiled copy.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/quant_types.hpp"

namespace nibble::kernels::detail {

// GGML's nearest_int: round half to even via the float mantissa (valid for |x| < 2^22).
static inline int nearest_int(float x) {
  float shifted = x + 12582912.f;  // 1.5 * 2^23
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  return (bits & 0x007fffff) - 0x00400000;
}

// A rounded value as an int, 0 for NaN and values past int's range: what x86's conversion (INT_MIN) then
// truncated to 8 bits gives GGML there, without C++'s undefined behaviour. Quantizers meet such values
// only in a broken model's activations (NaN and inf from corrupt weights).
static inline int rounded_to_int(float r) {
  return r > -2147483648.0f && r < 2147483648.0f ? static_cast<int>(r) : 0;
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K block (GGML's get_scale_min_k4):
// bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; bytes 8-11 hold the low 4 bits
// of scale/min 4-7, whose top 2 bits live in the top bits of bytes 0-3 / 4-7.
static inline void q4_k_scale_min(int j, const uint8_t* scales, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = scales[j] & 63;
    *min = scales[j + 4] & 63;
  } else {
    *scale = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4);
    *min = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
  }
}

// The inverse of q4_k_scale_min: packs 8 six-bit scales and mins into a block's 12 scale bytes.
static inline void q4_k_pack_scale_min(const uint8_t* scale, const uint8_t* min, uint8_t* scales) {
  for (int j = 0; j < 4; ++j) {
    scales[j] = static_cast<uint8_t>(scale[j] | ((scale[j + 4] >> 4) << 6));
    scales[j + 4] = static_cast<uint8_t>(min[j] | ((min[j + 4] >> 4) << 6));
    scales[j + 8] = static_cast<uint8_t>((scale[j + 4] & 0xF) | ((min[j + 4] & 0xF) << 4));
  }
}

// Packs 256 levels (0..15) into a Q4_K block's qs: each 64-element run shares 32 bytes, its first 32
// elements in the low nibbles, the next 32 in the high nibbles.
static inline void q4_k_pack_levels(const uint8_t* levels, uint8_t* qs) {
  for (int run = 0; run < kQK_K / 64; ++run) {
    for (int l = 0; l < 32; ++l)
      qs[32 * run + l] = static_cast<uint8_t>(levels[64 * run + l] | (levels[64 * run + 32 + l] << 4));
  }
}

// Packs 256 levels (0..31) into a Q5_K block: the low 4 bits as Q4_K's qs, the fifth bit of element e
// (sub-block e / 32, element e % 32) in bit e / 32 of qh[e % 32].
static inline void q5_k_pack_levels(const uint8_t* levels, uint8_t* qh, uint8_t* qs) {
  uint8_t low[kQK_K];
  std::memset(qh, 0, kQK_K / 8);
  for (int e = 0; e < kQK_K; ++e) {
    low[e] = levels[e] & 0xF;
    qh[e % 32] = static_cast<uint8_t>(qh[e % 32] | ((levels[e] >> 4) << (e / 32)));
  }
  q4_k_pack_levels(low, qs);
}

// Packs 256 levels (0..3) into a Q2_K / Q3_K block's qs: element 128h + 32j + l in bits 2j, 2j + 1 of
// qs[32h + l].
static inline void q2_k_pack_low_bits(const uint8_t* levels, uint8_t* qs) {
  for (int h = 0; h < 2; ++h) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t* run = levels + 128 * h + l;
      qs[32 * h + l] = static_cast<uint8_t>(run[0] | (run[32] << 2) | (run[64] << 4) | (run[96] << 6));
    }
  }
}

// Packs 256 levels (0..63) into a Q6_K block: in each half of 128, the low 4 bits of elements l, l + 32,
// l + 64, l + 96 into ql (l and l + 64 share ql[l], l + 32 and l + 96 ql[l + 32]), their top 2 bits into
// qh[l] at bits 0, 2, 4, 6.
static inline void q6_k_pack_levels(const uint8_t* levels, uint8_t* ql, uint8_t* qh) {
  for (int j = 0; j < kQK_K; j += 128) {
    for (int l = 0; l < 32; ++l) {
      const auto q = [&](int o) { return levels[j + l + o]; };
      ql[l] = static_cast<uint8_t>((q(0) & 0xF) | ((q(64) & 0xF) << 4));
      ql[l + 32] = static_cast<uint8_t>((q(32) & 0xF) | ((q(96) & 0xF) << 4));
      qh[l] =
          static_cast<uint8_t>((q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6));
    }
    ql += 64;
    qh += 32;
  }
}

// The value of largest magnitude among x[0, n), with its sign (the first one on a tie), as GGML's
// Q4_0 / Q5_0 / Q8_K quantizers pick it.
static inline float signed_absmax(const float* x, int64_t n) {
  float amax = 0.0f, max = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    if (std::fabs(x[j]) > amax) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  return max;
}

// Level j (0..15, or 0..31 with Q5_0's / Q5_1's fifth bit) of a block of 32 in Q4_0's nibble order:
// element j in the low nibble of qs[j] (j < 16) or the high nibble of qs[j − 16].
template <typename Block>
static inline int block32_level(const Block& block, int j) {
  int level = j < kQK4_0 / 2 ? block.qs[j] & 0xF : block.qs[j - kQK4_0 / 2] >> 4;
  if constexpr (requires { block.qh; }) level |= static_cast<int>((q5_high_bits(block.qh) >> j) & 1) << 4;
  return level;
}

// GGML's Q8_0 rule for 32 values: d = amax / 127, q = round(x / d) with roundf (ties away from zero).
// Returns d before its rounding to fp16; *sum = Σq.
static inline float quantize_q8_quants(const float* x, int8_t* qs, int* sum) {
  float amax = 0.0f;
  for (int j = 0; j < kQK8_0; ++j) amax = std::fmax(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float inv_d = d != 0.0f ? 1.0f / d : 0.0f;
  *sum = 0;
  for (int j = 0; j < kQK8_0; ++j) {
    qs[j] = static_cast<int8_t>(rounded_to_int(std::roundf(x[j] * inv_d)));
    *sum += qs[j];
  }
  return d;
}

// llama.cpp's CPU conversion of 32 activations to a matmul's Q8_0 / Q8_1 blocks (its x86
// quantize_row_q8_0 / _q8_1, what its matmuls and flash attention run): d = amax / 127 as the
// reference, but q = x · (127 / amax) rounded half to even, so exact ties (common when the
// activations are a 4- or 5-bit cache's levels) round as llama.cpp's do. Returns the float d; *sum = Σq.
static inline float quantize_q8_activation_quants(const float* x, int8_t* qs, int* sum) {
  float amax = 0.0f;
  for (int j = 0; j < kQK8_0; ++j) amax = std::fmax(amax, std::fabs(x[j]));
  const float inv_d = amax != 0.0f ? 127.0f / amax : 0.0f;
  *sum = 0;
  for (int j = 0; j < kQK8_0; ++j) {
    qs[j] = static_cast<int8_t>(rounded_to_int(std::nearbyint(x[j] * inv_d)));  // ties to even
    *sum += qs[j];
  }
  return amax / 127.0f;
}

static inline void quantize_activation_block_q8_0(const float* x, BlockQ8_0* out) {
  int sum;
  out->d = fp32_to_fp16(quantize_q8_activation_quants(x, out->qs, &sum));
}

static inline void quantize_activation_block_q8_1(const float* x, BlockQ8_1* out) {
  int sum;
  const float d = quantize_q8_activation_quants(x, out->qs, &sum);
  out->d = fp32_to_fp16(d);
  out->s = fp32_to_fp16(static_cast<float>(sum) * d);
}

// GGML's quantize_row_q8_0_ref.
static inline void quantize_block_q8_0(const float* x, BlockQ8_0* out) {
  int sum;
  out->d = fp32_to_fp16(quantize_q8_quants(x, out->qs, &sum));
}

// GGML's quantize_row_q8_1_ref: Q8_0's d and quants, and s = d · Σq rounded to fp16 from the float d.
static inline void quantize_block_q8_1(const float* x, BlockQ8_1* out) {
  int sum;
  const float d = quantize_q8_quants(x, out->qs, &sum);
  out->d = fp32_to_fp16(d);
  out->s = fp32_to_fp16(static_cast<float>(sum) * d);
}

// GGML's quantize_row_q8_K_ref: scale from the signed value of largest magnitude, bsums per 16.
static inline void quantize_block_q8_k(const float* x, BlockQ8_K* out) {
  const float max = signed_absmax(x, kQK_K);
  if (max == 0.0f) {
    std::memset(out, 0, sizeof *out);
    return;
  }
  const float inv_scale = -127.0f / max;
  for (int j = 0; j < kQK_K; ++j) {
    // nearest_int's rounding (ties to even), but by nearbyint: nearest_int's add of 1.5 * 2^23 would
    // contract with this product into one FMA where FMA is on (the AVX2 kernel set), and round exact
    // ties (common when x holds a 4-bit cache's levels) differently from GGML.
    const int v = rounded_to_int(std::nearbyint(inv_scale * x[j]));
    out->qs[j] = static_cast<int8_t>(v < 127 ? v : 127);
  }
  for (int g = 0; g < kQK_K / 16; ++g) {
    int sum = 0;
    for (int i = 0; i < 16; ++i) sum += out->qs[g * 16 + i];
    out->bsums[g] = static_cast<int16_t>(sum);
  }
  out->d = 1.0f / inv_scale;
}

}  // namespace nibble::kernels::detail
