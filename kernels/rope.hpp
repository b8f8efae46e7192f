#pragma once
// Rotary position embedding, GGUF "normal" (Llama) mode: each head's adjacent pairs
// (x[2i], x[2i+1]) are rotated by pos · base^(-2i/rot_dims).
#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels {

// x: [tokens, n_heads, head_dim], rotated in place; positions: [tokens]
// rot_dims: how many leading dims of each head rotate (even, <= head_dim)
Status rope_normal(float* x, const int32_t* positions, int64_t tokens, int64_t n_heads, int64_t head_dim,
                   int64_t rot_dims, float base);

}  // namespace nibble::kernels
