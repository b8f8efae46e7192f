#include "kernels/activation.hpp"

#include <algorithm>
#include <cmath>

namespace nibble::kernels {

Status swiglu(const float* gate, const float* up, float* out, int64_t n) {
  if (gate == nullptr || up == nullptr || out == nullptr || n < 0) return Status::invalid_argument;
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
  return Status::ok;
}

Status add_inplace(float* y, const float* x, int64_t n) {
  if (y == nullptr || x == nullptr || n < 0) return Status::invalid_argument;
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
  return Status::ok;
}

Status softmax_inplace(float* x, int64_t n) {
  if (x == nullptr || n <= 0) return Status::invalid_argument;
  const float max_value = *std::max_element(x, x + n);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max_value);
    sum += x[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
  return Status::ok;
}

}  // namespace nibble::kernels
