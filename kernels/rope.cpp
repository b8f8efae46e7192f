#include "kernels/rope.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace nibble::kernels {

float rope_theta_scale(float base, int64_t rot_dims) {
  return std::pow(base, -2.0f / static_cast<float>(rot_dims));
}

namespace {

// Pair i's unscaled angle theta, divided by its frequency factor and times the linear scale, with
// YaRN's ramp between the two (ggml's rope_yarn, in its order): one expression for rope_normal and
// rope_angle, so their bits agree. The mix is one fused multiply-add, as llama.cpp's x86 builds
// contract it (its angles then equal ours bit for bit; a separate product and sum differed in 40 of
// 1392 angles of the YaRN test model).
float scaled_angle(float theta, int64_t i, const RopeScaling& scaling) {
  if (scaling.freq_factors != nullptr) theta /= scaling.freq_factors[i];
  const float interpolated = scaling.freq_scale * theta;
  if (!scaling.yarn) return interpolated;
  const float y =
      (static_cast<float>(i) - scaling.yarn_low) / std::max(0.001f, scaling.yarn_high - scaling.yarn_low);
  const float ramp = 1.0f - std::min(1.0f, std::max(0.0f, y));
  return std::fma(interpolated, 1.0f - ramp, theta * ramp);
}

// ggml_rope_yarn_corr_dim: the pair index at which a wavelength turns n_rot times over n_ctx_orig.
float yarn_corr_dim(int64_t rot_dims, int64_t n_ctx_orig, float n_rot, float base) {
  return static_cast<float>(rot_dims) *
         std::log(static_cast<float>(n_ctx_orig) / (n_rot * 2.0f * static_cast<float>(M_PI))) /
         (2.0f * std::log(base));
}

}  // namespace

RopeScaling rope_yarn_scaling(float freq_scale, const float* freq_factors, int64_t rot_dims,
                              int64_t n_ctx_orig, float base, float attn_factor) {
  RopeScaling s;
  s.freq_scale = freq_scale;
  s.freq_factors = freq_factors;
  s.yarn = true;
  // ggml_rope_yarn_corr_dims with llama.cpp's defaults for Llama (beta_fast 32, beta_slow 1).
  s.yarn_low = std::max(0.0f, std::floor(yarn_corr_dim(rot_dims, n_ctx_orig, 32.0f, base)));
  s.yarn_high =
      std::min(static_cast<float>(rot_dims - 1), std::ceil(yarn_corr_dim(rot_dims, n_ctx_orig, 1.0f, base)));
  // llama_context: yarn_attn_factor = get_mscale(factor) cancelled by 1 / (1 + 0.1 ln factor) (ggml's
  // rope_yarn multiplies it back), where factor = 1 / freq_scale, times the file's attn_factor; then
  // rope_yarn's own factor.
  const float factor = 1.0f / freq_scale;
  float yarn_attn_factor = factor <= 1.0f ? 1.0f : 0.1f * 1.0f * std::log(factor) + 1.0f;
  yarn_attn_factor *= 1.0f / (1.0f + 0.1f * std::log(factor));
  yarn_attn_factor *= attn_factor;
  s.mscale = yarn_attn_factor * (1.0f + 0.1f * std::log(1.0f / freq_scale));
  return s;
}

float rope_angle(int32_t pos, int64_t i, float theta_scale, const RopeScaling& scaling) {
  float theta = static_cast<float>(pos);
  for (int64_t s = 0; s < i; ++s) theta *= theta_scale;
  return scaled_angle(theta, i, scaling);
}

Status rope_normal(float* x, const int32_t* positions, int64_t tokens, int64_t n_heads, int64_t head_dim,
                   int64_t rot_dims, float base, const RopeScaling& scaling) {
  if (x == nullptr || positions == nullptr || tokens < 0 || n_heads <= 0 || head_dim <= 0 || rot_dims <= 0 ||
      rot_dims > head_dim || rot_dims % 2 != 0 || !(base > 0.0f) || !(scaling.freq_scale > 0.0f) ||
      !std::isfinite(scaling.freq_scale) || !(scaling.mscale > 0.0f) || !std::isfinite(scaling.mscale) ||
      (scaling.yarn && !(std::isfinite(scaling.yarn_low) && std::isfinite(scaling.yarn_high)))) {
    return Status::invalid_argument;
  }
  if (scaling.freq_factors != nullptr) {
    for (int64_t i = 0; i < rot_dims / 2; ++i) {
      if (!(scaling.freq_factors[i] > 0.0f) || !std::isfinite(scaling.freq_factors[i])) {
        return Status::invalid_argument;
      }
    }
  }
  // Same recurrence as ggml (theta *= base^(-2/d), then theta / factor * scale) so angles match
  // llama.cpp to the last bit.
  const float theta_scale = rope_theta_scale(base, rot_dims);
  std::vector<float> cos_table(rot_dims / 2), sin_table(rot_dims / 2);
  for (int64_t t = 0; t < tokens; ++t) {
    float theta = static_cast<float>(positions[t]);
    for (int64_t i = 0; i < rot_dims / 2; ++i) {
      const float angle = scaled_angle(theta, i, scaling);
      cos_table[i] = std::cos(angle) * scaling.mscale;
      sin_table[i] = std::sin(angle) * scaling.mscale;
      theta *= theta_scale;
    }
    for (int64_t h = 0; h < n_heads; ++h) {
      float* head = x + (t * n_heads + h) * head_dim;
      for (int64_t i = 0; i < rot_dims / 2; ++i) {
        const float x0 = head[2 * i];
        const float x1 = head[2 * i + 1];
        head[2 * i] = x0 * cos_table[i] - x1 * sin_table[i];
        head[2 * i + 1] = x0 * sin_table[i] + x1 * cos_table[i];
      }
    }
  }
  return Status::ok;
}

}  // namespace nibble::kernels
