// kernels/activation_q8: activations rounded to 8 bits per 32 inputs (llama.cpp's Q8_0 rule, the scale
// in fp32), and the W4A8 product's CPU reference (the CUDA W4A8 GEMV's reference). Known values and
// ties, zero blocks, the rounding bound on random inputs, and the integer-sum formulation of the
// reference against the plain sum of dequantized weights times dequantized activations.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/activation_q8.hpp"
#include "kernels/int4_groups.hpp"
#include "kernels/quant_types.hpp"

namespace nibble::kernels {
namespace {

TEST(ActivationQ8, KnownValuesTiesAndZeroBlocks) {
  std::vector<f16_bits> x(64, fp32_to_fp16(0.0f));
  x[0] = fp32_to_fp16(-2.0f);
  x[1] = fp32_to_fp16(1.0f);   // 63.5: ties away from zero -> 64
  x[2] = fp32_to_fp16(0.5f);   // 31.75 -> 32
  x[3] = fp32_to_fp16(-1.0f);  // -63.5 -> -64
  std::vector<int8_t> q(64);
  std::vector<float> d(2);
  quantize_activations_q8(x.data(), 64, q.data(), d.data());
  EXPECT_EQ(d[0], 2.0f / 127.0f);
  EXPECT_EQ(q[0], -127);
  EXPECT_EQ(q[1], 64);
  EXPECT_EQ(q[2], 32);
  EXPECT_EQ(q[3], -64);
  for (int i = 4; i < 32; ++i) EXPECT_EQ(q[i], 0);
  EXPECT_EQ(d[1], 0.0f);  // an all-zero block
  for (int i = 32; i < 64; ++i) EXPECT_EQ(q[i], 0);
}

TEST(ActivationQ8, EachValueWithinHalfAStepOfItsBlock) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const int64_t k = 32 * 41;
  std::vector<f16_bits> x(static_cast<size_t>(k));
  for (auto& v : x) v = fp32_to_fp16(normal(rng));
  std::vector<int8_t> q(static_cast<size_t>(k));
  std::vector<float> d(static_cast<size_t>(k / 32));
  quantize_activations_q8(x.data(), k, q.data(), d.data());
  for (int64_t b = 0; b < k / 32; ++b) {
    float amax = 0.0f;
    for (int64_t i = 0; i < 32; ++i) amax = std::fmax(amax, std::fabs(fp16_to_fp32(x[b * 32 + i])));
    EXPECT_EQ(d[b], amax / 127.0f);
    for (int64_t i = 0; i < 32; ++i) {
      const float xv = fp16_to_fp32(x[b * 32 + i]);
      EXPECT_LE(std::fabs(xv - d[b] * q[b * 32 + i]), 0.5001f * d[b]) << "block " << b << " input " << i;
    }
  }
}

// The reference's sum over runs of d_x * s * (dot - z * sum) is the sum over inputs of the dequantized
// weight (kernels::dequantize_int4_groups) times the dequantized activation d_x * q: the nibble order
// and the group of each run are the int4_groups layout's.
TEST(ActivationQ8, ReferenceIsTheDequantizedProduct) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> byte(0, 255), zero(0, 15);
  std::uniform_real_distribution<float> scale(-0.1f, 0.1f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}}) {
    const int64_t n_out = 7, k = 384, m = 3, groups = k / group;
    std::vector<uint8_t> quants(static_cast<size_t>(n_out * k / 2)),
        zeros(static_cast<size_t>(n_out * groups));
    std::vector<f16_bits> scales(zeros.size()), x(static_cast<size_t>(m * k));
    for (auto& v : quants) v = static_cast<uint8_t>(byte(rng));
    for (auto& v : zeros) v = static_cast<uint8_t>(zero(rng));
    for (auto& v : scales) v = fp32_to_fp16(scale(rng));
    for (auto& v : x) v = fp32_to_fp16(normal(rng));
    std::vector<float> w(static_cast<size_t>(n_out * k)), y(static_cast<size_t>(m * n_out));
    ASSERT_EQ(dequantize_int4_groups(quants.data(), scales.data(), zeros.data(), n_out, k, group, w.data()),
              Status::ok);
    ASSERT_EQ(w4a8_gemv_int4_groups_reference(quants.data(), scales.data(), zeros.data(), group, n_out, k,
                                              x.data(), m, y.data()),
              Status::ok);
    std::vector<int8_t> q(static_cast<size_t>(k));
    std::vector<float> d(static_cast<size_t>(k / 32));
    for (int64_t r = 0; r < m; ++r) {
      quantize_activations_q8(x.data() + r * k, k, q.data(), d.data());
      for (int64_t o = 0; o < n_out; ++o) {
        double want = 0.0, magnitude = 0.0;
        for (int64_t j = 0; j < k; ++j) {
          const double term = static_cast<double>(w[static_cast<size_t>(o * k + j)]) * d[j / 32] * q[j];
          want += term;
          magnitude += std::fabs(term);
        }
        EXPECT_NEAR(y[static_cast<size_t>(r * n_out + o)], want, 1e-6 * magnitude + 1e-30)
            << "group " << group << " row " << r << " output " << o;
      }
    }
  }
  std::vector<uint8_t> b(64);
  std::vector<f16_bits> s(8);
  std::vector<float> y(4);
  EXPECT_EQ(w4a8_gemv_int4_groups_reference(b.data(), s.data(), b.data(), 48, 1, 96, s.data(), 1, y.data()),
            Status::invalid_argument);
  EXPECT_EQ(w4a8_gemv_int4_groups_reference(nullptr, s.data(), b.data(), 32, 1, 32, s.data(), 1, y.data()),
            Status::invalid_argument);
  EXPECT_EQ(w4a8_gemv_q4_k_reference(b.data(), 1, 300, s.data(), 1, y.data()),
            Status::invalid_argument);  // k
  EXPECT_EQ(w4a8_gemv_q4_k_reference(nullptr, 1, 256, s.data(), 1, y.data()), Status::invalid_argument);
}

}  // namespace
}  // namespace nibble::kernels
