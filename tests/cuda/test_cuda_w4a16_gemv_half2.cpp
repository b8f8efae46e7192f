// The half2 GEMV (w4a16_gemv_int4_groups_half2) against the CPU reference: the group-wise INT4
// weights dequantized on the CPU times the fp16 activations, in double. Skips without a CUDA device.
//
// Error bound: q - z and every product are exact until rounded into a unit's fp16 sums (16 FMAs each,
// each rounding to 2^-11 of the running sum at most); the running sums never exceed the unit's
// sum|x * (q - z)|, so a unit's error is at most 16 * 2^-11 of it (7.8e-3), and the fp32 sums over the
// units add about k / 32 * 2^-24. Checked against 1e-2 of sum|x * w|. That alone would let a wrong
// pairing of levels and activations through at large k (a scrambled sum is off by about 1 / sqrt(k) of
// sum|x * w|), so every shape is also run on small integer activations, where the fp16 sums are exact
// and the bound is the fp32 GEMVs' (1e-4).
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/w4a16_gemv_half2.cuh"
#include "kernels/int4_groups.hpp"
#include "kernels/quant_types.hpp"
#include "tests/cuda/cuda_test_util.hpp"
#include "tests/cuda/w4a16_test_util.hpp"

namespace k = nibble::kernels;

using nibble::cuda_test::DeviceBuffer;
using nibble::cuda_test::DeviceInt4Groups;
using nibble::cuda_test::expect_matches_reference;
using nibble::cuda_test::make_device_int4_groups;
using nibble::cuda_test::make_device_int4_groups_from_blocks;
using nibble::cuda_test::random_quantized;

namespace {

// y = W x for activations `xh` (fp16 bits) by `launch(x, y)` (device pointers), against the double
// reference on `wf` ([n_out, k], the dequantized weights), within `bound` of sum|x * w| per output.
template <typename Launch>
void expect_product(const std::vector<float>& wf, int64_t n_out, int64_t kk,
                    const std::vector<k::f16_bits>& xh, double bound, Launch launch) {
  DeviceBuffer<k::f16_bits> dx(xh);
  DeviceBuffer<float> dy(static_cast<size_t>(n_out));
  ASSERT_TRUE(dx.ptr && dy.ptr);
  ASSERT_EQ(cudaMemset(dy.ptr, 0xff, static_cast<size_t>(n_out) * sizeof(float)), cudaSuccess);  // NaNs
  ASSERT_EQ(launch(reinterpret_cast<const __half*>(dx.ptr), dy.ptr), k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> y = dy.to_host();
  int bad = 0;
  for (int64_t o = 0; o < n_out; ++o) {
    double ref = 0.0, mag = 0.0;
    for (int64_t i = 0; i < kk; ++i) {
      const double p = static_cast<double>(k::fp16_to_fp32(xh[static_cast<size_t>(i)])) * wf[o * kk + i];
      ref += p;
      mag += std::fabs(p);
    }
    const double rel = std::fabs(y[static_cast<size_t>(o)] - ref) / (mag > 0.0 ? mag : 1.0);
    if (!(rel < bound) && ++bad <= 5) {
      ADD_FAILURE() << "y[" << o << "] = " << y[static_cast<size_t>(o)] << ", reference " << ref
                    << ", relative error " << rel;
    }
  }
  EXPECT_EQ(bad, 0);
}

// The shared memory the device's blocks can have (0 when the query fails).
int max_shared_per_block() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return 0;
  return bytes;
}

// The longest rows: where the device's blocks hold `shared` bytes of shared memory (the kernel's need
// for the row) as expect_product checks it, otherwise the launch must be refused with no error left.
template <typename Launch>
void expect_product_or_refusal(const std::vector<float>& wf, int64_t n_out, int64_t kk,
                               const std::vector<k::f16_bits>& xh, double bound, int64_t shared,
                               Launch launch) {
  const int max_shared = max_shared_per_block();
  ASSERT_GT(max_shared, 0);
  if (static_cast<int64_t>(max_shared) >= shared) {
    ASSERT_NO_FATAL_FAILURE(expect_product(wf, n_out, kk, xh, bound, launch));
    return;
  }
  DeviceBuffer<k::f16_bits> dx(xh);
  DeviceBuffer<float> dy(static_cast<size_t>(n_out));
  EXPECT_EQ(launch(reinterpret_cast<const __half*>(dx.ptr), dy.ptr), k::Status::invalid_argument)
      << "this device's blocks hold " << max_shared << " bytes of shared memory";
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

void expect_half2_product(const DeviceInt4Groups& w, int64_t n_out, int64_t kk, int64_t group,
                          const std::vector<k::f16_bits>& xh, double bound) {
  expect_product(w.wf, n_out, kk, xh, bound, [&](const __half* x, float* y) {
    return k::cuda::w4a16_gemv_int4_groups_half2(w.quants->ptr, w.scales_half(), w.zeros->ptr, group, n_out,
                                                 kk, x, 1, y, nullptr);
  });
}

}  // namespace

// Odd shapes: one output, outputs around the 16-row block (37), many blocks (4099); one unit, 12 units
// (a lane's batch partly past the row's end), 4224 inputs (132 units: a full batch of 128 and a partial
// one), 28672 (llama-70b's down projection: 56 KB of staged activations); every group size. Normal
// activations within the fp16 bound, then integer ones in [-2, 2] exactly (at most 16 * 2 * 31 = 992 a
// running sum).
TEST(CudaW4A16GemvHalf2, MatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(2026);
  std::uniform_int_distribution<int> small(-2, 2);
  for (const int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}}) {
    for (const int64_t n_out : {int64_t{1}, int64_t{37}, int64_t{4099}}) {
      for (const int64_t kk : {int64_t{128}, int64_t{384}, int64_t{4224}, int64_t{28672}}) {
        if (n_out == 4099 && kk == 28672) continue;  // the host reference: n_out * k products
        SCOPED_TRACE("group " + std::to_string(group));
        DeviceInt4Groups w;
        ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, w));
        expect_matches_reference(w.wf, n_out, kk, 1, 1e-2, rng, [&](const __half* x, int64_t m, float* y) {
          return k::cuda::w4a16_gemv_int4_groups_half2(w.quants->ptr, w.scales_half(), w.zeros->ptr, group,
                                                       n_out, kk, x, m, y, nullptr);
        });
        std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
        for (auto& v : xh) v = k::fp32_to_fp16(static_cast<float>(small(rng)));
        ASSERT_NO_FATAL_FAILURE(expect_half2_product(w, n_out, kk, group, xh, 1e-4));
      }
    }
  }
}

