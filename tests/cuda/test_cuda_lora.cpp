// LoRA's shrink and expand on the device (kernels/cuda/lora) against the CPU's reference loops
// (kernels::lora_shrink_reference / lora_expand_reference on the same fp16 values widened), on random
// factors of odd sizes and ranks: one call pair for a batch whose rows name different adapters of
// different ranks (Punica's BGMV), an adapter that leaves the product as it is, the base alone and slots
// past the table. Each adapted row gets its own adapter's update; every other row, and in a stacked
// output the columns outside the range, stays as it was. Bound: fp32 sums in another order (the inputs
// in splits of 256, and FMA contraction) against the reference's, within 1e-5 of each sum's sum of
// |terms|. A row's bits do not depend on the batch. Skips when there is no CUDA device.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
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

// The adapters of one product on the device, and the slot table the kernels read (kc::LoraSlots).
// ranks[a - 1] == 0: adapter a leaves this product as it is (a null a_t and b_t).
struct AdapterSet {
  int64_t k = 0, n_out = 0, max_rank = 0;
  std::vector<int64_t> ranks;
  std::vector<float> scales;
  std::vector<std::vector<uint16_t>> a_t, b_t;  // [k, rank] and [rank, n_out] fp16 bits per adapter
  std::vector<std::unique_ptr<DeviceBuffer<uint16_t>>> a_d, b_d;
  std::unique_ptr<DeviceBuffer<const __half*>> a_ptrs, b_ptrs;
  std::unique_ptr<DeviceBuffer<int32_t>> ranks_d;
  std::unique_ptr<DeviceBuffer<float>> scales_d;

  AdapterSet(int64_t k_, int64_t n_out_, const std::vector<int64_t>& ranks_, int64_t extra_rank,
             std::mt19937& rng)
      : k(k_), n_out(n_out_), ranks(ranks_) {
    std::vector<const __half*> a_host, b_host;
    std::vector<int32_t> rank_host;
    for (size_t a = 0; a < ranks.size(); ++a) {
      const int64_t rank = ranks[a];
      max_rank = std::max(max_rank, rank);
      scales.push_back(0.5f + 0.25f * static_cast<float>(a));
      a_t.push_back(random_f16(static_cast<size_t>(k * rank), 0.05f, rng));
      b_t.push_back(random_f16(static_cast<size_t>(rank * n_out), 0.05f, rng));
      a_d.push_back(std::make_unique<DeviceBuffer<uint16_t>>(a_t.back()));
      b_d.push_back(std::make_unique<DeviceBuffer<uint16_t>>(b_t.back()));
      a_host.push_back(rank == 0 ? nullptr : as_half(a_d.back()->ptr));
      b_host.push_back(rank == 0 ? nullptr : as_half(b_d.back()->ptr));
      rank_host.push_back(static_cast<int32_t>(rank));
    }
    max_rank += extra_rank;  // the table may be sized past every rank
    a_ptrs = std::make_unique<DeviceBuffer<const __half*>>(a_host);
    b_ptrs = std::make_unique<DeviceBuffer<const __half*>>(b_host);
    ranks_d = std::make_unique<DeviceBuffer<int32_t>>(rank_host);
    scales_d = std::make_unique<DeviceBuffer<float>>(scales);
  }
  kc::LoraSlots slots() const {
    kc::LoraSlots t;
    t.a_t = a_ptrs->ptr;
    t.b_t = b_ptrs->ptr;
    t.rank = ranks_d->ptr;
    t.scale = scales_d->ptr;
    t.slots = static_cast<int32_t>(ranks.size());
    t.max_rank = max_rank;
    return t;
  }
  // The adapter row r takes (0: none), as the kernels decide it.
  int32_t adapter_of(int32_t named) const {
    if (named < 1 || named > static_cast<int32_t>(ranks.size())) return 0;
    return ranks[static_cast<size_t>(named - 1)] == 0 ? 0 : named;
  }
};

