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
  return best;
}

}  // namespace nibble::model
