// CUDA greedy and temperature/top-k/top-p/min-p sampling and the repetition penalty against worker::Sampler
// (its own source is compiled into this test): the same logits, settings and uniform draw must give the same
// token id. Skips when there is no CUDA device.
//
// The GPU sums probabilities in a different order than the CPU, so its cumulative boundaries differ
// from the CPU's by rounding only (~1e-13 here). Draws are therefore kept at least 1e-9 away from
// every CPU boundary; apart from that the ids must be equal, not merely close.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/sampling.cuh"
#include "tests/cuda/cuda_test_util.hpp"
#include "worker/sampler.hpp"

namespace k = nibble::kernels;
namespace w = nibble::worker;
using nibble::cuda_test::DeviceBuffer;

namespace {

// Row logits: normal, or (coarse) rounded to a 0.25 grid so that ties at the top and at the top-k
// boundary are common; a few -inf entries and both zeros.
std::vector<float> make_logits(int64_t rows, int64_t n_vocab, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> x(static_cast<size_t>(rows * n_vocab));
  for (int64_t r = 0; r < rows; ++r) {
    const bool coarse = r % 2 == 1;
    float* row = x.data() + r * n_vocab;
    for (int64_t i = 0; i < n_vocab; ++i) {
      const float v = normal(rng);
      row[i] = coarse ? std::round(v * 4.0f) / 4.0f : v;
    }
    if (n_vocab > 10) {
      row[3] = -INFINITY;
      row[5] = -0.0f;
      row[6] = 0.0f;
      // The maximum twice: ties go to the lower id.
      const float mx = *std::max_element(row, row + n_vocab);
      row[n_vocab - 1] = mx;
      row[n_vocab / 2] = mx;
    }
  }
  return x;
}

// The CPU sampler's choice for draw u, and how close u is to a cumulative boundary.
int32_t cpu_choice(const std::vector<w::TokenProbability>& dist, double u, double* margin) {
  *margin = INFINITY;
  if (dist.size() == 1) return dist.front().id;
  double cumulative = 0.0;
  int32_t chosen = -1;
  for (const auto& tp : dist) {
    *margin = std::min(*margin, std::fabs(u - cumulative));
    cumulative += tp.p;
    *margin = std::min(*margin, std::fabs(u - cumulative));
    if (chosen < 0 && u < cumulative) chosen = tp.id;
  }
  return chosen >= 0 ? chosen : dist.back().id;
}

}  // namespace

TEST(CudaSampling, ArgmaxMatchesCpuWithTiesToTheLowestId) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(3);
  for (const int64_t n_vocab : {1, 1001, 32000, 128256}) {
    SCOPED_TRACE("n_vocab=" + std::to_string(n_vocab));
    const int64_t rows = 7;
    std::vector<float> x = make_logits(rows, n_vocab, rng);
    if (n_vocab > 10) {  // a row where every logit is -inf except zeros of both signs: -0 first
      std::fill(x.begin(), x.begin() + n_vocab, -INFINITY);
      x[8] = -0.0f;
      x[9] = 0.0f;
    }
    DeviceBuffer<float> dx(x);
    DeviceBuffer<int32_t> dids(static_cast<size_t>(rows));
    ASSERT_TRUE(dx.ptr && dids.ptr);
    ASSERT_EQ(k::cuda::argmax_rows(dx.ptr, rows, n_vocab, dids.ptr, nullptr), k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto got = dids.to_host();
    ASSERT_EQ(got.size(), static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = x.data() + r * n_vocab;
      const auto want = static_cast<int32_t>(std::max_element(row, row + n_vocab) - row);
      EXPECT_EQ(got[r], want) << "row " << r;
      // The same through the sampler at temperature 0.
      w::Sampler greedy(w::SamplingParams{});
      EXPECT_EQ(greedy.sample(row, n_vocab, {}), want);
    }
  }
}

