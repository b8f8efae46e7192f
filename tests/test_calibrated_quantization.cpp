// GPTQ and AWQ on one layer: both cut the output error of RTN on the same 4-bit grid when the
// calibration activations are correlated (GPTQ) or have outlier channels (AWQ), GPTQ reduces to RTN
// on uncorrelated inputs, the stored blocks decode to the returned matrix exactly, and bad
// arguments are clear errors.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kernels/quantize.hpp"
#include "model/awq.hpp"
#include "model/gptq.hpp"
#include "model/quant_grid.hpp"

namespace nibble::model {
namespace {

using kernels::DType;

// Odd output count, k a multiple of Q4_K's 256.
constexpr int64_t kOut = 67;
constexpr int64_t kIn = 256;
constexpr int64_t kCalibRows = 2048;
constexpr int64_t kHeldOutRows = 1024;

std::vector<float> gaussian(size_t n, uint64_t seed, float stddev = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Activations like a transformer layer's inputs: correlated channels (X = Z · L, L a fixed random
// mixing matrix), per-channel magnitudes spread log-normally, and a few outlier channels ~15x larger.
// The distribution is fixed by `mix_seed`; `sample_seed` draws the rows.
std::vector<float> layer_activations(int64_t rows, uint64_t mix_seed, uint64_t sample_seed) {
  const std::vector<float> mix =
      gaussian(static_cast<size_t>(kIn * kIn), mix_seed, 1.0f / std::sqrt(float(kIn)));
  std::vector<float> channel_scale = gaussian(kIn, mix_seed + 1, 0.5f);
  for (float& c : channel_scale) c = std::exp(c);
  for (int64_t c : {3, 50, 77, 140, 201, 255}) channel_scale[static_cast<size_t>(c)] *= 15.0f;
  const std::vector<float> z = gaussian(static_cast<size_t>(rows * kIn), sample_seed);
  std::vector<float> x(static_cast<size_t>(rows * kIn), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < kIn; ++i) {
      const float zi = z[static_cast<size_t>(r * kIn + i)];
      for (int64_t j = 0; j < kIn; ++j)
        x[static_cast<size_t>(r * kIn + j)] += zi * mix[static_cast<size_t>(i * kIn + j)];
    }
    for (int64_t j = 0; j < kIn; ++j)
      x[static_cast<size_t>(r * kIn + j)] *= channel_scale[static_cast<size_t>(j)];
  }
  return x;
}

// ||X Wᵀ − X Ŵᵀ||_F. x: [rows, k]; w, w_hat: [n_out, k].
double output_error(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& w_hat,
                    int64_t n_out, int64_t k) {
  const int64_t rows = static_cast<int64_t>(x.size()) / k;
  double sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < n_out; ++o) {
      double diff = 0;
      for (int64_t j = 0; j < k; ++j)
        diff += static_cast<double>(x[static_cast<size_t>(r * k + j)]) *
                (w[static_cast<size_t>(o * k + j)] - w_hat[static_cast<size_t>(o * k + j)]);
      sum += diff * diff;
    }
  }
  return std::sqrt(sum);
}

// AWQ's effective weights: Q(W·s) · diag(1/s).
std::vector<float> awq_effective(const AwqResult& a, int64_t n_out, int64_t k) {
  std::vector<float> w = a.quantized.dequantized;
  for (int64_t o = 0; o < n_out; ++o)
    for (int64_t j = 0; j < k; ++j) w[static_cast<size_t>(o * k + j)] /= a.scales[static_cast<size_t>(j)];
  return w;
}

// The stored form decodes to `dequantized` exactly.
void expect_blocks_decode_exactly(const QuantizedMatrix& q) {
  std::vector<float> row(static_cast<size_t>(q.k));
  for (int64_t r = 0; r < q.n_out; ++r) {
    if (q.grid.type == GridType::int4_asym) {
      const int64_t groups = q.k / q.grid.group_size;
      for (int64_t j = 0; j < q.k; ++j) {
        const size_t g = static_cast<size_t>(r * groups + j / q.grid.group_size);
        row[static_cast<size_t>(j)] =
            static_cast<float>(q.levels[static_cast<size_t>(r * q.k + j)] - q.zeros[g]) * q.scales[g];
        ASSERT_LE(q.levels[static_cast<size_t>(r * q.k + j)], 15);
      }
    } else {
      const int64_t bytes = kernels::row_bytes(q.grid.gguf_type(), q.k);
      ASSERT_EQ(kernels::dequantize_row(q.grid.gguf_type(), q.blocks.data() + r * bytes, row.data(), q.k),
                kernels::Status::ok);
    }
    for (int64_t j = 0; j < q.k; ++j) {
      ASSERT_EQ(row[static_cast<size_t>(j)], q.dequantized[static_cast<size_t>(r * q.k + j)])
          << q.grid.name() << " row " << r << " column " << j;
    }
  }
}

