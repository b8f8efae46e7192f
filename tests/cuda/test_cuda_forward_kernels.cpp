// The CUDA kernels the GPU forward pass adds (rope_kv_write, add_rms_norm_f32, f16_to_f32,
// gather_rows_f16, swiglu_f32_to_f16, paged_attention_f16) against the project's CPU kernels on
// random inputs of odd sizes. Skips when there is no CUDA device.
//
// Error bounds. rope_kv_write, add_rms_norm_f32 and swiglu_f32_to_f16 compute in fp32 from fp32
// inputs like the CPU and round once to fp16; the CPU reference rounds its fp32 result the same way,
// so the difference is at most one fp16 rounding step (2^-11 ≈ 4.9e-4 relative when the fp32 values
// differ by ~1e-6 relative across a rounding boundary: cosf/sinf/expf within 2 ulp, fp32 instead of
// double sums of squares), hence |got - ref| <= 1e-3 · |ref| + 1e-7 (RoPE: the rotated pair's
// norm as magnitude). V rows, the residual add, the widening and the gather are exact.
// paged_attention_f16: out = Σ_p w_p v_p is a convex combination; the CPU rounds each weight to fp16
// (2^-11 relative) and the kernel rounds the output to fp16 (2^-11 of |out|), and the fp32 scores
// differ by ~1e-6 relative, so |got - ref| <= 1.5e-3 · max_p |v_p[d]| + 1e-6.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/activation.hpp"
#include "kernels/attention.hpp"
#include "kernels/cuda/convert.cuh"
#include "kernels/cuda/paged_attention.cuh"
#include "kernels/cuda/prefill_attention.cuh"
#include "kernels/cuda/residual_norm.cuh"
#include "kernels/cuda/rope_kv_write.cuh"
#include "kernels/cuda/swiglu.cuh"
#include "kernels/quant_types.hpp"
#include "kernels/rms_norm.hpp"
#include "kernels/rope.hpp"
#include "kernels/thread_pool.hpp"
#include "tests/cuda/cuda_test_util.hpp"

namespace k = nibble::kernels;
using nibble::cuda_test::DeviceBuffer;

namespace {

std::vector<float> random_floats(size_t n, float stddev, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

std::vector<uint16_t> random_f16(size_t n, float stddev, std::mt19937& rng) {
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = k::fp32_to_fp16(random_floats(1, stddev, rng)[0]);
  return v;
}

__half* as_half(uint16_t* p) { return reinterpret_cast<__half*>(p); }

// Counts elements outside |got - ref| <= rel * mag + abs, reporting the first few.
int count_bad(const std::vector<uint16_t>& got, const std::vector<float>& ref, const std::vector<float>& mag,
              double rel, double abs) {
  int bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = k::fp16_to_fp32(got[i]);
    const double err = std::fabs(g - ref[i]);
    if (!(err <= rel * mag[i] + abs) && ++bad <= 5) {
      ADD_FAILURE() << "element " << i << ": got " << g << ", reference " << ref[i] << ", error " << err;
    }
  }
  return bad;
}

// Per attention output element ([tokens, n_head, head_dim]): the largest |v[d]| among the positions its
// query sees (the scale of the element's error), for tokens at (seq, pos) with tables [seqs, mbps] of
// blocks of the cache vc: [blocks, block_size, n_head_kv, head_dim].
std::vector<float> attention_magnitudes(const std::vector<uint16_t>& vc, const std::vector<int32_t>& tables,
                                        const std::vector<int32_t>& seq, const std::vector<int32_t>& pos,
                                        int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                                        int64_t block_size, int64_t mbps) {
  const auto tokens = static_cast<int64_t>(pos.size());
  const int64_t group = n_head / n_head_kv, kv_dim = n_head_kv * head_dim;
  std::vector<float> mag(static_cast<size_t>(tokens * n_head * head_dim), 0.0f);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < n_head; ++h) {
      for (int64_t p = 0; p <= pos[static_cast<size_t>(t)]; ++p) {
        const int64_t blk = tables[static_cast<size_t>(seq[static_cast<size_t>(t)] * mbps + p / block_size)];
        const int64_t off = (blk * block_size + p % block_size) * kv_dim + (h / group) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) {
          float& m = mag[static_cast<size_t>((t * n_head + h) * head_dim + d)];
          m = std::max(m, std::fabs(k::fp16_to_fp32(vc[static_cast<size_t>(off + d)])));
        }
      }
    }
  }
  return mag;
}

// The CPU reference (kernels::paged_attention on q widened to fp32) into ref, and attention_magnitudes
// into mag, for the same arguments.
void cpu_attention(const std::vector<uint16_t>& q, const std::vector<uint16_t>& kc,
                   const std::vector<uint16_t>& vc, const std::vector<int32_t>& tables,
                   const std::vector<int32_t>& seq, const std::vector<int32_t>& pos, int64_t n_head,
                   int64_t n_head_kv, int64_t head_dim, int64_t block_size, int64_t mbps, float scale,
                   k::ThreadPool& pool, std::vector<float>& ref, std::vector<float>& mag) {
  std::vector<float> qf(q.size());
  for (size_t i = 0; i < q.size(); ++i) qf[i] = k::fp16_to_fp32(q[i]);
  ref.assign(q.size(), 0.0f);
  k::PagedAttentionShape cs;
  cs.tokens = static_cast<int64_t>(pos.size());
  cs.n_head = n_head;
  cs.n_head_kv = n_head_kv;
  cs.head_dim = head_dim;
  cs.block_size = block_size;
  cs.max_blocks_per_seq = mbps;
  ASSERT_EQ(k::paged_attention(cs, qf.data(), kc.data(), vc.data(), tables.data(), seq.data(), pos.data(),
                               scale, ref.data(), pool),
            k::Status::ok);
  mag = attention_magnitudes(vc, tables, seq, pos, n_head, n_head_kv, head_dim, block_size, mbps);
}

