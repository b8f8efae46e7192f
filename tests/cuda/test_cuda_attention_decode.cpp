// CUDA decode / verification attention over the paged fp16 KV cache against a plain double CPU
// reference: several sequences of different lengths, random block tables, GQA, one or several
// queries per sequence (causal among themselves), automatic and forced-small splits. Skips when
// there is no CUDA device.
//
// Error bound: out[d] = Σ_p w_p v_p[d] is a convex combination, so |out[d]| <= max_p |v_p[d]|. The
// kernel's fp16 output rounding costs at most 2^-11 ≈ 4.9e-4 of |out|; its fp32 scores are off by
// about head_dim · 2^-24 · Σ|q·k| · scale ≈ 1e-4 at most here (a relative error of that size in
// the weights, which moves out[d] by at most that much of max_p |v_p[d]|), and fp32
// exp/accumulation adds ~1e-6. So |got - ref| <= 5e-4 · |ref| + 2e-4 · max_p |v_p[d]| + 1e-6 over
// the positions the query sees: tight enough that losing one position of a 1000-long sequence
// (an error of about 1e-3 · max |v|) fails.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/attention_decode.cuh"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"
#include "tests/cuda/cuda_test_util.hpp"

namespace k = nibble::kernels;
using nibble::cuda_test::DeviceBuffer;

