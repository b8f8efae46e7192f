#include "model/quant_grid.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <type_traits>

#include "kernels/quant_internal.hpp"
#include "kernels/quantize.hpp"

namespace nibble::model {

namespace {

using kernels::fp16_to_fp32;
using kernels::fp32_to_fp16;

// Round half to even into [lo, hi]; NaN and huge values clamp instead of overflowing.
int round_clamped(float v, int lo, int hi) {
  if (!(v > static_cast<float>(lo))) return lo;
  if (v >= static_cast<float>(hi)) return hi;
  return std::clamp(static_cast<int>(std::nearbyint(v)), lo, hi);
}

}  // namespace

QuantGrid QuantGrid::int4_asym(int64_t group_size) {
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    throw std::invalid_argument("INT4 group size " + std::to_string(group_size) + " is not 32, 64 or 128");
  }
  return {GridType::int4_asym, group_size};
}

kernels::DType QuantGrid::gguf_type() const {
  switch (type) {
    case GridType::q4_0:
      return kernels::DType::Q4_0;
    case GridType::q2_k:
      return kernels::DType::Q2_K;
    case GridType::q3_k:
      return kernels::DType::Q3_K;
    case GridType::q4_k:
      return kernels::DType::Q4_K;
    case GridType::q5_k:
      return kernels::DType::Q5_K;
    case GridType::q6_k:
      return kernels::DType::Q6_K;
    case GridType::int4_asym:
      break;
  }
  throw std::invalid_argument("the " + name() + " grid has no GGUF block type");
}

std::string QuantGrid::name() const {
  switch (type) {
    case GridType::q4_0:
      return "q4_0";
    case GridType::q2_k:
      return "q2_k";
    case GridType::q3_k:
      return "q3_k";
    case GridType::q4_k:
      return "q4_k";
    case GridType::q5_k:
      return "q5_k";
    case GridType::q6_k:
      return "q6_k";
    case GridType::int4_asym:
      break;
  }
  return "int4_asym/g" + std::to_string(group_size);
}

std::optional<QuantGrid> QuantGrid::for_gguf_type(kernels::DType type) {
  switch (type) {
    case kernels::DType::Q4_0:
      return q4_0();
    case kernels::DType::Q2_K:
      return q2_k();
    case kernels::DType::Q3_K:
      return q3_k();
    case kernels::DType::Q4_K:
      return q4_k();
    case kernels::DType::Q5_K:
      return q5_k();
    case kernels::DType::Q6_K:
      return q6_k();
    default:
      return std::nullopt;
  }
}

void check_grid_shape(const QuantGrid& grid, int64_t n_out, int64_t k, const std::string& what) {
  if (n_out <= 0 || k <= 0) {
    throw std::invalid_argument(what + ": empty matrix [" + std::to_string(n_out) + ", " + std::to_string(k) +
                                "]");
  }
  if (k % grid.super_block() != 0) {
    throw std::invalid_argument(what + ": row length " + std::to_string(k) + " is not a multiple of the " +
                                grid.name() + " block of " + std::to_string(grid.super_block()));
  }
}

void size_quantized(QuantizedMatrix& out, const QuantGrid& grid, int64_t n_out, int64_t k) {
  out.grid = grid;
  out.n_out = n_out;
  out.k = k;
  out.dequantized.assign(static_cast<size_t>(n_out * k), 0.0f);
  if (grid.type == GridType::int4_asym) {
    out.levels.assign(static_cast<size_t>(n_out * k), 0);
    out.scales.assign(static_cast<size_t>(n_out * (k / grid.group_size)), 0.0f);
    out.zeros.assign(static_cast<size_t>(n_out * (k / grid.group_size)), 0);
  } else {
    out.blocks.assign(static_cast<size_t>(n_out * kernels::row_bytes(grid.gguf_type(), k)), 0);
  }
}

