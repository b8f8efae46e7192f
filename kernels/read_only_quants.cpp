#include "kernels/read_only_quants.hpp"

#include "kernels/read_only_quants_impl.hpp"

namespace nibble::kernels {
namespace {

using detail::Decoded;
using detail::e8m0_half;

// llama.cpp's dequantize_row_*: d · (2s + 1) (its d · (0.5 + s) · 0.25 for IQ2 is the same float, scaled by
// a power of two) times the coordinates.
template <typename Block>
void dequantize_blocks(const Block* blocks, float* y, int64_t n_blocks) {
  constexpr float constant = detail::dot_constant<Block>();
  Decoded dec;
  for (int64_t i = 0; i < n_blocks; ++i, y += kQK_K) {
    decode(blocks[i], dec);
    for (int g = 0; g < kQK_K / 16; ++g) {
      const float factor = dec.d * static_cast<float>(dec.scales[g]) * constant;
      for (int j = 0; j < 16; ++j) y[16 * g + j] = factor * static_cast<float>(dec.coords[16 * g + j]);
    }
  }
}

void dequantize_mxfp4(const BlockMXFP4* blocks, float* y, int64_t n_blocks) {
  for (int64_t i = 0; i < n_blocks; ++i, y += kQK4_0) {
    const float d = e8m0_half(blocks[i].e);
    for (int j = 0; j < 16; ++j) {
      y[j] = static_cast<float>(kMXFP4Values[blocks[i].qs[j] & 0xF]) * d;
      y[j + 16] = static_cast<float>(kMXFP4Values[blocks[i].qs[j] >> 4]) * d;
    }
  }
}

}  // namespace

bool is_read_only_type(DType type) {
  return type == DType::MXFP4 || detail::with_blocks(type, nullptr, [](auto) {});
}

bool dequantize_read_only_blocks(DType type, const void* blocks, float* y, int64_t n_blocks) {
  if (type == DType::MXFP4) {
    dequantize_mxfp4(static_cast<const BlockMXFP4*>(blocks), y, n_blocks);
    return true;
  }
  return detail::with_blocks(type, blocks, [&](auto* typed) { dequantize_blocks(typed, y, n_blocks); });
}

float dot_read_only(DType type, const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  float result = 0.0f;
  matmul_read_only_rows(type, w_row, 0, x_row, 0, &result, 1, 1, k, 0, 1);
  return result;
}

void matmul_read_only_rows(DType type, const uint8_t* w, int64_t w_stride, const uint8_t* x, int64_t x_stride,
                           float* y, int64_t y_stride, int64_t m, int64_t k, int64_t o_begin, int64_t o_end) {
  detail::read_only_rows(type, w, w_stride, x, x_stride, y, y_stride, m, k, o_begin, o_end);
}

}  // namespace nibble::kernels
