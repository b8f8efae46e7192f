// The KV cache's Walsh-Hadamard rotation (kernels/hadamard): the fast transform against the product
// with llama.cpp's matrix, on random rows of every block size a model uses (64, 128, 256) and odd row
// counts; and the properties the attention relies on: it keeps dot products and is its own inverse.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/hadamard.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::kernels {
namespace {

double dot(const float* a, const float* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

TEST(HadamardRotation, FastTransformMatchesTheMatrixProduct) {
  for (const int64_t block : {1, 2, 8, 64, 128, 256}) {
    for (const int64_t rows : {1, 7, 33}) {
      SCOPED_TRACE("block " + std::to_string(block) + ", rows " + std::to_string(rows));
      const std::vector<float> x =
          test::random_floats(static_cast<size_t>(rows * block), 7 + rows, -3.0f, 3.0f);
      std::vector<float> fast = x, matrix = x;
      ASSERT_EQ(hadamard_rotate(fast.data(), rows, block), Status::ok);
      ASSERT_EQ(hadamard_rotate_reference(matrix.data(), rows, block), Status::ok);
      for (size_t i = 0; i < x.size(); ++i)
        EXPECT_NEAR(fast[i], matrix[i], 2e-5f * std::sqrt(float(block))) << i;
    }
  }
}

TEST(HadamardRotation, KeepsDotProductsAndIsItsOwnInverse) {
  const int64_t block = 128, rows = 5;
  const std::vector<float> q = test::random_floats(static_cast<size_t>(rows * block), 1, -2.0f, 2.0f);
  const std::vector<float> k = test::random_floats(q.size(), 2, -2.0f, 2.0f);
  std::vector<float> q_rot = q, k_rot = k;
  ASSERT_EQ(hadamard_rotate(q_rot.data(), rows, block), Status::ok);
  ASSERT_EQ(hadamard_rotate(k_rot.data(), rows, block), Status::ok);
  for (int64_t r = 0; r < rows; ++r)
    EXPECT_NEAR(dot(&q_rot[r * block], &k_rot[r * block], block), dot(&q[r * block], &k[r * block], block),
                1e-4);
  EXPECT_NE(q_rot, q);  // it does rotate
  ASSERT_EQ(hadamard_rotate(q_rot.data(), rows, block), Status::ok);
  for (size_t i = 0; i < q.size(); ++i) EXPECT_NEAR(q_rot[i], q[i], 1e-5f) << i;
  // One outlier is spread evenly over the block: what makes block quantization of it cheaper.
  std::vector<float> spike(static_cast<size_t>(block), 0.0f);
  spike[5] = 8.0f;
  ASSERT_EQ(hadamard_rotate(spike.data(), 1, block), Status::ok);
  for (float v : spike) EXPECT_FLOAT_EQ(std::fabs(v), 8.0f / std::sqrt(float(block)));
}

TEST(HadamardRotation, RejectsBlocksThatAreNotPowersOfTwo) {
  std::vector<float> x(96);
  EXPECT_EQ(hadamard_rotate(x.data(), 1, 96), Status::invalid_argument);
  EXPECT_EQ(hadamard_rotate_reference(x.data(), 1, 96), Status::invalid_argument);
  EXPECT_EQ(hadamard_rotate(nullptr, 1, 64), Status::invalid_argument);
  EXPECT_EQ(hadamard_rotate(x.data(), 1, 0), Status::invalid_argument);
}

}  // namespace
}  // namespace nibble::kernels
