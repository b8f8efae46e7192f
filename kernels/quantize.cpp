#include "kernels/quantize.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels/quant_internal.hpp"
#include "kernels/read_only_quants.hpp"

namespace nibble::kernels {
namespace {

// GGML's quantize_row_q4_0_ref: the signed value of largest magnitude maps to -8, so d = max / -8;
// q = min(15, (int8)(x / d + 8.5)).
void quantize_block_q4_0(const float* x, BlockQ4_0* out) {
  const float d = detail::signed_absmax(x, kQK4_0) / -8.0f;
  const float inv_d = d != 0.0f ? 1.0f / d : 0.0f;
  out->d = fp32_to_fp16(d);
  for (int j = 0; j < kQK4_0 / 2; ++j) {
    const int lo = static_cast<int8_t>(x[j] * inv_d + 8.5f);
    const int hi = static_cast<int8_t>(x[j + kQK4_0 / 2] * inv_d + 8.5f);
    out->qs[j] = static_cast<uint8_t>((lo < 15 ? lo : 15) | ((hi < 15 ? hi : 15) << 4));
  }
}

// GGML's quantize_row_q4_1_ref: d = (max − min) / 15, m = min; q = min(15, (int8)((x − min) / d + 0.5)).
void quantize_block_q4_1(const float* x, BlockQ4_1* out) {
  float min = x[0], max = x[0];
  for (int j = 1; j < kQK4_0; ++j) {
    min = std::min(min, x[j]);
    max = std::max(max, x[j]);
  }
  const float d = (max - min) / 15.0f;
  const float inv_d = d != 0.0f ? 1.0f / d : 0.0f;
  out->d = fp32_to_fp16(d);
  out->m = fp32_to_fp16(min);
  for (int j = 0; j < kQK4_0 / 2; ++j) {
    const int lo = static_cast<int8_t>((x[j] - min) * inv_d + 0.5f);
    const int hi = static_cast<int8_t>((x[j + kQK4_0 / 2] - min) * inv_d + 0.5f);
    out->qs[j] = static_cast<uint8_t>(std::min(15, lo) | (std::min(15, hi) << 4));
  }
}

// The low nibbles of 32 five-bit levels into qs (Q4_0's order), their fifth bits into qh.
void pack_q5_levels(const int (&levels)[kQK4_0], uint8_t (&qh)[4], uint8_t (&qs)[kQK4_0 / 2]) {
  uint32_t high = 0;
  for (int j = 0; j < kQK4_0; ++j) high |= static_cast<uint32_t>((levels[j] >> 4) & 1) << j;
  for (int j = 0; j < kQK4_0 / 2; ++j)
    qs[j] = static_cast<uint8_t>((levels[j] & 0xF) | ((levels[j + kQK4_0 / 2] & 0xF) << 4));
  for (int i = 0; i < 4; ++i) qh[i] = static_cast<uint8_t>(high >> (8 * i));
}

// GGML's quantize_row_q5_0_ref: Q4_0's rule with 32 levels: d = max / −16 (max the signed value of
// largest magnitude), q = min(31, (int8)(x / d + 16.5)).
void quantize_block_q5_0(const float* x, BlockQ5_0* out) {
  const float d = detail::signed_absmax(x, kQK4_0) / -16.0f;
  const float inv_d = d != 0.0f ? 1.0f / d : 0.0f;
  out->d = fp32_to_fp16(d);
  int levels[kQK4_0];
  for (int j = 0; j < kQK4_0; ++j)
    levels[j] = std::min(31, static_cast<int>(static_cast<int8_t>(x[j] * inv_d + 16.5f)));
  pack_q5_levels(levels, out->qh, out->qs);
}

// GGML's quantize_row_q5_1_ref: Q4_1's rule with 32 levels, d = (max − min) / 31,
// q = (uint8)((x − min) / d + 0.5) (at most 31 for every x in [min, max]).
void quantize_block_q5_1(const float* x, BlockQ5_1* out) {
  float min = x[0], max = x[0];
  for (int j = 1; j < kQK4_0; ++j) {
    min = std::min(min, x[j]);
    max = std::max(max, x[j]);
  }
  const float d = (max - min) / 31.0f;
  const float inv_d = d != 0.0f ? 1.0f / d : 0.0f;
  out->d = fp32_to_fp16(d);
  out->m = fp32_to_fp16(min);
  int levels[kQK4_0];
  for (int j = 0; j < kQK4_0; ++j) levels[j] = static_cast<uint8_t>((x[j] - min) * inv_d + 0.5f);
  pack_q5_levels(levels, out->qh, out->qs);
}

// GGML's make_qkx2_quants: levels 0..nmax for x: [n] (n <= 32); start from the min/max grid, then try
// nstep + 1 slightly different inverse scales ((rmin + rdelta · step + nmax) / range), each followed by a
// weighted least-squares refit of scale and min, and keep the best (by weighted squared error, or
// absolute error with use_mad). Returns the scale; *offset = -min; levels (when not null) gets the
// chosen levels, as GGML's L (the quantizers keep them where a sub-block's stored scale rounds to 0).
// Q4_K fits with nmax 15, rmin -1, 20 steps of 0.1; Q5_K with 31, -0.5, 15; Q2_K's sub-blocks of 16 with
// 3, -0.5, 15 and absolute error.
// With importance weights (llama.cpp's quantize_row_q4_K_impl / _q5_K_impl, make_qkx3_quants) the
// search is finer: rmin -0.9, steps of 0.05, 36 of them.
struct SubBlockGrid {
  int nmax;
  float rmin;
  int nstep;
  bool use_mad = false;
  float rdelta = 0.1f;
};
constexpr SubBlockGrid kQ4_KGrid{15, -1.0f, 20};
constexpr SubBlockGrid kQ5_KGrid{31, -0.5f, 15};
constexpr SubBlockGrid kQ2_KGrid{3, -0.5f, 15, true};
constexpr SubBlockGrid kQ4_KWeightedGrid{15, -0.9f, 36, false, 0.05f};
constexpr SubBlockGrid kQ5_KWeightedGrid{31, -0.9f, 36, false, 0.05f};

float fit_sub_block(const float* x, const float* weights, int n, SubBlockGrid grid, float* offset,
                    uint8_t* levels = nullptr) {
  constexpr int kMaxN = 32;
  const int nmax = grid.nmax;
  float min = x[0];
  float max = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    sum_w += weights[i];
    sum_x += weights[i] * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    if (levels != nullptr) std::fill(levels, levels + n, uint8_t{0});
    *offset = -min;
    return 0.0f;
  }
  const auto error_of = [&](float diff) { return grid.use_mad ? std::fabs(diff) : diff * diff; };
  float iscale = static_cast<float>(nmax) / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  uint8_t best[kMaxN];
  for (int i = 0; i < n; ++i) {
    const int l = std::clamp(detail::nearest_int(iscale * (x[i] - min)), 0, nmax);
    best[i] = static_cast<uint8_t>(l);
    const float diff = scale * static_cast<float>(l) + min - x[i];
    best_error += weights[i] * error_of(diff);  // w·(diff²), as GGML rounds it
  }
  uint8_t candidate[kMaxN];
  for (int step = 0; step <= grid.nstep; ++step) {
    iscale = (grid.rmin + grid.rdelta * static_cast<float>(step) + static_cast<float>(nmax)) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::clamp(detail::nearest_int(iscale * (x[i] - min)), 0, nmax);
      candidate[i] = static_cast<uint8_t>(l);
      const float w = weights[i];
      sum_l += w * static_cast<float>(l);
      sum_l2 += w * static_cast<float>(l) * static_cast<float>(l);
      sum_xl += w * static_cast<float>(l) * x[i];
    }
    const float det = sum_w * sum_l2 - sum_l * sum_l;
    if (det <= 0) continue;
    float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
    float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
    if (this_min > 0) {
      this_min = 0;
      this_scale = sum_xl / sum_l2;
    }
    float error = 0;
    for (int i = 0; i < n; ++i) {
      const float diff = this_scale * static_cast<float>(candidate[i]) + this_min - x[i];
      error += weights[i] * error_of(diff);
    }
    if (error < best_error) {
      std::copy(candidate, candidate + n, best);
      best_error = error;
      scale = this_scale;
      min = this_min;
    }
  }
  if (levels != nullptr) std::copy(best, best + n, levels);
  *offset = -min;
  return scale;
}

