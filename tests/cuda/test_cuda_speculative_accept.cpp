// The device acceptance rule (kernels/cuda/speculative_accept) against the CPU's
// speculative::verify with the same uniforms: the same accepted count and tokens for a batch of
// sequences with different proposal counts, over random distributions (sparse and dense, drafts
// good and bad), at temperature 0 (one-hot rows), where p == q (everything is accepted: the bonus
// path), and where p == q but the proposed token has q = 0 (rejected with an empty residual, so the
// replacement is drawn from p). Bad counts and tokens are reported per sequence. Skips without a CUDA device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/speculative_accept.cuh"
#include "speculative/rejection_sampler.hpp"
#include "tests/cuda/cuda_test_util.hpp"

namespace k = nibble::kernels;
namespace sp = nibble::speculative;
using nibble::cuda_test::DeviceBuffer;

namespace {

// A random distribution over n ids: `support` of them (all when support >= n) with random positive
// mass, normalized in float.
std::vector<float> random_distribution(int64_t n, int64_t support, std::mt19937& rng) {
  std::vector<float> row(static_cast<size_t>(n), 0.0f);
  std::uniform_int_distribution<int64_t> id(0, n - 1);
  std::exponential_distribution<float> mass(1.0f);
  double total = 0.0;
  for (int64_t i = 0; i < std::min(support, n); ++i) {
    const float m = mass(rng);
    row[static_cast<size_t>(support >= n ? i : id(rng))] += m;  // an id drawn twice gets both masses
    total += m;
  }
  for (float& v : row) v = static_cast<float>(v / total);
  return row;
}

struct Batch {
  int64_t seqs = 0, k_max = 0, n_vocab = 0;
  std::vector<int32_t> tokens, counts;
  std::vector<float> q, p;
  std::vector<double> uniforms;
};

// Runs the kernel; out_tokens [seqs, k_max + 1], accepted [seqs], and the bad-input flag.
void run_device(const Batch& b, std::vector<int32_t>& out_tokens, std::vector<int32_t>& accepted,
                int32_t& bad) {
  DeviceBuffer<int32_t> dt(b.tokens), dc(b.counts), dout(static_cast<size_t>(b.seqs * (b.k_max + 1))),
      dacc(static_cast<size_t>(b.seqs)), dbad(std::vector<int32_t>{0});
  DeviceBuffer<float> dq(b.q), dp(b.p);
  DeviceBuffer<double> du(b.uniforms);
  ASSERT_TRUE(dt.ptr && dc.ptr && dout.ptr && dacc.ptr && dbad.ptr && dq.ptr && dp.ptr && du.ptr);
  ASSERT_EQ(cudaMemset(dout.ptr, 0xff, dout.count * sizeof(int32_t)), cudaSuccess);
  ASSERT_EQ(k::cuda::speculative_accept(dt.ptr, dc.ptr, dq.ptr, dp.ptr, du.ptr, b.seqs, b.k_max, b.n_vocab,
                                        dout.ptr, dacc.ptr, dbad.ptr, nullptr),
            k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  out_tokens = dout.to_host();
  accepted = dacc.to_host();
  const std::vector<int32_t> flag = dbad.to_host();
  ASSERT_EQ(flag.size(), 1u);
  bad = flag[0];
}

// verify() on sequence s's slices.
sp::Verification run_host(const Batch& b, int64_t s) {
  const auto k = static_cast<size_t>(b.counts[static_cast<size_t>(s)]);
  const auto v = static_cast<size_t>(b.n_vocab);
  const auto km = static_cast<size_t>(b.k_max);
  const auto su = static_cast<size_t>(s);
  return sp::verify(std::span<const int32_t>(b.tokens.data() + su * km, k),
                    std::span<const float>(b.q.data() + su * km * v, k * v),
                    std::span<const float>(b.p.data() + su * (km + 1) * v, (k + 1) * v), b.n_vocab,
                    std::span<const double>(b.uniforms.data() + su * (km + 1), k + 1));
}

// A batch: sequence s proposes counts[s] tokens drawn from its q rows. mode 0: random sparse or
// dense rows; 1: one-hot rows (temperature 0) with the draft agreeing for a while; 2: p == q;
// 3: p == q with sparse rows, and now and then a proposal outside their support.
Batch make_batch(int64_t seqs, int64_t k_max, int64_t n_vocab, int mode, std::mt19937& rng) {
  Batch b;
  b.seqs = seqs;
  b.k_max = k_max;
  b.n_vocab = n_vocab;
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::uniform_int_distribution<int64_t> count(0, k_max), id(0, n_vocab - 1);
  const std::vector<int64_t> supports = {1, 3, 50, n_vocab};
  for (int64_t s = 0; s < seqs; ++s) {
    b.counts.push_back(static_cast<int32_t>(count(rng)));
    for (int64_t i = 0; i <= k_max; ++i) {
      const int64_t support = supports[static_cast<size_t>(rng() % supports.size())];
      std::vector<float> p, q;
      if (mode == 1) {
        p.assign(static_cast<size_t>(n_vocab), 0.0f);
        q = p;
        const int64_t best = id(rng);
        p[static_cast<size_t>(best)] = 1.0f;
        q[static_cast<size_t>(rng() % 4 == 0 ? id(rng) : best)] = 1.0f;  // the draft agrees 3 times in 4
      } else {
        p = random_distribution(n_vocab, support, rng);
        if (mode == 3 && support == n_vocab) p = random_distribution(n_vocab, 3, rng);
        q = mode >= 2 ? p : random_distribution(n_vocab, rng() % 2 == 0 ? support : n_vocab, rng);
        if (mode == 0 && rng() % 3 == 0) {  // a draft close to the target: mostly accepted
          for (size_t v = 0; v < q.size(); ++v) q[v] = 0.8f * p[v] + 0.2f * q[v];
        }
      }
      b.p.insert(b.p.end(), p.begin(), p.end());
      if (i < k_max) {
        b.q.insert(b.q.end(), q.begin(), q.end());
        int32_t token = sp::sample_dense(q.data(), n_vocab, uniform(rng));
        if (mode == 3 && rng() % 2 == 0) {  // a token the draft gave no mass: rejected, empty residual
          for (int64_t v = id(rng), tries = 0; tries < n_vocab; v = (v + 1) % n_vocab, ++tries) {
            if (q[static_cast<size_t>(v)] == 0.0f) {
              token = static_cast<int32_t>(v);
              break;
            }
          }
        }
        b.tokens.push_back(token);
      }
      b.uniforms.push_back(uniform(rng));
    }
  }
  return b;
}

}  // namespace

TEST(CudaSpeculativeAccept, MatchesCpuVerify) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(2024);
  for (const int mode : {0, 1, 2, 3}) {
    for (const int64_t n_vocab : {int64_t{7}, int64_t{1001}, int64_t{32000}}) {
      for (const int64_t k_max : {int64_t{1}, int64_t{3}, int64_t{5}}) {
        SCOPED_TRACE("mode " + std::to_string(mode) + " n_vocab " + std::to_string(n_vocab) + " k_max " +
                     std::to_string(k_max));
        const Batch b = make_batch(37, k_max, n_vocab, mode, rng);
        std::vector<int32_t> tokens, accepted;
        int32_t bad = -1;
        ASSERT_NO_FATAL_FAILURE(run_device(b, tokens, accepted, bad));
        EXPECT_EQ(bad, 0);
        int64_t total_accepted = 0, empty_residuals = 0;
        for (int64_t s = 0; s < b.seqs; ++s) {
          const sp::Verification want = run_host(b, s);
          if (want.accepted < b.counts[static_cast<size_t>(s)]) {
            const size_t row = static_cast<size_t>(s * k_max + want.accepted);
            empty_residuals +=
                b.q[row * static_cast<size_t>(n_vocab) + static_cast<size_t>(b.tokens[row])] == 0.0f;
          }
          ASSERT_EQ(accepted[static_cast<size_t>(s)], want.accepted) << "sequence " << s;
          for (int i = 0; i <= want.accepted; ++i) {
            EXPECT_EQ(tokens[static_cast<size_t>(s * (k_max + 1) + i)], want.tokens[static_cast<size_t>(i)])
                << "sequence " << s << " token " << i;
          }
          for (int64_t i = want.accepted + 1; i <= k_max; ++i) {  // untouched (filled with 0xff: -1)
            EXPECT_EQ(tokens[static_cast<size_t>(s * (k_max + 1) + i)], -1)
                << "sequence " << s << " token " << i;
          }
          total_accepted += want.accepted;
        }
        if (mode != 0) {
          EXPECT_GT(total_accepted, 0);  // the accepting branch ran
        }
        if (mode == 3) {
          EXPECT_GT(empty_residuals, 0);  // the draw from p after an empty residual ran
        }
      }
    }
  }
}

