// Group-wise INT4 in the tensor-core kernels' chunks (kernels/int4_tiles.hpp) on the device: the
// device repack writes the host's bytes, and every kernel that reads tiles gives bit for bit what
// its row-major twin gives on the same weights (and so matches the CPU reference as that one does),
// on odd shapes: ragged tiles (n_out 37, 130, 4099), ragged stages (k 192, 4224), every group size.
#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kernels/cuda/int4_tiles.cuh"
#include "kernels/cuda/w4a16_dequant_cublas.cuh"
#include "kernels/cuda/w4a16_gemv_mma.cuh"
#include "kernels/int4_tiles.hpp"
#include "tests/cuda/w4a16_test_util.hpp"

namespace nibble::cuda_test {
namespace {

namespace kc = nibble::kernels::cuda;

// Row-major weights (make_device_int4_groups) and their tiles, made on the device.
struct RowsAndTiles {
  DeviceInt4Groups rows;
  std::unique_ptr<DeviceBuffer<uint8_t>> tiles;
};
void make_rows_and_tiles(int64_t n_out, int64_t kk, int64_t group, std::mt19937& rng, RowsAndTiles& out) {
  ASSERT_NO_FATAL_FAILURE(make_device_int4_groups(n_out, kk, group, rng, out.rows));
  out.tiles =
      std::make_unique<DeviceBuffer<uint8_t>>(static_cast<size_t>(k::int4_tiles_bytes(n_out, kk, group)));
  ASSERT_NE(out.tiles->ptr, nullptr);
  ASSERT_EQ(kc::int4_tiles_from_groups(out.rows.quants->ptr, out.rows.scales->ptr, out.rows.zeros->ptr, n_out,
                                       kk, group, out.tiles->ptr, nullptr),
            k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

TEST(CudaInt4Tiles, DeviceRepackWritesTheHostsBytes) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(3);
  for (const int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}}) {
    for (const int64_t n_out : {int64_t{1}, int64_t{130}, int64_t{300}}) {
      for (const int64_t kk : {int64_t{128}, int64_t{384}, int64_t{4224}}) {
        if (kk % group != 0) continue;
        SCOPED_TRACE("group " + std::to_string(group) + " n_out " + std::to_string(n_out) + " k " +
                     std::to_string(kk));
        RowsAndTiles w;
        ASSERT_NO_FATAL_FAILURE(make_rows_and_tiles(n_out, kk, group, rng, w));
        const std::vector<uint8_t> quants = w.rows.quants->to_host(), zeros = w.rows.zeros->to_host();
        const std::vector<uint16_t> scales = w.rows.scales->to_host();
        std::vector<uint8_t> want(static_cast<size_t>(k::int4_tiles_bytes(n_out, kk, group)));
        ASSERT_EQ(k::int4_tiles_from_groups(quants.data(), scales.data(), zeros.data(), n_out, kk, group,
                                            want.data()),
                  k::Status::ok);
        const std::vector<uint8_t> got = w.tiles->to_host();
        ASSERT_EQ(got.size(), want.size());
        for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << "byte " << i;
      }
    }
  }
  DeviceBuffer<uint8_t> q(256), z(8), out(static_cast<size_t>(k::int4_tiles_bytes(1, 256, 32)));
  DeviceBuffer<uint16_t> s(8);
  EXPECT_EQ(kc::int4_tiles_from_groups(q.ptr, s.ptr, z.ptr, 1, 256, 48, out.ptr, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(kc::int4_tiles_from_groups(q.ptr + 8, s.ptr, z.ptr, 1, 256, 32, out.ptr, nullptr),
            k::Status::invalid_argument);  // quants not 16-byte aligned
  EXPECT_EQ(kc::int4_tiles_from_groups(q.ptr, s.ptr, z.ptr, 1, 256, 32, out.ptr + 4, nullptr),
            k::Status::invalid_argument);  // tiles not 16-byte aligned
  EXPECT_EQ(kc::int4_tiles_from_groups(
                q.ptr, reinterpret_cast<const uint16_t*>(reinterpret_cast<const uint8_t*>(s.ptr) + 1), z.ptr,
                1, 256, 32, out.ptr, nullptr),
            k::Status::invalid_argument);  // scales not 2-byte aligned
  EXPECT_EQ(kc::int4_tiles_from_groups(q.ptr, nullptr, z.ptr, 1, 256, 32, out.ptr, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

using RowsKernel = k::Status (*)(const uint8_t*, const __half*, const uint8_t*, int64_t, int64_t, int64_t,
                                 const __half*, int64_t, float*, cudaStream_t, bool);
using TilesKernel = k::Status (*)(const uint8_t*, int64_t, int64_t, int64_t, const __half*, int64_t, float*,
                                  cudaStream_t, bool);
struct TwinKernels {
  const char* name;
  RowsKernel rows;
  TilesKernel tiles;
  std::vector<int64_t> ms;
};
const TwinKernels kTwins[] = {
    {"256 threads", kc::w4a16_gemv_int4_groups_mma, kc::w4a16_gemv_int4_tiles_mma, {1, 3, 16}},
    {"512 threads", kc::w4a16_gemv_int4_groups_mma_512, kc::w4a16_gemv_int4_tiles_mma_512, {1, 16}},
    {"2 blocks an SM", kc::w4a16_gemv_int4_groups_mma_2bps, kc::w4a16_gemv_int4_tiles_mma_2bps, {1, 16}},
    {"32 rows", kc::w4a16_gemv_int4_groups_mma_32rows, kc::w4a16_gemv_int4_tiles_mma_32rows, {1, 17, 32}},
    {"64-row slabs",
     kc::w4a16_gemm_int4_groups_mma_64rows,
     kc::w4a16_gemm_int4_tiles_mma_64rows,
     {1, 64, 130}},
};

TEST(CudaInt4Tiles, TensorCoreKernelsOnTilesEqualTheirRowMajorTwinsBitForBit) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}}) {
    for (const int64_t n_out : {int64_t{37}, int64_t{130}, int64_t{4099}}) {
      for (const int64_t kk : {int64_t{192}, int64_t{4224}}) {
        if (kk % group != 0) continue;
        RowsAndTiles w;
        ASSERT_NO_FATAL_FAILURE(make_rows_and_tiles(n_out, kk, group, rng, w));
        const int64_t max_m = 130;
        std::vector<k::f16_bits> xh(static_cast<size_t>(max_m * kk));
        for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
        DeviceBuffer<k::f16_bits> dx(xh);
        DeviceBuffer<float> dy_rows(static_cast<size_t>(max_m * n_out)), dy_tiles(dy_rows.count);
        ASSERT_TRUE(dx.ptr && dy_rows.ptr && dy_tiles.ptr);
        const auto* x = reinterpret_cast<const __half*>(dx.ptr);
        for (const auto& twin : kTwins) {
          for (const int64_t m : twin.ms) {
            SCOPED_TRACE(std::string(twin.name) + ": group " + std::to_string(group) + " n_out " +
                         std::to_string(n_out) + " k " + std::to_string(kk) + " m " + std::to_string(m));
            ASSERT_EQ(cudaMemset(dy_tiles.ptr, 0xff, dy_tiles.count * sizeof(float)), cudaSuccess);
            ASSERT_EQ(twin.rows(w.rows.quants->ptr, w.rows.scales_half(), w.rows.zeros->ptr, group, n_out, kk,
                                x, m, dy_rows.ptr, nullptr, false),
                      k::Status::ok);
            ASSERT_EQ(twin.tiles(w.tiles->ptr, group, n_out, kk, x, m, dy_tiles.ptr, nullptr, false),
                      k::Status::ok);
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            const std::vector<float> a = dy_rows.to_host(), b = dy_tiles.to_host();
            ASSERT_EQ(a.size(), b.size());
            ASSERT_EQ(std::memcmp(a.data(), b.data(), static_cast<size_t>(m * n_out) * sizeof(float)), 0);
          }
        }
      }
    }
  }
}

// Independent of the twins: the tiled GEMV and the 64-row GEMM against the double-precision reference.
TEST(CudaInt4Tiles, TiledKernelsMatchCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(19);
  for (const int64_t group : {int64_t{32}, int64_t{128}}) {
    const int64_t n_out = 300, kk = 1152;
    RowsAndTiles w;
    ASSERT_NO_FATAL_FAILURE(make_rows_and_tiles(n_out, kk, group, rng, w));
    for (const int64_t m : {int64_t{1}, int64_t{7}}) {
      expect_matches_reference(
          w.rows.wf, n_out, kk, m, 2e-3, rng, [&](const __half* x, int64_t mm, float* y) {
            return kc::w4a16_gemv_int4_tiles_mma(w.tiles->ptr, group, n_out, kk, x, mm, y, nullptr, false);
          });
    }
    expect_matches_reference(w.rows.wf, n_out, kk, 70, 2e-3, rng, [&](const __half* x, int64_t mm, float* y) {
      return kc::w4a16_gemm_int4_tiles_mma_64rows(w.tiles->ptr, group, n_out, kk, x, mm, y, nullptr, false);
    });
  }
}

// Dequantized for cuBLAS: the same halves from tiles as from rows, so the same products; the tiled
// loads-only probe computes nothing; bad arguments are refused before anything is launched.
TEST(CudaInt4Tiles, DequantCublasAndProbeOnTiles) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(23);
  const int64_t n_out = 300, kk = 4224, group = 64, m = 40;
  RowsAndTiles w;
  ASSERT_NO_FATAL_FAILURE(make_rows_and_tiles(n_out, kk, group, rng, w));
  DeviceBuffer<uint16_t> h_rows(static_cast<size_t>(n_out * kk)), h_tiles(h_rows.count);
  ASSERT_TRUE(h_rows.ptr && h_tiles.ptr);
  auto* hr = reinterpret_cast<__half*>(h_rows.ptr);
  auto* ht = reinterpret_cast<__half*>(h_tiles.ptr);
  ASSERT_EQ(kc::dequantize_int4_groups_f16(w.rows.quants->ptr, w.rows.scales_half(), w.rows.zeros->ptr, group,
                                           n_out, kk, 0, n_out, hr, nullptr),
            k::Status::ok);
  ASSERT_EQ(kc::dequantize_int4_tiles_f16(w.tiles->ptr, group, n_out, kk, 0, n_out, ht, nullptr),
            k::Status::ok);
  // Rows 129..299 only (a ragged start inside the second tile).
  DeviceBuffer<uint16_t> h_part(static_cast<size_t>((n_out - 129) * kk));
  ASSERT_NE(h_part.ptr, nullptr);
  ASSERT_EQ(kc::dequantize_int4_tiles_f16(w.tiles->ptr, group, n_out, kk, 129, n_out - 129,
                                          reinterpret_cast<__half*>(h_part.ptr), nullptr),
            k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<uint16_t> a = h_rows.to_host(), b = h_tiles.to_host(), part = h_part.to_host();
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 2), 0);
  ASSERT_EQ(part.size(), static_cast<size_t>((n_out - 129) * kk));
  EXPECT_EQ(std::memcmp(a.data() + 129 * kk, part.data(), part.size() * 2), 0);

