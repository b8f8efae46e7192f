#include "kernels/quant_types.hpp"

#include <cstdlib>

namespace nibble::kernels {
namespace {

constexpr TypeInfo kF32{"f32", 1, 4};
constexpr TypeInfo kF16{"f16", 1, 2};
constexpr TypeInfo kBF16{"bf16", 1, 2};
constexpr TypeInfo kQ4_0{"q4_0", kQK4_0, sizeof(BlockQ4_0)};
constexpr TypeInfo kQ4_1{"q4_1", kQK4_0, sizeof(BlockQ4_1)};
constexpr TypeInfo kQ5_0{"q5_0", kQK4_0, sizeof(BlockQ5_0)};
constexpr TypeInfo kQ5_1{"q5_1", kQK4_0, sizeof(BlockQ5_1)};
constexpr TypeInfo kQ8_0{"q8_0", kQK8_0, sizeof(BlockQ8_0)};
constexpr TypeInfo kQ2_K{"q2_K", kQK_K, sizeof(BlockQ2_K)};
constexpr TypeInfo kQ3_K{"q3_K", kQK_K, sizeof(BlockQ3_K)};
constexpr TypeInfo kQ4_K{"q4_K", kQK_K, sizeof(BlockQ4_K)};
constexpr TypeInfo kQ5_K{"q5_K", kQK_K, sizeof(BlockQ5_K)};
constexpr TypeInfo kQ6_K{"q6_K", kQK_K, sizeof(BlockQ6_K)};
constexpr TypeInfo kIQ4_NL{"iq4_nl", kQK4_0, sizeof(BlockIQ4_NL)};
constexpr TypeInfo kIQ4_XS{"iq4_xs", kQK_K, sizeof(BlockIQ4_XS)};
constexpr TypeInfo kIQ2_XXS{"iq2_xxs", kQK_K, sizeof(BlockIQ2_XXS)};
constexpr TypeInfo kIQ2_XS{"iq2_xs", kQK_K, sizeof(BlockIQ2_XS)};
constexpr TypeInfo kIQ2_S{"iq2_s", kQK_K, sizeof(BlockIQ2_S)};
constexpr TypeInfo kIQ3_XXS{"iq3_xxs", kQK_K, sizeof(BlockIQ3_XXS)};
constexpr TypeInfo kIQ3_S{"iq3_s", kQK_K, sizeof(BlockIQ3_S)};
constexpr TypeInfo kIQ1_S{"iq1_s", kQK_K, sizeof(BlockIQ1_S)};
constexpr TypeInfo kIQ1_M{"iq1_m", kQK_K, sizeof(BlockIQ1_M)};
constexpr TypeInfo kTQ1_0{"tq1_0", kQK_K, sizeof(BlockTQ1_0)};
constexpr TypeInfo kTQ2_0{"tq2_0", kQK_K, sizeof(BlockTQ2_0)};
constexpr TypeInfo kMXFP4{"mxfp4", kQK4_0, sizeof(BlockMXFP4)};
constexpr TypeInfo kQ8_1{"q8_1", kQK8_0, sizeof(BlockQ8_1)};
constexpr TypeInfo kQ8_K{"q8_K", kQK_K, sizeof(BlockQ8_K)};

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

const TypeInfo* type_info(uint32_t raw_type) {
  switch (static_cast<DType>(raw_type)) {
    case DType::F32:
      return &kF32;
    case DType::F16:
      return &kF16;
    case DType::BF16:
      return &kBF16;
    case DType::Q4_0:
      return &kQ4_0;
    case DType::Q4_1:
      return &kQ4_1;
    case DType::Q5_0:
      return &kQ5_0;
    case DType::Q5_1:
      return &kQ5_1;
    case DType::Q8_0:
      return &kQ8_0;
    case DType::Q2_K:
      return &kQ2_K;
    case DType::Q3_K:
      return &kQ3_K;
    case DType::Q4_K:
      return &kQ4_K;
    case DType::Q5_K:
      return &kQ5_K;
    case DType::Q6_K:
      return &kQ6_K;
    case DType::Q8_1:
      return &kQ8_1;
    case DType::Q8_K:
      return &kQ8_K;
    case DType::IQ4_NL:
      return &kIQ4_NL;
    case DType::IQ4_XS:
      return &kIQ4_XS;
    case DType::IQ2_XXS:
      return &kIQ2_XXS;
    case DType::IQ2_XS:
      return &kIQ2_XS;
    case DType::IQ2_S:
      return &kIQ2_S;
    case DType::IQ3_XXS:
      return &kIQ3_XXS;
    case DType::IQ3_S:
      return &kIQ3_S;
    case DType::IQ1_S:
      return &kIQ1_S;
    case DType::IQ1_M:
      return &kIQ1_M;
    case DType::TQ1_0:
      return &kTQ1_0;
    case DType::TQ2_0:
      return &kTQ2_0;
    case DType::MXFP4:
      return &kMXFP4;
  }
  return nullptr;
}

const TypeInfo& type_info(DType type) {
  const TypeInfo* info = type_info(static_cast<uint32_t>(type));
  // A DType value outside the enumerators is a programming error, not a data error.
  if (info == nullptr) std::abort();
  return *info;
}

const char* type_name(DType type) {
  const TypeInfo* info = type_info(static_cast<uint32_t>(type));
  return info != nullptr ? info->name : "unknown";
}

int64_t row_bytes(DType type, int64_t n) {
  const TypeInfo& info = type_info(type);
  return n / info.block_elems * info.block_bytes;
}

float fp16_to_fp32(f16_bits h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return bits_float(sign | float_bits(magnitude));
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  return bits_float(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13));
}

f16_bits fp32_to_fp16(float f) {
  // Round-to-nearest-even conversion (after F. Giesen's float_to_half_fast3_rtne).
  uint32_t bits = float_bits(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  bits &= 0x7fffffffu;
  uint32_t half;
  if (bits >= 0x7f800000u) {
    half = bits > 0x7f800000u ? 0x7e00u | ((bits >> 13) & 0x3ffu) : 0x7c00u;  // NaN stays quiet NaN
  } else if (bits >= 0x477ff000u) {
    half = 0x7c00u;  // >= 65520 rounds to infinity
  } else if (bits < 0x38800000u) {
    // Result is subnormal or zero: let the FPU round by adding a magic number that puts the
    // half's last mantissa bit at the float's last mantissa bit.
    const float magic = bits_float(((127 - 15) + (23 - 10) + 1) << 23);
    half = float_bits(bits_float(bits) + magic) - float_bits(magic);
  } else {
    const uint32_t mantissa_odd = (bits >> 13) & 1u;
    bits += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mantissa_odd;
    half = bits >> 13;
  }
  return static_cast<f16_bits>(sign | half);
}

uint16_t fp32_to_bf16(float f) {
  const uint32_t bits = float_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace nibble::kernels
