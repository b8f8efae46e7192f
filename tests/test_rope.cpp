// RoPE on the CPU (kernels/rope) and its scalings: plain and scaled rotations against a double-precision
// rotation on random heads of odd counts and sizes; the identities llama.cpp's scaled RoPE obeys, bit for
// bit (a linear factor F at position F p is plain RoPE at p; a frequency factor F on a pair likewise);
// refusals; YaRN's range, magnitude and mixed angles; and Llama 3.1's frequency factors (model/llama_config)
// as convert_hf_to_gguf.py defines them.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <numbers>
#include <stdexcept>
#include <utility>
#include <vector>

#include "kernels/rope.hpp"
#include "model/llama_config.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::kernels {
namespace {

struct Heads {
  int64_t tokens, n_heads, head_dim, rot_dims;
};

// x rotated in double precision by the angles rope_angle gives, times the scaling's magnitude (so only
// the rotation is checked here; the angles are checked against their formula below).
std::vector<float> rotated_reference(const std::vector<float>& x, const std::vector<int32_t>& pos,
                                     const Heads& h, float base, const RopeScaling& scaling) {
  std::vector<float> out = x;
  const float theta_scale = rope_theta_scale(base, h.rot_dims);
  for (int64_t t = 0; t < h.tokens; ++t) {
    for (int64_t head = 0; head < h.n_heads; ++head) {
      float* v = out.data() + (t * h.n_heads + head) * h.head_dim;
      for (int64_t i = 0; i < h.rot_dims / 2; ++i) {
        const double a = rope_angle(pos[static_cast<size_t>(t)], i, theta_scale, scaling);
        const double x0 = v[2 * i], x1 = v[2 * i + 1];
        const double m = scaling.mscale;
        v[2 * i] = static_cast<float>((x0 * std::cos(a) - x1 * std::sin(a)) * m);
        v[2 * i + 1] = static_cast<float>((x0 * std::sin(a) + x1 * std::cos(a)) * m);
      }
    }
  }
  return out;
}

std::vector<int32_t> random_positions(int64_t n, uint64_t seed) {
  const std::vector<float> u = test::random_floats(static_cast<size_t>(n), seed, 0.0f, 5000.0f);
  std::vector<int32_t> pos(u.size());
  for (size_t i = 0; i < u.size(); ++i) pos[i] = static_cast<int32_t>(u[i]);
  return pos;
}

TEST(Rope, RotatesEachPairByItsScaledAngle) {
  const Heads shapes[] = {{1, 1, 2, 2}, {3, 5, 10, 10}, {7, 3, 34, 18}, {5, 2, 128, 128}, {2, 7, 66, 64}};
  uint64_t seed = 1;
  for (const Heads& h : shapes) {
    for (int variant = 0; variant < 4; ++variant) {  // plain, linear, linear + factors, YaRN + factors
      SCOPED_TRACE("heads " + std::to_string(h.n_heads) + " x " + std::to_string(h.head_dim) + ", rot " +
                   std::to_string(h.rot_dims) + ", variant " + std::to_string(variant));
      const std::vector<float> factors =
          test::random_floats(static_cast<size_t>(h.rot_dims / 2), seed++, 1.0f, 8.0f);
      RopeScaling scaling;
      if (variant >= 1) scaling.freq_scale = 0.25f;
      if (variant == 2) scaling.freq_factors = factors.data();
      if (variant == 3) scaling = rope_yarn_scaling(0.25f, factors.data(), h.rot_dims, 48, 10000.0f);
      const std::vector<float> x =
          test::random_floats(static_cast<size_t>(h.tokens * h.n_heads * h.head_dim), seed++, -2.0f, 2.0f);
      const std::vector<int32_t> pos = random_positions(h.tokens, seed++);
      std::vector<float> got = x;
      ASSERT_EQ(
          rope_normal(got.data(), pos.data(), h.tokens, h.n_heads, h.head_dim, h.rot_dims, 10000.0f, scaling),
          Status::ok);
      const std::vector<float> want = rotated_reference(x, pos, h, 10000.0f, scaling);
      for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(got[i], want[i], 3e-5f) << i;
      // The dims past rot_dims are left as they are; the rotated ones moved.
      size_t moved = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        if (static_cast<int64_t>(i) % h.head_dim >= h.rot_dims) {
          EXPECT_EQ(got[i], x[i]) << i;
        }
        moved += got[i] != x[i];
      }
      EXPECT_GT(moved, x.size() / 4);
    }
  }
}

