// The quantized KV cache's kernels (kernels/cuda/kv_cache_quant) against the CPU's cache rows, bit for
// bit, on random caches of odd geometry: the store kernel writes kernels::quantize_cache_row's bytes of
// each new row (rotated by kernels::hadamard_rotate first, when asked) and the fp16 of their
// dequantization back into the working copy; the dequantization kernel writes fp16 of
// kernels::dequantize_row's values for exactly the blocks the tables reference; hadamard_rotate_f16 is
// the CPU rotation of the fp16 values, rounded once. Skips when there is no CUDA device.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cuda/kv_cache_quant.cuh"
#include "kernels/hadamard.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"
#include "tests/cuda/cuda_test_util.hpp"

namespace k = nibble::kernels;
namespace kc = nibble::kernels::cuda;
using nibble::cuda_test::DeviceBuffer;

namespace {

constexpr k::DType kTypes[] = {k::DType::Q8_0, k::DType::Q5_1, k::DType::Q5_0,
                               k::DType::Q4_1, k::DType::Q4_0, k::DType::IQ4_NL};
constexpr uint16_t kSentinel = 0x7BFF;  // fp16 65504: no cache value

std::vector<uint16_t> random_f16(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = k::fp32_to_fp16(normal(rng) * (rng() % 16 == 0 ? 8.0f : 1.0f));  // some outliers
  return v;
}

__half* as_half(uint16_t* p) { return reinterpret_cast<__half*>(p); }

struct Geometry {
  int64_t n_head_kv = 3, head_dim = 64, block_size = 5, num_blocks = 9, mbps = 4;
  int64_t kv_dim() const { return n_head_kv * head_dim; }
  int64_t slots() const { return num_blocks * block_size; }
};

kc::KvCacheQuantShape shape_of(const Geometry& g, k::DType k_type, k::DType v_type) {
  kc::KvCacheQuantShape s;
  s.n_head_kv = g.n_head_kv;
  s.head_dim = g.head_dim;
  s.block_size = g.block_size;
  s.num_blocks = g.num_blocks;
  s.max_blocks_per_seq = g.mbps;
  s.k_type = k_type;
  s.v_type = v_type;
  return s;
}

// The CPU's cache row for the fp16 values `row` (rotated in float first when rotation > 0), and the fp16
// of what it dequantizes to.
void cpu_row(k::DType type, const uint16_t* row, int64_t n, int64_t rotation, std::vector<uint8_t>& bytes,
             std::vector<uint16_t>& back) {
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) x[static_cast<size_t>(i)] = k::fp16_to_fp32(row[i]);
  if (rotation > 0) {
    ASSERT_EQ(k::hadamard_rotate(x.data(), n / rotation, rotation), k::Status::ok);
  }
  bytes.assign(static_cast<size_t>(k::row_bytes(type, n)), 0);
  ASSERT_EQ(k::quantize_cache_row(type, x.data(), bytes.data(), n), k::Status::ok);
  std::vector<float> y(static_cast<size_t>(n));
  ASSERT_EQ(k::dequantize_row(type, bytes.data(), y.data(), n), k::Status::ok);
  back.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) back[static_cast<size_t>(i)] = k::fp32_to_fp16(y[static_cast<size_t>(i)]);
}

// Two sequences' tables over distinct blocks, tokens at scattered positions (one with a bad block).
struct Tokens {
  std::vector<int32_t> tables, pos, seq;
};
Tokens some_tokens(const Geometry& g) {
  Tokens t;
  t.tables = {4, 0, 7, 2, /* row 1 */ 8, 1, 6, 99};
  // (row, position): slots in blocks 4, 0, 7, 2, 8, 1, 6; the last names block 99 (outside the cache).
  const int32_t rows[] = {0, 0, 0, 0, 1, 1, 1, 1};
  const int32_t positions[] = {0, 7, 13, 19, 3, 5, 12, 16};
  for (size_t i = 0; i < std::size(rows); ++i) {
    t.seq.push_back(rows[i]);
    t.pos.push_back(positions[i]);
  }
  EXPECT_LE(static_cast<int64_t>(t.tables.size()), 2 * g.mbps);
  return t;
}

