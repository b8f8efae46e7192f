// Group-wise INT4 through dequantized fp16 chunks and cuBLAS (kernels/cuda/w4a16_dequant_cublas):
// the dequantized rows against the CPU's dequantization rounded to fp16 (bit for bit), and the product
// against a double-precision reference on odd shapes, for one chunk and for many (a scratch of 300
// rows gives chunks of 256; one of 50 rows chunks of 50). The chunking rule and the argument checks
// run everywhere; the rest skips without a CUDA device.
#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/w4a16_dequant_cublas.cuh"
#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/quant_types.hpp"
#include "tests/cuda/w4a16_test_util.hpp"

namespace {

namespace kc = nibble::kernels::cuda;
namespace k = nibble::kernels;
namespace ct = nibble::cuda_test;
using k::Status;

TEST(W4A16DequantCublas, ChunkRows) {
  const int64_t kk = 1536;
  EXPECT_EQ(kc::int4_cublas_chunk_rows({nullptr, nullptr, 300 * kk}, 1000, kk), 256);  // a multiple of 128
  EXPECT_EQ(kc::int4_cublas_chunk_rows({nullptr, nullptr, 300 * kk + kk - 1}, 1000, kk), 256);
  EXPECT_EQ(kc::int4_cublas_chunk_rows({nullptr, nullptr, 50 * kk}, 1000, kk),
            50);  // under 128: as many as fit
  EXPECT_EQ(kc::int4_cublas_chunk_rows({nullptr, nullptr, 300 * kk}, 77, kk), 77);  // the whole matrix
  EXPECT_EQ(kc::int4_cublas_chunk_rows({nullptr, nullptr, kk - 1}, 1000, kk), 0);   // not one row
  EXPECT_EQ(kc::int4_cublas_chunk_rows({nullptr, nullptr, kk}, 1000, 0), 0);
}

TEST(W4A16DequantCublas, RejectsBadArgumentsBeforeTouchingTheDevice) {
  std::vector<uint8_t> host(64);  // stand-ins: nothing is dereferenced before the checks fail
  const auto* q = reinterpret_cast<const uint8_t*>((reinterpret_cast<uintptr_t>(host.data()) + 15) / 16 * 16);
  const auto* s = reinterpret_cast<const __half*>(q);
  const auto* x = reinterpret_cast<const __half*>(q);
  auto* y = reinterpret_cast<float*>(host.data());
  auto* out = reinterpret_cast<__half*>(const_cast<uint8_t*>(q));
  const kc::Int4CublasContext none{};
  EXPECT_EQ(kc::w4a16_int4_groups_dequant_cublas(none, q, s, q, 128, 256, 256, x, 32, y, nullptr),
            Status::invalid_argument);  // no handle, no scratch
  EXPECT_EQ(kc::dequantize_int4_groups_f16(q, s, q, 96, 256, 288, 0, 1, out, nullptr),
            Status::invalid_argument);  // group
  EXPECT_EQ(kc::dequantize_int4_groups_f16(q, s, q, 128, 256, 320, 0, 1, out, nullptr),
            Status::invalid_argument);  // k % group
  EXPECT_EQ(kc::dequantize_int4_groups_f16(q, s, q, 128, 256, 256, 250, 7, out, nullptr),
            Status::invalid_argument);  // rows past n_out
  EXPECT_EQ(kc::dequantize_int4_groups_f16(q + 1, s, q, 128, 256, 256, 0, 1, out, nullptr),
            Status::invalid_argument);  // misaligned nibbles
  EXPECT_EQ(kc::dequantize_int4_groups_f16(q, s, q, 128, 256, 256, 0, 0, out, nullptr),
            Status::ok);  // nothing
}

TEST(W4A16DequantCublas, DequantizesRowsAsTheCpuRoundsThemToFp16) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(5);
  for (const int64_t group : {32, 64, 128}) {
    const int64_t n_out = 77, kk = 384;
    SCOPED_TRACE("group " + std::to_string(group));
    ct::DeviceInt4Groups w;
    ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(n_out, kk, group, rng, w));
    for (const auto& [begin, rows] : {std::pair<int64_t, int64_t>{0, n_out}, {5, 40}, {76, 1}}) {
      SCOPED_TRACE("rows " + std::to_string(begin) + " + " + std::to_string(rows));
      ct::DeviceBuffer<uint16_t> out(static_cast<size_t>(rows * kk));
      ASSERT_NE(out.ptr, nullptr);
      ASSERT_EQ(kc::dequantize_int4_groups_f16(w.quants->ptr, w.scales_half(), w.zeros->ptr, group, n_out, kk,
                                               begin, rows, reinterpret_cast<__half*>(out.ptr), nullptr),
                Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<uint16_t> got = out.to_host();
      int bad = 0;
      for (int64_t i = 0; i < rows * kk; ++i) {
        const uint16_t want = k::fp32_to_fp16(w.wf[static_cast<size_t>(begin * kk + i)]);
        if (got[static_cast<size_t>(i)] != want && ++bad <= 5)
          ADD_FAILURE() << "weight " << i / kk << ", " << i % kk << ": " << got[static_cast<size_t>(i)]
                        << " want " << want;
      }
      EXPECT_EQ(bad, 0);
    }
  }
}