// One shrink + expand call pair over rows x (stride ldx) into y's columns col.. (stride ldy): ax and y
// back. ax starts as `sentinel`; the scratch is exactly sized and NaN-filled (a partial not written shows).
void run_pair(const AdapterSet& set, const std::vector<int32_t>& row_adapter, const std::vector<uint16_t>& x,
              int64_t ldx, const std::vector<float>& y0, int64_t ldy, int64_t col, float sentinel,
              std::vector<float>& ax, std::vector<float>& y) {
  const auto n = static_cast<int64_t>(row_adapter.size());
  DeviceBuffer<uint16_t> x_d(x);
  DeviceBuffer<int32_t> rows_d(row_adapter);
  DeviceBuffer<float> ax_d(std::vector<float>(static_cast<size_t>(n * set.max_rank), sentinel)), y_d(y0);
  const size_t work_bytes = kc::lora_shrink_workspace_bytes(n, set.k, set.max_rank);
  ASSERT_EQ(work_bytes, static_cast<size_t>(n * ((set.k + 255) / 256) * set.max_rank) * sizeof(float));
  DeviceBuffer<uint8_t> work_d(work_bytes);
  ASSERT_EQ(cudaMemset(work_d.ptr, 0xff, work_bytes), cudaSuccess);
  ASSERT_EQ(kc::lora_shrink_f16(set.slots(), set.k, as_half(x_d.ptr), ldx, rows_d.ptr, n, ax_d.ptr,
                                work_d.ptr, work_bytes, nullptr),
            k::Status::ok);
  ASSERT_EQ(kc::lora_expand_f16(set.slots(), set.n_out, ax_d.ptr, rows_d.ptr, n, y_d.ptr + col, ldy, nullptr),
            k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ax = ax_d.to_host();
  y = y_d.to_host();
}

TEST(CudaLora, OneCallPairGivesEachRowItsOwnAdaptersUpdate) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(21);
  struct Case {
    int64_t k, n_out;
    std::vector<int64_t> ranks;  // per slot; 0: that adapter leaves this product as it is
    int64_t extra_rank;
  };
  // k of 333, 2048 and 96: 2, 8 and 1 splits of 256 inputs.
  for (const Case& cs :
       {Case{333, 999, {17, 5, 0}, 0}, Case{2048, 257, {64, 33, 0}, 3}, Case{96, 4096, {200, 1, 0}, 0}}) {
    SCOPED_TRACE("k " + std::to_string(cs.k) + " n_out " + std::to_string(cs.n_out) + " ranks " +
                 std::to_string(cs.ranks[0]) + ", " + std::to_string(cs.ranks[1]));
    const AdapterSet set(cs.k, cs.n_out, cs.ranks, cs.extra_rank, rng);
    // Adapters 1 and 2, the base (0), adapter 3 (not this product), past the table (4, -1).
    const std::vector<int32_t> row_adapter = {1, 0, 2, 1, 3, 2, 4, 1, -1};
    const auto n = static_cast<int64_t>(row_adapter.size());
    const int64_t ldx = cs.k + 5, ldy = cs.n_out + 6, col = 3;  // y's columns col .. col + n_out - 1
    const std::vector<uint16_t> x = random_f16(static_cast<size_t>(n * ldx), 1.0f, rng);
    std::vector<float> y0(static_cast<size_t>(n * ldy));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (auto& v : y0) v = normal(rng);
    const float kSentinel = -12345.0f;
    std::vector<float> ax, y;
    ASSERT_NO_FATAL_FAILURE(run_pair(set, row_adapter, x, ldx, y0, ldy, col, kSentinel, ax, y));
    ASSERT_EQ(ax.size(), static_cast<size_t>(n * set.max_rank));
    ASSERT_EQ(y.size(), y0.size());

    for (int64_t r = 0; r < n; ++r) {
      SCOPED_TRACE("row " + std::to_string(r));
      const int32_t a = set.adapter_of(row_adapter[static_cast<size_t>(r)]);
      if (a == 0) {  // no update: ax not written, y as it was
        for (int64_t j = 0; j < set.max_rank; ++j)
          ASSERT_EQ(ax[static_cast<size_t>(r * set.max_rank + j)], kSentinel);
        for (int64_t o = 0; o < ldy; ++o)
          ASSERT_EQ(y[static_cast<size_t>(r * ldy + o)], y0[static_cast<size_t>(r * ldy + o)])
              << "column " << o;
        continue;
      }
      const size_t ai = static_cast<size_t>(a - 1);
      const int64_t rank = set.ranks[ai];
      const float scale = set.scales[ai];
      const std::vector<uint16_t>& a_t = set.a_t[ai];
      const std::vector<uint16_t>& b_t = set.b_t[ai];
      // The reference on this row: x widened, y's columns packed.
      std::vector<float> xf(static_cast<size_t>(cs.k)), yf(static_cast<size_t>(cs.n_out));
      for (int64_t c = 0; c < cs.k; ++c)
        xf[static_cast<size_t>(c)] = k::fp16_to_fp32(x[static_cast<size_t>(r * ldx + c)]);
      for (int64_t o = 0; o < cs.n_out; ++o)
        yf[static_cast<size_t>(o)] = y0[static_cast<size_t>(r * ldy + col + o)];
      const int64_t row0 = 0;
      std::vector<float> want_ax(static_cast<size_t>(rank));
      ASSERT_EQ(k::lora_shrink_reference(a_t.data(), cs.k, rank, scale, xf.data(), &row0, 1, want_ax.data()),
                k::Status::ok);
      std::vector<float> got_ax(static_cast<size_t>(rank));
      for (int64_t j = 0; j < rank; ++j) {
        got_ax[static_cast<size_t>(j)] = ax[static_cast<size_t>(r * set.max_rank + j)];
        double mag = 0.0;
        for (int64_t c = 0; c < cs.k; ++c)
          mag += std::fabs(static_cast<double>(k::fp16_to_fp32(a_t[static_cast<size_t>(c * rank + j)])) *
                           xf[static_cast<size_t>(c)]);
        ASSERT_NEAR(got_ax[static_cast<size_t>(j)], want_ax[static_cast<size_t>(j)],
                    1e-5 * std::fabs(scale) * mag + 1e-30)
            << "rank " << j;
      }
      for (int64_t j = rank; j < set.max_rank; ++j)  // past its adapter's ranks: not written
        ASSERT_EQ(ax[static_cast<size_t>(r * set.max_rank + j)], kSentinel) << "rank " << j;
      // The expand reference from the device's own ax, so that its bound is its own sums'.
      ASSERT_EQ(k::lora_expand_reference(b_t.data(), rank, cs.n_out, got_ax.data(), &row0, 1, yf.data()),
                k::Status::ok);
      for (int64_t o = 0; o < ldy; ++o) {
        const float got = y[static_cast<size_t>(r * ldy + o)], before = y0[static_cast<size_t>(r * ldy + o)];
        if (o < col || o >= col + cs.n_out) {
          ASSERT_EQ(got, before) << "column " << o << " outside the range";
          continue;
        }
        double mag = std::fabs(before);
        for (int64_t j = 0; j < rank; ++j)
          mag += std::fabs(
              static_cast<double>(k::fp16_to_fp32(b_t[static_cast<size_t>(j * cs.n_out + o - col)])) *
              got_ax[static_cast<size_t>(j)]);
        ASSERT_NEAR(got, yf[static_cast<size_t>(o - col)], 1e-5 * mag) << "output " << o - col;
      }
    }

    // Row 2 (adapter 2) alone: the same bits as in the batch of other adapters.
    const std::vector<int32_t> alone = {2};
    const std::vector<uint16_t> x2(x.begin() + 2 * ldx, x.begin() + 3 * ldx);
    const std::vector<float> y2(y0.begin() + 2 * ldy, y0.begin() + 3 * ldy);
    std::vector<float> ax_alone, y_alone;
    ASSERT_NO_FATAL_FAILURE(run_pair(set, alone, x2, ldx, y2, ldy, col, kSentinel, ax_alone, y_alone));
    for (int64_t j = 0; j < set.max_rank; ++j)
      ASSERT_EQ(ax_alone[static_cast<size_t>(j)], ax[static_cast<size_t>(2 * set.max_rank + j)])
          << "rank " << j;
    for (int64_t o = 0; o < ldy; ++o)
      ASSERT_EQ(y_alone[static_cast<size_t>(o)], y[static_cast<size_t>(2 * ldy + o)]) << "column " << o;
  }
}