RowQuantizer::RowQuantizer(QuantGrid grid, int64_t k)
    : grid_(grid), k_(k), groups_(static_cast<size_t>(k / grid.group_size)), levels_(static_cast<size_t>(k)) {
  if (grid_.k_quant()) {
    super_d_.resize(static_cast<size_t>(k / kernels::kQK_K));
    super_dmin_.resize(super_d_.size());
    super_scale_.resize(super_d_.size());
    super_offset_.resize(super_d_.size());
  }
}

void RowQuantizer::fit_super_block(int64_t col, const float* values) {
  if (!grid_.k_quant()) return;  // the super-block is the group
  if (grid_.type == GridType::q3_k || grid_.type == GridType::q6_k) {
    // llama.cpp's rule: the sub-block scale of largest magnitude, with its sign, maps to -32 (Q3_K's 6-bit
    // scales) or -128 (Q6_K's int8 ones); Q6_K's all-zero super-block is all zero.
    const bool q6 = grid_.type == GridType::q6_k;
    const int64_t sb = col / kernels::kQK_K;
    float max_scale = 0, max_abs = 0;
    for (int j = 0; j < kernels::kQK_K / 16; ++j) {
      const float scale =
          q6 ? kernels::fit_q6_k_sub_block(values + 16 * j) : kernels::fit_q3_k_sub_block(values + 16 * j);
      if (std::fabs(scale) > max_abs) {
        max_abs = std::fabs(scale);
        max_scale = scale;
      }
    }
    const bool zero = q6 ? max_abs < 1e-15f : max_scale == 0.0f;
    const float iscale = zero ? 0.0f : (q6 ? -128.0f : -32.0f) / max_scale;
    super_d_[sb] = zero ? fp32_to_fp16(0.0f) : fp32_to_fp16(1 / iscale);
    super_scale_[sb] = iscale;
    return;
  }
  // llama.cpp's rule: fit all sub-blocks, d and dmin from the largest scale and offset (as multiples of
  // 63 for Q4_K / Q5_K's 6-bit scales, of 15 for Q2_K's 4-bit ones).
  const int64_t sb = col / kernels::kQK_K;
  const int64_t n_sub = kernels::kQK_K / grid_.group_size;
  const float steps = max_scale_level();
  float max_scale = 0, max_offset = 0;
  for (int64_t j = 0; j < n_sub; ++j) {
    float offset = 0;
    max_scale = std::max(max_scale, fit_sub_block(values + grid_.group_size * j, &offset));
    max_offset = std::max(max_offset, offset);
  }
  super_d_[sb] = fp32_to_fp16(max_scale / steps);
  super_dmin_[sb] = fp32_to_fp16(max_offset / steps);
  super_scale_[sb] = max_scale > 0 ? steps / max_scale : 0.0f;     // inverse steps of the scales
  super_offset_[sb] = max_offset > 0 ? steps / max_offset : 0.0f;  // and offsets
}