// Row settings that exercise every filter and their combinations.
std::vector<k::cuda::SamplingRowParams> sampling_settings() {
  return {
      {0.0f, 0, 1.0f, 0.0f},        // greedy
      {1.0f, 0, 1.0f, 0.0f},        // plain temperature over the whole vocabulary
      {0.7f, 40, 1.0f, 0.0f},       // top-k
      {1.3f, 0, 0.9f, 0.0f},        // top-p
      {1.0f, 50, 0.8f, 0.05f},      // all filters
      {0.5f, 0, 1.0f, 0.1f},        // min-p
      {2.0f, 1, 1.0f, 0.0f},        // top-k 1: deterministic
      {1.0f, 0, 0.3f, 0.0f},        // a small nucleus
      {1.0f, 1 << 30, 1.0f, 0.0f},  // top-k beyond the vocabulary: off
      {0.8f, 7, 0.95f, 0.0f},       // top-k with ties at its boundary (coarse rows)
  };
}

w::Sampler cpu_sampler(const k::cuda::SamplingRowParams& sp) {
  w::SamplingParams cpu;
  cpu.temperature = sp.temperature;
  cpu.top_k = sp.top_k;
  cpu.top_p = sp.top_p;
  cpu.min_p = sp.min_p;
  return w::Sampler(cpu);
}

TEST(CudaSampling, SampleRowsMatchesCpuSampler) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(99);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  const std::vector<k::cuda::SamplingRowParams> settings = sampling_settings();
  const int draws_per_setting = 3;
  for (const int64_t n_vocab : {1, 1001, 32000, 128256}) {
    SCOPED_TRACE("n_vocab=" + std::to_string(n_vocab));
    const auto rows = static_cast<int64_t>(settings.size() * draws_per_setting);
    const std::vector<float> x = make_logits(rows, n_vocab, rng);
    std::vector<k::cuda::SamplingRowParams> params;
    std::vector<double> us;
    std::vector<int32_t> want;
    for (int64_t r = 0; r < rows; ++r) {
      const auto& sp = settings[static_cast<size_t>(r / draws_per_setting)];
      params.push_back(sp);
      const w::Sampler sampler = cpu_sampler(sp);
      const auto dist = sampler.distribution(x.data() + r * n_vocab, n_vocab, {});
      double u = uniform(rng);
      double margin = 0.0;
      int32_t id = cpu_choice(dist, u, &margin);
      for (int tries = 0; margin < 1e-9 && tries < 100; ++tries) {  // keep off the boundaries
        u = uniform(rng);
        id = cpu_choice(dist, u, &margin);
      }
      ASSERT_GE(margin, 1e-9);
      us.push_back(u);
      want.push_back(id);
    }
    size_t ws = 0;
    ASSERT_EQ(k::cuda::sample_rows_workspace_bytes(rows, n_vocab, &ws), k::Status::ok);
    DeviceBuffer<float> dx(x);
    DeviceBuffer<k::cuda::SamplingRowParams> dp(params);
    DeviceBuffer<double> du(us);
    DeviceBuffer<int32_t> dids(static_cast<size_t>(rows));
    DeviceBuffer<uint8_t> dws(ws);
    ASSERT_TRUE(dx.ptr && dp.ptr && du.ptr && dids.ptr && dws.ptr);
    ASSERT_EQ(k::cuda::sample_rows(dx.ptr, dp.ptr, du.ptr, rows, n_vocab, dids.ptr, dws.ptr, ws, nullptr),
              k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto got = dids.to_host();
    ASSERT_EQ(got.size(), static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      const auto& sp = params[static_cast<size_t>(r)];
      EXPECT_EQ(got[r], want[r]) << "row " << r << " (temperature " << sp.temperature << ", top_k "
                                 << sp.top_k << ", top_p " << sp.top_p << ", min_p " << sp.min_p << ", u "
                                 << us[r] << ")";
    }
  }
}

