// The CUDA W4A16 tensor-core prefill GEMM (Q4_0, Q4_K, group-wise INT4) against a plain CPU reference (double
// accumulation of the exactly dequantized weights and the fp16 activations). Skips when there is no CUDA
// device.
//
// Error bound, relative to Σ|x · w| (|y| itself can cancel towards 0): the kernel rounds each
// dequantized weight to fp16 (at most 2^-11 ≈ 4.9e-4 relative), the fp16 × fp16 products are exact
// and the tensor cores accumulate in fp32 (at most about k · 2^-23 ≈ 4.9e-4 for k = 4128 even if
// every addition truncated). Worst case ≈ 1e-3; the test allows 2e-3 (typical errors are ~100×
// smaller, since the roundings have random signs).
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/w4a16_gemm.cuh"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"
#include "tests/cuda/cuda_test_util.hpp"
#include "tests/cuda/w4a16_test_util.hpp"

namespace k = nibble::kernels;
using nibble::cuda_test::DeviceBuffer;
using nibble::cuda_test::DeviceInt4Groups;
using nibble::cuda_test::expect_matches_reference;
using nibble::cuda_test::make_device_int4_groups;
using nibble::cuda_test::random_quantized;

TEST(CudaW4A16Gemm, MatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(4321);
  struct Case {
    int64_t n_out, k;
  };
  for (const Case c : {Case{37, 4128}, Case{1001, 4128}, Case{4099, 96}, Case{64, 32}}) {
    std::vector<uint8_t> wq;
    std::vector<float> wf;
    ASSERT_NO_FATAL_FAILURE(random_quantized(k::DType::Q4_0, c.n_out, c.k, rng, wq, wf));
    DeviceBuffer<uint8_t> dw(wq);
    ASSERT_NE(dw.ptr, nullptr);
    for (const int64_t m : {int64_t{1}, int64_t{33}, int64_t{64}, int64_t{257}}) {
      expect_matches_reference(wf, c.n_out, c.k, m, 2e-3, rng, [&](const __half* x, int64_t mm, float* y) {
        return k::cuda::w4a16_gemm_q4_0(dw.ptr, c.n_out, c.k, x, mm, y, nullptr);
      });
    }
  }
}

// A GGUF GEMM read as stored (`gemm`: w4a16_gemm_q4_k's signature) against the CPU reference on
// `type` weights of the given shapes at 1, 65 and 257 rows (the weights rounded once to fp16).
struct GemmShape {
  int64_t n_out, k;
};
using GgufGemm = k::Status (*)(const uint8_t*, int64_t, int64_t, const __half*, int64_t, float*, cudaStream_t,
                               bool);
void expect_gguf_gemm_matches(k::DType type, GgufGemm gemm, std::initializer_list<GemmShape> shapes,
                              uint32_t seed) {
  std::mt19937 rng(seed);
  for (const GemmShape c : shapes) {
    std::vector<uint8_t> wq;
    std::vector<float> wf;
    ASSERT_NO_FATAL_FAILURE(random_quantized(type, c.n_out, c.k, rng, wq, wf));
    DeviceBuffer<uint8_t> dw(nibble::cuda_test::as_uploaded(type, c.n_out, c.k, wq));
    ASSERT_NE(dw.ptr, nullptr);
    for (const int64_t m : {int64_t{1}, int64_t{65}, int64_t{257}}) {
      expect_matches_reference(wf, c.n_out, c.k, m, 2e-3, rng, [&](const __half* x, int64_t mm, float* y) {
        return gemm(dw.ptr, c.n_out, c.k, x, mm, y, nullptr, false);
      });
    }
  }
}

// GGUF Q4_K as stored (the weights of a Q4_K_M model's attention and FFN matrices).
TEST(CudaW4A16Gemm, Q4KMatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  ASSERT_NO_FATAL_FAILURE(
      expect_gguf_gemm_matches(k::DType::Q4_K, k::cuda::w4a16_gemm_q4_k,
                               {GemmShape{37, 4352}, GemmShape{1001, 512}, GemmShape{130, 256}}, 17));
}

// GGUF Q8_0 as stored (8-bit matrices and heads), rows 2-byte aligned.
TEST(CudaW4A16Gemm, Q8_0MatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  ASSERT_NO_FATAL_FAILURE(
      expect_gguf_gemm_matches(k::DType::Q8_0, k::cuda::w4a16_gemm_q8_0,
                               {GemmShape{37, 4128}, GemmShape{1001, 96}, GemmShape{130, 32}}, 21));
}

