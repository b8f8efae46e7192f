// The W4A8 GEMV (kernels/cuda/w4a8_gemv): group-wise INT4 weights times activations rounded to 8 bits
// on the device. Against its CPU reference (kernels::w4a8_gemv_int4_groups_reference, which rounds the
// activations by the same float steps, so only the fp32 summation order differs) on odd shapes and
// every row count (long rows and programmatic launches too); within the 8-bit rounding of the
// fp16-activation product; a row's bits the same alone or in a batch; bad arguments refused before
// anything runs.
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/activation_q8.hpp"
#include "kernels/cuda/w4a8_gemv.cuh"
#include "kernels/quantize.hpp"
#include "tests/cuda/cuda_test_util.hpp"
#include "tests/cuda/w4a16_test_util.hpp"

namespace {

namespace k = nibble::kernels;
namespace kc = nibble::kernels::cuda;
namespace ct = nibble::cuda_test;

// Per output of m activation rows (row-major [m, n_out]): the sizes of its terms with the activations
// as quantized (magnitude), half an activation step per weight (rounding: each activation lies within
// it), and the fp16-activation product (exact). wf: [n_out, kk] weights; xh: [m, kk] activations.
struct ErrorBudget {
  std::vector<double> magnitude, rounding, exact;
};
ErrorBudget error_budget(const std::vector<float>& wf, const std::vector<k::f16_bits>& xh, int64_t n_out,
                         int64_t kk, int64_t m) {
  ErrorBudget b;
  const auto size = static_cast<size_t>(m * n_out);
  b.magnitude.assign(size, 0.0);
  b.rounding.assign(size, 0.0);
  b.exact.assign(size, 0.0);
  std::vector<int8_t> q(static_cast<size_t>(kk));
  std::vector<float> d(static_cast<size_t>(kk / 32));
  for (int64_t r = 0; r < m; ++r) {
    k::quantize_activations_q8(xh.data() + r * kk, kk, q.data(), d.data());
    for (int64_t o = 0; o < n_out; ++o) {
      const auto at = static_cast<size_t>(r * n_out + o);
      for (int64_t j = 0; j < kk; ++j) {
        const double wj = wf[static_cast<size_t>(o * kk + j)];
        b.magnitude[at] += std::fabs(wj * d[j / 32] * q[j]);
        b.rounding[at] += std::fabs(wj) * d[j / 32] / 2;
        b.exact[at] += wj * k::fp16_to_fp32(xh[static_cast<size_t>(r * kk + j)]);
      }
    }
  }
  return b;
}

// The first `count` outputs: within `rel` of their terms' size of the CPU reference, and within the
// activations' rounding (and as much) of the fp16 product; at most three failures reported.
void expect_within_budget(const std::vector<float>& got, const std::vector<float>& want, const ErrorBudget& b,
                          int64_t count, double rel) {
  int bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    const auto at = static_cast<size_t>(i);
    const double ref_err = std::fabs(static_cast<double>(got[at]) - want[at]);
    const double fp16_err = std::fabs(static_cast<double>(got[at]) - b.exact[at]);
    if ((!(ref_err <= rel * b.magnitude[at] + 1e-6) ||
         !(fp16_err <= 1.001 * b.rounding[at] + rel * b.magnitude[at] + 1e-6)) &&
        ++bad <= 3) {
      ADD_FAILURE() << "output " << i << ": " << got[at] << ", reference " << want[at] << ", fp16 product "
                    << b.exact[at];
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST(CudaW4A8Gemv, MatchesTheCpuReferenceAndTheFp16ProductWithinTheRounding) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}}) {
    for (const int64_t n_out : {int64_t{1}, int64_t{37}, int64_t{4099}}) {
      for (const int64_t kk : {int64_t{128}, int64_t{384}, int64_t{4224}}) {
        ct::DeviceInt4Groups w;
        ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(n_out, kk, group, rng, w));
        const std::vector<uint8_t> quants = w.quants->to_host(), zeros = w.zeros->to_host();
        const std::vector<uint16_t> scales = w.scales->to_host();
        const int64_t max_m = kc::kW4A8GemvMaxM;
        std::vector<k::f16_bits> xh(static_cast<size_t>(max_m * kk));
        for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
        ct::DeviceBuffer<k::f16_bits> dx(xh);
        ct::DeviceBuffer<float> dy(static_cast<size_t>(max_m * n_out));
        ASSERT_TRUE(dx.ptr && dy.ptr);
        std::vector<float> want(static_cast<size_t>(max_m * n_out));
        ASSERT_EQ(k::w4a8_gemv_int4_groups_reference(quants.data(), scales.data(), zeros.data(), group, n_out,
                                                     kk, xh.data(), max_m, want.data()),
                  k::Status::ok);
        const ErrorBudget budget = error_budget(w.wf, xh, n_out, kk, max_m);
        for (int64_t m = 1; m <= max_m; ++m) {
          SCOPED_TRACE("group " + std::to_string(group) + " n_out " + std::to_string(n_out) + " k " +
                       std::to_string(kk) + " m " + std::to_string(m));
          ASSERT_EQ(cudaMemset(dy.ptr, 0xff, dy.count * sizeof(float)), cudaSuccess);
          ASSERT_EQ(kc::w4a8_gemv_int4_groups(w.quants->ptr, w.scales_half(), w.zeros->ptr, group, n_out, kk,
                                              reinterpret_cast<const __half*>(dx.ptr), m, dy.ptr, nullptr),
                    k::Status::ok);
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          expect_within_budget(dy.to_host(), want, budget, m * n_out, 1e-5);
        }
      }
    }
  }
}