namespace {

struct Problem {
  k::cuda::DecodeAttentionShape shape;
  std::vector<int32_t> seq_lens, query_start, tables;
  std::vector<uint16_t> q, k_cache, v_cache;
};

// Sequences of the given lengths and query counts, blocks handed out in a random order, unused
// table entries set to an invalid id (reading one would raise the error flag).
Problem make_problem(const std::vector<int32_t>& lens, const std::vector<int32_t>& n_qs, int64_t n_head,
                     int64_t n_head_kv, int64_t head_dim, int64_t block_size, int64_t split_tokens,
                     std::mt19937& rng) {
  Problem pr;
  auto& s = pr.shape;
  s.n_seqs = static_cast<int64_t>(lens.size());
  s.n_head = n_head;
  s.n_head_kv = n_head_kv;
  s.head_dim = head_dim;
  s.block_size = block_size;
  s.split_tokens = split_tokens;
  s.max_seq_len = *std::max_element(lens.begin(), lens.end());
  s.max_q_len = *std::max_element(n_qs.begin(), n_qs.end());
  s.max_blocks_per_seq = (s.max_seq_len + block_size - 1) / block_size + 1;
  int64_t used = 0;
  for (int32_t len : lens) used += (len + block_size - 1) / block_size;
  s.num_blocks = used + 5;  // some blocks belong to nobody
  std::vector<int32_t> ids(static_cast<size_t>(s.num_blocks));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  pr.tables.assign(static_cast<size_t>(s.n_seqs * s.max_blocks_per_seq), 1 << 30);
  size_t next = 0;
  pr.query_start.push_back(0);
  for (int64_t i = 0; i < s.n_seqs; ++i) {
    const int64_t nb = (lens[i] + block_size - 1) / block_size;
    for (int64_t b = 0; b < nb; ++b) pr.tables[i * s.max_blocks_per_seq + b] = ids[next++];
    pr.query_start.push_back(pr.query_start.back() + n_qs[i]);
  }
  pr.seq_lens = lens;
  s.tokens = pr.query_start.back();
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto fill = [&](std::vector<uint16_t>& v, size_t n) {
    v.resize(n);
    for (auto& x : v) x = k::fp32_to_fp16(normal(rng));
  };
  fill(pr.q, static_cast<size_t>(s.tokens * n_head * head_dim));
  fill(pr.k_cache, static_cast<size_t>(s.num_blocks * block_size * n_head_kv * head_dim));
  fill(pr.v_cache, pr.k_cache.size());
  return pr;
}

// A cache whose sides may be quantized (attention_decode_quantized): a side's type, and for a quantized
// one its layer as stored (the problem's fp16 side otherwise).
struct CacheSides {
  k::DType k_type = k::DType::F16, v_type = k::DType::F16;
  std::vector<uint8_t> k_bytes, v_bytes;
};

// Runs the kernels with the combining pass as a kernel of its own, and again (twice, the counters
// reused) with it in the first kernel (combine_counters): all three outputs and flags must agree bit
// for bit and the counters end at zero. Returns the output (empty on failure) and the error flag.
// sides: given, attention_decode_quantized reads its quantized sides as stored.
std::vector<uint16_t> run(const Problem& pr, float scale, int32_t* flag_out,
                          const CacheSides* sides = nullptr) {
  const auto& s = pr.shape;
  DeviceBuffer<uint16_t> dq(pr.q), dk(pr.k_cache), dv(pr.v_cache);
  const bool k_quant = sides != nullptr && sides->k_type != k::DType::F16;
  const bool v_quant = sides != nullptr && sides->v_type != k::DType::F16;
  DeviceBuffer<uint8_t> dk_bytes(k_quant ? sides->k_bytes : std::vector<uint8_t>{}),
      dv_bytes(v_quant ? sides->v_bytes : std::vector<uint8_t>{});
  DeviceBuffer<int32_t> dt(pr.tables), dl(pr.seq_lens), dqs(pr.query_start);
  const size_t ws = k::cuda::attention_decode_workspace_bytes(s);
  DeviceBuffer<uint8_t> dws(ws);
  const std::vector<uint32_t> zeros(static_cast<size_t>(s.n_seqs * s.n_head_kv), 0u);
  DeviceBuffer<uint32_t> counters(zeros);
  EXPECT_GT(ws, 0u);
  if (!(dq.ptr && dk.ptr && dv.ptr && dt.ptr && dl.ptr && dqs.ptr && dws.ptr && counters.ptr &&
        dk_bytes.ptr && dv_bytes.ptr)) {
    ADD_FAILURE() << "cudaMalloc failed";
    return {};
  }
  std::vector<std::vector<uint16_t>> outs;
  std::vector<int32_t> flags;
  for (const bool one_kernel : {false, true, true}) {
    DeviceBuffer<int32_t> dflag(std::vector<int32_t>{0});
    DeviceBuffer<uint16_t> dout(std::vector<uint16_t>(pr.q.size(), 0x7e00));  // NaN: unwritten rows show
    if (!(dflag.ptr && dout.ptr)) {
      ADD_FAILURE() << "cudaMalloc failed";
      return {};
    }
    // NaN partials: a combine reading a split before it was written (or the previous run's) shows.
    EXPECT_EQ(cudaMemset(dws.ptr, 0xff, ws), cudaSuccess);
    const auto st =
        sides == nullptr
            ? k::cuda::attention_decode(
                  s, reinterpret_cast<const __half*>(dq.ptr), reinterpret_cast<const __half*>(dk.ptr),
                  reinterpret_cast<const __half*>(dv.ptr), dt.ptr, dl.ptr, dqs.ptr, scale,
                  reinterpret_cast<__half*>(dout.ptr), dws.ptr, ws, dflag.ptr, nullptr,
                  /*programmatic=*/one_kernel, one_kernel ? counters.ptr : nullptr)
            : k::cuda::attention_decode_quantized(
                  s, reinterpret_cast<const __half*>(dq.ptr),
                  k_quant ? static_cast<const void*>(dk_bytes.ptr) : dk.ptr, sides->k_type,
                  v_quant ? static_cast<const void*>(dv_bytes.ptr) : dv.ptr, sides->v_type, dt.ptr, dl.ptr,
                  dqs.ptr, scale, reinterpret_cast<__half*>(dout.ptr), dws.ptr, ws, dflag.ptr, nullptr,
                  /*programmatic=*/one_kernel, one_kernel ? counters.ptr : nullptr);
    EXPECT_EQ(st, k::Status::ok);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    outs.push_back(dout.to_host());
    flags.push_back(dflag.to_host().at(0));
  }
  EXPECT_EQ(outs[1], outs[0]) << "combined in the first kernel";
  EXPECT_EQ(outs[2], outs[0]) << "combined in the first kernel, the counters reused";
  EXPECT_EQ(flags[1], flags[0]);
  EXPECT_EQ(flags[2], flags[0]);
  EXPECT_EQ(counters.to_host(), zeros) << "the counters end at zero";
  *flag_out = flags[0];
  return outs[0];
}

// One side of the problem's cache as `type` stores it (each position's kv_dim values, one cache row,
// quantized by the CPU's quantize_cache_row), the layer's bytes padded to a whole 4-byte word as
// attention_decode_quantized may read; and `values`, the fp16 side replaced by what those bytes hold
// (dequantize_row's values rounded to fp16, what a working copy would hold).
std::vector<uint8_t> quantize_side(const Problem& pr, k::DType type, std::vector<uint16_t>& values) {
  const int64_t kv_dim = pr.shape.n_head_kv * pr.shape.head_dim;
  const int64_t slots = static_cast<int64_t>(values.size()) / kv_dim;
  const int64_t row_bytes = k::row_bytes(type, kv_dim);
  std::vector<uint8_t> bytes(static_cast<size_t>((slots * row_bytes + 3) / 4 * 4), 0);
  std::vector<float> row(static_cast<size_t>(kv_dim)), back(static_cast<size_t>(kv_dim));
  for (int64_t slot = 0; slot < slots; ++slot) {
    uint16_t* v = values.data() + slot * kv_dim;
    for (int64_t i = 0; i < kv_dim; ++i) row[static_cast<size_t>(i)] = k::fp16_to_fp32(v[i]);
    uint8_t* out = bytes.data() + slot * row_bytes;
    EXPECT_EQ(k::quantize_cache_row(type, row.data(), out, kv_dim), k::Status::ok);
    EXPECT_EQ(k::dequantize_row(type, out, back.data(), kv_dim), k::Status::ok);
    for (int64_t i = 0; i < kv_dim; ++i) v[i] = k::fp32_to_fp16(back[static_cast<size_t>(i)]);
  }
  return bytes;
}

// Counts outputs outside the bound (see the file comment), reporting the first few.
int compare_with_reference(const Problem& pr, float scale, const std::vector<uint16_t>& got) {
  const auto& s = pr.shape;
  const int64_t D = s.head_dim;
  const int64_t group = s.n_head / s.n_head_kv;
  const auto f = [](uint16_t h) { return static_cast<double>(k::fp16_to_fp32(h)); };
  int bad = 0;
  for (int64_t i = 0; i < s.n_seqs; ++i) {
    const int64_t n_q = pr.query_start[i + 1] - pr.query_start[i];
    for (int64_t qi = 0; qi < n_q; ++qi) {
      const int64_t token = pr.query_start[i] + qi;
      const int64_t pos = pr.seq_lens[i] - n_q + qi;
      for (int64_t h = 0; h < s.n_head; ++h) {
        const int64_t kvh = h / group;
        const auto row = [&](const std::vector<uint16_t>& cache, int64_t p) {
          const int64_t blk = pr.tables[i * s.max_blocks_per_seq + p / s.block_size];
          return cache.data() + ((blk * s.block_size + p % s.block_size) * s.n_head_kv + kvh) * D;
        };
        const uint16_t* qv = pr.q.data() + (token * s.n_head + h) * D;
        std::vector<double> sc(static_cast<size_t>(pos + 1));
        double mx = -INFINITY;
        for (int64_t p = 0; p <= pos; ++p) {
          const uint16_t* kv = row(pr.k_cache, p);
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += f(qv[d]) * f(kv[d]);
          sc[p] = dot * scale;
          mx = std::max(mx, sc[p]);
        }
        double sum = 0.0;
        for (auto& x : sc) sum += x = std::exp(x - mx);
        for (int64_t d = 0; d < D; ++d) {
          double ref = 0.0, mag = 0.0;
          for (int64_t p = 0; p <= pos; ++p) {
            const double v = f(row(pr.v_cache, p)[d]);
            ref += sc[p] / sum * v;
            mag = std::max(mag, std::fabs(v));
          }
          const double g = k::fp16_to_fp32(got[(token * s.n_head + h) * D + d]);
          const double err = std::fabs(g - ref);
          if (!(err <= 5e-4 * std::fabs(ref) + 2e-4 * mag + 1e-6) && ++bad <= 5) {
            ADD_FAILURE() << "seq " << i << " query " << qi << " (position " << pos << ") head " << h
                          << " dim " << d << ": got " << g << ", reference " << ref << ", error " << err;
          }
        }
      }
    }
  }
  return bad;
}

// Runs a problem with bad metadata: the error flag must be raised and, where every_row_written, no
// output left NaN (unwritten). Returns the output.
std::vector<uint16_t> run_bad(const Problem& pr, float scale, bool every_row_written) {
  int32_t flag = 0;
  const auto got = run(pr, scale, &flag);
  EXPECT_EQ(flag, 1);
  EXPECT_EQ(got.size(), pr.q.size());
  if (every_row_written) {
    for (size_t i = 0; i < got.size(); ++i) {
      if (std::isnan(k::fp16_to_fp32(got[i]))) {
        ADD_FAILURE() << "output " << i << " not written";
        break;
      }
    }
  }
  return got;
}

}  // namespace