  cublasHandle_t cublas = nullptr;
  ASSERT_EQ(cublasCreate(&cublas), CUBLAS_STATUS_SUCCESS);
  DeviceBuffer<uint16_t> scratch(static_cast<size_t>(128 * kk));  // three chunks
  ASSERT_NE(scratch.ptr, nullptr);
  const kc::Int4CublasContext context{cublas, reinterpret_cast<__half*>(scratch.ptr), 128 * kk};
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<k::f16_bits> xh(static_cast<size_t>(m * kk));
  for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
  DeviceBuffer<k::f16_bits> dx(xh);
  DeviceBuffer<float> y_rows(static_cast<size_t>(m * n_out)), y_tiles(y_rows.count);
  ASSERT_TRUE(dx.ptr && y_rows.ptr && y_tiles.ptr);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  EXPECT_EQ(
      kc::w4a16_int4_groups_dequant_cublas(context, w.rows.quants->ptr, w.rows.scales_half(),
                                           w.rows.zeros->ptr, group, n_out, kk, x, m, y_rows.ptr, nullptr),
      k::Status::ok);
  EXPECT_EQ(kc::w4a16_int4_tiles_dequant_cublas(context, w.tiles->ptr, group, n_out, kk, x, m, y_tiles.ptr,
                                                nullptr),
            k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> yr = y_rows.to_host(), yt = y_tiles.to_host();
  ASSERT_EQ(yr.size(), yt.size());
  EXPECT_EQ(std::memcmp(yr.data(), yt.data(), yr.size() * sizeof(float)), 0);
  EXPECT_EQ(kc::w4a16_int4_tiles_dequant_cublas(context, w.tiles->ptr + 8, group, n_out, kk, x, m,
                                                y_tiles.ptr, nullptr),
            k::Status::invalid_argument);
  cublasDestroy(cublas);

  // The tiled loads-only probe: every output 0.
  ASSERT_EQ(cudaMemset(y_tiles.ptr, 0xff, y_tiles.count * sizeof(float)), cudaSuccess);
  ASSERT_EQ(kc::w4a16_gemv_int4_groups_mma_probe(kc::GemvMmaProbe::tiles_loads_only, w.tiles->ptr, nullptr,
                                                 nullptr, group, n_out, kk, x, 5, y_tiles.ptr, nullptr),
            k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> probe = y_tiles.to_host();
  for (int64_t i = 0; i < 5 * n_out; ++i) ASSERT_EQ(probe[static_cast<size_t>(i)], 0.0f) << "output " << i;

  // Arguments: misaligned tiles, a bad group, one that does not divide k, too many rows, none.
  EXPECT_EQ(kc::w4a16_gemv_int4_tiles_mma(w.tiles->ptr + 8, group, n_out, kk, x, 1, y_tiles.ptr, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(kc::w4a16_gemv_int4_tiles_mma(w.tiles->ptr, 96, n_out, kk, x, 1, y_tiles.ptr, nullptr),
            k::Status::invalid_argument);  // not a group size
  EXPECT_EQ(kc::w4a16_gemv_int4_tiles_mma(w.tiles->ptr, group, n_out, 4200, x, 1, y_tiles.ptr, nullptr),
            k::Status::invalid_argument);  // 64 does not divide 4200
  EXPECT_EQ(kc::w4a16_gemv_int4_tiles_mma(w.tiles->ptr, group, n_out, kk, x, 17, y_tiles.ptr, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(kc::w4a16_gemv_int4_tiles_mma_32rows(w.tiles->ptr, group, n_out, kk, x, 33, y_tiles.ptr, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(kc::w4a16_gemm_int4_tiles_mma_64rows(w.tiles->ptr, group, n_out, kk, x, 0, y_tiles.ptr, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(kc::w4a16_gemv_int4_tiles_mma(nullptr, group, n_out, kk, x, 1, y_tiles.ptr, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// GGUF Q4_K in chunks: the device repack writes the host's bytes, and the three Q4_K tensor-core
// kernels on the chunks give bit for bit what they give on the blocks as stored (ragged tiles, one,
// two and 17 super-blocks a row).
TEST(CudaInt4Tiles, Q4KTilesEqualTheBlocksAsStoredBitForBit) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(29);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  using Stored =
      k::Status (*)(const uint8_t*, int64_t, int64_t, const __half*, int64_t, float*, cudaStream_t, bool);
  struct Twin {
    const char* name;
    Stored stored, tiled;
    std::vector<int64_t> ms;
  };
  const Twin twins[] = {
      {"GEMV", kc::w4a16_gemv_q4_k_mma, kc::w4a16_gemv_q4_k_tiles_mma, {1, 16}},
      {"32 rows", kc::w4a16_gemv_q4_k_mma_32rows, kc::w4a16_gemv_q4_k_tiles_mma_32rows, {1, 32}},
      {"64-row slabs", kc::w4a16_gemm_q4_k_mma_64rows, kc::w4a16_gemm_q4_k_tiles_mma_64rows, {1, 130}},
  };
  for (const int64_t n_out : {int64_t{37}, int64_t{130}, int64_t{4099}}) {
    for (const int64_t kk : {int64_t{256}, int64_t{512}, int64_t{4352}}) {
      SCOPED_TRACE("n_out " + std::to_string(n_out) + " k " + std::to_string(kk));
      std::vector<uint8_t> wq;
      std::vector<float> wf;
      ASSERT_NO_FATAL_FAILURE(random_quantized(k::DType::Q4_K, n_out, kk, rng, wq, wf));
      DeviceBuffer<uint8_t> blocks(wq), tiles(static_cast<size_t>(k::q4_k_tiles_bytes(n_out, kk)));
      ASSERT_TRUE(blocks.ptr && tiles.ptr);
      ASSERT_EQ(kc::q4_k_tiles_from_blocks(blocks.ptr, n_out, kk, tiles.ptr, nullptr), k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<uint8_t> want(tiles.count);
      ASSERT_EQ(k::q4_k_tiles_from_blocks(wq.data(), n_out, kk, want.data()), k::Status::ok);
      const std::vector<uint8_t> got = tiles.to_host();
      ASSERT_EQ(got.size(), want.size());
      ASSERT_EQ(std::memcmp(got.data(), want.data(), want.size()), 0) << "device repack differs";
      const int64_t max_m = 130;
      std::vector<k::f16_bits> xh(static_cast<size_t>(max_m * kk));
      for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
      DeviceBuffer<k::f16_bits> dx(xh);
      DeviceBuffer<float> y_stored(static_cast<size_t>(max_m * n_out)), y_tiled(y_stored.count);
      ASSERT_TRUE(dx.ptr && y_stored.ptr && y_tiled.ptr);
      const auto* x = reinterpret_cast<const __half*>(dx.ptr);
      for (const Twin& twin : twins) {
        for (const int64_t m : twin.ms) {
          SCOPED_TRACE(std::string(twin.name) + " m " + std::to_string(m));
          // NaN-filled first: a twin that wrote nothing cannot pass on the bits the last pair left.
          ASSERT_EQ(cudaMemset(y_stored.ptr, 0xff, y_stored.count * sizeof(float)), cudaSuccess);
          ASSERT_EQ(cudaMemset(y_tiled.ptr, 0xff, y_tiled.count * sizeof(float)), cudaSuccess);
          ASSERT_EQ(twin.stored(blocks.ptr, n_out, kk, x, m, y_stored.ptr, nullptr, false), k::Status::ok);
          ASSERT_EQ(twin.tiled(tiles.ptr, n_out, kk, x, m, y_tiled.ptr, nullptr, false), k::Status::ok);
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          const std::vector<float> a = y_stored.to_host(), b = y_tiled.to_host();
          ASSERT_EQ(std::memcmp(a.data(), b.data(), static_cast<size_t>(m * n_out) * sizeof(float)), 0);
        }
      }
    }
  }
  DeviceBuffer<uint8_t> t(static_cast<size_t>(k::q4_k_tiles_bytes(1, 256)) + 16);
  DeviceBuffer<k::f16_bits> dx(512);
  DeviceBuffer<float> dy(2);
  const auto* x = reinterpret_cast<const __half*>(dx.ptr);
  EXPECT_EQ(kc::w4a16_gemv_q4_k_tiles_mma(t.ptr, 1, 288, x, 1, dy.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(kc::w4a16_gemv_q4_k_tiles_mma(t.ptr + 8, 1, 256, x, 1, dy.ptr, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(kc::w4a16_gemv_q4_k_tiles_mma(t.ptr, 1, 256, x, 17, dy.ptr, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(kc::q4_k_tiles_from_blocks(t.ptr, 1, 300, t.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
}  // namespace nibble::cuda_test
