// The CUDA W4A16 decode GEMV (Q4_0, Q4_K, group-wise INT4, Q8_0, Q6_K and the other GGUF types; and the
// tensor-core and staged GEMVs for group-wise INT4) against a plain CPU reference (double accumulation of the
// dequantized weights and the fp16 activations).
//
// Error bound: every x (fp16) and every dequantized weight is exact in fp32, so the kernel's only
// errors are the fp32 roundings of its k products-and-sums (FMAs) and of the shuffle reduction: at
// most about (k + 5) * 2^-24 * sum|x * w| ≈ 2.6e-4 * sum|x * w| for k = 4352, against a 1e-3 bound. Skips
// when there is no CUDA device.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/cuda/w4a16_gemv_mma.cuh"
#include "kernels/int4_groups.hpp"
#include "kernels/q4_0_split.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"
#include "kernels/read_only_quants.hpp"
#include "tests/cuda/cuda_test_util.hpp"
#include "tests/cuda/w4a16_test_util.hpp"

namespace k = nibble::kernels;

using nibble::cuda_test::DeviceBuffer;
using nibble::cuda_test::DeviceInt4Groups;
using nibble::cuda_test::expect_matches_reference;
using nibble::cuda_test::make_device_int4_groups;
using nibble::cuda_test::random_quantized;

TEST(CudaW4A16Gemv, MatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(1234);
  for (const int64_t n_out : {int64_t{1}, int64_t{37}, int64_t{4099}}) {
    for (const int64_t kk : {int64_t{32}, int64_t{96}, int64_t{4128}}) {
      std::vector<uint8_t> wq;
      std::vector<float> wf;
      ASSERT_NO_FATAL_FAILURE(random_quantized(k::DType::Q4_0, n_out, kk, rng, wq, wf));
      DeviceBuffer<uint8_t> dw(wq);
      ASSERT_NE(dw.ptr, nullptr);
      for (const int64_t m : {int64_t{1}, int64_t{3}, int64_t{16}, int64_t{32}}) {
        expect_matches_reference(wf, n_out, kk, m, 1e-3, rng, [&](const __half* x, int64_t mm, float* y) {
          return k::cuda::w4a16_gemv_q4_0(dw.ptr, n_out, kk, x, mm, y, nullptr);
        });
      }
    }
  }
}

// A GGUF GEMV (`gemv`: w4a16_gemv_q4_k's signature; the weights as uploaded: Q6_K in planes) against the CPU
// reference on `type` weights: 1, 37 and 4099 outputs, each of `ks`, 1, 5 and 32 rows. The GEMV holds each
// weight in fp32 as the CPU dequantizes it, so the bound is only the fp32 sums' and fp16 activations'.
template <typename GgufGemv>
void expect_gguf_gemv_matches(k::DType type, GgufGemv gemv, std::initializer_list<int64_t> ks,
                              uint32_t seed) {
  std::mt19937 rng(seed);
  for (const int64_t n_out : {int64_t{1}, int64_t{37}, int64_t{4099}}) {
    for (const int64_t kk : ks) {
      std::vector<uint8_t> wq;
      std::vector<float> wf;
      ASSERT_NO_FATAL_FAILURE(random_quantized(type, n_out, kk, rng, wq, wf));
      DeviceBuffer<uint8_t> dw(nibble::cuda_test::as_uploaded(type, n_out, kk, wq));
      ASSERT_NE(dw.ptr, nullptr);
      for (const int64_t m : {int64_t{1}, int64_t{5}, int64_t{32}}) {
        expect_matches_reference(wf, n_out, kk, m, 1e-3, rng, [&](const __half* x, int64_t mm, float* y) {
          return gemv(dw.ptr, n_out, kk, x, mm, y, nullptr, false);
        });
      }
    }
  }
}

