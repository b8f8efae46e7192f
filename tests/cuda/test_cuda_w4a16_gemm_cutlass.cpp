// Group-wise INT4 through CUTLASS's Hopper mixed-input GEMM (kernels/cuda/w4a16_gemm_cutlass): every
// weight of the reordered copy read back through the GEMM itself (x the identity, so y holds Wᵀ),
// against the CPU's dequantization; then products on odd row counts against a double-precision
// reference. The shape rules and argument checks run everywhere; the rest skips without a Hopper GPU
// or without CUTLASS in the build.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/w4a16_gemm_cutlass.cuh"
#include "kernels/quant_types.hpp"
#include "tests/cuda/w4a16_test_util.hpp"

namespace {

namespace kc = nibble::kernels::cuda;
namespace k = nibble::kernels;
namespace ct = nibble::cuda_test;
using k::Status;

#define NIBBLE_REQUIRE_CUTLASS_GEMM()                                                                    \
  do {                                                                                                   \
    NIBBLE_REQUIRE_CUDA_DEVICE();                                                                        \
    if (!kc::w4a16_cutlass_built()) GTEST_SKIP() << "built without CUTLASS (tools/fetch-cutlass.sh)";    \
    if (!kc::w4a16_cutlass_supported()) GTEST_SKIP() << "the CUTLASS GEMM needs compute capability 9.0"; \
  } while (0)

struct Case {  // one matrix shape
  int64_t n_out, k, group;
};

constexpr kc::CutlassSchedule kSchedules[] = {kc::CutlassSchedule::cooperative_128,
                                              kc::CutlassSchedule::pingpong_64,
                                              kc::CutlassSchedule::pingpong_64x16};
const char* schedule_name(kc::CutlassSchedule schedule) {
  switch (schedule) {
    case kc::CutlassSchedule::cooperative_128:
      return "cooperative, 128 x 128 tiles";
    case kc::CutlassSchedule::pingpong_64:
      return "ping-pong, 64 x 128 tiles";
    case kc::CutlassSchedule::pingpong_64x16:
      return "ping-pong, 64 x 16 tiles";
  }
  return "?";
}

TEST(W4A16GemmCutlass, ShapesItTakes) {
  EXPECT_TRUE(kc::int4_cutlass_shape_ok(8192, 8192, 128));
  EXPECT_TRUE(kc::int4_cutlass_shape_ok(28672, 8192, 128));
  EXPECT_TRUE(kc::int4_cutlass_shape_ok(384, 640, 64));
  EXPECT_FALSE(kc::int4_cutlass_shape_ok(8192, 8192, 32));      // a group under the k step
  EXPECT_FALSE(kc::int4_cutlass_shape_ok(8256, 8192, 128));     // n_out % 128
  EXPECT_FALSE(kc::int4_cutlass_shape_ok(8192, 8224, 32));      // k % 64
  EXPECT_FALSE(kc::int4_cutlass_shape_ok(8192, 704, 128));      // k % group
  EXPECT_FALSE(kc::int4_cutlass_shape_ok(131072, 16384, 128));  // 2^31 weights
  EXPECT_EQ(kc::int4_cutlass_bytes(8192, 8192, 32), size_t{0});
  // Nibbles, then scales and offsets, each 256-byte aligned.
  EXPECT_EQ(kc::int4_cutlass_bytes(384, 640, 64), size_t{384 * 320 + 2 * 7680});
}

// CUTLASS's reordered layout, on the host: every weight of a shape gets its own place in the copy
// (a permutation of 0 .. n_out · k - 1), within the 16 x 16 block of weights CUTLASS's atom reorders
// (256 contiguous nibbles).
TEST(W4A16GemmCutlass, ReorderedPositionsArePermutationsWithinBlocks) {
  if (!kc::w4a16_cutlass_built()) GTEST_SKIP() << "built without CUTLASS (tools/fetch-cutlass.sh)";
  for (const auto& [n_out, kk] : {std::pair<int64_t, int64_t>{128, 64}, {256, 384}, {384, 640}}) {
    SCOPED_TRACE(std::to_string(n_out) + " x " + std::to_string(kk));
    std::vector<int64_t> row_of(static_cast<size_t>(n_out * kk), -1);  // who holds each place
    int bad = 0;
    for (int64_t r = 0; r < n_out; ++r) {
      for (int64_t j = 0; j < kk; ++j) {
        const int64_t at = kc::int4_cutlass_element_position(n_out, kk, r, j);
        if (at < 0 || at >= n_out * kk || row_of[static_cast<size_t>(at)] != -1) {
          if (++bad <= 5) ADD_FAILURE() << "w[" << r << ", " << j << "] at " << at << ": outside or taken";
          continue;
        }
        row_of[static_cast<size_t>(at)] = r;
        // The 16 x 16 block (r / 16, j / 16) is 256 contiguous elements somewhere in the copy.
        const int64_t block_start = kc::int4_cutlass_element_position(n_out, kk, r / 16 * 16, j / 16 * 16);
        if (at / 256 != block_start / 256 && ++bad <= 5)
          ADD_FAILURE() << "w[" << r << ", " << j << "] at " << at << ", its block at " << block_start;
      }
    }
    EXPECT_EQ(bad, 0);
  }
  EXPECT_EQ(kc::int4_cutlass_element_position(100, 64, 0, 0), -1);  // n_out % 128
  EXPECT_EQ(kc::int4_cutlass_element_position(128, 64, 128, 0), -1);
  EXPECT_EQ(kc::int4_cutlass_element_position(128, 64, 0, 64), -1);
}

// The device repack against the layout: each nibble where int4_cutlass_element_position puts it, the
// scales and fp16(-scale · zero) offsets transposed to [groups, n_out].
TEST(W4A16GemmCutlass, DeviceRepackPutsEveryNibbleWhereTheLayoutSays) {
  NIBBLE_REQUIRE_CUTLASS_GEMM();
  std::mt19937 rng(31);
  const int64_t n_out = 256, kk = 384, group = 128, groups = kk / group;
  ct::DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(n_out, kk, group, rng, w));
  ct::CutlassCopy copy;
  ASSERT_NO_FATAL_FAILURE(ct::make_cutlass_copy(w, n_out, kk, group, copy));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<uint8_t> quants = w.quants->to_host(), zeros = w.zeros->to_host(),
                             bytes = copy.bytes->to_host();
  const std::vector<uint16_t> scales = w.scales->to_host();
  ASSERT_EQ(bytes.size(), kc::int4_cutlass_bytes(n_out, kk, group));
  int bad = 0;
  for (int64_t r = 0; r < n_out; ++r) {
    for (int64_t j = 0; j < kk; ++j) {
      const uint8_t byte = quants[static_cast<size_t>(r * kk / 2 + j / 32 * 16 + j % 16)];
      const int want = j % 32 < 16 ? byte & 0xF : byte >> 4;
      const int64_t at = kc::int4_cutlass_element_position(n_out, kk, r, j);
      const int have = (bytes[static_cast<size_t>(at / 2)] >> (4 * (at % 2))) & 0xF;
      if (have != want && ++bad <= 5)
        ADD_FAILURE() << "w[" << r << ", " << j << "] = " << have << ", want " << want;
    }
  }
  const auto* scales_out =
      reinterpret_cast<const uint8_t*>(copy.weights.scales) - copy.bytes->ptr + bytes.data();
  const auto* offsets_out =
      reinterpret_cast<const uint8_t*>(copy.weights.offsets) - copy.bytes->ptr + bytes.data();
  for (int64_t r = 0; r < n_out; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      uint16_t scale_bits = 0, offset_bits = 0;
      std::memcpy(&scale_bits, scales_out + 2 * (g * n_out + r), 2);
      std::memcpy(&offset_bits, offsets_out + 2 * (g * n_out + r), 2);
      const uint16_t scale = scales[static_cast<size_t>(r * groups + g)];
      const float offset =
          -k::fp16_to_fp32(scale) * static_cast<float>(zeros[static_cast<size_t>(r * groups + g)]);
      if ((scale_bits != scale || offset_bits != k::fp32_to_fp16(offset)) && ++bad <= 10)
        ADD_FAILURE() << "group " << g << " of row " << r << ": scale " << scale_bits << " offset "
                      << offset_bits;
    }
  }
  EXPECT_EQ(bad, 0);
}