// Integer activations in [-2, 2]: every fp16 sum is an exact integer (at most 16 * 2 * 31 = 992), so
// the kernel is as exact as the fp32 GEMVs; a wrong pairing of levels and activations, or a lost
// nibble, cannot hide in the fp16 rounding here.
TEST(CudaW4A16GemvHalf2, IntegerActivationsGiveTheExactLevelSums) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> level(-2, 2);
  for (const int64_t group : {int64_t{32}, int64_t{128}}) {
    const int64_t n_out = 53, kk = 4224;
    DeviceInt4Groups w;
    ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, w));
    std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
    for (auto& v : xh) v = k::fp32_to_fp16(static_cast<float>(level(rng)));
    ASSERT_NO_FATAL_FAILURE(expect_half2_product(w, n_out, kk, group, xh, 1e-4));
  }
}

// Activations far past the fp16 sums' range (|x| up to ~8000, Llama's "massive activations" in the
// down projection's input reach thousands): the kernel scales them by a power of two first, so the
// outputs stay finite and within the same bound; without it, 16 products of 8000 x 31 overflow fp16.
TEST(CudaW4A16GemvHalf2, LargeActivationsDoNotOverflowTheHalfSums) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n_out = 64, kk = 8192, group = 128;
  DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, w));
  std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
  for (size_t i = 0; i < xh.size(); ++i) {
    // A few huge values among ordinary ones, and a run of large ones that fills whole units.
    const float scale = i % 997 == 0 ? 8000.0f : (i >= 4096 && i < 4224) ? 2000.0f : 1.0f;
    xh[i] = k::fp32_to_fp16(normal(rng) * scale);
  }
  ASSERT_NO_FATAL_FAILURE(expect_half2_product(w, n_out, kk, group, xh, 1e-2));
  // One value of 60000 near the end of the row, ordinary ones elsewhere: the scaling must see the whole
  // row (every warp's staged part), or the unit holding it overflows.
  for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
  xh[static_cast<size_t>(kk - 40)] = k::fp32_to_fp16(60000.0f);
  ASSERT_NO_FATAL_FAILURE(expect_half2_product(w, n_out, kk, group, xh, 1e-2));
}

