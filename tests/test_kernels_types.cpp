// Element types: fp16/bf16 conversion, type table, quantize/dequantize round trips and the exact
// decoding of hand-built K-quant blocks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"
#include "kernels/status.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::kernels {
namespace {

// Quantizes x to `type` and back into y; returns the relative RMS error.
double round_trip_error(DType type, const std::vector<float>& x, std::vector<float>& y) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<uint8_t> q(static_cast<size_t>(row_bytes(type, n)));
  EXPECT_EQ(quantize_row(type, x.data(), q.data(), n), Status::ok);
  EXPECT_EQ(dequantize_row(type, q.data(), y.data(), n), Status::ok);
  double err = 0, norm = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    err += (y[i] - x[i]) * (y[i] - x[i]);
    norm += x[i] * x[i];
  }
  return std::sqrt(err / norm);
}

TEST(KernelTypes, Fp16RoundTripsEveryFiniteHalf) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const auto h = static_cast<f16_bits>(bits);
    const float f = fp16_to_fp32(h);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(fp16_to_fp32(fp32_to_fp16(f)))) << bits;
      continue;
    }
    EXPECT_EQ(fp32_to_fp16(f), h) << "half bits " << bits;
  }
}

TEST(KernelTypes, Fp16KnownValuesAndRounding) {
  EXPECT_EQ(fp16_to_fp32(0x3C00), 1.0f);
  EXPECT_EQ(fp16_to_fp32(0xC000), -2.0f);
  EXPECT_EQ(fp16_to_fp32(0x7BFF), 65504.0f);
  EXPECT_EQ(fp16_to_fp32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_TRUE(std::isinf(fp16_to_fp32(0x7C00)));
  EXPECT_EQ(fp32_to_fp16(1.0f), 0x3C00);
  EXPECT_EQ(fp32_to_fp16(65520.0f), 0x7C00);  // halfway to 65536 rounds (to even) to infinity
  EXPECT_EQ(fp32_to_fp16(65519.0f), 0x7BFF);
  EXPECT_EQ(fp32_to_fp16(1e-9f), 0x0000);
  // 1 + 2^-11 is exactly halfway between 1 and the next half (1 + 2^-10): ties go to even (1).
  EXPECT_EQ(fp32_to_fp16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);
  EXPECT_EQ(fp32_to_fp16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);
  // Subnormal halfway case: 1.5 · 2^-24 rounds to 2 · 2^-24.
  EXPECT_EQ(fp32_to_fp16(1.5f * std::ldexp(1.0f, -24)), 0x0002);
  EXPECT_TRUE(std::isnan(fp16_to_fp32(fp32_to_fp16(std::nanf("")))));
}

TEST(KernelTypes, Bf16RoundTripAndRounding) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float f = bf16_to_fp32(static_cast<uint16_t>(bits));
    if (std::isnan(f)) continue;
    EXPECT_EQ(fp32_to_bf16(f), bits);
  }
  EXPECT_EQ(fp32_to_bf16(1.0f), 0x3F80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even.
  EXPECT_EQ(fp32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);
  EXPECT_EQ(fp32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);
  EXPECT_TRUE(std::isnan(bf16_to_fp32(fp32_to_bf16(std::nanf("")))));
}