// The angles against pos * base^(-2i/d) / factor * scale in double: the float recurrence's rounding
// grows with i (one rounding a step), so the bound is i ulps of the angle and a few more.
TEST(Rope, AnglesFollowTheirFormula) {
  const std::vector<float> factors = test::random_floats(64, 3, 1.0f, 32.0f);
  for (const float base : {10000.0f, 500000.0f}) {
    for (const float scale : {1.0f, 0.125f}) {
      const RopeScaling scaling{scale, factors.data()};
      const float theta_scale = rope_theta_scale(base, 128);
      for (const int32_t pos : {0, 1, 17, 4095, 131071}) {
        for (int64_t i = 0; i < 64; ++i) {
          const double want = pos *
                              std::pow(static_cast<double>(base), -2.0 * static_cast<double>(i) / 128.0) /
                              factors[static_cast<size_t>(i)] * scale;
          const double got = rope_angle(pos, i, theta_scale, scaling);
          EXPECT_NEAR(got, want, std::abs(want) * 1e-7 * static_cast<double>(i + 3)) << pos << " " << i;
        }
      }
    }
  }
}

// llama.cpp's scaled RoPE is plain RoPE at a scaled position: the angle is scale * theta(pos) /
// factor, and theta(F pos) is F theta(pos) exactly for F a power of two (the recurrence's roundings
// commute with it). So both scalings can be checked bit for bit against the plain rotation.
TEST(Rope, ScalingByPowersOfTwoIsPlainRopeAtTheScaledPosition) {
  const Heads h{6, 3, 34, 30};
  const std::vector<float> x =
      test::random_floats(static_cast<size_t>(h.tokens * h.n_heads * h.head_dim), 9, -2, 2);
  const std::vector<int32_t> pos = {0, 1, 5, 100, 777, 2047};
  std::vector<int32_t> pos4 = pos;
  for (int32_t& p : pos4) p *= 4;
  const auto rope = [&](const std::vector<int32_t>& positions, const RopeScaling& scaling) {
    std::vector<float> out = x;
    EXPECT_EQ(rope_normal(out.data(), positions.data(), h.tokens, h.n_heads, h.head_dim, h.rot_dims, 5000.0f,
                          scaling),
              Status::ok);
    return out;
  };
  const std::vector<float> plain = rope(pos, {});
  EXPECT_EQ(rope(pos4, {0.25f, nullptr}), plain) << "linear factor 4 at 4 p";
  const std::vector<float> fours(static_cast<size_t>(h.rot_dims / 2), 4.0f);
  EXPECT_EQ(rope(pos4, {1.0f, fours.data()}), plain) << "frequency factors 4 at 4 p";
  const std::vector<float> ones(static_cast<size_t>(h.rot_dims / 2), 1.0f);
  EXPECT_EQ(rope(pos, {1.0f, ones.data()}), plain) << "frequency factors 1";
  // One pair's factor moves that pair alone.
  std::vector<float> one_pair = ones;
  one_pair[3] = 4.0f;
  const std::vector<float> scaled = rope(pos4, {1.0f, one_pair.data()});
  const std::vector<float> plain4 = rope(pos4, {});
  for (size_t i = 0; i < x.size(); ++i) {
    const int64_t d = static_cast<int64_t>(i) % h.head_dim;
    if (d / 2 == 3) {
      EXPECT_EQ(scaled[i], plain[i]) << i;
    } else {
      EXPECT_EQ(scaled[i], plain4[i]) << i;
    }
  }
  EXPECT_NE(plain4, plain);
}

TEST(Rope, RefusesBadScaling) {
  std::vector<float> x(8, 1.0f);
  const int32_t pos = 3;
  for (const float scale : {0.0f, -1.0f, NAN, INFINITY}) {
    EXPECT_EQ(rope_normal(x.data(), &pos, 1, 1, 8, 8, 10000.0f, {scale, nullptr}), Status::invalid_argument)
        << scale;
  }
  for (const float bad : {0.0f, -2.0f, NAN, INFINITY}) {
    std::vector<float> factors = {1.0f, 2.0f, bad, 1.0f};
    EXPECT_EQ(rope_normal(x.data(), &pos, 1, 1, 8, 8, 10000.0f, {1.0f, factors.data()}),
              Status::invalid_argument)
        << bad;
  }
  RopeScaling bad = rope_yarn_scaling(0.5f, nullptr, 8, 16, 10000.0f);
  bad.mscale = 0.0f;
  EXPECT_EQ(rope_normal(x.data(), &pos, 1, 1, 8, 8, 10000.0f, bad), Status::invalid_argument);
  bad = rope_yarn_scaling(0.5f, nullptr, 8, 16, 10000.0f);
  bad.yarn_high = NAN;
  EXPECT_EQ(rope_normal(x.data(), &pos, 1, 1, 8, 8, 10000.0f, bad), Status::invalid_argument);
  EXPECT_EQ(x, std::vector<float>(8, 1.0f)) << "a refused call wrote";
}