void RowQuantizer::fit_group(int64_t col, const float* values) {
  Group& g = groups_[static_cast<size_t>(col / grid_.group_size)];
  const int64_t n = grid_.group_size;
  switch (grid_.type) {
    case GridType::q4_0: {  // GGML: the signed value of largest magnitude maps to -8
      const float d = kernels::detail::signed_absmax(values, n) / -8.0f;
      g.rounding = d != 0.0f ? 1.0f / d : 0.0f;
      g.scale = fp16_to_fp32(fp32_to_fp16(d));
      break;
    }
    case GridType::q3_k: {
      const int64_t sb = col / kernels::kQK_K;
      // Through int8_t as GGML does (|iscale · scale| <= 32 for the fitted values; a refit can exceed it).
      const float scaled = super_scale_[sb] * kernels::fit_q3_k_sub_block(values);
      const int level = std::clamp(round_clamped(scaled, -128, 127), -32, 31);
      g.sc = static_cast<uint8_t>(level + 32);
      g.scale = fp16_to_fp32(super_d_[sb]) * static_cast<float>(level);  // the kernels' d * (sc - 32)
      break;
    }
    case GridType::q6_k: {
      const int64_t sb = col / kernels::kQK_K;
      // Through int8_t as GGML does (min 127; |iscale · scale| <= 128 for the fitted values).
      const float scaled = super_scale_[sb] * kernels::fit_q6_k_sub_block(values);
      const auto level = static_cast<int8_t>(std::min(127, round_clamped(scaled, -128, 127)));
      g.sc = static_cast<uint8_t>(level);
      g.scale = fp16_to_fp32(super_d_[sb]) * static_cast<float>(level);  // the kernels' d * scale
      break;
    }
    case GridType::q2_k:
    case GridType::q4_k:
    case GridType::q5_k: {
      const int64_t sb = col / kernels::kQK_K;
      float offset = 0;
      const float scale = fit_sub_block(values, &offset);
      const int steps = max_scale_level();
      g.sc = static_cast<uint8_t>(std::min(steps, kernels::detail::nearest_int(super_scale_[sb] * scale)));
      g.m = static_cast<uint8_t>(std::min(steps, kernels::detail::nearest_int(super_offset_[sb] * offset)));
      g.scale = fp16_to_fp32(super_d_[sb]) * g.sc;  // the kernels' d * scale and dmin * min
      g.offset = fp16_to_fp32(super_dmin_[sb]) * g.m;
      break;
    }
    case GridType::int4_asym: {  // the range always includes 0; an all-zero group gets [-1, 1]
      float lo = 0, hi = 0;
      for (int64_t j = 0; j < n; ++j) {
        lo = std::min(lo, values[j]);
        hi = std::max(hi, values[j]);
      }
      if (lo == hi) {
        lo = -1;
        hi = 1;
      }
      kernels::f16_bits bits = fp32_to_fp16((hi - lo) / 15.0f);
      if ((bits & 0x7fff) == 0) bits = 1;  // smallest fp16 step rather than a zero scale
      g.scale = fp16_to_fp32(bits);
      g.rounding = 1.0f / g.scale;
      g.zero = static_cast<uint8_t>(round_clamped(-lo * g.rounding, 0, 15));
      break;
    }
  }
}

float RowQuantizer::quantize(int64_t col, float w) {
  const Group& g = groups_[static_cast<size_t>(col / grid_.group_size)];
  int level = 0;
  float value = 0;
  switch (grid_.type) {
    case GridType::q4_0:
      // GGML truncates x / d + 8.5 (d from the unrounded scale); clamping first also covers
      // GPTQ-updated values outside the group's original range.
      level = static_cast<int>(std::clamp(w * g.rounding + 8.5f, 0.0f, 15.0f));
      value = static_cast<float>(level - 8) * g.scale;
      break;
    case GridType::q6_k:
      // A zero scale stores level 0, as GGML does for an all-zero sub-block (its value is 0 either way).
      level = g.scale != 0.0f ? round_clamped(w / g.scale, -32, 31) + 32 : 0;
      value = g.scale * static_cast<float>(level - 32);
      break;
    case GridType::q3_k:
      // A zero scale stores level 0, as GGML does for an all-zero sub-block (its value is 0 either way).
      level = g.scale != 0.0f ? round_clamped(w / g.scale, -4, 3) + 4 : 0;
      value = g.scale * static_cast<float>(level - 4);
      break;
    case GridType::q2_k:
    case GridType::q4_k:
    case GridType::q5_k:
      level = g.scale != 0.0f ? round_clamped((w + g.offset) / g.scale, 0, max_level()) : 0;
      value = g.scale * static_cast<float>(level) - g.offset;
      break;
    case GridType::int4_asym:
      level = round_clamped(std::nearbyint(w * g.rounding) + static_cast<float>(g.zero), 0, 15);
      value = static_cast<float>(level - g.zero) * g.scale;
      break;
  }
  levels_[static_cast<size_t>(col)] = static_cast<uint8_t>(level);
  return value;
}

float RowQuantizer::fit_sub_block(const float* values, float* offset) const {
  if (grid_.type == GridType::q2_k) return kernels::fit_q2_k_sub_block(values, offset);
  return grid_.type == GridType::q5_k ? kernels::fit_q5_k_sub_block(values, offset)
                                      : kernels::fit_q4_k_sub_block(values, offset);
}

