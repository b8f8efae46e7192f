#include "model/gptq.hpp"

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

namespace nibble::model {

namespace {

using MatrixD = Eigen::MatrixXd;  // column-major: GPTQ walks columns
using RowMajorD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMajorF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

void check_options(const QuantGrid& grid, const GptqOptions& options) {
  if (options.block_size <= 0 || options.block_size % grid.group_size != 0) {
    throw std::invalid_argument("GPTQ: block size " + std::to_string(options.block_size) +
                                " is not a positive multiple of the " + grid.name() + " group size " +
                                std::to_string(grid.group_size));
  }
  // A super-block's parameters are fitted at its first column, which must start a batch so that every
  // column of it has received all earlier updates.
  const int64_t super = grid.super_block();
  if (super % options.block_size != 0 && options.block_size % super != 0) {
    throw std::invalid_argument("GPTQ: block size " + std::to_string(options.block_size) +
                                " must divide or be a multiple of the " + grid.name() + " super-block of " +
                                std::to_string(super));
  }
  if (!(options.percdamp >= 0)) throw std::invalid_argument("GPTQ: percdamp must be >= 0");
}

// Copies row r of W's columns [begin, begin + n) (in original column order) to floats.
void gather(const MatrixD& w, int64_t r, int64_t begin, int64_t n, std::vector<float>& out) {
  out.resize(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) out[static_cast<size_t>(j)] = static_cast<float>(w(r, begin + j));
}

}  // namespace

HessianAccumulator::HessianAccumulator(int64_t k) : k_(k), sum_(static_cast<size_t>(k * k), 0.0) {
  if (k <= 0) throw std::invalid_argument("Hessian of an empty input (k = " + std::to_string(k) + ")");
}

void HessianAccumulator::add(const float* x, int64_t rows) {
  if (rows <= 0) return;
  const MatrixD xd = Eigen::Map<const RowMajorF>(x, rows, k_).cast<double>();
  Eigen::Map<MatrixD> sum(sum_.data(), k_, k_);
  sum.selfadjointView<Eigen::Lower>().rankUpdate(xd.transpose());  // lower triangle += xᵀx
  samples_ += rows;
}

std::vector<double> HessianAccumulator::hessian() const {
  if (samples_ == 0) throw std::invalid_argument("GPTQ: no calibration rows were given");
  std::vector<double> h(static_cast<size_t>(k_ * k_));
  Eigen::Map<RowMajorD> out(h.data(), k_, k_);
  const Eigen::Map<const MatrixD> sum(sum_.data(), k_, k_);
  out = sum.selfadjointView<Eigen::Lower>();
  out *= 2.0 / static_cast<double>(samples_);
  return h;
}

QuantizedMatrix gptq_quantize(const float* w, int64_t n_out, int64_t k, const std::vector<double>& hessian,
                              const QuantGrid& grid, const GptqOptions& options) {
  check_grid_shape(grid, n_out, k, "GPTQ");
  check_options(grid, options);
  if (hessian.size() != static_cast<size_t>(k * k)) {
    throw std::invalid_argument("GPTQ: the Hessian has " + std::to_string(hessian.size()) +
                                " values, expected " + std::to_string(k) + " x " + std::to_string(k));
  }
  MatrixD h = Eigen::Map<const RowMajorD>(hessian.data(), k, k);
  MatrixD wd = Eigen::Map<const RowMajorF>(w, n_out, k).cast<double>();
  if (!h.allFinite() || !wd.allFinite()) throw std::invalid_argument("GPTQ: non-finite weights or Hessian");

  // Inputs that never fire carry no information: their weights are zeroed, as in the reference.
  for (int64_t i = 0; i < k; ++i) {
    if (h(i, i) == 0.0) {
      h(i, i) = 1.0;
      wd.col(i).setZero();
    }
  }

  std::vector<RowQuantizer> rows(static_cast<size_t>(n_out), RowQuantizer(grid, k));
  const int64_t super = grid.super_block();
  const int64_t group = grid.group_size;
  std::vector<float> values;
  std::vector<int64_t> order(static_cast<size_t>(k));  // order[i]: original column quantized i-th
  std::iota(order.begin(), order.end(), int64_t{0});
  if (options.act_order) {
    // Static groups, fitted on the original weights before any update (see the header).
    for (int64_t r = 0; r < n_out; ++r) {
      RowQuantizer& q = rows[static_cast<size_t>(r)];
      for (int64_t sb = 0; sb < k; sb += super) {
        gather(wd, r, sb, super, values);
        q.fit_super_block(sb, values.data());
        for (int64_t g = 0; g < super; g += group) q.fit_group(sb + g, values.data() + g);
      }
    }
    const Eigen::VectorXd diag = h.diagonal();
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return diag(a) > diag(b); });
    Eigen::PermutationMatrix<Eigen::Dynamic, Eigen::Dynamic, int64_t> perm(k);
    for (int64_t i = 0; i < k; ++i) perm.indices()(i) = order[static_cast<size_t>(i)];
    wd = wd * perm;                   // column i of wd is original column order[i]
    h = perm.transpose() * h * perm;  // likewise rows and columns of H
  }

  const double damp = options.percdamp * h.diagonal().mean();
  h.diagonal().array() += damp;
  const Eigen::LLT<MatrixD> chol(h);
  if (chol.info() != Eigen::Success) {
    throw std::invalid_argument("GPTQ: the dampened Hessian is not positive definite (percdamp " +
                                std::to_string(options.percdamp) + " is too small for these inputs)");
  }
  const MatrixD h_inv = chol.solve(MatrixD::Identity(k, k));
  const Eigen::LLT<MatrixD> chol_inv(h_inv);
  if (chol_inv.info() != Eigen::Success) throw std::invalid_argument("GPTQ: H⁻¹ is not positive definite");
  const MatrixD u = chol_inv.matrixU();  // H⁻¹ = UᵀU

  QuantizedMatrix out;
  size_quantized(out, grid, n_out, k);
  const int64_t block = options.block_size;
  MatrixD err(n_out, block);  // the current batch's scaled errors, one column per quantized column
  for (int64_t i1 = 0; i1 < k; i1 += block) {
    const int64_t i2 = std::min(i1 + block, k);
    for (int64_t i = i1; i < i2; ++i) {
      const int64_t col = order[static_cast<size_t>(i)];
      if (!options.act_order) {
        // Fit on the updated weights: every column of the group (and of a super-block, which starts a
        // batch) has received all updates from the columns quantized before it.
        if (col % super == 0) {
          for (int64_t r = 0; r < n_out; ++r) {
            gather(wd, r, col, super, values);
            rows[static_cast<size_t>(r)].fit_super_block(col, values.data());
          }
        }
        if (col % group == 0) {
          for (int64_t r = 0; r < n_out; ++r) {
            gather(wd, r, col, group, values);
            rows[static_cast<size_t>(r)].fit_group(col, values.data());
          }
        }
      }
      const double d = u(i, i);
      for (int64_t r = 0; r < n_out; ++r) {
        const float q = rows[static_cast<size_t>(r)].quantize(col, static_cast<float>(wd(r, i)));
        out.dequantized[static_cast<size_t>(r * k + col)] = q;
        err(r, i - i1) = (wd(r, i) - static_cast<double>(q)) / d;
      }
      if (i + 1 < i2) {
        wd.middleCols(i + 1, i2 - i - 1).noalias() -= err.col(i - i1) * u.row(i).segment(i + 1, i2 - i - 1);
      }
    }
    if (i2 < k) wd.rightCols(k - i2).noalias() -= err.leftCols(i2 - i1) * u.block(i1, i2, i2 - i1, k - i2);
  }
  for (int64_t r = 0; r < n_out; ++r) rows[static_cast<size_t>(r)].store(out, r);
  return out;
}

QuantizedMatrix gptq_quantize(const float* w, int64_t n_out, int64_t k, const float* x, int64_t n_samples,
                              const QuantGrid& grid, const GptqOptions& options) {
  check_grid_shape(grid, n_out, k, "GPTQ");
  if (n_samples <= 0 || x == nullptr) throw std::invalid_argument("GPTQ: no calibration rows were given");
  HessianAccumulator acc(k);
  acc.add(x, n_samples);
  return gptq_quantize(w, n_out, k, acc.hessian(), grid, options);
}

}  // namespace nibble::model
