// Nibble's quantizers against llama.cpp's own bytes on rows chosen to hit their corner cases
// (tests/data/ggml-quantize: sub-blocks whose scale rounds to 0, constant and zero runs, outliers,
// subnormal fp16 scales, rounding ties; made by tools/ggml_quantize_reference.py with GGML's
// ggml_quantize_chunk), without and with an importance row (an imatrix entry). A file Nibble writes must
// be the file llama-quantize writes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::kernels {
namespace {

struct ReferenceRows {
  int64_t n_rows = 0;
  int64_t n_per_row = 0;
  std::vector<float> rows;                              // [n_rows, n_per_row]
  std::vector<float> importance;                        // [n_per_row], the imatrix file's
  std::map<uint32_t, std::vector<uint8_t>> ggml_bytes;  // GGML type id -> the quantized rows
};

ReferenceRows read_reference(const std::filesystem::path& path) {
  test::FileReader file(path);
  const auto take = [&](void* out, size_t n) { file.take(out, n); };
  ReferenceRows ref;
  char magic[8];
  take(magic, 8);
  const bool imatrix = std::memcmp(magic, "NBQIMX01", 8) == 0;
  if (!imatrix && std::memcmp(magic, "NBQREF01", 8) != 0)
    throw std::runtime_error(path.string() + ": bad magic");
  uint32_t n_rows = 0, n_per_row = 0, n_types = 0;
  take(&n_rows, 4);
  take(&n_per_row, 4);
  ref.n_rows = n_rows;
  ref.n_per_row = n_per_row;
  ref.rows.resize(static_cast<size_t>(n_rows) * n_per_row);
  take(ref.rows.data(), ref.rows.size() * sizeof(float));
  if (imatrix) {
    ref.importance.resize(n_per_row);
    take(ref.importance.data(), ref.importance.size() * sizeof(float));
  }
  take(&n_types, 4);
  for (uint32_t t = 0; t < n_types; ++t) {
    uint32_t type = 0, size = 0;
    take(&type, 4);
    take(&size, 4);
    std::vector<uint8_t> bytes(size);
    take(bytes.data(), size);
    ref.ggml_bytes[type] = std::move(bytes);
  }
  return ref;
}

// Every row of `ref` quantized to `type` (with ref.importance when it has one) against GGML's bytes.
void expect_ggml_bytes(const ReferenceRows& ref, DType type) {
  ASSERT_EQ(ref.n_rows, 16);
  const auto found = ref.ggml_bytes.find(static_cast<uint32_t>(type));
  ASSERT_NE(found, ref.ggml_bytes.end()) << type_name(type) << " is not in the reference file";
  const int64_t bytes_per_row = row_bytes(type, ref.n_per_row);
  ASSERT_EQ(static_cast<int64_t>(found->second.size()), bytes_per_row * ref.n_rows);
  std::vector<uint8_t> mine(static_cast<size_t>(bytes_per_row));
  for (int64_t r = 0; r < ref.n_rows; ++r) {
    const float* row = ref.rows.data() + r * ref.n_per_row;
    ASSERT_EQ(ref.importance.empty()
                  ? quantize_row(type, row, mine.data(), ref.n_per_row)
                  : quantize_row_weighted(type, row, ref.importance.data(), mine.data(), ref.n_per_row),
              Status::ok);
    const uint8_t* theirs = found->second.data() + r * bytes_per_row;
    int64_t first_difference = -1;
    for (int64_t i = 0; i < bytes_per_row && first_difference < 0; ++i)
      if (mine[static_cast<size_t>(i)] != theirs[i]) first_difference = i;
    EXPECT_EQ(first_difference, -1) << type_name(type) << " row " << r << " differs from GGML's at byte "
                                    << first_difference << " of " << bytes_per_row;
  }
}

class GgmlQuantizeReference : public ::testing::TestWithParam<DType> {};

TEST_P(GgmlQuantizeReference, QuantizeRowWritesLlamaCppsBytes) {
  expect_ggml_bytes(read_reference(test::test_data_dir() / "ggml-quantize" / "hard-rows.bin"), GetParam());
}

INSTANTIATE_TEST_SUITE_P(EveryTypeNibbleWrites, GgmlQuantizeReference,
                         ::testing::Values(DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0,
                                           DType::Q2_K, DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K,
                                           DType::IQ4_NL, DType::IQ4_XS),
                         [](const ::testing::TestParamInfo<DType>& param) {
                           return std::string(type_name(param.param));
                         });

// With an importance row (llama.cpp's quantize_row_*_impl, what llama-quantize --imatrix writes).
class GgmlQuantizeReferenceImatrix : public ::testing::TestWithParam<DType> {};

TEST_P(GgmlQuantizeReferenceImatrix, QuantizeRowWeightedWritesLlamaCppsBytes) {
  expect_ggml_bytes(read_reference(test::test_data_dir() / "ggml-quantize" / "hard-rows-imatrix.bin"),
                    GetParam());
}

INSTANTIATE_TEST_SUITE_P(EveryTypeNibbleWeighs, GgmlQuantizeReferenceImatrix,
                         ::testing::Values(DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0,
                                           DType::Q2_K, DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K,
                                           DType::IQ4_NL, DType::IQ4_XS),
                         [](const ::testing::TestParamInfo<DType>& param) {
                           return std::string(type_name(param.param));
                         });

// The weighted quantizers weigh: with one importance row that favours some columns, their error moves
// there; without a row they are the reference quantizers; an activation type is refused.
TEST(QuantizeRowWeighted, ImportanceMovesTheErrorAndOtherTypesAreRefused) {
  const std::vector<float> x = test::random_floats(512, 3, -1.0f, 1.0f);
  std::vector<float> importance(512, 1.0f);
  for (int i = 0; i < 512; i += 8) importance[static_cast<size_t>(i)] = 1000.0f;  // every 8th column
  for (DType type :
       {DType::Q4_0, DType::Q5_1, DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::IQ4_XS}) {
    SCOPED_TRACE(type_name(type));
    std::vector<uint8_t> plain(static_cast<size_t>(row_bytes(type, 512))), weighted(plain.size());
    ASSERT_EQ(quantize_row(type, x.data(), plain.data(), 512), Status::ok);
    ASSERT_EQ(quantize_row_weighted(type, x.data(), importance.data(), weighted.data(), 512), Status::ok);
    std::vector<float> y_plain(512), y_weighted(512);
    ASSERT_EQ(dequantize_row(type, plain.data(), y_plain.data(), 512), Status::ok);
    ASSERT_EQ(dequantize_row(type, weighted.data(), y_weighted.data(), 512), Status::ok);
    double favoured_plain = 0, favoured_weighted = 0;
    for (int i = 0; i < 512; i += 8) {
      favoured_plain += std::pow(y_plain[static_cast<size_t>(i)] - x[static_cast<size_t>(i)], 2);
      favoured_weighted += std::pow(y_weighted[static_cast<size_t>(i)] - x[static_cast<size_t>(i)], 2);
    }
    EXPECT_LT(favoured_weighted, 0.7 * favoured_plain);
    ASSERT_EQ(quantize_row_weighted(type, x.data(), nullptr, weighted.data(), 512), Status::ok);
    EXPECT_EQ(weighted, plain);  // no importance: the reference quantizer
  }
  std::vector<uint8_t> out(2048);
  EXPECT_EQ(quantize_row_weighted(DType::Q8_K, x.data(), importance.data(), out.data(), 512),
            Status::unsupported_type);  // an activation type
}

}  // namespace
}  // namespace nibble::kernels