// The dense distributions the speculative acceptance kernel takes: the CPU sampler's distribution
// (the same kept candidates; each probability the CPU's float up to the GPU's summation order, so
// within a few float ulps), zeros elsewhere, one-hot on the argmax for greedy rows.
TEST(CudaSampling, DistributionRowsMatchCpuSampler) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(5);
  const std::vector<k::cuda::SamplingRowParams> settings = sampling_settings();
  for (const int64_t n_vocab : {1, 1001, 128256}) {
    SCOPED_TRACE("n_vocab=" + std::to_string(n_vocab));
    const auto rows = static_cast<int64_t>(settings.size());
    const std::vector<float> x = make_logits(rows, n_vocab, rng);
    size_t ws = 0;
    ASSERT_EQ(k::cuda::sample_rows_workspace_bytes(rows, n_vocab, &ws), k::Status::ok);
    DeviceBuffer<float> dx(x), dprobs(static_cast<size_t>(rows * n_vocab));
    DeviceBuffer<k::cuda::SamplingRowParams> dp(settings);
    DeviceBuffer<uint8_t> dws(ws);
    ASSERT_TRUE(dx.ptr && dprobs.ptr && dp.ptr && dws.ptr);
    ASSERT_EQ(cudaMemset(dprobs.ptr, 0xff, static_cast<size_t>(rows * n_vocab) * sizeof(float)), cudaSuccess);
    ASSERT_EQ(k::cuda::distribution_rows(dx.ptr, dp.ptr, rows, n_vocab, dprobs.ptr, dws.ptr, ws, nullptr),
              k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> got = dprobs.to_host();
    ASSERT_EQ(got.size(), static_cast<size_t>(rows * n_vocab));
    for (int64_t r = 0; r < rows; ++r) {
      SCOPED_TRACE("row " + std::to_string(r));
      std::vector<float> want(static_cast<size_t>(n_vocab), 0.0f);
      for (const auto& tp :
           cpu_sampler(settings[static_cast<size_t>(r)]).distribution(x.data() + r * n_vocab, n_vocab, {}))
        want[static_cast<size_t>(tp.id)] = tp.p;
      int bad = 0;
      for (int64_t v = 0; v < n_vocab; ++v) {
        const float g = got[static_cast<size_t>(r * n_vocab + v)], e = want[static_cast<size_t>(v)];
        const bool ok = (e == 0.0f) == (g == 0.0f) && std::fabs(g - e) <= 1e-6f * e;
        if (!ok && ++bad <= 5) ADD_FAILURE() << "id " << v << ": GPU " << g << ", CPU " << e;
      }
      ASSERT_EQ(bad, 0);
    }
  }
}

