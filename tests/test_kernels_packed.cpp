// Packed Q4_0 weights (kernels/packed_weights.hpp) on every ISA the CPU has: against
// matmul_reference, against the unpacked matmul on the same ISA, and across thread counts.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/matmul.hpp"
#include "kernels/packed_weights.hpp"
#include "kernels/quantize.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::kernels {
namespace {

class ForcedIsa {
 public:
  ForcedIsa() : original_(matmul_isa()) {}
  ~ForcedIsa() { matmul_force_isa(original_.c_str()); }
  bool force(const std::string& isa) { return matmul_force_isa(isa.c_str()); }

 private:
  std::string original_;
};

std::vector<uint8_t> random_q4_0(int64_t n_out, int64_t k, uint64_t seed) {
  const int64_t row = row_bytes(DType::Q4_0, k);
  std::vector<uint8_t> w(static_cast<size_t>(n_out * row));
  const std::vector<float> values = test::random_floats(static_cast<size_t>(n_out * k), seed);
  for (int64_t o = 0; o < n_out; ++o)
    EXPECT_EQ(quantize_row(DType::Q4_0, values.data() + o * k, w.data() + o * row, k), Status::ok);
  return w;
}

double relative_rms_error(const std::vector<float>& actual, const std::vector<float>& expected) {
  double err = 0.0, ref = 0.0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double d = static_cast<double>(actual[i]) - expected[i];
    err += d * d;
    ref += static_cast<double>(expected[i]) * expected[i];
  }
  return std::sqrt(err / ref);
}

class KernelPacked : public ::testing::TestWithParam<std::string> {};

// Odd shapes: partial last panels (n_out not a multiple of 8), a single row, activation row counts
// that leave every edge tile.
TEST_P(KernelPacked, MatchesUnpackedAndReference) {
  ForcedIsa forced;
  if (!forced.force(GetParam())) GTEST_SKIP() << "this CPU does not support " << GetParam();
  ThreadPool serial(1);
  ThreadPool threaded(3);
  for (int64_t n_out : {1, 7, 8, 13, 301}) {
    for (int64_t k : {32, 224, 512}) {
      const std::vector<uint8_t> w = random_q4_0(n_out, k, 7 + n_out + k);
      const PackedMatrix packed = pack_for_matmul(DType::Q4_0, w.data(), n_out, k);
      ASSERT_FALSE(packed.empty());
      EXPECT_EQ(packed.n_out(), n_out);
      EXPECT_EQ(packed.k(), k);
      for (int64_t m : {1, 3, 4, 5, 33}) {
        SCOPED_TRACE("n_out=" + std::to_string(n_out) + " k=" + std::to_string(k) +
                     " m=" + std::to_string(m));
        const std::vector<float> x = test::random_floats(static_cast<size_t>(m * k), 100 + m);
        std::vector<float> y(m * n_out), y_threaded(m * n_out), y_unpacked(m * n_out), y_ref(m * n_out);
        ASSERT_EQ(matmul_packed(packed, x.data(), m, y.data(), serial), Status::ok);
        ASSERT_EQ(matmul_packed(packed, x.data(), m, y_threaded.data(), threaded), Status::ok);
        ASSERT_EQ(matmul(DType::Q4_0, w.data(), n_out, k, x.data(), m, y_unpacked.data(), serial),
                  Status::ok);
        ASSERT_EQ(matmul_reference(DType::Q4_0, w.data(), n_out, k, x.data(), m, y_ref.data()), Status::ok);
        EXPECT_EQ(y, y_threaded);  // threads split panels only
        // 8-bit activations give ~0.4% relative RMS error, measured over enough outputs that a few
        // near-zero ones cannot dominate.
        if (m * n_out >= 32) {
          EXPECT_LT(relative_rms_error(y, y_ref), 1e-2);
        }
        if (GetParam() == "scalar") {
          EXPECT_EQ(y, y_unpacked);  // the same integer sums and float operations in the same order
        } else {
          double scale = 0.0;
          for (float v : y_unpacked) scale += static_cast<double>(v) * v;
          scale = std::sqrt(scale / static_cast<double>(y_unpacked.size()));
          for (size_t i = 0; i < y.size(); ++i)
            ASSERT_NEAR(y[i], y_unpacked[i], 1e-4 * (std::fabs(y_unpacked[i]) + scale)) << "index " << i;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, KernelPacked, ::testing::Values("scalar", "avx2", "avx512"));

TEST(KernelPackedArguments, UnsupportedInputsGiveEmptyMatrices) {
  const std::vector<uint8_t> w = random_q4_0(8, 64, 1);
  EXPECT_TRUE(can_pack_for_matmul(DType::Q4_0));
  EXPECT_FALSE(can_pack_for_matmul(DType::Q8_0));
  EXPECT_TRUE(pack_for_matmul(DType::Q8_0, w.data(), 8, 64).empty());
  EXPECT_TRUE(pack_for_matmul(DType::Q4_0, w.data(), 8, 48).empty());
  EXPECT_TRUE(pack_for_matmul(DType::Q4_0, w.data(), 0, 64).empty());
  EXPECT_TRUE(pack_for_matmul(DType::Q4_0, nullptr, 8, 64).empty());
  ThreadPool pool(1);
  std::vector<float> x(64), y(8);
  EXPECT_EQ(matmul_packed(PackedMatrix{}, x.data(), 1, y.data(), pool), Status::invalid_argument);
  const PackedMatrix packed = pack_for_matmul(DType::Q4_0, w.data(), 8, 64);
  EXPECT_EQ(matmul_packed(packed, nullptr, 1, y.data(), pool), Status::invalid_argument);
  EXPECT_EQ(packed.size_bytes(), w.size());
}

}  // namespace
}  // namespace nibble::kernels
