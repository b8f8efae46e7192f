// kernels::fill_random_q4_0: deterministic, seed-dependent, only nibbles 1..15, and weights with
// mean 0 and standard deviation 1/sqrt(k); bad shapes rejected.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/quant_types.hpp"
#include "kernels/random_weights.hpp"

namespace k = nibble::kernels;

namespace {

std::vector<uint8_t> make(int64_t n_out, int64_t kk, uint64_t seed) {
  std::vector<uint8_t> out(static_cast<size_t>(n_out * (kk / 32) * 18), 0xAA);
  EXPECT_EQ(k::fill_random_q4_0(out.data(), n_out, kk, seed), k::Status::ok);
  return out;
}

TEST(RandomWeights, DeterministicAndSeedDependent) {
  const auto a = make(37, 96, 5), b = make(37, 96, 5), c = make(37, 96, 6);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  // Blocks depend on their index only: a matrix of more rows starts with the smaller one's bytes,
  // so a slice of a stacked matrix can be generated alone.
  const auto longer = make(40, 96, 5);
  EXPECT_TRUE(std::equal(a.begin(), a.end(), longer.begin()));
  // Different seeds share almost no bytes (random bytes agree 1/256 of the time; nibbles 1/15).
  int same = 0;
  for (size_t i = 0; i < a.size(); ++i) same += a[i] == c[i];
  EXPECT_LT(same, static_cast<int>(a.size() / 8));
}

TEST(RandomWeights, NibblesInOneToFifteenWithMeanZeroAndStdOneOverSqrtK) {
  const int64_t n_out = 512, kk = 4096;  // 2M weights
  const auto blocks = make(n_out, kk, 11);
  const auto* b = reinterpret_cast<const k::BlockQ4_0*>(blocks.data());
  const int64_t n_blocks = n_out * kk / 32;
  const k::f16_bits d = k::random_q4_0_scale(kk);
  std::vector<int64_t> count(16, 0);
  double sum = 0.0, sq = 0.0;
  for (int64_t i = 0; i < n_blocks; ++i) {
    ASSERT_EQ(b[i].d, d);  // one scale for the whole matrix
    const double scale = k::fp16_to_fp32(b[i].d);
    for (int j = 0; j < 16; ++j) {
      for (const int q : {b[i].qs[j] & 0xF, b[i].qs[j] >> 4}) {
        ++count[static_cast<size_t>(q)];
        const double w = scale * (q - 8);
        sum += w;
        sq += w * w;
      }
    }
  }
  EXPECT_EQ(count[0], 0);  // -8 never occurs: the values are symmetric around 0
  const double n = static_cast<double>(n_out * kk);
  for (int q = 1; q < 16; ++q) {
    // Each of the 15 values ~ n / 15 = 139810, binomial sd ~360: within 5 sd.
    EXPECT_NEAR(static_cast<double>(count[static_cast<size_t>(q)]), n / 15, 1800) << "q " << q;
  }
  const double mean = sum / n, sd = std::sqrt(sq / n - mean * mean);
  const double target = 1.0 / std::sqrt(static_cast<double>(kk));  // 0.015625
  // The sample mean's sd is target / sqrt(n) = 1.1e-5: within 5 sd.
  EXPECT_NEAR(mean, 0.0, 5.5e-5);
  // fp16 rounding of the scale moves sd by at most 2^-11 relative; sampling by ~0.05%.
  EXPECT_NEAR(sd / target, 1.0, 2e-3);
}

TEST(RandomWeights, RejectsBadShapes) {
  std::vector<uint8_t> out(18 * 4);
  EXPECT_EQ(k::fill_random_q4_0(out.data(), 1, 48, 1), k::Status::invalid_argument);  // not a multiple of 32
  EXPECT_EQ(k::fill_random_q4_0(out.data(), 1, 0, 1), k::Status::invalid_argument);
  EXPECT_EQ(k::fill_random_q4_0(out.data(), -1, 32, 1), k::Status::invalid_argument);
  EXPECT_EQ(k::fill_random_q4_0(nullptr, 1, 32, 1), k::Status::invalid_argument);
  EXPECT_EQ(k::fill_random_q4_0(nullptr, 0, 32, 1), k::Status::ok);  // nothing to write
}

TEST(RandomWeights, UniformFloatsInRange) {
  std::vector<float> v(10000);
  ASSERT_EQ(k::fill_random_uniform(v.data(), static_cast<int64_t>(v.size()), 0.9f, 1.1f, 3), k::Status::ok);
  double sum = 0.0;
  for (const float x : v) {
    EXPECT_GE(x, 0.9f);
    EXPECT_LE(x, 1.1f);
    sum += x;
  }
  EXPECT_NEAR(sum / static_cast<double>(v.size()), 1.0, 0.005);  // sd of the mean 0.0006
  std::vector<float> again(v.size());
  ASSERT_EQ(k::fill_random_uniform(again.data(), static_cast<int64_t>(again.size()), 0.9f, 1.1f, 3),
            k::Status::ok);
  EXPECT_EQ(v, again);
}

}  // namespace