// GGUF Q6_K in planes (a Q4_K_M model's 6-bit matrices, as the model uploads them).
TEST(CudaW4A16Gemm, Q6KMatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  ASSERT_NO_FATAL_FAILURE(
      expect_gguf_gemm_matches(k::DType::Q6_K, k::cuda::w4a16_gemm_q6_k,
                               {GemmShape{37, 4352}, GemmShape{1001, 768}, GemmShape{130, 256}}, 19));
}

// Group-wise INT4 with asymmetric zeros (GPTQ / AWQ as loaded), groups of 32, 64 and 128, on large
// shapes and on ones smaller than a tile (5 outputs of one 32-input unit; 130 outputs, group 64).
TEST(CudaW4A16Gemm, Int4GroupsMatchCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(23);
  struct Case {
    int64_t group, n_out, kk;
  };
  for (const Case c : {Case{32, 1001, 4224}, Case{128, 1001, 4224}, Case{64, 130, 192}, Case{32, 5, 32}}) {
    const int64_t group = c.group, n_out = c.n_out, kk = c.kk;
    SCOPED_TRACE("group " + std::to_string(group) + " n_out " + std::to_string(n_out) + " k " +
                 std::to_string(kk));
    DeviceInt4Groups weights;
    ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, weights));
    const std::vector<float>& wf = weights.wf;
    const uint8_t* const dq = weights.quants->ptr;
    const uint8_t* const dz = weights.zeros->ptr;
    const __half* const sp = weights.scales_half();
    for (const int64_t m : {int64_t{1}, int64_t{100}}) {
      expect_matches_reference(wf, n_out, kk, m, 2e-3, rng, [&](const __half* x, int64_t mm, float* y) {
        return k::cuda::w4a16_gemm_int4_groups(dq, sp, dz, group, n_out, kk, x, mm, y, nullptr);
      });
    }
    // The mma.sync variant, on row counts around its 64-row tile (same bound: the same fp16 weights).
    for (const int64_t m : {int64_t{1}, int64_t{63}, int64_t{64}, int64_t{65}, int64_t{257}}) {
      SCOPED_TRACE("mma.sync kernel");
      expect_matches_reference(wf, n_out, kk, m, 2e-3, rng, [&](const __half* x, int64_t mm, float* y) {
        return k::cuda::w4a16_gemm_int4_groups_mma(dq, sp, dz, group, n_out, kk, x, mm, y, nullptr);
      });
    }
  }
}

TEST(CudaW4A16Gemm, RejectsBadArguments) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  const int64_t n_out = 4, kk = 64;
  DeviceBuffer<uint8_t> dw(static_cast<size_t>(n_out * k::row_bytes(k::DType::Q4_0, kk)));
  DeviceBuffer<uint16_t> dx(static_cast<size_t>(8 * kk));
  DeviceBuffer<float> dy(static_cast<size_t>(8 * n_out));
  ASSERT_TRUE(dw.ptr && dx.ptr && dy.ptr);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  EXPECT_EQ(k::cuda::w4a16_gemm_q4_0(dw.ptr, n_out, 48, x, 1, dy.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::w4a16_gemm_q4_0(dw.ptr, n_out, kk, x, 0, dy.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::w4a16_gemm_q4_0(dw.ptr, -1, kk, x, 1, dy.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::w4a16_gemm_q4_0(nullptr, n_out, kk, x, 1, dy.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::w4a16_gemm_q4_0(dw.ptr + 1, n_out, kk, x, 1, dy.ptr, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::w4a16_gemm_q4_0(dw.ptr, n_out, kk, reinterpret_cast<const __half*>(dx.ptr + 1), 1,
                                     dy.ptr, nullptr),
            k::Status::invalid_argument);  // x not 16-byte aligned
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(k::cuda::w4a16_gemm_q4_0(dw.ptr, 0, kk, x, 1, dy.ptr, nullptr), k::Status::ok);
  EXPECT_EQ(k::cuda::w4a16_gemm_q4_0(dw.ptr, n_out, kk, x, 8, dy.ptr, nullptr), k::Status::ok);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}
