// LoRA's update on the device (kernels/cuda/lora: lora_add_f16) against the CPU's reference loops
// (kernels::lora_shrink_reference / lora_expand_reference on the same fp16 values widened), on random
// factors of odd sizes and ranks: one call for a batch whose rows name different adapters of different
// ranks (Punica's BGMV) and for up to three products that read the same input (a layer's q, k and v), an
// adapter that leaves a product as it is, the base alone and slots past the table. Each adapted row gets
// its own adapter's update in each product's outputs (the products stacked in one row of y, and apart,
// each with a stride of its own); every other row, and every float outside the products' outputs, stays
// as it was. Bound: fp32 sums in another order (the inputs in splits of 256, and FMA contraction)
// against the reference's, within 1e-5 of each sum's sum of |terms|, carried through the expand. A
// row's bits depend neither on the batch nor on the group's other products. Skips when there is no CUDA
// device.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
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
      a_t.push_back(random_f16(static_cast<size_t>(k * std::max<int64_t>(rank, 1)), 0.05f, rng));
      b_t.push_back(random_f16(static_cast<size_t>(std::max<int64_t>(rank, 1) * n_out), 0.05f, rng));
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

// Where each product's outputs sit in y: row r's output o of product i at offset[i] + r * ld[i] + o
// (stacked: one row of y holds every product's columns; apart: a region a product, as the model's
// unstacked q, k and v).
struct Layout {
  std::vector<int64_t> offset, ld;
  int64_t size = 0;  // y's floats, some in no product's outputs
  size_t at(size_t i, int64_t r, int64_t o) const { return static_cast<size_t>(offset[i] + r * ld[i] + o); }
};

Layout stacked(const std::vector<const AdapterSet*>& sets, int64_t n) {
  Layout l;
  int64_t ldy = 3;  // each row's columns 0-2 and the last 6 belong to no product
  for (const AdapterSet* set : sets) {
    l.offset.push_back(ldy);
    ldy += set->n_out;
  }
  ldy += 6;
  l.ld.assign(sets.size(), ldy);
  l.size = n * ldy;
  return l;
}

Layout apart(const std::vector<const AdapterSet*>& sets, int64_t n) {
  Layout l;
  int64_t at = 5;
  for (size_t i = 0; i < sets.size(); ++i) {
    l.offset.push_back(at);
    l.ld.push_back(sets[i]->n_out + 2 + static_cast<int64_t>(i));  // a stride of its own
    at += n * l.ld.back() + 7;
  }
  l.size = at;
  return l;
}

