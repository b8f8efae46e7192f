// kernels/q6_k_planes: GGUF Q6_K super-blocks cut into 64-weight pieces held in planes (the GPU's
// 16-byte load layout) and back, on random rows of odd sizes: every weight dequantizes from the planes,
// read as the header documents, to the CPU reference's value; joining restores the blocks byte for
// byte; the layout is the blocks' size; bad shapes are refused.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kernels/q6_k_planes.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"

namespace nibble::kernels {
namespace {

std::vector<uint8_t> random_q6_k_rows(int64_t n_out, int64_t k, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t rb = row_bytes(DType::Q6_K, k);
  std::vector<uint8_t> blocks(static_cast<size_t>(n_out * rb));
  std::vector<float> row(static_cast<size_t>(k));
  for (int64_t o = 0; o < n_out; ++o) {
    for (float& v : row) v = normal(rng) * (o % 3 == 0 ? 0.01f : 1.0f);
    EXPECT_EQ(quantize_row(DType::Q6_K, row.data(), blocks.data() + o * rb, k), Status::ok);
  }
  return blocks;
}

TEST(Q6KPlanes, EveryWeightReadsBackFromItsPieceAndJoiningRestoresTheBlocks) {
  std::mt19937 rng(61);
  for (const int64_t n_out : {int64_t{1}, int64_t{3}, int64_t{17}}) {
    for (const int64_t k : {int64_t{256}, int64_t{768}, int64_t{2304}}) {
      SCOPED_TRACE("n_out=" + std::to_string(n_out) + " k=" + std::to_string(k));
      const std::vector<uint8_t> blocks = random_q6_k_rows(n_out, k, rng);
      const Q6KPlanesLayout layout = q6_k_planes_layout(n_out, k);
      ASSERT_EQ(layout.bytes, n_out * row_bytes(DType::Q6_K, k));
      ASSERT_EQ(layout.ql_hi % 16, 0);
      ASSERT_EQ(layout.qh % 16, 0);
      std::vector<uint8_t> planes(static_cast<size_t>(layout.bytes));
      ASSERT_EQ(q6_k_planes_from_blocks(blocks.data(), n_out, k, planes.data()), Status::ok);
      const int64_t pieces = k / 64, rb = row_bytes(DType::Q6_K, k);
      std::vector<float> want(static_cast<size_t>(k));
      for (int64_t o = 0; o < n_out; ++o) {
        ASSERT_EQ(dequantize_row(DType::Q6_K, blocks.data() + o * rb, want.data(), k), Status::ok);
        for (int64_t e = 0; e < k; ++e) {
          // Weight e: super-block e / 256, half h, quarter q, s and i as the header numbers them.
          const int64_t in_block = e % 256, h = in_block / 128, q = in_block % 128 / 32, l = in_block % 32;
          const int64_t s = l / 16, i = l % 16;
          const int64_t p = o * pieces + (e / 256) * 4 + 2 * h + s;
          const uint8_t low =
              planes[static_cast<size_t>((q % 2 == 0 ? layout.ql_lo : layout.ql_hi) + 16 * p + i)];
          const uint8_t high = planes[static_cast<size_t>(layout.qh + 16 * p + i)];
          const int level = ((q < 2 ? low & 0xF : low >> 4) | (((high >> (2 * q)) & 3) << 4)) - 32;
          const auto scale = static_cast<int8_t>(planes[static_cast<size_t>(layout.scales + 4 * p + q)]);
          f16_bits d;
          std::memcpy(&d, &planes[static_cast<size_t>(layout.d + 2 * (o * (k / 256) + e / 256))], 2);
          ASSERT_EQ(fp16_to_fp32(d) * static_cast<float>(scale) * static_cast<float>(level),
                    want[static_cast<size_t>(e)])
              << "row " << o << " weight " << e;
        }
      }
      // The same planes from the rows in two parts, each repacked into its place (a stacked upload).
      const int64_t first = n_out / 2;
      std::vector<uint8_t> stacked(planes.size(), 0xCD);
      ASSERT_EQ(q6_k_planes_rows_from_blocks(blocks.data(), first, k, n_out, 0, stacked.data()), Status::ok);
      ASSERT_EQ(q6_k_planes_rows_from_blocks(blocks.data() + first * rb, n_out - first, k, n_out, first,
                                             stacked.data()),
                Status::ok);
      EXPECT_EQ(stacked, planes);
      std::vector<uint8_t> back(blocks.size(), 0xAB);
      ASSERT_EQ(q6_k_blocks_from_planes(planes.data(), n_out, k, back.data()), Status::ok);
      EXPECT_EQ(back, blocks);
    }
  }
}

TEST(Q6KPlanes, RefusesBadShapes) {
  std::vector<uint8_t> a(4096), b(4096);
  EXPECT_EQ(q6_k_planes_from_blocks(a.data(), 1, 128, b.data()), Status::invalid_argument);  // not x 256
  EXPECT_EQ(q6_k_planes_from_blocks(a.data(), 1, 0, b.data()), Status::invalid_argument);
  EXPECT_EQ(q6_k_planes_from_blocks(a.data(), -1, 256, b.data()), Status::invalid_argument);
  EXPECT_EQ(q6_k_planes_from_blocks(nullptr, 1, 256, b.data()), Status::invalid_argument);
  EXPECT_EQ(q6_k_planes_from_blocks(a.data(), 1, 256, nullptr), Status::invalid_argument);
  EXPECT_EQ(q6_k_blocks_from_planes(a.data(), 1, 300, b.data()), Status::invalid_argument);
  EXPECT_EQ(q6_k_blocks_from_planes(nullptr, 1, 256, b.data()), Status::invalid_argument);
  EXPECT_EQ(q6_k_planes_rows_from_blocks(a.data(), 2, 256, 3, 2, b.data()),
            Status::invalid_argument);  // past
  EXPECT_EQ(q6_k_planes_rows_from_blocks(a.data(), 1, 256, 3, -1, b.data()), Status::invalid_argument);
}

}  // namespace
}  // namespace nibble::kernels
