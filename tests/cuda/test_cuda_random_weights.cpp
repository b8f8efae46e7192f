// kernels::cuda::fill_random_q4_0 against kernels::fill_random_q4_0: the same bytes, on odd sizes
// (one row, row counts that are not multiples of the thread block, k not a power of two), so that a
// dummy model is the same on both devices. Skips without a CUDA device.
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "kernels/cuda/random_weights.cuh"
#include "kernels/quant_types.hpp"
#include "kernels/random_weights.hpp"
#include "kernels/random_weights_hash.hpp"
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

// The benchmark operands: each element a function of (seed, index) on the stream of
// random_weights_hash.hpp, checked against that function on the host: bytes masked, halves within
// [-scale, scale) and as the host rounds the same uniform.
TEST(CudaRandomWeights, BenchmarkOperandsFollowTheCounterStream) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  namespace rw = k::random_weights;
  const int64_t n = 70001;  // not a multiple of the block
  const uint64_t seed = 13;
  const uint64_t key = rw::key_of(seed);
  ct::DeviceBuffer<uint8_t> bytes(static_cast<size_t>(n));
  ct::DeviceBuffer<k::f16_bits> halves(static_cast<size_t>(n));
  ASSERT_TRUE(bytes.ptr && halves.ptr);
  ASSERT_EQ(k::cuda::fill_random_bytes(bytes.ptr, n, 0x0F, seed, nullptr), k::Status::ok);
  ASSERT_EQ(k::cuda::fill_random_halves(reinterpret_cast<__half*>(halves.ptr), n, 0.5f, seed, nullptr),
            k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<uint8_t> b = bytes.to_host();
  const std::vector<k::f16_bits> h = halves.to_host();
  int distinct_levels = 0;
  std::vector<bool> seen(16, false);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t word = rw::word(key, static_cast<uint64_t>(i));
    ASSERT_EQ(b[static_cast<size_t>(i)], static_cast<uint8_t>(word & 0x0F)) << i;
    const float u = static_cast<float>(word >> 40) * (1.0f / 16777216.0f);
    ASSERT_EQ(h[static_cast<size_t>(i)], k::fp32_to_fp16((2.0f * u - 1.0f) * 0.5f)) << i;
    if (!seen[b[static_cast<size_t>(i)]]) seen[b[static_cast<size_t>(i)]] = true, ++distinct_levels;
  }
  EXPECT_EQ(distinct_levels, 16);
  EXPECT_EQ(k::cuda::fill_random_bytes(nullptr, 4, 0xFF, 1, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::fill_random_halves(nullptr, -1, 1.0f, 1, nullptr), k::Status::invalid_argument);
}

TEST(CudaRandomWeights, RejectsBadShapes) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  ct::DeviceBuffer<uint8_t> dev(64);
  EXPECT_EQ(k::cuda::fill_random_q4_0(dev.ptr, 1, 48, 1, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::fill_random_q4_0(dev.ptr + 1, 1, 32, 1, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::fill_random_q4_0(nullptr, 1, 32, 1, nullptr), k::Status::invalid_argument);
}

}  // namespace
