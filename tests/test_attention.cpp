// Paged attention (kernels/attention) against a plain reference: double-precision causal GQA
// softmax attention read straight from the block tables, on random inputs of odd sizes (head
// dimensions with a tail past the vector width, blocks of 5 and 16, GQA groups of 1 and 3, several
// sequences with shuffled block ids, positions 0 to past several blocks), on every kernel set this
// CPU runs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.hpp"
#include "kernels/matmul.hpp"
#include "kernels/matmul_internal.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"

namespace nibble::kernels {
namespace {

struct Case {
  int64_t n_head, n_head_kv, head_dim, block_size;
};

// Runs `body` with each kernel set this CPU runs forced in turn (scalar, AVX2, AVX-512), then restores
// the original set; at least the scalar one always runs.
template <typename Body>
void on_every_kernel_set(Body&& body) {
  const std::string original = matmul_isa();
  int sets = 0;
  for (const char* isa : {"scalar", "avx2", "avx512"}) {
    if (!matmul_force_isa(isa)) continue;
    SCOPED_TRACE(isa);
    ++sets;
    body();
  }
  matmul_force_isa(original.c_str());
  EXPECT_GE(sets, 1);
}

// out[t, h, :] = softmax_p(scale * q[t, h] . k[p]) v[p] over p in 0..pos[t], all in double.
std::vector<double> reference(const PagedAttentionShape& s, const std::vector<float>& q,
                              const std::vector<uint16_t>& k, const std::vector<uint16_t>& v,
                              const std::vector<int32_t>& tables, const std::vector<int32_t>& seq,
                              const std::vector<int32_t>& pos, double scale) {
  std::vector<double> out(static_cast<size_t>(s.tokens * s.n_head * s.head_dim));
  const int64_t kv_row = s.n_head_kv * s.head_dim;
  for (int64_t t = 0; t < s.tokens; ++t) {
    for (int64_t h = 0; h < s.n_head; ++h) {
      const int64_t kv_head = h / (s.n_head / s.n_head_kv);
      auto at = [&](const std::vector<uint16_t>& cache, int64_t p, int64_t d) {
        const int64_t block = tables[static_cast<size_t>(seq[t] * s.max_blocks_per_seq + p / s.block_size)];
        return static_cast<double>(fp16_to_fp32(cache[static_cast<size_t>(
            (block * s.block_size + p % s.block_size) * kv_row + kv_head * s.head_dim + d)]));
      };
      std::vector<double> w(static_cast<size_t>(pos[t] + 1));
      for (int64_t p = 0; p <= pos[t]; ++p) {
        double dot = 0;
        for (int64_t d = 0; d < s.head_dim; ++d)
          dot += q[static_cast<size_t>((t * s.n_head + h) * s.head_dim + d)] * at(k, p, d);
        w[static_cast<size_t>(p)] = dot * scale;
      }
      const double max = *std::max_element(w.begin(), w.end());
      double sum = 0;
      for (double& x : w) sum += x = std::exp(x - max);
      for (int64_t d = 0; d < s.head_dim; ++d) {
        double o = 0;
        for (int64_t p = 0; p <= pos[t]; ++p) o += w[static_cast<size_t>(p)] / sum * at(v, p, d);
        out[static_cast<size_t>((t * s.n_head + h) * s.head_dim + d)] = o;
      }
    }
  }
  return out;
}

// The batch every test attends with: three sequences whose blocks are anywhere in the cache (shuffled
// ids), prompt-like runs, a verification-like run of consecutive positions, and position 0; random q.
struct Batch {
  PagedAttentionShape s;
  int64_t n_blocks = 0;
  std::vector<int32_t> tables;  // [n_seqs, max_blocks_per_seq]
  std::vector<int32_t> seq = {0, 0, 0, 1, 1, 1, 1, 1, 2};
  std::vector<int32_t> pos = {0, 1, 2, 35, 36, 37, 38, 39, 17};
  std::vector<float> q;  // [tokens, n_head, head_dim]
};

Batch make_batch(const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Batch b;
  const int64_t n_seqs = 3, max_blocks = 40 / c.block_size + 2;
  b.n_blocks = n_seqs * max_blocks;
  b.tables.resize(static_cast<size_t>(b.n_blocks));
  for (int64_t i = 0; i < b.n_blocks; ++i) b.tables[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  std::shuffle(b.tables.begin(), b.tables.end(), rng);
  b.s = {static_cast<int64_t>(b.seq.size()), c.n_head, c.n_head_kv, c.head_dim, c.block_size, max_blocks};
  b.q.resize(static_cast<size_t>(b.s.tokens * b.s.n_head * b.s.head_dim));
  for (float& x : b.q) x = normal(rng);
  return b;
}

class PagedAttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(PagedAttentionTest, MatchesTheReferenceOnEveryKernelSet) {
  const Case c = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(c.head_dim * 131 + c.block_size));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const Batch batch = make_batch(c, rng);
  const auto& [s, n_blocks, tables, seq, pos, q] = batch;
  const size_t cache_size = static_cast<size_t>(n_blocks * s.block_size * s.n_head_kv * s.head_dim);
  std::vector<uint16_t> k(cache_size), v(cache_size);
  double max_v = 0;
  for (size_t i = 0; i < cache_size; ++i) {
    k[i] = fp32_to_fp16(normal(rng));
    v[i] = fp32_to_fp16(normal(rng));
    max_v = std::max(max_v, std::fabs(static_cast<double>(fp16_to_fp32(v[i]))));
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const std::vector<double> want = reference(s, q, k, v, tables, seq, pos, scale);

  ThreadPool pool(2);
  on_every_kernel_set([&] {
    std::vector<float> out(want.size(), NAN);
    ASSERT_EQ(paged_attention(s, q.data(), k.data(), v.data(), tables.data(), seq.data(), pos.data(), scale,
                              out.data(), pool),
              Status::ok);
    // q and the softmax weights are rounded to fp16 before they meet the cache (as llama.cpp does):
    // each term is off by at most 2^-11 relative, so an output by about 1e-3 of the largest value;
    // a wrong block, position, head or causal limit gives errors of order max_v.
    double worst = 0;
    for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(out[i] - want[i]));
    EXPECT_LT(worst, 2e-3 * max_v);
  });
}

INSTANTIATE_TEST_SUITE_P(OddSizes, PagedAttentionTest,
                         ::testing::Values(Case{4, 4, 32, 16}, Case{6, 2, 36, 5}, Case{3, 1, 13, 16},
                                           Case{8, 4, 64, 5}, Case{9, 3, 40, 7}));

// The softmax and fp16 rounding helpers of every kernel set: rounding must equal the scalar
// fp16 conversion exactly (ties to even); the softmax must be within a few fp16 ulps of the
// double-precision one, sum to 1, and send scores far below the maximum to 0, for lengths with and
// without a vector tail.
TEST(PagedAttention, SoftmaxAndRoundingHelpersOnEveryKernelSet) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> wide(-30.0f, 30.0f);
  on_every_kernel_set([&] {
    const detail::IsaKernels& k = detail::active_kernels();
    for (int64_t n : {1, 7, 8, 29, 130}) {
      SCOPED_TRACE("n=" + std::to_string(n));
      std::vector<float> x(static_cast<size_t>(n));
      for (float& v : x) v = wide(rng);
      x[0] = 1.0f + 1.0f / 2048.0f;  // an exact fp16 tie: rounds to even (1.0)
      std::vector<float> rounded = x;
      k.round_to_f16(rounded.data(), n);
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(rounded[i], fp16_to_fp32(fp32_to_fp16(x[i]))) << i;
      EXPECT_EQ(rounded[0], 1.0f);

      std::vector<float> scores = x;
      if (n > 2) scores[1] = -200.0f;  // e^(-200 - max) underflows: weight 0
      const std::vector<float> before = scores;
      k.softmax_to_f16(scores.data(), n);
      double max_score = *std::max_element(before.begin(), before.end()), sum_exp = 0, sum = 0;
      for (float v : before) sum_exp += std::exp(static_cast<double>(v) - max_score);
      for (int64_t i = 0; i < n; ++i) {
        const double want = std::exp(static_cast<double>(before[i]) - max_score) / sum_exp;
        EXPECT_NEAR(scores[i], want, 2e-3 * want + 1e-7) << i;  // fp16 rounding: 2^-11 relative
        EXPECT_EQ(scores[i], fp16_to_fp32(fp32_to_fp16(scores[i]))) << "not an fp16 value at " << i;
        sum += scores[i];
      }
      EXPECT_NEAR(sum, 1.0, 2e-3);
      if (n > 2) {
        EXPECT_EQ(scores[1], 0.0f);
      }
    }
  });
}

// Quantized caches (llama.cpp's --cache-type-k/-v q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, one type for both
// sides or each its own, F16 on one side): every kernel set against the plain loops
// (paged_attention_quantized_reference), on random rows quantized as llama.cpp quantizes them, odd block
// sizes and GQA groups, head sizes of 1 to 3 blocks of 32; and the reference near the double-precision
// attention over the unquantized values (the rounding of q, K and V: ~1% of the largest value at 8 bits,
// ~10% at 4).
TEST(PagedAttention, QuantizedCachesMatchTheirReferenceOnEveryKernelSet) {
  struct Types {
    DType k, v;
    double rounding;
  };
  const Types all_types[] = {{DType::Q8_0, DType::Q8_0, 3e-2}, {DType::Q4_0, DType::Q4_0, 0.3},
                             {DType::Q4_1, DType::Q4_1, 0.3},  {DType::Q5_0, DType::Q5_0, 0.2},
                             {DType::Q5_1, DType::Q5_1, 0.2},  {DType::IQ4_NL, DType::IQ4_NL, 0.3},
                             {DType::Q8_0, DType::Q4_0, 0.3},  {DType::Q4_1, DType::IQ4_NL, 0.3},
                             {DType::Q8_0, DType::F16, 3e-2},  {DType::F16, DType::Q5_0, 0.2}};
  for (const auto& [k_type, v_type, rounding] : all_types) {
    for (const Case c : {Case{4, 4, 32, 16}, Case{6, 2, 64, 5}, Case{9, 3, 96, 7}, Case{8, 1, 64, 16}}) {
      SCOPED_TRACE(std::string("k ") + type_name(k_type) + ", v " + type_name(v_type) + ": " +
                   std::to_string(c.n_head) + "/" + std::to_string(c.n_head_kv) + " heads of " +
                   std::to_string(c.head_dim) + ", blocks of " + std::to_string(c.block_size));
      std::mt19937 rng(static_cast<uint32_t>(c.head_dim * 7 + c.block_size));
      std::normal_distribution<float> normal(0.0f, 1.0f);
      const Batch batch = make_batch(c, rng);
      const auto& [s, n_blocks, tables, seq, pos, q] = batch;
      const int64_t kv_row = s.n_head_kv * s.head_dim, positions = n_blocks * s.block_size;
      const int64_t k_bytes = row_bytes(k_type, kv_row), v_bytes = row_bytes(v_type, kv_row);
      std::vector<float> k_values(static_cast<size_t>(positions * kv_row)), v_values(k_values.size());
      for (float& x : k_values) x = normal(rng);
      for (float& x : v_values) x = normal(rng);
      std::vector<uint8_t> k(static_cast<size_t>(positions * k_bytes)),
          v(static_cast<size_t>(positions * v_bytes));
      std::vector<uint16_t> k_f16(k_values.size()), v_f16(v_values.size());
      for (int64_t p = 0; p < positions; ++p) {
        ASSERT_EQ(quantize_cache_row(k_type, &k_values[p * kv_row], &k[p * k_bytes], kv_row), Status::ok);
        ASSERT_EQ(quantize_cache_row(v_type, &v_values[p * kv_row], &v[p * v_bytes], kv_row), Status::ok);
      }
      for (size_t i = 0; i < k_values.size(); ++i) {
        k_f16[i] = fp32_to_fp16(k_values[i]);
        v_f16[i] = fp32_to_fp16(v_values[i]);
      }
      const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
      std::vector<float> want(q.size());
      ASSERT_EQ(
          paged_attention_quantized_reference(s, k_type, v_type, q.data(), k.data(), v.data(), tables.data(),
                                              seq.data(), pos.data(), scale, want.data()),
          Status::ok);
      double max_v = 0;
      for (float x : v_values) max_v = std::max(max_v, std::fabs(static_cast<double>(x)));
      const std::vector<double> exact = reference(s, q, k_f16, v_f16, tables, seq, pos, scale);
      double off_exact = 0;
      for (size_t i = 0; i < want.size(); ++i) off_exact = std::max(off_exact, std::fabs(want[i] - exact[i]));
      EXPECT_LT(off_exact, rounding * max_v);
      EXPECT_GT(off_exact, 1e-5 * max_v) << "no rounding at all?";

      ThreadPool pool(2);
      on_every_kernel_set([&] {
        std::vector<float> out(want.size(), NAN);
        ASSERT_EQ(paged_attention_quantized(s, k_type, v_type, q.data(), k.data(), v.data(), tables.data(),
                                            seq.data(), pos.data(), scale, out.data(), pool),
                  Status::ok);
        // The kernels' float sums and exp against the reference's doubles (Q4_1 and Q5_1 also meet
        // the query's block sums as Q8_1 stores them, in fp16).
        double worst = 0;
        for (size_t i = 0; i < want.size(); ++i)
          worst = std::max(worst, static_cast<double>(std::fabs(out[i] - want[i])));
        EXPECT_LT(worst, 2e-4 * max_v);
      });
    }
  }
  // Heads that are not whole blocks of 32, and types that are not cache types.
  ThreadPool pool(1);
  PagedAttentionShape shape{1, 1, 1, 36, 1, 1};
  std::vector<float> q(64), out(64);
  std::vector<uint8_t> cache(128);
  const int32_t table[1] = {0}, seq[1] = {0}, pos[1] = {0};
  EXPECT_EQ(paged_attention_quantized(shape, DType::Q8_0, DType::Q8_0, q.data(), cache.data(), cache.data(),
                                      table, seq, pos, 1.0f, out.data(), pool),
            Status::invalid_argument);
  shape.head_dim = 32;
  EXPECT_EQ(paged_attention_quantized(shape, DType::Q4_K, DType::Q4_K, q.data(), cache.data(), cache.data(),
                                      table, seq, pos, 1.0f, out.data(), pool),
            Status::unsupported_type);
  EXPECT_EQ(paged_attention_quantized(shape, DType::Q8_0, DType::Q6_K, q.data(), cache.data(), cache.data(),
                                      table, seq, pos, 1.0f, out.data(), pool),
            Status::unsupported_type);
  EXPECT_TRUE(paged_attention_quantized_takes(DType::IQ4_NL));
  EXPECT_FALSE(paged_attention_quantized_takes(DType::F16));
  EXPECT_FALSE(paged_attention_quantized_takes(DType::Q6_K));
}

TEST(PagedAttention, RejectsBadShapesAndPositions) {
  ThreadPool pool(1);
  const float q[4] = {};
  const uint16_t cache[4] = {};
  const int32_t table[1] = {0}, seq[1] = {0}, bad_pos[1] = {1}, ok_pos[1] = {0};
  float out[4];
  PagedAttentionShape s{1, 2, 1, 2, 1, 1};
  EXPECT_EQ(paged_attention(s, q, cache, cache, table, seq, ok_pos, 1.0f, out, pool), Status::ok);
  EXPECT_EQ(paged_attention(s, q, cache, cache, table, seq, bad_pos, 1.0f, out, pool),
            Status::invalid_argument);
  s.n_head_kv = 3;  // does not divide n_head
  EXPECT_EQ(paged_attention(s, q, cache, cache, table, seq, ok_pos, 1.0f, out, pool),
            Status::invalid_argument);
}

}  // namespace
}  // namespace nibble::kernels