TEST(CudaAttentionDecode, MatchesDoubleReference) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(2024);
  const int64_t n_head_kv = 2;
  for (const int64_t head_dim : {64, 128}) {
    for (const int64_t group : {1, 2, 4, 8}) {  // with 1..8 queries: 1 to 64 rows per KV head
      for (const bool verify : {false, true}) {
        for (const int64_t split : {0, 32, 96}) {
          SCOPED_TRACE("head_dim=" + std::to_string(head_dim) + " group=" + std::to_string(group) +
                       " verify=" + std::to_string(verify) + " split_tokens=" + std::to_string(split));
          // 289 with 8 queries: with 32-position splits, the last split [288, 289) is invisible to all
          // but the last query (rows with m = -inf in a split).
          const std::vector<int32_t> lens = {1, 17, 300, 1000, 289};
          const std::vector<int32_t> n_qs =
              verify ? std::vector<int32_t>{1, 3, 8, 5, 8} : std::vector<int32_t>{1, 1, 1, 1, 1};
          const int64_t block_size = head_dim == 64 ? 7 : 16;
          const Problem pr =
              make_problem(lens, n_qs, n_head_kv * group, n_head_kv, head_dim, block_size, split, rng);
          const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
          int32_t flag = -1;
          const auto got = run(pr, scale, &flag);
          ASSERT_EQ(got.size(), pr.q.size());
          EXPECT_EQ(flag, 0) << "valid metadata must not raise the error flag";
          EXPECT_EQ(compare_with_reference(pr, scale, got), 0);
        }
      }
    }
  }
}