std::vector<float> abs_of(const std::vector<float>& v) {
  std::vector<float> a(v.size());
  for (size_t i = 0; i < v.size(); ++i) a[i] = std::fabs(v[i]);
  return a;
}

// For RoPE outputs: each element's magnitude is the norm of its (rotated) pair, or |x| past rot_dims.
std::vector<float> pair_norms(const std::vector<float>& x, int64_t head_dim, int64_t rot_dims) {
  std::vector<float> m(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const auto d = static_cast<int64_t>(i) % head_dim;
    if (d < rot_dims) {
      const size_t e = i - static_cast<size_t>(d % 2);
      m[i] = std::hypot(x[e], x[e + 1]);
    } else {
      m[i] = std::fabs(x[i]);
    }
  }
  return m;
}

}  // namespace

TEST(CudaRopeKvWrite, MatchesCpuRopeAndWritesTheCacheSlots) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(21);
  struct Case {
    int64_t head_dim, rot_dims;
    bool stacked;  // q, k, v as column ranges of one [tokens, q_dim + 2 kv_dim] buffer
    int scaled;    // RoPE scaling: 1 a linear scale and a frequency factor a pair (Llama 3.1's); 2 the
                   // same with YaRN's ramp and magnitude (an original context of 8: pairs on both sides)
  };
  for (const Case c :
       {Case{34, 34, true, 0}, Case{64, 64, false, 0}, Case{128, 96, true, 0}, Case{6, 4, false, 0},
        Case{64, 64, true, 1}, Case{128, 96, false, 1}, Case{64, 64, false, 2}, Case{128, 96, true, 2}}) {
    SCOPED_TRACE("head_dim=" + std::to_string(c.head_dim) + " rot_dims=" + std::to_string(c.rot_dims) +
                 " stacked=" + std::to_string(c.stacked) + " scaled=" + std::to_string(c.scaled));
    const int64_t tokens = 11, n_head = 6, n_head_kv = 2, block_size = 5, num_blocks = 13, mbps = 4;
    const int64_t q_dim = n_head * c.head_dim, kv_dim = n_head_kv * c.head_dim;
    // Two sequences with shuffled block tables; token 10 names a block outside the cache.
    std::vector<int32_t> ids(static_cast<size_t>(num_blocks));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<int32_t> tables = {ids[0], ids[1], ids[2], ids[3], ids[4], ids[5], 999, ids[6]};
    std::vector<int32_t> seq = {0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1};
    std::vector<int32_t> pos = {0, 1, 2, 7, 13, 19, 3, 4, 5, 6, 12};  // token 10: block 2 of seq 1 = 999
    const auto q = random_floats(static_cast<size_t>(tokens * q_dim), 1.5f, rng);
    const auto kk = random_floats(static_cast<size_t>(tokens * kv_dim), 1.5f, rng);
    const auto v = random_floats(static_cast<size_t>(tokens * kv_dim), 1.5f, rng);

    // Device input layout.
    std::vector<float> in;
    int64_t q_stride = q_dim, kv_stride = kv_dim, k_off = 0, v_off = 0;
    if (c.stacked) {
      q_stride = kv_stride = q_dim + 2 * kv_dim;
      k_off = q_dim;
      v_off = q_dim + kv_dim;
      in.resize(static_cast<size_t>(tokens * q_stride));
      for (int64_t t = 0; t < tokens; ++t) {
        std::copy_n(q.begin() + t * q_dim, q_dim, in.begin() + t * q_stride);
        std::copy_n(kk.begin() + t * kv_dim, kv_dim, in.begin() + t * q_stride + k_off);
        std::copy_n(v.begin() + t * kv_dim, kv_dim, in.begin() + t * q_stride + v_off);
      }
    } else {
      in = q;
      k_off = tokens * q_dim;
      v_off = k_off + tokens * kv_dim;
      in.insert(in.end(), kk.begin(), kk.end());
      in.insert(in.end(), v.begin(), v.end());
    }

    // CPU reference.
    const std::vector<float> factors = random_floats(static_cast<size_t>(c.rot_dims / 2), 1.0f, rng);
    std::vector<float> freq_factors(factors.size());
    for (size_t i = 0; i < factors.size(); ++i) freq_factors[i] = 1.0f + 7.0f * std::fabs(factors[i]);
    const k::RopeScaling scaling =
        c.scaled == 2   ? k::rope_yarn_scaling(0.5f, freq_factors.data(), c.rot_dims, 8, 10000.0f, 1.25f)
        : c.scaled == 1 ? k::RopeScaling{0.5f, freq_factors.data()}
                        : k::RopeScaling{};
    DeviceBuffer<float> d_factors(freq_factors);
    std::vector<float> q_ref = q, k_ref = kk;
    ASSERT_EQ(
        k::rope_normal(q_ref.data(), pos.data(), tokens, n_head, c.head_dim, c.rot_dims, 10000.0f, scaling),
        k::Status::ok);
    ASSERT_EQ(k::rope_normal(k_ref.data(), pos.data(), tokens, n_head_kv, c.head_dim, c.rot_dims, 10000.0f,
                             scaling),
              k::Status::ok);

    const uint16_t sentinel = k::fp32_to_fp16(-7.0f);
    const std::vector<uint16_t> cache_init(static_cast<size_t>(num_blocks * block_size * kv_dim), sentinel);
    DeviceBuffer<float> d_in(in);
    DeviceBuffer<int32_t> d_pos(pos), d_seq(seq), d_tables(tables), d_flag(std::vector<int32_t>{0});
    DeviceBuffer<uint16_t> d_q(static_cast<size_t>(tokens * q_dim)), d_k(cache_init), d_v(cache_init);
    ASSERT_TRUE(d_in.ptr && d_pos.ptr && d_seq.ptr && d_tables.ptr && d_flag.ptr && d_q.ptr && d_k.ptr &&
                d_v.ptr);
    // NaNs: a q element the kernel skips cannot pass for a written one.
    ASSERT_EQ(cudaMemset(d_q.ptr, 0xFF, static_cast<size_t>(tokens * q_dim) * sizeof(uint16_t)), cudaSuccess);
    k::cuda::RopeKvWriteShape s;
    s.tokens = tokens;
    s.n_head = n_head;
    s.n_head_kv = n_head_kv;
    s.head_dim = c.head_dim;
    s.rot_dims = c.rot_dims;
    s.rope_base = 10000.0f;
    s.rope_scaling = scaling;
    s.rope_scaling.freq_factors = c.scaled != 0 ? d_factors.ptr : nullptr;
    s.q_stride = q_stride;
    s.kv_stride = kv_stride;
    s.block_size = block_size;
    s.num_blocks = num_blocks;
    s.max_blocks_per_seq = mbps;
    ASSERT_EQ(k::cuda::rope_kv_write(s, d_in.ptr, d_in.ptr + k_off, d_in.ptr + v_off, d_pos.ptr, d_seq.ptr,
                                     d_tables.ptr, as_half(d_q.ptr), as_half(d_k.ptr), as_half(d_v.ptr),
                                     d_flag.ptr, nullptr),
              k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(d_flag.to_host(), std::vector<int32_t>{1}) << "the bad block id must raise the flag";

    const auto q_got = d_q.to_host();
    ASSERT_EQ(q_got.size(), q_ref.size());
    EXPECT_EQ(count_bad(q_got, q_ref, pair_norms(q_ref, c.head_dim, c.rot_dims), 1e-3, 1e-7), 0);

    const auto k_got = d_k.to_host();
    const auto v_got = d_v.to_host();
    ASSERT_EQ(k_got.size(), cache_init.size());
    std::vector<bool> written(static_cast<size_t>(num_blocks * block_size), false);
    for (int64_t t = 0; t < tokens; ++t) {
      const int32_t blk = tables[static_cast<size_t>(seq[t] * mbps + pos[t] / block_size)];
      if (blk < 0 || blk >= num_blocks) continue;
      const int64_t slot = blk * block_size + pos[t] % block_size;
      written[static_cast<size_t>(slot)] = true;
      const std::vector<uint16_t> k_row(k_got.begin() + slot * kv_dim, k_got.begin() + (slot + 1) * kv_dim);
      const std::vector<float> k_ref_row(k_ref.begin() + t * kv_dim, k_ref.begin() + (t + 1) * kv_dim);
      EXPECT_EQ(count_bad(k_row, k_ref_row, pair_norms(k_ref_row, c.head_dim, c.rot_dims), 1e-3, 1e-7), 0)
          << "token " << t;
      for (int64_t i = 0; i < kv_dim; ++i) {
        ASSERT_EQ(v_got[static_cast<size_t>(slot * kv_dim + i)],
                  k::fp32_to_fp16(v[static_cast<size_t>(t * kv_dim + i)]))
            << "V of token " << t << " element " << i << " must be fp16(v) exactly";
      }
    }
    for (int64_t slot = 0; slot < num_blocks * block_size; ++slot) {
      if (written[static_cast<size_t>(slot)]) continue;
      for (int64_t i = 0; i < kv_dim; ++i) {
        ASSERT_EQ(k_got[static_cast<size_t>(slot * kv_dim + i)], sentinel)
            << "slot " << slot << " was not ours";
        ASSERT_EQ(v_got[static_cast<size_t>(slot * kv_dim + i)], sentinel)
            << "slot " << slot << " was not ours";
      }
    }

    // The other slots with no place in the cache, one token each: a negative position, and a position
    // past the sequence's block table (block mbps). Each raises the flag and writes nothing to the cache.
    for (const int32_t bad_pos : {int32_t{-1}, static_cast<int32_t>(mbps * block_size)}) {
      SCOPED_TRACE("position " + std::to_string(bad_pos));
      DeviceBuffer<int32_t> one_pos(std::vector<int32_t>{bad_pos}), one_seq(std::vector<int32_t>{0}),
          one_flag(std::vector<int32_t>{0});
      DeviceBuffer<uint16_t> k_clean(cache_init), v_clean(cache_init);
      ASSERT_TRUE(one_pos.ptr && one_seq.ptr && one_flag.ptr && k_clean.ptr && v_clean.ptr);
      k::cuda::RopeKvWriteShape one = s;
      one.tokens = 1;
      ASSERT_EQ(k::cuda::rope_kv_write(one, d_in.ptr, d_in.ptr + k_off, d_in.ptr + v_off, one_pos.ptr,
                                       one_seq.ptr, d_tables.ptr, as_half(d_q.ptr), as_half(k_clean.ptr),
                                       as_half(v_clean.ptr), one_flag.ptr, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_EQ(one_flag.to_host(), std::vector<int32_t>{1});
      EXPECT_EQ(k_clean.to_host(), cache_init);
      EXPECT_EQ(v_clean.to_host(), cache_init);
    }
  }
}

TEST(CudaAddRmsNorm, MatchesCpuAddAndNorm) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(22);
  const float eps = 1e-5f;
  // n: one block a row (1, 129), two (2048), four with a ragged slice (3000), eight with a ragged last
  // slice (4100), eight of 1024 (8192).
  for (const int64_t rows : {1, 3, 37}) {
    for (const int64_t n : {1, 129, 2048, 3000, 4100, 8192}) {
      for (const bool with_delta : {false, true}) {
        SCOPED_TRACE("rows=" + std::to_string(rows) + " n=" + std::to_string(n) +
                     " delta=" + std::to_string(with_delta));
        const auto x = random_floats(static_cast<size_t>(rows * n), 2.0f, rng);
        const auto d = random_floats(static_cast<size_t>(rows * n), 1.0f, rng);
        const auto w = random_floats(static_cast<size_t>(n), 1.0f, rng);
        std::vector<float> sum = x;
        if (with_delta) {
          ASSERT_EQ(k::add_inplace(sum.data(), d.data(), rows * n), k::Status::ok);
        }
        std::vector<float> ref(sum.size());
        ASSERT_EQ(k::rms_norm(sum.data(), w.data(), ref.data(), rows, n, eps), k::Status::ok);

        DeviceBuffer<float> dx(x), dd(d), dw(w);
        DeviceBuffer<uint16_t> dy(static_cast<size_t>(rows * n));
        ASSERT_TRUE(dx.ptr && dd.ptr && dw.ptr && dy.ptr);
        // NaNs: an element the kernel skips cannot pass for a written one.
        ASSERT_EQ(cudaMemset(dy.ptr, 0xFF, static_cast<size_t>(rows * n) * sizeof(uint16_t)), cudaSuccess);
        ASSERT_EQ(k::cuda::add_rms_norm_f32(dx.ptr, with_delta ? dd.ptr : nullptr, dw.ptr, as_half(dy.ptr),
                                            rows, n, eps, nullptr),
                  k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_EQ(dx.to_host(), sum) << "the residual must be x + delta in fp32, exactly";
        const auto got = dy.to_host();
        ASSERT_EQ(got.size(), ref.size());
        EXPECT_EQ(count_bad(got, ref, abs_of(ref), 1e-3, 1e-7), 0);
        if (rows > 1) {  // the last row alone: the same bits as in the batch
          const size_t off = static_cast<size_t>((rows - 1) * n);
          DeviceBuffer<float> lx(std::vector<float>(x.begin() + static_cast<std::ptrdiff_t>(off), x.end())),
              ld(std::vector<float>(d.begin() + static_cast<std::ptrdiff_t>(off), d.end()));
          DeviceBuffer<uint16_t> ly(static_cast<size_t>(n));
          ASSERT_TRUE(lx.ptr && ld.ptr && ly.ptr);
          ASSERT_EQ(k::cuda::add_rms_norm_f32(lx.ptr, with_delta ? ld.ptr : nullptr, dw.ptr, as_half(ly.ptr),
                                              1, n, eps, nullptr),
                    k::Status::ok);
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          const auto alone = ly.to_host();
          ASSERT_EQ(alone.size(), static_cast<size_t>(n));
          EXPECT_TRUE(std::equal(alone.begin(), alone.end(), got.begin() + static_cast<std::ptrdiff_t>(off)));
        }
      }
    }
  }
}

TEST(CudaConvert, WidensAndGathersExactly) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(23);
  const auto h = random_f16(1001, 3.0f, rng);
  DeviceBuffer<uint16_t> dh(h);
  DeviceBuffer<float> df(h.size());
  ASSERT_TRUE(dh.ptr && df.ptr);
  ASSERT_EQ(k::cuda::f16_to_f32(as_half(dh.ptr), df.ptr, static_cast<int64_t>(h.size()), nullptr),
            k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto f = df.to_host();
  ASSERT_EQ(f.size(), h.size());
  for (size_t i = 0; i < h.size(); ++i) ASSERT_EQ(f[i], k::fp16_to_fp32(h[i])) << i;

  // 1001 = 13 rows of 77; gather rows 12, 0, 5, 5 and an index past the end (a zero row, the flag).
  const int64_t cols = 77, src_rows = 13;
  const std::vector<int32_t> rows = {12, 0, 5, 5, 13};
  DeviceBuffer<int32_t> drows(rows), dflag(std::vector<int32_t>{0});
  DeviceBuffer<uint16_t> dout(rows.size() * cols);
  ASSERT_TRUE(drows.ptr && dflag.ptr && dout.ptr);
  ASSERT_EQ(
      k::cuda::gather_rows_f16(as_half(dh.ptr), src_rows, cols, drows.ptr, static_cast<int64_t>(rows.size()),
                               as_half(dout.ptr), dflag.ptr, nullptr),
      k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto out = dout.to_host();
  ASSERT_EQ(out.size(), rows.size() * cols);
  for (size_t r = 0; r < rows.size(); ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const uint16_t want =
          rows[r] < src_rows ? h[static_cast<size_t>(rows[r] * cols + c)] : k::fp32_to_fp16(0.0f);
      ASSERT_EQ(out[r * cols + static_cast<size_t>(c)], want) << "row " << r << " col " << c;
    }
  }
  EXPECT_EQ(dflag.to_host(), std::vector<int32_t>{1});
}

TEST(CudaSwigluF32, MatchesCpuOnStridedInputs) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(24);
  for (const int64_t rows : {1, 5, 65537}) {  // 65537: more rows than the grid's y, strided over
    for (const int64_t n_ff : {1, 37, 1000}) {
      if (rows > 5 && n_ff > 37) continue;  // the host buffers
      const int64_t stride = 2 * n_ff + 3;  // gate at column 0, up at column n_ff + 3
      SCOPED_TRACE("rows=" + std::to_string(rows) + " n_ff=" + std::to_string(n_ff));
      const auto in = random_floats(static_cast<size_t>(rows * stride), 3.0f, rng);
      std::vector<float> gate, up, ref(static_cast<size_t>(rows * n_ff));
      for (int64_t r = 0; r < rows; ++r) {
        gate.insert(gate.end(), in.begin() + r * stride, in.begin() + r * stride + n_ff);
        up.insert(up.end(), in.begin() + r * stride + n_ff + 3, in.begin() + r * stride + 2 * n_ff + 3);
      }
      ASSERT_EQ(k::swiglu(gate.data(), up.data(), ref.data(), rows * n_ff), k::Status::ok);
      DeviceBuffer<float> din(in);
      DeviceBuffer<uint16_t> dout(ref.size());
      ASSERT_TRUE(din.ptr && dout.ptr);
      ASSERT_EQ(cudaMemset(dout.ptr, 0xFF, ref.size() * sizeof(uint16_t)), cudaSuccess);  // NaNs, as above
      ASSERT_EQ(k::cuda::swiglu_f32_to_f16(din.ptr, din.ptr + n_ff + 3, stride, as_half(dout.ptr), rows, n_ff,
                                           nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const auto got = dout.to_host();
      ASSERT_EQ(got.size(), ref.size());
      EXPECT_EQ(count_bad(got, ref, abs_of(ref), 1e-3, 1e-7), 0);
    }
  }
}

TEST(CudaPagedAttention, MatchesCpuOnMixedBatches) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(25);
  nibble::kernels::ThreadPool pool(2);
  for (const int64_t head_dim : {32, 34, 64, 128, 256}) {
    SCOPED_TRACE("head_dim=" + std::to_string(head_dim));
    const int64_t n_head = 6, n_head_kv = 2, block_size = 5, mbps = 12;  // group 3, odd block size
    // Three sequences: a prompt chunk of 23 positions (tokens in shuffled order), two decode tokens of
    // a long sequence, one token at position 0.
    std::vector<int32_t> seq, pos;
    for (int32_t p = 17; p < 40; ++p) {
      seq.push_back(0);
      pos.push_back(p);
    }
    std::shuffle(pos.begin(), pos.end(), rng);
    seq.insert(seq.end(), {1, 1, 2});
    pos.insert(pos.end(), {58, 31, 0});
    const auto tokens = static_cast<int64_t>(pos.size());
    const int64_t num_blocks = 3 * mbps + 2;
    std::vector<int32_t> ids(static_cast<size_t>(num_blocks));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<int32_t> tables(ids.begin(), ids.begin() + 3 * mbps);
    const int64_t kv_dim = n_head_kv * head_dim;
    const auto q = random_f16(static_cast<size_t>(tokens * n_head * head_dim), 1.0f, rng);
    const auto kc = random_f16(static_cast<size_t>(num_blocks * block_size * kv_dim), 1.0f, rng);
    const auto vc = random_f16(static_cast<size_t>(num_blocks * block_size * kv_dim), 1.0f, rng);

    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    std::vector<float> ref, mag;
    ASSERT_NO_FATAL_FAILURE(cpu_attention(q, kc, vc, tables, seq, pos, n_head, n_head_kv, head_dim,
                                          block_size, mbps, scale, pool, ref, mag));

    DeviceBuffer<uint16_t> dq(q), dk(kc), dv(vc), dout(q.size());
    DeviceBuffer<int32_t> dt(tables), ds(seq), dp(pos), dflag(std::vector<int32_t>{0});
    ASSERT_TRUE(dq.ptr && dk.ptr && dv.ptr && dout.ptr && dt.ptr && ds.ptr && dp.ptr && dflag.ptr);
    k::cuda::PagedAttentionShape s;
    s.tokens = tokens;
    s.n_head = n_head;
    s.n_head_kv = n_head_kv;
    s.head_dim = head_dim;
    s.block_size = block_size;
    s.num_blocks = num_blocks;
    s.max_blocks_per_seq = mbps;
    ASSERT_EQ(k::cuda::paged_attention_f16(s, as_half(dq.ptr), as_half(dk.ptr), as_half(dv.ptr), dt.ptr,
                                           ds.ptr, dp.ptr, scale, as_half(dout.ptr), dflag.ptr, nullptr),
              k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(dflag.to_host(), std::vector<int32_t>{0});
    const auto got = dout.to_host();
    ASSERT_EQ(got.size(), ref.size());
    EXPECT_EQ(count_bad(got, ref, mag, 1.5e-3, 1e-6), 0);
  }
}

// Tiles as CudaLlamaModel plans them: runs of batch-consecutive tokens of one sequence at
// consecutive positions, cut at tile_tokens. [n_tiles, 2]: (first token, count).
std::vector<int32_t> prefill_tiles(const std::vector<int32_t>& seq, const std::vector<int32_t>& pos,
                                   int64_t tile_tokens) {
  std::vector<int32_t> tiles;
  for (size_t t = 0; t < seq.size();) {
    size_t end = t + 1;
    while (end < seq.size() && seq[end] == seq[t] && pos[end] == pos[end - 1] + 1 &&
           static_cast<int64_t>(end - t) < tile_tokens)
      ++end;
    tiles.push_back(static_cast<int32_t>(t));
    tiles.push_back(static_cast<int32_t>(end - t));
    t = end;
  }
  return tiles;
}

// A prefill attention case: runs of tokens (sequence, position), four sequences' block tables of
// shuffled ids (mbps blocks each, of block_size positions), random q, K and V, on the host.
struct PrefillCase {
  int64_t n_head = 0, n_head_kv = 0, head_dim = 0, block_size = 7, mbps = 0, num_blocks = 0;
  std::vector<int32_t> seq, pos, tables;
  std::vector<uint16_t> q, kc, vc;

  PrefillCase(int64_t n_head_, int64_t n_head_kv_, int64_t head_dim_, int64_t mbps_)
      : n_head(n_head_), n_head_kv(n_head_kv_), head_dim(head_dim_), mbps(mbps_), num_blocks(4 * mbps_ + 3) {}
  void add_run(int32_t s, int32_t from, int32_t n) {
    for (int32_t p = from; p < from + n; ++p) {
      seq.push_back(s);
      pos.push_back(p);
    }
  }
  int64_t tokens() const { return static_cast<int64_t>(pos.size()); }
  // After the runs: the tables and the values.
  void fill(std::mt19937& rng) {
    std::vector<int32_t> ids(static_cast<size_t>(num_blocks));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    tables.assign(ids.begin(), ids.begin() + 4 * mbps);
    const int64_t kv_dim = n_head_kv * head_dim;
    q = random_f16(static_cast<size_t>(tokens() * n_head * head_dim), 1.0f, rng);
    kc = random_f16(static_cast<size_t>(num_blocks * block_size * kv_dim), 1.0f, rng);
    vc = random_f16(static_cast<size_t>(num_blocks * block_size * kv_dim), 1.0f, rng);
  }
  // Attention in double over the keys whose block in `table` is inside the cache (a reference for
  // tables with bad block ids, which the CPU kernel cannot take), and per element the largest |v| among
  // those keys; [tokens, n_head, head_dim] each.
  void masked_reference(const std::vector<int32_t>& table, double scale, std::vector<float>& out,
                        std::vector<float>& mag) const {
    const int64_t group = n_head / n_head_kv, kv_dim = n_head_kv * head_dim;
    out.assign(q.size(), 0.0f);
    mag.assign(q.size(), 0.0f);
    for (int64_t t = 0; t < tokens(); ++t) {
      for (int64_t h = 0; h < n_head; ++h) {
        const uint16_t* qr = q.data() + (t * n_head + h) * head_dim;
        std::vector<double> w;
        std::vector<int64_t> rows;  // each seen key's cache row offset
        for (int64_t j = 0; j <= pos[static_cast<size_t>(t)]; ++j) {
          const int64_t blk = table[static_cast<size_t>(seq[static_cast<size_t>(t)] * mbps + j / block_size)];
          if (blk < 0 || blk >= num_blocks) continue;
          const int64_t off = (blk * block_size + j % block_size) * kv_dim + (h / group) * head_dim;
          double dot = 0.0;
          for (int64_t d = 0; d < head_dim; ++d)
            dot += static_cast<double>(k::fp16_to_fp32(qr[d])) *
                   k::fp16_to_fp32(kc[static_cast<size_t>(off + d)]);
          w.push_back(dot * scale);
          rows.push_back(off);
        }
        if (w.empty()) continue;
        const double m = *std::max_element(w.begin(), w.end());
        double sum = 0.0;
        for (double& x : w) sum += (x = std::exp(x - m));
        for (int64_t d = 0; d < head_dim; ++d) {
          double acc = 0.0;
          float& mg = mag[static_cast<size_t>((t * n_head + h) * head_dim + d)];
          for (size_t i = 0; i < w.size(); ++i) {
            const float v = k::fp16_to_fp32(vc[static_cast<size_t>(rows[i] + d)]);
            acc += w[i] * v;
            mg = std::max(mg, std::fabs(v));
          }
          out[static_cast<size_t>((t * n_head + h) * head_dim + d)] = static_cast<float>(acc / sum);
        }
      }
    }
  }
  k::cuda::PagedAttentionShape device_shape() const {
    k::cuda::PagedAttentionShape s;
    s.tokens = tokens();
    s.n_head = n_head;
    s.n_head_kv = n_head_kv;
    s.head_dim = head_dim;
    s.block_size = block_size;
    s.num_blocks = num_blocks;
    s.max_blocks_per_seq = mbps;
    return s;
  }
};

// The tiled prefill kernel runs paged_attention_f16's arithmetic step for step (which the test above
// checks against the CPU): outputs must be equal bit for bit, for every head grouping the tiles
// support, on prompt chunks that start at 0 and past it, single decode tokens, and runs longer than
// a tile. A wrong row-to-head mapping, causal mask or tile offset would differ at once.
TEST(CudaPrefillAttention, EqualsPagedAttentionBitForBit) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(31);
  for (const int64_t head_dim : {64, 128}) {
    // 3: 10-token tiles fill 30 of 32 rows; 16: tiles of 2 tokens.
    for (const int64_t group : {1, 2, 3, 4, 8, 16}) {
      SCOPED_TRACE("head_dim=" + std::to_string(head_dim) + " group=" + std::to_string(group));
      const int64_t n_head_kv = 2, n_head = n_head_kv * group;
      // Sequence 0: a 45-token chunk at positions 17..61; 1: a 13-token prompt from 0; 2: one decode
      // token at 70; 3: two tokens at 5, 6; then sequence 0 again at 62 (a run of its own).
      PrefillCase pc(n_head, n_head_kv, head_dim, /*mbps=*/12);
      pc.add_run(0, 17, 45);
      pc.add_run(1, 0, 13);
      pc.add_run(2, 70, 1);
      pc.add_run(3, 5, 2);
      pc.add_run(0, 62, 1);
      pc.fill(rng);
      const auto& [seq, pos, tables, q, kc, vc] = std::tie(pc.seq, pc.pos, pc.tables, pc.q, pc.kc, pc.vc);
      const int64_t tokens = pc.tokens();
      const int64_t tile_tokens = k::cuda::prefill_attention_tile_tokens(n_head, n_head_kv);
      ASSERT_EQ(tile_tokens, 32 / group);
      const std::vector<int32_t> tiles = prefill_tiles(seq, pos, tile_tokens);

      DeviceBuffer<uint16_t> dq(q), dk(kc), dv(vc), dpaged(q.size()), dtiled(q.size());
      DeviceBuffer<int32_t> dt(tables), ds(seq), dp(pos), dtiles(tiles), dflag(std::vector<int32_t>{0});
      ASSERT_TRUE(dq.ptr && dk.ptr && dv.ptr && dpaged.ptr && dtiled.ptr && dt.ptr && ds.ptr && dp.ptr &&
                  dtiles.ptr && dflag.ptr);
      k::cuda::PagedAttentionShape s = pc.device_shape();
      const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
      ASSERT_EQ(k::cuda::paged_attention_f16(s, as_half(dq.ptr), as_half(dk.ptr), as_half(dv.ptr), dt.ptr,
                                             ds.ptr, dp.ptr, scale, as_half(dpaged.ptr), dflag.ptr, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaMemset(dtiled.ptr, 0xff, q.size() * sizeof(uint16_t)), cudaSuccess);
      ASSERT_EQ(k::cuda::prefill_attention_f16(
                    s, as_half(dq.ptr), as_half(dk.ptr), as_half(dv.ptr), dt.ptr, ds.ptr, dp.ptr, dtiles.ptr,
                    static_cast<int64_t>(tiles.size() / 2), scale, as_half(dtiled.ptr), dflag.ptr, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_EQ(dflag.to_host(), std::vector<int32_t>{0});
      const auto want = dpaged.to_host(), got = dtiled.to_host();
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_EQ(got[i], want[i]) << "element " << i << " (token " << i / (n_head * head_dim) << ", head "
                                   << (i / head_dim) % n_head << ")";
      }

      // A tile that spans two sequences is refused on the device: the flag, zeros for its tokens.
      std::vector<int32_t> bad_tiles = tiles;
      const size_t last = bad_tiles.size() - 2;  // the lone token of sequence 0 at 62 ...
      bad_tiles[last] -= 1;                      // ... now starting at sequence 3's token at 6
      bad_tiles[last + 1] = 2;
      DeviceBuffer<int32_t> dbad(bad_tiles);
      ASSERT_EQ(cudaMemset(dflag.ptr, 0, sizeof(int32_t)), cudaSuccess);
      ASSERT_EQ(
          k::cuda::prefill_attention_f16(s, as_half(dq.ptr), as_half(dk.ptr), as_half(dv.ptr), dt.ptr, ds.ptr,
                                         dp.ptr, dbad.ptr, static_cast<int64_t>(bad_tiles.size() / 2), scale,
                                         as_half(dtiled.ptr), dflag.ptr, nullptr),
          k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_EQ(dflag.to_host(), std::vector<int32_t>{1});
      const auto zeroed = dtiled.to_host();
      for (int64_t e = 0; e < n_head * head_dim; ++e)
        EXPECT_EQ(zeroed[static_cast<size_t>((tokens - 1) * n_head * head_dim + e)], 0) << "element " << e;
      if (head_dim == 64 && group == 1) {  // argument checks, once
        s.head_dim = 96;
        EXPECT_EQ(k::cuda::prefill_attention_f16(s, as_half(dq.ptr), as_half(dk.ptr), as_half(dv.ptr), dt.ptr,
                                                 ds.ptr, dp.ptr, dtiles.ptr, 1, scale, as_half(dtiled.ptr),
                                                 dflag.ptr, nullptr),
                  k::Status::invalid_argument);
        EXPECT_EQ(k::cuda::prefill_attention_tile_tokens(66, 1), 0);  // 66 query heads per KV head
        EXPECT_EQ(k::cuda::prefill_attention_tile_tokens(6, 4), 0);   // not a grouping
      }
    }
  }
}

// The tensor-core prefill kernel against the CPU reference (its rounding is not the CUDA-core kernels':
// the unnormalized weights meet V in fp16), for the Llama head groupings (1, 4, 8), 2, and 3 (tiles
// of 21 tokens: a row of the 64 left empty), head_dim 64 and 128: a 150-token chunk at positions
// 17..166 (three 64-key chunks, tiles of 64 / group tokens rounded down), a 70-token
// prompt from 0, a lone decode token, a two-token run, blocks of an odd size in shuffled order; a tile
// spanning two sequences raises the flag and zeroes its tokens; a block id outside the cache raises the
// flag and is not read; bad arguments launch nothing.
TEST(CudaPrefillAttentionMma, MatchesTheCpuReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(57);
  k::ThreadPool pool(2);
  for (const int64_t head_dim : {64, 128}) {
    for (const int64_t group : {1, 2, 3, 4, 8}) {
      SCOPED_TRACE("head_dim=" + std::to_string(head_dim) + " group=" + std::to_string(group));
      const int64_t n_head_kv = 2, n_head = n_head_kv * group;
      PrefillCase pc(n_head, n_head_kv, head_dim, /*mbps=*/30);
      pc.add_run(0, 17, 150);
      pc.add_run(1, 0, 70);
      pc.add_run(2, 200, 1);
      pc.add_run(3, 5, 2);
      pc.fill(rng);
      const auto& [seq, pos, tables, q, kc, vc] = std::tie(pc.seq, pc.pos, pc.tables, pc.q, pc.kc, pc.vc);
      const int64_t tokens = pc.tokens(), block_size = pc.block_size, mbps = pc.mbps;
      const int64_t tile_tokens = k::cuda::prefill_attention_mma_tile_tokens(n_head, n_head_kv);
      ASSERT_EQ(tile_tokens, 64 / group);
      const std::vector<int32_t> tiles = prefill_tiles(seq, pos, tile_tokens);

      const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
      std::vector<float> ref, mag;
      ASSERT_NO_FATAL_FAILURE(cpu_attention(q, kc, vc, tables, seq, pos, n_head, n_head_kv, head_dim,
                                            block_size, mbps, scale, pool, ref, mag));

      DeviceBuffer<uint16_t> dq(q), dk(kc), dv(vc), dout(q.size());
      DeviceBuffer<int32_t> dt(tables), ds(seq), dp(pos), dtiles(tiles), dflag(std::vector<int32_t>{0});
      ASSERT_TRUE(dq.ptr && dk.ptr && dv.ptr && dout.ptr && dt.ptr && ds.ptr && dp.ptr && dtiles.ptr &&
                  dflag.ptr);
      k::cuda::PagedAttentionShape s = pc.device_shape();
      const auto n_tiles = static_cast<int64_t>(tiles.size() / 2);
      ASSERT_EQ(cudaMemset(dout.ptr, 0xff, q.size() * sizeof(uint16_t)),
                cudaSuccess);  // NaN: unwritten shows
      ASSERT_EQ(k::cuda::prefill_attention_mma_f16(s, as_half(dq.ptr), as_half(dk.ptr), as_half(dv.ptr),
                                                   dt.ptr, ds.ptr, dp.ptr, dtiles.ptr, n_tiles, scale,
                                                   as_half(dout.ptr), dflag.ptr, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_EQ(dflag.to_host(), std::vector<int32_t>{0});
      const auto got = dout.to_host();
      ASSERT_EQ(got.size(), ref.size());
      EXPECT_EQ(count_bad(got, ref, mag, 4e-3, 1e-6), 0);

      // A tile that spans two sequences: the last two (sequence 2's decode token, sequence 3's two
      // tokens) as one; its three tokens come out zero (no other tile writes them).
      std::vector<int32_t> bad_tiles(tiles.begin(), tiles.end() - 2);
      bad_tiles[bad_tiles.size() - 2] = static_cast<int32_t>(tokens - 3);
      bad_tiles[bad_tiles.size() - 1] = 3;
      DeviceBuffer<int32_t> dbad(bad_tiles);
      ASSERT_EQ(cudaMemset(dflag.ptr, 0, sizeof(int32_t)), cudaSuccess);
      ASSERT_EQ(k::cuda::prefill_attention_mma_f16(s, as_half(dq.ptr), as_half(dk.ptr), as_half(dv.ptr),
                                                   dt.ptr, ds.ptr, dp.ptr, dbad.ptr, n_tiles - 1, scale,
                                                   as_half(dout.ptr), dflag.ptr, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_EQ(dflag.to_host(), std::vector<int32_t>{1});
      const auto zeroed = dout.to_host();
      for (int64_t e = 0; e < 3 * n_head * head_dim; ++e)
        EXPECT_EQ(zeroed[static_cast<size_t>((tokens - 3) * n_head * head_dim + e)], 0) << "element " << e;

      // Blocks outside the cache: sequence 1's third (positions 14..20, keys the first slot-finding warp
      // looks up) and sequence 0's fifteenth (98..104, the second warp's keys of their chunk): flagged,
      // never read, and the rows attend to the other keys (a chunk with a bad key never skips the mask).
      std::vector<int32_t> bad_table = tables;
      bad_table[static_cast<size_t>(1 * mbps + 2)] = static_cast<int32_t>(pc.num_blocks + 1000);
      bad_table[static_cast<size_t>(0 * mbps + 14)] = -1;
      DeviceBuffer<int32_t> dbad_table(bad_table);
      ASSERT_EQ(cudaMemset(dflag.ptr, 0, sizeof(int32_t)), cudaSuccess);
      ASSERT_EQ(k::cuda::prefill_attention_mma_f16(s, as_half(dq.ptr), as_half(dk.ptr), as_half(dv.ptr),
                                                   dbad_table.ptr, ds.ptr, dp.ptr, dtiles.ptr, n_tiles, scale,
                                                   as_half(dout.ptr), dflag.ptr, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_EQ(dflag.to_host(), std::vector<int32_t>{1});
      std::vector<float> masked, masked_mag;
      pc.masked_reference(bad_table, scale, masked, masked_mag);
      EXPECT_EQ(count_bad(dout.to_host(), masked, masked_mag, 4e-3, 1e-6), 0);

      if (head_dim == 64 && group == 1) {                                 // argument checks, once
        EXPECT_EQ(k::cuda::prefill_attention_mma_tile_tokens(6, 2), 21);  // 3 query heads a KV head: 63 rows
        EXPECT_EQ(k::cuda::prefill_attention_mma_tile_tokens(65, 1), 0);  // more than a tile's rows
        EXPECT_EQ(k::cuda::prefill_attention_mma_tile_tokens(6, 4), 0);   // not a grouping
        EXPECT_EQ(k::cuda::prefill_attention_mma_tile_tokens(64, 1), 1);  // 64: one token a tile
        EXPECT_EQ(k::cuda::prefill_attention_mma_f16(s, as_half(dq.ptr + 1), as_half(dk.ptr), as_half(dv.ptr),
                                                     dt.ptr, ds.ptr, dp.ptr, dtiles.ptr, n_tiles, scale,
                                                     as_half(dout.ptr), dflag.ptr, nullptr),
                  k::Status::invalid_argument)
            << "q not 16-byte aligned";
        s.head_dim = 96;
        EXPECT_EQ(k::cuda::prefill_attention_mma_f16(s, as_half(dq.ptr), as_half(dk.ptr), as_half(dv.ptr),
                                                     dt.ptr, ds.ptr, dp.ptr, dtiles.ptr, n_tiles, scale,
                                                     as_half(dout.ptr), dflag.ptr, nullptr),
                  k::Status::invalid_argument);
      }
    }
  }
}

TEST(CudaPagedAttention, BadBlockIdsRaiseTheFlagAndAreNotRead) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  const int64_t head_dim = 64, block_size = 4, num_blocks = 3, mbps = 2;
  const std::vector<int32_t> tables = {2, 77};  // position 4 onwards lives in a block that does not exist
  const std::vector<int32_t> seq = {0, 0}, pos = {3, 5};
  std::mt19937 rng(26);
  const auto q = random_f16(static_cast<size_t>(2 * head_dim), 1.0f, rng);
  const auto kv = random_f16(static_cast<size_t>(num_blocks * block_size * head_dim), 1.0f, rng);
  DeviceBuffer<uint16_t> dq(q), dk(kv), dv(kv), dout(q.size());
  DeviceBuffer<int32_t> dt(tables), ds(seq), dp(pos), dflag(std::vector<int32_t>{0});
  ASSERT_TRUE(dq.ptr && dk.ptr && dv.ptr && dout.ptr && dt.ptr && ds.ptr && dp.ptr && dflag.ptr);
  k::cuda::PagedAttentionShape s;
  s.tokens = 2;
  s.n_head = 1;
  s.n_head_kv = 1;
  s.head_dim = head_dim;
  s.block_size = block_size;
  s.num_blocks = num_blocks;
  s.max_blocks_per_seq = mbps;
  ASSERT_EQ(k::cuda::paged_attention_f16(s, as_half(dq.ptr), as_half(dk.ptr), as_half(dv.ptr), dt.ptr, ds.ptr,
                                         dp.ptr, 0.125f, as_half(dout.ptr), dflag.ptr, nullptr),
            k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(dflag.to_host(), std::vector<int32_t>{1});
  for (uint16_t v : dout.to_host()) ASSERT_TRUE(std::isfinite(k::fp16_to_fp32(v)));
  // Invalid arguments launch nothing.
  s.head_dim = 257;
  EXPECT_EQ(k::cuda::paged_attention_f16(s, as_half(dq.ptr), as_half(dk.ptr), as_half(dv.ptr), dt.ptr, ds.ptr,
                                         dp.ptr, 0.125f, as_half(dout.ptr), dflag.ptr, nullptr),
            k::Status::invalid_argument);
}
