#pragma once
// RMSNorm: y = x / sqrt(mean(x²) + eps) * weight, row by row.
#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels {

// x: [rows, n], weight: [n], y: [rows, n] (may alias x)
Status rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t n, float eps);

}  // namespace nibble::kernels