// CUTLASS's can_implement, on the host, accepts the arguments this file builds for every schedule on
// llama-70b's shapes and the tests' own, at the row counts the model uses; it refuses a group CUTLASS
// cannot step through (32) through int4_cutlass_shape_ok first.
TEST(W4A16GemmCutlass, CutlassAcceptsTheProblemsAsBuilt) {
  if (!kc::w4a16_cutlass_built()) GTEST_SKIP() << "built without CUTLASS (tools/fetch-cutlass.sh)";
  for (const Case c :
       {Case{8192, 8192, 128}, Case{10240, 8192, 128}, Case{57344, 8192, 128}, Case{8192, 28672, 128},
        Case{128256, 8192, 128}, Case{1024, 1536, 128}, Case{384, 640, 64}, Case{128, 64, 64}}) {
    for (const kc::CutlassSchedule schedule : kSchedules) {
      for (const int64_t m : {1, 16, 17, 33, 256, 300}) {
        EXPECT_TRUE(kc::w4a16_gemm_int4_cutlass_implementable(c.n_out, c.k, c.group, m, schedule))
            << c.n_out << " x " << c.k << " g" << c.group << ", " << m << " rows, "
            << schedule_name(schedule);
      }
    }
  }
  EXPECT_FALSE(
      kc::w4a16_gemm_int4_cutlass_implementable(8192, 8192, 32, 16, kc::CutlassSchedule::pingpong_64x16));
  EXPECT_FALSE(
      kc::w4a16_gemm_int4_cutlass_implementable(8192, 8192, 128, 0, kc::CutlassSchedule::cooperative_128));
}

