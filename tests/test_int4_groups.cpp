// kernels/int4_groups: Q4_0 and Q8_0 blocks as group-wise INT4 (one fp16 scale and one zero per
// group, the GPU's GPTQ/AWQ-style layout). The widest exact group is found, the conversion is exact
// (the reference dequantization equals dequantize_row of the blocks bit for bit) on odd sizes, and
// blocks that no group can hold are refused.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "kernels/int4_groups.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"

namespace nibble::kernels {
namespace {

// Q8_0 blocks of asymmetric INT4 as GPTQ/AWQ load: per group a scale and a zero z (0..16, GPTQ v1
// zeros reach 16), each value a level 0..15 minus z.
std::vector<BlockQ8_0> asymmetric_blocks(int64_t n_out, int64_t k, int64_t group, std::mt19937& rng) {
  std::uniform_int_distribution<int> level(0, 15), zero(0, 16);
  std::uniform_real_distribution<float> scale(0.001f, 0.5f);
  std::vector<BlockQ8_0> blocks(static_cast<size_t>(n_out * k / 32));
  for (int64_t g = 0; g < n_out * k / group; ++g) {
    const f16_bits d = fp32_to_fp16(scale(rng));
    const int z = zero(rng);
    for (int64_t b = 0; b < group / 32; ++b) {
      BlockQ8_0& blk = blocks[static_cast<size_t>(g * group / 32 + b)];
      blk.d = d;
      for (auto& q : blk.qs) q = static_cast<int8_t>(level(rng) - z);
    }
  }
  return blocks;
}

// Converts at `group` and checks the reference dequantization against dequantize_row, value by value.
void expect_exact(DType type, const void* blocks, int64_t n_out, int64_t k, int64_t group) {
  SCOPED_TRACE("n_out=" + std::to_string(n_out) + " k=" + std::to_string(k) +
               " group=" + std::to_string(group));
  std::vector<uint8_t> quants(static_cast<size_t>(n_out * k / 2)),
      zeros(static_cast<size_t>(n_out * k / group));
  std::vector<uint16_t> scales(zeros.size());
  ASSERT_EQ(
      int4_groups_from_blocks(type, blocks, n_out, k, group, quants.data(), scales.data(), zeros.data()),
      Status::ok);
  for (const uint8_t z : zeros) ASSERT_LE(z, 31);
  std::vector<float> want(static_cast<size_t>(n_out * k)), got(want.size());
  ASSERT_EQ(dequantize_row(type, blocks, want.data(), n_out * k), Status::ok);
  ASSERT_EQ(dequantize_int4_groups(quants.data(), scales.data(), zeros.data(), n_out, k, group, got.data()),
            Status::ok);
  for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << "weight " << i;
}

TEST(Int4Groups, GgufQ4_0IsExactAtGroup32) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const int64_t n_out : {int64_t{1}, int64_t{7}, int64_t{33}}) {
    for (const int64_t k : {int64_t{32}, int64_t{160}, int64_t{4128}}) {
      const int64_t rb = row_bytes(DType::Q4_0, k);
      std::vector<uint8_t> blocks(static_cast<size_t>(n_out * rb));
      std::vector<float> row(static_cast<size_t>(k));
      for (int64_t o = 0; o < n_out; ++o) {
        for (float& v : row) v = normal(rng);
        ASSERT_EQ(quantize_row(DType::Q4_0, row.data(), blocks.data() + o * rb, k), Status::ok);
      }
      // Round-to-nearest Q4_0 gives every block its own scale: only group 32 holds it.
      ASSERT_EQ(int4_group_size(DType::Q4_0, blocks.data(), n_out, k), 32);
      expect_exact(DType::Q4_0, blocks.data(), n_out, k, 32);
      // Every zero is Q4_0's 8.
      std::vector<uint8_t> quants(static_cast<size_t>(n_out * k / 2)),
          zeros(static_cast<size_t>(n_out * k / 32));
      std::vector<uint16_t> scales(zeros.size());
      ASSERT_EQ(int4_groups_from_blocks(DType::Q4_0, blocks.data(), n_out, k, 32, quants.data(),
                                        scales.data(), zeros.data()),
                Status::ok);
      for (const uint8_t z : zeros) ASSERT_EQ(z, 8);
      if (k % 64 == 0) {
        EXPECT_EQ(int4_groups_from_blocks(DType::Q4_0, blocks.data(), n_out, k, 64, quants.data(),
                                          scales.data(), zeros.data()),
                  Status::invalid_argument);
      }
    }
  }
}

