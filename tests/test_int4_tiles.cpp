// kernels/int4_tiles: group-wise INT4 repacked into the tensor-core GEMV's chunks. The tiled form
// holds the same weights (its reference dequantization equals the row-major one bit for bit) on odd
// sizes with ragged tiles and stages, every byte sits where the header says (a run's levels in the mma
// fragments' order), and the padding is zero.
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

// A run's 16 bytes in a chunk, from the run's row-major bytes.
std::vector<uint8_t> tiled_run(const uint8_t* row_major) {
  uint32_t in[4], out[4];
  std::memcpy(in, row_major, 16);
  int4_tile_words_from_run(in, out);
  std::vector<uint8_t> bytes(16);
  std::memcpy(bytes.data(), out, 16);
  return bytes;
}

// The interleave inside a run: a permutation of the 32 nibbles, and word t holds what lane t of an mma
// quad needs, in the order the fragment code takes it: nibble 4e + 2s + c is input 16s + 8c + 2t + e
// (PTX's m16n8k16 B fragment: inputs 2t, 2t + 1 in b0, b1 and 2t + 8, 2t + 9 in b2, b3 of each
// 16-deep step s).
TEST(Int4Tiles, RunNibblesFollowTheMmaFragments) {
  bool seen[32] = {};
  for (int i = 0; i < 32; ++i) {
    const int n = int4_tile_nibble_index(i);
    ASSERT_GE(n, 0);
    ASSERT_LT(n, 32);
    EXPECT_FALSE(seen[n]) << "nibble " << n << " twice";
    seen[n] = true;
  }
  for (int t = 0; t < 4; ++t) {
    for (int s = 0; s < 2; ++s) {
      for (int c = 0; c < 2; ++c) {
        for (int e = 0; e < 2; ++e) {
          EXPECT_EQ(int4_tile_nibble_index(16 * s + 8 * c + 2 * t + e), 8 * t + 4 * e + 2 * s + c);
        }
      }
    }
  }
  // Each input's level moves to its nibble and back, for a run whose levels are all different
  // where possible (level = i % 16, input i + 16 = 15 - i % 16).
  uint32_t run[4] = {}, words[4];
  for (int i = 0; i < 32; ++i) {
    const uint32_t level = i < 16 ? static_cast<uint32_t>(i) : static_cast<uint32_t>(31 - i);
    run[(i % 16) / 4] |= level << (8 * (i % 4) + 4 * (i / 16));
  }
  int4_tile_words_from_run(run, words);
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(int4_tile_level(words, i), i < 16 ? i : 31 - i) << "input " << i;
    const int n = int4_tile_nibble_index(i);
    EXPECT_EQ(static_cast<int>((words[n / 8] >> (4 * (n % 8))) & 0xF), i < 16 ? i : 31 - i);
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
  EXPECT_EQ(
      std::memcmp(c11 + 1 * 128 + 0 * 16, tiled_run(g.quants.data() + 129 * (k / 2) + 8 * 16).data(), 16), 0);
  uint32_t pair = 0;
  std::memcpy(&pair, c11 + 16384 + (1 * 8 + 0) * 4, 4);
  EXPECT_EQ(pair, int4_tile_pair(g.scales[129 * 9 + 8], g.zeros[129 * 9 + 8]));
  EXPECT_EQ(pair >> 16, 0x6400u + g.zeros[129 * 9 + 8]);
  // Row 5, run 3 = tile 0, stage 0, unit 3.
  EXPECT_EQ(std::memcmp(tiles.data() + 5 * 128 + 3 * 16,
                        tiled_run(g.quants.data() + 5 * (k / 2) + 3 * 16).data(), 16),
            0);
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