TEST(KernelTypes, TypeTableMatchesGgml) {
  EXPECT_EQ(type_info(DType::Q4_0).block_bytes, 18);
  EXPECT_EQ(type_info(DType::Q8_0).block_bytes, 34);
  EXPECT_EQ(type_info(DType::Q4_K).block_bytes, 144);
  EXPECT_EQ(type_info(DType::Q5_K).block_bytes, 176);
  EXPECT_EQ(type_info(DType::Q6_K).block_bytes, 210);
  EXPECT_EQ(type_info(DType::IQ4_XS).block_bytes, 136);
  EXPECT_EQ(type_info(DType::IQ4_NL).block_bytes, 18);
  EXPECT_EQ(type_info(DType::IQ4_NL).block_elems, 32);
  EXPECT_EQ(type_info(DType::Q8_K).block_bytes, 292);
  EXPECT_EQ(type_info(DType::Q4_1).block_bytes, 20);
  EXPECT_EQ(type_info(DType::Q5_0).block_bytes, 22);
  EXPECT_EQ(type_info(DType::Q5_1).block_bytes, 24);
  EXPECT_EQ(type_info(DType::Q5_1).block_elems, 32);
  EXPECT_EQ(type_info(uint32_t{3}), &type_info(DType::Q4_1));
  EXPECT_EQ(type_info(DType::Q4_K).block_elems, 256);
  EXPECT_EQ(row_bytes(DType::F32, 10), 40);
  EXPECT_EQ(row_bytes(DType::BF16, 10), 20);
  EXPECT_EQ(row_bytes(DType::Q4_0, 64), 36);
  EXPECT_EQ(row_bytes(DType::Q6_K, 512), 420);
  EXPECT_STREQ(type_name(DType::Q4_K), "q4_K");
  EXPECT_EQ(type_info(DType::Q2_K).block_bytes, 84);
  EXPECT_EQ(type_info(DType::Q3_K).block_bytes, 110);
  EXPECT_EQ(type_info(uint32_t{11}), &type_info(DType::Q3_K));
  EXPECT_EQ(type_info(uint32_t{24}), nullptr);  // GGML's I8: not handled
  // The types read but not written: GGML's block sizes (ggml-common.h).
  for (const auto& [type, elems, bytes] :
       {std::tuple{DType::IQ2_XXS, 256, 66}, std::tuple{DType::IQ2_XS, 256, 74},
        std::tuple{DType::IQ2_S, 256, 82}, std::tuple{DType::IQ3_XXS, 256, 98},
        std::tuple{DType::IQ3_S, 256, 110}, std::tuple{DType::IQ1_S, 256, 50},
        std::tuple{DType::IQ1_M, 256, 56}, std::tuple{DType::TQ1_0, 256, 54},
        std::tuple{DType::TQ2_0, 256, 66}, std::tuple{DType::MXFP4, 32, 17}}) {
    EXPECT_EQ(type_info(static_cast<uint32_t>(type)), &type_info(type));
    EXPECT_EQ(type_info(type).block_elems, elems) << type_name(type);
    EXPECT_EQ(type_info(type).block_bytes, bytes) << type_name(type);
  }
  EXPECT_NE(type_info(uint32_t{30}), nullptr);
  EXPECT_STREQ(status_name(Status::unsupported_type), "unsupported_type");
  EXPECT_STREQ(status_name(Status::ok), "ok");
}

// Round trip error of an RTN quantizer: every element is within half a quantization step of the
// input, where the step is the block's scale.
void expect_round_trip_within_half_step(DType type, int block, float step_per_amax) {
  const int n = block * 9;
  std::vector<float> x = test::random_floats(n, 1234, -2.0f, 2.0f);
  for (int i = 0; i < block; ++i) x[i] = 0.0f;  // an all-zero block must survive too
  std::vector<uint8_t> q(static_cast<size_t>(row_bytes(type, n)));
  std::vector<float> y(n);
  ASSERT_EQ(quantize_row(type, x.data(), q.data(), n), Status::ok);
  ASSERT_EQ(dequantize_row(type, q.data(), y.data(), n), Status::ok);
  for (int b = 0; b < n / block; ++b) {
    float amax = 0.0f;
    for (int i = 0; i < block; ++i) amax = std::fmax(amax, std::fabs(x[b * block + i]));
    // Half a step plus the fp16 rounding of the scale (relative 2^-11 of the largest value).
    const float bound = 0.5f * amax * step_per_amax * (1.0f + 1e-3f) + amax * 1e-3f;
    for (int i = 0; i < block; ++i) EXPECT_NEAR(y[b * block + i], x[b * block + i], bound) << type_name(type);
  }
}

TEST(KernelQuantize, Q8_0RoundTrip) { expect_round_trip_within_half_step(DType::Q8_0, 32, 1.0f / 127); }
TEST(KernelQuantize, Q8_KRoundTrip) { expect_round_trip_within_half_step(DType::Q8_K, 256, 1.0f / 127); }
// Q4_0 maps the largest magnitude to -8, so the positive side is clamped at 7/8 of it: the error
// bound there is one full step (1/8 of amax).
TEST(KernelQuantize, Q4_0RoundTrip) { expect_round_trip_within_half_step(DType::Q4_0, 32, 2.0f / 8); }

// Q4_1 / Q5_1 span [min, max] in 15 / 31 steps (at most 2·amax / 15 or / 31 wide); Q5_0 maps the largest
// magnitude to −16, so the positive side clamps by up to one step of amax / 16.
TEST(KernelQuantize, Q4_1RoundTrip) { expect_round_trip_within_half_step(DType::Q4_1, 32, 2.0f / 15); }
TEST(KernelQuantize, Q5_0RoundTrip) { expect_round_trip_within_half_step(DType::Q5_0, 32, 2.0f / 16); }
TEST(KernelQuantize, Q5_1RoundTrip) { expect_round_trip_within_half_step(DType::Q5_1, 32, 2.0f / 31); }