// YaRN (llama.cpp's ggml_rope_ext with ext_factor 1): the correction range and magnitude against their
// formulas in double precision (Yarn-Llama-2-7b-64k's factor 16 from 4096, heads of 128, base 10000; and
// Yarn-Mistral's base 10000 with factor 16 from 8192), then each pair's angle: the unscaled one below the
// range, the scaled one above it (bit for bit the plain and the linear rotations), a linear mix between.
TEST(RopeYarn, CorrectionRangeAndMagnitudeFollowTheirFormulas) {
  for (const auto& [factor, context] : {std::pair{16.0, 4096}, std::pair{16.0, 8192}, std::pair{4.0, 32}}) {
    SCOPED_TRACE(std::to_string(factor) + " from " + std::to_string(context));
    const RopeScaling s =
        rope_yarn_scaling(static_cast<float>(1.0 / factor), nullptr, 128, context, 10000.0f);
    // The pair at which a wavelength turns n times over the original context.
    const auto corr = [&](double n) {
      return 128.0 * std::log(context / (n * 2.0 * std::numbers::pi)) / (2.0 * std::log(10000.0));
    };
    EXPECT_TRUE(s.yarn);
    EXPECT_EQ(s.yarn_low, std::max(0.0, std::floor(corr(32.0))));
    EXPECT_EQ(s.yarn_high, std::min(127.0, std::ceil(corr(1.0))));
    EXPECT_NEAR(s.mscale, 1.0 + 0.1 * std::log(factor), 1e-6);
    EXPECT_NEAR(rope_yarn_scaling(s.freq_scale, nullptr, 128, context, 10000.0f, 0.5f).mscale,
                0.5 * (1.0 + 0.1 * std::log(factor)), 1e-6)
        << "the file's attn_factor multiplies it";
  }
  // Factor 1: nothing scaled, magnitude 1.
  EXPECT_EQ(rope_yarn_scaling(1.0f, nullptr, 64, 2048, 10000.0f).mscale, 1.0f);
}

TEST(RopeYarn, PairsBelowTheRangeKeepTheirAngleThoseAboveAreScaledAndTheRestMixed) {
  const int64_t rot = 64;
  const float base = 10000.0f;
  const std::vector<float> factors = test::random_floats(static_cast<size_t>(rot / 2), 11, 1.0f, 4.0f);
  for (const float* freq_factors : {static_cast<const float*>(nullptr), factors.data()}) {
    const RopeScaling yarn = rope_yarn_scaling(0.125f, freq_factors, rot, 4096, base);  // pairs 10 to 23
    ASSERT_GT(yarn.yarn_low, 1.0f);
    ASSERT_LT(yarn.yarn_high, rot / 2 - 2.0f) << "pairs on both sides of the range";
    RopeScaling unscaled, linear;
    unscaled.freq_factors = linear.freq_factors = freq_factors;
    linear.freq_scale = 0.125f;
    const float theta_scale = rope_theta_scale(base, rot);
    int mixed = 0;
    for (const int32_t pos : {0, 3, 100, 4096, 100000}) {
      for (int64_t i = 0; i < rot / 2; ++i) {
        const float got = rope_angle(pos, i, theta_scale, yarn);
        const float extrapolated = rope_angle(pos, i, theta_scale, unscaled);
        const float interpolated = rope_angle(pos, i, theta_scale, linear);
        if (static_cast<float>(i) <= yarn.yarn_low) {
          EXPECT_EQ(got, extrapolated) << pos << " " << i;
        } else if (static_cast<float>(i) >= yarn.yarn_high) {
          EXPECT_EQ(got, interpolated) << pos << " " << i;
        } else {
          const double r = 1.0 - (i - yarn.yarn_low) / (yarn.yarn_high - yarn.yarn_low);
          const double want = interpolated * (1.0 - r) + extrapolated * r;
          EXPECT_NEAR(got, want, 1e-6 * std::abs(want) + 1e-30) << pos << " " << i;
          mixed += pos > 0;
        }
      }
    }
    EXPECT_GT(mixed, 0);
  }
}

}  // namespace
}  // namespace nibble::kernels