// The importance weights of llama.cpp's Q4_K / Q5_K sub-block fits: the sub-block's RMS plus each
// element's magnitude (larger values matter more).
void sub_block_weights(const float* x, float* weights) {
  float sum_x2 = 0;
  for (int i = 0; i < 32; ++i) sum_x2 += x[i] * x[i];
  const float rms = std::sqrt(sum_x2 / 32);
  for (int i = 0; i < 32; ++i) weights[i] = rms + std::fabs(x[i]);
}

// The 6-bit sub-block scales and mins of a Q4_K / Q5_K super-block, and every element's level
// (0..grid.nmax), as GGML's quantize_row_q4_K_ref / quantize_row_q5_K_ref compute them: fit each
// sub-block's scale and offset, store them as 6-bit multiples of the super-block's d = max scale / 63
// and dmin = max offset / 63, then round every element against the stored (fp16 and 6-bit rounded)
// values (a sub-block whose stored scale is 0 keeps the fit's levels, as GGML's do).
void quantize_k_super_block(const float* x, SubBlockGrid grid, f16_bits* d_out, f16_bits* dmin_out,
                            uint8_t (&sc)[8], uint8_t (&m)[8], uint8_t (&levels)[kQK_K]) {
  float scales[8], offsets[8];
  float max_scale = 0, max_offset = 0;
  for (int j = 0; j < 8; ++j) {
    float weights[32];
    sub_block_weights(x + 32 * j, weights);
    scales[j] = fit_sub_block(x + 32 * j, weights, 32, grid, &offsets[j], levels + 32 * j);
    max_scale = std::max(max_scale, scales[j]);
    max_offset = std::max(max_offset, offsets[j]);
  }
  const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
  const float inv_offset = max_offset > 0 ? 63.0f / max_offset : 0.0f;
  for (int j = 0; j < 8; ++j) {
    // To uint8_t before the clamp, as GGML does it (a negative level would wrap to 63).
    sc[j] = std::min<uint8_t>(63, static_cast<uint8_t>(detail::nearest_int(inv_scale * scales[j])));
    m[j] = std::min<uint8_t>(63, static_cast<uint8_t>(detail::nearest_int(inv_offset * offsets[j])));
  }
  *d_out = fp32_to_fp16(max_scale / 63.0f);
  *dmin_out = fp32_to_fp16(max_offset / 63.0f);
  for (int j = 0; j < 8; ++j) {
    const float d = fp16_to_fp32(*d_out) * sc[j];
    if (d == 0.0f) continue;
    const float dm = fp16_to_fp32(*dmin_out) * m[j];
    for (int i = 0; i < 32; ++i)
      levels[32 * j + i] =
          static_cast<uint8_t>(std::clamp(detail::nearest_int((x[32 * j + i] + dm) / d), 0, grid.nmax));
  }
}

// GGML's make_qp_quants: levels 0..nmax for the non-negative x: [n] (a super-block's sub-block scales or
// mins) minimising Σ w·(x − scale·l)²: the best of 9 inverse scales near nmax / max, then up to 5 passes
// that move single levels. Returns the scale.
float fit_positive_levels(int n, int nmax, const float* x, uint8_t* levels, const float* w) {
  float max = 0;
  for (int i = 0; i < n; ++i) max = std::max(max, x[i]);
  if (max < 1e-15f) {
    std::fill(levels, levels + n, uint8_t{0});
    return 0.0f;
  }
  float iscale = static_cast<float>(nmax) / max;
  float scale = 1 / iscale;
  float best_mse = 0;
  for (int i = 0; i < n; ++i) {
    // Unclamped, as GGML's first pass (through uint8_t: x <= max, so the level is at most nmax).
    const float level = static_cast<float>(static_cast<uint8_t>(detail::nearest_int(iscale * x[i])));
    const float diff = x[i] - scale * level;
    best_mse += w[i] * diff * diff;
  }
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    const float iscale_is = (0.1f * static_cast<float>(is) + static_cast<float>(nmax)) / max;
    const float scale_is = 1 / iscale_is;
    float mse = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::min(nmax, detail::nearest_int(iscale_is * x[i]));
      const float diff = x[i] - scale_is * static_cast<float>(l);
      mse += w[i] * diff * diff;
    }
    if (mse < best_mse) {
      best_mse = mse;
      iscale = iscale_is;
    }
  }
  float sum_lx = 0, sum_l2 = 0;
  for (int i = 0; i < n; ++i) {
    levels[i] = static_cast<uint8_t>(std::min(nmax, detail::nearest_int(iscale * x[i])));
    sum_lx += w[i] * x[i] * static_cast<float>(levels[i]);
    sum_l2 += w[i] * static_cast<float>(levels[i]) * static_cast<float>(levels[i]);
  }
  for (int pass = 0; pass < 5; ++pass) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      const float level = static_cast<float>(levels[i]);
      float slx = sum_lx - w[i] * x[i] * level;
      float sl2 = sum_l2 - w[i] * level * level;
      if (!(slx > 0 && sl2 > 0)) continue;
      const int new_l = std::min(nmax, detail::nearest_int(x[i] * sl2 / slx));
      if (new_l == levels[i]) continue;
      slx += w[i] * x[i] * static_cast<float>(new_l);
      sl2 += w[i] * static_cast<float>(new_l) * static_cast<float>(new_l);
      if (slx * slx * sum_l2 > sum_lx * sum_lx * sl2) {
        levels[i] = static_cast<uint8_t>(new_l);
        sum_lx = slx;
        sum_l2 = sl2;
        ++n_changed;
      }
    }
    if (n_changed == 0) break;
  }
  return sum_l2 > 0.0f ? sum_lx / sum_l2 : 0.0f;
}

