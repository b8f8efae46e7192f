// kernels/int4_tiles: group-wise INT4 repacked into the tensor-core GEMV's chunks. The tiled form
// holds the same weights (its reference dequantization equals the row-major one bit for bit) on odd
// sizes with ragged tiles and stages, every byte sits where the header says, and the padding is zero.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kernels/int4_groups.hpp"
#include "kernels/int4_tiles.hpp"
#include "kernels/quant_types.hpp"

namespace nibble::kernels {
namespace {

struct Groups {
  std::vector<uint8_t> quants, zeros;
  std::vector<uint16_t> scales;
};

Groups random_groups(int64_t n_out, int64_t k, int64_t group, std::mt19937& rng) {
  Groups g;
  g.quants.resize(static_cast<size_t>(n_out * k / 2));
  g.zeros.resize(static_cast<size_t>(n_out * k / group));
  g.scales.resize(g.zeros.size());
  std::uniform_int_distribution<int> byte(0, 255), zero(0, 31);
  std::uniform_real_distribution<float> scale(-0.5f, 0.5f);
  for (auto& q : g.quants) q = static_cast<uint8_t>(byte(rng));
  for (auto& z : g.zeros) z = static_cast<uint8_t>(zero(rng));
  for (auto& s : g.scales) s = fp32_to_fp16(scale(rng));
  return g;
}

TEST(Int4Tiles, HoldTheSameWeightsOnOddShapes) {
  std::mt19937 rng(11);
  for (const int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}}) {
    for (const int64_t n_out : {int64_t{1}, int64_t{129}, int64_t{300}}) {
      for (const int64_t k : {int64_t{128}, int64_t{384}, int64_t{1152}}) {
        if (k % group != 0) continue;
        SCOPED_TRACE("group=" + std::to_string(group) + " n_out=" + std::to_string(n_out) +
                     " k=" + std::to_string(k));
        const Groups g = random_groups(n_out, k, group, rng);
        std::vector<uint8_t> tiles(static_cast<size_t>(int4_tiles_bytes(n_out, k, group)), 0xAB);
        ASSERT_EQ(int4_tiles_from_groups(g.quants.data(), g.scales.data(), g.zeros.data(), n_out, k, group,
                                         tiles.data()),
                  Status::ok);
        std::vector<float> want(static_cast<size_t>(n_out * k)), got(want.size());
        ASSERT_EQ(dequantize_int4_groups(g.quants.data(), g.scales.data(), g.zeros.data(), n_out, k, group,
                                         want.data()),
                  Status::ok);
        ASSERT_EQ(dequantize_int4_tiles(tiles.data(), n_out, k, group, got.data()), Status::ok);
        for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << "weight " << i;
      }
    }
  }
}

TEST(Int4Tiles, EveryByteSitsWhereTheLayoutSaysAndPaddingIsZero) {
  // 130 rows (two tiles, the second ragged) x 288 inputs (two stages, the second with one run) at group 32.
  const int64_t n_out = 130, k = 288, group = 32;
  std::mt19937 rng(5);
  const Groups g = random_groups(n_out, k, group, rng);
  const int64_t chunk = int4_tiles_chunk_bytes(group);
  ASSERT_EQ(chunk, 16384 + 128 * 8 * 4);
  ASSERT_EQ(int4_tiles_bytes(n_out, k, group), 2 * 2 * chunk);
  std::vector<uint8_t> tiles(static_cast<size_t>(int4_tiles_bytes(n_out, k, group)), 0xAB);
  ASSERT_EQ(
      int4_tiles_from_groups(g.quants.data(), g.scales.data(), g.zeros.data(), n_out, k, group, tiles.data()),
      Status::ok);
  // Row 129 = tile 1, row 1; run 8 = stage 1, run 0; group 8 = stage 1, group 0.
  const uint8_t* c11 = tiles.data() + (1 * 2 + 1) * chunk;
  EXPECT_EQ(std::memcmp(c11 + 1 * 128 + 0 * 16, g.quants.data() + 129 * (k / 2) + 8 * 16, 16), 0);
  uint32_t pair = 0;
  std::memcpy(&pair, c11 + 16384 + (1 * 8 + 0) * 4, 4);
  EXPECT_EQ(pair, int4_tile_pair(g.scales[129 * 9 + 8], g.zeros[129 * 9 + 8]));
  EXPECT_EQ(pair >> 16, 0x6400u + g.zeros[129 * 9 + 8]);
  // Row 5, run 3 = tile 0, stage 0, unit 3.
  EXPECT_EQ(std::memcmp(tiles.data() + 5 * 128 + 3 * 16, g.quants.data() + 5 * (k / 2) + 3 * 16, 16), 0);
  // Padding: rows 130..255 of tile 1, runs 9..15 of stage 1 and their groups.
  for (int64_t s = 0; s < 2; ++s) {
    const uint8_t* c = tiles.data() + (1 * 2 + s) * chunk;
    for (int64_t r = 2; r < 128; ++r) {
      for (int64_t b = 0; b < 128; ++b) ASSERT_EQ(c[r * 128 + b], 0) << "stage " << s << " row " << r;
      for (int64_t b = 0; b < 32; ++b) ASSERT_EQ(c[16384 + r * 32 + b], 0);
    }
  }
  for (int64_t r = 0; r < 128; ++r) {
    for (int64_t b = 16; b < 128; ++b) ASSERT_EQ(c11[r * 128 + b], 0) << "row " << r;
    for (int64_t b = 4; b < 32; ++b) ASSERT_EQ(c11[16384 + r * 32 + b], 0) << "row " << r;
  }
}

TEST(Int4Tiles, RefusesBadArguments) {
  uint8_t q[64] = {}, z[4] = {}, out[1] = {};
  uint16_t s[4] = {};
  EXPECT_EQ(int4_tiles_bytes(1, 100, 32), 0);
  EXPECT_EQ(int4_tiles_bytes(1, 128, 48), 0);
  EXPECT_EQ(int4_tiles_from_groups(nullptr, s, z, 1, 128, 32, out), Status::invalid_argument);
  EXPECT_EQ(int4_tiles_from_groups(q, s, z, 1, 128, 96, out), Status::invalid_argument);
  EXPECT_EQ(int4_tiles_from_groups(q, s, z, -1, 128, 32, out), Status::invalid_argument);
  float y[1];
  EXPECT_EQ(dequantize_int4_tiles(q, 1, 100, 32, y), Status::invalid_argument);
  EXPECT_EQ(dequantize_int4_tiles(nullptr, 1, 128, 32, y), Status::invalid_argument);
}

}  // namespace
}  // namespace nibble::kernels