TEST(Int4Groups, AsymmetricGroupsFromQ8_0AreExactAtTheirGroupSize) {
  std::mt19937 rng(11);
  for (const int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}}) {
    for (const int64_t n_out : {int64_t{1}, int64_t{5}, int64_t{37}}) {
      for (const int64_t k : {int64_t{128}, int64_t{384}, int64_t{4224}}) {
        const std::vector<BlockQ8_0> blocks = asymmetric_blocks(n_out, k, group, rng);
        // The generated group is the widest exact one (a wider group would mix scales; with ~1e-3 odds
        // two neighbouring groups drew the same scale bits and zero range, hence >=).
        EXPECT_GE(int4_group_size(DType::Q8_0, blocks.data(), n_out, k), group);
        expect_exact(DType::Q8_0, blocks.data(), n_out, k, group);
      }
    }
  }
}

TEST(Int4Groups, RefusesWhatNoGroupHolds) {
  std::mt19937 rng(2);
  const int64_t n_out = 3, k = 256;
  std::vector<BlockQ8_0> blocks = asymmetric_blocks(n_out, k, 128, rng);
  EXPECT_EQ(int4_group_size(DType::Q8_0, blocks.data(), n_out, k), 128);
  // One block of row 1 whose values span 16 levels (a real 8-bit weight): nothing holds it.
  blocks[9].qs[0] = -8;
  blocks[9].qs[1] = 8;
  EXPECT_EQ(int4_group_size(DType::Q8_0, blocks.data(), n_out, k), 0);
  std::vector<uint8_t> quants(static_cast<size_t>(n_out * k / 2)), zeros(static_cast<size_t>(n_out * k / 32));
  std::vector<uint16_t> scales(zeros.size());
  EXPECT_EQ(int4_groups_from_blocks(DType::Q8_0, blocks.data(), n_out, k, 32, quants.data(), scales.data(),
                                    zeros.data()),
            Status::invalid_argument);
  // A block whose scale differs from its group's: group 128 no longer holds that group, 32 does.
  blocks = asymmetric_blocks(n_out, k, 128, rng);
  blocks[5].d = static_cast<f16_bits>(blocks[5].d ^ 1);
  EXPECT_EQ(int4_group_size(DType::Q8_0, blocks.data(), n_out, k), 32);
  // Values above 15 (no zero in 0..31 brings them into 0..15 with the smallest at 0): refused.
  blocks = asymmetric_blocks(n_out, k, 32, rng);
  for (auto& q : blocks[0].qs) q = static_cast<int8_t>(20 + (q & 1));
  EXPECT_EQ(int4_group_size(DType::Q8_0, blocks.data(), n_out, k), 0);
  // Bad arguments.
  EXPECT_EQ(int4_group_size(DType::Q4_K, blocks.data(), n_out, k), 0);
  EXPECT_EQ(int4_group_size(DType::Q8_0, blocks.data(), n_out, 48), 0);
  EXPECT_EQ(int4_groups_from_blocks(DType::Q8_0, blocks.data(), n_out, k, 96, quants.data(), scales.data(),
                                    zeros.data()),
            Status::invalid_argument);
  EXPECT_EQ(
      int4_groups_from_blocks(DType::Q8_0, blocks.data(), n_out, k, 32, nullptr, scales.data(), zeros.data()),
      Status::invalid_argument);
  EXPECT_EQ(int4_groups_from_blocks(DType::F16, blocks.data(), n_out, k, 32, quants.data(), scales.data(),
                                    zeros.data()),
            Status::invalid_argument);
  std::vector<float> y(static_cast<size_t>(n_out * k));
  EXPECT_EQ(dequantize_int4_groups(quants.data(), scales.data(), zeros.data(), n_out, 100, 32, y.data()),
            Status::invalid_argument);
}

}  // namespace
}  // namespace nibble::kernels