TEST(W4A16GemmCutlass, RejectsBadArgumentsBeforeTouchingTheDevice) {
  kc::Int4CutlassWeights none;
  std::vector<uint8_t> host(64);
  kc::Int4CutlassWeights copy;
  EXPECT_EQ(kc::int4_cutlass_from_groups(host.data(), reinterpret_cast<const uint16_t*>(host.data()),
                                         host.data(), 256, 256, 32, host.data(), &copy, nullptr),
            kc::w4a16_cutlass_built() ? Status::invalid_argument : Status::unsupported_type);  // group 32
  EXPECT_EQ(
      kc::int4_cutlass_from_groups(host.data(), reinterpret_cast<const uint16_t*>(host.data()), host.data(),
                                   256, 256, 128, host.data() + 1, &copy, nullptr),
      kc::w4a16_cutlass_built() ? Status::invalid_argument : Status::unsupported_type);  // out misaligned
  const Status want = kc::w4a16_cutlass_supported() ? Status::invalid_argument : Status::unsupported_type;
  EXPECT_EQ(kc::w4a16_gemm_int4_cutlass(reinterpret_cast<const __half*>(host.data()), none, 4,
                                        reinterpret_cast<float*>(host.data()), nullptr),
            want);  // no weights
}

// x = I (m = k rows) makes y[j][r] = w(r, j): each weight as the GEMM sees it. CUTLASS evaluates
// q · scale + fp16(-scale · zero) in fp16, three roundings at magnitudes up to 16 · scale, so each
// weight is within 0.025 · scale of (q - zero) · scale; the bound is 0.005 of the group's largest
// |w| (at least ~7 · scale for random levels). A misplaced nibble is off by whole steps of scale.
TEST(W4A16GemmCutlass, EveryWeightOfTheCopyIsWhereTheGemmReadsIt) {
  NIBBLE_REQUIRE_CUTLASS_GEMM();
  std::mt19937 rng(21);
  for (const Case c : {Case{256, 384, 128}, Case{128, 640, 64}}) {
    SCOPED_TRACE("n_out " + std::to_string(c.n_out) + " k " + std::to_string(c.k) + " group " +
                 std::to_string(c.group));
    ct::DeviceInt4Groups w;
    ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(c.n_out, c.k, c.group, rng, w));
    ct::CutlassCopy copy;
    ASSERT_NO_FATAL_FAILURE(ct::make_cutlass_copy(w, c.n_out, c.k, c.group, copy));
    std::vector<k::f16_bits> identity(static_cast<size_t>(c.k * c.k), k::fp32_to_fp16(0.0f));
    for (int64_t j = 0; j < c.k; ++j) identity[static_cast<size_t>(j * c.k + j)] = k::fp32_to_fp16(1.0f);
    ct::DeviceBuffer<k::f16_bits> x(identity);
    ct::DeviceBuffer<float> y(static_cast<size_t>(c.k * c.n_out));
    ASSERT_NE(x.ptr, nullptr);
    ASSERT_NE(y.ptr, nullptr);
    for (const kc::CutlassSchedule schedule : kSchedules) {
      SCOPED_TRACE(schedule_name(schedule));
      ASSERT_EQ(kc::w4a16_gemm_int4_cutlass(reinterpret_cast<const __half*>(x.ptr), copy.weights, c.k, y.ptr,
                                            nullptr, schedule),
                Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> got = y.to_host();
      ASSERT_EQ(got.size(), static_cast<size_t>(c.k * c.n_out));
      int bad = 0;
      for (int64_t r = 0; r < c.n_out; ++r) {
        for (int64_t g = 0; g < c.k / c.group; ++g) {
          float largest = 0.0f;
          for (int64_t j = g * c.group; j < (g + 1) * c.group; ++j)
            largest = std::max(largest, std::fabs(w.wf[static_cast<size_t>(r * c.k + j)]));
          for (int64_t j = g * c.group; j < (g + 1) * c.group; ++j) {
            const float want = w.wf[static_cast<size_t>(r * c.k + j)];
            const float have = got[static_cast<size_t>(j * c.n_out + r)];
            if (!(std::fabs(have - want) <= 0.005f * largest) && ++bad <= 5)
              ADD_FAILURE() << "w[" << r << ", " << j << "] = " << have << ", want " << want;
          }
        }
      }
      EXPECT_EQ(bad, 0);
    }
  }
}

