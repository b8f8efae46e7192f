#include "kernels/quantize.hpp"

#include <cmath>

#include "kernels/quant_internal.hpp"

namespace nibble::kernels {
namespace {

// GGML's quantize_row_q4_0_ref: the signed value of largest magnitude maps to -8, so d = max / -8;
// q = min(15, (int8)(x / d + 8.5)).
void quantize_block_q4_0(const float* x, BlockQ4_0* out) {
  float amax = 0.0f;
  float max = 0.0f;
  for (int j = 0; j < kQK4_0; ++j) {
    if (std::fabs(x[j]) > amax) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.0f;
  const float inv_d = d != 0.0f ? 1.0f / d : 0.0f;
  out->d = fp32_to_fp16(d);
  for (int j = 0; j < kQK4_0 / 2; ++j) {
    const int lo = static_cast<int8_t>(x[j] * inv_d + 8.5f);
    const int hi = static_cast<int8_t>(x[j + kQK4_0 / 2] * inv_d + 8.5f);
    out->qs[j] = static_cast<uint8_t>((lo < 15 ? lo : 15) | ((hi < 15 ? hi : 15) << 4));
  }
}

void dequantize_block_q4_0(const BlockQ4_0& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  for (int j = 0; j < kQK4_0 / 2; ++j) {
    y[j] = static_cast<float>((block.qs[j] & 0xF) - 8) * d;
    y[j + kQK4_0 / 2] = static_cast<float>((block.qs[j] >> 4) - 8) * d;
  }
}

void dequantize_block_q8_0(const BlockQ8_0& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  for (int j = 0; j < kQK8_0; ++j) y[j] = static_cast<float>(block.qs[j]) * d;
}

// Q4_K: 8 sub-blocks of 32; sub-block pairs share 32 bytes of qs (low nibbles first, then high).
void dequantize_block_q4_k(const BlockQ4_K& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  const float dmin = fp16_to_fp32(block.dmin);
  const uint8_t* q = block.qs;
  for (int pair = 0; pair < 4; ++pair) {
    uint8_t scale_lo, min_lo, scale_hi, min_hi;
    detail::q4_k_scale_min(2 * pair, block.scales, &scale_lo, &min_lo);
    detail::q4_k_scale_min(2 * pair + 1, block.scales, &scale_hi, &min_hi);
    for (int l = 0; l < 32; ++l) y[l] = d * scale_lo * (q[l] & 0xF) - dmin * min_lo;
    for (int l = 0; l < 32; ++l) y[32 + l] = d * scale_hi * (q[l] >> 4) - dmin * min_hi;
    y += 64;
    q += 32;
  }
}

// Q6_K: two halves of 128; in each, ql[0..63] and qh[0..31] give four runs of 32 six-bit values
// (minus 32), each 16 elements with their own int8 scale.
void dequantize_block_q6_k(const BlockQ6_K& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  const uint8_t* ql = block.ql;
  const uint8_t* qh = block.qh;
  const int8_t* sc = block.scales;
  for (int half = 0; half < 2; ++half) {
    for (int l = 0; l < 32; ++l) {
      const int group = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[group + 0] * q1;
      y[l + 32] = d * sc[group + 2] * q2;
      y[l + 64] = d * sc[group + 4] * q3;
      y[l + 96] = d * sc[group + 6] * q4;
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

bool valid_row(DType type, const void* p, const float* x, int64_t n) {
  if (p == nullptr || x == nullptr || n < 0) return false;
  return n % type_info(type).block_elems == 0;
}

}  // namespace

Status quantize_row(DType type, const float* x, void* out, int64_t n) {
  if (type_info(static_cast<uint32_t>(type)) == nullptr) return Status::unsupported_type;
  if (type == DType::Q4_K || type == DType::Q6_K) return Status::unsupported_type;
  if (!valid_row(type, out, x, n)) return Status::invalid_argument;
  switch (type) {
    case DType::F32:
      std::memcpy(out, x, static_cast<size_t>(n) * sizeof(float));
      break;
    case DType::F16: {
      auto* dst = static_cast<f16_bits*>(out);
      for (int64_t i = 0; i < n; ++i) dst[i] = fp32_to_fp16(x[i]);
      break;
    }
    case DType::BF16: {
      auto* dst = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) dst[i] = fp32_to_bf16(x[i]);
      break;
    }
    case DType::Q4_0: {
      auto* dst = static_cast<BlockQ4_0*>(out);
      for (int64_t b = 0; b < n / kQK4_0; ++b) quantize_block_q4_0(x + b * kQK4_0, dst + b);
      break;
    }
    case DType::Q8_0: {
      auto* dst = static_cast<BlockQ8_0*>(out);
      for (int64_t b = 0; b < n / kQK8_0; ++b) detail::quantize_block_q8_0(x + b * kQK8_0, dst + b);
      break;
    }
    case DType::Q8_K: {
      auto* dst = static_cast<BlockQ8_K*>(out);
      for (int64_t b = 0; b < n / kQK_K; ++b) detail::quantize_block_q8_k(x + b * kQK_K, dst + b);
      break;
    }
    default:
      return Status::unsupported_type;
  }
  return Status::ok;
}

Status dequantize_row(DType type, const void* src, float* y, int64_t n) {
  if (type_info(static_cast<uint32_t>(type)) == nullptr) return Status::unsupported_type;
  if (!valid_row(type, src, y, n)) return Status::invalid_argument;
  const int64_t n_blocks = n / type_info(type).block_elems;
  switch (type) {
    case DType::F32:
      std::memcpy(y, src, static_cast<size_t>(n) * sizeof(float));
      break;
    case DType::F16: {
      const auto* s = static_cast<const f16_bits*>(src);
      for (int64_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(s[i]);
      break;
    }
    case DType::BF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_fp32(s[i]);
      break;
    }
    case DType::Q4_0:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q4_0(static_cast<const BlockQ4_0*>(src)[b], y + b * kQK4_0);
      break;
    case DType::Q8_0:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q8_0(static_cast<const BlockQ8_0*>(src)[b], y + b * kQK8_0);
      break;
    case DType::Q4_K:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q4_k(static_cast<const BlockQ4_K*>(src)[b], y + b * kQK_K);
      break;
    case DType::Q6_K:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q6_k(static_cast<const BlockQ6_K*>(src)[b], y + b * kQK_K);
      break;
    case DType::Q8_K:
      for (int64_t b = 0; b < n_blocks; ++b) {
        const BlockQ8_K& block = static_cast<const BlockQ8_K*>(src)[b];
        for (int j = 0; j < kQK_K; ++j) y[b * kQK_K + j] = block.d * static_cast<float>(block.qs[j]);
      }
      break;
  }
  return Status::ok;
}

}  // namespace nibble::kernels