// Bound 2e-3 of Σ|x · w|, as the tensor-core INT4 kernels' (the same fp16 weights, fp32 sums).
TEST(W4A16DequantCublas, MatchesTheReferenceInOneChunkAndInMany) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  cublasHandle_t cublas = nullptr;
  ASSERT_EQ(cublasCreate(&cublas), CUBLAS_STATUS_SUCCESS);
  std::mt19937 rng(11);
  struct Case {
    int64_t n_out, k, group;
  };
  for (const Case c : {Case{1000, 1536, 128}, Case{333, 256, 32}}) {
    ct::DeviceInt4Groups w;
    ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(c.n_out, c.k, c.group, rng, w));
    for (const int64_t scratch_rows : {c.n_out, int64_t{300}, int64_t{50}}) {
      ct::DeviceBuffer<uint16_t> scratch(static_cast<size_t>(scratch_rows * c.k));
      ASSERT_NE(scratch.ptr, nullptr);
      const kc::Int4CublasContext context{cublas, reinterpret_cast<__half*>(scratch.ptr), scratch_rows * c.k};
      for (const int64_t m : {1, 17, 33, 100}) {
        SCOPED_TRACE("scratch rows " + std::to_string(scratch_rows));
        ct::expect_matches_reference(
            w.wf, c.n_out, c.k, m, 2e-3, rng, [&](const __half* x, int64_t mm, float* y) {
              return kc::w4a16_int4_groups_dequant_cublas(context, w.quants->ptr, w.scales_half(),
                                                          w.zeros->ptr, c.group, c.n_out, c.k, x, mm, y,
                                                          nullptr);
            });
      }
    }
  }
  // A scratch smaller than one row.
  ct::DeviceBuffer<uint16_t> small(64);
  ct::DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(8, 256, 128, rng, w));
  ct::DeviceBuffer<uint16_t> x(256);
  ct::DeviceBuffer<float> y(8);
  EXPECT_EQ(kc::w4a16_int4_groups_dequant_cublas({cublas, reinterpret_cast<__half*>(small.ptr), 64},
                                                 w.quants->ptr, w.scales_half(), w.zeros->ptr, 128, 8, 256,
                                                 reinterpret_cast<const __half*>(x.ptr), 1, y.ptr, nullptr),
            Status::invalid_argument);
  cublasDestroy(cublas);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// GGUF blocks of `type` (as the model uploads them: Q6_K in planes) through `call`'s chunks: the CPU's
// weights rounded to fp16, then cuBLAS; one chunk and several; refused arguments before anything runs
// (a misaligned matrix, k not whole blocks, no cuBLAS).
using DequantCublas = std::function<Status(const kc::Int4CublasContext&, const uint8_t*, int64_t, int64_t,
                                           const __half*, int64_t, float*, cudaStream_t)>;