TEST(CudaSpeculativeAccept, ReportsBadCountsAndTokens) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(3);
  Batch b = make_batch(5, 2, 11, 0, rng);
  b.counts = {2, 3, 2, 2, 0};  // sequence 1: more proposals than k_max
  b.tokens[4] = 11;            // sequence 2's first token: outside the vocabulary
  b.tokens[7] = -5;            // sequence 3's second token, whatever becomes of the first
  std::fill_n(b.p.begin() + 4 * 3 * 11, 11, 0.0f);  // sequence 4's bonus row: no distribution
  std::vector<int32_t> tokens, accepted;
  int32_t bad = 0;
  ASSERT_NO_FATAL_FAILURE(run_device(b, tokens, accepted, bad));
  EXPECT_EQ(bad, 1);
  EXPECT_EQ(accepted[1], -1);
  EXPECT_EQ(accepted[2], -1);
  EXPECT_EQ(accepted[3], -1);
  EXPECT_EQ(accepted[4], -1);
  EXPECT_EQ(accepted[0], run_host(b, 0).accepted);  // the good sequence is unaffected
  DeviceBuffer<int32_t> one(1);
  EXPECT_EQ(k::cuda::speculative_accept(nullptr, one.ptr, nullptr, nullptr, nullptr, 1, 0, 11, one.ptr,
                                        one.ptr, one.ptr, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::speculative_accept(nullptr, one.ptr, nullptr, reinterpret_cast<const float*>(one.ptr),
                                        reinterpret_cast<const double*>(one.ptr), 1, 2, 11, one.ptr, one.ptr,
                                        one.ptr, nullptr),
            k::Status::invalid_argument);  // k_max 2 without tokens or draft rows
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

namespace {

// The draft's device draw (sample_dense_rows) against speculative::sample_dense with the same
// uniforms: random rows of odd widths, sparse and dense, one-hot rows, uniforms at the ends of [0, 1),
// and a row of zeros (reported as -1, where the host throws).
TEST(CudaSpeculativeAccept, SampleDenseRowsMatchesTheHostsDraw) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(23);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (const int64_t n_vocab : {int64_t{1}, int64_t{7}, int64_t{300}, int64_t{32003}}) {
    SCOPED_TRACE("n_vocab " + std::to_string(n_vocab));
    const int64_t rows = 37;
    std::vector<float> probs;
    std::vector<double> uniforms;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t support = r % 4 == 0 ? 1 : r % 4 == 1 ? 3 : r % 4 == 2 ? 50 : n_vocab;
      const std::vector<float> row = random_distribution(n_vocab, support, rng);
      probs.insert(probs.end(), row.begin(), row.end());
      uniforms.push_back(r == 1 ? 0.0 : r == 2 ? std::nextafter(1.0, 0.0) : uniform(rng));
    }
    probs.resize(static_cast<size_t>((rows + 1) * n_vocab), 0.0f);  // a last row of zeros
    uniforms.push_back(0.5);
    DeviceBuffer<float> dp(probs);
    DeviceBuffer<double> du(uniforms);
    DeviceBuffer<int32_t> dids(static_cast<size_t>(rows + 1));
    ASSERT_TRUE(dp.ptr && du.ptr && dids.ptr);
    ASSERT_EQ(k::cuda::sample_dense_rows(dp.ptr, du.ptr, rows + 1, n_vocab, dids.ptr, nullptr),
              k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<int32_t> ids = dids.to_host();
    ASSERT_EQ(ids.size(), static_cast<size_t>(rows + 1));
    for (int64_t r = 0; r < rows; ++r) {
      EXPECT_EQ(ids[static_cast<size_t>(r)],
                sp::sample_dense(probs.data() + r * n_vocab, n_vocab, uniforms[static_cast<size_t>(r)]))
          << "row " << r;
    }
    EXPECT_EQ(ids.back(), -1) << "a row without mass";
  }
  EXPECT_EQ(k::cuda::sample_dense_rows(nullptr, nullptr, 1, 5, nullptr, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
