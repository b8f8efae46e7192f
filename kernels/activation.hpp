#pragma once
// Element-wise pieces of the Llama block.
#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels {

// SwiGLU: out = silu(gate) * up. gate, up, out: [n] (out may alias gate)
Status swiglu(const float* gate, const float* up, float* out, int64_t n);

// y += x. x, y: [n]
Status add_inplace(float* y, const float* x, int64_t n);

// In-place numerically stable softmax. x: [n]
Status softmax_inplace(float* x, int64_t n);

}  // namespace nibble::kernels
