// LoRA's shrink and expand on the device (kernels/cuda/lora) against the CPU's reference loops
// (kernels::lora_shrink_reference / lora_expand_reference on the same fp16 values widened), on random
// factors of odd sizes and ranks, a batch whose rows name different adapters: only the rows of the
// adapter asked for change, and in a stacked output only the columns given. Bound: fp32 sums in another
// order (the inputs in splits of 256, and FMA contraction) against the reference's, within 1e-5 of each
// sum's sum of |terms|. Skips when there is no CUDA device.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cuda/lora.cuh"
#include "kernels/lora.hpp"
#include "kernels/quant_types.hpp"
#include "tests/cuda/cuda_test_util.hpp"

namespace k = nibble::kernels;
namespace kc = nibble::kernels::cuda;
using nibble::cuda_test::DeviceBuffer;
using nibble::cuda_test::random_f16;

namespace {

const __half* as_half(const uint16_t* p) { return reinterpret_cast<const __half*>(p); }

TEST(CudaLora, ShrinkAndExpandMatchTheCpuReferenceForTheAdaptersRows) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(21);
  for (const auto& [kk, rank, n_out] : {std::tuple{int64_t{333}, int64_t{17}, int64_t{999}},
                                        std::tuple{int64_t{2048}, int64_t{64}, int64_t{257}},
                                        std::tuple{int64_t{96}, int64_t{200}, int64_t{4096}}}) {
    SCOPED_TRACE("k " + std::to_string(kk) + " rank " + std::to_string(rank) + " n_out " +
                 std::to_string(n_out));
    const int64_t n = 7, ldx = kk + 5, ldy = n_out + 6, col = 3;  // y's columns col .. col + n_out - 1
    const std::vector<int32_t> row_adapter = {1, 0, 2, 1, 1, 0, 2};
    const int32_t adapter = 1;
    const float scale = 0.75f;
    const std::vector<uint16_t> a_t = random_f16(static_cast<size_t>(kk * rank), 0.05f, rng);
    const std::vector<uint16_t> b_t = random_f16(static_cast<size_t>(rank * n_out), 0.05f, rng);
    const std::vector<uint16_t> x = random_f16(static_cast<size_t>(n * ldx), 1.0f, rng);
    std::vector<float> y0(static_cast<size_t>(n * ldy));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (auto& v : y0) v = normal(rng);
    const float kSentinel = -12345.0f;

    DeviceBuffer<uint16_t> a_d(a_t), b_d(b_t), x_d(x);
    DeviceBuffer<int32_t> rows_d(row_adapter);
    DeviceBuffer<float> ax_d(std::vector<float>(static_cast<size_t>(n * rank), kSentinel)), y_d(y0);
    // The split partials' scratch, exactly sized (k = 333 and 2048 cut into 2 and 8 splits of 256 inputs).
    const size_t work_bytes = kc::lora_shrink_workspace_bytes(n, kk, rank);
    ASSERT_EQ(work_bytes, static_cast<size_t>(n * ((kk + 255) / 256) * rank) * sizeof(float));
    DeviceBuffer<uint8_t> work_d(work_bytes);
    ASSERT_EQ(cudaMemset(work_d.ptr, 0xff, work_bytes), cudaSuccess);  // NaN: a partial not written shows
    ASSERT_EQ(kc::lora_shrink_f16(as_half(a_d.ptr), kk, rank, scale, as_half(x_d.ptr), ldx, rows_d.ptr,
                                  adapter, n, ax_d.ptr, work_d.ptr, work_bytes, nullptr),
              k::Status::ok);
    ASSERT_EQ(kc::lora_expand_f16(as_half(b_d.ptr), rank, n_out, ax_d.ptr, rows_d.ptr, adapter, n,
                                  y_d.ptr + col, ldy, nullptr),
              k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> ax = ax_d.to_host(), y = y_d.to_host();

    // The reference on the adapter's rows: x widened, packed [rows, k]; y's columns packed [rows, n_out].
    std::vector<int64_t> mine;
    for (int64_t r = 0; r < n; ++r)
      if (row_adapter[static_cast<size_t>(r)] == adapter) mine.push_back(r);
    std::vector<float> xf(static_cast<size_t>(n * kk)), yf(static_cast<size_t>(n * n_out));
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < kk; ++c)
        xf[static_cast<size_t>(r * kk + c)] = k::fp16_to_fp32(x[static_cast<size_t>(r * ldx + c)]);
      for (int64_t o = 0; o < n_out; ++o)
        yf[static_cast<size_t>(r * n_out + o)] = y0[static_cast<size_t>(r * ldy + col + o)];
    }
    std::vector<float> want_ax(mine.size() * static_cast<size_t>(rank));
    ASSERT_EQ(k::lora_shrink_reference(a_t.data(), kk, rank, scale, xf.data(), mine.data(),
                                       static_cast<int64_t>(mine.size()), want_ax.data()),
              k::Status::ok);
    // The expand reference from the device's own ax, so that its bound is its own sums'.
    std::vector<float> got_ax(want_ax.size());
    for (size_t i = 0; i < mine.size(); ++i)
      for (int64_t j = 0; j < rank; ++j)
        got_ax[i * static_cast<size_t>(rank) + static_cast<size_t>(j)] =
            ax[static_cast<size_t>(mine[i] * rank + j)];
    ASSERT_EQ(k::lora_expand_reference(b_t.data(), rank, n_out, got_ax.data(), mine.data(),
                                       static_cast<int64_t>(mine.size()), yf.data()),
              k::Status::ok);

