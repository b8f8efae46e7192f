// matmul for every weight type and every ISA the CPU has, against matmul_reference (float
// activations, double accumulation) and against the scalar ISA (same integer math).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/matmul.hpp"
#include "kernels/matmul_internal.hpp"
#include "kernels/quantize.hpp"
#include "kernels/read_only_quants.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::kernels {
namespace {

// Restores the dispatcher's choice when a test that forced an ISA ends.
class ForcedIsa {
 public:
  ForcedIsa() : original_(matmul_isa()) {}
  ~ForcedIsa() { matmul_force_isa(original_.c_str()); }
  bool force(const std::string& isa) { return matmul_force_isa(isa.c_str()); }

 private:
  std::string original_;
};

// Random weights of `type`: float and blocks of 32 (but IQ4_NL and MXFP4) by quantizing random floats; the
// K-quants and the types Nibble only reads as random bytes with small random super-block scales, which is any
// valid block (the quantizers rarely give extreme quants).
std::vector<uint8_t> random_weights(DType type, int64_t n_out, int64_t k, uint64_t seed) {
  const int64_t row = row_bytes(type, k);
  std::vector<uint8_t> w(static_cast<size_t>(n_out * row));
  if (type == DType::Q2_K || type == DType::Q3_K || type == DType::Q4_K || type == DType::Q5_K ||
      type == DType::Q6_K || type == DType::IQ4_XS || type == DType::IQ4_NL || is_read_only_type(type))
    return test::random_quant_blocks(type, n_out, k, seed);
  const std::vector<float> values = test::random_floats(static_cast<size_t>(n_out * k), seed);
  for (int64_t o = 0; o < n_out; ++o)
    EXPECT_EQ(quantize_row(type, values.data() + o * k, w.data() + o * row, k), Status::ok);
  return w;
}

double rms(const std::vector<float>& v) {
  double sum = 0.0;
  for (float f : v) sum += static_cast<double>(f) * f;
  return std::sqrt(sum / static_cast<double>(v.size()));
}

double relative_rms_error(const std::vector<float>& actual, const std::vector<float>& expected) {
  double err = 0.0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double d = static_cast<double>(actual[i]) - expected[i];
    err += d * d;
  }
  return std::sqrt(err / static_cast<double>(actual.size())) / rms(expected);
}

bool uses_quantized_activations(DType type) {
  return type != DType::F32 && type != DType::F16 && type != DType::BF16;
}

// k for a weight type: an odd number of blocks; for float types also not a multiple of the
// 8-lane vector width, to exercise the tail loop.
int64_t test_k(DType type) {
  switch (type) {
    case DType::Q2_K:
    case DType::Q3_K:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
    case DType::IQ4_XS:
      return 256 * 3;
    case DType::Q4_0:
    case DType::Q4_1:
    case DType::Q5_0:
    case DType::Q5_1:
    case DType::Q8_0:
    case DType::IQ4_NL:
      return 32 * 7;
    default:
      if (is_read_only_type(type)) return type_info(type).block_elems * (type == DType::MXFP4 ? 7 : 3);
      return 231;
  }
}

using MatmulParam = std::tuple<std::string, DType>;

class KernelMatmul : public ::testing::TestWithParam<MatmulParam> {};

TEST_P(KernelMatmul, MatchesReferenceAndScalar) {
  const auto& [isa, type] = GetParam();
  ForcedIsa forced;
  if (!forced.force(isa)) GTEST_SKIP() << "this CPU does not support " << isa;
  const int64_t n_out = 37;
  const int64_t k = test_k(type);
  const std::vector<uint8_t> w = random_weights(type, n_out, k, 42);
  ThreadPool serial(1);
  ThreadPool threaded(3);
  for (int64_t m : {1, 3, 7, 33}) {
    SCOPED_TRACE("m=" + std::to_string(m));
    const std::vector<float> x = test::random_floats(static_cast<size_t>(m * k), 1000 + m);
    std::vector<float> y(m * n_out), y_threaded(m * n_out), y_ref(m * n_out), y_scalar(m * n_out);
    ASSERT_EQ(matmul_reference(type, w.data(), n_out, k, x.data(), m, y_ref.data()), Status::ok);
    ASSERT_EQ(matmul(type, w.data(), n_out, k, x.data(), m, y.data(), serial), Status::ok);
    ASSERT_EQ(matmul(type, w.data(), n_out, k, x.data(), m, y_threaded.data(), threaded), Status::ok);
    // Threads split output rows only, so every output is computed the same way.
    EXPECT_EQ(y, y_threaded);

    // Activations quantized to 8 bits (Q8_0 / Q8_K) carry a relative RMS error of about
    // 1/(127·√3)/rms(x/amax) ≈ 0.4% for uniform inputs, which passes to the outputs; float
    // activations only see fp32 accumulation rounding.
    const double tolerance = uses_quantized_activations(type) ? 1e-2 : 1e-5;
    EXPECT_LT(relative_rms_error(y, y_ref), tolerance) << type_name(type);

    ForcedIsa scalar_guard;
    ASSERT_TRUE(scalar_guard.force("scalar"));
    ASSERT_EQ(matmul(type, w.data(), n_out, k, x.data(), m, y_scalar.data(), serial), Status::ok);
    // Same quantized activations and integer block dot products: only float accumulation order
    // differs between ISAs.
    const double scale = rms(y_scalar);
    for (size_t i = 0; i < y.size(); ++i)
      ASSERT_NEAR(y[i], y_scalar[i], 1e-4 * (std::fabs(y_scalar[i]) + scale)) << "index " << i;
  }
}