TEST(KernelQuantize, Q4_0MatchesGgmlRounding) {
  // Block with max-magnitude value -4 => d = 0.5, id = 2: q = min(15, (int)(x*2 + 8.5)).
  std::vector<float> x(32, 0.0f);
  x[0] = -4.0f;
  x[1] = 3.9f;    // 7.8 + 8.5 -> 16 -> clamped to 15
  x[2] = 0.24f;   // 0.48 + 8.5 -> 8
  x[3] = 0.26f;   // 0.52 + 8.5 -> 9
  x[16] = -1.0f;  // -2 + 8.5 -> 6
  BlockQ4_0 block;
  ASSERT_EQ(quantize_row(DType::Q4_0, x.data(), &block, 32), Status::ok);
  EXPECT_EQ(fp16_to_fp32(block.d), 0.5f);
  EXPECT_EQ(block.qs[0] & 0xF, 0);
  EXPECT_EQ(block.qs[1] & 0xF, 15);
  EXPECT_EQ(block.qs[2] & 0xF, 8);
  EXPECT_EQ(block.qs[3] & 0xF, 9);
  EXPECT_EQ(block.qs[0] >> 4, 6);
  EXPECT_EQ(block.qs[1] >> 4, 8);
}

TEST(KernelQuantize, Q8_KBsumsAndScale) {
  std::vector<float> x = test::random_floats(512, 77);
  std::vector<BlockQ8_K> q(2);
  ASSERT_EQ(quantize_row(DType::Q8_K, x.data(), q.data(), 512), Status::ok);
  for (const BlockQ8_K& block : q) {
    for (int g = 0; g < 16; ++g) {
      int sum = 0;
      for (int i = 0; i < 16; ++i) sum += block.qs[g * 16 + i];
      EXPECT_EQ(block.bsums[g], sum);
    }
    int max_abs = 0;
    for (int8_t v : block.qs) max_abs = std::max(max_abs, std::abs(static_cast<int>(v)));
    EXPECT_EQ(max_abs, 127);
  }
}

TEST(KernelQuantize, FloatTypesRoundTrip) {
  const std::vector<float> x = test::random_floats(100, 5);
  std::vector<float> y(100);
  std::vector<uint16_t> half(100);
  ASSERT_EQ(quantize_row(DType::F16, x.data(), half.data(), 100), Status::ok);
  ASSERT_EQ(dequantize_row(DType::F16, half.data(), y.data(), 100), Status::ok);
  for (int i = 0; i < 100; ++i) EXPECT_NEAR(y[i], x[i], std::fabs(x[i]) * 0x1p-11f);
  ASSERT_EQ(quantize_row(DType::BF16, x.data(), half.data(), 100), Status::ok);
  ASSERT_EQ(dequantize_row(DType::BF16, half.data(), y.data(), 100), Status::ok);
  for (int i = 0; i < 100; ++i) EXPECT_NEAR(y[i], x[i], std::fabs(x[i]) * 0x1p-8f);
  std::vector<float> copy(100);
  ASSERT_EQ(quantize_row(DType::F32, x.data(), copy.data(), 100), Status::ok);
  EXPECT_EQ(copy, x);
}

TEST(KernelQuantize, InvalidArguments) {
  std::vector<float> x(64);
  std::vector<uint8_t> out(1024);
  EXPECT_EQ(quantize_row(DType::Q4_0, x.data(), out.data(), 33), Status::invalid_argument);
  EXPECT_EQ(quantize_row(DType::Q4_0, nullptr, out.data(), 32), Status::invalid_argument);
  EXPECT_EQ(quantize_row(DType::Q8_0, x.data(), nullptr, 32), Status::invalid_argument);
  EXPECT_EQ(quantize_row(DType::Q8_0, x.data(), out.data(), -32), Status::invalid_argument);
  EXPECT_EQ(quantize_row(DType::Q6_K, x.data(), out.data(), 64), Status::invalid_argument);
  EXPECT_EQ(quantize_row(DType::Q4_K, x.data(), out.data(), 64), Status::invalid_argument);
  EXPECT_EQ(quantize_row(DType::Q5_K, x.data(), out.data(), 64), Status::invalid_argument);
  EXPECT_EQ(quantize_row(static_cast<DType>(99), x.data(), out.data(), 32), Status::unsupported_type);
  EXPECT_EQ(quantize_row(DType::IQ4_XS, x.data(), out.data(), 64),
            Status::invalid_argument);  // blocks of 256
  EXPECT_EQ(dequantize_row(DType::Q6_K, out.data(), x.data(), 64), Status::invalid_argument);
  EXPECT_EQ(quantize_row(DType::Q2_K, x.data(), out.data(), 64), Status::invalid_argument);
  EXPECT_EQ(quantize_row(DType::Q3_K, x.data(), out.data(), 64), Status::invalid_argument);
  EXPECT_EQ(dequantize_row(static_cast<DType>(24), out.data(), x.data(), 32),
            Status::unsupported_type);  // I8
  EXPECT_EQ(dequantize_row(DType::IQ2_XXS, out.data(), x.data(), 32),
            Status::invalid_argument);  // blocks of 256
}

