#pragma once
// GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
// Transformers") for one weight matrix W [n_out, k], used as y = x · Wᵀ, onto a QuantGrid.
//
// Columns are quantized one at a time; each column's rounding error, weighted by the inverse
// Hessian of the layer's squared output error (H = 2/n · XᵀX over calibration inputs X), is pushed
// onto the columns not yet quantized, so later columns compensate for earlier ones. As in the
// reference implementation:
//   - H is accumulated in double; dead inputs (diag H = 0) get H_ii = 1 and their weights zeroed;
//   - dampening adds percdamp · mean(diag H) to the diagonal;
//   - the updates use the upper Cholesky factor of H⁻¹, in lazy batches of block_size columns;
//   - without act-order, each group's parameters are fitted when the group's first column comes up,
//     on the weights as updated so far (Nibble fits on the fully updated values, where the
//     reference reads a copy that misses the current batch's updates for groups inside a batch);
//   - act-order quantizes columns in decreasing diag(H) with *static* groups: every group's
//     parameters are fitted on the original W before any column is quantized (the reference's
//     static_groups=True). GGUF blocks are runs of consecutive columns in the original order, so
//     groups formed in the permuted order (static_groups=False, which needs a g_idx per column)
//     cannot be written as Q4_0 / Q4_K; the INT4 grid follows the same rule so its output stays
//     exportable without a g_idx.
#include <cstdint>
#include <vector>

#include "model/quant_grid.hpp"

namespace nibble::model {

struct GptqOptions {
  double percdamp = 0.01;    // dampening, as a fraction of mean(diag H)
  bool act_order = false;    // quantize columns in decreasing diag(H) (static groups; see above)
  int64_t block_size = 128;  // lazy-batch width; a multiple of the grid's group size
};

// Sums 2 · xᵀx over calibration rows; hessian() is H = 2/n · XᵀX.
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t k);
  // x: [rows, k] inputs of the matrix (one row per token).
  void add(const float* x, int64_t rows);
  int64_t k() const { return k_; }
  int64_t samples() const { return samples_; }
  // [k, k] row-major, averaged over the rows added so far. Throws std::invalid_argument when none.
  std::vector<double> hessian() const;

 private:
  int64_t k_;
  int64_t samples_ = 0;
  std::vector<double> sum_;  // [k, k] Σ xᵀx (upper triangle kept in sync at read time)
};

// GPTQ with a precomputed Hessian. w: [n_out, k]; hessian: [k, k] row-major (symmetric).
// Throws std::invalid_argument for shapes the grid cannot take, a Hessian of the wrong size or an
// empty one, a block size that is not a multiple of the group size, or a Hessian that stays not
// positive definite after dampening.
QuantizedMatrix gptq_quantize(const float* w, int64_t n_out, int64_t k, const std::vector<double>& hessian,
                              const QuantGrid& grid, const GptqOptions& options = {});

// The same from calibration inputs x: [n_samples, k].
QuantizedMatrix gptq_quantize(const float* w, int64_t n_out, int64_t k, const float* x, int64_t n_samples,
                              const QuantGrid& grid, const GptqOptions& options = {});

}  // namespace nibble::model