// Speculative verification multiplies k + 1 rows where plain decoding multiplies one, and greedy
// output must not change: every tile shape has to sum a (row, output) pair in the same order, so
// each row of an m-row product equals that row multiplied alone, bit for bit.
TEST_P(KernelMatmul, RowsDoNotDependOnTheBatch) {
  const auto& [isa, type] = GetParam();
  ForcedIsa forced;
  if (!forced.force(isa)) GTEST_SKIP() << "this CPU does not support " << isa;
  const int64_t n_out = 37;
  const int64_t k = test_k(type);
  const std::vector<uint8_t> w = random_weights(type, n_out, k, 7);
  ThreadPool pool(2);
  std::vector<int64_t> batches = {2, 5, 6, 7, 13};
  if (is_read_only_type(type)) batches.push_back(70);  // their kernel takes activation rows 64 at a time
  for (int64_t m : batches) {
    SCOPED_TRACE("m=" + std::to_string(m));
    const std::vector<float> x = test::random_floats(static_cast<size_t>(m * k), 500 + m);
    std::vector<float> y(m * n_out), y_row(n_out);
    ASSERT_EQ(matmul(type, w.data(), n_out, k, x.data(), m, y.data(), pool), Status::ok);
    for (int64_t r = 0; r < m; ++r) {
      ASSERT_EQ(matmul(type, w.data(), n_out, k, x.data() + r * k, 1, y_row.data(), pool), Status::ok);
      for (int64_t o = 0; o < n_out; ++o)
        ASSERT_EQ(y[r * n_out + o], y_row[o]) << type_name(type) << " row " << r << " output " << o;
    }
  }
}