// Q4_K, packed by hand from the format definition: 8 sub-blocks of 32 with 6-bit scale sc[j] and
// min mn[j]; bytes 0-3 = sc[0..3] | (sc[4..7] >> 4) << 6, bytes 4-7 = mn[0..3] | (mn[4..7] >> 4) << 6,
// bytes 8-11 = (sc[4..7] & 15) | (mn[4..7] & 15) << 4. Element e = 64p + h·32 + l is nibble h of
// qs[32p + l]; its value is d·sc[e/32]·q − dmin·mn[e/32].
TEST(KernelQuantize, DequantizeHandBuiltQ4_K) {
  const int sc[8] = {1, 63, 17, 32, 5, 48, 60, 33};
  const int mn[8] = {0, 7, 63, 20, 45, 16, 1, 62};
  BlockQ4_K block{};
  block.d = fp32_to_fp16(0.25f);
  block.dmin = fp32_to_fp16(0.125f);
  for (int j = 0; j < 4; ++j) {
    block.scales[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    block.scales[j + 4] = static_cast<uint8_t>(mn[j] | ((mn[j + 4] >> 4) << 6));
    block.scales[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
  }
  for (int i = 0; i < 128; ++i) block.qs[i] = static_cast<uint8_t>((i * 37 + 11) & 0xFF);
  std::vector<float> y(256);
  ASSERT_EQ(dequantize_row(DType::Q4_K, &block, y.data(), 256), Status::ok);
  for (int e = 0; e < 256; ++e) {
    const int p = e / 64, h = (e % 64) / 32, l = e % 32;
    const int q = (block.qs[32 * p + l] >> (4 * h)) & 15;
    const float expected = 0.25f * sc[e / 32] * q - 0.125f * mn[e / 32];
    EXPECT_FLOAT_EQ(y[e], expected) << "element " << e;
  }
}

// Q4_K quantization (llama.cpp's reference): 4-bit error on random rows, and re-quantizing the
// dequantized values gives back the same values (the fitted grid is a fixed point).
TEST(KernelQuantize, Q4_KRoundTrip) {
  std::vector<float> x(512);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * (1.0f + (i % 7));
  std::vector<uint8_t> q(static_cast<size_t>(row_bytes(DType::Q4_K, 512)));
  ASSERT_EQ(quantize_row(DType::Q4_K, x.data(), q.data(), 512), Status::ok);
  std::vector<float> y(512), y2(512);
  ASSERT_EQ(dequantize_row(DType::Q4_K, q.data(), y.data(), 512), Status::ok);
  double err = 0, norm = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    err += (y[i] - x[i]) * (y[i] - x[i]);
    norm += x[i] * x[i];
  }
  EXPECT_LT(std::sqrt(err / norm), 0.08);
  ASSERT_EQ(quantize_row(DType::Q4_K, y.data(), q.data(), 512), Status::ok);
  ASSERT_EQ(dequantize_row(DType::Q4_K, q.data(), y2.data(), 512), Status::ok);
  for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y2[i], y[i], 1e-3f * (1.0f + std::fabs(y[i]))) << i;
}

