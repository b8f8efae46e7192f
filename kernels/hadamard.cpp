#include "kernels/hadamard.hpp"

#include <cmath>
#include <vector>

namespace nibble::kernels {
namespace {

bool valid(const float* x, int64_t rows, int64_t block) {
  return x != nullptr && rows >= 0 && block >= 1 && (block & (block - 1)) == 0;
}

// llama.cpp's entry magnitude: 1/sqrtf(n) divided in double, then stored as float.
float entry_scale(int64_t block) { return static_cast<float>(1.0 / std::sqrt(static_cast<float>(block))); }

}  // namespace

Status hadamard_rotate(float* x, int64_t rows, int64_t block) {
  if (!valid(x, rows, block)) return Status::invalid_argument;
  const float scale = entry_scale(block);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * block;
    for (int64_t half = 1; half < block; half *= 2) {
      for (int64_t start = 0; start < block; start += 2 * half) {
        for (int64_t j = start; j < start + half; ++j) {
          const float a = row[j];
          const float b = row[j + half];
          row[j] = a + b;
          row[j + half] = a - b;
        }
      }
    }
    for (int64_t j = 0; j < block; ++j) row[j] *= scale;
  }
  return Status::ok;
}

Status hadamard_rotate_reference(float* x, int64_t rows, int64_t block) {
  if (!valid(x, rows, block)) return Status::invalid_argument;
  std::vector<float> h(static_cast<size_t>(block * block));
  h[0] = entry_scale(block);
  for (int64_t s = 1; s < block; s *= 2) {
    for (int64_t i = 0; i < s; ++i) {
      for (int64_t j = 0; j < s; ++j) {
        const float v = h[static_cast<size_t>(i * block + j)];
        h[static_cast<size_t>((i + s) * block + j)] = v;
        h[static_cast<size_t>(i * block + j + s)] = v;
        h[static_cast<size_t>((i + s) * block + j + s)] = -v;
      }
    }
  }
  std::vector<float> out(static_cast<size_t>(block));
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * block;
    for (int64_t i = 0; i < block; ++i) {
      float sum = 0.0f;
      for (int64_t j = 0; j < block; ++j) sum += h[static_cast<size_t>(i * block + j)] * row[j];
      out[static_cast<size_t>(i)] = sum;
    }
    for (int64_t i = 0; i < block; ++i) row[i] = out[static_cast<size_t>(i)];
  }
  return Status::ok;
}

}  // namespace nibble::kernels
