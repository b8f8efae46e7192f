// The load-time choice between the CUDA-core and tensor-core INT4 kernels (kernels/cuda/w4a16_tuning):
// the rule on given times (host only, runs everywhere) and the timing itself on a device.
#include <gtest/gtest.h>

#include <iostream>
#include <random>
#include <vector>

#include "kernels/cuda/w4a16_tuning.cuh"
#include "tests/cuda/w4a16_test_util.hpp"

namespace {

namespace kc = nibble::kernels::cuda;
namespace ct = nibble::cuda_test;
using nibble::kernels::Status;

kc::Int4GroupsTuning times(double cc1, double tc1, double cc16, double tc16, double wmma, double mma) {
  kc::Int4GroupsTuning t;
  t.gemv_cuda_cores_us[0] = cc1;
  t.gemv_tensor_cores_us[0] = tc1;
  t.gemv_cuda_cores_us[1] = cc16;
  t.gemv_tensor_cores_us[1] = tc16;
  t.gemm_wmma_us = wmma;
  t.gemm_mma_us = mma;
  kc::choose_int4_groups_kernels(t);
  return t;
}

TEST(W4A16Tuning, TheTensorCoreGemvWinsOnTheGeometricMeanOfItsRatios) {
  EXPECT_TRUE(times(10, 9, 40, 30, 100, 100).decode_tensor_cores);    // faster at both row counts
  EXPECT_TRUE(times(10, 11, 40, 20, 100, 100).decode_tensor_cores);   // 1.1 x 0.5 < 1
  EXPECT_FALSE(times(10, 8, 40, 60, 100, 100).decode_tensor_cores);   // 0.8 x 1.5 > 1
  EXPECT_FALSE(times(10, 10, 40, 40, 100, 100).decode_tensor_cores);  // a tie keeps the CUDA cores
  EXPECT_FALSE(times(10, 0, 40, 20, 100, 100).decode_tensor_cores);   // not timed (failed): never wins
  EXPECT_FALSE(times(0, 5, 0, 20, 100, 100).decode_tensor_cores);
}

TEST(W4A16Tuning, TheMmaGemmWinsWhenFaster) {
  EXPECT_TRUE(times(1, 1, 1, 1, 100, 99).prefill_mma);
  EXPECT_FALSE(times(1, 1, 1, 1, 100, 100).prefill_mma);
  EXPECT_FALSE(times(1, 1, 1, 1, 100, 101).prefill_mma);
  EXPECT_FALSE(times(1, 1, 1, 1, 100, 0).prefill_mma);
  EXPECT_TRUE(times(1, 1, 1, 1, 0, 50).prefill_mma);  // the WMMA GEMM failed
}

TEST(W4A16Tuning, RejectsBadArgumentsBeforeTouchingTheDevice) {
  kc::Int4GroupsTuning t;
  std::string error;
  EXPECT_EQ(kc::tune_int4_groups({}, 128, 256, 256, nullptr, t, error), Status::invalid_argument);
  const std::vector<kc::Int4GroupsMatrix> one(1);
  EXPECT_EQ(kc::tune_int4_groups(one, 96, 256, 288, nullptr, t, error), Status::invalid_argument);  // group
  EXPECT_EQ(kc::tune_int4_groups(one, 128, 256, 320, nullptr, t, error),
            Status::invalid_argument);  // k % 128
  EXPECT_EQ(kc::tune_int4_groups(one, 128, 0, 256, nullptr, t, error), Status::invalid_argument);
}

// Every candidate runs on real weights (three matrices of one odd shape, rotated), gets a time, and the
// choice is the rule's on those times.
TEST(W4A16Tuning, TimesEveryCandidateOnTheDeviceAndChoosesByTheRule) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(7);
  for (const int64_t group : {64, 128}) {
    SCOPED_TRACE("group " + std::to_string(group));
    const int64_t n_out = 1000, k = 1536;
    std::vector<ct::DeviceInt4Groups> weights(3);
    std::vector<kc::Int4GroupsMatrix> matrices;
    for (auto& w : weights) {
      ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(n_out, k, group, rng, w));
      matrices.push_back({w.quants->ptr, w.scales_half(), w.zeros->ptr});
    }
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    kc::Int4GroupsTuning t;
    std::string error;
    ASSERT_EQ(kc::tune_int4_groups(matrices, group, n_out, k, stream, t, error), Status::ok) << error;
    cudaStreamDestroy(stream);
    EXPECT_EQ(t.skipped, "");
    for (int r = 0; r < 2; ++r) {
      EXPECT_GT(t.gemv_cuda_cores_us[r], 0.0);
      EXPECT_GT(t.gemv_tensor_cores_us[r], 0.0);
    }
    EXPECT_GT(t.gemm_wmma_us, 0.0);
    EXPECT_GT(t.gemm_mma_us, 0.0);
    // 256 rows cost more than 1 on the same kernel family (a timer that returned noise would not).
    EXPECT_GT(t.gemm_wmma_us, 0.5 * t.gemv_cuda_cores_us[0]);
    kc::Int4GroupsTuning again = t;
    kc::choose_int4_groups_kernels(again);
    EXPECT_EQ(again.decode_tensor_cores, t.decode_tensor_cores);
    EXPECT_EQ(again.prefill_mma, t.prefill_mma);
    std::cout << "  us: GEMV CUDA cores " << t.gemv_cuda_cores_us[0] << " / " << t.gemv_cuda_cores_us[1]
              << ", tensor cores " << t.gemv_tensor_cores_us[0] << " / " << t.gemv_tensor_cores_us[1]
              << "; GEMM WMMA " << t.gemm_wmma_us << ", mma " << t.gemm_mma_us << "\n";
  }
}

}  // namespace
