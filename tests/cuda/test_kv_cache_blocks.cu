// The quantized KV cache's block functions (kernels/cuda/kv_cache_blocks.cuh) compiled for the
// host: each type's quantize writes kernels::quantize_cache_row's bytes and its dequantize gives
// kernels::dequantize_row's values, bit for bit, on random rows (mixed magnitudes, ties, zeros). This
// runs without a GPU, so the arithmetic the store kernel runs on the device is checked on every machine;
// test_cuda_kv_cache_quant checks the kernels around it on a GPU.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kernels/cuda/kv_cache_blocks.cuh"
#include "kernels/cuda/kv_cache_quant.cuh"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"

namespace k = nibble::kernels;
namespace kv_quant = nibble::kernels::cuda::kv_quant;

namespace {

// Rows of 32-value blocks that cover the cases the rules branch on: normal values at several scales,
// all-zero blocks, a block of one repeated value, values on half-level ties (IQ4_NL's among them), and
// fp16-exact values (what the device quantizes: its working copy is fp16).
std::vector<float> test_rows(int64_t blocks, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(blocks * k::kQK4_0));
  for (int64_t b = 0; b < blocks; ++b) {
    float* xb = x.data() + b * k::kQK4_0;
    const float scale = 1e-3f * static_cast<float>(1 + b % 7) * static_cast<float>(1 << (b % 11));
    for (int j = 0; j < k::kQK4_0; ++j) {
      switch (b % 6) {
        case 0:
          xb[j] = 0.0f;
          break;
        case 1:
          xb[j] = scale;
          break;
        case 2:  // integers and halves: exact ties in every rule
          xb[j] = static_cast<float>(static_cast<int>(rng() % 33) - 16) * 0.5f;
          break;
        case 3:  // fp16-exact
          xb[j] = kv_quant::bits_half(kv_quant::half_bits(normal(rng) * scale));
          break;
        case 4: {  // IQ4_NL's scale 1 (the first value -127) and the rest halfway between its levels
          const int i = static_cast<int>(rng() % 15);
          xb[j] = j == 0 ? -127.0f : 0.5f * static_cast<float>(k::kIQ4Values[i] + k::kIQ4Values[i + 1]);
          break;
        }
        default:
          xb[j] = normal(rng) * scale + (b % 12 == 5 ? 0.3f * scale : 0.0f);
      }
    }
  }
  return x;
}

template <typename Block>
void expect_cpu_blocks(k::DType type) {
  std::mt19937 rng(1234 + static_cast<unsigned>(type));
  constexpr int64_t kBlocks = 601;
  const std::vector<float> x = test_rows(kBlocks, rng);
  std::vector<Block> want(kBlocks), got(kBlocks);
  ASSERT_EQ(k::quantize_cache_row(type, x.data(), want.data(), kBlocks * k::kQK4_0), k::Status::ok);
  for (int64_t b = 0; b < kBlocks; ++b)
    kv_quant::quantize(x.data() + b * k::kQK4_0, got[static_cast<size_t>(b)]);
  for (int64_t b = 0; b < kBlocks; ++b) {
    ASSERT_EQ(std::memcmp(&got[static_cast<size_t>(b)], &want[static_cast<size_t>(b)], sizeof(Block)), 0)
        << k::type_name(type) << " block " << b << " (first value " << x[static_cast<size_t>(b * k::kQK4_0)]
        << ")";
  }
  std::vector<float> values(x.size());
  ASSERT_EQ(k::dequantize_row(type, want.data(), values.data(), kBlocks * k::kQK4_0), k::Status::ok);
  for (int64_t b = 0; b < kBlocks; ++b) {
    float back[k::kQK4_0];
    kv_quant::dequantize(want[static_cast<size_t>(b)], back);
    for (int j = 0; j < k::kQK4_0; ++j) {
      ASSERT_EQ(back[j], values[static_cast<size_t>(b * k::kQK4_0 + j)])
          << k::type_name(type) << " block " << b << " value " << j;
    }
  }
}

