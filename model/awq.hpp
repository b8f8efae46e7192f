#pragma once
// AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization") scale search for the matrices
// that share one input x [n_samples, k]: W [n_out, k] (their rows stacked, e.g. q, k and v), y = x·Wᵀ.
//
// Input channels that carry large activations matter most, so AWQ scales them up before rounding:
// Ŵ = Q(W · diag(s)) · diag(1/s). The scale is s_j = mean_t |x_tj|^α, normalised so that
// max(s) · min(s) = 1 (as llm-awq does); α is chosen on a grid of points in [0, 1] (α = 0 is
// plain RTN) to minimise the calibration output error ||X Wᵀ − (X / s) Q(W·s)ᵀ||_F.
// Optionally (AwqOptions::clip) weight clipping, llm-awq's auto_clip: for every row and super-block (a group
// of 32 for q4_0 and int4, 256 for q4_k), the scaled weights are clamped to r times each group's largest
// magnitude for the r in 1, 0.95, ... 0.55 that minimises that block's output error
// dᵀ (X_bᵀ X_b) d (d: the block's weights minus their rounded clamped values, X_b: the block's
// input columns); outliers then stop stretching their group's scale over the other weights. The
// clipped result is kept only if it lowers the whole layer's error. (It pays most on symmetric
// grids; Q4_K's per-sub-block offsets already absorb much of what it buys.)
//
// The 1/s must then be folded into whatever produces x, so the deployed model computes
// (x / s) · Q(W·s)ᵀ with no extra work. In Llama (the caller does this):
//   attn_q / attn_k / attn_v   x = RMSNorm(h) · attn_norm: divide attn_norm by s
//   ffn_gate / ffn_up          x = RMSNorm(h) · ffn_norm: divide ffn_norm by s
//   ffn_down                   x = silu(gate) ⊙ up: divide row j of ffn_up by s_j (before
//                              ffn_up itself is rounded)
//   attn_output                x = attention over v: dividing v's rows works only when every
//                              query head reading a KV head would want the same scales, i.e. not
//                              with grouped-query attention in general; Nibble leaves attn_output
//                              unscaled (RTN) unless n_head == n_head_kv.
#include <cstdint>
#include <vector>

#include "model/quant_grid.hpp"

namespace nibble::model {

struct AwqOptions {
  int grid_points = 20;     // α = i / (grid_points − 1), i = 0 .. grid_points − 1
  int64_t max_samples = 0;  // > 0: evaluate the error on at most this many rows (evenly spaced)
  // Search clipping ratios after the scales. Off by default: on the trained fixture model it lowered
  // every layer's calibration error yet raised perplexity (docs/perf/quality.md).
  bool clip = false;
};

struct AwqResult {
  std::vector<float> scales;   // [k] s: multiply W's columns by it, divide the input by it
  float alpha = 0;             // the chosen exponent
  double error = 0;            // ||X Wᵀ − (X/s) Q(W·s)ᵀ||_F² on the evaluated rows, clipping included
  double unclipped_error = 0;  // the same before clipping
  double rtn_error = 0;        // the same for α = 0 (s = 1): plain RTN
  QuantizedMatrix quantized;   // Q(W · diag(s)) on the grid; dequantized holds W·s rounded, not /s
};

// w: [n_out, k]; x: [n_samples, k]. Throws std::invalid_argument for shapes the grid cannot take,
// no calibration rows, or fewer than 2 grid points.
AwqResult awq_search(const float* w, int64_t n_out, int64_t k, const float* x, int64_t n_samples,
                     const QuantGrid& grid, const AwqOptions& options = {});

}  // namespace nibble::model