TEST(CudaLora, RefusesBadArguments) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(3);
  const AdapterSet set(16, 16, {4}, 0, rng);
  DeviceBuffer<uint16_t> h(4096);
  DeviceBuffer<float> f(4096);
  DeviceBuffer<int32_t> rows(std::vector<int32_t>(4, 1));
  const __half* hp = as_half(h.ptr);
  const kc::LoraSlots t = set.slots();
  const size_t work = kc::lora_shrink_workspace_bytes(4, 16, 4);
  EXPECT_EQ(kc::lora_shrink_f16(t, 16, hp, 16, rows.ptr, 4, f.ptr, f.ptr + 2048, work, nullptr),
            k::Status::ok);
  EXPECT_EQ(kc::lora_shrink_f16(t, 16, hp, 8, rows.ptr, 4, f.ptr, f.ptr + 2048, work, nullptr),
            k::Status::invalid_argument)
      << "ldx below k";
  kc::LoraSlots bad = t;
  bad.max_rank = kc::kLoraMaxRank + 1;
  EXPECT_EQ(kc::lora_shrink_f16(bad, 16, hp, 16, rows.ptr, 4, f.ptr, f.ptr + 2048, 1 << 20, nullptr),
            k::Status::invalid_argument);
  bad = t;
  bad.rank = nullptr;
  EXPECT_EQ(kc::lora_shrink_f16(bad, 16, hp, 16, rows.ptr, 4, f.ptr, f.ptr + 2048, work, nullptr),
            k::Status::invalid_argument)
      << "no table of ranks";
  bad = t;
  bad.slots = 0;
  EXPECT_EQ(kc::lora_expand_f16(bad, 16, f.ptr, rows.ptr, 4, f.ptr, 16, nullptr), k::Status::invalid_argument)
      << "no slot";
  EXPECT_EQ(kc::lora_shrink_f16(t, 16, hp, 16, rows.ptr, 4, f.ptr, f.ptr + 2048, work - 4, nullptr),
            k::Status::invalid_argument)
      << "scratch too small";
  EXPECT_EQ(kc::lora_shrink_f16(t, 16, hp, 16, rows.ptr, 4, f.ptr, nullptr, work, nullptr),
            k::Status::invalid_argument)
      << "no scratch";
  EXPECT_EQ(kc::lora_shrink_workspace_bytes(4, 0, 4), 0u);
  EXPECT_EQ(kc::lora_expand_f16(t, 16, f.ptr, nullptr, 4, f.ptr, 16, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(kc::lora_expand_f16(t, 16, f.ptr, rows.ptr, 4, f.ptr, 15, nullptr), k::Status::invalid_argument)
      << "ldy below n_out";
  EXPECT_EQ(kc::lora_expand_f16(t, 16, f.ptr, rows.ptr, 0, f.ptr, 16, nullptr), k::Status::ok) << "no rows";
  EXPECT_EQ(kc::lora_expand_f16(t, kc::kLoraMaxOutputs + 1, f.ptr, rows.ptr, 4, f.ptr,
                                kc::kLoraMaxOutputs + 1, nullptr),
            k::Status::invalid_argument);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