// One lora_add_f16 call over rows x (stride ldx) for the products sets[i], into y as `layout` places them:
// y back. The scratch is exactly sized and NaN-filled (a partial not written shows).
void run_group(const std::vector<const AdapterSet*>& sets, const Layout& layout,
               const std::vector<int32_t>& row_adapter, const std::vector<uint16_t>& x, int64_t ldx,
               const std::vector<float>& y0, std::vector<float>& y) {
  const auto n = static_cast<int64_t>(row_adapter.size());
  DeviceBuffer<uint16_t> x_d(x);
  DeviceBuffer<int32_t> rows_d(row_adapter);
  DeviceBuffer<float> y_d(y0);
  kc::LoraGroup group;
  int64_t max_rank = 0;
  for (size_t i = 0; i < sets.size(); ++i) {
    group.targets[i] = {sets[i]->slots(), sets[i]->n_out, y_d.ptr + layout.offset[i], layout.ld[i]};
    max_rank = std::max(max_rank, sets[i]->max_rank);
  }
  group.count = static_cast<int>(sets.size());
  const int64_t kk = sets.front()->k;
  const size_t work_bytes = kc::lora_workspace_bytes(n, kk, max_rank, group.count);
  ASSERT_EQ(work_bytes, static_cast<size_t>(n * group.count * ((kk + 255) / 256) * max_rank) * sizeof(float));
  DeviceBuffer<uint8_t> work_d(std::max<size_t>(work_bytes, 1));
  ASSERT_EQ(cudaMemset(work_d.ptr, 0xff, work_d.count), cudaSuccess);
  ASSERT_EQ(
      kc::lora_add_f16(group, kk, as_half(x_d.ptr), ldx, rows_d.ptr, n, work_d.ptr, work_bytes, nullptr),
      k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  y = y_d.to_host();
}

// Row r's outputs against the reference: each product's its adapter's update of y0 within the bound, or
// y0's bits where the row's adapter leaves that product as it is. Marks them in `covered`.
void expect_row(const std::vector<const AdapterSet*>& sets, const Layout& layout, int64_t r, int32_t named,
                const uint16_t* xr, const std::vector<float>& y0, const std::vector<float>& y,
                std::vector<bool>& covered) {
  for (size_t i = 0; i < sets.size(); ++i) {
    SCOPED_TRACE("product " + std::to_string(i));
    const AdapterSet& set = *sets[i];
    for (int64_t o = 0; o < set.n_out; ++o) covered[layout.at(i, r, o)] = true;
    const int32_t a = set.adapter_of(named);
    if (a == 0) {  // no update of this product
      for (int64_t o = 0; o < set.n_out; ++o)
        ASSERT_EQ(y[layout.at(i, r, o)], y0[layout.at(i, r, o)])
            << "output " << o << " of a product the row's adapter leaves as it is";
      continue;
    }
    const size_t ai = static_cast<size_t>(a - 1);
    const int64_t rank = set.ranks[ai];
    const float scale = set.scales[ai];
    const std::vector<uint16_t>& a_t = set.a_t[ai];
    const std::vector<uint16_t>& b_t = set.b_t[ai];
    std::vector<float> xf(static_cast<size_t>(set.k)), want(static_cast<size_t>(set.n_out));
    for (int64_t c = 0; c < set.k; ++c) xf[static_cast<size_t>(c)] = k::fp16_to_fp32(xr[c]);
    for (int64_t o = 0; o < set.n_out; ++o) want[static_cast<size_t>(o)] = y0[layout.at(i, r, o)];
    const int64_t row0 = 0;
    std::vector<float> ax(static_cast<size_t>(rank));
    ASSERT_EQ(k::lora_shrink_reference(a_t.data(), set.k, rank, scale, xf.data(), &row0, 1, ax.data()),
              k::Status::ok);
    // Each rank's bound: 1e-5 of |scale| sum |a x| (the device's ax may differ by that).
    std::vector<double> ax_bound(static_cast<size_t>(rank));
    for (int64_t j = 0; j < rank; ++j) {
      double mag = 0.0;
      for (int64_t c = 0; c < set.k; ++c)
        mag += std::fabs(static_cast<double>(k::fp16_to_fp32(a_t[static_cast<size_t>(c * rank + j)])) *
                         xf[static_cast<size_t>(c)]);
      ax_bound[static_cast<size_t>(j)] = 1e-5 * std::fabs(scale) * mag;
    }
    ASSERT_EQ(k::lora_expand_reference(b_t.data(), rank, set.n_out, ax.data(), &row0, 1, want.data()),
              k::Status::ok);
    double moved = 0.0;
    for (int64_t o = 0; o < set.n_out; ++o) {
      const float before = y0[layout.at(i, r, o)], got = y[layout.at(i, r, o)];
      double bound = std::fabs(before);
      for (int64_t j = 0; j < rank; ++j) {
        const double b = std::fabs(k::fp16_to_fp32(b_t[static_cast<size_t>(j * set.n_out + o)]));
        bound += b * (std::fabs(ax[static_cast<size_t>(j)]) + 1e5 * ax_bound[static_cast<size_t>(j)]);
      }
      ASSERT_NEAR(got, want[static_cast<size_t>(o)], 1e-5 * bound + 1e-30) << "output " << o;
      moved += std::fabs(got - before);
    }
    ASSERT_GT(moved, 0.0) << "no update";
  }
}

TEST(CudaLora, OneCallGivesEachRowItsOwnAdaptersUpdateInEveryProductOfTheGroup) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(21);
  struct Product {
    int64_t n_out;
    std::vector<int64_t> ranks;  // per slot; 0: that adapter leaves this product as it is
    int64_t extra_rank;
  };
  struct Case {
    int64_t k;
    std::vector<Product> products;
  };
  // k of 333, 2048, 96 and 2400: 2, 8, 1 and 10 splits of 256 inputs. Three products (q, k, v), two (gate,
  // up), one.
  const std::vector<Case> cases = {
      Case{333, {{999, {17, 5, 0}, 0}, {130, {3, 0, 9}, 0}, {77, {0, 40, 2}, 5}}},
      Case{2048, {{257, {64, 33, 0}, 3}, {300, {1, 0, 65}, 0}}},
      Case{96, {{4096, {200, 1, 0}, 0}}},
      // Rank 300 (the expand's rank loop twice a thread), 10 splits (the split sum's unrolled and tail
      // loops).
      Case{2400, {{300, {300, 7, 0}, 0}, {513, {0, 260, 1}, 0}}},
  };
  // Adapters 1, 2 and 3, the base (0), past the table (4, -1).
  const std::vector<int32_t> row_adapter = {1, 0, 2, 1, 3, 2, 4, 1, -1, 3};
  const auto n = static_cast<int64_t>(row_adapter.size());
  for (const Case& cs : cases) {
    std::vector<std::unique_ptr<AdapterSet>> owned;
    std::vector<const AdapterSet*> sets;
    for (const Product& p : cs.products) {
      owned.push_back(std::make_unique<AdapterSet>(cs.k, p.n_out, p.ranks, p.extra_rank, rng));
      sets.push_back(owned.back().get());
    }
    const int64_t ldx = cs.k + 5;
    const std::vector<uint16_t> x = random_f16(static_cast<size_t>(n * ldx), 1.0f, rng);
    for (const bool is_stacked : {true, false}) {
      SCOPED_TRACE("k " + std::to_string(cs.k) + ", " + std::to_string(cs.products.size()) + " products " +
                   (is_stacked ? "stacked" : "apart"));
      const Layout layout = is_stacked ? stacked(sets, n) : apart(sets, n);
      std::vector<float> y0(static_cast<size_t>(layout.size));
      std::normal_distribution<float> normal(0.0f, 1.0f);
      for (auto& v : y0) v = normal(rng);
      std::vector<float> y;
      ASSERT_NO_FATAL_FAILURE(run_group(sets, layout, row_adapter, x, ldx, y0, y));
      ASSERT_EQ(y.size(), y0.size());
      std::vector<bool> covered(y.size(), false);
      for (int64_t r = 0; r < n; ++r) {
        SCOPED_TRACE("row " + std::to_string(r));
        ASSERT_NO_FATAL_FAILURE(expect_row(sets, layout, r, row_adapter[static_cast<size_t>(r)],
                                           &x[static_cast<size_t>(r * ldx)], y0, y, covered));
      }
      for (size_t e = 0; e < y.size(); ++e) {
        if (covered[e]) continue;
        ASSERT_EQ(y[e], y0[e]) << "float " << e << " is no product's output";
      }

      // Row 2 (adapter 2) alone: the same bits as in the batch of other adapters.
      const Layout one = is_stacked ? stacked(sets, 1) : apart(sets, 1);
      std::vector<float> y2(static_cast<size_t>(one.size), 0.0f), y_alone;
      for (size_t i = 0; i < sets.size(); ++i)
        for (int64_t o = 0; o < sets[i]->n_out; ++o) y2[one.at(i, 0, o)] = y0[layout.at(i, 2, o)];
      const std::vector<uint16_t> x2(x.begin() + 2 * ldx, x.begin() + 3 * ldx);
      ASSERT_NO_FATAL_FAILURE(run_group(sets, one, {2}, x2, ldx, y2, y_alone));
      for (size_t i = 0; i < sets.size(); ++i)
        for (int64_t o = 0; o < sets[i]->n_out; ++o)
          ASSERT_EQ(y_alone[one.at(i, 0, o)], y[layout.at(i, 2, o)]) << "product " << i << " output " << o;
      // Each product alone (a group of one, in reverse order onto the previous product's output): the
      // same bits as in the group.
      if (sets.size() > 1) {
        std::vector<float> y_each = y0;
        for (size_t i = sets.size(); i-- > 0;) {
          const Layout single{{layout.offset[i]}, {layout.ld[i]}, layout.size};
          std::vector<float> next;
          ASSERT_NO_FATAL_FAILURE(run_group({sets[i]}, single, row_adapter, x, ldx, y_each, next));
          y_each = std::move(next);
        }
        for (size_t e = 0; e < y.size(); ++e) ASSERT_EQ(y_each[e], y[e]) << "float " << e;
      }
    }
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
  kc::LoraGroup group;
  group.targets[0] = {set.slots(), 16, f.ptr, 16};
  group.count = 1;
  const size_t work = kc::lora_workspace_bytes(4, 16, 4, 1);
  void* scratch = f.ptr + 2048;
  EXPECT_EQ(kc::lora_add_f16(group, 16, hp, 16, rows.ptr, 4, scratch, work, nullptr), k::Status::ok);
  EXPECT_EQ(kc::lora_add_f16(group, 16, hp, 8, rows.ptr, 4, scratch, work, nullptr),
            k::Status::invalid_argument)
      << "ldx below k";
  EXPECT_EQ(kc::lora_add_f16(group, 16, hp, 16, rows.ptr, 4, scratch, work - 4, nullptr),
            k::Status::invalid_argument)
      << "scratch too small";
  EXPECT_EQ(kc::lora_add_f16(group, 16, hp, 16, rows.ptr, 4, nullptr, work, nullptr),
            k::Status::invalid_argument)
      << "no scratch";
  EXPECT_EQ(kc::lora_add_f16(group, 16, hp, 16, nullptr, 4, scratch, work, nullptr),
            k::Status::invalid_argument)
      << "no row adapters";
  EXPECT_EQ(kc::lora_add_f16(group, 16, hp, 16, rows.ptr, 0, nullptr, 0, nullptr), k::Status::ok)
      << "no rows";
  EXPECT_EQ(kc::lora_add_f16(group, 16, nullptr, 16, rows.ptr, 4, scratch, work, nullptr),
            k::Status::invalid_argument)
      << "no x";
  EXPECT_EQ(kc::lora_add_f16(group, kc::kLoraMaxInputs + 1, hp, kc::kLoraMaxInputs + 1, rows.ptr, 4, scratch,
                             size_t{1} << 40, nullptr),
            k::Status::invalid_argument)
      << "k past the splits";
  EXPECT_EQ(kc::lora_add_f16(group, 16, hp, 16, rows.ptr, 4, static_cast<char*>(scratch) + 2, work, nullptr),
            k::Status::invalid_argument)
      << "misaligned scratch";
  // The group with one thing spoiled, refused (a scratch large enough for anything).
  const auto expect_refused = [&](const char* why, auto spoil) {
    kc::LoraGroup bad = group;
    spoil(bad);
    EXPECT_EQ(kc::lora_add_f16(bad, 16, hp, 16, rows.ptr, 4, scratch, 1 << 20, nullptr),
              k::Status::invalid_argument)
        << why;
  };
  expect_refused("a rank past the kernels'",
                 [](kc::LoraGroup& g) { g.targets[0].slots.max_rank = kc::kLoraMaxRank + 1; });
  expect_refused("no table of ranks", [](kc::LoraGroup& g) { g.targets[0].slots.rank = nullptr; });
  expect_refused("no slot", [](kc::LoraGroup& g) { g.targets[0].slots.slots = 0; });
  expect_refused("ldy below n_out", [](kc::LoraGroup& g) { g.targets[0].ldy = 15; });
  expect_refused("an empty second target", [](kc::LoraGroup& g) { g.count = 2; });
  expect_refused("too many products", [](kc::LoraGroup& g) { g.count = kc::kLoraMaxProducts + 1; });
  expect_refused("no outputs", [](kc::LoraGroup& g) { g.targets[0].n_out = 0; });
  expect_refused("outputs past the kernels'",
                 [](kc::LoraGroup& g) { g.targets[0].n_out = g.targets[0].ldy = kc::kLoraMaxOutputs + 1; });
  // Two products each within the limit whose 256-output blocks together are 65536, one past the grid's.
  expect_refused("the group's outputs past the expand grid", [](kc::LoraGroup& g) {
    g.targets[0].n_out = g.targets[0].ldy = int64_t{256} * 32768;
    g.targets[1] = g.targets[0];
    g.count = 2;
  });
  EXPECT_EQ(kc::lora_workspace_bytes(4, 0, 4, 1), 0u);
  EXPECT_EQ(kc::lora_workspace_bytes(4, 16, 4, 0), 0u);
  EXPECT_EQ(kc::lora_workspace_bytes(4, 16, 4, kc::kLoraMaxProducts + 1), 0u);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