int RowQuantizer::max_level() const {
  return grid_.type == GridType::q2_k ? 3 : grid_.type == GridType::q5_k ? 31 : 15;
}

int RowQuantizer::max_scale_level() const { return grid_.type == GridType::q2_k ? 15 : 63; }

// A Q6_K row: the super-blocks' d, the groups' int8 scales, the levels (0..63) split into ql and qh.
void RowQuantizer::store_q6_k(QuantizedMatrix& out, int64_t row) const {
  auto* blocks = reinterpret_cast<kernels::BlockQ6_K*>(out.blocks.data() +
                                                       row * kernels::row_bytes(kernels::DType::Q6_K, k_));
  for (int64_t b = 0; b < k_ / kernels::kQK_K; ++b) {
    for (int j = 0; j < kernels::kQK_K / 16; ++j)
      blocks[b].scales[j] = static_cast<int8_t>(groups_[static_cast<size_t>(16 * b + j)].sc);
    blocks[b].d = super_d_[static_cast<size_t>(b)];
    kernels::detail::q6_k_pack_levels(levels_.data() + b * kernels::kQK_K, blocks[b].ql, blocks[b].qh);
  }
}

// A Q2_K row: the super-blocks' d and dmin, the groups' 4-bit scale and offset in one byte, the levels.
void RowQuantizer::store_q2_k(QuantizedMatrix& out, int64_t row) const {
  auto* blocks = reinterpret_cast<kernels::BlockQ2_K*>(out.blocks.data() +
                                                       row * kernels::row_bytes(kernels::DType::Q2_K, k_));
  for (int64_t b = 0; b < k_ / kernels::kQK_K; ++b) {
    for (int j = 0; j < kernels::kQK_K / 16; ++j) {
      const Group& g = groups_[static_cast<size_t>(16 * b + j)];
      blocks[b].scales[j] = static_cast<uint8_t>(g.sc | (g.m << 4));
    }
    blocks[b].d = super_d_[static_cast<size_t>(b)];
    blocks[b].dmin = super_dmin_[static_cast<size_t>(b)];
    kernels::detail::q2_k_pack_low_bits(levels_.data() + b * kernels::kQK_K, blocks[b].qs);
  }
}

// A Q4_K or Q5_K row: the super-blocks' d and dmin, the groups' 6-bit scales and offsets, the levels.
template <typename Block>
void RowQuantizer::store_k_quant(QuantizedMatrix& out, int64_t row) const {
  auto* blocks =
      reinterpret_cast<Block*>(out.blocks.data() + row * kernels::row_bytes(grid_.gguf_type(), k_));
  for (int64_t b = 0; b < k_ / kernels::kQK_K; ++b) {
    uint8_t sc[8], m[8];
    for (int j = 0; j < 8; ++j) {
      sc[j] = groups_[static_cast<size_t>(8 * b + j)].sc;
      m[j] = groups_[static_cast<size_t>(8 * b + j)].m;
    }
    blocks[b].d = super_d_[static_cast<size_t>(b)];
    blocks[b].dmin = super_dmin_[static_cast<size_t>(b)];
    kernels::detail::q4_k_pack_scale_min(sc, m, blocks[b].scales);
    const uint8_t* levels = levels_.data() + b * kernels::kQK_K;
    if constexpr (std::is_same_v<Block, kernels::BlockQ5_K>) {
      kernels::detail::q5_k_pack_levels(levels, blocks[b].qh, blocks[b].qs);
    } else {
      kernels::detail::q4_k_pack_levels(levels, blocks[b].qs);
    }
  }
}