// With one split (every sequence within the split size) pass 1 writes the output itself; it must
// equal, bit for bit, what the two passes give the same short sequences when a long one in the batch
// makes several splits (each short one then goes through pass 2 with a single split of its own).
TEST(CudaAttentionDecode, OneSplitWritesTheTwoPassResultBitForBit) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(77);
  for (const int64_t head_dim : {64, 128}) {
    SCOPED_TRACE("head_dim=" + std::to_string(head_dim));
    const Problem with_long = make_problem({17, 200, 64, 1000}, {1, 3, 2, 1}, 8, 2, head_dim, 16, 256, rng);
    Problem short_only = with_long;  // the first three sequences alone: the same tables, caches and queries
    auto& s = short_only.shape;
    s.n_seqs = 3;
    s.max_seq_len = 200;
    short_only.seq_lens.resize(3);
    short_only.query_start.resize(4);
    s.tokens = short_only.query_start.back();
    short_only.q.resize(static_cast<size_t>(s.tokens * s.n_head * head_dim));
    short_only.tables.resize(static_cast<size_t>(3 * s.max_blocks_per_seq));
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    int32_t flag_long = -1, flag_short = -1;
    const auto two_pass = run(with_long, scale, &flag_long);
    const auto one_pass = run(short_only, scale, &flag_short);
    EXPECT_EQ(flag_long, 0);
    EXPECT_EQ(flag_short, 0);
    ASSERT_EQ(one_pass.size(), short_only.q.size());
    ASSERT_GE(two_pass.size(), one_pass.size());
    EXPECT_TRUE(std::equal(one_pass.begin(), one_pass.end(), two_pass.begin()));
    EXPECT_EQ(compare_with_reference(short_only, scale, one_pass), 0);
  }
}