// Q5_K, packed by hand: Q4_K's scales, mins and nibbles (see above), plus a fifth bit per element:
// element l of sub-block s (e = 32s + l) has bit s of qh[l] as its bit 4, so q = nibble + 16·bit.
TEST(KernelQuantize, DequantizeHandBuiltQ5_K) {
  const int sc[8] = {63, 2, 40, 31, 16, 1, 59, 8};
  const int mn[8] = {5, 63, 0, 33, 12, 50, 27, 3};
  int u[256];
  for (int e = 0; e < 256; ++e) u[e] = (e * 13 + 7) % 32;
  BlockQ5_K block{};
  block.d = fp32_to_fp16(0.5f);
  block.dmin = fp32_to_fp16(0.0625f);
  for (int j = 0; j < 4; ++j) {
    block.scales[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    block.scales[j + 4] = static_cast<uint8_t>(mn[j] | ((mn[j + 4] >> 4) << 6));
    block.scales[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
  }
  for (int e = 0; e < 256; ++e) {
    const int p = e / 64, h = (e % 64) / 32, l = e % 32;
    block.qs[32 * p + l] = static_cast<uint8_t>(block.qs[32 * p + l] | ((u[e] & 15) << (4 * h)));
    block.qh[l] = static_cast<uint8_t>(block.qh[l] | ((u[e] >> 4) << (e / 32)));
  }
  std::vector<float> y(256);
  ASSERT_EQ(dequantize_row(DType::Q5_K, &block, y.data(), 256), Status::ok);
  for (int e = 0; e < 256; ++e) {
    const float expected = 0.5f * sc[e / 32] * u[e] - 0.0625f * mn[e / 32];
    EXPECT_FLOAT_EQ(y[e], expected) << "element " << e;
  }
}

// Q5_K quantization (llama.cpp's quantize_row_q5_K_ref): between Q4_K's and Q6_K's error on random
// rows, a zero super-block stays zero, and re-quantizing the dequantized values gives them back.
TEST(KernelQuantize, Q5_KRoundTrip) {
  std::vector<float> x(768);
  for (size_t i = 256; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * (1.0f + (i % 7));
  auto rel_error = [&](DType type, std::vector<float>& y) { return round_trip_error(type, x, y); };
  std::vector<float> y(768), y4(768), y6(768), y2(768);
  const double e5 = rel_error(DType::Q5_K, y);
  EXPECT_LT(e5, 0.6 * rel_error(DType::Q4_K, y4));
  EXPECT_GT(e5, rel_error(DType::Q6_K, y6));
  for (int i = 0; i < 256; ++i) EXPECT_EQ(y[static_cast<size_t>(i)], 0.0f);
  std::vector<uint8_t> q(static_cast<size_t>(row_bytes(DType::Q5_K, 768)));
  ASSERT_EQ(quantize_row(DType::Q5_K, y.data(), q.data(), 768), Status::ok);
  ASSERT_EQ(dequantize_row(DType::Q5_K, q.data(), y2.data(), 768), Status::ok);
  for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y2[i], y[i], 1e-3f * (1.0f + std::fabs(y[i]))) << i;
}

// IQ4_XS, packed by hand: sub-block s (elements 32s..32s+31) has the 6-bit scale ls[s] stored as
// its low 4 bits in nibble s % 2 of scales_l[s / 2] and its high 2 bits at bits 2s of scales_h;
// qs[16s + j] indexes element 32s + j (low nibble) and 32s + 16 + j (high) into llama.cpp's
// kvalues_iq4nl; the value is d · (ls[s] − 32) · kvalues[index].
TEST(KernelQuantize, DequantizeHandBuiltIQ4_XS) {
  const int8_t kvalues[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
  const int ls[8] = {0, 63, 32, 17, 48, 5, 31, 40};
  int index[256];
  for (int e = 0; e < 256; ++e) index[e] = (e * 7 + 3) % 16;
  BlockIQ4_XS block{};
  block.d = fp32_to_fp16(0.125f);
  for (int s = 0; s < 8; ++s) {
    block.scales_l[s / 2] = static_cast<uint8_t>(block.scales_l[s / 2] | ((ls[s] & 15) << (4 * (s % 2))));
    block.scales_h = static_cast<uint16_t>(block.scales_h | ((ls[s] >> 4) << (2 * s)));
    for (int j = 0; j < 16; ++j)
      block.qs[16 * s + j] = static_cast<uint8_t>(index[32 * s + j] | (index[32 * s + 16 + j] << 4));
  }
  std::vector<float> y(256);
  ASSERT_EQ(dequantize_row(DType::IQ4_XS, &block, y.data(), 256), Status::ok);
  for (int e = 0; e < 256; ++e) {
    const float expected = 0.125f * static_cast<float>(ls[e / 32] - 32) * kvalues[index[e]];
    EXPECT_FLOAT_EQ(y[e], expected) << "element " << e;
  }
}

// IQ4_NL, packed by hand: Q4_0's block (element j in the low nibble of qs[j], j + 16 in the high), the
// nibble indexing kvalues_iq4nl: the value is d · kvalues[index].
TEST(KernelQuantize, DequantizeHandBuiltIQ4_NL) {
  const int8_t kvalues[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
  BlockIQ4_NL blocks[2]{};
  int index[64];
  for (int e = 0; e < 64; ++e) index[e] = (e * 5 + 1) % 16;
  for (int b = 0; b < 2; ++b) {
    blocks[b].d = fp32_to_fp16(b == 0 ? 0.25f : -0.5f);
    for (int j = 0; j < 16; ++j)
      blocks[b].qs[j] = static_cast<uint8_t>(index[32 * b + j] | (index[32 * b + 16 + j] << 4));
  }
  std::vector<float> y(64);
  ASSERT_EQ(dequantize_row(DType::IQ4_NL, blocks, y.data(), 64), Status::ok);
  for (int e = 0; e < 64; ++e)
    EXPECT_FLOAT_EQ(y[e], (e < 32 ? 0.25f : -0.5f) * kvalues[index[e]]) << "element " << e;
}

// Q4_1, Q5_0 and Q5_1, packed by hand from the format definition: level j (0..15 or 0..31) has its low 4
// bits in the low nibble of qs[j] (j < 16) or the high nibble of qs[j − 16], its fifth bit in bit j of
// the little-endian 32-bit qh; the weight is d · level + m (Q4_1, Q5_1) or d · (level − 16) (Q5_0).
TEST(KernelQuantize, DequantizeHandBuiltQ4_1Q5_0Q5_1) {
  int level[64];
  for (int e = 0; e < 64; ++e) level[e] = (e * 7 + 3) % 32;
  const float d[2] = {0.25f, -0.5f};
  const float m[2] = {-1.5f, 2.0f};
  auto pack_low = [&](int b, uint8_t* qs) {
    for (int j = 0; j < 16; ++j)
      qs[j] = static_cast<uint8_t>((level[32 * b + j] & 0xF) | ((level[32 * b + 16 + j] & 0xF) << 4));
  };
  auto pack_high = [&](int b, uint8_t* qh) {
    uint32_t bits = 0;
    for (int j = 0; j < 32; ++j) bits |= static_cast<uint32_t>(level[32 * b + j] >> 4) << j;
    for (int i = 0; i < 4; ++i) qh[i] = static_cast<uint8_t>(bits >> (8 * i));
  };
  BlockQ4_1 q4_1[2]{};
  BlockQ5_0 q5_0[2]{};
  BlockQ5_1 q5_1[2]{};
  for (int b = 0; b < 2; ++b) {
    q4_1[b].d = q5_0[b].d = q5_1[b].d = fp32_to_fp16(d[b]);
    q4_1[b].m = q5_1[b].m = fp32_to_fp16(m[b]);
    pack_low(b, q4_1[b].qs);
    pack_low(b, q5_0[b].qs);
    pack_low(b, q5_1[b].qs);
    pack_high(b, q5_0[b].qh);
    pack_high(b, q5_1[b].qh);
  }
  std::vector<float> y4_1(64), y5_0(64), y5_1(64);
  ASSERT_EQ(dequantize_row(DType::Q4_1, q4_1, y4_1.data(), 64), Status::ok);
  ASSERT_EQ(dequantize_row(DType::Q5_0, q5_0, y5_0.data(), 64), Status::ok);
  ASSERT_EQ(dequantize_row(DType::Q5_1, q5_1, y5_1.data(), 64), Status::ok);
  for (int e = 0; e < 64; ++e) {
    SCOPED_TRACE("element " + std::to_string(e));
    const int b = e / 32;
    EXPECT_FLOAT_EQ(y4_1[e], d[b] * static_cast<float>(level[e] & 0xF) + m[b]);
    EXPECT_FLOAT_EQ(y5_0[e], d[b] * static_cast<float>(level[e] - 16));
    EXPECT_FLOAT_EQ(y5_1[e], d[b] * static_cast<float>(level[e]) + m[b]);
  }
}

// llama.cpp's rounding rules on a hand-picked block. Q5_0: max-magnitude value −8 gives d = 0.5 and
// level = min(31, (int8)(x / d + 16.5)). Q4_1: min −1, max 2 gives d = 0.2, level = (int8)((x + 1) / 0.2 +
// 0.5).
TEST(KernelQuantize, Q5_0AndQ4_1MatchGgmlRounding) {
  std::vector<float> x(32, 0.0f);
  x[0] = -8.0f;   // level 0
  x[1] = 7.9f;    // 15.8 + 16.5 -> 32 -> clamped to 31
  x[2] = 0.24f;   // 0.48 + 16.5 -> 16
  x[17] = 0.26f;  // 0.52 + 16.5 -> 17 (a high-nibble element)
  BlockQ5_0 q5;
  ASSERT_EQ(quantize_row(DType::Q5_0, x.data(), &q5, 32), Status::ok);
  EXPECT_EQ(fp16_to_fp32(q5.d), 0.5f);
  const uint32_t high = q5_high_bits(q5.qh);
  auto q5_level = [&](int j) {
    return (j < 16 ? q5.qs[j] & 0xF : q5.qs[j - 16] >> 4) | static_cast<int>(((high >> j) & 1) << 4);
  };
  EXPECT_EQ(q5_level(0), 0);
  EXPECT_EQ(q5_level(1), 31);
  EXPECT_EQ(q5_level(2), 16);
  EXPECT_EQ(q5_level(17), 17);
  EXPECT_EQ(q5_level(5), 16);

  std::vector<float> y(32, 0.55f);
  y[3] = -1.0f;
  y[4] = 2.0f;
  y[20] = 0.09f;  // 1.09 / 0.2 + 0.5 = 5.95 -> 5
  BlockQ4_1 q4;
  ASSERT_EQ(quantize_row(DType::Q4_1, y.data(), &q4, 32), Status::ok);
  EXPECT_EQ(fp16_to_fp32(q4.m), -1.0f);
  EXPECT_NEAR(fp16_to_fp32(q4.d), 0.2f, 1e-4f);
  EXPECT_EQ(q4.qs[3] & 0xF, 0);
  EXPECT_EQ(q4.qs[4] & 0xF, 15);
  EXPECT_EQ(q4.qs[4] >> 4, 5);
  EXPECT_EQ(q4.qs[0] & 0xF, 8);  // 1.55 / 0.2 + 0.5 = 8.25 -> 8
}

// Q6_K quantization (llama.cpp's quantize_row_q6_K_ref): 6-bit error on random rows, four times
// finer than Q4_K's, an all-zero super-block stays zero, and re-quantizing the dequantized values
// gives back the same values.
TEST(KernelQuantize, Q6_KRoundTrip) {
  std::vector<float> x(768);
  for (size_t i = 256; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * (1.0f + (i % 7));
  auto rel_error = [&](DType type, std::vector<float>& y) { return round_trip_error(type, x, y); };
  std::vector<float> y(768), y4(768), y2(768);
  const double e6 = rel_error(DType::Q6_K, y);
  EXPECT_LT(e6, 0.02);
  EXPECT_LT(e6, 0.3 * rel_error(DType::Q4_K, y4));
  for (int i = 0; i < 256; ++i) EXPECT_EQ(y[static_cast<size_t>(i)], 0.0f);
  std::vector<uint8_t> q(static_cast<size_t>(row_bytes(DType::Q6_K, 768)));
  ASSERT_EQ(quantize_row(DType::Q6_K, y.data(), q.data(), 768), Status::ok);
  ASSERT_EQ(dequantize_row(DType::Q6_K, q.data(), y2.data(), 768), Status::ok);
  for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y2[i], y[i], 1e-3f * (1.0f + std::fabs(y[i]))) << i;
}

// Q6_K, packed by hand: value u[e] in 0..63 (signed value u − 32); in half h (128 elements) and
// l < 32: ql[64h+l] = u[l] & 15 | (u[l+64] & 15) << 4, ql[64h+32+l] = u[l+32] & 15 | (u[l+96] & 15) << 4,
// qh[32h+l] packs the top two bits of u[l], u[l+32], u[l+64], u[l+96] at bits 0, 2, 4, 6.
// Element e has scale scales[e/16].
TEST(KernelQuantize, DequantizeHandBuiltQ6_K) {
  int u[256];
  for (int e = 0; e < 256; ++e) u[e] = (e * 29 + 3) % 64;
  BlockQ6_K block{};
  for (int h = 0; h < 2; ++h) {
    const int* v = u + 128 * h;
    for (int l = 0; l < 32; ++l) {
      block.ql[64 * h + l] = static_cast<uint8_t>((v[l] & 15) | ((v[l + 64] & 15) << 4));
      block.ql[64 * h + 32 + l] = static_cast<uint8_t>((v[l + 32] & 15) | ((v[l + 96] & 15) << 4));
      block.qh[32 * h + l] = static_cast<uint8_t>((v[l] >> 4) | ((v[l + 32] >> 4) << 2) |
                                                  ((v[l + 64] >> 4) << 4) | ((v[l + 96] >> 4) << 6));
    }
  }
  for (int g = 0; g < 16; ++g) block.scales[g] = static_cast<int8_t>(g * 17 - 128);
  block.d = fp32_to_fp16(0.0625f);
  std::vector<float> y(256);
  ASSERT_EQ(dequantize_row(DType::Q6_K, &block, y.data(), 256), Status::ok);
  for (int e = 0; e < 256; ++e) {
    const float expected = 0.0625f * block.scales[e / 16] * (u[e] - 32);
    EXPECT_FLOAT_EQ(y[e], expected) << "element " << e;
  }
}

// Q2_K, packed by hand: u[e] in 0..3; element e = 128h + 32j + l (h = 0, 1; j = 0..3; l = 0..31) in
// bits 2j, 2j + 1 of qs[32h + l]; sub-block g = e / 16 has scale scales[g] & 15 and min scales[g] >> 4;
// the value is d · scale · u − dmin · min.
TEST(KernelQuantize, DequantizeHandBuiltQ2_K) {
  int u[256];
  for (int e = 0; e < 256; ++e) u[e] = (e * 7 + e / 5) % 4;
  BlockQ2_K block{};
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, j = (e % 128) / 32, l = e % 32;
    block.qs[32 * h + l] = static_cast<uint8_t>(block.qs[32 * h + l] | (u[e] << (2 * j)));
  }
  for (int g = 0; g < 16; ++g)
    block.scales[g] = static_cast<uint8_t>(((g * 5 + 3) % 16) | (((g * 11) % 16) << 4));
  block.d = fp32_to_fp16(0.5f);
  block.dmin = fp32_to_fp16(0.125f);
  std::vector<float> y(256);
  ASSERT_EQ(dequantize_row(DType::Q2_K, &block, y.data(), 256), Status::ok);
  for (int e = 0; e < 256; ++e) {
    const int g = e / 16;
    const float expected = 0.5f * ((g * 5 + 3) % 16) * u[e] - 0.125f * ((g * 11) % 16);
    EXPECT_FLOAT_EQ(y[e], expected) << "element " << e;
  }
}

// Q3_K, packed by hand: v[e] in −4..3 stored as u = v + 4 (0..7): the low 2 bits as Q2_K's qs, the third
// in bit e / 32 of hmask[e % 32]; sub-block g's 6-bit scale s[g] (stored + 32) has its low 4 bits in the
// low (g < 8) or high nibble of scales[g % 8] and its top 2 bits at bits 2 (g / 4) of scales[8 + g % 4];
// the value is d · s[g] · v.
TEST(KernelQuantize, DequantizeHandBuiltQ3_K) {
  int v[256];
  for (int e = 0; e < 256; ++e) v[e] = (e * 5 + e / 3) % 8 - 4;
  int s[16];
  for (int g = 0; g < 16; ++g) s[g] = (g * 23 + 9) % 64 - 32;
  BlockQ3_K block{};
  for (int e = 0; e < 256; ++e) {
    const int u = v[e] + 4;
    const int h = e / 128, j = (e % 128) / 32, l = e % 32;
    block.qs[32 * h + l] = static_cast<uint8_t>(block.qs[32 * h + l] | ((u & 3) << (2 * j)));
    block.hmask[l] = static_cast<uint8_t>(block.hmask[l] | ((u >> 2) << (e / 32)));
  }
  for (int g = 0; g < 16; ++g) {
    const int stored = s[g] + 32;
    block.scales[g % 8] = static_cast<uint8_t>(block.scales[g % 8] | ((stored & 15) << (g < 8 ? 0 : 4)));
    block.scales[8 + g % 4] =
        static_cast<uint8_t>(block.scales[8 + g % 4] | ((stored >> 4) << (2 * (g / 4))));
  }
  block.d = fp32_to_fp16(0.25f);
  std::vector<float> y(256);
  ASSERT_EQ(dequantize_row(DType::Q3_K, &block, y.data(), 256), Status::ok);
  for (int e = 0; e < 256; ++e) {
    const float expected = 0.25f * s[e / 16] * v[e];
    EXPECT_FLOAT_EQ(y[e], expected) << "element " << e;
  }
}

// Q2_K and Q3_K quantization (llama.cpp's quantize_row_q2_K_ref / q3_K_ref; their exact bytes are checked
// in test_ggml_quantize_reference): the error on random rows is ordered 2 bits > 3 bits > Q4_K's, and an
// all-zero super-block stays zero. (Unlike Q4_K's, their fits are not fixed points: re-quantizing the
// dequantized values can move them.)
TEST(KernelQuantize, Q2_KAndQ3_KRoundTrip) {
  std::vector<float> x(768);
  for (size_t i = 256; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * (1.0f + (i % 7));
  std::vector<float> y2(768), y3(768), y4(768);
  const double e2 = round_trip_error(DType::Q2_K, x, y2);
  const double e3 = round_trip_error(DType::Q3_K, x, y3);
  const double e4 = round_trip_error(DType::Q4_K, x, y4);
  EXPECT_GT(e2, 1.3 * e3);
  EXPECT_GT(e3, 1.3 * e4);
  EXPECT_LT(e2, 0.35);
  for (int i = 0; i < 256; ++i) {
    EXPECT_EQ(y2[static_cast<size_t>(i)], 0.0f);
    EXPECT_EQ(y3[static_cast<size_t>(i)], 0.0f);
  }
}

}  // namespace
}  // namespace nibble::kernels
