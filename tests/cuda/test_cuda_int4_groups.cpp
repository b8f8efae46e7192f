// The device conversion of Q4_0 blocks to group-wise INT4 (kernels/cuda/int4_groups) against the
// host one (kernels::int4_groups_from_blocks): byte-identical nibbles, scales and zeros on random
// blocks of odd sizes whose groups share a scale, and a block with its own scale is reported.
// Skips without a CUDA device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/int4_groups.cuh"
#include "kernels/int4_groups.hpp"
#include "kernels/quant_types.hpp"
#include "tests/cuda/cuda_test_util.hpp"

namespace k = nibble::kernels;
using nibble::cuda_test::DeviceBuffer;

namespace {

// Random Q4_0 blocks whose groups of `group` inputs share one scale (symmetric GPTQ, the dummy format).
std::vector<uint8_t> shared_scale_blocks(int64_t n_out, int64_t kk, int64_t group, std::mt19937& rng) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.001f, 0.05f);
  std::vector<k::BlockQ4_0> blocks(static_cast<size_t>(n_out * kk / 32));
  for (size_t b = 0; b < blocks.size(); ++b) {
    blocks[b].d = b % static_cast<size_t>(group / 32) == 0 ? k::fp32_to_fp16(scale(rng)) : blocks[b - 1].d;
    for (auto& q : blocks[b].qs) q = static_cast<uint8_t>(byte(rng));
  }
  std::vector<uint8_t> raw(blocks.size() * sizeof(k::BlockQ4_0));
  std::memcpy(raw.data(), blocks.data(), raw.size());
  return raw;
}

}  // namespace

TEST(CudaInt4Groups, Q4_0ConversionEqualsTheHostOne) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(8);
  for (const int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}}) {
    for (const int64_t n_out : {int64_t{1}, int64_t{37}, int64_t{1001}}) {
      for (const int64_t kk : {int64_t{128}, int64_t{384}, int64_t{4224}}) {
        SCOPED_TRACE("group=" + std::to_string(group) + " n_out=" + std::to_string(n_out) +
                     " k=" + std::to_string(kk));
        std::vector<uint8_t> raw = shared_scale_blocks(n_out, kk, group, rng);
        const auto groups = static_cast<size_t>(n_out * kk / group);
        std::vector<uint8_t> quants(static_cast<size_t>(n_out * kk / 2)), zeros(groups);
        std::vector<uint16_t> scales(groups);
        ASSERT_EQ(k::int4_groups_from_blocks(k::DType::Q4_0, raw.data(), n_out, kk, group, quants.data(),
                                             scales.data(), zeros.data()),
                  k::Status::ok);
        DeviceBuffer<uint8_t> dblocks(raw), dq(quants.size()), dz(groups);
        DeviceBuffer<uint16_t> ds(groups);
        DeviceBuffer<int32_t> flag(std::vector<int32_t>{0});
        ASSERT_TRUE(dblocks.ptr && dq.ptr && dz.ptr && ds.ptr && flag.ptr);
        ASSERT_EQ(k::cuda::int4_groups_from_q4_0(dblocks.ptr, n_out, kk, group, dq.ptr, ds.ptr, dz.ptr,
                                                 flag.ptr, nullptr),
                  k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_EQ(flag.to_host(), std::vector<int32_t>{0});
        EXPECT_EQ(dq.to_host(), quants);
        EXPECT_EQ(ds.to_host(), scales);
        EXPECT_EQ(dz.to_host(), zeros);

        if (group > 32) {  // a later block of some group with its own scale: reported
          auto* blocks = reinterpret_cast<k::BlockQ4_0*>(raw.data());
          const size_t victim =
              raw.size() / sizeof(k::BlockQ4_0) - 1;  // the last block: never a group's first
          blocks[victim].d = static_cast<uint16_t>(blocks[victim].d ^ 1);
          DeviceBuffer<uint8_t> bad(raw);
          ASSERT_EQ(k::cuda::int4_groups_from_q4_0(bad.ptr, n_out, kk, group, dq.ptr, ds.ptr, dz.ptr,
                                                   flag.ptr, nullptr),
                    k::Status::ok);
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          EXPECT_EQ(flag.to_host(), std::vector<int32_t>{1});
          ASSERT_EQ(cudaMemset(flag.ptr, 0, sizeof(int32_t)), cudaSuccess);
        }
      }
    }
  }
}

TEST(CudaInt4Groups, RejectsBadArguments) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  DeviceBuffer<uint8_t> blocks(18 * 8), quants(16 * 8), zeros(8);
  DeviceBuffer<uint16_t> scales(8);
  DeviceBuffer<int32_t> flag(1);
  ASSERT_TRUE(blocks.ptr && quants.ptr && zeros.ptr && scales.ptr && flag.ptr);
  const auto call = [&](const uint8_t* b, uint8_t* q, int64_t kk, int64_t group, int32_t* f) {
    return k::cuda::int4_groups_from_q4_0(b, 2, kk, group, q, scales.ptr, zeros.ptr, f, nullptr);
  };
  EXPECT_EQ(call(blocks.ptr, quants.ptr, 128, 48, flag.ptr), k::Status::invalid_argument);
  EXPECT_EQ(call(blocks.ptr, quants.ptr, 96, 64, flag.ptr), k::Status::invalid_argument);
  EXPECT_EQ(call(blocks.ptr + 1, quants.ptr, 128, 32, flag.ptr), k::Status::invalid_argument);
  EXPECT_EQ(call(blocks.ptr, quants.ptr + 8, 128, 32, flag.ptr), k::Status::invalid_argument);
  EXPECT_EQ(call(blocks.ptr, quants.ptr, 128, 32, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(call(blocks.ptr, quants.ptr, 128, 128, flag.ptr), k::Status::ok);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}