TEST(CudaAttentionDecode, BadMetadataRaisesTheFlagWithoutFaulting) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(5);
  const float scale = 0.125f;
  {  // a block id outside the cache
    Problem pr = make_problem({40, 20}, {1, 1}, 4, 2, 64, 16, 0, rng);
    pr.tables[1] = static_cast<int32_t>(pr.shape.num_blocks);
    run_bad(pr, scale, /*every_row_written=*/true);
  }
  {  // a length beyond max_seq_len, and one shorter than its query count
    Problem pr = make_problem({40, 20}, {1, 4}, 4, 2, 128, 16, 0, rng);
    pr.seq_lens[0] = 41;
    pr.seq_lens[1] = 2;
    run_bad(pr, scale, /*every_row_written=*/true);
  }
  {  // more queries than max_q_len: that sequence is skipped, the flag raised
    Problem pr = make_problem({40, 20}, {1, 2}, 4, 2, 64, 16, 0, rng);
    pr.shape.max_q_len = 1;
    run_bad(pr, scale, /*every_row_written=*/false);
  }
  // A bad id in a later tile of a split, the tile gathered into registers while the block works on
  // the one before: a negative id at positions 48..63 (split 0's second tile of 32 at a 64-position
  // split), and one past the cache at 96..99 (the fourth tile of an automatic split). The other
  // sequence's rows are what they are without it, bit for bit.
  for (const bool negative : {true, false}) {
    SCOPED_TRACE(negative ? "negative id in the second tile" : "id past the cache in the fourth tile");
    Problem pr = make_problem({negative ? 65 : 100, 20}, {1, 1}, 4, 2, 128, 16, negative ? 64 : 0, rng);
    int32_t flag = -1;
    const auto good = run(pr, scale, &flag);
    EXPECT_EQ(flag, 0);
    ASSERT_EQ(good.size(), pr.q.size());
    pr.tables[negative ? 3 : 6] = negative ? -7 : static_cast<int32_t>(pr.shape.num_blocks);
    const auto got = run_bad(pr, scale, /*every_row_written=*/true);
    ASSERT_EQ(got.size(), good.size());
    const size_t row = static_cast<size_t>(pr.shape.n_head * pr.shape.head_dim);  // sequence 1's one query
    EXPECT_TRUE(std::equal(got.begin() + row, got.end(), good.begin() + row));
  }
}

// Several splits (32 positions each) with the one-kernel combine's edge cases (run() compares both
// ways bit for bit and checks the counters): lengths an exact multiple of the split and one more; then
// a sequence of length 0 (the flag; its rows zero: split 0 still combines), one shorter than its
// queries, one beyond max_seq_len (clamped); then one with more queries than max_q_len (skipped, its
// rows left unwritten in both ways) and a negative length.
TEST(CudaAttentionDecode, SplitEdgeCasesCombineAlikeInOneKernel) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(31);
  const float scale = 0.125f;
  {
    const Problem pr = make_problem({64, 65, 100, 40, 33}, {1, 1, 1, 3, 1}, 8, 2, 128, 16, 32, rng);
    int32_t flag = -1;
    const auto got = run(pr, scale, &flag);
    EXPECT_EQ(flag, 0);
    ASSERT_EQ(got.size(), pr.q.size());
    EXPECT_EQ(compare_with_reference(pr, scale, got), 0);
  }
  {
    Problem pr = make_problem({64, 65, 100, 40}, {1, 2, 1, 3}, 8, 2, 64, 16, 32, rng);
    pr.seq_lens[0] = 0;
    pr.seq_lens[1] = 1;
    pr.seq_lens[2] = 101;
    const auto got = run_bad(pr, scale, /*every_row_written=*/true);
    ASSERT_EQ(got.size(), pr.q.size());
    for (int64_t i = 0; i < pr.shape.n_head * pr.shape.head_dim; ++i)  // sequence 0's one query
      ASSERT_EQ(k::fp16_to_fp32(got[static_cast<size_t>(i)]), 0.0f) << i;
  }
  {
    Problem pr = make_problem({64, 65, 70}, {1, 2, 1}, 4, 2, 64, 16, 32, rng);
    pr.shape.max_q_len = 1;
    pr.seq_lens[2] = -5;
    run_bad(pr, scale, /*every_row_written=*/false);
  }
  {  // splits of three tiles (96 positions), so that each split gathers its next tiles ahead
    const Problem pr = make_problem({96, 97, 200, 31}, {1, 2, 1, 4}, 8, 2, 128, 16, 96, rng);
    int32_t flag = -1;
    const auto got = run(pr, scale, &flag);
    EXPECT_EQ(flag, 0);
    ASSERT_EQ(got.size(), pr.q.size());
    EXPECT_EQ(compare_with_reference(pr, scale, got), 0);
  }
}