TEST(CudaKvCacheQuant, StoreWritesTheCpuCacheRowsAndReadsThemBack) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  const Geometry g;
  const Tokens t = some_tokens(g);
  std::mt19937 rng(11);
  for (const k::DType type : kTypes) {
    // K rotated per 64 (the head), V per 32; then neither; the other side F16 in one case.
    for (const auto& [k_rot, v_rot, v_type] :
         {std::tuple{int64_t{64}, int64_t{32}, type}, std::tuple{int64_t{0}, int64_t{0}, type},
          std::tuple{int64_t{16}, int64_t{0}, k::DType::F16}}) {
      SCOPED_TRACE(std::string(k::type_name(type)) + " k rotation " + std::to_string(k_rot) + ", v " +
                   k::type_name(v_type) + " rotation " + std::to_string(v_rot));
      const auto s = shape_of(g, type, v_type);
      const int64_t kv = g.kv_dim();
      const int64_t k_rb = k::row_bytes(type, kv);
      const int64_t v_rb = v_type == k::DType::F16 ? 0 : k::row_bytes(v_type, kv);
      const std::vector<uint16_t> k_in = random_f16(static_cast<size_t>(g.slots() * kv), rng);
      const std::vector<uint16_t> v_in = random_f16(static_cast<size_t>(g.slots() * kv), rng);
      const std::vector<uint8_t> k_bytes_in(static_cast<size_t>(g.slots() * k_rb), 0xA5);
      const std::vector<uint8_t> v_bytes_in(static_cast<size_t>(std::max<int64_t>(g.slots() * v_rb, 1)),
                                            0x5A);
      DeviceBuffer<uint16_t> k_work(k_in), v_work(v_in);
      DeviceBuffer<uint8_t> k_cache(k_bytes_in), v_cache(v_bytes_in);
      DeviceBuffer<int32_t> tables(t.tables), pos(t.pos), seq(t.seq), flag(std::vector<int32_t>{0});
      ASSERT_EQ(kc::kv_cache_store_positions(s, static_cast<int64_t>(t.pos.size()), k_rot, v_rot, pos.ptr,
                                             seq.ptr, tables.ptr, as_half(k_work.ptr), as_half(v_work.ptr),
                                             k_cache.ptr, v_cache.ptr, flag.ptr, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_EQ(flag.to_host()[0], 1) << "the token in block 99 raises the flag";
      const auto k_work_out = k_work.to_host(), v_work_out = v_work.to_host();
      const auto k_cache_out = k_cache.to_host(), v_cache_out = v_cache.to_host();
      std::set<int64_t> written;
      for (size_t i = 0; i + 1 < t.pos.size(); ++i) {  // the last token's block is bad
        const int64_t block = t.tables[static_cast<size_t>(t.seq[i] * g.mbps + t.pos[i] / g.block_size)];
        const int64_t slot = block * g.block_size + t.pos[i] % g.block_size;
        written.insert(slot);
        for (int side = 0; side < (v_type == k::DType::F16 ? 1 : 2); ++side) {
          const auto& in = side == 0 ? k_in : v_in;
          std::vector<uint8_t> want_bytes;
          std::vector<uint16_t> want_back;
          cpu_row(side == 0 ? type : v_type, in.data() + slot * kv, kv, side == 0 ? k_rot : v_rot, want_bytes,
                  want_back);
          const int64_t rb = side == 0 ? k_rb : v_rb;
          const auto& cache_out = side == 0 ? k_cache_out : v_cache_out;
          const auto& work_out = side == 0 ? k_work_out : v_work_out;
          EXPECT_EQ(std::memcmp(cache_out.data() + slot * rb, want_bytes.data(), want_bytes.size()), 0)
              << "side " << side << " slot " << slot;
          for (int64_t j = 0; j < kv; ++j) {
            ASSERT_EQ(work_out[static_cast<size_t>(slot * kv + j)], want_back[static_cast<size_t>(j)])
                << "side " << side << " slot " << slot << " value " << j;
          }
        }
      }
      // Every other slot as it was; an F16 V untouched.
      for (int64_t slot = 0; slot < g.slots(); ++slot) {
        if (written.count(slot) != 0) continue;
        for (int64_t j = 0; j < kv; ++j) {
          ASSERT_EQ(k_work_out[static_cast<size_t>(slot * kv + j)], k_in[static_cast<size_t>(slot * kv + j)]);
        }
        for (int64_t j = 0; j < k_rb; ++j) {
          ASSERT_EQ(k_cache_out[static_cast<size_t>(slot * k_rb + j)], 0xA5);
        }
      }
      if (v_type == k::DType::F16) {
        EXPECT_EQ(v_work_out, v_in);
      }
    }
  }
}

TEST(CudaKvCacheQuant, DequantizeWritesExactlyTheReferencedBlocks) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  Geometry g;
  g.block_size = 3;
  g.n_head_kv = 5;
  g.head_dim = 32;
  std::mt19937 rng(12);
  const int64_t kv = g.kv_dim();
  // Row 0 attends over blocks 0 .. 2 of its table, row 1 over block 0 only, row 2 over none; block 5 is
  // shared by rows 0 and 1 (prefix caching); block 99 sits past row 0's last block and is never read.
  const std::vector<int32_t> tables = {5, 2, 7, 99, /* row 1 */ 5, 3, 4, 1, /* row 2 */ 0, 6, 8, 1};
  const std::vector<int32_t> last_block = {2, 0, -1};
  const std::set<int64_t> referenced = {5, 2, 7};
  for (size_t i = 0; i < std::size(kTypes); ++i) {
    // Each type with the next one on V, and Q8_0 with an F16 V.
    const k::DType type = kTypes[i];
    const k::DType v_type = i == 0 ? k::DType::F16 : kTypes[(i + 1) % std::size(kTypes)];
    SCOPED_TRACE(std::string("k ") + k::type_name(type) + ", v " + k::type_name(v_type));
    const auto s = shape_of(g, type, v_type);
    std::vector<std::vector<uint8_t>> bytes(2);
    std::vector<std::vector<uint16_t>> want(2);
    for (int side = 0; side < 2; ++side) {
      const k::DType st = side == 0 ? type : v_type;
      if (st == k::DType::F16) continue;
      const int64_t rb = k::row_bytes(st, kv);
      bytes[static_cast<size_t>(side)].resize(static_cast<size_t>(g.slots() * rb));
      want[static_cast<size_t>(side)].assign(static_cast<size_t>(g.slots() * kv), kSentinel);
      for (int64_t slot = 0; slot < g.slots(); ++slot) {
        std::vector<uint8_t> row_bytes;
        std::vector<uint16_t> back;
        const std::vector<uint16_t> row = random_f16(static_cast<size_t>(kv), rng);
        cpu_row(st, row.data(), kv, 0, row_bytes, back);
        std::memcpy(bytes[static_cast<size_t>(side)].data() + slot * rb, row_bytes.data(), row_bytes.size());
        if (referenced.count(slot / g.block_size) != 0)
          std::copy(back.begin(), back.end(), want[static_cast<size_t>(side)].begin() + slot * kv);
      }
    }
    const std::vector<uint16_t> sentinel(static_cast<size_t>(g.slots() * kv), kSentinel);
    DeviceBuffer<uint16_t> k_work(sentinel), v_work(sentinel);
    DeviceBuffer<uint8_t> k_cache(bytes[0]), v_cache(bytes[1].empty() ? std::vector<uint8_t>{0} : bytes[1]);
    DeviceBuffer<int32_t> tables_d(tables), last_d(last_block), flag(std::vector<int32_t>{0});
    ASSERT_EQ(
        kc::kv_cache_dequantize_blocks(
            s, 3, tables_d.ptr, last_d.ptr, k_cache.ptr, v_type == k::DType::F16 ? nullptr : v_cache.ptr,
            as_half(k_work.ptr), v_type == k::DType::F16 ? nullptr : as_half(v_work.ptr), flag.ptr, nullptr),
        k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(flag.to_host()[0], 0);
    EXPECT_EQ(k_work.to_host(), want[0]);
    if (v_type != k::DType::F16) {
      EXPECT_EQ(v_work.to_host(), want[1]);
    } else {
      EXPECT_EQ(v_work.to_host(), sentinel);
    }
  }
  // A referenced block id outside the cache: flagged, nothing written for it.
  const auto s = shape_of(g, k::DType::Q8_0, k::DType::Q8_0);
  const std::vector<uint8_t> zeros(static_cast<size_t>(g.slots() * k::row_bytes(k::DType::Q8_0, kv)), 0);
  DeviceBuffer<uint8_t> k_cache(zeros), v_cache(zeros);
  const std::vector<uint16_t> sentinel(static_cast<size_t>(g.slots() * kv), kSentinel);
  DeviceBuffer<uint16_t> k_work(sentinel), v_work(sentinel);
  DeviceBuffer<int32_t> tables_d(std::vector<int32_t>{99, 0, 0, 0}), last_d(std::vector<int32_t>{0}),
      flag(std::vector<int32_t>{0});
  ASSERT_EQ(kc::kv_cache_dequantize_blocks(s, 1, tables_d.ptr, last_d.ptr, k_cache.ptr, v_cache.ptr,
                                           as_half(k_work.ptr), as_half(v_work.ptr), flag.ptr, nullptr),
            k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(flag.to_host()[0], 1);
  EXPECT_EQ(k_work.to_host(), sentinel);
}

TEST(CudaKvCacheQuant, HadamardRotateF16IsTheCpuRotationRoundedOnce) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(13);
  // Widths past one block's 2048-value chunk, blocks from 2 to 1024.
  for (const auto& [rows, width, block] : {std::tuple{int64_t{3}, int64_t{192}, int64_t{64}},
                                           std::tuple{int64_t{5}, int64_t{4608}, int64_t{128}},
                                           std::tuple{int64_t{2}, int64_t{3072}, int64_t{1024}},
                                           std::tuple{int64_t{7}, int64_t{6}, int64_t{2}}}) {
    SCOPED_TRACE("rows " + std::to_string(rows) + " width " + std::to_string(width) + " block " +
                 std::to_string(block));
    const std::vector<uint16_t> in = random_f16(static_cast<size_t>(rows * width), rng);
    std::vector<float> x(in.size());
    for (size_t i = 0; i < in.size(); ++i) x[i] = k::fp16_to_fp32(in[i]);
    ASSERT_EQ(k::hadamard_rotate(x.data(), rows * width / block, block), k::Status::ok);
    std::vector<uint16_t> want(in.size());
    for (size_t i = 0; i < in.size(); ++i) want[i] = k::fp32_to_fp16(x[i]);
    DeviceBuffer<uint16_t> d(in);
    ASSERT_EQ(kc::hadamard_rotate_f16(as_half(d.ptr), rows, width, block, nullptr), k::Status::ok);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(d.to_host(), want);
  }
}

TEST(CudaKvCacheQuant, RefusesBadArguments) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  const Geometry g;
  DeviceBuffer<uint16_t> work(static_cast<size_t>(g.slots() * g.kv_dim()));
  DeviceBuffer<uint8_t> cache(static_cast<size_t>(g.slots() * g.kv_dim() * 2));
  DeviceBuffer<int32_t> ints(std::vector<int32_t>(16, 0));
  auto s = shape_of(g, k::DType::Q4_K, k::DType::F16);  // not a cache type
  EXPECT_EQ(kc::kv_cache_store_positions(s, 1, 0, 0, ints.ptr, ints.ptr, ints.ptr, as_half(work.ptr), nullptr,
                                         cache.ptr, nullptr, nullptr, nullptr),
            k::Status::invalid_argument);
  s = shape_of(g, k::DType::Q8_0, k::DType::Q8_0);
  EXPECT_EQ(kc::kv_cache_store_positions(s, 1, 0, 0, ints.ptr, ints.ptr, ints.ptr, as_half(work.ptr), nullptr,
                                         cache.ptr, nullptr, nullptr, nullptr),
            k::Status::invalid_argument)
      << "V quantized without its buffers";
  EXPECT_EQ(kc::kv_cache_store_positions(s, 1, 48, 0, ints.ptr, ints.ptr, ints.ptr, as_half(work.ptr),
                                         as_half(work.ptr), cache.ptr, cache.ptr, nullptr, nullptr),
            k::Status::invalid_argument)
      << "a rotation block that is not a power of two";
  s.head_dim = 33;
  EXPECT_EQ(kc::kv_cache_dequantize_blocks(s, 1, ints.ptr, ints.ptr, cache.ptr, cache.ptr, as_half(work.ptr),
                                           as_half(work.ptr), nullptr, nullptr),
            k::Status::invalid_argument)
      << "kv_dim not a multiple of 32";
  EXPECT_EQ(kc::hadamard_rotate_f16(as_half(work.ptr), 1, 96, 64, nullptr), k::Status::invalid_argument);
  s = shape_of(g, k::DType::Q5_1, k::DType::Q8_0);
  EXPECT_EQ(kc::kv_cache_dequantize_blocks(s, 1, ints.ptr, ints.ptr, cache.ptr + 2, cache.ptr,
                                           as_half(work.ptr), as_half(work.ptr), nullptr, nullptr),
            k::Status::invalid_argument)
      << "a cache that the readers' 8-byte loads cannot read";
  EXPECT_EQ(kc::kv_cache_store_positions(s, 1, 0, 0, ints.ptr, ints.ptr, ints.ptr, as_half(work.ptr),
                                         as_half(work.ptr) + 4, cache.ptr, cache.ptr, nullptr, nullptr),
            k::Status::invalid_argument)
      << "a working copy that 16-byte stores cannot write";
  s.n_head_kv = 3;
  s.head_dim = int64_t{6148914691236517216};  // 3 x this wraps to 32
  EXPECT_EQ(kc::kv_cache_dequantize_blocks(s, 1, ints.ptr, ints.ptr, cache.ptr, cache.ptr, as_half(work.ptr),
                                           as_half(work.ptr), nullptr, nullptr),
            k::Status::invalid_argument);
  // An F16 side's rotation block is ignored (nothing to store: no tokens).
  s = shape_of(g, k::DType::F16, k::DType::Q8_0);
  EXPECT_EQ(kc::kv_cache_store_positions(s, 0, 48, 0, ints.ptr, ints.ptr, ints.ptr, nullptr,
                                         as_half(work.ptr), nullptr, cache.ptr, nullptr, nullptr),
            k::Status::ok);
}

}  // namespace