std::string param_name(const ::testing::TestParamInfo<MatmulParam>& info) {
  return std::get<0>(info.param) + "_" + type_name(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(AllTypes, KernelMatmul,
                         ::testing::Combine(::testing::Values("scalar", "avx2", "avx512"),
                                            ::testing::Values(DType::F32, DType::F16, DType::BF16,
                                                              DType::Q4_0, DType::Q4_1, DType::Q5_0,
                                                              DType::Q5_1, DType::Q8_0, DType::Q2_K,
                                                              DType::Q3_K, DType::Q4_K, DType::Q5_K,
                                                              DType::Q6_K, DType::IQ4_NL, DType::IQ4_XS)),
                         param_name);

// The types Nibble reads but does not write have scalar kernels only, which every kernel set uses.
INSTANTIATE_TEST_SUITE_P(ReadOnlyTypes, KernelMatmul,
                         ::testing::Combine(::testing::Values("scalar", "avx2", "avx512"),
                                            ::testing::Values(DType::IQ2_XXS, DType::IQ2_XS, DType::IQ2_S,
                                                              DType::IQ3_XXS, DType::IQ3_S, DType::IQ1_S,
                                                              DType::IQ1_M, DType::TQ1_0, DType::TQ2_0,
                                                              DType::MXFP4)),
                         param_name);

// Several chunks per thread and edge tiles in both dimensions.
TEST(KernelMatmulLarge, ManyChunksMatchReference) {
  ThreadPool pool(2);
  for (DType type : {DType::Q4_0, DType::F16, DType::Q4_K}) {
    const int64_t n_out = 301, k = 512, m = 5;
    const std::vector<uint8_t> w = random_weights(type, n_out, k, 9);
    const std::vector<float> x = test::random_floats(static_cast<size_t>(m * k), 10);
    std::vector<float> y(m * n_out), y_ref(m * n_out);
    ASSERT_EQ(matmul(type, w.data(), n_out, k, x.data(), m, y.data(), pool), Status::ok);
    ASSERT_EQ(matmul_reference(type, w.data(), n_out, k, x.data(), m, y_ref.data()), Status::ok);
    EXPECT_LT(relative_rms_error(y, y_ref), uses_quantized_activations(type) ? 1e-2 : 1e-5)
        << type_name(type);
  }
}

// Every kernel set's activation quantizers must produce quantize_activations' exact bytes: llama.cpp's
// x86 conversion, q = x · (127 / amax) with ties to even (x·(127/amax) exactly .5), and all-zero blocks.
TEST(KernelMatmulActivations, SimdQuantizersMatchQuantizeRow) {
  std::vector<float> x = test::random_floats(32 * 8, 3, -3.0f, 3.0f);
  for (int i = 0; i < 32; ++i) x[i] = 0.0f;
  // Block 1: amax 127 gives d = 1 exactly, so these are exact ties.
  const float ties[] = {127.0f, 0.5f, -0.5f, 1.5f, -2.5f, 3.5f, 126.5f, -126.5f};
  for (int i = 0; i < 8; ++i) x[32 + i] = ties[i];
  std::vector<BlockQ8_0> expected(8);
  ASSERT_EQ(quantize_activations(DType::Q8_0, x.data(), expected.data(), 256), Status::ok);
  std::vector<BlockQ8_K> expected_k(1);
  ASSERT_EQ(quantize_row(DType::Q8_K, x.data(), expected_k.data(), 256), Status::ok);
  std::vector<BlockQ8_1> expected_1(8);
  ASSERT_EQ(quantize_activations(DType::Q8_1, x.data(), expected_1.data(), 256), Status::ok);
  const std::vector<std::pair<std::string, const detail::IsaKernels* (*)()>> isas = {
    {"scalar", [] { return &detail::scalar_kernels(); }},
#if defined(__x86_64__)
    {"avx2", [] { return &detail::avx2_kernels(); }},
    {"avx512", [] { return &detail::avx512_kernels(); }},
#endif
  };
  for (const auto& [name, kernels] : isas) {
    ForcedIsa forced;
    if (!forced.force(name)) continue;  // the CPU lacks it: its code may not run here
    std::vector<BlockQ8_0> actual(8);
    kernels()->quantize_q8_0(x.data(), actual.data(), 256);
    EXPECT_EQ(std::memcmp(actual.data(), expected.data(), sizeof(BlockQ8_0) * 8), 0) << name;
    std::vector<BlockQ8_K> actual_k(1);
    kernels()->quantize_q8_k(x.data(), actual_k.data(), 256);
    EXPECT_EQ(std::memcmp(actual_k.data(), expected_k.data(), sizeof(BlockQ8_K)), 0) << name;
    std::vector<BlockQ8_1> actual_1(8);
    kernels()->quantize_q8_1(x.data(), actual_1.data(), 256);
    EXPECT_EQ(std::memcmp(actual_1.data(), expected_1.data(), sizeof(BlockQ8_1) * 8), 0) << name;
  }
  // Ties to even, where the reference (quantize_row, llama.cpp's _ref, as weights are written) rounds
  // them away from zero.
  const int8_t to_even[] = {127, 0, 0, 2, -2, 4, 126, -126};
  const int8_t away[] = {127, 1, -1, 2, -3, 4, 127, -127};
  std::vector<BlockQ8_0> reference(8);
  ASSERT_EQ(quantize_row(DType::Q8_0, x.data(), reference.data(), 256), Status::ok);
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(expected[1].qs[i], to_even[i]) << ties[i];
    EXPECT_EQ(reference[1].qs[i], away[i]) << ties[i];
  }
  // Q8_1: Q8_0's d and quants, and s = d · Σq; block 1's d is 1 exactly, so s is Σq (|Σq| < 2048: exact in
  // fp16).
  for (int b = 0; b < 8; ++b) {
    EXPECT_EQ(expected_1[b].d, expected[b].d);
    EXPECT_EQ(std::memcmp(expected_1[b].qs, expected[b].qs, 32), 0);
  }
  int sum = 0;
  for (int8_t q : expected[1].qs) sum += q;
  EXPECT_EQ(fp16_to_fp32(expected_1[1].s), static_cast<float>(sum));
  EXPECT_EQ(expected_1[0].s, 0);
}

// Activations that are a 4-bit cache's levels (d · k, k in -8..7, the block's largest magnitude -8d):
// x · 127/amax lands on exact ties that only the exact arithmetic rounds as llama.cpp does (a product
// fused with a later add into one FMA, or x / d instead of x · (127/amax), rounds some the other way).
// Every kernel set's quantizers against quantize_activations, which equals llama.cpp's x86 conversion.
TEST(KernelMatmulActivations, TiesFromFourBitLevelsRoundAsQuantizeActivations) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> level(-8, 7);
  const int64_t n = 256 * 16;
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t b = 0; b < n / 32; ++b) {
    const float d = 0.01f + 0.0013f * static_cast<float>(b % 97);
    for (int64_t j = 0; j < 32; ++j) x[static_cast<size_t>(b * 32 + j)] = d * static_cast<float>(level(rng));
    x[static_cast<size_t>(b * 32)] = -8.0f * d;
  }
  std::vector<uint8_t> expected_0(static_cast<size_t>(row_bytes(DType::Q8_0, n))),
      expected_1(static_cast<size_t>(row_bytes(DType::Q8_1, n))),
      expected_k(static_cast<size_t>(row_bytes(DType::Q8_K, n)));
  ASSERT_EQ(quantize_activations(DType::Q8_0, x.data(), expected_0.data(), n), Status::ok);
  ASSERT_EQ(quantize_activations(DType::Q8_1, x.data(), expected_1.data(), n), Status::ok);
  ASSERT_EQ(quantize_activations(DType::Q8_K, x.data(), expected_k.data(), n), Status::ok);
  std::vector<uint8_t> reference(expected_0.size());
  ASSERT_EQ(quantize_row(DType::Q8_0, x.data(), reference.data(), n), Status::ok);
  EXPECT_NE(reference, expected_0);  // the data has ties the two roundings split on
  for (const std::string name : {"scalar", "avx2", "avx512"}) {
    ForcedIsa forced;
    if (!forced.force(name)) continue;
    const detail::IsaKernels& kernels = detail::active_kernels();
    std::vector<uint8_t> got_0(expected_0.size()), got_1(expected_1.size()), got_k(expected_k.size());
    kernels.quantize_q8_0(x.data(), got_0.data(), n);
    kernels.quantize_q8_1(x.data(), got_1.data(), n);
    kernels.quantize_q8_k(x.data(), got_k.data(), n);
    EXPECT_EQ(got_0, expected_0) << name;
    EXPECT_EQ(got_1, expected_1) << name;
    EXPECT_EQ(got_k, expected_k) << name;
  }
}