// A quantized cache read as stored (attention_decode_quantized) gives, bit for bit, what
// attention_decode gives over its dequantized fp16 copy (what a working copy holds), for every cache
// type, both sides quantized or one of them fp16, heads of 64 and 128 (rows of 4 and 2 blocks of 32 a
// KV head; Q4_0's 18-byte blocks start mid-word every second block), decode and verification, automatic
// splits (one for every sequence at heads of 64, two for the longest at 128) and 32- or 96-position ones, the
// combine in its own kernel or the first; a block id past the cache in one sequence raises the flag and
// leaves the other sequences' rows as they were.
TEST(CudaAttentionDecode, QuantizedCacheReadAsStoredEqualsItsDequantizedCopy) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  using T = k::DType;
  const std::pair<T, T> type_pairs[] = {{T::Q8_0, T::Q8_0},   {T::Q4_0, T::Q4_0}, {T::Q4_1, T::Q5_1},
                                        {T::Q5_0, T::IQ4_NL}, {T::Q8_0, T::F16},  {T::F16, T::Q4_0}};
  std::mt19937 rng(404);
  for (const auto& [k_type, v_type] : type_pairs) {
    for (const int64_t head_dim : {64, 128}) {
      for (const int64_t split : {0, 32, 96}) {
        SCOPED_TRACE(std::string("k ") + k::type_name(k_type) + ", v " + k::type_name(v_type) +
                     ", head_dim " + std::to_string(head_dim) + ", split " + std::to_string(split));
        const bool verify = split != 32;
        // At heads of 64 the automatic split covers every sequence in one piece (pass 1 writes the output).
        const int32_t longest = head_dim == 64 ? 200 : 300;
        Problem copy =
            make_problem({1, 45, longest, 97},
                         verify ? std::vector<int32_t>{1, 3, 8, 2} : std::vector<int32_t>{1, 1, 1, 1}, 8, 2,
                         head_dim, head_dim == 64 ? 7 : 16, split, rng);
        CacheSides sides;
        sides.k_type = k_type;
        sides.v_type = v_type;
        if (k_type != T::F16) sides.k_bytes = quantize_side(copy, k_type, copy.k_cache);
        if (v_type != T::F16) sides.v_bytes = quantize_side(copy, v_type, copy.v_cache);
        const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
        int32_t want_flag = -1, got_flag = -1;
        const auto want = run(copy, scale, &want_flag);
        const auto got = run(copy, scale, &got_flag, &sides);
        ASSERT_EQ(want.size(), copy.q.size());
        EXPECT_EQ(want_flag, 0);
        EXPECT_EQ(got_flag, 0);
        EXPECT_EQ(got, want) << "read as stored, bit for bit its dequantized copy";
        EXPECT_EQ(compare_with_reference(copy, scale, got), 0);
        if (split != 0) continue;
        Problem bad = copy;  // sequence 2's fifth block past the cache
        bad.tables[static_cast<size_t>(2 * bad.shape.max_blocks_per_seq + 4)] =
            static_cast<int32_t>(bad.shape.num_blocks);
        int32_t flag = 0;
        const auto masked = run(bad, scale, &flag, &sides);
        EXPECT_EQ(flag, 1);
        ASSERT_EQ(masked.size(), want.size());
        const auto row_halves = static_cast<size_t>(bad.shape.n_head * head_dim);
        for (const int seq : {0, 1, 3}) {
          const auto begin = static_cast<size_t>(bad.query_start[static_cast<size_t>(seq)]) * row_halves;
          const auto end = static_cast<size_t>(bad.query_start[static_cast<size_t>(seq) + 1]) * row_halves;
          EXPECT_TRUE(std::equal(masked.begin() + begin, masked.begin() + end, want.begin() + begin))
              << "sequence " << seq;
        }
      }
    }
  }
}