// GGUF Q4_K as stored times 8-bit activations: against kernels::w4a8_gemv_q4_k_reference (the CPU's
// dequantized weights times the same quantized activations) on odd row counts and a ragged grid, and
// within the activations' rounding of the fp16 product.
TEST(CudaW4A8Gemv, Q4KMatchesTheCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(23);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Every pairing of 1, 37, 4099 outputs with 256, 768, 4352 inputs, and 4099 x 8448: more rows than
  // the grid has warps, with two super-blocks for some lanes, so such a lane fetches its next row's
  // first super-block ahead after its second (the other shapes never reach that fetch).
  std::vector<std::pair<int64_t, int64_t>> shapes;
  for (const int64_t n_out : {int64_t{1}, int64_t{37}, int64_t{4099}})
    for (const int64_t kk : {int64_t{256}, int64_t{768}, int64_t{4352}}) shapes.emplace_back(n_out, kk);
  shapes.emplace_back(4099, 8448);
  for (const auto& [n_out, kk] : shapes) {
    std::vector<uint8_t> wq;
    std::vector<float> wf;
    ASSERT_NO_FATAL_FAILURE(ct::random_quantized(k::DType::Q4_K, n_out, kk, rng, wq, wf));
    ct::DeviceBuffer<uint8_t> dw(wq);
    const int64_t max_m = kc::kW4A8GemvMaxM;
    std::vector<k::f16_bits> xh(static_cast<size_t>(max_m * kk));
    for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
    ct::DeviceBuffer<k::f16_bits> dx(xh);
    ct::DeviceBuffer<float> dy(static_cast<size_t>(max_m * n_out));
    ASSERT_TRUE(dw.ptr && dx.ptr && dy.ptr);
    std::vector<float> want(static_cast<size_t>(max_m * n_out));
    ASSERT_EQ(k::w4a8_gemv_q4_k_reference(wq.data(), n_out, kk, xh.data(), max_m, want.data()),
              k::Status::ok);
    const ErrorBudget budget = error_budget(wf, xh, n_out, kk, max_m);
    for (int64_t m = 1; m <= max_m; ++m) {
      SCOPED_TRACE("n_out " + std::to_string(n_out) + " k " + std::to_string(kk) + " m " + std::to_string(m));
      ASSERT_EQ(cudaMemset(dy.ptr, 0xff, dy.count * sizeof(float)), cudaSuccess);
      ASSERT_EQ(
          kc::w4a8_gemv_q4_k(dw.ptr, n_out, kk, reinterpret_cast<const __half*>(dx.ptr), m, dy.ptr, nullptr),
          k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      // d * scale and dmin * min are exact in fp32 on both sides; the CPU rounds each weight once.
      expect_within_budget(dy.to_host(), want, budget, m * n_out, 2e-5);
    }
  }
  alignas(16) static uint8_t blocks[144] = {};
  alignas(16) static uint16_t x[256] = {};
  static float y[4];
  const auto* xh = reinterpret_cast<const __half*>(x);
  EXPECT_EQ(kc::w4a8_gemv_q4_k(blocks, 1, 300, xh, 1, y, nullptr), k::Status::invalid_argument);  // k % 256
  EXPECT_EQ(kc::w4a8_gemv_q4_k(blocks + 8, 1, 256, xh, 1, y, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(kc::w4a8_gemv_q4_k(blocks, 1, 256, xh, 5, y, nullptr), k::Status::invalid_argument);
}

// The activations' 8-bit rounding, bit for bit the CPU's (kernels::quantize_activations_q8), which the
// output bounds above cannot see (a scale off by one ulp moves y well within them): weights of scale 1
// that are 1 at input o of row o and 0 elsewhere make y[o] = d[o / 32] q[o] exactly (the integer sum is
// q[o]; one fp32 product), on activations whose 32-input blocks span magnitudes 2^-14 .. 2^14, at 1-4
// rows, on INT4 groups and on Q4_K (d scale 1 and dmin min 0: the sub-block's sum is q[o] exactly).
TEST(CudaW4A8Gemv, RoundsTheActivationsAsTheCpuBitForBit) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  const int64_t kk = 4352, n_out = kk, group = 128;  // 34 groups, 17 super-blocks a row
  // INT4 groups: Q8_0 blocks of scale 1, a 1 at input o of row o (levels z + 1 there, z elsewhere).
  std::vector<k::BlockQ8_0> blocks(static_cast<size_t>(n_out * kk / 32));
  for (int64_t o = 0; o < n_out; ++o) {
    for (int64_t b = 0; b < kk / 32; ++b) {
      k::BlockQ8_0& block = blocks[static_cast<size_t>(o * kk / 32 + b)];
      block.d = k::fp32_to_fp16(1.0f);
      std::fill(std::begin(block.qs), std::end(block.qs), int8_t{0});
      if (b == o / 32) block.qs[o % 32] = 1;
    }
  }
  ct::DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups_from_blocks(blocks, n_out, kk, group, w));
  // Q4_K: d 1, dmin 0, every sub-block's scale 1 and min 0 (llama.cpp's 6-bit packing: bytes 0-3 and
  // 8-11 hold them), level 1 at input o of row o (sub-block j's levels: low nibbles of qs bytes 32 (j / 2)
  // .. + 31 for even j, high nibbles for odd j), 0 elsewhere.
  std::vector<k::BlockQ4_K> q4k(static_cast<size_t>(n_out * kk / 256));
  for (int64_t o = 0; o < n_out; ++o) {
    for (int64_t b = 0; b < kk / 256; ++b) {
      k::BlockQ4_K& block = q4k[static_cast<size_t>(o * kk / 256 + b)];
      block.d = k::fp32_to_fp16(1.0f);
      block.dmin = k::fp32_to_fp16(0.0f);
      const uint8_t scales[12] = {1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1};
      std::copy(std::begin(scales), std::end(scales), std::begin(block.scales));
      std::fill(std::begin(block.qs), std::end(block.qs), uint8_t{0});
      if (b == o / 256) {
        const int64_t i = o % 256, j = i / 32;
        block.qs[32 * (j / 2) + i % 32] = j % 2 == 0 ? 0x01 : 0x10;
      }
    }
  }
  {  // The probe is what the CPU reads it as: row o is 1 at o, 0 elsewhere (a few rows checked).
    std::vector<float> row(static_cast<size_t>(kk));
    for (const int64_t o : {int64_t{0}, int64_t{33}, int64_t{300}, kk - 1}) {
      ASSERT_EQ(k::dequantize_row(k::DType::Q4_K, q4k.data() + o * kk / 256, row.data(), kk), k::Status::ok);
      for (int64_t i = 0; i < kk; ++i) ASSERT_EQ(row[static_cast<size_t>(i)], i == o ? 1.0f : 0.0f) << o;
    }
  }
  std::mt19937 rng(31);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Every row its own magnitudes (block b of row r at 2^((b + 7 r) % 29 - 14)), every row count.
  const int64_t max_m = kc::kW4A8GemvMaxM;
  std::vector<k::f16_bits> xh(static_cast<size_t>(max_m * kk));
  for (int64_t r = 0; r < max_m; ++r)
    for (int64_t i = 0; i < kk; ++i)
      xh[static_cast<size_t>(r * kk + i)] =
          k::fp32_to_fp16(std::ldexp(normal(rng), static_cast<int>((i / 32 + 7 * r) % 29) - 14));
  std::vector<float> want(static_cast<size_t>(max_m * n_out));
  std::vector<int8_t> q(static_cast<size_t>(kk));
  std::vector<float> d(static_cast<size_t>(kk / 32));
  for (int64_t r = 0; r < max_m; ++r) {
    k::quantize_activations_q8(xh.data() + r * kk, kk, q.data(), d.data());
    for (int64_t o = 0; o < n_out; ++o)
      want[static_cast<size_t>(r * n_out + o)] =
          d[static_cast<size_t>(o / 32)] * static_cast<float>(q[static_cast<size_t>(o)]);
  }
  ct::DeviceBuffer<k::f16_bits> dx(xh);
  ct::DeviceBuffer<uint8_t> dq4k(
      std::vector<uint8_t>(reinterpret_cast<const uint8_t*>(q4k.data()),
                           reinterpret_cast<const uint8_t*>(q4k.data() + q4k.size())));
  ct::DeviceBuffer<float> dy(static_cast<size_t>(max_m * n_out));
  ASSERT_TRUE(dx.ptr && dq4k.ptr && dy.ptr);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  for (const bool on_q4k : {false, true}) {
    for (int64_t m = 1; m <= max_m; ++m) {
      SCOPED_TRACE(std::string(on_q4k ? "Q4_K" : "INT4 groups") + ", m " + std::to_string(m));
      ASSERT_EQ(cudaMemset(dy.ptr, 0xff, dy.count * sizeof(float)), cudaSuccess);
      ASSERT_EQ(on_q4k ? kc::w4a8_gemv_q4_k(dq4k.ptr, n_out, kk, x, m, dy.ptr, nullptr)
                       : kc::w4a8_gemv_int4_groups(w.quants->ptr, w.scales_half(), w.zeros->ptr, group, n_out,
                                                   kk, x, m, dy.ptr, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> got = dy.to_host();
      int bad = 0;
      for (int64_t i = 0; i < m * n_out; ++i) {
        const auto at = static_cast<size_t>(i);
        if (std::memcmp(&got[at], &want[at], sizeof(float)) != 0 && ++bad <= 3)
          ADD_FAILURE() << "row " << i / n_out << " input " << i % n_out << ": " << got[at] << ", the CPU's "
                        << want[at];
      }
      EXPECT_EQ(bad, 0);
    }
  }
}

// Long rows, as llama-70b's products have them (k = 8448: a lane's second Q4_K super-block; k = 28672,
// ffn_down: over 48 KB of quantized activations at 4 rows, the opt-in shared memory), launched
// programmatically (the wait for the kernel before, then the activations).
TEST(CudaW4A8Gemv, LongRowsLaunchedProgrammaticallyMatchTheCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(29);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n_out = 37, max_m = kc::kW4A8GemvMaxM;
  for (const int64_t kk : {int64_t{8448}, int64_t{28672}}) {
    std::vector<k::f16_bits> xh(static_cast<size_t>(max_m * kk));
    for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
    ct::DeviceBuffer<k::f16_bits> dx(xh);
    ct::DeviceBuffer<float> dy(static_cast<size_t>(max_m * n_out));
    ASSERT_TRUE(dx.ptr && dy.ptr);
    const auto* x = reinterpret_cast<const __half*>(dx.ptr);
    ct::DeviceInt4Groups w;
    ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(n_out, kk, 128, rng, w));
    const std::vector<uint8_t> quants = w.quants->to_host(), zeros = w.zeros->to_host();
    const std::vector<uint16_t> scales = w.scales->to_host();
    std::vector<float> want(static_cast<size_t>(max_m * n_out));
    ASSERT_EQ(k::w4a8_gemv_int4_groups_reference(quants.data(), scales.data(), zeros.data(), 128, n_out, kk,
                                                 xh.data(), max_m, want.data()),
              k::Status::ok);
    const ErrorBudget budget = error_budget(w.wf, xh, n_out, kk, max_m);
    std::vector<uint8_t> q4k;
    std::vector<float> q4k_f;
    ASSERT_NO_FATAL_FAILURE(ct::random_quantized(k::DType::Q4_K, n_out, kk, rng, q4k, q4k_f));
    ct::DeviceBuffer<uint8_t> dq4k(q4k);
    ASSERT_TRUE(dq4k.ptr);
    std::vector<float> want_q4k(static_cast<size_t>(max_m * n_out));
    ASSERT_EQ(k::w4a8_gemv_q4_k_reference(q4k.data(), n_out, kk, xh.data(), max_m, want_q4k.data()),
              k::Status::ok);
    const ErrorBudget budget_q4k = error_budget(q4k_f, xh, n_out, kk, max_m);
    for (int64_t m = 1; m <= max_m; ++m) {
      SCOPED_TRACE("k " + std::to_string(kk) + " m " + std::to_string(m));
      ASSERT_EQ(cudaMemset(dy.ptr, 0xff, dy.count * sizeof(float)), cudaSuccess);
      ASSERT_EQ(kc::w4a8_gemv_int4_groups(w.quants->ptr, w.scales_half(), w.zeros->ptr, 128, n_out, kk, x, m,
                                          dy.ptr, nullptr, /*programmatic=*/true),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      expect_within_budget(dy.to_host(), want, budget, m * n_out, 1e-5);
      ASSERT_EQ(cudaMemset(dy.ptr, 0xff, dy.count * sizeof(float)), cudaSuccess);
      ASSERT_EQ(kc::w4a8_gemv_q4_k(dq4k.ptr, n_out, kk, x, m, dy.ptr, nullptr, /*programmatic=*/true),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      expect_within_budget(dy.to_host(), want_q4k, budget_q4k, m * n_out, 2e-5);
    }
  }
}

// Rows whose 8-bit copies do not fit a block's shared memory are refused before anything runs (y as it
// was, no CUDA error left behind), while one row of the same length runs; no inputs (k = 0) give zeros.
TEST(CudaW4A8Gemv, RefusesRowsTheSharedMemoryCannotHoldAndSumsNoInputsToZero) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  int device = 0, max_smem = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), cudaSuccess);
  // Four rows take 4 x 1.75 bytes an input on INT4 groups and 4 x 1.34375 on Q4_K (each row's 8-bit copy,
  // its padding, scales and sums): past the device's largest block for both, by two super-blocks, where
  // one row fits either way.
  const int64_t kk = (static_cast<int64_t>(max_smem) * 8 / 43 / 256 + 2) * 256, n_out = 5, group = 128;
  std::mt19937 rng(37);
  ct::DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(n_out, kk, group, rng, w));
  std::vector<uint8_t> q4k;
  std::vector<float> q4k_f;
  ASSERT_NO_FATAL_FAILURE(ct::random_quantized(k::DType::Q4_K, n_out, kk, rng, q4k, q4k_f));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<k::f16_bits> xh(static_cast<size_t>(kc::kW4A8GemvMaxM * kk));
  for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
  ct::DeviceBuffer<k::f16_bits> dx(xh);
  ct::DeviceBuffer<uint8_t> dq4k(q4k);
  ct::DeviceBuffer<float> dy(static_cast<size_t>(kc::kW4A8GemvMaxM * n_out));
  ASSERT_TRUE(dx.ptr && dq4k.ptr && dy.ptr);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  const auto int4 = [&](int64_t m, int64_t k_used) {
    return kc::w4a8_gemv_int4_groups(w.quants->ptr, w.scales_half(), w.zeros->ptr, group, n_out, k_used, x, m,
                                     dy.ptr, nullptr);
  };
  const auto on_q4k = [&](int64_t m, int64_t k_used) {
    return kc::w4a8_gemv_q4_k(dq4k.ptr, n_out, k_used, x, m, dy.ptr, nullptr);
  };
  for (const bool q4_k : {false, true}) {
    SCOPED_TRACE(q4_k ? "Q4_K" : "INT4 groups");
    const auto gemv = [&](int64_t m, int64_t k_used) { return q4_k ? on_q4k(m, k_used) : int4(m, k_used); };
    ASSERT_EQ(cudaMemset(dy.ptr, 0xff, dy.count * sizeof(float)), cudaSuccess);
    EXPECT_EQ(gemv(kc::kW4A8GemvMaxM, kk), k::Status::invalid_argument) << kk << " inputs, " << max_smem;
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
    for (const float v : dy.to_host()) EXPECT_TRUE(std::isnan(v)) << "written by a refused call";
    // One row of the same length fits, and matches the reference.
    ASSERT_EQ(gemv(1, kk), k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<float> want(static_cast<size_t>(n_out));
    if (q4_k) {
      ASSERT_EQ(k::w4a8_gemv_q4_k_reference(q4k.data(), n_out, kk, xh.data(), 1, want.data()), k::Status::ok);
    } else {
      const std::vector<uint8_t> quants = w.quants->to_host(), zeros = w.zeros->to_host();
      const std::vector<uint16_t> scales = w.scales->to_host();
      ASSERT_EQ(k::w4a8_gemv_int4_groups_reference(quants.data(), scales.data(), zeros.data(), group, n_out,
                                                   kk, xh.data(), 1, want.data()),
                k::Status::ok);
    }
    expect_within_budget(dy.to_host(), want, error_budget(q4_k ? q4k_f : w.wf, xh, n_out, kk, 1), n_out,
                         q4_k ? 2e-5 : 1e-5);
    // No inputs: every output of every row 0.
    ASSERT_EQ(cudaMemset(dy.ptr, 0xff, dy.count * sizeof(float)), cudaSuccess);
    ASSERT_EQ(gemv(3, 0), k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> y = dy.to_host();
    for (int64_t i = 0; i < 3 * n_out; ++i) EXPECT_EQ(y[static_cast<size_t>(i)], 0.0f) << "output " << i;
  }
}

// A row's outputs do not depend on how many rows share the call (the same operations in the same order
// for each row), so batching decode requests does not change a request's bits.
TEST(CudaW4A8Gemv, ARowsOutputsDoNotDependOnTheRowCount) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(19);
  const int64_t n_out = 1000, kk = 2048, group = 128;
  ct::DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(n_out, kk, group, rng, w));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<k::f16_bits> xh(static_cast<size_t>(kc::kW4A8GemvMaxM * kk));
  for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
  ct::DeviceBuffer<k::f16_bits> dx(xh);
  ct::DeviceBuffer<float> all(static_cast<size_t>(kc::kW4A8GemvMaxM * n_out)),
      one(static_cast<size_t>(n_out));
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  ASSERT_EQ(kc::w4a8_gemv_int4_groups(w.quants->ptr, w.scales_half(), w.zeros->ptr, group, n_out, kk, x,
                                      kc::kW4A8GemvMaxM, all.ptr, nullptr),
            k::Status::ok);
  for (int64_t r = 0; r < kc::kW4A8GemvMaxM; ++r) {
    ASSERT_EQ(kc::w4a8_gemv_int4_groups(w.quants->ptr, w.scales_half(), w.zeros->ptr, group, n_out, kk,
                                        x + r * kk, 1, one.ptr, nullptr),
              k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> a = all.to_host(), b = one.to_host();
    for (int64_t o = 0; o < n_out; ++o)
      ASSERT_EQ(a[static_cast<size_t>(r * n_out + o)], b[static_cast<size_t>(o)])
          << "row " << r << " output " << o;
  }
  // The same for GGUF Q4_K as stored (k = 9216: 36 super-blocks, a second one for some lanes).
  const int64_t kq = 9216;
  std::vector<uint8_t> wq;
  std::vector<float> wf;
  ASSERT_NO_FATAL_FAILURE(ct::random_quantized(k::DType::Q4_K, n_out, kq, rng, wq, wf));
  ct::DeviceBuffer<uint8_t> dw(wq);
  std::vector<k::f16_bits> xq(static_cast<size_t>(kc::kW4A8GemvMaxM * kq));
  for (auto& v : xq) v = k::fp32_to_fp16(normal(rng));
  ct::DeviceBuffer<k::f16_bits> dxq(xq);
  ASSERT_TRUE(dw.ptr && dxq.ptr);
  const auto* xk = reinterpret_cast<const __half*>(dxq.ptr);
  ASSERT_EQ(kc::w4a8_gemv_q4_k(dw.ptr, n_out, kq, xk, kc::kW4A8GemvMaxM, all.ptr, nullptr), k::Status::ok);
  for (int64_t r = 0; r < kc::kW4A8GemvMaxM; ++r) {
    ASSERT_EQ(kc::w4a8_gemv_q4_k(dw.ptr, n_out, kq, xk + r * kq, 1, one.ptr, nullptr), k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> a = all.to_host(), b = one.to_host();
    for (int64_t o = 0; o < n_out; ++o)
      ASSERT_EQ(a[static_cast<size_t>(r * n_out + o)], b[static_cast<size_t>(o)])
          << "Q4_K row " << r << " output " << o;
  }
}

TEST(CudaW4A8Gemv, RefusesBadArgumentsBeforeTouchingTheDevice) {
  alignas(16) static uint8_t quants[256] = {}, zeros[8] = {};
  alignas(16) static uint16_t scales[8] = {}, x[512] = {};
  static float y[64];
  const auto* s = reinterpret_cast<const __half*>(scales);
  const auto* xh = reinterpret_cast<const __half*>(x);
  using k::Status;
  EXPECT_EQ(kc::w4a8_gemv_int4_groups(quants, s, zeros, 32, 2, 128, xh, 0, y, nullptr),
            Status::invalid_argument);
  EXPECT_EQ(kc::w4a8_gemv_int4_groups(quants, s, zeros, 32, 2, 128, xh, kc::kW4A8GemvMaxM + 1, y, nullptr),
            Status::invalid_argument);
  EXPECT_EQ(kc::w4a8_gemv_int4_groups(quants, s, zeros, 48, 2, 96, xh, 1, y, nullptr),
            Status::invalid_argument);
  EXPECT_EQ(kc::w4a8_gemv_int4_groups(quants + 8, s, zeros, 32, 2, 128, xh, 1, y, nullptr),
            Status::invalid_argument);  // quants not 16-byte aligned
  EXPECT_EQ(kc::w4a8_gemv_int4_groups(quants, s, zeros, 32, 2, 128, xh + 1, 1, y, nullptr),
            Status::invalid_argument);  // x not 16-byte aligned
  EXPECT_EQ(kc::w4a8_gemv_int4_groups(quants, s, nullptr, 32, 2, 128, xh, 1, y, nullptr),
            Status::invalid_argument);
  EXPECT_EQ(kc::w4a8_gemv_int4_groups(quants, s, zeros, 32, -1, 128, xh, 1, y, nullptr),
            Status::invalid_argument);
}

}  // namespace