// Zeros up to 31 (groups whose values all lie in [-31, -16]: int4_groups_from_blocks gives them zero
// minus the smallest value), the largest |q - z| the overflow bound counts on, with every activation
// at fp16's largest magnitude: the outputs stay finite and within the bound.
TEST(CudaW4A16GemvHalf2, ZerosUpTo31AtTheLargestActivationsStayFinite) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(17);
  std::uniform_int_distribution<int> value(-31, -16);
  const int64_t n_out = 40, kk = 1024, group = 128;
  std::vector<k::BlockQ8_0> blocks(static_cast<size_t>(n_out * kk / 32));
  for (size_t g = 0; g < blocks.size() / (group / 32); ++g) {
    const k::f16_bits d = k::fp32_to_fp16(0.01f);
    for (size_t b = 0; b < static_cast<size_t>(group / 32); ++b) {
      k::BlockQ8_0& blk = blocks[g * (group / 32) + b];
      blk.d = d;
      for (auto& q : blk.qs) q = static_cast<int8_t>(value(rng));
    }
  }
  DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(make_device_int4_groups_from_blocks(blocks, n_out, kk, group, w));
  const std::vector<uint8_t> zeros = w.zeros->to_host();
  EXPECT_EQ(*std::max_element(zeros.begin(), zeros.end()), 31);
  std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
  for (size_t i = 0; i < xh.size(); ++i) xh[i] = k::fp32_to_fp16(i % 3 == 0 ? -65504.0f : 65504.0f);
  ASSERT_NO_FATAL_FAILURE(expect_half2_product(w, n_out, kk, group, xh, 1e-2));
}

// The longest row it takes (kW4A16GemvHalf2MaxK inputs: 192 KB of staged activations), exactly with
// integer activations, where the device's blocks can hold that much shared memory; refused otherwise.
TEST(CudaW4A16GemvHalf2, TakesTheLongestRowItAllows) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(23);
  std::uniform_int_distribution<int> small(-2, 2);
  const int64_t n_out = 16, kk = k::cuda::kW4A16GemvHalf2MaxK, group = 128;
  DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, w));
  std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
  for (auto& v : xh) v = k::fp32_to_fp16(static_cast<float>(small(rng)));
  ASSERT_NO_FATAL_FAILURE(
      expect_product_or_refusal(w.wf, n_out, kk, xh, 1e-4, 2 * kk + 16, [&](const __half* x, float* y) {
        return k::cuda::w4a16_gemv_int4_groups_half2(w.quants->ptr, w.scales_half(), w.zeros->ptr, group,
                                                     n_out, kk, x, 1, y, nullptr);
      }));
}

// A row's result does not depend on the rows around it or the grid (the scaling is the whole
// activation row's, the same in every block): outputs 16..31 of a 4099-row product, alone.
TEST(CudaW4A16GemvHalf2, ARowsBitsDoNotDependOnTheOtherRows) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n_out = 4099, kk = 4224, group = 64;
  DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, w));
  std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
  for (auto& v : xh) v = k::fp32_to_fp16(normal(rng) * 100.0f);  // scaled in the kernel
  DeviceBuffer<k::f16_bits> dx(xh);
  DeviceBuffer<float> all(static_cast<size_t>(n_out)), part(16);
  ASSERT_TRUE(dx.ptr && all.ptr && part.ptr);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  ASSERT_EQ(k::cuda::w4a16_gemv_int4_groups_half2(w.quants->ptr, w.scales_half(), w.zeros->ptr, group, n_out,
                                                  kk, x, 1, all.ptr, nullptr),
            k::Status::ok);
  // Rows 16..31 on their own: their weights, scales and zeros start 16 rows in.
  ASSERT_EQ(
      k::cuda::w4a16_gemv_int4_groups_half2(w.quants->ptr + 16 * kk / 2, w.scales_half() + 16 * kk / group,
                                            w.zeros->ptr + 16 * kk / group, group, 16, kk, x, 1, part.ptr,
                                            nullptr, /*programmatic=*/true),
      k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> a = all.to_host(), p = part.to_host();
  EXPECT_EQ(std::memcmp(a.data() + 16, p.data(), 16 * sizeof(float)), 0);
}