// GGML's quantize_row_q4_K_impl / _q5_K_impl for one super-block, with importance weights qw: [256]
// (an imatrix row): each sub-block fitted with weights qw · sqrt(2·mean(x²) + x²), its scale and min
// stored by make_qp_quants (weighted by the sub-blocks' summed weights) instead of as multiples of the
// largest, then every element re-rounded against the stored values.
void quantize_k_super_block_weighted(const float* x, const float* qw, SubBlockGrid grid, f16_bits* d_out,
                                     f16_bits* dmin_out, uint8_t (&sc)[8], uint8_t (&m)[8],
                                     uint8_t (&levels)[kQK_K]) {
  float sum_x2 = 0;
  for (int l = 0; l < kQK_K; ++l) sum_x2 += x[l] * x[l];
  const float sigma2 = 2 * sum_x2 / kQK_K;
  float scales[8], mins[8], sum_weights[8];
  for (int j = 0; j < 8; ++j) {
    float weights[32];
    for (int l = 0; l < 32; ++l)
      weights[l] = qw[32 * j + l] * std::sqrt(sigma2 + x[32 * j + l] * x[32 * j + l]);
    float sum_w = 0;
    for (int l = 0; l < 32; ++l) sum_w += weights[l];
    sum_weights[j] = sum_w;
    scales[j] = fit_sub_block(x + 32 * j, weights, 32, grid, &mins[j], levels + 32 * j);
  }
  const float d_block = fit_positive_levels(8, 63, scales, sc, sum_weights);
  const float m_block = fit_positive_levels(8, 63, mins, m, sum_weights);
  *d_out = fp32_to_fp16(d_block);
  *dmin_out = fp32_to_fp16(m_block);
  for (int j = 0; j < 8; ++j) {
    const float d = fp16_to_fp32(*d_out) * sc[j];
    if (d == 0.0f) continue;
    const float dm = fp16_to_fp32(*dmin_out) * m[j];
    for (int i = 0; i < 32; ++i)
      levels[32 * j + i] =
          static_cast<uint8_t>(std::clamp(detail::nearest_int((x[32 * j + i] + dm) / d), 0, grid.nmax));
  }
}

// qw: [256] importance weights (an imatrix row) or null (llama.cpp's reference quantizer).
void quantize_block_q4_k(const float* x, BlockQ4_K* out, const float* qw = nullptr) {
  uint8_t sc[8], m[8], levels[kQK_K];
  if (qw != nullptr) {
    quantize_k_super_block_weighted(x, qw, kQ4_KWeightedGrid, &out->d, &out->dmin, sc, m, levels);
  } else {
    quantize_k_super_block(x, kQ4_KGrid, &out->d, &out->dmin, sc, m, levels);
  }
  detail::q4_k_pack_scale_min(sc, m, out->scales);
  detail::q4_k_pack_levels(levels, out->qs);
}

// Q5_K: Q4_K's layout for the low 4 bits of each level, the fifth bit of element l of sub-block s
// in bit s of qh[l].
void quantize_block_q5_k(const float* x, BlockQ5_K* out, const float* qw = nullptr) {
  uint8_t sc[8], m[8], levels[kQK_K];
  if (qw != nullptr) {
    quantize_k_super_block_weighted(x, qw, kQ5_KWeightedGrid, &out->d, &out->dmin, sc, m, levels);
  } else {
    quantize_k_super_block(x, kQ5_KGrid, &out->d, &out->dmin, sc, m, levels);
  }
  detail::q4_k_pack_scale_min(sc, m, out->scales);
  detail::q5_k_pack_levels(levels, out->qh, out->qs);
}

// The end of GGML's Q2_K quantizers: every element rounded against its sub-block's stored scale and min
// (a sub-block whose scale is 0 keeps the fit's levels), then the levels packed.
void round_and_pack_q2_k(const float* x, uint8_t (&levels)[kQK_K], BlockQ2_K* out) {
  for (int j = 0; j < kQK_K / 16; ++j) {
    const float d = fp16_to_fp32(out->d) * static_cast<float>(out->scales[j] & 0xF);
    if (d == 0.0f) continue;
    const float dm = fp16_to_fp32(out->dmin) * static_cast<float>(out->scales[j] >> 4);
    for (int i = 0; i < 16; ++i)
      levels[16 * j + i] =
          static_cast<uint8_t>(std::clamp(detail::nearest_int((x[16 * j + i] + dm) / d), 0, 3));
  }
  detail::q2_k_pack_low_bits(levels, out->qs);
}

// Stores sub-block j's 6-bit scale (stored = scale + 32) into a Q3_K block's 12 scale bytes.
void set_q3_k_scale(BlockQ3_K* out, int j, int stored) {
  out->scales[j % 8] = static_cast<uint8_t>(out->scales[j % 8] | ((stored & 0xF) << (4 * (j / 8))));
  out->scales[8 + j % 4] = static_cast<uint8_t>(out->scales[8 + j % 4] | ((stored >> 4) << (2 * (j / 4))));
}

// The end of GGML's Q3_K quantizers: every element rounded against its sub-block's stored scale (a
// sub-block whose scale is 0 keeps the fit's levels), then the levels split into qs and hmask.
void round_and_pack_q3_k(const float* x, int8_t (&levels)[kQK_K], BlockQ3_K* out) {
  for (int j = 0; j < kQK_K / 16; ++j) {
    const float d = fp16_to_fp32(out->d) * static_cast<float>(q3_k_scale(*out, j));
    if (d == 0.0f) continue;
    for (int i = 0; i < 16; ++i)
      levels[16 * j + i] = static_cast<int8_t>(std::clamp(detail::nearest_int(x[16 * j + i] / d), -4, 3) + 4);
  }
  uint8_t low[kQK_K];
  std::memset(out->hmask, 0, sizeof out->hmask);
  for (int e = 0; e < kQK_K; ++e) {
    low[e] = static_cast<uint8_t>(levels[e] & 3);
    out->hmask[e % 32] = static_cast<uint8_t>(out->hmask[e % 32] | (((levels[e] >> 2) & 1) << (e / 32)));
  }
  detail::q2_k_pack_low_bits(low, out->qs);
}

// GGML's quantize_row_q2_K_ref for one super-block: fit each sub-block of 16 (levels 0..3, weights
// |x|, absolute error), store the scales and mins as 4-bit multiples of d = max scale / 15 and dmin =
// max min / 15, then round every element against the stored values.
void quantize_block_q2_k(const float* x, BlockQ2_K* out) {
  uint8_t levels[kQK_K];
  float scales[kQK_K / 16], mins[kQK_K / 16];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < kQK_K / 16; ++j) {
    float weights[16];
    for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[16 * j + l]);
    scales[j] = fit_sub_block(x + 16 * j, weights, 16, kQ2_KGrid, &mins[j], levels + 16 * j);
    max_scale = std::max(max_scale, scales[j]);
    max_min = std::max(max_min, mins[j]);
  }
  // GGML stores the levels unclamped into the nibbles (they cannot exceed 15: the largest is 15).
  for (int j = 0; j < kQK_K / 16; ++j) out->scales[j] = 0;
  out->d = 0;
  if (max_scale > 0) {
    const float iscale = 15.0f / max_scale;
    for (int j = 0; j < kQK_K / 16; ++j)
      out->scales[j] = static_cast<uint8_t>(detail::nearest_int(iscale * scales[j]));
    out->d = fp32_to_fp16(max_scale / 15.0f);
  }
  out->dmin = 0;
  if (max_min > 0) {
    const float iscale = 15.0f / max_min;
    for (int j = 0; j < kQK_K / 16; ++j)
      out->scales[j] = static_cast<uint8_t>(out->scales[j] | (detail::nearest_int(iscale * mins[j]) << 4));
    out->dmin = fp32_to_fp16(max_min / 15.0f);
  }
  round_and_pack_q2_k(x, levels, out);
}