namespace nibble::model {
namespace {

// Llama 3.1's parameters (Llama-3.1-8B / 70B: base 500000, heads of 128, factor 8 from a context of
// 8192, low / high frequency factors 1 and 4): pairs whose wavelength is under 8192 / 4 keep their
// frequency, those over 8192 / 1 are slowed 8 times, and in between the divisor is
// 1 / ((1 - s) / 8 + s), s = (8192 / wavelength - 1) / (4 - 1), rising with the wavelength.
TEST(Llama3RopeScaling, FactorsAreOneForShortWavelengthsTheFactorForLongOnesAndSmoothBetween) {
  const Llama3RopeScaling l3;  // Llama 3.1's
  const std::vector<float> f = llama3_rope_freq_factors(l3, 500000.0f, 128);
  ASSERT_EQ(f.size(), 64u);
  int ones = 0, eights = 0, between = 0;
  for (size_t i = 0; i < f.size(); ++i) {
    const double wavelength = 2 * std::numbers::pi * std::pow(500000.0, 2.0 * static_cast<double>(i) / 128.0);
    if (i > 0) {
      EXPECT_GE(f[i], f[i - 1]) << i;
    }
    if (wavelength < 8192.0 / 4 * 0.999) {
      EXPECT_EQ(f[i], 1.0f) << i;
      ++ones;
    } else if (wavelength > 8192.0 * 1.001) {
      EXPECT_EQ(f[i], 8.0f) << i;
      ++eights;
    } else if (wavelength > 8192.0 / 4 * 1.001 && wavelength < 8192.0 * 0.999) {
      const double s = (8192.0 / wavelength - 1.0) / 3.0;
      EXPECT_NEAR(f[i], 1.0 / ((1.0 - s) / 8.0 + s), 1e-5 * f[i]) << i;
      EXPECT_GT(f[i], 1.0f);
      EXPECT_LT(f[i], 8.0f);
      ++between;
    }
  }
  // 2 pi 500000^(2i/128) passes 2048 at i = 28.2 and 8192 at i = 35.0.
  EXPECT_EQ(ones, 29);
  EXPECT_EQ(between, 6);
  EXPECT_EQ(eights, 29);
}

// Against llama.cpp's converter bit for bit: convert_hf_to_gguf.py's rope_freqs.weight (its
// generate_extra_tensors in conversion/llama.py, llama-cpp-python 0.3.36's vendored llama.cpp, run with torch
// 2.15) for Llama-3.1-8B / 70B (base 500000, heads of 128, factor 8) and Llama-3.2-1B (heads of 64,
// factor 32), both from a context of 8192: 1 below the smoothed pairs, the factor above them, and these
// smoothed values.
TEST(Llama3RopeScaling, FactorsAreConvertHfToGgufsBitForBit) {
  struct Case {
    int64_t dims;
    double factor;
    int64_t first_smoothed;
    std::vector<uint32_t> smoothed;
  };
  const Case cases[] = {
      {128, 8.0, 29, {0x3f9a8ed5, 0x3fc6d64a, 0x4001af1d, 0x402c732e, 0x406bcace, 0x40a83c06}},
      {64, 32.0, 15, {0x3fd35ec2, 0x4052b46f, 0x411aaaee}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE("heads of " + std::to_string(c.dims));
    const std::vector<float> f = llama3_rope_freq_factors({c.factor, 1.0, 4.0, 8192.0}, 500000.0f, c.dims);
    ASSERT_EQ(f.size(), static_cast<size_t>(c.dims / 2));
    for (int64_t i = 0; i < c.dims / 2; ++i) {
      const int64_t s = i - c.first_smoothed;
      float want = 1.0f;
      if (s >= static_cast<int64_t>(c.smoothed.size())) {
        want = static_cast<float>(c.factor);
      } else if (s >= 0) {
        std::memcpy(&want, &c.smoothed[static_cast<size_t>(s)], sizeof(want));
      }
      EXPECT_EQ(f[static_cast<size_t>(i)], want) << i;
    }
  }
}

TEST(Llama3RopeScaling, RefusesParametersItCannotUse) {
  const auto refused = [](Llama3RopeScaling l3, float base, int64_t dims) {
    EXPECT_THROW((void)llama3_rope_freq_factors(l3, base, dims), std::invalid_argument);
  };
  refused({}, 10000.0f, 7);
  refused({}, 10000.0f, 0);
  refused({}, 0.0f, 64);
  refused({0.5, 1, 4, 8192}, 10000.0f, 64);
  refused({8, 4, 4, 8192}, 10000.0f, 64);
  refused({8, 0, 4, 8192}, 10000.0f, 64);
  refused({8, 1, 4, 0}, 10000.0f, 64);
}

}  // namespace
}  // namespace nibble::model
