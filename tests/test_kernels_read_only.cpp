// The GGUF types Nibble reads but does not write (kernels/read_only_quants.hpp) against llama.cpp itself:
// tests/data/ggml-quantize/read-only.bin holds GGML's quantization of the hard rows to each type, GGML's
// dequantization of those bytes and GGML's CPU dot product of each row with one activation row
// (tools/ggml_read_only_reference.py). Nibble must dequantize bit for bit as GGML does and multiply to
// GGML's dot within float summation order.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/matmul.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"
#include "kernels/read_only_quants.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::kernels {
namespace {

struct TypeReference {
  std::vector<uint8_t> bytes;      // [n_rows] rows of the type
  std::vector<float> dequantized;  // [n_rows, n_per_row], GGML's to_float
  std::vector<float> dots;         // [n_rows], GGML's vec_dot with the activation row
};

struct ReadOnlyReference {
  int64_t n_rows = 0;
  int64_t n_per_row = 0;
  std::vector<float> activation;  // [n_per_row]
  std::map<uint32_t, TypeReference> types;
};

ReadOnlyReference read_reference() {
  const auto path = test::test_data_dir() / "ggml-quantize" / "read-only.bin";
  test::FileReader file(path);
  const auto take = [&](void* out, size_t n) { file.take(out, n); };
  char magic[8];
  take(magic, 8);
  if (std::memcmp(magic, "NBQROT01", 8) != 0) throw std::runtime_error(path.string() + ": bad magic");
  uint32_t n_rows = 0, n_per_row = 0, n_types = 0;
  take(&n_rows, 4);
  take(&n_per_row, 4);
  ReadOnlyReference ref;
  ref.n_rows = n_rows;
  ref.n_per_row = n_per_row;
  ref.activation.resize(n_per_row);
  take(ref.activation.data(), n_per_row * sizeof(float));
  take(&n_types, 4);
  for (uint32_t t = 0; t < n_types; ++t) {
    uint32_t type = 0, size = 0;
    take(&type, 4);
    take(&size, 4);
    TypeReference& entry = ref.types[type];
    entry.bytes.resize(size);
    take(entry.bytes.data(), size);
    entry.dequantized.resize(static_cast<size_t>(n_rows) * n_per_row);
    take(entry.dequantized.data(), entry.dequantized.size() * sizeof(float));
    entry.dots.resize(n_rows);
    take(entry.dots.data(), n_rows * sizeof(float));
  }
  if (!file.at_end()) throw std::runtime_error(path.string() + ": trailing bytes");
  return ref;
}

const ReadOnlyReference& reference() {
  static const ReadOnlyReference ref = read_reference();
  return ref;
}

const TypeReference& reference_for(DType type) {
  const auto found = reference().types.find(static_cast<uint32_t>(type));
  if (found == reference().types.end())
    throw std::runtime_error(std::string(type_name(type)) + " is not in the reference file");
  return found->second;
}

class ReadOnlyType : public ::testing::TestWithParam<DType> {};

TEST_P(ReadOnlyType, DequantizesAsLlamaCppBitForBit) {
  const DType type = GetParam();
  const ReadOnlyReference& ref = reference();
  const TypeReference& theirs = reference_for(type);
  const int64_t bytes_per_row = row_bytes(type, ref.n_per_row);
  ASSERT_EQ(static_cast<int64_t>(theirs.bytes.size()), bytes_per_row * ref.n_rows);
  EXPECT_TRUE(is_read_only_type(type));
  std::vector<float> mine(static_cast<size_t>(ref.n_per_row));
  int64_t nonzero = 0;
  for (int64_t r = 0; r < ref.n_rows; ++r) {
    ASSERT_EQ(dequantize_row(type, theirs.bytes.data() + r * bytes_per_row, mine.data(), ref.n_per_row),
              Status::ok);
    for (int64_t i = 0; i < ref.n_per_row; ++i) {
      const float expected = theirs.dequantized[static_cast<size_t>(r * ref.n_per_row + i)];
      nonzero += expected != 0.0f;
      uint32_t a, b;
      std::memcpy(&a, &mine[static_cast<size_t>(i)], 4);
      std::memcpy(&b, &expected, 4);
      ASSERT_EQ(a, b) << type_name(type) << " row " << r << " element " << i << ": " << mine[i] << " against "
                      << expected;
    }
  }
  // Many weights are nonzero (ternary rows of Gaussian values are mostly 0), so the comparison covers the
  // grids, signs and scales, not only zeros.
  EXPECT_GT(nonzero, ref.n_rows * ref.n_per_row / 8);
}

TEST_P(ReadOnlyType, MultipliesAsLlamaCpp) {
  const DType type = GetParam();
  const ReadOnlyReference& ref = reference();
  const TypeReference& theirs = reference_for(type);
  ThreadPool pool(2);
  std::vector<float> y(static_cast<size_t>(ref.n_rows));
  ASSERT_EQ(
      matmul(type, theirs.bytes.data(), ref.n_rows, ref.n_per_row, ref.activation.data(), 1, y.data(), pool),
      Status::ok);
  const bool ternary = type == DType::TQ1_0 || type == DType::TQ2_0;
  for (int64_t r = 0; r < ref.n_rows; ++r) {
    // The same integer sums; GGML's SIMD kernels add the blocks' float terms in another order. Bound the
    // difference by the size of the terms, Σ|w|·|x| (measured: below 1e-7 of it). GGML's x86 TQ kernels
    // take the −1 offset off through the activations' 16-element sums, lane by lane, and round each
    // lane's product before adding them, so theirs is off the exact sum by up to ~1e-6 of max|w|·Σ|x|.
    double magnitude = 0.0, max_w = 0.0, sum_x = 0.0;
    for (int64_t i = 0; i < ref.n_per_row; ++i) {
      const double w = theirs.dequantized[static_cast<size_t>(r * ref.n_per_row + i)];
      const double x = ref.activation[static_cast<size_t>(i)];
      magnitude += std::fabs(w * x);
      max_w = std::max(max_w, std::fabs(w));
      sum_x += std::fabs(x);
    }
    const double tolerance = ternary ? 1e-6 * max_w * sum_x : 1e-6 * magnitude;
    EXPECT_NEAR(y[static_cast<size_t>(r)], theirs.dots[static_cast<size_t>(r)], tolerance + 1e-30)
        << type_name(type) << " row " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(EveryTypeNibbleOnlyReads, ReadOnlyType,
                         ::testing::Values(DType::IQ2_XXS, DType::IQ2_XS, DType::IQ2_S, DType::IQ3_XXS,
                                           DType::IQ3_S, DType::IQ1_S, DType::IQ1_M, DType::TQ1_0,
                                           DType::TQ2_0, DType::MXFP4),
                         [](const ::testing::TestParamInfo<DType>& param) {
                           return std::string(type_name(param.param));
                         });

// Nibble writes none of them: quantize_row says so rather than writing something else.
TEST(ReadOnlyTypes, AreNotWritten) {
  const std::vector<float> x = test::random_floats(256, 1);
  std::vector<uint8_t> out(1024);
  for (DType type : {DType::IQ2_XXS, DType::IQ2_XS, DType::IQ2_S, DType::IQ3_XXS, DType::IQ3_S, DType::IQ1_S,
                     DType::IQ1_M, DType::TQ1_0, DType::TQ2_0, DType::MXFP4}) {
    EXPECT_EQ(quantize_row(type, x.data(), out.data(), 256), Status::unsupported_type) << type_name(type);
    EXPECT_EQ(quantize_row_weighted(type, x.data(), x.data(), out.data(), 256), Status::unsupported_type)
        << type_name(type);
  }
  EXPECT_FALSE(is_read_only_type(DType::Q4_K));
  EXPECT_FALSE(is_read_only_type(DType::IQ4_XS));
}

}  // namespace
}  // namespace nibble::kernels