// query_end: the runs need not cover the batch (a batch that also holds prompt chunks gives its decode
// runs to this kernel and its prompt tiles to another). The compact problem's queries spread over a
// longer batch with other tokens before, between and after them: each run's rows are the compact
// problem's bit for bit (as stored and fp16, the combine in its own kernel and in the first), and the
// other tokens' rows are left as they were.
TEST(CudaAttentionDecode, QueryEndsLetTheRunsSitAmongOtherTokens) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(808);
  for (const int64_t head_dim : {64, 128}) {
    SCOPED_TRACE("head_dim " + std::to_string(head_dim));
    Problem compact = make_problem({33, 300, 5}, {1, 4, 2}, 8, 2, head_dim, 16, 0, rng);
    CacheSides sides;
    sides.k_type = sides.v_type = k::DType::Q8_0;
    sides.k_bytes = quantize_side(compact, k::DType::Q8_0, compact.k_cache);
    sides.v_bytes = quantize_side(compact, k::DType::Q8_0, compact.v_cache);
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    int32_t flag = -1;
    const auto want = run(compact, scale, &flag);
    ASSERT_EQ(want.size(), compact.q.size());
    ASSERT_EQ(flag, 0);
    // The spread batch: 3 other tokens, run 0, 5 others, run 1, run 2, 2 others.
    const auto& s = compact.shape;
    const int64_t row = s.n_head * head_dim;
    const std::vector<int64_t> gap_before = {3, 5, 0};
    std::vector<int32_t> starts, ends;
    std::vector<uint16_t> q;
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const auto other_tokens = [&](int64_t count) {
      for (int64_t i = 0; i < count * row; ++i) q.push_back(k::fp32_to_fp16(normal(rng)));
    };
    for (size_t i = 0; i < 3; ++i) {
      other_tokens(gap_before[i]);
      starts.push_back(static_cast<int32_t>(static_cast<int64_t>(q.size()) / row));
      q.insert(q.end(), compact.q.begin() + compact.query_start[i] * row,
               compact.q.begin() + compact.query_start[i + 1] * row);
      ends.push_back(static_cast<int32_t>(static_cast<int64_t>(q.size()) / row));
    }
    other_tokens(2);
    k::cuda::DecodeAttentionShape spread = s;
    spread.tokens = static_cast<int64_t>(q.size()) / row;
    DeviceBuffer<uint16_t> dq(q), dk(compact.k_cache), dv(compact.v_cache);
    DeviceBuffer<uint8_t> dkb(sides.k_bytes), dvb(sides.v_bytes);
    DeviceBuffer<int32_t> dt(compact.tables), dl(compact.seq_lens), dstart(starts), dend(ends);
    const size_t ws = k::cuda::attention_decode_workspace_bytes(spread);
    DeviceBuffer<uint8_t> dws(ws);
    DeviceBuffer<uint32_t> counters(std::vector<uint32_t>(static_cast<size_t>(s.n_seqs * s.n_head_kv), 0u));
    ASSERT_TRUE(dq.ptr && dk.ptr && dv.ptr && dkb.ptr && dvb.ptr && dt.ptr && dl.ptr && dstart.ptr &&
                dend.ptr && dws.ptr && counters.ptr);
    for (const bool stored : {false, true}) {
      for (const bool one_kernel : {false, true}) {
        SCOPED_TRACE(std::string(stored ? "Q8_0 as stored" : "fp16") + (one_kernel ? ", one kernel" : ""));
        DeviceBuffer<int32_t> dflag(std::vector<int32_t>{0});
        DeviceBuffer<uint16_t> dout(std::vector<uint16_t>(q.size(), 0x7e00));  // NaN: rows left alone stay
        ASSERT_TRUE(dflag.ptr && dout.ptr);
        ASSERT_EQ(
            k::cuda::attention_decode_quantized(
                spread, reinterpret_cast<const __half*>(dq.ptr),
                stored ? static_cast<const void*>(dkb.ptr) : dk.ptr, stored ? k::DType::Q8_0 : k::DType::F16,
                stored ? static_cast<const void*>(dvb.ptr) : dv.ptr, stored ? k::DType::Q8_0 : k::DType::F16,
                dt.ptr, dl.ptr, dstart.ptr, scale, reinterpret_cast<__half*>(dout.ptr), dws.ptr, ws,
                dflag.ptr, nullptr, one_kernel, one_kernel ? counters.ptr : nullptr, dend.ptr),
            k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_EQ(dflag.to_host().at(0), 0);
        const std::vector<uint16_t> got = dout.to_host();
        ASSERT_EQ(got.size(), q.size());
        std::vector<bool> in_run(static_cast<size_t>(spread.tokens), false);
        for (size_t i = 0; i < 3; ++i) {
          const auto from = static_cast<size_t>(starts[i] * row), to = static_cast<size_t>(ends[i] * row);
          EXPECT_TRUE(std::equal(got.begin() + static_cast<std::ptrdiff_t>(from),
                                 got.begin() + static_cast<std::ptrdiff_t>(to),
                                 want.begin() + compact.query_start[i] * row))
              << "run " << i;
          for (int32_t t = starts[i]; t < ends[i]; ++t) in_run[static_cast<size_t>(t)] = true;
        }
        for (int64_t t = 0; t < spread.tokens; ++t) {
          if (in_run[static_cast<size_t>(t)]) continue;
          for (int64_t i = 0; i < row; ++i)
            ASSERT_EQ(got[static_cast<size_t>(t * row + i)], 0x7e00) << "token " << t << " written";
        }
      }
    }
    EXPECT_EQ(counters.to_host(), std::vector<uint32_t>(static_cast<size_t>(s.n_seqs * s.n_head_kv), 0u));
  }
}