void expect_blocks_dequant_cublas_match(cublasHandle_t cublas, k::DType type, const DequantCublas& call,
                                        std::mt19937& rng) {
  const int64_t n_out = 333, kk = 768;
  SCOPED_TRACE(k::type_name(type));
  std::vector<uint8_t> wq;
  std::vector<float> wf;
  ASSERT_NO_FATAL_FAILURE(ct::random_quantized(type, n_out, kk, rng, wq, wf));
  ct::DeviceBuffer<uint8_t> dw(ct::as_uploaded(type, n_out, kk, wq));
  ASSERT_NE(dw.ptr, nullptr);
  for (const int64_t scratch_rows : {n_out, int64_t{50}}) {
    SCOPED_TRACE("scratch rows " + std::to_string(scratch_rows));
    ct::DeviceBuffer<uint16_t> scratch(static_cast<size_t>(scratch_rows * kk));
    ASSERT_NE(scratch.ptr, nullptr);
    const kc::Int4CublasContext context{cublas, reinterpret_cast<__half*>(scratch.ptr), scratch_rows * kk};
    for (const int64_t m : {1, 33, 100}) {
      ct::expect_matches_reference(wf, n_out, kk, m, 2e-3, rng, [&](const __half* x, int64_t mm, float* y) {
        return call(context, dw.ptr, n_out, kk, x, mm, y, nullptr);
      });
    }
  }
  ct::DeviceBuffer<uint16_t> scratch(static_cast<size_t>(kk));
  const kc::Int4CublasContext context{cublas, reinterpret_cast<__half*>(scratch.ptr), kk};
  ct::DeviceBuffer<uint16_t> x(static_cast<size_t>(kk));
  ct::DeviceBuffer<float> y(static_cast<size_t>(n_out));
  const auto* xh = reinterpret_cast<const __half*>(x.ptr);
  if (k::type_info(type).block_bytes % 2 == 0) {  // MXFP4's 17-byte blocks have no alignment to miss
    EXPECT_EQ(call(context, dw.ptr + 1, n_out, kk, xh, 1, y.ptr, nullptr), Status::invalid_argument);
  }
  EXPECT_EQ(call(context, dw.ptr, n_out, 200, xh, 1, y.ptr, nullptr), Status::invalid_argument);  // 200 % 32
  EXPECT_EQ(call({}, dw.ptr, n_out, kk, xh, 1, y.ptr, nullptr), Status::invalid_argument);        // no cuBLAS
}

TEST(W4A16DequantCublas, Q8_0AndQ6KMatchTheReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  cublasHandle_t cublas = nullptr;
  ASSERT_EQ(cublasCreate(&cublas), CUBLAS_STATUS_SUCCESS);
  std::mt19937 rng(13);
  expect_blocks_dequant_cublas_match(cublas, k::DType::Q8_0, kc::w4a16_q8_0_dequant_cublas, rng);
  expect_blocks_dequant_cublas_match(cublas, k::DType::Q6_K, kc::w4a16_q6_k_dequant_cublas, rng);
  cublasDestroy(cublas);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// The other GGUF types as stored (w4a16_gguf_blocks_dequant_cublas: kW4A16GgufBlockTypes, the read-only
// i-quants, ternary types and MXFP4 as random valid blocks), the same way; a type without a reader refused.
TEST(W4A16DequantCublas, OtherGgufTypesMatchTheReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  cublasHandle_t cublas = nullptr;
  ASSERT_EQ(cublasCreate(&cublas), CUBLAS_STATUS_SUCCESS);
  std::mt19937 rng(14);
  for (const k::DType type : kc::kW4A16GgufBlockTypes) {
    expect_blocks_dequant_cublas_match(
        cublas, type,
        [type](const kc::Int4CublasContext& context, const uint8_t* w, int64_t n_out, int64_t kk,
               const __half* x, int64_t m, float* y, cudaStream_t stream) {
          return kc::w4a16_gguf_blocks_dequant_cublas(context, type, w, n_out, kk, x, m, y, stream);
        },
        rng);
  }
  ct::DeviceBuffer<uint8_t> dw(512);
  ct::DeviceBuffer<uint16_t> scratch(256);
  const kc::Int4CublasContext context{cublas, reinterpret_cast<__half*>(scratch.ptr), 256};
  ct::DeviceBuffer<uint16_t> x(256);
  ct::DeviceBuffer<float> y(1);
  EXPECT_EQ(kc::w4a16_gguf_blocks_dequant_cublas(context, k::DType::Q4_K, dw.ptr, 1, 256,
                                                 reinterpret_cast<const __half*>(x.ptr), 1, y.ptr, nullptr),
            Status::unsupported_type);
  cublasDestroy(cublas);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
