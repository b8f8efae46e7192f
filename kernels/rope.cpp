#include "kernels/rope.hpp"

#include <cmath>
#include <vector>

namespace nibble::kernels {

float rope_theta_scale(float base, int64_t rot_dims) {
  return std::pow(base, -2.0f / static_cast<float>(rot_dims));
}

namespace {

// Pair i's unscaled angle theta, divided by its frequency factor and times the linear scale (ggml's
// rope_yarn without YaRN): one expression for rope_normal and rope_angle, so their bits agree.
float scaled_angle(float theta, int64_t i, const RopeScaling& scaling) {
  if (scaling.freq_factors != nullptr) theta /= scaling.freq_factors[i];
  return scaling.freq_scale * theta;
}

}  // namespace

float rope_angle(int32_t pos, int64_t i, float theta_scale, const RopeScaling& scaling) {
  float theta = static_cast<float>(pos);
  for (int64_t s = 0; s < i; ++s) theta *= theta_scale;
  return scaled_angle(theta, i, scaling);
}

Status rope_normal(float* x, const int32_t* positions, int64_t tokens, int64_t n_heads, int64_t head_dim,
                   int64_t rot_dims, float base, const RopeScaling& scaling) {
  if (x == nullptr || positions == nullptr || tokens < 0 || n_heads <= 0 || head_dim <= 0 || rot_dims <= 0 ||
      rot_dims > head_dim || rot_dims % 2 != 0 || !(base > 0.0f) || !(scaling.freq_scale > 0.0f) ||
      !std::isfinite(scaling.freq_scale)) {
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
      cos_table[i] = std::cos(angle);
      sin_table[i] = std::sin(angle);
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