// GGML's make_q3_quants with do_rmse (weights x²) for Q3_K's sub-blocks of 16, nmax = 4: levels
// L in 0..7 (signed value L − 4); start from the largest magnitude at −4, then up to 5 passes that move
// single elements to the level that best fits the others' least-squares scale. Returns the scale.
float q3_k_sub_block_fit(const float* x, int8_t* levels) {
  constexpr int n = 16;
  constexpr int nmax = 4;
  const float max = detail::signed_absmax(x, n);
  if (std::fabs(max) < 1e-15f) {  // GGML's GROUP_MAX_EPS: all zero
    for (int i = 0; i < n; ++i) levels[i] = 0;
    return 0.0f;
  }
  const float iscale = -nmax / max;
  float sum_lx = 0, sum_l2 = 0;
  int l_signed[n];
  for (int i = 0; i < n; ++i) {
    l_signed[i] = std::clamp(detail::nearest_int(iscale * x[i]), -nmax, nmax - 1);
    const float w = x[i] * x[i];
    sum_lx += w * x[i] * static_cast<float>(l_signed[i]);
    sum_l2 += w * static_cast<float>(l_signed[i]) * static_cast<float>(l_signed[i]);
  }
  for (int pass = 0; pass < 5; ++pass) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float slx = sum_lx - w * x[i] * static_cast<float>(l_signed[i]);
      if (slx <= 0) continue;
      float sl2 = sum_l2 - w * static_cast<float>(l_signed[i]) * static_cast<float>(l_signed[i]);
      const int new_l = std::clamp(detail::nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
      if (new_l == l_signed[i]) continue;
      slx += w * x[i] * static_cast<float>(new_l);
      sl2 += w * static_cast<float>(new_l) * static_cast<float>(new_l);
      if (sl2 > 0 && slx * slx * sum_l2 > sum_lx * sum_lx * sl2) {
        l_signed[i] = new_l;
        sum_lx = slx;
        sum_l2 = sl2;
        ++n_changed;
      }
    }
    if (n_changed == 0) break;
  }
  for (int i = 0; i < n; ++i) levels[i] = static_cast<int8_t>(l_signed[i] + nmax);
  return sum_l2 > 0.0f ? sum_lx / sum_l2 : 0.0f;
}

// GGML's quantize_row_q3_K_ref for one super-block: fit each sub-block of 16, store the scales as
// 6-bit multiples (−32..31) of d = −(largest-magnitude scale) / 32, re-round every element against the
// stored scales (levels 0..7), then split the levels into qs (low 2 bits) and hmask (the third).
void quantize_block_q3_k(const float* x, BlockQ3_K* out) {
  int8_t levels[kQK_K];
  float scales[kQK_K / 16];
  float max_scale = 0, max_abs_scale = 0;
  for (int j = 0; j < kQK_K / 16; ++j) {
    scales[j] = q3_k_sub_block_fit(x + 16 * j, levels + 16 * j);
    if (std::fabs(scales[j]) > max_abs_scale) {
      max_abs_scale = std::fabs(scales[j]);
      max_scale = scales[j];
    }
  }
  std::memset(out->scales, 0, sizeof out->scales);
  out->d = 0;
  if (max_scale != 0.0f) {
    const float iscale = -32.0f / max_scale;
    for (int j = 0; j < kQK_K / 16; ++j) {
      // Through int8_t as GGML does (|iscale · scale| <= 32, so nothing wraps).
      const int8_t rounded = static_cast<int8_t>(detail::nearest_int(iscale * scales[j]));
      set_q3_k_scale(out, j, std::clamp<int>(rounded, -32, 31) + 32);
    }
    out->d = fp32_to_fp16(1 / iscale);
  }
  round_and_pack_q3_k(x, levels, out);
}

// GGML's make_qx_quants with rmse_type 1 (weights x², or qw: [n] importance weights): levels L in
// 0..2 nmax - 1 (signed value L - nmax) for x: [n]; start from the largest magnitude at -nmax, then try
// 18 nearby inverse scales, each with a least-squares scale, and keep the best. Returns the scale. Q6_K's
// sub-blocks of 16 use nmax 32; with importance, Q4_0's blocks of 32 nmax 8 and Q5_0's 16.
float fit_signed_levels(const float* x, int n, int nmax, int8_t* levels, const float* qw) {
  const float max = detail::signed_absmax(x, n);
  if (std::fabs(max) < 1e-15f) {  // GGML's GROUP_MAX_EPS: all zero
    for (int i = 0; i < n; ++i) levels[i] = 0;
    return 0.0f;
  }
  auto fit = [&](float iscale, float* sum_lx, float* sum_l2, int8_t* out) {
    *sum_lx = 0;
    *sum_l2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::clamp(detail::nearest_int(iscale * x[i]), -nmax, nmax - 1);
      if (out != nullptr) out[i] = static_cast<int8_t>(l + nmax);
      const float w = qw != nullptr ? qw[i] : x[i] * x[i];
      *sum_lx += w * x[i] * static_cast<float>(l);
      *sum_l2 += w * static_cast<float>(l) * static_cast<float>(l);  // (w·l)·l, as GGML rounds it
    }
  };
  float sum_lx = 0, sum_l2 = 0;
  fit(-nmax / max, &sum_lx, &sum_l2, levels);
  float scale = sum_l2 != 0 ? sum_lx / sum_l2 : 0.0f;
  float best = scale * sum_lx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    const float iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(is)) / max;
    fit(iscale, &sum_lx, &sum_l2, nullptr);
    if (sum_l2 > 0 && sum_lx * sum_lx > best * sum_l2) {
      fit(iscale, &sum_lx, &sum_l2, levels);
      scale = sum_lx / sum_l2;
      best = scale * sum_lx;
    }
  }
  return scale;
}

float q6_k_sub_block_fit(const float* x, int8_t* levels, const float* qw = nullptr) {
  return fit_signed_levels(x, 16, 32, levels, qw);
}

// GGML's best_index_int8 over kIQ4Values: the index of the table value nearest x (the upper one on a tie).
int nearest_iq4_index(float x) {
  if (x <= kIQ4Values[0]) return 0;
  if (x >= kIQ4Values[15]) return 15;
  int lo = 0, hi = 15;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (x < kIQ4Values[mid]) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return x - kIQ4Values[hi - 1] < kIQ4Values[hi] - x ? hi - 1 : hi;
}