// Bound 4e-3 of Σ|x · w|: the weights as above (each within 0.025 · scale, a few thousandths of a
// typical |w|), fp16 products summed in fp32.
TEST(W4A16GemmCutlass, MatchesTheReferenceOnOddRowCounts) {
  NIBBLE_REQUIRE_CUTLASS_GEMM();
  std::mt19937 rng(23);
  for (const Case c : {Case{1024, 1536, 128}, Case{384, 640, 64}}) {
    ct::DeviceInt4Groups w;
    ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(c.n_out, c.k, c.group, rng, w));
    ct::CutlassCopy copy;
    ASSERT_NO_FATAL_FAILURE(ct::make_cutlass_copy(w, c.n_out, c.k, c.group, copy));
    for (const kc::CutlassSchedule schedule : kSchedules) {
      SCOPED_TRACE(schedule_name(schedule));
      for (const int64_t m : {1, 17, 33, 129, 300}) {
        ct::expect_matches_reference(
            w.wf, c.n_out, c.k, m, 4e-3, rng, [&](const __half* x, int64_t mm, float* y) {
              return kc::w4a16_gemm_int4_cutlass(x, copy.weights, mm, y, nullptr, schedule);
            });
      }
    }
  }
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// A row's outputs do not depend on how many rows share the call (no split of k; the model's tuning
// relies on it, see w4a16_tuning.cuh): the first 17 rows of a 300-row product equal a 17-row product
// of the same rows, bit for bit, on each schedule.
TEST(W4A16GemmCutlass, ARowsOutputsDoNotDependOnTheRowCount) {
  NIBBLE_REQUIRE_CUTLASS_GEMM();
  std::mt19937 rng(29);
  const int64_t n_out = 1024, kk = 1536, group = 128, many = 300, few = 17;
  ct::DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(n_out, kk, group, rng, w));
  ct::CutlassCopy copy;
  ASSERT_NO_FATAL_FAILURE(ct::make_cutlass_copy(w, n_out, kk, group, copy));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<k::f16_bits> xh(static_cast<size_t>(many * kk));
  for (auto& v : xh) v = k::fp32_to_fp16(normal(rng));
  ct::DeviceBuffer<k::f16_bits> x(xh);
  ct::DeviceBuffer<float> y_many(static_cast<size_t>(many * n_out)), y_few(static_cast<size_t>(few * n_out));
  ASSERT_NE(x.ptr, nullptr);
  ASSERT_NE(y_many.ptr, nullptr);
  ASSERT_NE(y_few.ptr, nullptr);
  for (const kc::CutlassSchedule schedule : kSchedules) {
    SCOPED_TRACE(schedule_name(schedule));
    const auto* xd = reinterpret_cast<const __half*>(x.ptr);
    ASSERT_EQ(kc::w4a16_gemm_int4_cutlass(xd, copy.weights, many, y_many.ptr, nullptr, schedule), Status::ok);
    ASSERT_EQ(kc::w4a16_gemm_int4_cutlass(xd, copy.weights, few, y_few.ptr, nullptr, schedule), Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> a = y_many.to_host(), b = y_few.to_host();
    ASSERT_EQ(a.size(), static_cast<size_t>(many * n_out));
    ASSERT_EQ(b.size(), static_cast<size_t>(few * n_out));
    EXPECT_EQ(std::memcmp(a.data(), b.data(), b.size() * sizeof(float)), 0);
  }
}

}  // namespace
