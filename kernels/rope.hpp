#pragma once
// Rotary position embedding, GGUF "normal" (Llama) mode: each head's adjacent pairs
// (x[2i], x[2i+1]) are rotated by
//   freq_scale * (pos * base^(-2i/rot_dims) / freq_factors[i])
// which is llama.cpp's ggml_rope_ext without YaRN: freq_scale is 1 / a linear scaling factor
// (`llama.rope.scaling.factor`), freq_factors Llama 3.1's per-pair divisors (`rope_freqs.weight`).
#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels {

struct RopeScaling {
  float freq_scale = 1.0f;              // > 0 and finite
  const float* freq_factors = nullptr;  // [rot_dims / 2], each > 0 and finite; nullptr: all 1
};

// x: [tokens, n_heads, head_dim], rotated in place; positions: [tokens]
// rot_dims: how many leading dims of each head rotate (even, <= head_dim)
// Without scaling (the default) the angles are bit for bit those of plain RoPE.
Status rope_normal(float* x, const int32_t* positions, int64_t tokens, int64_t n_heads, int64_t head_dim,
                   int64_t rot_dims, float base, const RopeScaling& scaling = {});

// The angle of pair i at position pos, as rope_normal computes it: theta_scale is
// base^(-2 / rot_dims) as rope_theta_scale rounds it. Shared with the tests' references and the CUDA
// kernels' (kernels/cuda/common.cuh repeats its expression).
float rope_theta_scale(float base, int64_t rot_dims);
float rope_angle(int32_t pos, int64_t i, float theta_scale, const RopeScaling& scaling);

}  // namespace nibble::kernels
