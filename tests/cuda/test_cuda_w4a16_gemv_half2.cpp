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

#include "kernels/cuda/residual_norm.cuh"
#include "kernels/cuda/rope_kv_write.cuh"
#include "kernels/cuda/swiglu.cuh"
#include "kernels/cuda/w4a16_gemv_half2.cuh"
#include "kernels/int4_groups.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/rope.hpp"
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

// What a GGUF K-quant half2 GEMV (w4a16_gemv_q4_k_half2's signature) refuses before it launches, on a
// valid [n_out, kk] matrix at w: more than one activation row, k not a multiple of 256, misaligned
// weights or activations, no weights or output, negative rows (no rows: nothing to do).
namespace {
using KQuantHalf2Gemv = k::Status (*)(const uint8_t*, int64_t, int64_t, const __half*, int64_t, float*,
                                      cudaStream_t, bool);
void expect_k_quant_refusals(KQuantHalf2Gemv gemv, const uint8_t* w, int64_t n_out, int64_t kk,
                             const __half* x, float* y) {
  EXPECT_EQ(gemv(w, n_out, kk, x, 2, y, nullptr, false), k::Status::invalid_argument) << "one activation row";
  EXPECT_EQ(gemv(w, n_out, 288, x, 1, y, nullptr, false), k::Status::invalid_argument)
      << "k not a multiple of 256";
  EXPECT_EQ(gemv(w + 8, n_out, kk, x, 1, y, nullptr, false), k::Status::invalid_argument)
      << "misaligned weights";
  EXPECT_EQ(gemv(w, n_out, kk, x + 1, 1, y, nullptr, false), k::Status::invalid_argument)
      << "misaligned activations";
  EXPECT_EQ(gemv(nullptr, n_out, kk, x, 1, y, nullptr, false), k::Status::invalid_argument) << "no weights";
  EXPECT_EQ(gemv(w, n_out, kk, x, 1, nullptr, nullptr, false), k::Status::invalid_argument) << "no output";
  EXPECT_EQ(gemv(w, -1, kk, x, 1, y, nullptr, false), k::Status::invalid_argument) << "negative rows";
  EXPECT_EQ(gemv(w, 0, kk, x, 1, y, nullptr, false), k::Status::ok) << "no rows: nothing to do";
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// A K-quant half2 GEMV (`gemv`, w4a16_gemv_q4_k_half2's signature) on random `type` weights as uploaded
// (as_uploaded): one output, around the 16-row block and many blocks, each with 256 (one super-block:
// lanes 4..31 idle), 2304 (the first batch's second step partly past the end), 4352 and 7936 (a
// partial batch after the pointers moved on) and 28672 inputs (llama-70b's: whole batches); the product
// within `bound` of sum|x * w| on normal activations, within 1e-4 on small integer ones (the fp16 sums
// exact: what catches a wrong pairing). Then more(n_out, kk, wq, wf, weights on the device, launch).
template <typename More>
void expect_k_quant_products(k::DType type, KQuantHalf2Gemv gemv, double bound, std::mt19937& rng,
                             std::normal_distribution<float>& normal,
                             std::uniform_int_distribution<int>& small, More&& more) {
  for (const int64_t n_out : {int64_t{1}, int64_t{37}, int64_t{2051}}) {
    for (const int64_t kk : {int64_t{256}, int64_t{2304}, int64_t{4352}, int64_t{7936}, int64_t{28672}}) {
      if (n_out == 2051 && kk >= 7936) continue;  // the host reference: n_out * k products
      SCOPED_TRACE("n_out=" + std::to_string(n_out) + " k=" + std::to_string(kk));
      std::vector<uint8_t> wq;
      std::vector<float> wf;
      ASSERT_NO_FATAL_FAILURE(random_quantized(type, n_out, kk, rng, wq, wf));
      DeviceBuffer<uint8_t> dw(nibble::cuda_test::as_uploaded(type, n_out, kk, wq));
      ASSERT_NE(dw.ptr, nullptr);
      const auto launch = [&](const __half* x, float* y) {
        return gemv(dw.ptr, n_out, kk, x, 1, y, nullptr, false);
      };
      std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
      for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
      ASSERT_NO_FATAL_FAILURE(expect_product(wf, n_out, kk, xh, bound, launch));
      for (auto& v : xh) v = k::fp32_to_fp16(static_cast<float>(small(rng)));
      ASSERT_NO_FATAL_FAILURE(expect_product(wf, n_out, kk, xh, 1e-4, launch));
      ASSERT_NO_FATAL_FAILURE(more(n_out, kk, wq, wf, dw, launch));
    }
  }
}
}  // namespace

// GGUF Q4_K as stored (w4a16_gemv_q4_k_half2). Per sub-block the fp16 sum of x (q - z) has 16 products a
// half (at most 16 * 2^-11 of sum|x * d scale * (q - z)|), and d scale (q - z) is the weight within
// half a level step (z: the level nearest weight 0), so 3e-3 of sum|x * w| bounds it with a margin
// (emulated: ~1e-4; the uncentred sums reached 0.027 with one 2000); with integer activations the fp16 sums
// are exact and only the fp32 sums round (1e-4), which is what catches a wrong pairing. Shapes: one output,
// around the 16-row block, many blocks; one super-block (4 chunks: lanes 4..31 idle), 9 (36 chunks: the first
// batch's second step partly past the end), 17 and 31 (68 and 124 chunks: a partial batch after the
// pointers moved on), 112 (llama-70b's 28672 inputs: whole batches).
TEST(CudaW4A16GemvHalf2, Q4KMatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(44);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> small(-2, 2);
  expect_k_quant_products(
      k::DType::Q4_K, k::cuda::w4a16_gemv_q4_k_half2, 3e-3, rng, normal, small,
      [&](int64_t n_out, int64_t kk, const std::vector<uint8_t>&, const std::vector<float>& wf,
          const DeviceBuffer<uint8_t>& dw, const auto& launch) {
        if (n_out != 37 || kk != 2304) return;  // large activations are scaled first; then the refusals
        std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
        for (size_t i = 0; i < xh.size(); ++i)
          xh[i] = k::fp32_to_fp16(normal(rng) * (i % 101 == 0 ? 6000.0f : 1.0f));
        ASSERT_NO_FATAL_FAILURE(expect_product(wf, n_out, kk, xh, 3e-3, launch));
        // One 60000 late in the row: the scaling must see every warp's staged part.
        for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
        xh[static_cast<size_t>(kk - 70)] = k::fp32_to_fp16(60000.0f);
        ASSERT_NO_FATAL_FAILURE(expect_product(wf, n_out, kk, xh, 3e-3, launch));
        DeviceBuffer<k::f16_bits> dx(static_cast<size_t>(2 * kk));
        DeviceBuffer<float> dy(static_cast<size_t>(2 * n_out));
        const auto* x = reinterpret_cast<const __half*>(dx.ptr);
        expect_k_quant_refusals(k::cuda::w4a16_gemv_q4_k_half2, dw.ptr, n_out, kk, x, dy.ptr);
      });
}

// Q4_K: one large activation (2000, 60000: Llama's outlier channels) on an input where every row's
// weight is near 0 (0 before quantizing) stays within the bound: the kernel sums each sub-block's levels
// centred on its level nearest weight 0, so that input adds almost nothing to the fp16 sums (summed
// uncentred, rows were 0.05-0.23 of sum|x w| off in emulation; on this very matrix 0.025 at 2000 and
// 0.18 at 60000, centred ~1e-4: the bound, 3e-3, fails both). 512 rows of 2 super-blocks.
TEST(CudaW4A16GemvHalf2, Q4KLargeActivationOnWeightsNearZeroStaysWithinTheBound) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(47);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n_out = 512, kk = 512, rb = k::row_bytes(k::DType::Q4_K, kk);
  for (const int64_t outlier : {int64_t{5}, int64_t{300}}) {
    std::vector<uint8_t> wq(static_cast<size_t>(n_out * rb));
    std::vector<float> wf(static_cast<size_t>(n_out * kk)), row(static_cast<size_t>(kk));
    for (int64_t o = 0; o < n_out; ++o) {
      const float scale = 0.01f + 0.2f * static_cast<float>(o % 5), offset = static_cast<float>(o % 3) * 0.1f;
      for (float& v : row) v = normal(rng) * scale + offset;
      row[static_cast<size_t>(outlier)] = 0.0f;
      ASSERT_EQ(k::quantize_row(k::DType::Q4_K, row.data(), wq.data() + o * rb, kk), k::Status::ok);
      ASSERT_EQ(k::dequantize_row(k::DType::Q4_K, wq.data() + o * rb, wf.data() + o * kk, kk), k::Status::ok);
    }
    DeviceBuffer<uint8_t> dw(wq);
    ASSERT_NE(dw.ptr, nullptr);
    for (const float large : {2000.0f, 60000.0f}) {
      SCOPED_TRACE("x = " + std::to_string(large) + " at input " + std::to_string(outlier));
      std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
      for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
      xh[static_cast<size_t>(outlier)] = k::fp32_to_fp16(large);
      ASSERT_NO_FATAL_FAILURE(expect_product(wf, n_out, kk, xh, 3e-3, [&](const __half* x, float* y) {
        return k::cuda::w4a16_gemv_q4_k_half2(dw.ptr, n_out, kk, x, 1, y, nullptr);
      }));
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

// GGUF Q6_K in planes (w4a16_gemv_q6_k_half2, kernels/q6_k_planes.hpp). Per quarter the fp16 level sum
// has 8 products a half (at most 8 * 2^-11 of sum|x * q| each) and d scale q is the weight itself (no
// min), so 2e-2 of sum|x * w| bounds it; with integer activations the fp16 sums are exact and only the
// fp32 sums round (1e-4), which is what catches a wrong pairing. Shapes: one output, around the 16-row
// block, many blocks; one super-block (4 pieces: lanes 4..31 idle), 9 (36 pieces: the first batch's
// second step partly past the end), 17 and 31 (a partial batch after the indices moved on), 112
// (llama-70b's 28672 inputs: whole batches). Then a row's bits alone (rows 16..31 in planes of their
// own, launched programmatically: the planes' row indexing), large activations, the refusals, and the
// longest row it takes.
TEST(CudaW4A16GemvHalf2, Q6KMatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(46);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> small(-2, 2);
  using nibble::cuda_test::as_uploaded;
  expect_k_quant_products(
      k::DType::Q6_K, k::cuda::w4a16_gemv_q6_k_half2, 2e-2, rng, normal, small,
      [&](int64_t n_out, int64_t kk, const std::vector<uint8_t>& wq, const std::vector<float>& wf,
          const DeviceBuffer<uint8_t>& dw, const auto& launch) {
        if (n_out != 2051 || kk != 4352) return;
        // Rows 16..31 in planes of their own give the whole matrix's bits for them.
        const int64_t row_bytes = k::row_bytes(k::DType::Q6_K, kk);
        const std::vector<uint8_t> part_blocks(wq.begin() + 16 * row_bytes, wq.begin() + 32 * row_bytes);
        DeviceBuffer<uint8_t> dpart(as_uploaded(k::DType::Q6_K, 16, kk, part_blocks));
        std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
        for (size_t i = 0; i < xh.size(); ++i)  // large activations are scaled first
          xh[i] = k::fp32_to_fp16(normal(rng) * (i % 101 == 0 ? 6000.0f : 1.0f));
        ASSERT_NO_FATAL_FAILURE(expect_product(wf, n_out, kk, xh, 2e-2, launch));
        DeviceBuffer<k::f16_bits> dx(xh);
        DeviceBuffer<float> all(static_cast<size_t>(n_out)), part(16);
        ASSERT_TRUE(dpart.ptr && dx.ptr && all.ptr && part.ptr);
        const auto* x = reinterpret_cast<const __half*>(dx.ptr);
        ASSERT_EQ(k::cuda::w4a16_gemv_q6_k_half2(dw.ptr, n_out, kk, x, 1, all.ptr, nullptr), k::Status::ok);
        ASSERT_EQ(
            k::cuda::w4a16_gemv_q6_k_half2(dpart.ptr, 16, kk, x, 1, part.ptr, nullptr, /*programmatic=*/true),
            k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<float> a = all.to_host(), p = part.to_host();
        EXPECT_EQ(std::memcmp(a.data() + 16, p.data(), 16 * sizeof(float)), 0);
        expect_k_quant_refusals(k::cuda::w4a16_gemv_q6_k_half2, dw.ptr, n_out, kk, x, all.ptr);
      });
  const int64_t n_out = 16, kk = k::cuda::kW4A16GemvHalf2MaxK;
  std::vector<uint8_t> wq;
  std::vector<float> wf;
  ASSERT_NO_FATAL_FAILURE(random_quantized(k::DType::Q6_K, n_out, kk, rng, wq, wf));
  DeviceBuffer<uint8_t> dw(as_uploaded(k::DType::Q6_K, n_out, kk, wq));
  ASSERT_NE(dw.ptr, nullptr);
  std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
  for (auto& v : xh) v = k::fp32_to_fp16(static_cast<float>(small(rng)));
  ASSERT_NO_FATAL_FAILURE(
      expect_product_or_refusal(wf, n_out, kk, xh, 1e-4, 2 * kk + 16, [&](const __half* x, float* y) {
        return k::cuda::w4a16_gemv_q6_k_half2(dw.ptr, n_out, kk, x, 1, y, nullptr);
      }));
}

// ---------------------------------------------------------------------------------------------
// The fused epilogues (SwiGLU after the stacked gate / up rows, RoPE and the KV write after the stacked
// q / k / v rows). Each must write bit for bit what the plain half2 GEMV followed by the kernel it
// replaces writes (swiglu_f32_to_f16, rope_kv_write: both tested against the CPU in
// test_cuda_forward_kernels), and the CPU's values within the GEMV's bound.

namespace {

// A [rows, kk] matrix in one of the two formats the half2 GEMV reads (group-wise INT4 at `group`, or
// Q4_K as stored), its dequantized weights, and its plain product.
// One token's RoPE + KV write shape (the fused epilogue's): heads of head_dim, rot_dims rotated,
// rope base 500000, rows `stride` apart in the plain product's output, a cache of num_blocks blocks.
k::cuda::RopeKvWriteShape one_token_rope_kv(int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                                            int64_t rot_dims, int64_t stride, int64_t block_size,
                                            int64_t num_blocks, int64_t max_blocks_per_seq) {
  k::cuda::RopeKvWriteShape s;
  s.tokens = 1;
  s.n_head = n_head;
  s.n_head_kv = n_head_kv;
  s.head_dim = head_dim;
  s.rot_dims = rot_dims;
  s.rope_base = 500000.0f;
  s.q_stride = s.kv_stride = stride;
  s.block_size = block_size;
  s.num_blocks = num_blocks;
  s.max_blocks_per_seq = max_blocks_per_seq;
  return s;
}

enum class Half2Format { int4_groups, q4_k, q6_k };
constexpr Half2Format kHalf2Formats[] = {Half2Format::int4_groups, Half2Format::q4_k, Half2Format::q6_k};

struct Half2Matrix {
  Half2Format format = Half2Format::int4_groups;
  int64_t rows = 0, kk = 0, group = 0;
  DeviceInt4Groups int4;
  std::unique_ptr<DeviceBuffer<uint8_t>> blocks;  // Q4_K as stored, Q6_K in planes
  std::vector<float> wf;
  k::Status product(const __half* x, float* y) const {
    switch (format) {
      case Half2Format::q4_k:
        return k::cuda::w4a16_gemv_q4_k_half2(blocks->ptr, rows, kk, x, 1, y, nullptr);
      case Half2Format::q6_k:
        return k::cuda::w4a16_gemv_q6_k_half2(blocks->ptr, rows, kk, x, 1, y, nullptr);
      default:
        return k::cuda::w4a16_gemv_int4_groups_half2(int4.quants->ptr, int4.scales_half(), int4.zeros->ptr,
                                                     group, rows, kk, x, 1, y, nullptr);
    }
  }
  // The fused epilogues (the INT4 ones on their default block shape), launched programmatically.
  k::Status swiglu(const __half* x, __half* act) const {
    switch (format) {
      case Half2Format::q4_k:
        return k::cuda::w4a16_gemv_q4_k_half2_swiglu(blocks->ptr, rows / 2, kk, x, act, nullptr, true);
      case Half2Format::q6_k:
        return k::cuda::w4a16_gemv_q6_k_half2_swiglu(blocks->ptr, rows / 2, kk, x, act, nullptr, true);
      default:
        return k::cuda::w4a16_gemv_int4_groups_half2_swiglu(int4.quants->ptr, int4.scales_half(),
                                                            int4.zeros->ptr, group, rows / 2, kk, x, act,
                                                            nullptr, true);
    }
  }
  k::Status rope_kv(const k::cuda::RopeKvWriteShape& s, const __half* x, const int32_t* pos,
                    const int32_t* seq, const int32_t* tables, __half* q, __half* k_cache, __half* v_cache,
                    int32_t* flag) const {
    switch (format) {
      case Half2Format::q4_k:
        return k::cuda::w4a16_gemv_q4_k_half2_rope_kv(blocks->ptr, s, kk, x, pos, seq, tables, q, k_cache,
                                                      v_cache, flag, nullptr, true);
      case Half2Format::q6_k:
        return k::cuda::w4a16_gemv_q6_k_half2_rope_kv(blocks->ptr, s, kk, x, pos, seq, tables, q, k_cache,
                                                      v_cache, flag, nullptr, true);
      default:
        return k::cuda::w4a16_gemv_int4_groups_half2_rope_kv(
            int4.quants->ptr, int4.scales_half(), int4.zeros->ptr, group, s, kk, x, pos, seq, tables, q,
            k_cache, v_cache, flag, nullptr, true);
    }
  }
  k::Status add_norm(const __half* x, float* y, float* residual, const float* norm_weight, float eps,
                     __half* h, unsigned* counter) const {
    switch (format) {
      case Half2Format::q4_k:
        return k::cuda::w4a16_gemv_q4_k_half2_add_norm(blocks->ptr, rows, kk, x, y, residual, norm_weight,
                                                       eps, h, counter, nullptr, true);
      case Half2Format::q6_k:
        return k::cuda::w4a16_gemv_q6_k_half2_add_norm(blocks->ptr, rows, kk, x, y, residual, norm_weight,
                                                       eps, h, counter, nullptr, true);
      default:
        return k::cuda::w4a16_gemv_int4_groups_half2_add_norm(
            int4.quants->ptr, int4.scales_half(), int4.zeros->ptr, group, rows, kk, x, y, residual,
            norm_weight, eps, h, counter, nullptr, true);
    }
  }
};

void make_half2_matrix(Half2Format format, int64_t rows, int64_t kk, int64_t group, std::mt19937& rng,
                       Half2Matrix& w) {
  w.format = format;
  w.rows = rows;
  w.kk = kk;
  w.group = group;
  if (format != Half2Format::int4_groups) {
    const k::DType type = format == Half2Format::q4_k ? k::DType::Q4_K : k::DType::Q6_K;
    std::vector<uint8_t> wq;
    ASSERT_NO_FATAL_FAILURE(random_quantized(type, rows, kk, rng, wq, w.wf));
    w.blocks = std::make_unique<DeviceBuffer<uint8_t>>(nibble::cuda_test::as_uploaded(type, rows, kk, wq));
    ASSERT_NE(w.blocks->ptr, nullptr);
  } else {
    ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(rows, kk, group, rng, w.int4));
    w.wf = w.int4.wf;
  }
}

// Row r of W times x in double, and the sum of |x * w| over the row.
void host_row(const Half2Matrix& w, const std::vector<k::f16_bits>& xh, int64_t r, double& sum, double& mag) {
  sum = mag = 0.0;
  for (int64_t i = 0; i < w.kk; ++i) {
    const double p = static_cast<double>(k::fp16_to_fp32(xh[static_cast<size_t>(i)])) * w.wf[r * w.kk + i];
    sum += p;
    mag += std::fabs(p);
  }
}

const char* format_name(Half2Format format) {
  return format == Half2Format::q4_k ? "Q4_K" : format == Half2Format::q6_k ? "Q6_K" : "INT4 groups";
}

__half* as_half(uint16_t* p) { return reinterpret_cast<__half*>(p); }

}  // namespace

// n_ff of 1 (one warp, seven idle), 37 (a partial block) and 1001 (many blocks); INT4 at group 64,
// Q4_K and Q6_K; normal activations, then integer ones (the GEMV's sums exact up to fp32 rounding), against
// silu(g) u on the CPU.
TEST(CudaW4A16GemvHalf2, SwiGluEpilogueIsTheProductThenSwiGluBitForBit) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(61);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> small(-2, 2);
  for (const Half2Format format : kHalf2Formats) {
    const bool k_quant = format != Half2Format::int4_groups;  // rows of whole 256-input super-blocks
    for (const int64_t n_ff : {int64_t{1}, int64_t{37}, int64_t{1001}}) {
      SCOPED_TRACE(std::string(format_name(format)) + ", n_ff " + std::to_string(n_ff));
      const int64_t kk = k_quant ? 2304 : 4224;
      Half2Matrix w;
      ASSERT_NO_FATAL_FAILURE(make_half2_matrix(format, 2 * n_ff, kk, 64, rng, w));
      for (const bool integer : {false, true}) {
        std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
        for (auto& v : xh) v = k::fp32_to_fp16(integer ? static_cast<float>(small(rng)) : normal(rng) * 0.2f);
        DeviceBuffer<k::f16_bits> dx(xh);
        DeviceBuffer<float> dy(static_cast<size_t>(2 * n_ff));
        DeviceBuffer<uint16_t> unfused(static_cast<size_t>(n_ff)), fused(static_cast<size_t>(n_ff));
        ASSERT_TRUE(dx.ptr && dy.ptr && unfused.ptr && fused.ptr);
        ASSERT_EQ(cudaMemset(fused.ptr, 0xff, static_cast<size_t>(n_ff) * 2), cudaSuccess);  // NaNs
        const auto* x = reinterpret_cast<const __half*>(dx.ptr);
        auto* act = reinterpret_cast<__half*>(fused.ptr);
        ASSERT_EQ(w.product(x, dy.ptr), k::Status::ok);
        ASSERT_EQ(k::cuda::swiglu_f32_to_f16(dy.ptr, dy.ptr + n_ff, 2 * n_ff,
                                             reinterpret_cast<__half*>(unfused.ptr), 1, n_ff, nullptr),
                  k::Status::ok);
        ASSERT_EQ(w.swiglu(x, act), k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<uint16_t> a = fused.to_host(), b = unfused.to_host();
        EXPECT_EQ(a, b) << (integer ? "integer" : "normal") << " activations";
        if (!integer) continue;
        int bad = 0;
        for (int64_t i = 0; i < n_ff; ++i) {
          double g = 0.0, gm = 0.0, u = 0.0, um = 0.0;
          host_row(w, xh, i, g, gm);
          host_row(w, xh, n_ff + i, u, um);
          const double expected = g / (1.0 + std::exp(-g)) * u;
          const double got = k::fp16_to_fp32(a[static_cast<size_t>(i)]);
          // fp16's rounding, and the fp32 sums' (about 1e-6 of sum|x w|) carried through silu(g) u.
          const double tolerance =
              1e-3 * std::fabs(expected) + 1e-5 * (gm + std::fabs(g)) * (um + std::fabs(u));
          if (!(std::fabs(got - expected) <= tolerance) && ++bad <= 5)
            ADD_FAILURE() << "act[" << i << "] = " << got << ", CPU " << expected;
        }
        EXPECT_EQ(bad, 0);
      }
    }
  }
}

// q / k / v of (n_head, n_head_kv, head_dim, rot_dims): GQA with every dim rotated, partial rotation
// (96 of 128), and tiny heads (6 dims, 4 rotated); INT4 at group 32, Q4_K and Q6_K. Positions in the first
// and second block, one whose block id is -1 and one past the table: the flag raised, the cache
// untouched and q still written, as rope_kv_write does. q, both caches and the flag compared whole.
TEST(CudaW4A16GemvHalf2, RopeKvEpilogueIsTheProductThenRopeKvWriteBitForBit) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  struct Heads {
    int64_t n_head, n_head_kv, head_dim, rot_dims;
    int scaled;  // RoPE scaling: 1 a linear scale and a frequency factor a pair (Llama 3.1's); 2 the same
                 // with YaRN's ramp and magnitude (from an original context of 16, so pairs on both sides)
  };
  std::mt19937 rng(62);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t block_size = 16, num_blocks = 7, mbps = 4;
  const std::vector<int32_t> tables = {0, 1, 3, 4, 5, 2, -1, 6};  // rows 0 and 1
  for (const Half2Format format : kHalf2Formats) {
    for (const Heads& h : {Heads{4, 2, 64, 64, 0}, Heads{3, 1, 128, 96, 0}, Heads{5, 5, 6, 4, 0},
                           Heads{4, 2, 64, 64, 1}, Heads{3, 1, 128, 96, 2}}) {
      SCOPED_TRACE(std::string(format_name(format)) + ", heads " + std::to_string(h.n_head) + "/" +
                   std::to_string(h.n_head_kv) + " of " + std::to_string(h.head_dim) +
                   (h.scaled == 1   ? ", scaled"
                    : h.scaled == 2 ? ", YaRN"
                                    : ""));
      const int64_t q_dim = h.n_head * h.head_dim, kv_dim = h.n_head_kv * h.head_dim;
      const int64_t rows = q_dim + 2 * kv_dim, kk = format != Half2Format::int4_groups ? 512 : 480;
      Half2Matrix w;
      ASSERT_NO_FATAL_FAILURE(make_half2_matrix(format, rows, kk, 32, rng, w));
      // (strides: the plain product's row, for rope_kv_write)
      k::cuda::RopeKvWriteShape s = one_token_rope_kv(h.n_head, h.n_head_kv, h.head_dim, h.rot_dims, rows,
                                                      block_size, num_blocks, mbps);
      std::vector<float> freq_factors(static_cast<size_t>(h.rot_dims / 2));
      for (float& f : freq_factors) f = 1.0f + 7.0f * std::fabs(normal(rng));
      const DeviceBuffer<float> d_factors(freq_factors);
      k::RopeScaling scaling;
      if (h.scaled == 1) scaling = {0.25f, freq_factors.data()};
      if (h.scaled == 2)
        scaling = k::rope_yarn_scaling(0.25f, freq_factors.data(), h.rot_dims, 16, s.rope_base, 1.5f);
      s.rope_scaling = scaling;
      s.rope_scaling.freq_factors = h.scaled != 0 ? d_factors.ptr : nullptr;
      const float theta_scale = k::rope_theta_scale(s.rope_base, s.rot_dims);
      for (const int32_t pos : {3, 20, 40, 70}) {  // blocks 5 and 2; block id -1; past the table
        SCOPED_TRACE("position " + std::to_string(pos));
        const bool bad_slot = pos >= 40;
        // Integer activations at 20 and 70: the sums exact to fp32's rounding, so q is checked tightly.
        const bool integer = pos == 20 || pos == 70;
        std::uniform_int_distribution<int> small(-2, 2);
        std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
        for (auto& v : xh) v = k::fp32_to_fp16(integer ? static_cast<float>(small(rng)) : normal(rng));
        std::vector<uint16_t> cache_init(static_cast<size_t>(num_blocks * block_size * kv_dim));
        for (size_t i = 0; i < cache_init.size(); ++i)
          cache_init[i] = k::fp32_to_fp16(static_cast<float>(i % 13));
        DeviceBuffer<k::f16_bits> dx(xh);
        DeviceBuffer<float> dy(static_cast<size_t>(rows));
        DeviceBuffer<int32_t> d_pos(std::vector<int32_t>{pos}), d_seq(std::vector<int32_t>{1}),
            d_tables(tables);
        DeviceBuffer<int32_t> flag_a(std::vector<int32_t>{0}), flag_b(std::vector<int32_t>{0});
        DeviceBuffer<uint16_t> q_a(static_cast<size_t>(q_dim)), q_b(static_cast<size_t>(q_dim));
        DeviceBuffer<uint16_t> k_a(cache_init), v_a(cache_init), k_b(cache_init), v_b(cache_init);
        ASSERT_TRUE(dx.ptr && dy.ptr && d_pos.ptr && d_seq.ptr && d_tables.ptr && flag_a.ptr && flag_b.ptr &&
                    q_a.ptr && q_b.ptr && k_a.ptr && v_a.ptr && k_b.ptr && v_b.ptr);
        ASSERT_EQ(cudaMemset(q_a.ptr, 0xff, static_cast<size_t>(q_dim) * 2), cudaSuccess);  // NaNs
        const auto* x = reinterpret_cast<const __half*>(dx.ptr);
        ASSERT_EQ(w.product(x, dy.ptr), k::Status::ok);
        ASSERT_EQ(k::cuda::rope_kv_write(s, dy.ptr, dy.ptr + q_dim, dy.ptr + q_dim + kv_dim, d_pos.ptr,
                                         d_seq.ptr, d_tables.ptr, as_half(q_b.ptr), as_half(k_b.ptr),
                                         as_half(v_b.ptr), flag_b.ptr, nullptr),
                  k::Status::ok);
        ASSERT_EQ(w.rope_kv(s, x, d_pos.ptr, d_seq.ptr, d_tables.ptr, as_half(q_a.ptr), as_half(k_a.ptr),
                            as_half(v_a.ptr), flag_a.ptr),
                  k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<uint16_t> q_got = q_a.to_host(), k_got = k_a.to_host(), v_got = v_a.to_host();
        EXPECT_EQ(q_got, q_b.to_host());
        EXPECT_EQ(k_got, k_b.to_host());
        EXPECT_EQ(v_got, v_b.to_host());
        EXPECT_EQ(flag_a.to_host(), flag_b.to_host());
        EXPECT_EQ(flag_a.to_host(), std::vector<int32_t>{bad_slot ? 1 : 0});
        if (bad_slot) {
          EXPECT_EQ(k_got, cache_init);
          EXPECT_EQ(v_got, cache_init);
        }
        // q against the CPU: the row's sums in double, rotated by the CPU's angle recurrence, within
        // the GEMV's bound (3e-2 of sum|x w| for Q4_K's normal activations; 1e-4, as the plain tests, for
        // integer ones) and fp16's rounding.
        int bad = 0;
        for (int64_t r = 0; r < q_dim; r += 2) {
          double a = 0.0, am = 0.0, b = 0.0, bm = 0.0;
          host_row(w, xh, r, a, am);
          host_row(w, xh, r + 1, b, bm);
          const int64_t d = r % h.head_dim;
          double r0 = a, r1 = b;
          if (d < h.rot_dims) {
            const float theta = k::rope_angle(pos, d / 2, theta_scale, scaling);
            const double c = std::cos(theta) * scaling.mscale, sn = std::sin(theta) * scaling.mscale;
            r0 = a * c - b * sn;
            r1 = a * sn + b * c;
          }
          const double tolerance =
              (integer ? 1e-4 : 3e-2) * (am + bm) + 1e-3 * (std::fabs(r0) + std::fabs(r1));
          const double got0 = k::fp16_to_fp32(q_got[static_cast<size_t>(r)]);
          const double got1 = k::fp16_to_fp32(q_got[static_cast<size_t>(r + 1)]);
          if (!(std::fabs(got0 - r0) <= tolerance && std::fabs(got1 - r1) <= tolerance) && ++bad <= 5)
            ADD_FAILURE() << "q[" << r << "], q[" << r + 1 << "] = " << got0 << ", " << got1 << "; CPU " << r0
                          << ", " << r1;
        }
        EXPECT_EQ(bad, 0);
      }
    }
  }
}

TEST(CudaW4A16GemvHalf2, EpiloguesRefuseWhatTheyCannotRun) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(63);
  const int64_t kk = 256, group = 128;
  DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(4 * 8, kk, group, rng, w));  // 2 + 2 x 1 heads of 8
  DeviceBuffer<k::f16_bits> dx(static_cast<size_t>(kk));
  DeviceBuffer<uint16_t> q(64), kc(64 * 16), vc(64 * 16), act(16);
  DeviceBuffer<int32_t> ints(std::vector<int32_t>{0, 0, 0, 0});
  ASSERT_TRUE(dx.ptr && q.ptr && kc.ptr && vc.ptr && act.ptr && ints.ptr);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  k::cuda::RopeKvWriteShape good;
  good.tokens = 1;
  good.n_head = 2;
  good.n_head_kv = 1;
  good.head_dim = 8;
  good.rot_dims = 8;
  good.block_size = 16;
  good.num_blocks = 1;
  good.max_blocks_per_seq = 1;
  const auto rope = [&](const k::cuda::RopeKvWriteShape& s, __half* q_out) {
    return k::cuda::w4a16_gemv_int4_groups_half2_rope_kv(
        w.quants->ptr, w.scales_half(), w.zeros->ptr, group, s, kk, x, ints.ptr, ints.ptr + 1, ints.ptr + 2,
        q_out, as_half(kc.ptr), as_half(vc.ptr), ints.ptr + 3, nullptr);
  };
  ASSERT_EQ(rope(good, as_half(q.ptr)), k::Status::ok);  // the shape the refusals below change
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  k::cuda::RopeKvWriteShape two_tokens = good, odd_head = good, odd_rotation = good, no_blocks = good;
  two_tokens.tokens = 2;
  odd_head.head_dim = 7;  // (and 4 * 7 = 28 rows would not pair)
  odd_head.rot_dims = 6;
  odd_rotation.rot_dims = 5;
  no_blocks.num_blocks = 0;
  EXPECT_EQ(rope(two_tokens, as_half(q.ptr)), k::Status::invalid_argument) << "one token";
  EXPECT_EQ(rope(odd_head, as_half(q.ptr)), k::Status::invalid_argument) << "odd head_dim";
  EXPECT_EQ(rope(odd_rotation, as_half(q.ptr)), k::Status::invalid_argument) << "odd rot_dims";
  EXPECT_EQ(rope(no_blocks, as_half(q.ptr)), k::Status::invalid_argument) << "no cache blocks";
  EXPECT_EQ(rope(good, nullptr), k::Status::invalid_argument) << "no q output";
  EXPECT_EQ(k::cuda::w4a16_gemv_int4_groups_half2_swiglu(w.quants->ptr, w.scales_half(), w.zeros->ptr, group,
                                                         16, kk, x, nullptr, nullptr),
            k::Status::invalid_argument)
      << "no SwiGLU output";
  EXPECT_EQ(k::cuda::w4a16_gemv_int4_groups_half2_swiglu(w.quants->ptr, w.scales_half(), w.zeros->ptr, group,
                                                         16, kk, x + 1, as_half(act.ptr), nullptr),
            k::Status::invalid_argument)
      << "misaligned activations";
  EXPECT_EQ(k::cuda::w4a16_gemv_q4_k_half2_swiglu(nullptr, 16, kk, x, as_half(act.ptr), nullptr),
            k::Status::invalid_argument)
      << "no Q4_K weights";
  EXPECT_EQ(k::cuda::w4a16_gemv_int4_groups_half2_swiglu(w.quants->ptr, w.scales_half(), w.zeros->ptr, group,
                                                         0, kk, x, as_half(act.ptr), nullptr),
            k::Status::ok)
      << "no rows: nothing to do";
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// The kernel table's shapes of the INT4 GEMV (kHalf2GemvVariants): each sums a row's units in the same
// order, so every one gives the default's bits, on a partial block (37 rows: idle warps) and on more
// row pairs than a persistent grid holds at once (12289 rows: 6145 pairs, where an H100's 132 SMs hold
// 2112 warps of most of these kernels and 1056 of the batch-8 one, so each persistent warp takes two to
// six), a row of one batch and of
// several with a partial one (128, 4224 inputs), llama-70b's longest (28672).
// Other groups, and shapes not in the list, are refused.
TEST(CudaW4A16GemvHalf2, EveryVariantGivesTheSameBits) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(64);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::string> names;
  for (const auto& v : k::cuda::kHalf2GemvVariants) names.push_back(k::cuda::half2_gemv_variant_name(v));
  std::sort(names.begin(), names.end());
  EXPECT_EQ(std::unique(names.begin(), names.end()), names.end()) << "variant names are distinct";
  const int64_t group = 128;
  for (const int64_t n_out : {int64_t{37}, int64_t{12289}}) {
    for (const int64_t kk : {int64_t{128}, int64_t{4224}, int64_t{28672}}) {
      if (n_out == 12289 && kk == 28672) continue;  // the weights made on the host
      SCOPED_TRACE(std::to_string(n_out) + " x " + std::to_string(kk));
      DeviceInt4Groups w;
      ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, w));
      std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
      for (auto& v : xh) v = k::fp32_to_fp16(normal(rng) * 30.0f);  // scaled in the kernel
      DeviceBuffer<k::f16_bits> dx(xh);
      DeviceBuffer<float> expected(static_cast<size_t>(n_out)), got(static_cast<size_t>(n_out));
      ASSERT_TRUE(dx.ptr && expected.ptr && got.ptr);
      const auto* x = reinterpret_cast<const __half*>(dx.ptr);
      ASSERT_EQ(k::cuda::w4a16_gemv_int4_groups_half2(w.quants->ptr, w.scales_half(), w.zeros->ptr, group,
                                                      n_out, kk, x, 1, expected.ptr, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> want = expected.to_host();
      for (const auto& v : k::cuda::kHalf2GemvVariants) {
        SCOPED_TRACE(k::cuda::half2_gemv_variant_name(v));
        ASSERT_EQ(cudaMemset(got.ptr, 0xff, static_cast<size_t>(n_out) * sizeof(float)),
                  cudaSuccess);  // NaNs
        ASSERT_EQ(
            k::cuda::w4a16_gemv_int4_groups_half2_variant(v, w.quants->ptr, w.scales_half(), w.zeros->ptr,
                                                          group, n_out, kk, x, 1, got.ptr, nullptr),
            k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<float> have = got.to_host();
        EXPECT_EQ(std::memcmp(have.data(), want.data(), want.size() * sizeof(float)), 0);
      }
    }
  }
  DeviceInt4Groups w64;
  ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(16, 256, 64, rng, w64));
  DeviceBuffer<k::f16_bits> dx(256);
  DeviceBuffer<float> dy(16);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  EXPECT_EQ(k::cuda::w4a16_gemv_int4_groups_half2_variant(k::cuda::kHalf2GemvVariants[1], w64.quants->ptr,
                                                          w64.scales_half(), w64.zeros->ptr, 64, 16, 256, x,
                                                          1, dy.ptr, nullptr),
            k::Status::invalid_argument)
      << "the variants are built for group 128";
  EXPECT_EQ(k::cuda::w4a16_gemv_int4_groups_half2_variant(k::cuda::kHalf2GemvVariants[0], w64.quants->ptr,
                                                          w64.scales_half(), w64.zeros->ptr, 64, 16, 256, x,
                                                          1, dy.ptr, nullptr),
            k::Status::ok)
      << "the first is the GEMV itself, for every group";
  EXPECT_EQ(k::cuda::w4a16_gemv_int4_groups_half2_variant(k::cuda::Half2GemvVariant{3, 3, false},
                                                          w64.quants->ptr, w64.scales_half(), w64.zeros->ptr,
                                                          64, 16, 256, x, 1, dy.ptr, nullptr),
            k::Status::invalid_argument)
      << "not a variant";
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// The residual add and RMSNorm in the GEMV's last block (w4a16_gemv_*_half2_add_norm): y, the residual
// and the normed row bit for bit what the plain GEMV then add_rms_norm_f32 write, on rows of one norm
// part (37), two (1025), eight odd ones (4099: slices of 513) and llama-70b's 8192 (eight of 1024);
// INT4 at group 128, Q4_K and Q6_K, with short inputs, llama-70b's longest (28672: the epilogue's own shared
// memory on top of 56 KB of activations) and rows just under 48 KB of activations (24576; Q4_K 23040: the
// static shared memory alone takes them past the default limit; refused where w4a16_gemv_half2_fits
// says they cannot fit); twice on the same counter, which ends at zero.
TEST(CudaW4A16GemvHalf2, AddNormEpilogueIsTheProductThenAddRmsNormBitForBit) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(65);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float eps = 1e-5f;
  struct Shape {
    int64_t n_out, int4_k, q4_k_k, q6_k_k;
  };
  for (const Half2Format format : kHalf2Formats) {
    for (const Shape shape :
         {Shape{37, 4224, 512, 512}, Shape{4099, 4224, 512, 512}, Shape{8192, 4224, 512, 512},
          Shape{37, 28672, 28672, 28672}, Shape{1025, 28672, 28672, 28672}, Shape{37, 24576, 23040, 24576}}) {
      const bool q4_k = format == Half2Format::q4_k;
      const int64_t n_out = shape.n_out, kk = format == Half2Format::q4_k   ? shape.q4_k_k
                                              : format == Half2Format::q6_k ? shape.q6_k_k
                                                                            : shape.int4_k;
      SCOPED_TRACE(std::string(format_name(format)) + ", " + std::to_string(n_out) + " x " +
                   std::to_string(kk));
      Half2Matrix w;
      ASSERT_NO_FATAL_FAILURE(make_half2_matrix(format, n_out, kk, 128, rng, w));
      std::vector<float> residual(static_cast<size_t>(n_out)), weight(residual.size());
      for (auto& v : residual) v = normal(rng) * 3.0f;
      for (auto& v : weight) v = 1.0f + 0.1f * normal(rng);
      DeviceBuffer<float> d_weight(weight);
      DeviceBuffer<uint32_t> counter(std::vector<uint32_t>{0});
      ASSERT_TRUE(d_weight.ptr && counter.ptr);
      for (int call = 0; call < 2; ++call) {
        SCOPED_TRACE("call " + std::to_string(call));
        std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
        for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
        DeviceBuffer<k::f16_bits> dx(xh);
        DeviceBuffer<float> y_a(static_cast<size_t>(n_out)), y_b(static_cast<size_t>(n_out)), res_a(residual),
            res_b(residual);
        DeviceBuffer<uint16_t> h_a(static_cast<size_t>(n_out)), h_b(static_cast<size_t>(n_out));
        ASSERT_TRUE(dx.ptr && y_a.ptr && y_b.ptr && res_a.ptr && res_b.ptr && h_a.ptr && h_b.ptr);
        ASSERT_EQ(cudaMemset(h_a.ptr, 0xff, static_cast<size_t>(n_out) * 2), cudaSuccess);  // NaNs
        const auto* x = reinterpret_cast<const __half*>(dx.ptr);
        ASSERT_EQ(w.product(x, y_b.ptr), k::Status::ok);
        ASSERT_EQ(k::cuda::add_rms_norm_f32(res_b.ptr, y_b.ptr, d_weight.ptr, as_half(h_b.ptr), 1, n_out, eps,
                                            nullptr),
                  k::Status::ok);
        const bool fits = k::cuda::w4a16_gemv_half2_fits(kk, q4_k);
        const k::Status st =
            w.add_norm(x, y_a.ptr, res_a.ptr, d_weight.ptr, eps, as_half(h_a.ptr), counter.ptr);
        if (!fits) {  // a device with little shared memory a block
          EXPECT_EQ(st, k::Status::invalid_argument);
          EXPECT_EQ(cudaGetLastError(), cudaSuccess);
          break;
        }
        ASSERT_EQ(st, k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<float> ya = y_a.to_host(), yb = y_b.to_host(), ra = res_a.to_host(),
                                 rb = res_b.to_host();
        EXPECT_EQ(std::memcmp(ya.data(), yb.data(), ya.size() * sizeof(float)), 0) << "the product";
        EXPECT_EQ(std::memcmp(ra.data(), rb.data(), ra.size() * sizeof(float)), 0) << "the residual";
        EXPECT_EQ(h_a.to_host(), h_b.to_host()) << "the normed row";
        EXPECT_EQ(counter.to_host(), std::vector<uint32_t>{0});
        residual = ra;  // the next call adds onto this one's residual
      }
    }
  }
  // Refusals: no counter, no residual, a negative eps.
  Half2Matrix w;
  ASSERT_NO_FATAL_FAILURE(make_half2_matrix(Half2Format::int4_groups, 16, 256, 128, rng, w));
  DeviceBuffer<k::f16_bits> dx(256);
  DeviceBuffer<float> y(16), res(16), weight(16);
  DeviceBuffer<uint16_t> h(16);
  DeviceBuffer<uint32_t> counter(std::vector<uint32_t>{0});
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  const auto call = [&](float* residual, float epsilon, unsigned* c) {
    return k::cuda::w4a16_gemv_int4_groups_half2_add_norm(w.int4.quants->ptr, w.int4.scales_half(),
                                                          w.int4.zeros->ptr, 128, 16, 256, x, y.ptr, residual,
                                                          weight.ptr, epsilon, as_half(h.ptr), c, nullptr);
  };
  EXPECT_EQ(call(res.ptr, 1e-5f, nullptr), k::Status::invalid_argument) << "no counter";
  EXPECT_EQ(call(nullptr, 1e-5f, counter.ptr), k::Status::invalid_argument) << "no residual";
  EXPECT_EQ(call(res.ptr, -1.0f, counter.ptr), k::Status::invalid_argument) << "negative eps";
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// The fused epilogues on every block shape (kHalf2GemvVariants, INT4 at group 128) give the default
// shape's bits: SwiGLU and RoPE + the KV write on more row pairs than a persistent grid holds at once
// (6145 gate / up pairs; 64 + 2 x 8 heads of 64: 2560 rotation pairs) and on a partial block (21 pairs;
// 25 rotation pairs, partially rotated, and a position without a slot: the flag raised), the norm
// on llama-70b's row (where the shapes it cannot carry run the default one). Out-of-range shapes are
// refused; at group 64 every shape runs the default (the others are built for group 128).
TEST(CudaW4A16GemvHalf2, FusedEpiloguesGiveTheSameBitsOnEveryShape) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(66);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t group = 128, kk = 1152;
  std::vector<k::f16_bits> xh(static_cast<size_t>(kk));
  for (auto& v : xh) v = k::fp32_to_fp16(normal(rng) * 20.0f);  // scaled in the kernel
  DeviceBuffer<k::f16_bits> dx(xh);
  ASSERT_NE(dx.ptr, nullptr);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  const auto shapes = static_cast<int>(k::cuda::kHalf2GemvVariantCount);

  for (const int64_t n_ff : {int64_t{21}, int64_t{6145}}) {  // SwiGLU
    SCOPED_TRACE("SwiGLU, n_ff " + std::to_string(n_ff));
    DeviceInt4Groups w;
    ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(2 * n_ff, kk, group, rng, w));
    std::vector<uint16_t> want;
    for (int shape = 0; shape < shapes; ++shape) {
      SCOPED_TRACE(k::cuda::half2_gemv_variant_name(k::cuda::kHalf2GemvVariants[shape]));
      DeviceBuffer<uint16_t> act(static_cast<size_t>(n_ff));
      ASSERT_EQ(cudaMemset(act.ptr, 0xff, static_cast<size_t>(n_ff) * 2), cudaSuccess);  // NaNs
      ASSERT_EQ(
          k::cuda::w4a16_gemv_int4_groups_half2_swiglu(w.quants->ptr, w.scales_half(), w.zeros->ptr, group,
                                                       n_ff, kk, x, as_half(act.ptr), nullptr, false, shape),
          k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      if (shape == 0) want = act.to_host();
      EXPECT_EQ(act.to_host(), want);
    }
    DeviceBuffer<uint16_t> act(static_cast<size_t>(n_ff));
    for (const int shape : {-1, shapes}) {
      EXPECT_EQ(
          k::cuda::w4a16_gemv_int4_groups_half2_swiglu(w.quants->ptr, w.scales_half(), w.zeros->ptr, group,
                                                       n_ff, kk, x, as_half(act.ptr), nullptr, false, shape),
          k::Status::invalid_argument)
          << shape;
    }
  }

  struct Heads {
    int64_t n_head, n_head_kv, head_dim, rot_dims;
    int32_t pos;  // past the table's two blocks of 16: the flag raised, the cache untouched
  };
  for (const Heads& heads : {Heads{3, 1, 10, 8, 21}, Heads{3, 1, 10, 8, 40}, Heads{64, 8, 64, 64, 21}}) {
    // RoPE + the KV write: 25 rotation pairs (a partial block, partial rotation), 2560 pairs
    SCOPED_TRACE("RoPE, " + std::to_string(heads.n_head) + " heads of " + std::to_string(heads.head_dim) +
                 ", position " + std::to_string(heads.pos));
    // (strides unused here)
    const k::cuda::RopeKvWriteShape s =
        one_token_rope_kv(heads.n_head, heads.n_head_kv, heads.head_dim, heads.rot_dims, 0, 16, 2, 2);
    const bool bad_slot = heads.pos >= 32;
    const int64_t q_dim = s.n_head * s.head_dim, kv_dim = s.n_head_kv * s.head_dim;
    DeviceInt4Groups w;
    ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(q_dim + 2 * kv_dim, kk, group, rng, w));
    DeviceBuffer<int32_t> d_pos(std::vector<int32_t>{heads.pos}), d_seq(std::vector<int32_t>{0}),
        d_tables(std::vector<int32_t>{1, 0});
    std::vector<uint16_t> want_q, want_k, want_v;
    for (int shape = 0; shape < shapes; ++shape) {
      SCOPED_TRACE(k::cuda::half2_gemv_variant_name(k::cuda::kHalf2GemvVariants[shape]));
      const std::vector<uint16_t> cache_init(static_cast<size_t>(s.num_blocks * s.block_size * kv_dim),
                                             0x3c00);
      DeviceBuffer<uint16_t> q(static_cast<size_t>(q_dim)), kc(cache_init), vc(cache_init);
      DeviceBuffer<int32_t> flag(std::vector<int32_t>{0});
      ASSERT_EQ(cudaMemset(q.ptr, 0xff, static_cast<size_t>(q_dim) * 2), cudaSuccess);  // NaNs
      ASSERT_EQ(k::cuda::w4a16_gemv_int4_groups_half2_rope_kv(
                    w.quants->ptr, w.scales_half(), w.zeros->ptr, group, s, kk, x, d_pos.ptr, d_seq.ptr,
                    d_tables.ptr, as_half(q.ptr), as_half(kc.ptr), as_half(vc.ptr), flag.ptr, nullptr, false,
                    shape),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      if (shape == 0) {
        want_q = q.to_host();
        want_k = kc.to_host();
        want_v = vc.to_host();
        EXPECT_EQ(want_k != cache_init, !bad_slot) << "position written where it has a slot";
      }
      EXPECT_EQ(q.to_host(), want_q);
      EXPECT_EQ(kc.to_host(), want_k);
      EXPECT_EQ(vc.to_host(), want_v);
      EXPECT_EQ(flag.to_host(), std::vector<int32_t>{bad_slot ? 1 : 0});
    }
  }

  {  // The residual add and RMSNorm: llama-70b's row
    SCOPED_TRACE("add + RMSNorm");
    const int64_t n_out = 8192;
    DeviceInt4Groups w;
    ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, w));
    std::vector<float> residual(static_cast<size_t>(n_out)), weight(residual.size());
    for (auto& v : residual) v = normal(rng) * 3.0f;
    for (auto& v : weight) v = 1.0f + 0.1f * normal(rng);
    DeviceBuffer<float> d_weight(weight);
    DeviceBuffer<uint32_t> counter(std::vector<uint32_t>{0});
    std::vector<float> want_y, want_res;
    std::vector<uint16_t> want_h;
    for (int shape = 0; shape < shapes; ++shape) {
      SCOPED_TRACE(k::cuda::half2_gemv_variant_name(k::cuda::kHalf2GemvVariants[shape]));
      DeviceBuffer<float> y(static_cast<size_t>(n_out)), res(residual);
      DeviceBuffer<uint16_t> h(static_cast<size_t>(n_out));
      ASSERT_EQ(cudaMemset(h.ptr, 0xff, static_cast<size_t>(n_out) * 2), cudaSuccess);  // NaNs
      ASSERT_EQ(k::cuda::w4a16_gemv_int4_groups_half2_add_norm(
                    w.quants->ptr, w.scales_half(), w.zeros->ptr, group, n_out, kk, x, y.ptr, res.ptr,
                    d_weight.ptr, 1e-5f, as_half(h.ptr), counter.ptr, nullptr, false, shape),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      if (shape == 0) {
        want_y = y.to_host();
        want_res = res.to_host();
        want_h = h.to_host();
      }
      const std::vector<float> got_y = y.to_host(), got_res = res.to_host();
      EXPECT_EQ(std::memcmp(got_y.data(), want_y.data(), want_y.size() * sizeof(float)), 0);
      EXPECT_EQ(std::memcmp(got_res.data(), want_res.data(), want_res.size() * sizeof(float)), 0);
      EXPECT_EQ(h.to_host(), want_h);
      EXPECT_EQ(counter.to_host(), std::vector<uint32_t>{0});
    }
  }

  {  // Group 64: every shape runs the default one.
    const int64_t n_ff = 37;
    DeviceInt4Groups w;
    ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(2 * n_ff, kk, 64, rng, w));
    std::vector<uint16_t> want;
    for (int shape = 0; shape < shapes; ++shape) {
      DeviceBuffer<uint16_t> act(static_cast<size_t>(n_ff));
      ASSERT_EQ(
          k::cuda::w4a16_gemv_int4_groups_half2_swiglu(w.quants->ptr, w.scales_half(), w.zeros->ptr, 64, n_ff,
                                                       kk, x, as_half(act.ptr), nullptr, false, shape),
          k::Status::ok)
          << shape;
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      if (shape == 0) want = act.to_host();
      EXPECT_EQ(act.to_host(), want) << shape;
    }
  }
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// Which block shape a launch asked for a shape runs on (host only): itself at group 128, the default
// at other groups, and for the norm's epilogue the default where the shape cannot carry its one-block
// tail of 256 threads (persistent, 4 or 16 warps); out of range: -1.
TEST(CudaW4A16GemvHalf2, EffectiveShapes) {
  const int shapes = k::cuda::kHalf2GemvVariantCount;
  for (int shape = 0; shape < shapes; ++shape) {
    const k::cuda::Half2GemvVariant& v = k::cuda::kHalf2GemvVariants[shape];
    SCOPED_TRACE(k::cuda::half2_gemv_variant_name(v));
    EXPECT_EQ(k::cuda::half2_gemv_effective_shape(shape, 128, false), shape);
    EXPECT_EQ(k::cuda::half2_gemv_effective_shape(shape, 128, true),
              !v.persistent && v.warps == 8 ? shape : 0);
    for (const int64_t group : {32, 64}) {
      EXPECT_EQ(k::cuda::half2_gemv_effective_shape(shape, group, false), 0);
      EXPECT_EQ(k::cuda::half2_gemv_effective_shape(shape, group, true), 0);
    }
  }
  // The norm runs on three shapes: the default, 8 warps with 8 units in flight, and the 3-a-SM cap.
  int norm_shapes = 0;
  for (int shape = 0; shape < shapes; ++shape)
    norm_shapes += k::cuda::half2_gemv_effective_shape(shape, 128, true) == shape;
  EXPECT_EQ(norm_shapes, 3);
  for (const int shape : {-1, shapes}) {
    EXPECT_EQ(k::cuda::half2_gemv_effective_shape(shape, 128, false), -1);
    EXPECT_EQ(k::cuda::half2_gemv_effective_shape(shape, 64, true), -1);
  }
}