class CalibratedQuantization : public ::testing::Test {
 protected:
  const std::vector<float> w_ = gaussian(static_cast<size_t>(kOut * kIn), 7, 0.05f);
  const std::vector<float> calib_ = layer_activations(kCalibRows, 100, 1);
  const std::vector<float> held_out_ = layer_activations(kHeldOutRows, 100, 2);

  double rtn_error(const QuantGrid& grid) const {
    return output_error(held_out_, w_, rtn_quantize(w_.data(), kOut, kIn, grid).dequantized, kOut, kIn);
  }
};

const std::vector<QuantGrid> kGrids = {QuantGrid::q4_0(),        QuantGrid::q2_k(),        QuantGrid::q3_k(),
                                       QuantGrid::q4_k(),        QuantGrid::q5_k(),        QuantGrid::q6_k(),
                                       QuantGrid::int4_asym(32), QuantGrid::int4_asym(128)};

TEST_F(CalibratedQuantization, GptqCutsHeldOutErrorBelowRtn) {
  for (const QuantGrid& grid : kGrids) {
    for (const bool act_order : {false, true}) {
      SCOPED_TRACE(grid.name() + (act_order ? " act-order" : ""));
      GptqOptions options;
      options.act_order = act_order;
      const QuantizedMatrix q = gptq_quantize(w_.data(), kOut, kIn, calib_.data(), kCalibRows, grid, options);
      const double ratio = output_error(held_out_, w_, q.dequantized, kOut, kIn) / rtn_error(grid);
      std::printf("GPTQ %-16s act-order %d: held-out error / RTN = %.3f\n", grid.name().c_str(), act_order,
                  ratio);
      // Q2_K's four levels leave GPTQ less room to move error to later columns in input order (0.81;
      // 0.66 with act-order).
      EXPECT_LE(ratio, grid.type == GridType::q2_k && !act_order ? 0.85 : 0.8);
      expect_blocks_decode_exactly(q);
    }
  }
}

TEST_F(CalibratedQuantization, AwqCutsHeldOutErrorBelowRtn) {
  for (const QuantGrid& grid : kGrids) {
    SCOPED_TRACE(grid.name());
    const AwqResult a = awq_search(w_.data(), kOut, kIn, calib_.data(), kCalibRows, grid);
    const double ratio =
        output_error(held_out_, w_, awq_effective(a, kOut, kIn), kOut, kIn) / rtn_error(grid);
    std::printf("AWQ  %-16s alpha %.2f: held-out error / RTN = %.3f (calibration %.3f)\n",
                grid.name().c_str(), a.alpha, ratio, std::sqrt(a.error / a.rtn_error));
    EXPECT_LE(ratio, 0.8);
    EXPECT_GT(a.alpha, 0.0f);
    EXPECT_LE(a.error, a.rtn_error);
    ASSERT_EQ(a.scales.size(), static_cast<size_t>(kIn));
    expect_blocks_decode_exactly(a.quantized);
  }
}

// Weights with outliers (1 in 64 is 6x larger), as trained layers have: an outlier stretches its
// group's scale over the other 31 weights, so clamping it a little loses less than it saves. The
// clipping search must then cut the output error, on the calibration rows and on held-out rows, and
// never raise it on the calibration rows. Q4_K is only held to "never worse": its per-sub-block
// offsets and refitted 6-bit scales already absorb outliers (clipping gains ~1% there, ~9% on the
// symmetric Q4_0 and the int4 grids). Q5_K's steps are half Q4_K's, Q6_K's a quarter: clipping finds next
// to nothing to gain on the calibration rows (never worse there) and moves the held-out error by under 1%.
TEST_F(CalibratedQuantization, AwqClippingCutsTheErrorOfWeightsWithOutliers) {
  std::vector<float> w = w_;
  std::mt19937_64 rng(11);
  for (float& x : w)
    if (rng() % 64 == 0) x *= 6.0f;
  for (const QuantGrid& grid : kGrids) {
    SCOPED_TRACE(grid.name());
    AwqOptions clip;
    clip.clip = true;
    const AwqResult plain = awq_search(w.data(), kOut, kIn, calib_.data(), kCalibRows, grid);
    const AwqResult clipped = awq_search(w.data(), kOut, kIn, calib_.data(), kCalibRows, grid, clip);
    EXPECT_EQ(clipped.unclipped_error, plain.error);  // the same scales before clipping
    const bool absorbs_outliers = grid.k_quant();
    EXPECT_LE(clipped.error, (absorbs_outliers ? 1.0 : 0.92) * plain.error);
    const double held_out = output_error(held_out_, w, awq_effective(clipped, kOut, kIn), kOut, kIn) /
                            output_error(held_out_, w, awq_effective(plain, kOut, kIn), kOut, kIn);
    std::printf("AWQ  %-16s clipping: calibration error x%.3f, held-out x%.3f\n", grid.name().c_str(),
                std::sqrt(clipped.error / plain.error), held_out);
    const bool fine_steps = grid.type == GridType::q5_k || grid.type == GridType::q6_k;
    EXPECT_LT(held_out, fine_steps ? 1.01 : absorbs_outliers ? 1.0 : 0.97);
    expect_blocks_decode_exactly(clipped.quantized);
  }
}