// GGML's quantize_row_iq4_nl_impl. With tries = 7, what llama-quantize runs for IQ4_NL (super_block 32:
// one block, its fp16 scale) and IQ4_XS (256: 8 blocks of 32 with 6-bit scales relative to d = -max / 32):
// each block's scale from the value of largest magnitude at the table's end, refined over 15 nearby
// inverse scales by weighted least squares (weights x², or qw · sqrt(2·mean(x²) + x²) with an importance
// row), then every element's index re-chosen against the stored scale. With tries = -1, IQ4_NL's
// reference (quantize_row_iq4_nl_ref, what llama.cpp writes into a KV cache): the largest magnitude at
// the table's other end, one least-squares scale, the first indices kept. x, qw: [super_block]; qs:
// [super_block / 2]; scales_h / scales_l: IQ4_XS's (unused for IQ4_NL).
void quantize_iq4_super_block(const float* x, const float* qw, int super_block, int tries, f16_bits* d_out,
                              uint8_t* qs, uint16_t* scales_h, uint8_t* scales_l) {
  constexpr int kBlock = 32;
  const int n_blocks = super_block / kBlock;
  float sigma2 = 0;
  for (int j = 0; j < super_block; ++j) sigma2 += x[j] * x[j];
  sigma2 *= 2.0f / static_cast<float>(super_block);
  std::memset(qs, 0, static_cast<size_t>(super_block / 2));
  *d_out = fp32_to_fp16(0.0f);
  uint8_t levels[kQK_K];
  float scales[kQK_K / kBlock];
  float max_scale = 0, amax_scale = 0;
  for (int ib = 0; ib < n_blocks; ++ib) {
    const float* xb = x + ib * kBlock;
    uint8_t* lb = levels + ib * kBlock;
    float weight[kBlock];
    for (int j = 0; j < kBlock; ++j)
      weight[j] = qw != nullptr ? qw[ib * kBlock + j] * std::sqrt(sigma2 + xb[j] * xb[j]) : xb[j] * xb[j];
    const float max = detail::signed_absmax(xb, kBlock);
    if (std::fabs(max) < 1e-15f) {
      scales[ib] = 0;
      continue;
    }
    float d = tries > 0 ? -max / kIQ4Values[0] : max / kIQ4Values[0];
    float id = 1 / d;
    float sum_qx = 0, sum_q2 = 0;
    for (int j = 0; j < kBlock; ++j) {
      const int l = nearest_iq4_index(id * xb[j]);
      lb[j] = static_cast<uint8_t>(l);
      const float q = kIQ4Values[l];
      sum_qx += weight[j] * q * xb[j];
      sum_q2 += weight[j] * q * q;
    }
    d = sum_q2 > 0 ? sum_qx / sum_q2 : 0.0f;
    float best = d * sum_qx;
    for (int attempt = -tries; attempt <= tries; ++attempt) {
      id = static_cast<float>(attempt + kIQ4Values[0]) / max;
      sum_qx = sum_q2 = 0;
      for (int j = 0; j < kBlock; ++j) {
        const float q = kIQ4Values[nearest_iq4_index(id * xb[j])];
        sum_qx += weight[j] * q * xb[j];
        sum_q2 += weight[j] * q * q;
      }
      if (sum_q2 > 0 && sum_qx * sum_qx > best * sum_q2) {
        d = sum_qx / sum_q2;
        best = d * sum_qx;
      }
    }
    scales[ib] = d;
    if (std::fabs(d) > amax_scale) {
      amax_scale = std::fabs(d);
      max_scale = d;
    }
  }
  if (n_blocks > 1) {
    *scales_h = 0;
    const float d = -max_scale / 32;
    *d_out = fp32_to_fp16(d);
    const float id = d != 0.0f ? 1 / d : 0.0f;
    for (int ib = 0; ib < n_blocks; ++ib) {
      const int l = std::clamp(detail::nearest_int(id * scales[ib]), -32, 31);
      const float dl = d * static_cast<float>(l);
      const float idl = dl != 0.0f ? 1 / dl : 0.0f;
      for (int j = 0; j < kBlock; ++j)
        levels[ib * kBlock + j] = static_cast<uint8_t>(nearest_iq4_index(idl * x[ib * kBlock + j]));
      const int stored = l + 32;
      if (ib % 2 == 0) {
        scales_l[ib / 2] = static_cast<uint8_t>(stored & 0xF);
      } else {
        scales_l[ib / 2] = static_cast<uint8_t>(scales_l[ib / 2] | ((stored & 0xF) << 4));
      }
      *scales_h = static_cast<uint16_t>(*scales_h | ((stored >> 4) << (2 * (ib % 8))));
    }
  } else {
    *d_out = fp32_to_fp16(scales[0]);
    if (tries > 0) {
      const float id = scales[0] != 0.0f ? 1 / scales[0] : 0.0f;
      for (int j = 0; j < super_block; ++j) levels[j] = static_cast<uint8_t>(nearest_iq4_index(id * x[j]));
    } else if (scales[0] == 0.0f) {
      std::memset(levels, 0, static_cast<size_t>(super_block));  // a zero block (GGML leaves them unset)
    }
  }
  for (int i = 0; i < super_block / 32; ++i)
    for (int j = 0; j < 16; ++j)
      qs[16 * i + j] = static_cast<uint8_t>(levels[32 * i + j] | (levels[32 * i + 16 + j] << 4));
}

// tries: 7 as llama-quantize, -1 for IQ4_NL's reference (see quantize_iq4_super_block).
void quantize_row_iq4(DType type, const float* x, const float* qw, void* out, int64_t n, int tries = 7) {
  if (type == DType::IQ4_NL) {
    auto* dst = static_cast<BlockIQ4_NL*>(out);
    for (int64_t b = 0; b < n / kQK4_0; ++b) {
      quantize_iq4_super_block(x + b * kQK4_0, qw != nullptr ? qw + b * kQK4_0 : nullptr, kQK4_0, tries,
                               &dst[b].d, dst[b].qs, nullptr, nullptr);
    }
  } else {
    auto* dst = static_cast<BlockIQ4_XS*>(out);
    for (int64_t b = 0; b < n / kQK_K; ++b) {
      quantize_iq4_super_block(x + b * kQK_K, qw != nullptr ? qw + b * kQK_K : nullptr, kQK_K, tries,
                               &dst[b].d, dst[b].qs, &dst[b].scales_h, dst[b].scales_l);
    }
  }
}