TEST(KvCacheBlocks, Q8_0IsTheCpuCacheRowBitForBit) { expect_cpu_blocks<k::BlockQ8_0>(k::DType::Q8_0); }
TEST(KvCacheBlocks, Q4_0IsTheCpuCacheRowBitForBit) { expect_cpu_blocks<k::BlockQ4_0>(k::DType::Q4_0); }
TEST(KvCacheBlocks, Q4_1IsTheCpuCacheRowBitForBit) { expect_cpu_blocks<k::BlockQ4_1>(k::DType::Q4_1); }
TEST(KvCacheBlocks, Q5_0IsTheCpuCacheRowBitForBit) { expect_cpu_blocks<k::BlockQ5_0>(k::DType::Q5_0); }
TEST(KvCacheBlocks, Q5_1IsTheCpuCacheRowBitForBit) { expect_cpu_blocks<k::BlockQ5_1>(k::DType::Q5_1); }
TEST(KvCacheBlocks, IQ4NLIsTheCpuCacheRowBitForBit) { expect_cpu_blocks<k::BlockIQ4_NL>(k::DType::IQ4_NL); }

// What the decode attention reads straight from a quantized cache (attention_decode_quantized): each
// block of a row as the aligned 32-bit words that cover it (blocks are 2-byte aligned: every second one
// starts mid-word), shifted into place (block_words) and dequantized (dequantize_words), gives
// dequantize_row's values bit for bit; the words never reach past the row's end rounded up to 4 bytes
// (what the cache's 256-byte padding after each side covers).
TEST(KvCacheBlocks, BlocksReadAsWordsAreTheCpuValues) {
  for (const k::DType type :
       {k::DType::Q8_0, k::DType::Q5_1, k::DType::Q5_0, k::DType::Q4_1, k::DType::Q4_0, k::DType::IQ4_NL}) {
    SCOPED_TRACE(k::type_name(type));
    std::mt19937 rng(77 + static_cast<unsigned>(type));
    constexpr int64_t kBlocks = 301;  // odd: the row ends mid-word for every type
    const std::vector<float> x = test_rows(kBlocks, rng);
    const int bytes = kv_quant::block_bytes(type);
    ASSERT_EQ(static_cast<size_t>(bytes) * kBlocks, k::row_bytes(type, kBlocks * k::kQK4_0));
    const size_t row_end = static_cast<size_t>(bytes) * kBlocks;
    std::vector<uint8_t> row((row_end + 3) / 4 * 4, 0);
    ASSERT_EQ(k::quantize_cache_row(type, x.data(), row.data(), kBlocks * k::kQK4_0), k::Status::ok);
    std::vector<float> values(x.size());
    ASSERT_EQ(k::dequantize_row(type, row.data(), values.data(), kBlocks * k::kQK4_0), k::Status::ok);
    int mid_word = 0;
    for (int64_t b = 0; b < kBlocks; ++b) {
      const size_t start = static_cast<size_t>(b) * static_cast<size_t>(bytes);
      const int offset = static_cast<int>(start % 4);
      ASSERT_TRUE(offset == 0 || offset == 2);
      mid_word += offset != 0;
      const int n = kv_quant::covering_words(bytes, offset);
      ASSERT_LE(n, kv_quant::kBlockWords);
      ASSERT_LE(start - static_cast<size_t>(offset) + 4 * static_cast<size_t>(n), row.size())
          << "block " << b;
      uint32_t aligned[kv_quant::kBlockWords + 1] = {};
      std::memcpy(aligned, row.data() + start - static_cast<size_t>(offset), 4 * static_cast<size_t>(n));
      uint32_t words[kv_quant::kBlockWords];
      kv_quant::block_words(aligned, offset, words);
      float got[k::kQK4_0];
      kv_quant::dequantize_words(type, words, got);
      // Bits, not ==: a -0 for a +0 would change the fp16 the attention reads.
      ASSERT_EQ(std::memcmp(got, values.data() + b * k::kQK4_0, sizeof got), 0) << "block " << b;
    }
    if (bytes % 4 != 0) EXPECT_GT(mid_word, 0) << "some blocks start mid-word";
  }
}

// What the kernels admit.
TEST(KvCacheBlocks, TheDeviceTakesTheCpuCacheTypes) {
  for (const k::DType type :
       {k::DType::Q8_0, k::DType::Q5_1, k::DType::Q5_0, k::DType::Q4_1, k::DType::Q4_0, k::DType::IQ4_NL})
    EXPECT_TRUE(nibble::kernels::cuda::kv_cache_quant_type(type)) << k::type_name(type);
  for (const k::DType type : {k::DType::F16, k::DType::F32, k::DType::Q4_K, k::DType::Q8_1})
    EXPECT_FALSE(nibble::kernels::cuda::kv_cache_quant_type(type)) << k::type_name(type);
}

}  // namespace