TEST(CudaAttentionDecode, RejectsBadArguments) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(9);
  const Problem pr = make_problem({40}, {1}, 4, 2, 64, 16, 0, rng);
  DeviceBuffer<uint16_t> dq(pr.q), dk(pr.k_cache), dv(pr.v_cache), dout(pr.q.size());
  DeviceBuffer<int32_t> dt(pr.tables), dl(pr.seq_lens), dqs(pr.query_start);
  DeviceBuffer<uint8_t> dws(1 << 20);
  ASSERT_TRUE(dq.ptr && dk.ptr && dv.ptr && dout.ptr && dt.ptr && dl.ptr && dqs.ptr && dws.ptr);
  const auto call = [&](const k::cuda::DecodeAttentionShape& s, size_t ws_bytes, const uint16_t* q) {
    return k::cuda::attention_decode(
        s, reinterpret_cast<const __half*>(q), reinterpret_cast<const __half*>(dk.ptr),
        reinterpret_cast<const __half*>(dv.ptr), dt.ptr, dl.ptr, dqs.ptr, 0.125f,
        reinterpret_cast<__half*>(dout.ptr), dws.ptr, ws_bytes, nullptr, nullptr);
  };
  auto s = pr.shape;
  EXPECT_EQ(call(s, 1 << 20, dq.ptr), k::Status::ok);
  EXPECT_EQ(call(s, 0, dq.ptr), k::Status::invalid_argument);            // workspace too small
  EXPECT_EQ(call(s, 1 << 20, dq.ptr + 1), k::Status::invalid_argument);  // q not 16-byte aligned
  EXPECT_EQ(call(s, 1 << 20, nullptr), k::Status::invalid_argument);
  s.head_dim = 96;
  EXPECT_EQ(call(s, 1 << 20, dq.ptr), k::Status::invalid_argument);
  s = pr.shape;
  s.n_head = 3;  // not a multiple of n_head_kv
  EXPECT_EQ(call(s, 1 << 20, dq.ptr), k::Status::invalid_argument);
  s = pr.shape;
  s.max_q_len = 33;  // 33 * group 2 > 64 rows per KV head
  EXPECT_EQ(call(s, 1 << 20, dq.ptr), k::Status::invalid_argument);
  s = pr.shape;
  s.split_tokens = 48;  // not a multiple of 32
  EXPECT_EQ(call(s, 1 << 20, dq.ptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::attention_decode_workspace_bytes(s), 0u);
  // A quantized side: a cache type, 4-byte aligned; an fp16 one 16-byte aligned.
  const auto quantized = [&](const void* k_cache, k::DType k_type, const void* v_cache, k::DType v_type) {
    return k::cuda::attention_decode_quantized(
        pr.shape, reinterpret_cast<const __half*>(dq.ptr), k_cache, k_type, v_cache, v_type, dt.ptr, dl.ptr,
        dqs.ptr, 0.125f, reinterpret_cast<__half*>(dout.ptr), dws.ptr, 1 << 20, nullptr, nullptr);
  };
  const auto* kb = reinterpret_cast<const uint8_t*>(dk.ptr);
  EXPECT_EQ(quantized(kb, k::DType::Q8_0, dv.ptr, k::DType::F16), k::Status::ok);
  EXPECT_EQ(quantized(kb + 4, k::DType::Q4_0, dv.ptr, k::DType::F16), k::Status::ok);
  EXPECT_EQ(quantized(kb + 2, k::DType::Q4_0, dv.ptr, k::DType::F16), k::Status::invalid_argument);
  EXPECT_EQ(quantized(kb, k::DType::Q8_0, kb + 8, k::DType::F16), k::Status::invalid_argument);
  EXPECT_EQ(quantized(kb, k::DType::Q4_K, dv.ptr, k::DType::F16), k::Status::invalid_argument);
  EXPECT_EQ(quantized(kb, k::DType::F16, kb, k::DType::F32), k::Status::invalid_argument);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}
