// device_delay: the stream is busy for at least the time asked, and the host is not held meanwhile
// (what profile_greedy needs from it: the pass's kernels queue up behind it).
#include <gtest/gtest.h>

#include "kernels/cuda/device_delay.cuh"
#include "tests/cuda/cuda_test_util.hpp"

namespace nibble::kernels::cuda {
namespace {

TEST(CudaDeviceDelay, RefusesNegativeAndOverLongDelays) {
  EXPECT_EQ(device_delay(-1, nullptr), Status::invalid_argument);
  EXPECT_EQ(device_delay(10'000'000'001, nullptr), Status::invalid_argument);
}

TEST(CudaDeviceDelay, KeepsTheStreamBusyWithoutHoldingTheHost) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  cudaEvent_t start = nullptr, stop = nullptr;
  ASSERT_EQ(cudaEventCreate(&start), cudaSuccess);
  ASSERT_EQ(cudaEventCreate(&stop), cudaSuccess);
  for (const int64_t ns : {int64_t{0}, int64_t{3'000'000}, int64_t{40'000'000}}) {
    SCOPED_TRACE(std::to_string(ns) + " ns");
    ASSERT_EQ(cudaEventRecord(start, stream), cudaSuccess);
    ASSERT_EQ(device_delay(ns, stream), Status::ok);
    ASSERT_EQ(cudaEventRecord(stop, stream), cudaSuccess);
    // The launch has returned; a 40 ms delay cannot be over yet.
    if (ns >= 40'000'000) {
      EXPECT_EQ(cudaEventQuery(stop), cudaErrorNotReady);
    }
    ASSERT_EQ(cudaEventSynchronize(stop), cudaSuccess);
    float ms = 0.0f;
    ASSERT_EQ(cudaEventElapsedTime(&ms, start, stop), cudaSuccess);
    EXPECT_GE(ms, 0.99 * static_cast<double>(ns) / 1e6);
    EXPECT_LT(ms, static_cast<double>(ns) / 1e6 + 20.0);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace nibble::kernels::cuda
