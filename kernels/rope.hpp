#pragma once
// Rotary position embedding, GGUF "normal" (Llama) mode: each head's adjacent pairs
// (x[2i], x[2i+1]) are rotated by
//   freq_scale * (pos * base^(-2i/rot_dims) / freq_factors[i])
// which is llama.cpp's ggml_rope_ext: freq_scale is 1 / a linear scaling factor
// (`llama.rope.scaling.factor`), freq_factors Llama 3.1's per-pair divisors (`rope_freqs.weight`).
// With YaRN (`llama.rope.scaling.type` yarn, ggml's ext_factor 1) the pairs that turn fast keep their
// unscaled angle, the slow ones the scaled one, a linear ramp between, and the rotation's cosine and
// sine are scaled by mscale (YaRN's attention temperature: q.k grows by mscale^2).
#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels {

struct RopeScaling {
  float freq_scale = 1.0f;              // > 0 and finite
  const float* freq_factors = nullptr;  // [rot_dims / 2], each > 0 and finite; nullptr: all 1
  // YaRN: pair i's angle is the scaled one times (1 - r) plus the unscaled one times r, where
  // r = 1 - clamp((i - yarn_low) / max(0.001, yarn_high - yarn_low), 0, 1) (ggml's rope_yarn_ramp).
  bool yarn = false;
  float yarn_low = 0.0f, yarn_high = 0.0f;  // ggml_rope_yarn_corr_dims: rope_yarn_scaling's
  float mscale = 1.0f;                      // cos and sin times this; > 0 and finite
};

// YaRN as llama.cpp runs a Llama model's (`rope.scaling.type` yarn, its factor 1 / freq_scale and
// original context n_ctx_orig): ggml's correction range for beta_fast 32 and beta_slow 1, and the
// magnitude llama_context and ggml's rope_yarn compute (attn_factor times 1 + 0.1 ln factor, in their
// float steps; attn_factor is `rope.scaling.attn_factor`, 1 unless a file says otherwise).
RopeScaling rope_yarn_scaling(float freq_scale, const float* freq_factors, int64_t rot_dims,
                              int64_t n_ctx_orig, float base, float attn_factor = 1.0f);

// x: [tokens, n_heads, head_dim], rotated in place; positions: [tokens]
// rot_dims: how many leading dims of each head rotate (even, <= head_dim)
// Without scaling (the default) the angles are bit for bit those of plain RoPE.
Status rope_normal(float* x, const int32_t* positions, int64_t tokens, int64_t n_heads, int64_t head_dim,
                   int64_t rot_dims, float base, const RopeScaling& scaling = {});

// The angle of pair i at position pos, as rope_normal computes it (before cos and sin, and their
// scaling by mscale): theta_scale is
// base^(-2 / rot_dims) as rope_theta_scale rounds it. Shared with the tests' references and the CUDA
// kernels' (kernels/cuda/common.cuh repeats its expression).
float rope_theta_scale(float base, int64_t rot_dims);
float rope_angle(int32_t pos, int64_t i, float theta_scale, const RopeScaling& scaling);

}  // namespace nibble::kernels