// GGML's quantize_row_q2_K_impl for one super-block with importance weights qw: [256]: each sub-block of
// 16 fitted with weights qw · sqrt(mean(x²) + x²) (make_qkx3_quants: levels 0..3), its scale and min
// stored as 4-bit levels by make_qp_quants, then every element re-rounded.
void quantize_block_q2_k_weighted(const float* x, const float* qw, BlockQ2_K* out) {
  constexpr SubBlockGrid kGrid{3, -0.9f, 36, false, 0.05f};
  float sum_x2 = 0;
  for (int l = 0; l < kQK_K; ++l) sum_x2 += x[l] * x[l];
  const float sigma2 = sum_x2 / kQK_K;
  uint8_t levels[kQK_K];
  float scales[kQK_K / 16], mins[kQK_K / 16], sum_weights[kQK_K / 16];
  for (int j = 0; j < kQK_K / 16; ++j) {
    float weights[16];
    for (int l = 0; l < 16; ++l)
      weights[l] = qw[16 * j + l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
    sum_weights[j] = 0;
    for (int l = 0; l < 16; ++l) sum_weights[j] += weights[l];
    scales[j] = fit_sub_block(x + 16 * j, weights, 16, kGrid, &mins[j], levels + 16 * j);
  }
  uint8_t scale_levels[kQK_K / 16], min_levels[kQK_K / 16];
  out->d = fp32_to_fp16(fit_positive_levels(kQK_K / 16, 15, scales, scale_levels, sum_weights));
  out->dmin = fp32_to_fp16(fit_positive_levels(kQK_K / 16, 15, mins, min_levels, sum_weights));
  for (int j = 0; j < kQK_K / 16; ++j)
    out->scales[j] = static_cast<uint8_t>(scale_levels[j] | (min_levels[j] << 4));
  round_and_pack_q2_k(x, levels, out);
}

// GGML's quantize_row_q3_K_impl for one super-block with importance weights qw: [256]: each sub-block
// fitted by make_qx_quants with weights qw · sqrt(2·mean(x²) + x²), the 16 scales themselves stored by
// make_qx_quants (6 bits, weighted by the sub-blocks' summed weights), then every element re-rounded.
void quantize_block_q3_k_weighted(const float* x, const float* qw, BlockQ3_K* out) {
  float sum_x2 = 0;
  for (int l = 0; l < kQK_K; ++l) sum_x2 += x[l] * x[l];
  const float sigma2 = 2 * sum_x2 / kQK_K;
  int8_t levels[kQK_K];
  float scales[kQK_K / 16], sum_weights[kQK_K / 16];
  for (int j = 0; j < kQK_K / 16; ++j) {
    float weights[16];
    for (int l = 0; l < 16; ++l)
      weights[l] = qw[16 * j + l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
    sum_weights[j] = 0;
    for (int l = 0; l < 16; ++l) sum_weights[j] += weights[l];
    scales[j] = fit_signed_levels(x + 16 * j, 16, 4, levels + 16 * j, weights);
  }
  int8_t scale_levels[kQK_K / 16];
  const float d_block = fit_signed_levels(scales, kQK_K / 16, 32, scale_levels, sum_weights);
  std::memset(out->scales, 0, sizeof out->scales);
  for (int j = 0; j < kQK_K / 16; ++j) set_q3_k_scale(out, j, scale_levels[j]);
  out->d = fp32_to_fp16(d_block);
  round_and_pack_q3_k(x, levels, out);
}

// GGML's quantize_row_q4_0_impl / _q4_1_impl / _q5_0_impl / _q5_1_impl: each block of 32 fitted with
// weights qw · sqrt(mean(x²) over the row + x²), its levels kept as fitted (no re-rounding against the
// fp16 scale, unlike the reference quantizers). x, qw: [n].
template <typename Block>
void quantize_row_block32_weighted(const float* x, const float* qw, Block* out, int64_t n) {
  float sum_x2 = 0;
  for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
  const float sigma2 = sum_x2 / static_cast<float>(n);
  for (int64_t b = 0; b < n / kQK4_0; ++b) {
    const float* xb = x + b * kQK4_0;
    float weight[kQK4_0];
    for (int j = 0; j < kQK4_0; ++j) weight[j] = qw[b * kQK4_0 + j] * std::sqrt(sigma2 + xb[j] * xb[j]);
    int levels[kQK4_0];
    if constexpr (std::is_same_v<Block, BlockQ4_0> || std::is_same_v<Block, BlockQ5_0>) {
      constexpr int nmax = std::is_same_v<Block, BlockQ4_0> ? 8 : 16;
      int8_t l[kQK4_0];
      out[b].d = fp32_to_fp16(fit_signed_levels(xb, kQK4_0, nmax, l, weight));
      for (int j = 0; j < kQK4_0; ++j) levels[j] = l[j];
    } else {
      constexpr SubBlockGrid grid = std::is_same_v<Block, BlockQ4_1> ? kQ4_KWeightedGrid : kQ5_KWeightedGrid;
      uint8_t l[kQK4_0];
      float offset = 0;
      out[b].d = fp32_to_fp16(fit_sub_block(xb, weight, kQK4_0, grid, &offset, l));
      out[b].m = fp32_to_fp16(-offset);
      for (int j = 0; j < kQK4_0; ++j) levels[j] = l[j];
    }
    if constexpr (requires { out[b].qh; }) {
      pack_q5_levels(levels, out[b].qh, out[b].qs);
    } else {
      for (int j = 0; j < kQK4_0 / 2; ++j)
        out[b].qs[j] = static_cast<uint8_t>(levels[j] | (levels[j + kQK4_0 / 2] << 4));
    }
  }
}

// GGML's quantize_row_q6_K_ref for one super-block: 16 sub-blocks of 16 with int8 scales relative
// to the super-block's fp16 d = -(largest-magnitude scale) / 128, elements re-rounded against the
// stored scales; 6-bit levels split into ql (low 4 bits) and qh (high 2 bits).
void quantize_block_q6_k(const float* x, BlockQ6_K* out, const float* qw = nullptr) {
  int8_t levels[kQK_K];
  float scales[kQK_K / 16];
  float max_scale = 0, max_abs_scale = 0;
  for (int ib = 0; ib < kQK_K / 16; ++ib) {
    scales[ib] = q6_k_sub_block_fit(x + 16 * ib, levels + 16 * ib, qw != nullptr ? qw + 16 * ib : nullptr);
    if (std::fabs(scales[ib]) > max_abs_scale) {
      max_abs_scale = std::fabs(scales[ib]);
      max_scale = scales[ib];
    }
  }
  if (max_abs_scale < 1e-15f) {
    std::memset(out, 0, sizeof(BlockQ6_K));
    return;
  }
  const float iscale = -128.0f / max_scale;
  out->d = fp32_to_fp16(1 / iscale);
  for (int ib = 0; ib < kQK_K / 16; ++ib)
    out->scales[ib] = static_cast<int8_t>(std::min(127, detail::nearest_int(iscale * scales[ib])));
  for (int j = 0; j < kQK_K / 16; ++j) {
    const float d = fp16_to_fp32(out->d) * out->scales[j];
    if (d == 0.0f) continue;
    for (int i = 0; i < 16; ++i)
      levels[16 * j + i] =
          static_cast<int8_t>(std::clamp(detail::nearest_int(x[16 * j + i] / d), -32, 31) + 32);
  }
  detail::q6_k_pack_levels(reinterpret_cast<const uint8_t*>(levels), out->ql, out->qh);
}

void dequantize_block_q4_0(const BlockQ4_0& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  for (int j = 0; j < kQK4_0 / 2; ++j) {
    y[j] = static_cast<float>((block.qs[j] & 0xF) - 8) * d;
    y[j + kQK4_0 / 2] = static_cast<float>((block.qs[j] >> 4) - 8) * d;
  }
}

void dequantize_block_q8_0(const BlockQ8_0& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  for (int j = 0; j < kQK8_0; ++j) y[j] = static_cast<float>(block.qs[j]) * d;
}

// Q4_K: 8 sub-blocks of 32; sub-block pairs share 32 bytes of qs (low nibbles first, then high).
void dequantize_block_q4_k(const BlockQ4_K& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  const float dmin = fp16_to_fp32(block.dmin);
  const uint8_t* q = block.qs;
  for (int pair = 0; pair < 4; ++pair) {
    uint8_t scale_lo, min_lo, scale_hi, min_hi;
    detail::q4_k_scale_min(2 * pair, block.scales, &scale_lo, &min_lo);
    detail::q4_k_scale_min(2 * pair + 1, block.scales, &scale_hi, &min_hi);
    for (int l = 0; l < 32; ++l) y[l] = d * scale_lo * (q[l] & 0xF) - dmin * min_lo;
    for (int l = 0; l < 32; ++l) y[32 + l] = d * scale_hi * (q[l] >> 4) - dmin * min_hi;
    y += 64;
    q += 32;
  }
}

// Q5_K: Q4_K plus each element's fifth bit (bit s of qh[l] for element l of sub-block s).
void dequantize_block_q5_k(const BlockQ5_K& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  const float dmin = fp16_to_fp32(block.dmin);
  for (int sub = 0; sub < 8; ++sub) {
    uint8_t scale, min;
    detail::q4_k_scale_min(sub, block.scales, &scale, &min);
    const uint8_t* q = block.qs + 32 * (sub / 2);
    const int shift = 4 * (sub % 2);
    for (int l = 0; l < 32; ++l) {
      const int level = ((q[l] >> shift) & 0xF) | (((block.qh[l] >> sub) & 1) << 4);
      y[32 * sub + l] = d * scale * level - dmin * min;
    }
  }
}

// Q2_K: per sub-block of 16, (d · sc) · level − dmin · m.
void dequantize_block_q2_k(const BlockQ2_K& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  const float dmin = fp16_to_fp32(block.dmin);
  for (int e = 0; e < kQK_K; ++e) {
    const uint8_t sc = block.scales[e / 16];
    y[e] = d * static_cast<float>(sc & 0xF) * static_cast<float>(q2_k_low_bits(block.qs, e)) -
           dmin * static_cast<float>(sc >> 4);
  }
}

// Q3_K: per sub-block of 16, (d · scale) · (level − 4).
void dequantize_block_q3_k(const BlockQ3_K& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  for (int e = 0; e < kQK_K; ++e)
    y[e] = d * static_cast<float>(q3_k_scale(block, e / 16)) * static_cast<float>(q3_k_level(block, e) - 4);
}

// Q5_0: d · (level − 16).
void dequantize_block_q5_0(const BlockQ5_0& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  for (int j = 0; j < kQK4_0; ++j) y[j] = static_cast<float>(detail::block32_level(block, j) - 16) * d;
}

// Q4_1 and Q5_1: d · level + m.
template <typename Block>
void dequantize_block_q4_1_or_q5_1(const Block& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  const float m = fp16_to_fp32(block.m);
  for (int j = 0; j < kQK4_0; ++j) y[j] = static_cast<float>(detail::block32_level(block, j)) * d + m;
}

// IQ4_NL: d · kIQ4Values[index], Q4_0's nibble order.
void dequantize_block_iq4_nl(const BlockIQ4_NL& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  for (int j = 0; j < kQK4_0 / 2; ++j) {
    y[j] = d * kIQ4Values[block.qs[j] & 0xF];
    y[j + kQK4_0 / 2] = d * kIQ4Values[block.qs[j] >> 4];
  }
}

// IQ4_XS: per sub-block of 32, d · scale · kIQ4Values[index].
void dequantize_block_iq4_xs(const BlockIQ4_XS& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  for (int s = 0; s < 8; ++s) {
    const float dl = d * static_cast<float>(iq4_xs_scale(block, s));
    for (int j = 0; j < 16; ++j) {
      y[32 * s + j] = dl * kIQ4Values[block.qs[16 * s + j] & 0xF];
      y[32 * s + j + 16] = dl * kIQ4Values[block.qs[16 * s + j] >> 4];
    }
  }
}

// Q6_K: two halves of 128; in each, ql[0..63] and qh[0..31] give four runs of 32 six-bit values
// (minus 32), each 16 elements with their own int8 scale.
void dequantize_block_q6_k(const BlockQ6_K& block, float* y) {
  const float d = fp16_to_fp32(block.d);
  const uint8_t* ql = block.ql;
  const uint8_t* qh = block.qh;
  const int8_t* sc = block.scales;
  for (int half = 0; half < 2; ++half) {
    for (int l = 0; l < 32; ++l) {
      const int group = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[group + 0] * q1;
      y[l + 32] = d * sc[group + 2] * q2;
      y[l + 64] = d * sc[group + 4] * q3;
      y[l + 96] = d * sc[group + 6] * q4;
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

bool valid_row(DType type, const void* p, const float* x, int64_t n) {
  if (p == nullptr || x == nullptr || n < 0) return false;
  return n % type_info(type).block_elems == 0;
}

}  // namespace

Status quantize_cache_row(DType type, const float* x, void* out, int64_t n) {
  if (type != DType::IQ4_NL) return quantize_row(type, x, out, n);
  if (!valid_row(type, out, x, n)) return Status::invalid_argument;
  quantize_row_iq4(type, x, nullptr, out, n, -1);
  return Status::ok;
}

Status quantize_activations(DType type, const float* x, void* out, int64_t n) {
  if (type != DType::Q8_0 && type != DType::Q8_1) return quantize_row(type, x, out, n);
  if (!valid_row(type, out, x, n)) return Status::invalid_argument;
  for (int64_t b = 0; b < n / kQK8_0; ++b) {
    if (type == DType::Q8_0)
      detail::quantize_activation_block_q8_0(x + b * kQK8_0, static_cast<BlockQ8_0*>(out) + b);
    else
      detail::quantize_activation_block_q8_1(x + b * kQK8_0, static_cast<BlockQ8_1*>(out) + b);
  }
  return Status::ok;
}

Status quantize_row(DType type, const float* x, void* out, int64_t n) {
  if (type_info(static_cast<uint32_t>(type)) == nullptr) return Status::unsupported_type;
  if (!valid_row(type, out, x, n)) return Status::invalid_argument;
  switch (type) {
    case DType::F32:
      std::memcpy(out, x, static_cast<size_t>(n) * sizeof(float));
      break;
    case DType::F16: {
      auto* dst = static_cast<f16_bits*>(out);
      for (int64_t i = 0; i < n; ++i) dst[i] = fp32_to_fp16(x[i]);
      break;
    }
    case DType::BF16: {
      auto* dst = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) dst[i] = fp32_to_bf16(x[i]);
      break;
    }
    case DType::Q4_0: {
      auto* dst = static_cast<BlockQ4_0*>(out);
      for (int64_t b = 0; b < n / kQK4_0; ++b) quantize_block_q4_0(x + b * kQK4_0, dst + b);
      break;
    }
    case DType::Q4_1: {
      auto* dst = static_cast<BlockQ4_1*>(out);
      for (int64_t b = 0; b < n / kQK4_0; ++b) quantize_block_q4_1(x + b * kQK4_0, dst + b);
      break;
    }
    case DType::Q5_0: {
      auto* dst = static_cast<BlockQ5_0*>(out);
      for (int64_t b = 0; b < n / kQK4_0; ++b) quantize_block_q5_0(x + b * kQK4_0, dst + b);
      break;
    }
    case DType::Q5_1: {
      auto* dst = static_cast<BlockQ5_1*>(out);
      for (int64_t b = 0; b < n / kQK4_0; ++b) quantize_block_q5_1(x + b * kQK4_0, dst + b);
      break;
    }
    case DType::Q8_0: {
      auto* dst = static_cast<BlockQ8_0*>(out);
      for (int64_t b = 0; b < n / kQK8_0; ++b) detail::quantize_block_q8_0(x + b * kQK8_0, dst + b);
      break;
    }
    case DType::Q2_K: {
      auto* dst = static_cast<BlockQ2_K*>(out);
      for (int64_t b = 0; b < n / kQK_K; ++b) quantize_block_q2_k(x + b * kQK_K, dst + b);
      break;
    }
    case DType::Q3_K: {
      auto* dst = static_cast<BlockQ3_K*>(out);
      for (int64_t b = 0; b < n / kQK_K; ++b) quantize_block_q3_k(x + b * kQK_K, dst + b);
      break;
    }
    case DType::Q4_K: {
      auto* dst = static_cast<BlockQ4_K*>(out);
      for (int64_t b = 0; b < n / kQK_K; ++b) quantize_block_q4_k(x + b * kQK_K, dst + b);
      break;
    }
    case DType::Q5_K: {
      auto* dst = static_cast<BlockQ5_K*>(out);
      for (int64_t b = 0; b < n / kQK_K; ++b) quantize_block_q5_k(x + b * kQK_K, dst + b);
      break;
    }
    case DType::Q6_K: {
      auto* dst = static_cast<BlockQ6_K*>(out);
      for (int64_t b = 0; b < n / kQK_K; ++b) quantize_block_q6_k(x + b * kQK_K, dst + b);
      break;
    }
    case DType::IQ4_NL:
    case DType::IQ4_XS:
      quantize_row_iq4(type, x, nullptr, out, n);
      break;
    case DType::Q8_1: {
      auto* dst = static_cast<BlockQ8_1*>(out);
      for (int64_t b = 0; b < n / kQK8_0; ++b) detail::quantize_block_q8_1(x + b * kQK8_0, dst + b);
      break;
    }
    case DType::Q8_K: {
      auto* dst = static_cast<BlockQ8_K*>(out);
      for (int64_t b = 0; b < n / kQK_K; ++b) detail::quantize_block_q8_k(x + b * kQK_K, dst + b);
      break;
    }
    default:
      return Status::unsupported_type;
  }
  return Status::ok;
}

namespace {

// quantize(x_b, importance_b, &block_b) for each super-block of 256 of a row; x, importance: [n].
template <typename Block, typename Quantize>
Status quantize_super_blocks(const float* x, const float* importance, void* out, int64_t n,
                             Quantize quantize) {
  auto* dst = static_cast<Block*>(out);
  for (int64_t b = 0; b < n / kQK_K; ++b) quantize(x + b * kQK_K, importance + b * kQK_K, dst + b);
  return Status::ok;
}

}  // namespace

Status quantize_row_weighted(DType type, const float* x, const float* importance, void* out, int64_t n) {
  if (importance == nullptr) return quantize_row(type, x, out, n);
  if (type_info(static_cast<uint32_t>(type)) == nullptr) return Status::unsupported_type;
  if (!valid_row(type, out, x, n)) return Status::invalid_argument;
  switch (type) {
    case DType::Q2_K:
      return quantize_super_blocks<BlockQ2_K>(x, importance, out, n, quantize_block_q2_k_weighted);
    case DType::Q3_K:
      return quantize_super_blocks<BlockQ3_K>(x, importance, out, n, quantize_block_q3_k_weighted);
    case DType::Q4_K:
      return quantize_super_blocks<BlockQ4_K>(
          x, importance, out, n,
          [](const float* xb, const float* qw, BlockQ4_K* b) { quantize_block_q4_k(xb, b, qw); });
    case DType::Q5_K:
      return quantize_super_blocks<BlockQ5_K>(
          x, importance, out, n,
          [](const float* xb, const float* qw, BlockQ5_K* b) { quantize_block_q5_k(xb, b, qw); });
    case DType::Q6_K:
      return quantize_super_blocks<BlockQ6_K>(
          x, importance, out, n,
          [](const float* xb, const float* qw, BlockQ6_K* b) { quantize_block_q6_k(xb, b, qw); });
    case DType::IQ4_NL:
    case DType::IQ4_XS:
      quantize_row_iq4(type, x, importance, out, n);
      return Status::ok;
    case DType::Q4_0:
      quantize_row_block32_weighted(x, importance, static_cast<BlockQ4_0*>(out), n);
      return Status::ok;
    case DType::Q4_1:
      quantize_row_block32_weighted(x, importance, static_cast<BlockQ4_1*>(out), n);
      return Status::ok;
    case DType::Q5_0:
      quantize_row_block32_weighted(x, importance, static_cast<BlockQ5_0*>(out), n);
      return Status::ok;
    case DType::Q5_1:
      quantize_row_block32_weighted(x, importance, static_cast<BlockQ5_1*>(out), n);
      return Status::ok;
    case DType::F32:
    case DType::F16:
    case DType::BF16:
    case DType::Q8_0:  // GGML's quantize_q8_0 takes no importance either
      return quantize_row(type, x, out, n);
    default:
      return Status::unsupported_type;
  }
}

float fit_q4_k_sub_block(const float* x, float* offset) {
  float weights[32];
  sub_block_weights(x, weights);
  return fit_sub_block(x, weights, 32, kQ4_KGrid, offset);
}

float fit_q5_k_sub_block(const float* x, float* offset) {
  float weights[32];
  sub_block_weights(x, weights);
  return fit_sub_block(x, weights, 32, kQ5_KGrid, offset);
}

float fit_q6_k_sub_block(const float* x) {
  int8_t levels[16];
  return q6_k_sub_block_fit(x, levels);
}

float fit_q2_k_sub_block(const float* x, float* offset) {
  float weights[16];
  for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[l]);
  return fit_sub_block(x, weights, 16, kQ2_KGrid, offset);
}

float fit_q3_k_sub_block(const float* x) {
  int8_t levels[16];
  return q3_k_sub_block_fit(x, levels);
}

Status dequantize_row(DType type, const void* src, float* y, int64_t n) {
  if (type_info(static_cast<uint32_t>(type)) == nullptr) return Status::unsupported_type;
  if (!valid_row(type, src, y, n)) return Status::invalid_argument;
  const int64_t n_blocks = n / type_info(type).block_elems;
  switch (type) {
    case DType::F32:
      std::memcpy(y, src, static_cast<size_t>(n) * sizeof(float));
      break;
    case DType::F16: {
      const auto* s = static_cast<const f16_bits*>(src);
      for (int64_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(s[i]);
      break;
    }
    case DType::BF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_fp32(s[i]);
      break;
    }
    case DType::Q4_0:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q4_0(static_cast<const BlockQ4_0*>(src)[b], y + b * kQK4_0);
      break;
    case DType::Q4_1:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q4_1_or_q5_1(static_cast<const BlockQ4_1*>(src)[b], y + b * kQK4_0);
      break;
    case DType::Q5_0:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q5_0(static_cast<const BlockQ5_0*>(src)[b], y + b * kQK4_0);
      break;
    case DType::Q5_1:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q4_1_or_q5_1(static_cast<const BlockQ5_1*>(src)[b], y + b * kQK4_0);
      break;
    case DType::Q8_0:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q8_0(static_cast<const BlockQ8_0*>(src)[b], y + b * kQK8_0);
      break;
    case DType::Q2_K:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q2_k(static_cast<const BlockQ2_K*>(src)[b], y + b * kQK_K);
      break;
    case DType::Q3_K:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q3_k(static_cast<const BlockQ3_K*>(src)[b], y + b * kQK_K);
      break;
    case DType::Q4_K:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q4_k(static_cast<const BlockQ4_K*>(src)[b], y + b * kQK_K);
      break;
    case DType::Q5_K:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q5_k(static_cast<const BlockQ5_K*>(src)[b], y + b * kQK_K);
      break;
    case DType::Q6_K:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_q6_k(static_cast<const BlockQ6_K*>(src)[b], y + b * kQK_K);
      break;
    case DType::IQ4_NL:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_iq4_nl(static_cast<const BlockIQ4_NL*>(src)[b], y + b * kQK4_0);
      break;
    case DType::IQ4_XS:
      for (int64_t b = 0; b < n_blocks; ++b)
        dequantize_block_iq4_xs(static_cast<const BlockIQ4_XS*>(src)[b], y + b * kQK_K);
      break;
    case DType::IQ2_XXS:
    case DType::IQ2_XS:
    case DType::IQ2_S:
    case DType::IQ3_XXS:
    case DType::IQ3_S:
    case DType::IQ1_S:
    case DType::IQ1_M:
    case DType::TQ1_0:
    case DType::TQ2_0:
    case DType::MXFP4:
      dequantize_read_only_blocks(type, src, y, n_blocks);
      break;
    case DType::Q8_1:
      for (int64_t b = 0; b < n_blocks; ++b) {
        const BlockQ8_1& block = static_cast<const BlockQ8_1*>(src)[b];
        for (int j = 0; j < kQK8_0; ++j)
          y[b * kQK8_0 + j] = fp16_to_fp32(block.d) * static_cast<float>(block.qs[j]);
      }
      break;
    case DType::Q8_K:
      for (int64_t b = 0; b < n_blocks; ++b) {
        const BlockQ8_K& block = static_cast<const BlockQ8_K*>(src)[b];
        for (int j = 0; j < kQK_K; ++j) y[b * kQK_K + j] = block.d * static_cast<float>(block.qs[j]);
      }
      break;
  }
  return Status::ok;
}

}  // namespace nibble::kernels
