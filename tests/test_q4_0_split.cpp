// kernels/q4_0_split: GGUF Q4_0 blocks split into nibble and scale arrays (the GPU GEMV's 16-byte
// load layout) and back, on random rows of odd sizes: the split holds every block's bytes at the
// documented places, joining restores the blocks exactly, and bad shapes are refused.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kernels/q4_0_split.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"

namespace nibble::kernels {
namespace {

TEST(Q4_0Split, SplitHoldsEveryBlockAndJoinRestoresIt) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const int64_t n_out : {int64_t{1}, int64_t{7}, int64_t{33}}) {
    for (const int64_t k : {int64_t{32}, int64_t{160}, int64_t{544}}) {
      const int64_t rb = row_bytes(DType::Q4_0, k);
      std::vector<uint8_t> blocks(static_cast<size_t>(n_out * rb));
      std::vector<float> row(static_cast<size_t>(k));
      for (int64_t o = 0; o < n_out; ++o) {
        for (float& v : row) v = normal(rng);
        ASSERT_EQ(quantize_row(DType::Q4_0, row.data(), blocks.data() + o * rb, k), Status::ok);
      }
      std::vector<uint8_t> quants(static_cast<size_t>(n_out * k / 2));
      std::vector<uint16_t> scales(static_cast<size_t>(n_out * k / 32));
      ASSERT_EQ(split_q4_0(blocks.data(), n_out, k, quants.data(), scales.data()), Status::ok);
      // Element e of row o dequantizes to the same value from either layout.
      for (int64_t o = 0; o < n_out; ++o) {
        std::vector<float> want(static_cast<size_t>(k));
        ASSERT_EQ(dequantize_row(DType::Q4_0, blocks.data() + o * rb, want.data(), k), Status::ok);
        for (int64_t e = 0; e < k; ++e) {
          const int64_t b = o * (k / 32) + e / 32, j = e % 32;
          const uint8_t byte = quants[static_cast<size_t>(b * 16 + j % 16)];
          const int q = j < 16 ? byte & 0xF : byte >> 4;
          ASSERT_EQ(fp16_to_fp32(scales[static_cast<size_t>(b)]) * static_cast<float>(q - 8),
                    want[static_cast<size_t>(e)])
              << "row " << o << " element " << e;
        }
      }
      std::vector<uint8_t> joined(blocks.size(), 0xAB);
      ASSERT_EQ(join_q4_0(quants.data(), scales.data(), n_out, k, joined.data()), Status::ok);
      EXPECT_EQ(joined, blocks);
    }
  }
}

TEST(Q4_0Split, RejectsBadShapes) {
  uint8_t blocks[18 * 2] = {}, quants[32] = {};
  uint16_t scales[2] = {};
  EXPECT_EQ(split_q4_0(blocks, 1, 48, quants, scales), Status::invalid_argument);  // k % 32 != 0
  EXPECT_EQ(split_q4_0(blocks, -1, 32, quants, scales), Status::invalid_argument);
  EXPECT_EQ(split_q4_0(nullptr, 1, 32, quants, scales), Status::invalid_argument);
  EXPECT_EQ(split_q4_0(blocks, 1, 32, nullptr, scales), Status::invalid_argument);
  EXPECT_EQ(join_q4_0(quants, nullptr, 1, 32, blocks), Status::invalid_argument);
  EXPECT_EQ(split_q4_0(blocks, 2, 32, quants, scales), Status::ok);
  EXPECT_EQ(split_q4_0(blocks, 0, 32, quants, scales), Status::ok);  // empty: nothing to do
}

}  // namespace
}  // namespace nibble::kernels
