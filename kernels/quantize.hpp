#pragma once
// Round-to-nearest quantizers with GGML's rounding rules, so that files Nibble writes load in
// llama.cpp and vice versa. These are reference-quality (scalar) and used at model-build time and
// for activations inside the matmul.
#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels {

// x: [n] floats, n a multiple of the block size of `type`; out: row_bytes(type, n) bytes.
// Supported: F32, F16, BF16, Q4_0, Q8_0, Q8_K.
Status quantize_row(DType type, const float* x, void* out, int64_t n);

// Reference dequantization for every DType. src: row_bytes(type, n) bytes; y: [n] floats.
Status dequantize_row(DType type, const void* src, float* y, int64_t n);

}  // namespace nibble::kernels
