// The CUDA Q4_0 × fp16 tensor-core prefill GEMM against a plain CPU reference (double accumulation of
// the exactly dequantized weights and the fp16 activations). Skips when there is no CUDA device.
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

namespace k = nibble::kernels;
using nibble::cuda_test::DeviceBuffer;

TEST(CudaW4A16Gemm, MatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(4321);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  struct Case {
    int64_t n_out, k;
  };
  const Case cases[] = {{37, 4128}, {1001, 4128}, {4099, 96}, {64, 32}};
  const int64_t ms[] = {1, 33, 64, 257};
  for (const Case c : cases) {
    const int64_t row_bytes = k::row_bytes(k::DType::Q4_0, c.k);
    std::vector<uint8_t> wq(static_cast<size_t>(c.n_out * row_bytes));
    std::vector<float> wf(static_cast<size_t>(c.n_out * c.k));
    std::vector<float> row(static_cast<size_t>(c.k));
    for (int64_t o = 0; o < c.n_out; ++o) {
      for (auto& v : row) v = normal(rng) * 0.05f;
      ASSERT_EQ(k::quantize_row(k::DType::Q4_0, row.data(), wq.data() + o * row_bytes, c.k), k::Status::ok);
      ASSERT_EQ(k::dequantize_row(k::DType::Q4_0, wq.data() + o * row_bytes, wf.data() + o * c.k, c.k),
                k::Status::ok);
    }
    DeviceBuffer<uint8_t> dw(wq);
    ASSERT_NE(dw.ptr, nullptr);
    for (const int64_t m : ms) {
      SCOPED_TRACE("n_out=" + std::to_string(c.n_out) + " k=" + std::to_string(c.k) +
                   " m=" + std::to_string(m));
      std::vector<uint16_t> xh(static_cast<size_t>(m * c.k));
      std::vector<float> xf(xh.size());
      for (size_t i = 0; i < xh.size(); ++i) {
        xh[i] = k::fp32_to_fp16(normal(rng));
        xf[i] = k::fp16_to_fp32(xh[i]);
      }
      DeviceBuffer<uint16_t> dx(xh);
      DeviceBuffer<float> dy(std::vector<float>(static_cast<size_t>(m * c.n_out), NAN));
      ASSERT_TRUE(dx.ptr && dy.ptr);
      ASSERT_EQ(k::cuda::w4a16_gemm_q4_0(dw.ptr, c.n_out, c.k, reinterpret_cast<const __half*>(dx.ptr), m,
                                         dy.ptr, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> y = dy.to_host();
      ASSERT_EQ(y.size(), static_cast<size_t>(m * c.n_out));
      int bad = 0;
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t o = 0; o < c.n_out; ++o) {
          double ref = 0.0;
          double mag = 0.0;
          for (int64_t i = 0; i < c.k; ++i) {
            const double p = static_cast<double>(xf[r * c.k + i]) * wf[o * c.k + i];
            ref += p;
            mag += std::fabs(p);
          }
          const double got = y[r * c.n_out + o];
          const double rel = std::fabs(got - ref) / (mag > 0.0 ? mag : 1.0);
          if (!(rel < 2e-3) && ++bad <= 5) {
            ADD_FAILURE() << "y[" << r << ", " << o << "] = " << got << ", reference " << ref
                          << ", relative error " << rel;
          }
        }
      }
      ASSERT_EQ(bad, 0);
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
