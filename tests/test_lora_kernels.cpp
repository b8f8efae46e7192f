// kernels/lora: the shrink (scale * A x) and expand (y += B ax) products against their plain loops,
// on random fp16 factors of odd sizes (ranks below, at and above the 8-wide vectors, inputs across the
// 64-input tiles, outputs across the 256-output passes), every matmul ISA this CPU has; and the loops
// against a double-precision sum.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/lora.hpp"
#include "kernels/matmul.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::kernels {
namespace {

std::vector<f16_bits> random_fp16(size_t n, uint64_t seed) {
  std::vector<float> f = test::random_floats(n, seed);
  std::vector<f16_bits> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = fp32_to_fp16(f[i]);
  return h;
}

double max_relative_error(const std::vector<float>& got, const std::vector<double>& want) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(got[i] - want[i]));
    norm = std::max(norm, std::abs(want[i]));
  }
  return err / norm;
}

struct Size {
  int64_t k, rank, n_out;
};

TEST(LoraKernels, ShrinkAndExpandMatchTheirReferences) {
  const std::string original = matmul_isa();
  ThreadPool pool(3);
  for (const Size s :
       {Size{67, 5, 301}, Size{128, 8, 256}, Size{200, 16, 77}, Size{513, 33, 1031}, Size{64, 64, 9}}) {
    SCOPED_TRACE("k " + std::to_string(s.k) + " rank " + std::to_string(s.rank) + " n_out " +
                 std::to_string(s.n_out));
    const int64_t x_rows = 9;
    const std::vector<int64_t> rows = {7, 0, 3, 8, 4};  // a batch's rows that name this adapter
    const auto n = static_cast<int64_t>(rows.size());
    const std::vector<f16_bits> a_t = random_fp16(static_cast<size_t>(s.k * s.rank), 1);
    const std::vector<f16_bits> b_t = random_fp16(static_cast<size_t>(s.rank * s.n_out), 2);
    const std::vector<float> x = test::random_floats(static_cast<size_t>(x_rows * s.k), 3);
    const std::vector<float> y0 = test::random_floats(static_cast<size_t>(x_rows * s.n_out), 4);
    const float scale = 0.75f;

    // Double-precision truth.
    std::vector<double> ax_truth(static_cast<size_t>(n * s.rank)), y_truth(y0.begin(), y0.end());
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < s.rank; ++j) {
        double sum = 0;
        for (int64_t c = 0; c < s.k; ++c)
          sum += double(fp16_to_fp32(a_t[c * s.rank + j])) * x[rows[i] * s.k + c];
        ax_truth[i * s.rank + j] = scale * sum;
      }
    std::vector<float> ax_ref(ax_truth.size());
    ASSERT_EQ(lora_shrink_reference(a_t.data(), s.k, s.rank, scale, x.data(), rows.data(), n, ax_ref.data()),
              Status::ok);
    EXPECT_LT(max_relative_error(ax_ref, ax_truth), 1e-5);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t o = 0; o < s.n_out; ++o) {
        double sum = 0;
        for (int64_t j = 0; j < s.rank; ++j)
          sum += double(fp16_to_fp32(b_t[j * s.n_out + o])) * ax_ref[i * s.rank + j];
        y_truth[rows[i] * s.n_out + o] += sum;
      }
    std::vector<float> y_ref = y0;
    ASSERT_EQ(lora_expand_reference(b_t.data(), s.rank, s.n_out, ax_ref.data(), rows.data(), n, y_ref.data()),
              Status::ok);
    EXPECT_LT(max_relative_error(y_ref, y_truth), 1e-5);
    EXPECT_EQ(y_ref[1 * s.n_out + 5], y0[1 * s.n_out + 5]) << "a row no adapter names is left alone";

    for (const char* isa : {"scalar", "avx2", "avx512"}) {
      if (!matmul_force_isa(isa)) continue;
      SCOPED_TRACE(isa);
      std::vector<float> ax(ax_ref.size());
      ASSERT_EQ(lora_shrink(a_t.data(), s.k, s.rank, scale, x.data(), rows.data(), n, ax.data(), pool),
                Status::ok);
      EXPECT_LT(max_relative_error(ax, ax_truth), 1e-5);
      std::vector<float> y = y0;
      ASSERT_EQ(lora_expand(b_t.data(), s.rank, s.n_out, ax_ref.data(), rows.data(), n, y.data(), pool),
                Status::ok);
      EXPECT_LT(max_relative_error(y, y_truth), 1e-5);
      for (int64_t o = 0; o < s.n_out; ++o) EXPECT_EQ(y[2 * s.n_out + o], y0[2 * s.n_out + o]);
    }
    matmul_force_isa(original.c_str());
  }
}

// The serving tests compare a worker's tokens with single-process runs of other thread counts: the
// products must not depend on it, bit for bit.
TEST(LoraKernels, ResultsDoNotDependOnTheThreadCount) {
  const int64_t k = 2100, rank = 24, n_out = 1300;
  const std::vector<f16_bits> a_t = random_fp16(static_cast<size_t>(k * rank), 5);
  const std::vector<f16_bits> b_t = random_fp16(static_cast<size_t>(rank * n_out), 6);
  const std::vector<float> x = test::random_floats(static_cast<size_t>(3 * k), 7);
  const std::vector<int64_t> rows = {2, 0};
  std::vector<std::vector<float>> ys;
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    std::vector<float> ax(2 * rank), y(static_cast<size_t>(3 * n_out), 1.0f);
    ASSERT_EQ(lora_shrink(a_t.data(), k, rank, 0.5f, x.data(), rows.data(), 2, ax.data(), pool), Status::ok);
    ASSERT_EQ(lora_expand(b_t.data(), rank, n_out, ax.data(), rows.data(), 2, y.data(), pool), Status::ok);
    ys.push_back(y);
  }
  EXPECT_EQ(ys[0], ys[1]);
  EXPECT_EQ(ys[0], ys[2]);
}

TEST(LoraKernels, RefuseBadArguments) {
  ThreadPool pool(1);
  const std::vector<f16_bits> f(16);
  std::vector<float> x(16), out(16);
  const int64_t row = 0;
  EXPECT_EQ(lora_shrink(nullptr, 4, 4, 1, x.data(), &row, 1, out.data(), pool), Status::invalid_argument);
  EXPECT_EQ(lora_shrink(f.data(), 0, 4, 1, x.data(), &row, 1, out.data(), pool), Status::invalid_argument);
  EXPECT_EQ(lora_expand(f.data(), 4, 4, x.data(), nullptr, 1, out.data(), pool), Status::invalid_argument);
  EXPECT_EQ(lora_expand(f.data(), 4, -1, x.data(), &row, 1, out.data(), pool), Status::invalid_argument);
  EXPECT_EQ(lora_expand(f.data(), 4, 4, x.data(), nullptr, 0, out.data(), pool), Status::ok);  // no rows
}

}  // namespace
}  // namespace nibble::kernels
