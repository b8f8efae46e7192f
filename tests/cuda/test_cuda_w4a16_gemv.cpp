// The CUDA Q4_0 × fp16 decode GEMV against a plain CPU reference (double accumulation of the
// dequantized weights and the fp16 activations). Skips when there is no CUDA device.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/q4_0_split.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"
#include "tests/cuda/cuda_test_util.hpp"

namespace k = nibble::kernels;

using nibble::cuda_test::DeviceBuffer;

TEST(CudaW4A16Gemv, MatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n_outs[] = {1, 37, 4099};
  const int64_t ks[] = {32, 96, 4128};
  const int64_t ms[] = {1, 3, 16, 32};
  for (const int64_t n_out : n_outs) {
    for (const int64_t kk : ks) {
      // Random weights, quantized to Q4_0 by the project's quantizer, then dequantized back: the
      // reference uses exactly the values the kernel sees.
      const int64_t row_bytes = k::row_bytes(k::DType::Q4_0, kk);
      std::vector<uint8_t> wq(static_cast<size_t>(n_out * row_bytes));
      std::vector<float> wf(static_cast<size_t>(n_out * kk));
      std::vector<float> row(static_cast<size_t>(kk));
      for (int64_t o = 0; o < n_out; ++o) {
        for (auto& v : row) v = normal(rng) * 0.05f;
        ASSERT_EQ(k::quantize_row(k::DType::Q4_0, row.data(), wq.data() + o * row_bytes, kk), k::Status::ok);
        ASSERT_EQ(k::dequantize_row(k::DType::Q4_0, wq.data() + o * row_bytes, wf.data() + o * kk, kk),
                  k::Status::ok);
      }
      DeviceBuffer<uint8_t> dw(wq.size());
      ASSERT_NE(dw.ptr, nullptr);
      ASSERT_EQ(cudaMemcpy(dw.ptr, wq.data(), wq.size(), cudaMemcpyHostToDevice), cudaSuccess);

      for (const int64_t m : ms) {
        SCOPED_TRACE("n_out=" + std::to_string(n_out) + " k=" + std::to_string(kk) +
                     " m=" + std::to_string(m));
        std::vector<k::f16_bits> xh(static_cast<size_t>(m * kk));
        std::vector<float> xf(xh.size());
        for (size_t i = 0; i < xh.size(); ++i) {
          xh[i] = k::fp32_to_fp16(normal(rng));
          xf[i] = k::fp16_to_fp32(xh[i]);
        }
        DeviceBuffer<k::f16_bits> dx(xh.size());
        DeviceBuffer<float> dy(static_cast<size_t>(m * n_out));
        ASSERT_NE(dx.ptr, nullptr);
        ASSERT_NE(dy.ptr, nullptr);
        ASSERT_EQ(cudaMemcpy(dx.ptr, xh.data(), xh.size() * sizeof(k::f16_bits), cudaMemcpyHostToDevice),
                  cudaSuccess);
        ASSERT_EQ(cudaMemset(dy.ptr, 0xff, static_cast<size_t>(m * n_out) * sizeof(float)),
                  cudaSuccess);  // NaNs
        ASSERT_EQ(k::cuda::w4a16_gemv_q4_0(dw.ptr, n_out, kk, reinterpret_cast<const __half*>(dx.ptr), m,
                                           dy.ptr, nullptr),
                  k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        std::vector<float> y(static_cast<size_t>(m * n_out));
        ASSERT_EQ(cudaMemcpy(y.data(), dy.ptr, y.size() * sizeof(float), cudaMemcpyDeviceToHost),
                  cudaSuccess);

        // Error bound: every x (fp16) and every dequantized weight (q - 8) * d (a 4-bit integer times
        // an fp16 scale) is exact in fp32, so the kernel's only errors are the fp32 roundings of its
        // k products-and-sums (FMAs) and of the shuffle reduction: at most about (k + 5) * 2^-24 *
        // sum|x * w| ≈ 2.5e-4 * sum|x * w| for k = 4128. The error is therefore measured relative to
        // sum|x * w| (not |y|, which can cancel towards 0), against a 1e-3 bound.
        int bad = 0;
        for (int64_t r = 0; r < m; ++r) {
          for (int64_t o = 0; o < n_out; ++o) {
            double ref = 0.0;
            double mag = 0.0;
            for (int64_t i = 0; i < kk; ++i) {
              const double p = static_cast<double>(xf[r * kk + i]) * wf[o * kk + i];
              ref += p;
              mag += std::fabs(p);
            }
            const double got = y[r * n_out + o];
            const double rel = std::fabs(got - ref) / (mag > 0.0 ? mag : 1.0);
            if (!(rel < 1e-3) && ++bad <= 5) {
              ADD_FAILURE() << "y[" << r << ", " << o << "] = " << got << ", reference " << ref
                            << ", relative error " << rel;
            }
          }
        }
        ASSERT_EQ(bad, 0);
      }
    }
  }
}

TEST(CudaW4A16Gemv, RejectsBadArguments) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  const int64_t n_out = 4;
  const int64_t kk = 64;
  DeviceBuffer<uint8_t> dw(static_cast<size_t>(n_out * k::row_bytes(k::DType::Q4_0, kk)));
  DeviceBuffer<k::f16_bits> dx(static_cast<size_t>(33 * kk));
  DeviceBuffer<float> dy(static_cast<size_t>(33 * n_out));
  ASSERT_NE(dw.ptr, nullptr);
  ASSERT_NE(dx.ptr, nullptr);
  ASSERT_NE(dy.ptr, nullptr);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  const auto call = [&](const uint8_t* w, int64_t n, int64_t kdim, const __half* xp, int64_t m, float* y) {
    return k::cuda::w4a16_gemv_q4_0(w, n, kdim, xp, m, y, nullptr);
  };
  EXPECT_EQ(call(dw.ptr, n_out, 48, x, 1, dy.ptr), k::Status::invalid_argument);  // k % 32 != 0
  EXPECT_EQ(call(dw.ptr, n_out, -32, x, 1, dy.ptr), k::Status::invalid_argument);
  EXPECT_EQ(call(dw.ptr, -1, kk, x, 1, dy.ptr), k::Status::invalid_argument);
  EXPECT_EQ(call(dw.ptr, n_out, kk, x, 0, dy.ptr), k::Status::invalid_argument);
  EXPECT_EQ(call(dw.ptr, n_out, kk, x, 33, dy.ptr), k::Status::invalid_argument);
  EXPECT_EQ(call(nullptr, n_out, kk, x, 1, dy.ptr), k::Status::invalid_argument);
  EXPECT_EQ(call(dw.ptr, n_out, kk, nullptr, 1, dy.ptr), k::Status::invalid_argument);
  EXPECT_EQ(call(dw.ptr, n_out, kk, x, 1, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(call(dw.ptr, n_out, kk, reinterpret_cast<const __half*>(dx.ptr + 1), 1, dy.ptr),
            k::Status::invalid_argument);  // x not 16-byte aligned
  // Nothing was launched: no error is pending, and valid calls still work.
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(call(dw.ptr, n_out, kk, x, 32, dy.ptr), k::Status::ok);
  EXPECT_EQ(call(dw.ptr, 0, kk, x, 1, dy.ptr), k::Status::ok);  // empty output: nothing to do
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

// The split layout (one 16-byte nibble load per block) runs the same arithmetic as the GGUF layout:
// its outputs must equal the GGUF kernel's bit for bit (which the test above checks against the CPU),
// on odd sizes. A wrong nibble order or scale index would differ at once.
TEST(CudaW4A16Gemv, SplitLayoutEqualsGgufLayoutBitForBit) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(77);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const int64_t n_out : {int64_t{1}, int64_t{37}, int64_t{4099}}) {
    for (const int64_t kk : {int64_t{32}, int64_t{96}, int64_t{4128}}) {
      const int64_t row_bytes = k::row_bytes(k::DType::Q4_0, kk);
      std::vector<uint8_t> wq(static_cast<size_t>(n_out * row_bytes));
      std::vector<float> row(static_cast<size_t>(kk));
      for (int64_t o = 0; o < n_out; ++o) {
        for (auto& v : row) v = normal(rng) * 0.05f;
        ASSERT_EQ(k::quantize_row(k::DType::Q4_0, row.data(), wq.data() + o * row_bytes, kk), k::Status::ok);
      }
      std::vector<uint8_t> quants(static_cast<size_t>(n_out * kk / 2));
      std::vector<uint16_t> scales(static_cast<size_t>(n_out * kk / 32));
      ASSERT_EQ(k::split_q4_0(wq.data(), n_out, kk, quants.data(), scales.data()), k::Status::ok);
      DeviceBuffer<uint8_t> dw(wq.size()), dq(quants.size());
      DeviceBuffer<uint16_t> ds(scales.size());
      ASSERT_NE(dw.ptr, nullptr);
      ASSERT_NE(dq.ptr, nullptr);
      ASSERT_NE(ds.ptr, nullptr);
      ASSERT_EQ(cudaMemcpy(dw.ptr, wq.data(), wq.size(), cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(dq.ptr, quants.data(), quants.size(), cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(ds.ptr, scales.data(), scales.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
      for (const int64_t m : {int64_t{1}, int64_t{5}, int64_t{32}}) {
        SCOPED_TRACE("n_out=" + std::to_string(n_out) + " k=" + std::to_string(kk) +
                     " m=" + std::to_string(m));
        std::vector<k::f16_bits> xh(static_cast<size_t>(m * kk));
        for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
        DeviceBuffer<k::f16_bits> dx(xh.size());
        DeviceBuffer<float> dy(static_cast<size_t>(m * n_out)), dy_split(static_cast<size_t>(m * n_out));
        ASSERT_NE(dx.ptr, nullptr);
        ASSERT_EQ(cudaMemcpy(dx.ptr, xh.data(), xh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
        const auto* x = reinterpret_cast<const __half*>(dx.ptr);
        ASSERT_EQ(k::cuda::w4a16_gemv_q4_0(dw.ptr, n_out, kk, x, m, dy.ptr, nullptr), k::Status::ok);
        ASSERT_EQ(cudaMemset(dy_split.ptr, 0xff, static_cast<size_t>(m * n_out) * sizeof(float)),
                  cudaSuccess);
        ASSERT_EQ(k::cuda::w4a16_gemv_q4_0_split(dq.ptr, reinterpret_cast<const __half*>(ds.ptr), n_out, kk,
                                                 x, m, dy_split.ptr, nullptr),
                  k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        std::vector<float> y(static_cast<size_t>(m * n_out)), y_split(y.size());
        ASSERT_EQ(cudaMemcpy(y.data(), dy.ptr, y.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
        ASSERT_EQ(cudaMemcpy(y_split.data(), dy_split.ptr, y.size() * 4, cudaMemcpyDeviceToHost),
                  cudaSuccess);
        for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(y_split[i], y[i]) << "output " << i;
      }
      // Misaligned quants (not 16-byte) and null scales are refused before any launch.
      DeviceBuffer<k::f16_bits> dx(static_cast<size_t>(kk));
      DeviceBuffer<float> dy(static_cast<size_t>(n_out));
      const auto* x = reinterpret_cast<const __half*>(dx.ptr);
      EXPECT_EQ(k::cuda::w4a16_gemv_q4_0_split(dq.ptr + 2, reinterpret_cast<const __half*>(ds.ptr), n_out, kk,
                                               x, 1, dy.ptr, nullptr),
                k::Status::invalid_argument);
      EXPECT_EQ(k::cuda::w4a16_gemv_q4_0_split(dq.ptr, nullptr, n_out, kk, x, 1, dy.ptr, nullptr),
                k::Status::invalid_argument);
    }
  }
}