TEST(KernelMatmulArguments, InvalidArgumentsAreRejected) {
  ThreadPool pool(1);
  std::vector<uint8_t> w(4096);
  std::vector<float> x(256), y(256);
  EXPECT_EQ(matmul(DType::Q4_0, nullptr, 2, 32, x.data(), 1, y.data(), pool), Status::invalid_argument);
  EXPECT_EQ(matmul(DType::Q4_0, w.data(), 2, 32, nullptr, 1, y.data(), pool), Status::invalid_argument);
  EXPECT_EQ(matmul(DType::Q4_0, w.data(), 2, 32, x.data(), 1, nullptr, pool), Status::invalid_argument);
  EXPECT_EQ(matmul(DType::Q4_0, w.data(), 2, 48, x.data(), 1, y.data(), pool), Status::invalid_argument);
  EXPECT_EQ(matmul(DType::Q4_K, w.data(), 2, 128, x.data(), 1, y.data(), pool), Status::invalid_argument);
  EXPECT_EQ(matmul(DType::F32, w.data(), -1, 32, x.data(), 1, y.data(), pool), Status::invalid_argument);
  EXPECT_EQ(matmul(DType::F32, w.data(), 1, 32, x.data(), -1, y.data(), pool), Status::invalid_argument);
  EXPECT_EQ(matmul(DType::Q8_K, w.data(), 1, 256, x.data(), 1, y.data(), pool), Status::unsupported_type);
  EXPECT_EQ(matmul(static_cast<DType>(24), w.data(), 1, 256, x.data(), 1, y.data(), pool),  // GGML's I8
            Status::unsupported_type);
  EXPECT_EQ(matmul_reference(DType::Q8_K, w.data(), 1, 256, x.data(), 1, y.data()), Status::unsupported_type);
  EXPECT_EQ(matmul_reference(DType::Q4_0, w.data(), 1, 33, x.data(), 1, y.data()), Status::invalid_argument);
  // Empty shapes are fine; k = 0 gives zeros.
  EXPECT_EQ(matmul(DType::Q4_0, w.data(), 0, 32, x.data(), 1, y.data(), pool), Status::ok);
  y.assign(y.size(), 5.0f);
  EXPECT_EQ(matmul(DType::Q4_0, w.data(), 3, 0, x.data(), 2, y.data(), pool), Status::ok);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(y[i], 0.0f);
}

TEST(KernelMatmulIsa, ForceIsa) {
  ForcedIsa forced;
  EXPECT_TRUE(forced.force("scalar"));
  EXPECT_STREQ(matmul_isa(), "scalar");
  EXPECT_FALSE(forced.force("neon"));
  EXPECT_FALSE(matmul_force_isa(nullptr));
  EXPECT_STREQ(matmul_isa(), "scalar");
}

}  // namespace
}  // namespace nibble::kernels