// GGUF Q4_K read as stored: two super-blocks' worth of odd row counts, and a long row (k = 4352,
// 17 super-blocks), so every sub-block's 6-bit scale and min unpacking and both nibble halves are used.
TEST(CudaW4A16Gemv, Q4KMatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  ASSERT_NO_FATAL_FAILURE(expect_gguf_gemv_matches(k::DType::Q4_K, k::cuda::w4a16_gemv_q4_k,
                                                   {int64_t{256}, int64_t{512}, int64_t{4352}}, 99));
  DeviceBuffer<uint8_t> dw(static_cast<size_t>(2 * 144 + 16));
  DeviceBuffer<k::f16_bits> dx(512);
  DeviceBuffer<float> dy(2);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  EXPECT_EQ(k::cuda::w4a16_gemv_q4_k(dw.ptr, 1, 288, x, 1, dy.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::w4a16_gemv_q4_k(dw.ptr + 2, 1, 256, x, 1, dy.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// GGUF Q8_0 read as stored: rows 34 bytes a block apart (2-byte aligned), odd block counts.
TEST(CudaW4A16Gemv, Q8_0MatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  ASSERT_NO_FATAL_FAILURE(expect_gguf_gemv_matches(k::DType::Q8_0, k::cuda::w4a16_gemv_q8_0,
                                                   {int64_t{32}, int64_t{96}, int64_t{4128}}, 103));
  DeviceBuffer<uint8_t> dw(static_cast<size_t>(2 * 34 + 16));
  DeviceBuffer<k::f16_bits> dx(64);
  DeviceBuffer<float> dy(2);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  EXPECT_EQ(k::cuda::w4a16_gemv_q8_0(dw.ptr, 1, 48, x, 1, dy.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::w4a16_gemv_q8_0(dw.ptr + 1, 1, 32, x, 1, dy.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// The other GGUF types read as stored (w4a16_gemv_gguf_blocks: Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q5_K,
// IQ4_XS, and the read-only IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, TQ1_0, TQ2_0, MXFP4 as
// random valid blocks): 1, 3 and 17 blocks a row (5 for the read-only ones, to keep the double-precision
// reference short; 2-byte aligned rows for most, byte-aligned for MXFP4), each weight the CPU's; a
// misaligned matrix, a partial block and a type without a reader refused.
TEST(CudaW4A16Gemv, OtherGgufTypesMatchCpuReferenceAsStored) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  uint32_t seed = 200;
  for (const k::DType type : k::cuda::kW4A16GgufBlockTypes) {
    SCOPED_TRACE(k::type_name(type));
    ASSERT_TRUE(k::cuda::w4a16_reads_gguf_blocks(type));
    const int64_t block = k::type_info(type).block_elems;
    const auto gemv = [type](const uint8_t* w, int64_t n_out, int64_t kk, const __half* x, int64_t m,
                             float* y, cudaStream_t stream, bool programmatic) {
      return k::cuda::w4a16_gemv_gguf_blocks(type, w, n_out, kk, x, m, y, stream, programmatic);
    };
    const int64_t long_row = (k::is_read_only_type(type) ? 5 : 17) * block;
    ASSERT_NO_FATAL_FAILURE(expect_gguf_gemv_matches(type, gemv, {block, 3 * block, long_row}, seed++));
    DeviceBuffer<uint8_t> dw(static_cast<size_t>(2 * k::type_info(type).block_bytes + 16));
    DeviceBuffer<k::f16_bits> dx(static_cast<size_t>(2 * block));
    DeviceBuffer<float> dy(2);
    const auto* x = reinterpret_cast<const __half*>(dx.ptr);
    EXPECT_EQ(k::cuda::w4a16_gemv_gguf_blocks(type, dw.ptr, 1, block + 32, x, 1, dy.ptr, nullptr),
              block == 32 ? k::Status::ok : k::Status::invalid_argument);  // 64 is two Q4_1 blocks
    EXPECT_EQ(k::cuda::w4a16_gemv_gguf_blocks(type, dw.ptr + 1, 1, block, x, 1, dy.ptr, nullptr),
              k::type_info(type).block_bytes % 2 == 0 ? k::Status::invalid_argument : k::Status::ok);
    EXPECT_EQ(k::cuda::w4a16_gemv_gguf_blocks(type, dw.ptr, 1, block, x, 33, dy.ptr, nullptr),
              k::Status::invalid_argument);
  }
  EXPECT_FALSE(k::cuda::w4a16_reads_gguf_blocks(k::DType::Q4_K));
  DeviceBuffer<uint8_t> dw(512);
  DeviceBuffer<k::f16_bits> dx(256);
  DeviceBuffer<float> dy(1);
  EXPECT_EQ(k::cuda::w4a16_gemv_gguf_blocks(k::DType::F16, dw.ptr, 1, 256,
                                            reinterpret_cast<const __half*>(dx.ptr), 1, dy.ptr, nullptr),
            k::Status::unsupported_type);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// GGUF Q6_K in planes (kernels/q6_k_planes.hpp): odd super-block counts, every run of both halves; the
// GEMV holds each weight in fp32, so the bound is the Q4_K one.
TEST(CudaW4A16Gemv, Q6KMatchesCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  ASSERT_NO_FATAL_FAILURE(expect_gguf_gemv_matches(k::DType::Q6_K, k::cuda::w4a16_gemv_q6_k,
                                                   {int64_t{256}, int64_t{768}, int64_t{4352}}, 101));
  DeviceBuffer<uint8_t> dw(static_cast<size_t>(2 * 210 + 16));
  DeviceBuffer<k::f16_bits> dx(512);
  DeviceBuffer<float> dy(2);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  EXPECT_EQ(k::cuda::w4a16_gemv_q6_k(dw.ptr, 1, 288, x, 1, dy.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::w4a16_gemv_q6_k(dw.ptr + 2, 1, 256, x, 1, dy.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::w4a16_gemv_q6_k(dw.ptr, 1, 256, x, 33, dy.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// Q4_K as stored on the tensor-core GEMV's three row shapes (w4a16_gemv_q4_k_mma, _32rows,
// w4a16_gemm_q4_k_mma_64rows). Error bound: each sub-block's scale and min are rounded to fp16
// (2^-12 relative each) and each weight once more (2^-11), the products are exact and summed in fp32:
// per weight at most 2^-12 (|scale * q| + |min|) + 2^-11 |w|, and |scale * q| + |min| stays within
// a few |w| on these rows (mins are at most the row's offset plus a few scales), so below about 2e-3
// of sum|x * w| even if every rounding had one sign; checked against 3e-3. Shapes: one super-block,
// two, and 17 (split over a cluster on few outputs); outputs around the 128-output tile; m across each
// shape's range, and three slabs of 64 (130 rows) for the GEMM; then bits: a row alone equals that
// row in a batch, and the argument checks.
TEST(CudaW4A16Gemv, Q4KTensorCoreKernelsMatchCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  using Q4KMma =
      k::Status (*)(const uint8_t*, int64_t, int64_t, const __half*, int64_t, float*, cudaStream_t, bool);
  const struct {
    const char* name;
    Q4KMma gemv;
    std::vector<int64_t> ms;
  } variants[] = {
      {"one m16 tile", k::cuda::w4a16_gemv_q4_k_mma, {1, 3, 16}},
      {"32 rows", k::cuda::w4a16_gemv_q4_k_mma_32rows, {1, 17, 32}},
      {"64-row slabs", k::cuda::w4a16_gemm_q4_k_mma_64rows, {1, 40, 130}},
  };
  std::mt19937 rng(101);
  for (const auto& [name, gemv, ms] : variants) {
    for (const int64_t n_out : {int64_t{1}, int64_t{130}, int64_t{4099}}) {
      for (const int64_t kk : {int64_t{256}, int64_t{512}, int64_t{4352}}) {
        SCOPED_TRACE(name);
        std::vector<uint8_t> wq;
        std::vector<float> wf;
        ASSERT_NO_FATAL_FAILURE(random_quantized(k::DType::Q4_K, n_out, kk, rng, wq, wf));
        DeviceBuffer<uint8_t> dw(wq);
        ASSERT_NE(dw.ptr, nullptr);
        const bool large = n_out * kk > 1000000;
        for (const int64_t m : ms) {
          if (large && m > 64) continue;  // the host reference is m * n_out * k
          expect_matches_reference(wf, n_out, kk, m, 3e-3, rng, [&](const __half* x, int64_t mm, float* y) {
            return gemv(dw.ptr, n_out, kk, x, mm, y, nullptr, false);
          });
        }
        if (kk != 4352 || n_out != 130) continue;
        // A row's bits do not depend on the rows around it: the last row of the most rows, alone.
        const int64_t m = ms.back();
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::vector<k::f16_bits> xh(static_cast<size_t>(m * kk));
        for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
        DeviceBuffer<k::f16_bits> dx(xh);
        DeviceBuffer<float> dy(static_cast<size_t>(m * n_out)), dlast(static_cast<size_t>(n_out));
        ASSERT_TRUE(dx.ptr && dy.ptr && dlast.ptr);
        const auto* x = reinterpret_cast<const __half*>(dx.ptr);
        ASSERT_EQ(gemv(dw.ptr, n_out, kk, x, m, dy.ptr, nullptr, false), k::Status::ok);
        ASSERT_EQ(gemv(dw.ptr, n_out, kk, x + (m - 1) * kk, 1, dlast.ptr, nullptr, false), k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<float> y = dy.to_host(), last = dlast.to_host();
        EXPECT_EQ(std::memcmp(y.data() + (m - 1) * n_out, last.data(), last.size() * sizeof(float)), 0);
        // Refused: k not a multiple of 256, misaligned blocks, no rows, too many rows for the shape.
        EXPECT_EQ(gemv(dw.ptr, n_out, 288, x, 1, dy.ptr, nullptr, false), k::Status::invalid_argument);
        EXPECT_EQ(gemv(dw.ptr + 8, n_out, kk, x, 1, dy.ptr, nullptr, false), k::Status::invalid_argument);
        EXPECT_EQ(gemv(dw.ptr, n_out, kk, x, 0, dy.ptr, nullptr, false), k::Status::invalid_argument);
        if (m <= 32) {
          EXPECT_EQ(gemv(dw.ptr, n_out, kk, x, m + 1, dy.ptr, nullptr, false), k::Status::invalid_argument);
        }
        EXPECT_EQ(cudaGetLastError(), cudaSuccess);
      }
    }
  }
}

// Group-wise INT4 with asymmetric zeros, as GPTQ / AWQ checkpoints load (model/hf_quantized.hpp):
// Q8_0 blocks of "level minus zero" with one scale per group, converted by int4_groups_from_blocks.
TEST(CudaW4A16Gemv, Int4GroupsMatchCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(7);
  for (const int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}}) {
    for (const int64_t n_out : {int64_t{1}, int64_t{37}, int64_t{4099}}) {
      for (const int64_t kk : {int64_t{128}, int64_t{384}, int64_t{4224}}) {
        DeviceInt4Groups weights;
        ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, weights));
        const std::vector<float>& wf = weights.wf;
        uint8_t* const dq = weights.quants->ptr;
        const uint8_t* const dz = weights.zeros->ptr;
        const __half* const sp = weights.scales_half();
        for (const int64_t m : {int64_t{1}, int64_t{7}, int64_t{32}}) {
          expect_matches_reference(wf, n_out, kk, m, 1e-3, rng, [&](const __half* x, int64_t mm, float* y) {
            return k::cuda::w4a16_gemv_int4_groups(dq, sp, dz, group, n_out, kk, x, mm, y, nullptr);
          });
        }
        // The staged GEMV (one activation row): 4224 inputs are a full 4096-input chunk and a partial one.
        expect_matches_reference(wf, n_out, kk, 1, 1e-3, rng, [&](const __half* x, int64_t mm, float* y) {
          return k::cuda::w4a16_gemv_int4_groups_staged(dq, sp, dz, group, n_out, kk, x, mm, y, nullptr);
        });
        if (n_out == 37 &&
            kk == 384) {  // group 128 does not divide 96 inputs; misaligned quants; a null zero
          DeviceBuffer<float> dy(static_cast<size_t>(n_out));
          DeviceBuffer<k::f16_bits> dx(static_cast<size_t>(kk));
          const auto* x = reinterpret_cast<const __half*>(dx.ptr);
          EXPECT_EQ(k::cuda::w4a16_gemv_int4_groups(dq, sp, dz, 128, n_out, 96, x, 1, dy.ptr, nullptr),
                    k::Status::invalid_argument);
          EXPECT_EQ(k::cuda::w4a16_gemv_int4_groups(dq, sp, dz, 48, n_out, kk, x, 1, dy.ptr, nullptr),
                    k::Status::invalid_argument);
          EXPECT_EQ(k::cuda::w4a16_gemv_int4_groups(dq + 8, sp, dz, group, n_out, kk, x, 1, dy.ptr, nullptr),
                    k::Status::invalid_argument);
          EXPECT_EQ(k::cuda::w4a16_gemv_int4_groups(dq, sp, nullptr, group, n_out, kk, x, 1, dy.ptr, nullptr),
                    k::Status::invalid_argument);
          EXPECT_EQ(
              k::cuda::w4a16_gemv_int4_groups_staged(dq, sp, dz, group, n_out, kk, x, 2, dy.ptr, nullptr),
              k::Status::invalid_argument)
              << "the staged GEMV takes one activation row";
          EXPECT_EQ(
              k::cuda::w4a16_gemv_int4_groups_staged(dq, sp, dz, group, n_out, kk, x + 1, 1, dy.ptr, nullptr),
              k::Status::invalid_argument)
              << "misaligned activations";
          EXPECT_EQ(cudaGetLastError(), cudaSuccess);
        }
      }
    }
  }
  // The staged GEMV on a row of three full chunks and a partial fourth (12416 inputs): the third chunk
  // is staged into the first chunk's buffer again, the reuse its one barrier a chunk is about.
  for (const int64_t group : {int64_t{32}, int64_t{128}}) {
    const int64_t n_out = 37, kk = 12416;
    SCOPED_TRACE("staged, group " + std::to_string(group) + ", k " + std::to_string(kk));
    DeviceInt4Groups weights;
    ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, weights));
    expect_matches_reference(weights.wf, n_out, kk, 1, 1e-3, rng, [&](const __half* x, int64_t mm, float* y) {
      return k::cuda::w4a16_gemv_int4_groups_staged(weights.quants->ptr, weights.scales_half(),
                                                    weights.zeros->ptr, group, n_out, kk, x, mm, y, nullptr);
    });
  }
}

// The tensor-core GEMV (w4a16_gemv_int4_groups_mma) on the same kind of weights. Its error bound is the
// mma GEMM's (test_cuda_w4a16_gemm.cpp): each weight rounded once to fp16 (at most 2^-11 relative),
// exact fp16 products, fp32 sums; below about 1e-3 of Σ|x · w| for k = 4224, checked against 2e-3.
// Shapes: a single output, outputs around the 128-output tile (37, 130) and many tiles (4099); one
// 32-input unit, a partial 256-input stage (192), and 16.5 stages (4224, split across a cluster on
// small n_out); m from 1 to the 16-row tile.
// The tensor-core GEMV's shapes (w4a16_gemv_mma.cuh): 256 threads, 512 threads, 2 blocks an SM (one
// m16 tile), two m16 tiles, and the GEMM of 64-row slabs; with the row counts each is tested at
// (the GEMM's 130: three slabs, the last of two rows).
using MmaGemv = k::Status (*)(const uint8_t*, const __half*, const uint8_t*, int64_t, int64_t, int64_t,
                              const __half*, int64_t, float*, cudaStream_t, bool);
struct MmaGemvVariant {
  const char* name;
  MmaGemv gemv;
  std::vector<int64_t> ms;  // ascending; the last is the most rows tested
};
const MmaGemvVariant kMmaGemvs[] = {
    {"256 threads", k::cuda::w4a16_gemv_int4_groups_mma, {1, 3, 8, 16}},
    {"512 threads", k::cuda::w4a16_gemv_int4_groups_mma_512, {1, 3, 8, 16}},
    {"2 blocks an SM", k::cuda::w4a16_gemv_int4_groups_mma_2bps, {1, 3, 8, 16}},
    {"32 rows", k::cuda::w4a16_gemv_int4_groups_mma_32rows, {1, 5, 17, 32}},
    {"64-row slabs", k::cuda::w4a16_gemm_int4_groups_mma_64rows, {1, 17, 64, 130}},
};

TEST(CudaW4A16Gemv, Int4GroupsMmaMatchCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(31);
  for (const auto& [variant, gemv, ms] : kMmaGemvs)
    for (const int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}}) {
      for (const int64_t n_out : {int64_t{1}, int64_t{37}, int64_t{130}, int64_t{4099}}) {
        for (const int64_t kk : {int64_t{32}, int64_t{192}, int64_t{4224}}) {
          if (kk % group != 0) continue;
          SCOPED_TRACE(std::string(variant) + ", group " + std::to_string(group));
          DeviceInt4Groups weights;
          ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, weights));
          const std::vector<float>& wf = weights.wf;
          uint8_t* const dq = weights.quants->ptr;
          const uint8_t* const dz = weights.zeros->ptr;
          const __half* const sp = weights.scales_half();
          // The largest shape only at 1 and the most rows up to 64: the host reference is m · n_out · k.
          const bool large = n_out * kk > 1000000;
          const int64_t large_m = ms.back() <= 64 ? ms.back() : ms[ms.size() - 2];
          for (const int64_t m : ms) {
            if (large && m != 1 && m != large_m) continue;
            expect_matches_reference(wf, n_out, kk, m, 2e-3, rng, [&](const __half* x, int64_t mm, float* y) {
              return gemv(dq, sp, dz, group, n_out, kk, x, mm, y, nullptr, false);
            });
          }
        }
      }
    }
}

// Bit-for-bit: two calls give the same y (fixed-order sums, no atomics), and a row's outputs do not
// depend on the other rows (the most rows tested and m = 1 agree on the first row, and on the last
// row: the 64-row GEMM's last slab), on a shape whose inputs are split over a cluster (few outputs,
// long rows) and on one that is not. Then the argument checks.
TEST(CudaW4A16Gemv, Int4GroupsMmaIsReproducibleAndChecksArguments) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(37);
  const int64_t group = 128;
  for (const auto& [variant, gemv, ms] : kMmaGemvs)
    for (const int64_t n_out : {int64_t{130}, int64_t{4099}}) {
      SCOPED_TRACE(std::string(variant) + ", n_out " + std::to_string(n_out));
      const int64_t kk = 4224, m = ms.back();
      DeviceInt4Groups weights;
      ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, weights));
      const uint8_t* const dq = weights.quants->ptr;
      const uint8_t* const dz = weights.zeros->ptr;
      const __half* const sp = weights.scales_half();
      std::normal_distribution<float> normal(0.0f, 1.0f);
      std::vector<k::f16_bits> xh(static_cast<size_t>(m * kk));
      for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
      DeviceBuffer<k::f16_bits> dx(xh);
      DeviceBuffer<float> dy1(static_cast<size_t>(m * n_out)), dy2(static_cast<size_t>(m * n_out)),
          dy_row(static_cast<size_t>(n_out)), dy_last(static_cast<size_t>(n_out));
      ASSERT_TRUE(dx.ptr && dy1.ptr && dy2.ptr && dy_row.ptr && dy_last.ptr);
      const auto* x = reinterpret_cast<const __half*>(dx.ptr);
      ASSERT_EQ(gemv(dq, sp, dz, group, n_out, kk, x, m, dy1.ptr, nullptr, false), k::Status::ok);
      ASSERT_EQ(gemv(dq, sp, dz, group, n_out, kk, x, m, dy2.ptr, nullptr, false), k::Status::ok);
      ASSERT_EQ(gemv(dq, sp, dz, group, n_out, kk, x, 1, dy_row.ptr, nullptr, false), k::Status::ok);
      ASSERT_EQ(gemv(dq, sp, dz, group, n_out, kk, x + (m - 1) * kk, 1, dy_last.ptr, nullptr, false),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> y1 = dy1.to_host(), y2 = dy2.to_host(), y_row = dy_row.to_host(),
                               y_last = dy_last.to_host();
      ASSERT_EQ(y1.size(), y2.size());
      ASSERT_EQ(y_row.size(), static_cast<size_t>(n_out));
      ASSERT_EQ(y_last.size(), static_cast<size_t>(n_out));
      EXPECT_EQ(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)), 0) << "two calls differ";
      EXPECT_EQ(std::memcmp(y1.data(), y_row.data(), y_row.size() * sizeof(float)), 0)
          << "row 0 depends on m";
      EXPECT_EQ(std::memcmp(y1.data() + (m - 1) * n_out, y_last.data(), y_last.size() * sizeof(float)), 0)
          << "row " << m - 1 << " depends on the rows before it";
    }

  const int64_t n_out = 37, kk = 192;
  DeviceBuffer<uint8_t> dq(static_cast<size_t>(n_out * kk / 2)), dz(static_cast<size_t>(n_out * kk / 32));
  DeviceBuffer<uint16_t> ds(static_cast<size_t>(n_out * kk / 32));
  DeviceBuffer<k::f16_bits> dx(static_cast<size_t>(17 * kk + 8));
  DeviceBuffer<float> dy(static_cast<size_t>(17 * n_out));
  ASSERT_TRUE(dq.ptr && dz.ptr && ds.ptr && dx.ptr && dy.ptr);
  const auto* sp = reinterpret_cast<const __half*>(ds.ptr);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  const auto call = [&](int64_t group_size, int64_t kdim, const __half* xp, int64_t m, float* y) {
    return k::cuda::w4a16_gemv_int4_groups_mma(dq.ptr, sp, dz.ptr, group_size, n_out, kdim, xp, m, y,
                                               nullptr);
  };
  EXPECT_EQ(call(32, kk, x, 17, dy.ptr), k::Status::invalid_argument);  // more rows than the m16 tile
  EXPECT_EQ(
      k::cuda::w4a16_gemv_int4_groups_mma_32rows(dq.ptr, sp, dz.ptr, 32, n_out, kk, x, 33, dy.ptr, nullptr),
      k::Status::invalid_argument);  // more rows than two m16 tiles
  EXPECT_EQ(
      k::cuda::w4a16_gemm_int4_groups_mma_64rows(dq.ptr, sp, dz.ptr, 32, n_out, kk, x, 0, dy.ptr, nullptr),
      k::Status::invalid_argument);
  EXPECT_EQ(call(32, kk, x, 0, dy.ptr), k::Status::invalid_argument);
  EXPECT_EQ(call(32, kk, reinterpret_cast<const __half*>(dx.ptr + 4), 1, dy.ptr),
            k::Status::invalid_argument);                               // x 8-byte but not 16-byte aligned
  EXPECT_EQ(call(128, kk, x, 1, dy.ptr), k::Status::invalid_argument);  // group 128 does not divide 192
  EXPECT_EQ(call(48, kk, x, 1, dy.ptr), k::Status::invalid_argument);
  EXPECT_EQ(call(32, kk, x, 1, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::w4a16_gemv_int4_groups_mma(dq.ptr + 8, sp, dz.ptr, 32, n_out, kk, x, 1, dy.ptr, nullptr),
            k::Status::invalid_argument);      // quants not 16-byte aligned
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // nothing was launched
  // No outputs: nothing to do; no inputs: zeros.
  EXPECT_EQ(k::cuda::w4a16_gemv_int4_groups_mma(dq.ptr, sp, dz.ptr, 32, 0, kk, x, 1, dy.ptr, nullptr),
            k::Status::ok);
  ASSERT_EQ(cudaMemset(dy.ptr, 0xff, static_cast<size_t>(3 * n_out) * sizeof(float)), cudaSuccess);
  EXPECT_EQ(call(32, 0, x, 3, dy.ptr), k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> y = dy.to_host();
  ASSERT_EQ(y.size(), static_cast<size_t>(17 * n_out));
  for (int64_t i = 0; i < 3 * n_out; ++i) ASSERT_EQ(y[static_cast<size_t>(i)], 0.0f) << "output " << i;
}

// The benchmark's probes of the tensor-core GEMV (w4a16_gemv_int4_groups_mma_probe): `whole` is the
// kernel itself, bit for bit; `loads_only` computes nothing, so every output is 0 (a probe that still
// multiplied would not time the loads alone); `compute_only` runs; bad arguments are refused as the
// kernel refuses them.
TEST(CudaW4A16Gemv, TensorCoreGemvProbesAreTheKernelAndItsParts) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(41);
  const int64_t n_out = 300, kk = 4224, group = 128, m = 5;
  DeviceInt4Groups weights;
  ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, weights));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<k::f16_bits> xh(static_cast<size_t>(m * kk));
  for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
  DeviceBuffer<k::f16_bits> dx(xh);
  DeviceBuffer<float> dy(static_cast<size_t>(m * n_out)), dprobe(static_cast<size_t>(m * n_out));
  ASSERT_TRUE(dx.ptr && dy.ptr && dprobe.ptr);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  const auto probe = [&](k::cuda::GemvMmaProbe which, int64_t rows, float* y) {
    return k::cuda::w4a16_gemv_int4_groups_mma_probe(which, weights.quants->ptr, weights.scales_half(),
                                                     weights.zeros->ptr, group, n_out, kk, x, rows, y,
                                                     nullptr);
  };
  ASSERT_EQ(k::cuda::w4a16_gemv_int4_groups_mma(weights.quants->ptr, weights.scales_half(),
                                                weights.zeros->ptr, group, n_out, kk, x, m, dy.ptr, nullptr),
            k::Status::ok);
  ASSERT_EQ(probe(k::cuda::GemvMmaProbe::whole, m, dprobe.ptr), k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> y = dy.to_host(), whole = dprobe.to_host();
  EXPECT_EQ(std::memcmp(y.data(), whole.data(), y.size() * sizeof(float)), 0);
  ASSERT_EQ(cudaMemset(dprobe.ptr, 0xff, dprobe.count * sizeof(float)), cudaSuccess);
  ASSERT_EQ(probe(k::cuda::GemvMmaProbe::loads_only, m, dprobe.ptr), k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (const float v : dprobe.to_host()) ASSERT_EQ(v, 0.0f);
  ASSERT_EQ(probe(k::cuda::GemvMmaProbe::compute_only, m, dprobe.ptr), k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(probe(k::cuda::GemvMmaProbe::loads_only, 17, dprobe.ptr), k::Status::invalid_argument);
  EXPECT_EQ(probe(k::cuda::GemvMmaProbe::compute_only, 0, dprobe.ptr), k::Status::invalid_argument);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
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

// Group-wise INT4 made from Q4_0 blocks (zero 8) loads the very weights the Q4_0 kernels load, and
// runs the same arithmetic: outputs equal the GGUF-layout kernel's bit for bit, at group 32 (any
// GGUF Q4_0) and at group 128 (symmetric GPTQ: four blocks sharing a scale). A wrong group index
// or zero would differ at once.
TEST(CudaW4A16Gemv, Int4GroupsOfQ4_0EqualQ4_0BitForBit) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.001f, 0.02f);
  const int64_t n_out = 1001, kk = 4224;
  for (const int64_t group : {int64_t{32}, int64_t{128}}) {
    SCOPED_TRACE("group " + std::to_string(group));
    std::vector<k::BlockQ4_0> blocks(static_cast<size_t>(n_out * kk / 32));
    for (size_t b = 0; b < blocks.size(); ++b) {
      blocks[b].d = b % static_cast<size_t>(group / 32) == 0 ? k::fp32_to_fp16(scale(rng)) : blocks[b - 1].d;
      for (auto& q : blocks[b].qs) q = static_cast<uint8_t>(byte(rng));
    }
    ASSERT_EQ(k::int4_group_size(k::DType::Q4_0, blocks.data(), n_out, kk), group == 32 ? 32 : 128);
    std::vector<uint8_t> quants(static_cast<size_t>(n_out * kk / 2)),
        zeros(static_cast<size_t>(n_out * kk / group));
    std::vector<uint16_t> scales(zeros.size());
    ASSERT_EQ(k::int4_groups_from_blocks(k::DType::Q4_0, blocks.data(), n_out, kk, group, quants.data(),
                                         scales.data(), zeros.data()),
              k::Status::ok);
    std::vector<uint8_t> raw(blocks.size() * sizeof(k::BlockQ4_0));
    std::memcpy(raw.data(), blocks.data(), raw.size());
    DeviceBuffer<uint8_t> dw(raw), dq(quants), dz(zeros);
    DeviceBuffer<uint16_t> ds(scales);
    ASSERT_TRUE(dw.ptr && dq.ptr && dz.ptr && ds.ptr);
    for (const int64_t m : {int64_t{1}, int64_t{9}, int64_t{32}}) {
      std::vector<k::f16_bits> xh(static_cast<size_t>(m * kk));
      std::normal_distribution<float> normal(0.0f, 1.0f);
      for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
      DeviceBuffer<k::f16_bits> dx(xh);
      DeviceBuffer<float> dy(static_cast<size_t>(m * n_out)), dy_groups(static_cast<size_t>(m * n_out));
      ASSERT_TRUE(dx.ptr && dy.ptr && dy_groups.ptr);
      const auto* x = reinterpret_cast<const __half*>(dx.ptr);
      ASSERT_EQ(k::cuda::w4a16_gemv_q4_0(dw.ptr, n_out, kk, x, m, dy.ptr, nullptr), k::Status::ok);
      ASSERT_EQ(k::cuda::w4a16_gemv_int4_groups(dq.ptr, reinterpret_cast<const __half*>(ds.ptr), dz.ptr,
                                                group, n_out, kk, x, m, dy_groups.ptr, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> y = dy.to_host(), y_groups = dy_groups.to_host();
      ASSERT_EQ(y.size(), y_groups.size());
      for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(y_groups[i], y[i]) << "m=" << m << " output " << i;
    }
  }
}