TEST(CudaW4A16GemvHalf2, RefusesWhatItCannotRun) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(9);
  const int64_t n_out = 8, kk = 256, group = 128;
  DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, w));
  DeviceBuffer<k::f16_bits> dx(static_cast<size_t>(2 * kk));
  DeviceBuffer<float> dy(static_cast<size_t>(2 * n_out));
  ASSERT_TRUE(dx.ptr && dy.ptr);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  const auto run = [&](const uint8_t* q, int64_t g, int64_t k_in, const __half* xx, int64_t m) {
    return k::cuda::w4a16_gemv_int4_groups_half2(q, w.scales_half(), w.zeros->ptr, g, n_out, k_in, xx, m,
                                                 dy.ptr, nullptr);
  };
  EXPECT_EQ(run(w.quants->ptr, group, kk, x, 2), k::Status::invalid_argument) << "one activation row";
  EXPECT_EQ(run(w.quants->ptr, group, kk, x + 1, 1), k::Status::invalid_argument) << "misaligned activations";
  EXPECT_EQ(run(w.quants->ptr + 8, group, kk, x, 1), k::Status::invalid_argument) << "misaligned weights";
  EXPECT_EQ(run(w.quants->ptr, 48, kk, x, 1), k::Status::invalid_argument) << "group 48";
  EXPECT_EQ(run(w.quants->ptr, 32, k::cuda::kW4A16GemvHalf2MaxK + 32, x, 1), k::Status::invalid_argument)
      << "more inputs than the shared memory holds";
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// GGUF Q4_K as stored (w4a16_gemv_q4_k_half2). Per sub-block the fp16 level sum has 16 products a half
// (at most 16 * 2^-11 of sum|x * d scale * q|), and (d scale) q can be about twice |w| (the min takes
// the rest), so the bound is 3e-2 of sum|x * w|; with integer activations the fp16 sums are exact and
// only the fp32 sums round (1e-4), which is what catches a wrong pairing. Shapes: one output, around
// the 16-row block, many blocks; one super-block (4 chunks: lanes 4..31 idle), 9 (36 chunks: the first
// batch's second step partly past the end), 17 and 31 (68 and 124 chunks: a partial batch after the
// pointers moved on), 112 (llama-70b's 28672 inputs: whole batches).
TEST(CudaW4A16GemvHalf2, Q4KMatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(44);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> small(-2, 2);
  for (const int64_t n_out : {int64_t{1}, int64_t{37}, int64_t{2051}}) {
    for (const int64_t kk : {int64_t{256}, int64_t{2304}, int64_t{4352}, int64_t{7936}, int64_t{28672}}) {
      if (n_out == 2051 && kk >= 7936) continue;  // the host reference: n_out * k products
      SCOPED_TRACE("n_out=" + std::to_string(n_out) + " k=" + std::to_string(kk));
      std::vector<uint8_t> wq;
      std::vector<float> wf;
      ASSERT_NO_FATAL_FAILURE(random_quantized(k::DType::Q4_K, n_out, kk, rng, wq, wf));
      DeviceBuffer<uint8_t> dw(wq);
      ASSERT_NE(dw.ptr, nullptr);
      const auto launch = [&](const __half* x, float* y) {
        return k::cuda::w4a16_gemv_q4_k_half2(dw.ptr, n_out, kk, x, 1, y, nullptr);
      };
      std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
      for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
      ASSERT_NO_FATAL_FAILURE(expect_product(wf, n_out, kk, xh, 3e-2, launch));
      for (auto& v : xh) v = k::fp32_to_fp16(static_cast<float>(small(rng)));
      ASSERT_NO_FATAL_FAILURE(expect_product(wf, n_out, kk, xh, 1e-4, launch));
      if (n_out == 37 && kk == 2304) {  // large activations are scaled first; then the refusals
        for (size_t i = 0; i < xh.size(); ++i)
          xh[i] = k::fp32_to_fp16(normal(rng) * (i % 101 == 0 ? 6000.0f : 1.0f));
        ASSERT_NO_FATAL_FAILURE(expect_product(wf, n_out, kk, xh, 3e-2, launch));
        // One 60000 late in the row: the scaling must see every warp's staged part.
        for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
        xh[static_cast<size_t>(kk - 70)] = k::fp32_to_fp16(60000.0f);
        ASSERT_NO_FATAL_FAILURE(expect_product(wf, n_out, kk, xh, 3e-2, launch));
        DeviceBuffer<k::f16_bits> dx(static_cast<size_t>(2 * kk));
        DeviceBuffer<float> dy(static_cast<size_t>(2 * n_out));
        const auto* x = reinterpret_cast<const __half*>(dx.ptr);
        EXPECT_EQ(k::cuda::w4a16_gemv_q4_k_half2(dw.ptr, n_out, kk, x, 2, dy.ptr, nullptr),
                  k::Status::invalid_argument)
            << "one activation row";
        EXPECT_EQ(k::cuda::w4a16_gemv_q4_k_half2(dw.ptr, n_out, 288, x, 1, dy.ptr, nullptr),
                  k::Status::invalid_argument)
            << "k not a multiple of 256";
        EXPECT_EQ(k::cuda::w4a16_gemv_q4_k_half2(dw.ptr + 8, n_out, kk, x, 1, dy.ptr, nullptr),
                  k::Status::invalid_argument)
            << "misaligned blocks";
        EXPECT_EQ(k::cuda::w4a16_gemv_q4_k_half2(dw.ptr, n_out, kk, x + 1, 1, dy.ptr, nullptr),
                  k::Status::invalid_argument)
            << "misaligned activations";
        EXPECT_EQ(cudaGetLastError(), cudaSuccess);
      }
    }
  }
}