    for (size_t i = 0; i < mine.size(); ++i) {
      const int64_t r = mine[i];
      for (int64_t j = 0; j < rank; ++j) {
        double mag = 0.0;
        for (int64_t c = 0; c < kk; ++c)
          mag += std::fabs(static_cast<double>(k::fp16_to_fp32(a_t[static_cast<size_t>(c * rank + j)])) *
                           xf[static_cast<size_t>(r * kk + c)]);
        ASSERT_NEAR(ax[static_cast<size_t>(r * rank + j)], want_ax[i * static_cast<size_t>(rank) + j],
                    1e-5 * std::fabs(scale) * mag + 1e-30)
            << "row " << r << " rank " << j;
      }
      for (int64_t o = 0; o < n_out; ++o) {
        double mag = std::fabs(y0[static_cast<size_t>(r * ldy + col + o)]);
        for (int64_t j = 0; j < rank; ++j)
          mag += std::fabs(static_cast<double>(k::fp16_to_fp32(b_t[static_cast<size_t>(j * n_out + o)])) *
                           got_ax[i * static_cast<size_t>(rank) + static_cast<size_t>(j)]);
        ASSERT_NEAR(y[static_cast<size_t>(r * ldy + col + o)], yf[static_cast<size_t>(r * n_out + o)],
                    1e-5 * mag)
            << "row " << r << " output " << o;
      }
    }
    // Other adapters' rows: ax not written, y as it was; the columns outside the range untouched.
    for (int64_t r = 0; r < n; ++r) {
      const bool adapted = row_adapter[static_cast<size_t>(r)] == adapter;
      for (int64_t j = 0; j < rank && !adapted; ++j)
        ASSERT_EQ(ax[static_cast<size_t>(r * rank + j)], kSentinel);
      for (int64_t o = 0; o < ldy; ++o) {
        if (adapted && o >= col && o < col + n_out) continue;
        ASSERT_EQ(y[static_cast<size_t>(r * ldy + o)], y0[static_cast<size_t>(r * ldy + o)])
            << "row " << r << " column " << o;
      }
    }
  }
}

TEST(CudaLora, RefusesBadArguments) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  DeviceBuffer<uint16_t> h(4096);
  DeviceBuffer<float> f(4096);
  DeviceBuffer<int32_t> rows(std::vector<int32_t>(4, 1));
  const __half* hp = as_half(h.ptr);
  const size_t work = kc::lora_shrink_workspace_bytes(4, 16, 4);
  EXPECT_EQ(kc::lora_shrink_f16(hp, 16, 4, 1.0f, hp, 16, rows.ptr, 1, 4, f.ptr, f.ptr + 2048, work, nullptr),
            k::Status::ok);
  EXPECT_EQ(kc::lora_shrink_f16(hp, 16, 4, 1.0f, hp, 8, rows.ptr, 1, 4, f.ptr, f.ptr + 2048, work, nullptr),
            k::Status::invalid_argument)
      << "ldx below k";
  EXPECT_EQ(kc::lora_shrink_f16(hp, 16, kc::kLoraMaxRank + 1, 1.0f, hp, 16, rows.ptr, 1, 4, f.ptr,
                                f.ptr + 2048, 1 << 20, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(
      kc::lora_shrink_f16(hp, 16, 4, 1.0f, hp, 16, rows.ptr, 1, 4, f.ptr, f.ptr + 2048, work - 4, nullptr),
      k::Status::invalid_argument)
      << "scratch too small";
  EXPECT_EQ(kc::lora_shrink_f16(hp, 16, 4, 1.0f, hp, 16, rows.ptr, 1, 4, f.ptr, nullptr, work, nullptr),
            k::Status::invalid_argument)
      << "no scratch";
  EXPECT_EQ(kc::lora_shrink_workspace_bytes(4, 0, 4), 0u);
  EXPECT_EQ(kc::lora_expand_f16(hp, 4, 16, f.ptr, nullptr, 1, 4, f.ptr, 16, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(kc::lora_expand_f16(hp, 4, 16, f.ptr, rows.ptr, 1, 4, f.ptr, 15, nullptr),
            k::Status::invalid_argument)
      << "ldy below n_out";
  EXPECT_EQ(kc::lora_expand_f16(hp, 4, 16, f.ptr, rows.ptr, 1, 0, f.ptr, 16, nullptr), k::Status::ok)
      << "no rows";
  EXPECT_EQ(kc::lora_expand_f16(hp, 4, kc::kLoraMaxOutputs + 1, f.ptr, rows.ptr, 1, 4, f.ptr,
                                kc::kLoraMaxOutputs + 1, nullptr),
            k::Status::invalid_argument);
}

}  // namespace
