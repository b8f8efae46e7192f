#include "model/awq.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace nibble::model {

namespace {

using RowMajorF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Rounds `values` ([unit] columns of one row, unit a multiple of the grid's super-block) onto the
// grid and writes the dequantized values to `out`.
void round_unit(const QuantGrid& grid, const float* values, int64_t unit, float* out) {
  RowQuantizer q(grid, unit);
  for (int64_t sb = 0; sb < unit; sb += grid.super_block()) {
    q.fit_super_block(sb, values + sb);
    for (int64_t g = sb; g < sb + grid.super_block(); g += grid.group_size) q.fit_group(g, values + g);
  }
  for (int64_t c = 0; c < unit; ++c) out[c] = q.quantize(c, values[c]);
}

// llm-awq's auto_clip on the scaled weights w [n_out, k] with the scaled inputs x [rows, k]:
// returns w with each row's super-blocks clamped at the ratio that minimises the block's error.
RowMajorF clip_search(const RowMajorF& w, const RowMajorF& x, const QuantGrid& grid) {
  const int64_t n_out = w.rows(), k = w.cols(), unit = grid.super_block(), group = grid.group_size;
  constexpr int kSteps = 10;  // ratios 1 - i / 20 for i < 10, as llm-awq (n_grid 20, max_shrink 0.5)
  RowMajorF clipped = w;
  RowMajorF candidate(n_out, unit), rounded(n_out, unit);
  for (int64_t u0 = 0; u0 < k; u0 += unit) {
    const Eigen::MatrixXf gram = x.middleCols(u0, unit).transpose() * x.middleCols(u0, unit);  // [unit, unit]
    const RowMajorF original = w.middleCols(u0, unit);
    Eigen::VectorXf best = Eigen::VectorXf::Constant(n_out, std::numeric_limits<float>::infinity());
    for (int i = 0; i < kSteps; ++i) {
      const float ratio = 1.0f - static_cast<float>(i) / 20.0f;
      for (int64_t r = 0; r < n_out; ++r) {
        for (int64_t g = 0; g < unit; g += group) {
          const float limit = ratio * original.row(r).segment(g, group).cwiseAbs().maxCoeff();
          candidate.row(r).segment(g, group) =
              original.row(r).segment(g, group).cwiseMax(-limit).cwiseMin(limit);
        }
        round_unit(grid, candidate.row(r).data(), unit, rounded.row(r).data());
      }
      const RowMajorF d = original - rounded;
      const Eigen::VectorXf error = ((d * gram).cwiseProduct(d)).rowwise().sum();
      for (int64_t r = 0; r < n_out; ++r) {
        if (error(r) < best(r)) {
          best(r) = error(r);
          clipped.row(r).segment(u0, unit) = candidate.row(r);
        }
      }
    }
  }
  return clipped;
}

}  // namespace

AwqResult awq_search(const float* w, int64_t n_out, int64_t k, const float* x, int64_t n_samples,
                     const QuantGrid& grid, const AwqOptions& options) {
  check_grid_shape(grid, n_out, k, "AWQ");
  if (n_samples <= 0 || x == nullptr) throw std::invalid_argument("AWQ: no calibration rows were given");
  if (options.grid_points < 2) throw std::invalid_argument("AWQ: the α grid needs at least 2 points");

  const Eigen::Map<const RowMajorF> xs(x, n_samples, k);
  const Eigen::Map<const RowMajorF> wm(w, n_out, k);
  // Activation magnitude per input channel, over every calibration row.
  const Eigen::VectorXf mean_abs =
      (xs.cwiseAbs().cast<double>().colwise().sum() / static_cast<double>(n_samples))
          .transpose()
          .cast<float>();

  // The rows the error is measured on (all, or evenly spaced).
  RowMajorF xe;
  if (options.max_samples > 0 && n_samples > options.max_samples) {
    xe.resize(options.max_samples, k);
    for (int64_t i = 0; i < options.max_samples; ++i) xe.row(i) = xs.row(i * n_samples / options.max_samples);
  } else {
    xe = xs;
  }
  const RowMajorF y = xe * wm.transpose();  // [rows, n_out] the float layer's output

  AwqResult best;
  best.error = std::numeric_limits<double>::infinity();
  RowMajorF scaled(n_out, k);
  for (int i = 0; i < options.grid_points; ++i) {
    const float alpha = static_cast<float>(i) / static_cast<float>(options.grid_points - 1);
    Eigen::VectorXf s = mean_abs.array().pow(alpha).max(1e-4f).matrix();
    s /= std::sqrt(s.maxCoeff() * s.minCoeff());
    scaled = wm * s.asDiagonal();
    QuantizedMatrix q = rtn_quantize(scaled.data(), n_out, k, grid);
    const RowMajorF effective =
        Eigen::Map<const RowMajorF>(q.dequantized.data(), n_out, k) * s.cwiseInverse().asDiagonal();
    const double error = (y - xe * effective.transpose()).cast<double>().squaredNorm();
    if (i == 0) best.rtn_error = error;
    if (error < best.error) {
      best.error = error;
      best.alpha = alpha;
      best.scales.assign(s.data(), s.data() + k);
      best.quantized = std::move(q);
    }
  }
  best.unclipped_error = best.error;
  if (options.clip) {
    const Eigen::Map<const Eigen::VectorXf> s(best.scales.data(), k);
    const RowMajorF clipped = clip_search(wm * s.asDiagonal(), xe * s.cwiseInverse().asDiagonal(), grid);
    QuantizedMatrix q = rtn_quantize(clipped.data(), n_out, k, grid);
    const RowMajorF effective =
        Eigen::Map<const RowMajorF>(q.dequantized.data(), n_out, k) * s.cwiseInverse().asDiagonal();
    const double error = (y - xe * effective.transpose()).cast<double>().squaredNorm();
    if (error < best.error) {  // blocks are judged alone; the layer as a whole decides
      best.error = error;
      best.quantized = std::move(q);
    }
  }
  return best;
}

}  // namespace nibble::model