// A Q3_K row: the super-blocks' d, the groups' 6-bit scales, the levels (0..7) split into the low 2
// bits (qs) and the third (hmask), as kernels/quantize.cpp packs them.
void RowQuantizer::store_q3_k(QuantizedMatrix& out, int64_t row) const {
  auto* blocks = reinterpret_cast<kernels::BlockQ3_K*>(out.blocks.data() +
                                                       row * kernels::row_bytes(kernels::DType::Q3_K, k_));
  for (int64_t b = 0; b < k_ / kernels::kQK_K; ++b) {
    kernels::BlockQ3_K& block = blocks[b];
    block = {};
    block.d = super_d_[static_cast<size_t>(b)];
    for (int j = 0; j < kernels::kQK_K / 16; ++j) {
      const int stored = groups_[static_cast<size_t>(16 * b + j)].sc;
      block.scales[j % 8] = static_cast<uint8_t>(block.scales[j % 8] | ((stored & 0xF) << (4 * (j / 8))));
      block.scales[8 + j % 4] =
          static_cast<uint8_t>(block.scales[8 + j % 4] | ((stored >> 4) << (2 * (j / 4))));
    }
    const uint8_t* levels = levels_.data() + b * kernels::kQK_K;
    uint8_t low[kernels::kQK_K];
    for (int e = 0; e < kernels::kQK_K; ++e) {
      low[e] = static_cast<uint8_t>(levels[e] & 3);
      block.hmask[e % 32] = static_cast<uint8_t>(block.hmask[e % 32] | (((levels[e] >> 2) & 1) << (e / 32)));
    }
    kernels::detail::q2_k_pack_low_bits(low, block.qs);
  }
}

void RowQuantizer::store(QuantizedMatrix& out, int64_t row) const {
  switch (grid_.type) {
    case GridType::q4_0: {
      auto* blocks = reinterpret_cast<kernels::BlockQ4_0*>(
          out.blocks.data() + row * kernels::row_bytes(kernels::DType::Q4_0, k_));
      for (int64_t b = 0; b < k_ / kernels::kQK4_0; ++b) {
        blocks[b].d = fp32_to_fp16(groups_[static_cast<size_t>(b)].scale);
        const uint8_t* l = levels_.data() + b * kernels::kQK4_0;
        for (int j = 0; j < kernels::kQK4_0 / 2; ++j)
          blocks[b].qs[j] = static_cast<uint8_t>(l[j] | (l[j + kernels::kQK4_0 / 2] << 4));
      }
      break;
    }
    case GridType::q2_k:
      store_q2_k(out, row);
      break;
    case GridType::q6_k:
      store_q6_k(out, row);
      break;
    case GridType::q3_k:
      store_q3_k(out, row);
      break;
    case GridType::q4_k:
      store_k_quant<kernels::BlockQ4_K>(out, row);
      break;
    case GridType::q5_k:
      store_k_quant<kernels::BlockQ5_K>(out, row);
      break;
    case GridType::int4_asym: {
      std::copy(levels_.begin(), levels_.end(), out.levels.begin() + row * k_);
      const int64_t n_groups = k_ / grid_.group_size;
      for (int64_t g = 0; g < n_groups; ++g) {
        out.scales[static_cast<size_t>(row * n_groups + g)] = groups_[static_cast<size_t>(g)].scale;
        out.zeros[static_cast<size_t>(row * n_groups + g)] = groups_[static_cast<size_t>(g)].zero;
      }
      break;
    }
  }
}

QuantizedMatrix rtn_quantize(const float* w, int64_t n_out, int64_t k, const QuantGrid& grid) {
  check_grid_shape(grid, n_out, k, "RTN");
  QuantizedMatrix out;
  size_quantized(out, grid, n_out, k);
  for (int64_t r = 0; r < n_out; ++r) {
    const float* row = w + r * k;
    RowQuantizer q(grid, k);
    for (int64_t sb = 0; sb < k; sb += grid.super_block()) {
      q.fit_super_block(sb, row + sb);
      for (int64_t g = sb; g < sb + grid.super_block(); g += grid.group_size) q.fit_group(g, row + g);
    }
    for (int64_t c = 0; c < k; ++c) out.dequantized[static_cast<size_t>(r * k + c)] = q.quantize(c, row[c]);
    q.store(out, r);
  }
  return out;
}

}  // namespace nibble::model