TEST_F(CalibratedQuantization, GptqEqualsRtnOnUncorrelatedInputs) {
  // X = I: H is diagonal, so no error is propagated and GPTQ is RTN exactly (act-order only permutes).
  std::vector<float> identity(static_cast<size_t>(kIn * kIn), 0.0f);
  for (int64_t i = 0; i < kIn; ++i) identity[static_cast<size_t>(i * kIn + i)] = 1.0f;
  for (const QuantGrid& grid : kGrids) {
    SCOPED_TRACE(grid.name());
    const QuantizedMatrix rtn = rtn_quantize(w_.data(), kOut, kIn, grid);
    for (const bool act_order : {false, true}) {
      GptqOptions options;
      options.act_order = act_order;
      const QuantizedMatrix q = gptq_quantize(w_.data(), kOut, kIn, identity.data(), kIn, grid, options);
      EXPECT_EQ(q.dequantized, rtn.dequantized);
      EXPECT_EQ(q.blocks, rtn.blocks);
    }
  }
  // Uncorrelated equal-variance samples: H ≈ c·I, so GPTQ is about as good as RTN and no better.
  const std::vector<float> iid = gaussian(static_cast<size_t>(8 * kIn * kIn), 11);
  const std::vector<float> iid_held_out = gaussian(static_cast<size_t>(kHeldOutRows * kIn), 12);
  const QuantGrid grid = QuantGrid::q4_0();
  const QuantizedMatrix q = gptq_quantize(w_.data(), kOut, kIn, iid.data(), 8 * kIn, grid);
  const double ratio =
      output_error(iid_held_out, w_, q.dequantized, kOut, kIn) /
      output_error(iid_held_out, w_, rtn_quantize(w_.data(), kOut, kIn, grid).dequantized, kOut, kIn);
  EXPECT_GT(ratio, 0.9);
  EXPECT_LT(ratio, 1.05);
}

TEST_F(CalibratedQuantization, RtnBlocksAreGgmlReferenceBlocks) {
  for (const QuantGrid& grid : {QuantGrid::q4_0(), QuantGrid::q2_k(), QuantGrid::q3_k(), QuantGrid::q4_k(),
                                QuantGrid::q5_k(), QuantGrid::q6_k()}) {
    SCOPED_TRACE(grid.name());
    const QuantizedMatrix q = rtn_quantize(w_.data(), kOut, kIn, grid);
    const int64_t bytes = kernels::row_bytes(grid.gguf_type(), kIn);
    std::vector<uint8_t> want(static_cast<size_t>(kOut * bytes));
    for (int64_t r = 0; r < kOut; ++r) {
      ASSERT_EQ(kernels::quantize_row(grid.gguf_type(), w_.data() + r * kIn, want.data() + r * bytes, kIn),
                kernels::Status::ok);
    }
    EXPECT_EQ(q.blocks, want);
    expect_blocks_decode_exactly(q);
  }
  expect_blocks_decode_exactly(rtn_quantize(w_.data(), kOut, kIn, QuantGrid::int4_asym(64)));
}

template <typename F>
void expect_invalid(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected std::invalid_argument mentioning '" << needle << "'";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST_F(CalibratedQuantization, BadArgumentsAreClearErrors) {
  const std::vector<float> w48(static_cast<size_t>(4 * 48), 0.5f);
  const std::vector<float> x48(static_cast<size_t>(10 * 48), 1.0f);
  expect_invalid([&] { gptq_quantize(w48.data(), 4, 48, x48.data(), 10, QuantGrid::q4_0()); },
                 "row length 48 is not a multiple of the q4_0 block of 32");
  expect_invalid([&] { awq_search(w48.data(), 4, 48, x48.data(), 10, QuantGrid::q4_0()); }, "row length 48");
  expect_invalid([&] { rtn_quantize(w_.data(), kOut, 128, QuantGrid::q4_k()); }, "q4_k block of 256");
  expect_invalid([&] { gptq_quantize(w_.data(), kOut, kIn, calib_.data(), 0, QuantGrid::q4_0()); },
                 "no calibration rows");
  expect_invalid([&] { awq_search(w_.data(), kOut, kIn, nullptr, 0, QuantGrid::q4_0()); },
                 "no calibration rows");
  expect_invalid([&] { HessianAccumulator(kIn).hessian(); }, "no calibration rows");
  expect_invalid(
      [&] { gptq_quantize(w_.data(), kOut, kIn, std::vector<double>(10, 1.0), QuantGrid::q4_0()); },
      "Hessian has 10 values");
  expect_invalid([&] { QuantGrid::int4_asym(100); }, "group size 100");
  GptqOptions odd_block;
  odd_block.block_size = 48;
  expect_invalid(
      [&] { gptq_quantize(w_.data(), kOut, kIn, calib_.data(), kCalibRows, QuantGrid::q4_0(), odd_block); },
      "block size 48");
}

}  // namespace
}  // namespace nibble::model