// The logit adjustment kernel against worker::apply_logit_adjustments, bit for bit: rows of odd
// sizes, random histories (repeats, ids out of range, windows shorter and longer than the history),
// repetition penalties above and below 1, presence and frequency penalties, logit biases (some on
// tokens in the window, some beyond the vocabulary), and rows with none.
TEST(CudaSampling, LogitAdjustmentsMatchTheCpuRule) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  static_assert(sizeof(w::LogitAdjustment) == sizeof(k::cuda::LogitAdjustment));
  std::mt19937 rng(31);
  for (const int64_t n_vocab : {int64_t{1}, int64_t{37}, int64_t{5003}}) {
    const int64_t rows = 7;
    std::vector<float> logits = make_logits(rows, n_vocab, rng), want = logits;
    std::uniform_int_distribution<int32_t> token(-2, static_cast<int32_t>(n_vocab) + 1);
    std::uniform_real_distribution<float> amount(-3.0f, 3.0f);
    std::vector<w::LogitAdjustment> adjustments;
    std::vector<int32_t> offsets{0};
    for (int64_t r = 0; r < rows; ++r) {
      w::SamplingParams p;
      p.repetition_penalty = r == 3 ? 1.0f : (r % 2 == 0 ? 1.3f : 0.8f);
      p.presence_penalty = r % 3 == 1 ? amount(rng) : 0.0f;
      p.frequency_penalty = r % 3 == 2 ? amount(rng) : 0.0f;
      p.repeat_last_n = static_cast<int32_t>(5 + 20 * r);
      if (r % 2 == 1) {
        for (int32_t t = 0; t < 4; ++t)
          p.logit_bias.push_back({t * 13 % static_cast<int32_t>(n_vocab + 3), amount(rng)});
        std::sort(p.logit_bias.begin(), p.logit_bias.end(),
                  [](const w::TokenBias& a, const w::TokenBias& b) { return a.token < b.token; });
        p.logit_bias.erase(
            std::unique(p.logit_bias.begin(), p.logit_bias.end(),
                        [](const w::TokenBias& a, const w::TokenBias& b) { return a.token == b.token; }),
            p.logit_bias.end());
      }
      std::vector<int32_t> history(static_cast<size_t>(3 + 17 * r));
      for (int32_t& t : history) t = token(rng) % static_cast<int32_t>(std::min<int64_t>(n_vocab + 2, 60));
      w::apply_logit_adjustments(p, history, want.data() + r * n_vocab, n_vocab);
      const std::vector<w::LogitAdjustment> row = w::logit_adjustments(p, history, n_vocab);
      adjustments.insert(adjustments.end(), row.begin(), row.end());
      offsets.push_back(static_cast<int32_t>(adjustments.size()));
    }
    ASSERT_NE(logits, want) << "the adjustments changed something";
    std::vector<k::cuda::LogitAdjustment> device_rows;
    for (const w::LogitAdjustment& a : adjustments)
      device_rows.push_back({a.id, a.bias, a.penalty, a.subtract});
    DeviceBuffer<float> d_logits(logits);
    DeviceBuffer<k::cuda::LogitAdjustment> d_adjustments(device_rows);
    DeviceBuffer<int32_t> d_offsets(offsets);
    ASSERT_EQ(k::cuda::apply_logit_adjustments(d_logits.ptr, rows, n_vocab, d_adjustments.ptr, d_offsets.ptr,
                                               nullptr),
              k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(d_logits.to_host(), want) << "n_vocab " << n_vocab;
  }
  EXPECT_EQ(k::cuda::apply_logit_adjustments(nullptr, 1, 4, nullptr, nullptr, nullptr),
            k::Status::invalid_argument);
}

TEST(CudaSampling, RejectsBadArguments) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  DeviceBuffer<float> dx(64);
  DeviceBuffer<k::cuda::SamplingRowParams> dp(2);
  DeviceBuffer<double> du(2);
  DeviceBuffer<int32_t> dids(2);
  size_t ws = 0;
  ASSERT_EQ(k::cuda::sample_rows_workspace_bytes(2, 32, &ws), k::Status::ok);
  DeviceBuffer<uint8_t> dws(ws);
  ASSERT_TRUE(dx.ptr && dp.ptr && du.ptr && dids.ptr && dws.ptr);
  EXPECT_EQ(k::cuda::argmax_rows(nullptr, 2, 32, dids.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::argmax_rows(dx.ptr, 2, 0, dids.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::argmax_rows(dx.ptr, -1, 32, dids.ptr, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::sample_rows(dx.ptr, dp.ptr, du.ptr, 2, 32, dids.ptr, dws.ptr, ws - 1, nullptr),
            k::Status::invalid_argument);  // workspace too small
  EXPECT_EQ(k::cuda::sample_rows(dx.ptr, dp.ptr, nullptr, 2, 32, dids.ptr, dws.ptr, ws, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::sample_rows_workspace_bytes(1 << 16, 1 << 16, &ws),
            k::Status::invalid_argument);  // > 2^31
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(k::cuda::argmax_rows(dx.ptr, 0, 32, dids.ptr, nullptr), k::Status::ok);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}
