// The load-time choice between the CUDA-core and tensor-core INT4 kernels (kernels/cuda/w4a16_tuning):
// the rule on given times (host only, runs everywhere) and the timing itself on a device.
#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <cstring>
#include <iostream>
#include <memory>
#include <random>
#include <vector>

#include "kernels/cuda/int4_tiles.cuh"
#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/cuda/w4a16_gemv_half2.cuh"
#include "kernels/cuda/w4a16_gemv_mma.cuh"
#include "kernels/cuda/w4a16_tuning.cuh"
#include "kernels/cuda/w4a8_gemv.cuh"
#include "kernels/int4_tiles.hpp"
#include "kernels/quant_types.hpp"
#include "tests/cuda/w4a16_test_util.hpp"

namespace {

namespace kc = nibble::kernels::cuda;
namespace ct = nibble::cuda_test;
using nibble::kernels::Status;

constexpr int kCudaCores = 0, kWmma = 2, kMma = 3, kTc64Rows = 9;  // Int4Kernel indices

// A tuning with the given times (0: not timed) for the 2-16 row range (at 4 and 16 rows) and the
// rule's choice there.
kc::Int4Kernel choose_small(const double (&us)[4][2]) {
  kc::Int4GroupsTuning t;
  for (int kernel = 0; kernel < 4; ++kernel)
    for (int c = 0; c < 2; ++c) t.us[1][kernel][c] = us[kernel][c];
  kc::choose_int4_groups_kernels(t);
  return t.chosen[1];
}

TEST(W4A16Tuning, EachRangeTakesTheSmallestGeometricMeanOfItsTimesByAMargin) {
  using K = kc::Int4Kernel;
  EXPECT_EQ(choose_small({{10, 40}, {9, 30}, {50, 60}, {40, 50}}), K::gemv_tensor_cores);   // faster at both
  EXPECT_EQ(choose_small({{10, 40}, {11, 20}, {50, 60}, {40, 50}}), K::gemv_tensor_cores);  // sqrt(220) < 20
  EXPECT_EQ(choose_small({{10, 40}, {8, 60}, {50, 60}, {40, 50}}), K::gemv_cuda_cores);     // sqrt(480) > 20
  EXPECT_EQ(choose_small({{10, 40}, {10, 40}, {50, 60}, {40, 50}}), K::gemv_cuda_cores);  // a tie: the lower
  EXPECT_EQ(choose_small({{10, 40}, {0, 20}, {50, 60}, {40, 50}}), K::gemv_cuda_cores);   // one time missing
  EXPECT_EQ(choose_small({{30, 90}, {20, 60}, {15, 40}, {14, 41}}), K::gemm_mma);         // 23.96 < 24.49
  EXPECT_EQ(choose_small({{0, 0}, {0, 0}, {0, 0}, {0, 0}}), K::gemv_cuda_cores);          // nothing: default
  // The default (CUDA-core GEMV here) stays unless another is at least kInt4MinGain faster.
  EXPECT_EQ(choose_small({{10, 40}, {9.9, 39}, {50, 60}, {40, 50}}), K::gemv_cuda_cores);    // 1.7% faster
  EXPECT_EQ(choose_small({{10, 40}, {9.5, 37}, {50, 60}, {40, 50}}), K::gemv_tensor_cores);  // 5.3% faster

  kc::Int4GroupsTuning t;
  t.us[2][kCudaCores][0] = 100;  // 32 rows
  t.us[2][kWmma][0] = 60;
  t.us[2][kMma][0] = 50;
  t.us[4][kWmma][0] = 400;  // 256 rows (over 64)
  t.us[4][kMma][0] = 401;
  kc::choose_int4_groups_kernels(t);
  EXPECT_EQ(t.chosen[2], K::gemm_mma);
  EXPECT_EQ(t.chosen[3], K::gemm_wmma);  // 33-64 rows: nothing timed, the default
  EXPECT_EQ(t.chosen[4], K::gemm_wmma);
  t.us[4][kMma][0] = 390;  // 2.5% faster than the default WMMA GEMM: not enough
  kc::choose_int4_groups_kernels(t);
  EXPECT_EQ(t.chosen[4], K::gemm_wmma);
  t.us[4][kMma][0] = 370;  // 7.5% faster
  kc::choose_int4_groups_kernels(t);
  EXPECT_EQ(t.chosen[4], K::gemm_mma);
  t.us[4][kMma][0] = 401;
  t.us[4][kWmma][0] = 0;  // the WMMA GEMM failed
  kc::choose_int4_groups_kernels(t);
  EXPECT_EQ(t.chosen[4], K::gemm_mma);
  t.us[3][kWmma][0] = 300;  // 64 rows: the 64-row tensor-core GEMM, the two-tile GEMV cannot take them
  t.us[3][kTc64Rows][0] = 40;
  kc::choose_int4_groups_kernels(t);
  EXPECT_EQ(t.chosen[3], K::gemm_tensor_cores_64rows);
  EXPECT_EQ(t.chosen[4], K::gemm_mma);  // each range by its own times
}

// llama-70b's 8192 x 8192 matrix on an H200 (2026-12-04, us per product): the CUDA-core GEMV is the
// fastest at 1 row only, the tensor-core GEMV from 4 rows on, so batch-1 decode keeps the CUDA-core
// GEMV and batched decode takes the tensor-core one (one range for 1-16 rows gave both the
// tensor-core GEMV: batch-1 decode 35.7 ms a step against 29.6).
TEST(W4A16Tuning, OneRowHasItsOwnRange) {
  using K = kc::Int4Kernel;
  kc::Int4GroupsTuning t;
  const double one_row[4] = {25.7, 29.6, 205.9, 212.9};
  for (int kernel = 0; kernel < 4; ++kernel) t.us[0][kernel][0] = one_row[kernel];
  t.us[1][kCudaCores][0] = 75.7;   // 4 rows (bench-gpu's g128 column)
  t.us[1][kCudaCores][1] = 318.3;  // 16 rows
  t.us[1][1][0] = 29.6;
  t.us[1][1][1] = 31.8;
  t.us[1][kWmma][1] = t.us[1][kWmma][0] = 241.2;
  t.us[1][kMma][1] = t.us[1][kMma][0] = 211.3;
  kc::choose_int4_groups_kernels(t);
  EXPECT_EQ(t.chosen[0], K::gemv_cuda_cores);
  EXPECT_EQ(t.chosen[1], K::gemv_tensor_cores);
}

TEST(W4A16Tuning, RangesAndKernelLimits) {
  EXPECT_EQ(kc::int4_row_range(1), 0);
  EXPECT_EQ(kc::int4_row_range(2), 1);
  EXPECT_EQ(kc::int4_row_range(16), 1);
  EXPECT_EQ(kc::int4_row_range(17), 2);
  EXPECT_EQ(kc::int4_row_range(32), 2);
  EXPECT_EQ(kc::int4_row_range(33), 3);
  EXPECT_EQ(kc::int4_row_range(64), 3);
  EXPECT_EQ(kc::int4_row_range(65), 4);
  EXPECT_EQ(kc::int4_row_range(100000), 4);
  EXPECT_EQ(kc::int4_kernel_max_rows(kc::Int4Kernel::gemv_cuda_cores), kc::kW4A16GemvMaxM);
  EXPECT_EQ(kc::int4_kernel_max_rows(kc::Int4Kernel::gemv_tensor_cores), kc::kW4A16GemvMmaMaxM);
  EXPECT_EQ(kc::int4_kernel_max_rows(kc::Int4Kernel::gemv_tensor_cores_32rows), 32);
  EXPECT_EQ(kc::int4_kernel_max_rows(kc::Int4Kernel::gemm_tensor_cores_64rows), INT64_MAX);
  EXPECT_EQ(kc::int4_kernel_launcher(kc::Int4Kernel::gemv_tensor_cores_32rows),
            kc::w4a16_gemv_int4_groups_mma_32rows);
  EXPECT_EQ(kc::int4_kernel_launcher(kc::Int4Kernel::gemm_tensor_cores_64rows),
            kc::w4a16_gemm_int4_groups_mma_64rows);
  // Every range's timed row counts lie inside it.
  for (int r = 0; r < kc::kInt4RowRanges; ++r)
    for (int c = 0; c < 2; ++c)
      if (kc::kInt4RangeTimedRows[r][c] > 0) {
        EXPECT_EQ(kc::int4_row_range(kc::kInt4RangeTimedRows[r][c]), r);
      }
}

// On tiles only the kernels that read them count, and the defaults are the tensor-core kernels: a
// CUDA-core GEMV twice as fast (it cannot read tiles) is not chosen.
TEST(W4A16Tuning, OnTilesOnlyKernelsThatReadTilesAreChosen) {
  using K = kc::Int4Kernel;
  using L = kc::Int4Layout;
  for (const K reads : {K::gemv_tensor_cores, K::gemv_tensor_cores_512, K::gemv_tensor_cores_2bps,
                        K::gemv_tensor_cores_32rows, K::gemm_tensor_cores_64rows, K::dequant_cublas}) {
    EXPECT_TRUE(kc::int4_kernel_reads(reads, L::tiles)) << kc::int4_kernel_name(reads);
    EXPECT_TRUE(kc::int4_kernel_reads(reads, L::rows));
    EXPECT_EQ(kc::int4_tiles_kernel_launcher(reads) == nullptr, reads == K::dequant_cublas);
  }
  for (const K rows_only :
       {K::gemv_cuda_cores, K::gemm_wmma, K::gemm_mma, K::gemv_cuda_cores_staged, K::gemv_half2}) {
    EXPECT_FALSE(kc::int4_kernel_reads(rows_only, L::tiles)) << kc::int4_kernel_name(rows_only);
    EXPECT_TRUE(kc::int4_kernel_reads(rows_only, L::rows));
    EXPECT_EQ(kc::int4_tiles_kernel_launcher(rows_only), nullptr);
  }
  EXPECT_STREQ(kc::int4_layout_name(L::tiles), "tiles");
  EXPECT_STREQ(kc::int4_layout_name(L::rows), "rows");

  kc::Int4GroupsTuning t;
  t.us[0][kCudaCores][0] = 10;  // 1 row
  t.us[0][static_cast<int>(K::gemv_tensor_cores)][0] = 20;
  t.us[0][static_cast<int>(K::gemv_tensor_cores_2bps)][0] = 18;
  kc::choose_int4_groups_kernels(t, L::tiles);
  EXPECT_EQ(t.chosen[0], K::gemv_tensor_cores_2bps);  // 10% faster than the tiles' default
  kc::choose_int4_groups_kernels(t, L::rows);
  EXPECT_EQ(t.chosen[0], K::gemv_cuda_cores);
  kc::Int4GroupsTuning none;
  kc::choose_int4_groups_kernels(none, L::tiles);  // nothing timed: the tiles' defaults
  for (int r = 0; r < kc::kInt4RowRanges; ++r) {
    EXPECT_EQ(none.chosen[r], kc::kInt4TilesDefaultKernels[r]);
    EXPECT_TRUE(kc::int4_kernel_reads(none.chosen[r], L::tiles));
  }
  // Launching a kernel that does not read tiles on tiles is refused before anything runs.
  EXPECT_EQ(kc::launch_int4_kernel(K::gemv_cuda_cores, nullptr, nullptr, nullptr, nullptr, 128, 256, 256,
                                   nullptr, 1, nullptr, nullptr, false, L::tiles),
            Status::invalid_argument);
}

// On CUTLASS's order (Int4Layout::cutlass) only the three CUTLASS schedules read the matrix: the
// defaults are theirs and cover every row count, a faster kernel of ours is not chosen, and ours are
// refused before anything runs, as is timing without the copies.
TEST(W4A16Tuning, OnTheCutlassLayoutOnlyTheCutlassGemmsAreChosen) {
  using K = kc::Int4Kernel;
  using L = kc::Int4Layout;
  EXPECT_STREQ(kc::int4_layout_name(L::cutlass), "cutlass");
  for (int kernel = 0; kernel < kc::kInt4Kernels; ++kernel) {
    const auto which = static_cast<K>(kernel);
    EXPECT_EQ(kc::int4_kernel_reads(which, L::cutlass), kc::is_cutlass(which)) << kc::int4_kernel_name(which);
  }
  for (int r = 0; r < kc::kInt4RowRanges; ++r) {
    const K fallback = kc::int4_default_kernels(L::cutlass)[r];
    EXPECT_TRUE(kc::is_cutlass(fallback)) << "range " << r;
    // It takes every row count of its range: the range's largest (the last range: any) and its
    // smallest, one more than the range before's largest.
    EXPECT_GE(kc::int4_kernel_max_rows(fallback), kc::kInt4RangeMaxRows[r]) << "range " << r;
    EXPECT_LE(kc::int4_kernel_min_rows(fallback), r == 0 ? 1 : kc::kInt4RangeMaxRows[r - 1] + 1)
        << "range " << r;
  }
  kc::Int4GroupsTuning t;
  t.us[0][kCudaCores][0] = 5;  // 1 row: ours much faster, but it cannot read the layout
  t.us[0][static_cast<int>(K::cutlass_gemm_16rows)][0] = 20;
  t.us[4][static_cast<int>(K::cutlass_gemm)][0] = 100;  // 256 rows
  t.us[4][static_cast<int>(K::cutlass_gemm_pingpong)][0] = 80;
  t.us[4][static_cast<int>(K::dequant_cublas)][0] = 50;
  kc::choose_int4_groups_kernels(t, L::cutlass);
  EXPECT_EQ(t.chosen[0], K::cutlass_gemm_16rows);
  EXPECT_EQ(t.chosen[4], K::cutlass_gemm_pingpong);  // 20% faster than the default there
  for (int r = 0; r < kc::kInt4RowRanges; ++r) EXPECT_TRUE(kc::is_cutlass(t.chosen[r])) << "range " << r;
  for (const K ours : {K::gemv_cuda_cores, K::gemv_tensor_cores, K::dequant_cublas}) {
    EXPECT_EQ(kc::launch_int4_kernel(ours, nullptr, nullptr, nullptr, nullptr, 128, 256, 256, nullptr, 1,
                                     nullptr, nullptr, false, L::cutlass),
              Status::invalid_argument)
        << kc::int4_kernel_name(ours);
  }
  const std::vector<kc::Int4GroupsMatrix> one(1);
  std::string error;
  EXPECT_EQ(kc::tune_int4_groups(one, 128, 256, 256, nullptr, nullptr, t, error, L::cutlass),
            Status::invalid_argument);
}

// The W4A8 GEMV (8-bit activations) is an Int4Kernel the model pins where asked, never one the timing
// rule chooses: even timed fastest it is passed over, on every layout.
TEST(W4A16Tuning, TheW4A8GemvIsNeverChosenByTiming) {
  using K = kc::Int4Kernel;
  EXPECT_FALSE(kc::is_w4a16(K::w4a8_gemv));
  for (int kernel = 0; kernel < kc::kInt4Kernels; ++kernel)
    EXPECT_EQ(kc::is_w4a16(static_cast<K>(kernel)), static_cast<K>(kernel) != K::w4a8_gemv);
  EXPECT_STREQ(kc::int4_kernel_name(K::w4a8_gemv), "W4A8 GEMV");
  EXPECT_EQ(kc::int4_kernel_max_rows(K::w4a8_gemv), kc::kW4A8GemvMaxM);
  EXPECT_NE(kc::int4_kernel_launcher(K::w4a8_gemv), nullptr);
  EXPECT_TRUE(kc::int4_kernel_reads(K::w4a8_gemv, kc::Int4Layout::rows));
  EXPECT_FALSE(kc::int4_kernel_reads(K::w4a8_gemv, kc::Int4Layout::tiles));
  EXPECT_FALSE(kc::int4_kernel_reads(K::w4a8_gemv, kc::Int4Layout::cutlass));
  kc::Int4GroupsTuning t;
  t.us[0][kCudaCores][0] = 30;
  t.us[0][static_cast<int>(K::w4a8_gemv)][0] = 5;
  kc::choose_int4_groups_kernels(t);
  EXPECT_EQ(t.chosen[0], K::gemv_cuda_cores);
}

// The half2 GEMV (fp16 sums per unit) is a one-row candidate like the others: chosen there when the
// timing says it is more than kInt4MinGain faster than the default, and never for more rows.
TEST(W4A16Tuning, TheHalf2GemvIsAOneRowCandidate) {
  using K = kc::Int4Kernel;
  EXPECT_STREQ(kc::int4_kernel_name(K::gemv_half2), "half2 GEMV");
  EXPECT_EQ(kc::int4_kernel_max_rows(K::gemv_half2), 1);
  EXPECT_EQ(kc::int4_kernel_min_rows(K::gemv_half2), 1);
  EXPECT_EQ(kc::int4_kernel_launcher(K::gemv_half2), kc::w4a16_gemv_int4_groups_half2);
  kc::Int4GroupsTuning t;
  t.us[0][kCudaCores][0] = 30;
  t.us[0][static_cast<int>(K::gemv_half2)][0] = 29;  // under 5% faster: the default stays
  kc::choose_int4_groups_kernels(t);
  EXPECT_EQ(t.chosen[0], K::gemv_cuda_cores);
  t.us[0][static_cast<int>(K::gemv_half2)][0] = 12;
  kc::choose_int4_groups_kernels(t);
  EXPECT_EQ(t.chosen[0], K::gemv_half2);
  for (int r = 1; r < kc::kInt4RowRanges; ++r) EXPECT_NE(t.chosen[r], K::gemv_half2) << "range " << r;
}

// A block shape other than the default, timed fastest in a sweep, is kept only where timed once more it
// still beats the default (the least of nine noisy times is biased low); a refusal either side decides.
// Host only.
TEST(W4A16Tuning, KeepsAHalf2ShapeOnlyWhereTimedAgainItStillBeatsTheDefault) {
  EXPECT_EQ(kc::half2_shape_after_retime(3, 9.0, 10.0), 3);
  EXPECT_EQ(kc::half2_shape_after_retime(3, 10.0, 10.0), 0);  // a tie keeps the default
  EXPECT_EQ(kc::half2_shape_after_retime(3, 11.0, 10.0), 0);
  EXPECT_EQ(kc::half2_shape_after_retime(3, 0.0, 10.0), 0);  // refused its second timing
  EXPECT_EQ(kc::half2_shape_after_retime(5, 9.0, 0.0), 5);   // the default refused the call
  EXPECT_EQ(kc::half2_shape_after_retime(5, 0.0, 0.0), 0);
  EXPECT_EQ(kc::half2_shape_after_retime(0, 9.0, 10.0), 0);  // the default won the sweep
}

TEST(W4A16Tuning, RejectsBadArgumentsBeforeTouchingTheDevice) {
  kc::Int4GroupsTuning t;
  std::string error;
  EXPECT_EQ(kc::tune_int4_groups({}, 128, 256, 256, nullptr, nullptr, t, error), Status::invalid_argument);
  const std::vector<kc::Int4GroupsMatrix> one(1);
  EXPECT_EQ(kc::tune_int4_groups(one, 96, 256, 288, nullptr, nullptr, t, error),
            Status::invalid_argument);  // group
  EXPECT_EQ(kc::tune_int4_groups(one, 128, 256, 320, nullptr, nullptr, t, error),
            Status::invalid_argument);  // k % 128
  EXPECT_EQ(kc::tune_int4_groups(one, 128, 0, 256, nullptr, nullptr, t, error), Status::invalid_argument);
  for (const int ranges : {0, kc::kInt4RowRanges + 1}) {
    EXPECT_EQ(kc::tune_int4_groups(one, 128, 256, 256, nullptr, nullptr, t, error, kc::Int4Layout::rows,
                                   nullptr, ranges),
              Status::invalid_argument);
  }
  // dequant + cuBLAS without its context, and the kernels' row limits.
  EXPECT_EQ(kc::launch_int4_kernel(kc::Int4Kernel::dequant_cublas, nullptr, nullptr, nullptr, nullptr, 128,
                                   256, 256, nullptr, 32, nullptr, nullptr, false),
            Status::invalid_argument);
  EXPECT_EQ(kc::int4_kernel_launcher(kc::Int4Kernel::dequant_cublas), nullptr);
  // The half2 GEMV's block shapes: an index into kHalf2GemvVariants, on the rows only.
  for (const int variant : {-1, kc::kHalf2GemvVariantCount}) {
    EXPECT_EQ(
        kc::launch_int4_kernel(kc::Int4Kernel::gemv_half2, nullptr, nullptr, nullptr, nullptr, 128, 256, 256,
                               nullptr, 1, nullptr, nullptr, false, kc::Int4Layout::rows, nullptr, variant),
        Status::invalid_argument)
        << variant;
  }
  EXPECT_EQ(
      kc::launch_int4_kernel(kc::Int4Kernel::gemv_half2, nullptr, nullptr, nullptr, nullptr, 128, 256, 256,
                             nullptr, 1, nullptr, nullptr, false, kc::Int4Layout::tiles, nullptr, 1),
      Status::invalid_argument);
  EXPECT_EQ(kc::int4_kernel_min_rows(kc::Int4Kernel::dequant_cublas), 17);
  EXPECT_EQ(kc::int4_kernel_min_rows(kc::Int4Kernel::gemm_mma), 1);
  // The CUTLASS GEMM without its copy, or with a copy of another shape.
  EXPECT_EQ(kc::launch_int4_kernel(kc::Int4Kernel::cutlass_gemm, nullptr, nullptr, nullptr, nullptr, 128, 256,
                                   256, nullptr, 32, nullptr, nullptr, false),
            Status::invalid_argument);
  kc::Int4CutlassWeights other;
  other.n_out = 512;
  other.k = 256;
  other.group = 128;
  EXPECT_EQ(kc::launch_int4_kernel(kc::Int4Kernel::cutlass_gemm, nullptr, nullptr, nullptr, nullptr, 128, 256,
                                   256, nullptr, 32, nullptr, nullptr, false, kc::Int4Layout::rows, &other),
            Status::invalid_argument);
  for (const auto which : {kc::Int4Kernel::cutlass_gemm, kc::Int4Kernel::cutlass_gemm_pingpong,
                           kc::Int4Kernel::cutlass_gemm_16rows}) {
    EXPECT_TRUE(kc::is_cutlass(which));
    EXPECT_EQ(kc::int4_kernel_launcher(which), nullptr);
    EXPECT_TRUE(kc::int4_kernel_reads(which, kc::Int4Layout::tiles));
  }
  // The 128-row-tile schedules from 17 rows on; the 16-row one up to 32 (decode and small batches).
  EXPECT_EQ(kc::int4_kernel_min_rows(kc::Int4Kernel::cutlass_gemm), 17);
  EXPECT_EQ(kc::int4_kernel_max_rows(kc::Int4Kernel::cutlass_gemm), INT64_MAX);
  EXPECT_EQ(kc::int4_kernel_min_rows(kc::Int4Kernel::cutlass_gemm_pingpong), 17);
  EXPECT_EQ(kc::int4_kernel_min_rows(kc::Int4Kernel::cutlass_gemm_16rows), 1);
  EXPECT_EQ(kc::int4_kernel_max_rows(kc::Int4Kernel::cutlass_gemm_16rows), 32);
  EXPECT_FALSE(kc::is_cutlass(kc::Int4Kernel::dequant_cublas));
  std::vector<kc::Int4CutlassWeights> too_few;
  EXPECT_EQ(
      kc::tune_int4_groups(one, 128, 256, 256, nullptr, nullptr, t, error, kc::Int4Layout::rows, &too_few),
      Status::invalid_argument);
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
    cublasHandle_t cublas = nullptr;
    ASSERT_EQ(cublasCreate(&cublas), CUBLAS_STATUS_SUCCESS);
    ASSERT_EQ(cublasSetStream(cublas, stream), CUBLAS_STATUS_SUCCESS);
    ct::DeviceBuffer<uint16_t> scratch(static_cast<size_t>(300 * k));  // 300 rows: 4 chunks of 1000
    ASSERT_NE(scratch.ptr, nullptr);
    const kc::Int4CublasContext context{cublas, reinterpret_cast<__half*>(scratch.ptr), 300 * k};
    kc::Int4GroupsTuning t;
    std::string error;
    ASSERT_EQ(kc::tune_int4_groups(matrices, group, n_out, k, &context, stream, t, error), Status::ok)
        << error;
    EXPECT_EQ(t.skipped, "");
    // The same on the matrices' tiles: only the kernels that read tiles are timed and chosen.
    std::vector<std::unique_ptr<ct::DeviceBuffer<uint8_t>>> tiles;
    std::vector<kc::Int4GroupsMatrix> tiled;
    for (auto& w : weights) {
      tiles.push_back(std::make_unique<ct::DeviceBuffer<uint8_t>>(
          static_cast<size_t>(nibble::kernels::int4_tiles_bytes(n_out, k, group))));
      ASSERT_NE(tiles.back()->ptr, nullptr);
      ASSERT_EQ(kc::int4_tiles_from_groups(w.quants->ptr, w.scales->ptr, w.zeros->ptr, n_out, k, group,
                                           tiles.back()->ptr, stream),
                Status::ok);
      tiled.push_back({tiles.back()->ptr, nullptr, nullptr});
    }
    kc::Int4GroupsTuning on_tiles;
    ASSERT_EQ(kc::tune_int4_groups(tiled, group, n_out, k, &context, stream, on_tiles, error,
                                   kc::Int4Layout::tiles),
              Status::ok)
        << error;
    EXPECT_EQ(on_tiles.skipped, "");
    // The half2 GEMV's block shapes at one row: every one timed at group 128, the fastest kept with its
    // time as the kernel's; elsewhere (group 64, tiles) only the default shape.
    const int half2 = static_cast<int>(kc::Int4Kernel::gemv_half2);
    double fastest = 0.0;
    int fastest_variant = 0;
    for (int v = 0; v < kc::kHalf2GemvVariantCount; ++v) {
      EXPECT_EQ(t.half2_variant_us[v] > 0.0, group == 128) << "shape " << v;
      EXPECT_EQ(on_tiles.half2_variant_us[v], 0.0) << "shape " << v;
      if (t.half2_variant_us[v] > 0.0 && (fastest == 0.0 || t.half2_variant_us[v] < fastest)) {
        fastest = t.half2_variant_us[v];
        fastest_variant = v;
      }
    }
    // The fastest kept where timed again it was still faster than the default shape, else the default.
    EXPECT_TRUE(t.half2_variant == fastest_variant || t.half2_variant == 0) << t.half2_variant;
    EXPECT_EQ(on_tiles.half2_variant, 0);
    EXPECT_GT(t.us[0][half2][0], 0.0);  // the kept shape's (timed again where not the default)
    if (t.half2_variant != 0) {
      EXPECT_LT(t.us[0][half2][0], t.half2_variant_us[0]);
    } else if (group == 128) {
      EXPECT_EQ(t.us[0][half2][0], t.half2_variant_us[0]);
    }
    // The kept shape's product is the default shape's, bit for bit.
    {
      std::vector<uint16_t> x_host(static_cast<size_t>(k));
      std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
      for (auto& v : x_host) v = nibble::kernels::fp32_to_fp16(dist(rng));
      ct::DeviceBuffer<uint16_t> x(x_host.size());
      ct::DeviceBuffer<float> y_default(static_cast<size_t>(n_out)), y_kept(static_cast<size_t>(n_out));
      ASSERT_EQ(cudaMemcpy(x.ptr, x_host.data(), x_host.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
      const kc::Int4GroupsMatrix& w = matrices.front();
      const auto* xh = reinterpret_cast<const __half*>(x.ptr);
      for (const int variant : {0, t.half2_variant}) {
        ASSERT_EQ(kc::launch_int4_kernel(kc::Int4Kernel::gemv_half2, nullptr, w.quants, w.scales, w.zeros,
                                         group, n_out, k, xh, 1, variant == 0 ? y_default.ptr : y_kept.ptr,
                                         stream, false, kc::Int4Layout::rows, nullptr, variant),
                  Status::ok)
            << "shape " << variant;
      }
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      std::vector<float> a(static_cast<size_t>(n_out)), b(a.size());
      ASSERT_EQ(cudaMemcpy(a.data(), y_default.ptr, a.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(b.data(), y_kept.ptr, b.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
    }
    // Decode ranges alone (int4_layout measured's comparison): the same kernels timed there, none above.
    kc::Int4GroupsTuning decode_only;
    ASSERT_EQ(kc::tune_int4_groups(tiled, group, n_out, k, &context, stream, decode_only, error,
                                   kc::Int4Layout::tiles, nullptr, /*ranges=*/2),
              Status::ok)
        << error;
    for (int r = 0; r < kc::kInt4RowRanges; ++r) {
      for (int kernel = 0; kernel < kc::kInt4Kernels; ++kernel) {
        for (int c = 0; c < 2; ++c) {
          EXPECT_EQ(decode_only.us[r][kernel][c] > 0.0, r < 2 && on_tiles.us[r][kernel][c] > 0.0)
              << kernel << " in range " << r;
        }
      }
      if (r >= 2) {
        EXPECT_EQ(decode_only.chosen[r], kc::int4_default_kernels(kc::Int4Layout::tiles)[r]);
      }
    }
    for (int r = 0; r < kc::kInt4RowRanges; ++r) {
      EXPECT_TRUE(kc::int4_kernel_reads(on_tiles.chosen[r], kc::Int4Layout::tiles)) << "range " << r;
      for (int kernel = 0; kernel < kc::kInt4Kernels; ++kernel) {
        const auto which = static_cast<kc::Int4Kernel>(kernel);
        const int64_t rows = kc::kInt4RangeTimedRows[r][0];
        const bool takes = rows <= kc::int4_kernel_max_rows(which) &&
                           rows >= kc::int4_kernel_min_rows(which) && !kc::is_cutlass(which) &&
                           kc::is_w4a16(which);  // no CUTLASS copies given; W4A8 never timed
        if (takes && kc::int4_kernel_reads(which, kc::Int4Layout::tiles))
          EXPECT_GT(on_tiles.us[r][kernel][0], 0.0) << kernel << " at " << rows << " rows";
        else
          EXPECT_EQ(on_tiles.us[r][kernel][0], 0.0) << kernel << " at " << rows << " rows";
      }
    }
    // Every kernel that takes a range's timed rows has a time there; the others none.
    for (int r = 0; r < kc::kInt4RowRanges; ++r) {
      for (int kernel = 0; kernel < kc::kInt4Kernels; ++kernel) {
        for (int c = 0; c < 2; ++c) {
          const int64_t rows = kc::kInt4RangeTimedRows[r][c];
          if (rows == 0) continue;
          const auto which = static_cast<kc::Int4Kernel>(kernel);
          if (rows <= kc::int4_kernel_max_rows(which) && rows >= kc::int4_kernel_min_rows(which) &&
              !kc::is_cutlass(which) && kc::is_w4a16(which))  // W4A8 is never timed
            EXPECT_GT(t.us[r][kernel][c], 0.0) << kernel << " at " << rows << " rows";
          else
            EXPECT_EQ(t.us[r][kernel][c], 0.0) << kernel << " at " << rows << " rows";
        }
      }
    }
    cublasDestroy(cublas);
    cudaStreamDestroy(stream);
    // 256 rows cost more than 1 on the same kernel (a timer that returned noise would not).
    EXPECT_GT(t.us[4][kWmma][0], 0.5 * t.us[0][kWmma][0]);
    kc::Int4GroupsTuning again = t;
    kc::choose_int4_groups_kernels(again);
    for (int r = 0; r < kc::kInt4RowRanges; ++r) EXPECT_EQ(again.chosen[r], t.chosen[r]);
    for (int r = 0; r < kc::kInt4RowRanges; ++r) {
      std::cout << "  rows " << kc::kInt4RangeTimedRows[r][0] << ":";
      for (int kernel = 0; kernel < kc::kInt4Kernels; ++kernel)
        std::cout << " " << kc::int4_kernel_name(static_cast<kc::Int4Kernel>(kernel)) << " "
                  << t.us[r][kernel][0];
      std::cout << " -> " << kc::int4_kernel_name(t.chosen[r]) << "\n";
    }
  }
}

// Given each matrix's CUTLASS copy, the CUTLASS GEMM is timed from 17 rows on, next to the others, and
// can be chosen; without a Hopper GPU and CUTLASS in the build it skips.
TEST(W4A16Tuning, TimesTheCutlassGemmWhereGivenItsCopies) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  if (!kc::w4a16_cutlass_supported())
    GTEST_SKIP() << "no CUTLASS GEMM here (built without it, or not compute 9.0)";
  std::mt19937 rng(9);
  const int64_t n_out = 1024, k = 1536, group = 128;
  std::vector<ct::DeviceInt4Groups> weights(2);
  std::vector<kc::Int4GroupsMatrix> matrices;
  std::vector<ct::CutlassCopy> copies(weights.size());
  std::vector<kc::Int4CutlassWeights> cutlass;
  for (size_t i = 0; i < weights.size(); ++i) {
    ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(n_out, k, group, rng, weights[i]));
    matrices.push_back({weights[i].quants->ptr, weights[i].scales_half(), weights[i].zeros->ptr});
    ASSERT_NO_FATAL_FAILURE(ct::make_cutlass_copy(weights[i], n_out, k, group, copies[i]));
    cutlass.push_back(copies[i].weights);
  }
  kc::Int4GroupsTuning t;
  std::string error;
  ASSERT_EQ(kc::tune_int4_groups(matrices, group, n_out, k, nullptr, nullptr, t, error, kc::Int4Layout::rows,
                                 &cutlass),
            Status::ok)
      << error;
  EXPECT_EQ(t.skipped, "");
  for (const auto which : {kc::Int4Kernel::cutlass_gemm, kc::Int4Kernel::cutlass_gemm_pingpong,
                           kc::Int4Kernel::cutlass_gemm_16rows}) {
    SCOPED_TRACE(kc::int4_kernel_name(which));
    const int index = static_cast<int>(which);
    std::cout << "  " << kc::int4_kernel_name(which) << " us at";
    for (int r = 0; r < kc::kInt4RowRanges; ++r) {
      const int64_t rows = kc::kInt4RangeTimedRows[r][0];
      if (rows >= kc::int4_kernel_min_rows(which) && rows <= kc::int4_kernel_max_rows(which))
        EXPECT_GT(t.us[r][index][0], 0.0) << "range " << r;
      else
        EXPECT_EQ(t.us[r][index][0], 0.0) << "range " << r;
      std::cout << " " << rows << " rows " << t.us[r][index][0] << ";";
    }
    std::cout << "\n";
  }
  // 256 rows cost more than 32 on the same kernel (a timer that returned noise would not).
  const int cooperative = static_cast<int>(kc::Int4Kernel::cutlass_gemm);
  EXPECT_GT(t.us[4][cooperative][0], t.us[2][cooperative][0]);
}

}  // namespace
