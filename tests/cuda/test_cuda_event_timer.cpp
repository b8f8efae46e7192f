// median_call_us: it times the device, not the host. Calls whose host side takes longer than their
// kernel (as CUTLASS's, which builds TMA descriptors per call) are timed at the kernel's pace, since
// each loop is queued behind a head start; and a call that cannot be made ends the timing.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "kernels/cuda/device_delay.cuh"
#include "kernels/cuda/event_timer.cuh"
#include "tests/cuda/cuda_test_util.hpp"

namespace nibble::kernels::cuda {
namespace {

TEST(CudaEventTimer, TimesTheDevicesWorkNotTheHostsPace) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  constexpr int64_t kKernelNs = 20'000;
  // 60 us of host work a call (under the head start's 100 us a call) before a 20 us kernel: timed at
  // the host's pace this would be 60 us or more a call.
  const auto call = [&](int) {
    std::this_thread::sleep_for(std::chrono::microseconds(60));
    return device_delay(kKernelNs, stream) == Status::ok;
  };
  double us = 0.0;
  cudaError_t err = cudaErrorUnknown;
  ASSERT_TRUE(median_call_us(stream, 16, 3, call, us, err));
  EXPECT_EQ(err, cudaSuccess);
  EXPECT_GE(us, 0.99 * kKernelNs / 1e3);
  EXPECT_LT(us, 40.0) << "the host's 60 us a call leaked into the device time";

  int calls = 0;
  EXPECT_FALSE(median_call_us(
      stream, 4, 3, [&](int) { return ++calls < 5; }, us, err));  // the fifth call fails
  EXPECT_EQ(calls, 5);
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace nibble::kernels::cuda
