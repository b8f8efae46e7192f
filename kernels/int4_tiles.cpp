#include "kernels/int4_tiles.hpp"

#include <cstring>

#include "kernels/quant_internal.hpp"
#include "kernels/quant_types.hpp"

namespace nibble::kernels {
namespace {

bool valid_shape(int64_t n_out, int64_t k, int64_t group) {
  return n_out >= 0 && k >= 0 && (group == 32 || group == 64 || group == 128) && k % group == 0;
}

}  // namespace

int64_t int4_tiles_bytes(int64_t n_out, int64_t k, int64_t group) {
  if (!valid_shape(n_out, k, group)) return 0;
  const int64_t tiles = (n_out + kInt4TileRows - 1) / kInt4TileRows;
  const int64_t stages = (k + kInt4TileInputs - 1) / kInt4TileInputs;
  return tiles * stages * int4_tiles_chunk_bytes(group);
}

Status int4_tiles_from_groups(const uint8_t* quants, const uint16_t* scales, const uint8_t* zeros,
                              int64_t n_out, int64_t k, int64_t group, uint8_t* tiles) {
  if (quants == nullptr || scales == nullptr || zeros == nullptr || tiles == nullptr ||
      !valid_shape(n_out, k, group))
    return Status::invalid_argument;
  const int64_t bytes = int4_tiles_bytes(n_out, k, group);
  std::memset(tiles, 0, static_cast<size_t>(bytes));
  const int64_t stages = (k + kInt4TileInputs - 1) / kInt4TileInputs;
  const int64_t chunk_bytes = int4_tiles_chunk_bytes(group);
  const int64_t groups_per_stage = kInt4TileInputs / group, groups_per_row = k / group;
  const int64_t runs_per_row = k / 32;
  for (int64_t row = 0; row < n_out; ++row) {
    const int64_t t = row / kInt4TileRows, r = row % kInt4TileRows;
    for (int64_t run = 0; run < runs_per_row; ++run) {
      const int64_t s = run / 8, u = run % 8;
      uint8_t* chunk = tiles + (t * stages + s) * chunk_bytes;
      uint32_t in[4], out[4];  // little-endian words, as the device reads them
      std::memcpy(in, quants + row * (k / 2) + run * 16, 16);
      int4_tile_words_from_run(in, out);
      std::memcpy(chunk + r * 128 + u * 16, out, 16);
    }
    for (int64_t g = 0; g < groups_per_row; ++g) {
      const int64_t s = g / groups_per_stage, j = g % groups_per_stage;
      uint8_t* chunk = tiles + (t * stages + s) * chunk_bytes;
      const int64_t at = row * groups_per_row + g;
      const uint32_t pair = int4_tile_pair(scales[at], zeros[at]);
      std::memcpy(chunk + kInt4TileNibbleBytes + (r * groups_per_stage + j) * 4, &pair, 4);
    }
  }
  return Status::ok;
}

int64_t q4_k_tiles_bytes(int64_t n_out, int64_t k) {
  if (n_out < 0 || k < 0 || k % kQK_K != 0) return 0;
  return (n_out + kInt4TileRows - 1) / kInt4TileRows * (k / kQK_K) * int4_tiles_chunk_bytes(32);
}

Status q4_k_tiles_from_blocks(const uint8_t* blocks, int64_t n_out, int64_t k, uint8_t* tiles) {
  if (blocks == nullptr || tiles == nullptr || n_out < 0 || k < 0 || k % kQK_K != 0)
    return Status::invalid_argument;
  std::memset(tiles, 0, static_cast<size_t>(q4_k_tiles_bytes(n_out, k)));
  const int64_t stages = k / kQK_K, chunk_bytes = int4_tiles_chunk_bytes(32);
  for (int64_t row = 0; row < n_out; ++row) {
    const int64_t t = row / kInt4TileRows, r = row % kInt4TileRows;
    for (int64_t s = 0; s < stages; ++s) {
      BlockQ4_K block;
      std::memcpy(&block, blocks + (row * stages + s) * static_cast<int64_t>(sizeof(BlockQ4_K)),
                  sizeof block);
      uint8_t* chunk = tiles + (t * stages + s) * chunk_bytes;
      for (int u = 0; u < 8; ++u) {
        uint32_t qs32[8], words[4];
        std::memcpy(qs32, block.qs + 32 * (u / 2), 32);
        q4_k_tile_words_from_sub_block(qs32, u % 2, words);
        std::memcpy(chunk + r * 128 + 16 * u, words, 16);
      }
      const float d = fp16_to_fp32(block.d), dmin = fp16_to_fp32(block.dmin);
      for (int j = 0; j < 8; ++j) {
        uint8_t scale = 0, min = 0;
        detail::q4_k_scale_min(j, block.scales, &scale, &min);
        // Both products are exact in fp32 (11-bit d times a 6-bit integer); one rounding to fp16.
        const uint32_t pair = static_cast<uint32_t>(fp32_to_fp16(d * static_cast<float>(scale))) |
                              (static_cast<uint32_t>(fp32_to_fp16(-(dmin * static_cast<float>(min)))) << 16);
        std::memcpy(chunk + kInt4TileNibbleBytes + (r * 8 + j) * 4, &pair, 4);
      }
    }
  }
  return Status::ok;
}

Status dequantize_int4_tiles(const uint8_t* tiles, int64_t n_out, int64_t k, int64_t group, float* y) {
  if (tiles == nullptr || y == nullptr || !valid_shape(n_out, k, group)) return Status::invalid_argument;
  const int64_t stages = (k + kInt4TileInputs - 1) / kInt4TileInputs;
  const int64_t chunk_bytes = int4_tiles_chunk_bytes(group);
  const int64_t groups_per_stage = kInt4TileInputs / group;
  for (int64_t row = 0; row < n_out; ++row) {
    const int64_t t = row / kInt4TileRows, r = row % kInt4TileRows;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = j / kInt4TileInputs, in_stage = j % kInt4TileInputs;
      const uint8_t* chunk = tiles + (t * stages + s) * chunk_bytes;
      const int64_t u = in_stage / 32, i = in_stage % 32;
      uint32_t words[4];
      std::memcpy(words, chunk + r * 128 + u * 16, 16);
      const int q = int4_tile_level(words, static_cast<int>(i));
      uint32_t pair = 0;
      std::memcpy(&pair, chunk + kInt4TileNibbleBytes + (r * groups_per_stage + in_stage / group) * 4, 4);
      const int zero = static_cast<int>(pair >> 16) - 0x6400;
      const float scale = fp16_to_fp32(static_cast<f16_bits>(pair & 0xFFFF));
      y[row * k + j] = static_cast<float>(q - zero) * scale;
    }
  }
  return Status::ok;
}

}  // namespace nibble::kernels
