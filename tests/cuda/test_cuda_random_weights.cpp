// kernels::cuda::fill_random_q4_0 against kernels::fill_random_q4_0: the same bytes, on odd sizes
// (one row, row counts that are not multiples of the thread block, k not a power of two), so that a
// dummy model is the same on both devices. Skips without a CUDA device.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "kernels/cuda/random_weights.cuh"
#include "kernels/random_weights.hpp"
#include "tests/cuda/cuda_test_util.hpp"

namespace k = nibble::kernels;
namespace ct = nibble::cuda_test;

namespace {

TEST(CudaRandomWeights, BytesEqualTheHostGenerator) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  for (const int64_t n_out : {1, 37, 4099}) {
    for (const int64_t kk : {32, 96, 4128}) {
      for (const uint64_t seed : {0ull, 7ull, 0xfedcba9876543210ull}) {
        const size_t bytes = static_cast<size_t>(n_out * (kk / 32) * 18);
        std::vector<uint8_t> host(bytes);
        ASSERT_EQ(k::fill_random_q4_0(host.data(), n_out, kk, seed), k::Status::ok);
        ct::DeviceBuffer<uint8_t> dev(bytes);
        ASSERT_NE(dev.ptr, nullptr);
        ASSERT_EQ(k::cuda::fill_random_q4_0(dev.ptr, n_out, kk, seed, nullptr), k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_EQ(dev.to_host(), host) << "n_out " << n_out << ", k " << kk << ", seed " << seed;
      }
    }
  }
}

TEST(CudaRandomWeights, FillsASliceOfALargerAllocation) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  // Stacked matrices (q/k/v) are filled part by part at row offsets: the bytes around a part stay.
  const int64_t kk = 64, rows = 5, row_bytes = kk / 32 * 18;
  ct::DeviceBuffer<uint8_t> dev(std::vector<uint8_t>(static_cast<size_t>(3 * rows * row_bytes), 0x5A));
  ASSERT_NE(dev.ptr, nullptr);
  ASSERT_EQ(k::cuda::fill_random_q4_0(dev.ptr + rows * row_bytes, rows, kk, 9, nullptr), k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint8_t> want(static_cast<size_t>(3 * rows * row_bytes), 0x5A);
  ASSERT_EQ(k::fill_random_q4_0(want.data() + rows * row_bytes, rows, kk, 9), k::Status::ok);
  EXPECT_EQ(dev.to_host(), want);
}

TEST(CudaRandomWeights, RejectsBadShapes) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  ct::DeviceBuffer<uint8_t> dev(64);
  EXPECT_EQ(k::cuda::fill_random_q4_0(dev.ptr, 1, 48, 1, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::fill_random_q4_0(dev.ptr + 1, 1, 32, 1, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::fill_random_q4_0(nullptr, 1, 32, 1, nullptr), k::Status::invalid_argument);
}

}  // namespace