// Q4_K: a row's bits do not depend on the rows around it (rows 16..31 of 2051 alone, launched
// programmatically), and the longest row it takes runs exactly on integer activations where the
// device's blocks hold its 2.125 bytes an input of shared memory (refused otherwise).
TEST(CudaW4A16GemvHalf2, Q4KRowsAloneAndTheLongestRow) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(45);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> small(-2, 2);
  {
    const int64_t n_out = 2051, kk = 4352;
    std::vector<uint8_t> wq;
    std::vector<float> wf;
    ASSERT_NO_FATAL_FAILURE(random_quantized(k::DType::Q4_K, n_out, kk, rng, wq, wf));
    DeviceBuffer<uint8_t> dw(wq);
    std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
    for (auto& v : xh) v = k::fp32_to_fp16(normal(rng) * 300.0f);  // scaled in the kernel
    DeviceBuffer<k::f16_bits> dx(xh);
    DeviceBuffer<float> all(static_cast<size_t>(n_out)), part(16);
    ASSERT_TRUE(dw.ptr && dx.ptr && all.ptr && part.ptr);
    const auto* x = reinterpret_cast<const __half*>(dx.ptr);
    const int64_t row_bytes = kk / k::kQK_K * static_cast<int64_t>(sizeof(k::BlockQ4_K));
    ASSERT_EQ(k::cuda::w4a16_gemv_q4_k_half2(dw.ptr, n_out, kk, x, 1, all.ptr, nullptr), k::Status::ok);
    ASSERT_EQ(k::cuda::w4a16_gemv_q4_k_half2(dw.ptr + 16 * row_bytes, 16, kk, x, 1, part.ptr, nullptr,
                                             /*programmatic=*/true),
              k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> a = all.to_host(), p = part.to_host();
    EXPECT_EQ(std::memcmp(a.data() + 16, p.data(), 16 * sizeof(float)), 0);
  }
  const int64_t n_out = 16, kk = k::cuda::kW4A16GemvHalf2MaxK;
  std::vector<uint8_t> wq;
  std::vector<float> wf;
  ASSERT_NO_FATAL_FAILURE(random_quantized(k::DType::Q4_K, n_out, kk, rng, wq, wf));
  DeviceBuffer<uint8_t> dw(wq);
  ASSERT_NE(dw.ptr, nullptr);
  std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
  for (auto& v : xh) v = k::fp32_to_fp16(static_cast<float>(small(rng)));
  ASSERT_NO_FATAL_FAILURE(expect_product_or_refusal(
      wf, n_out, kk, xh, 1e-4, 2 * kk + kk / 8 + 16, [&](const __half* x, float* y) {
        return k::cuda::w4a16_gemv_q4_k_half2(dw.ptr, n_out, kk, x, 1, y, nullptr);
      }));
}
