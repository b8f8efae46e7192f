// The W4A16 kernels' weight readers (kernels/cuda/w4a16_weights.cuh) compiled for the host: each
// reader's 32 weights of every unit of every row equal the CPU's dequantization bit for bit (Q4_0,
// the split Q4_0 layout, group-wise INT4, Q4_K, Q8_0, Q6_K in planes, and the other GGUF types as
// stored, the read-only i-quants, ternary types and MXFP4 included), on random blocks of odd sizes. This runs
// without a GPU, so the indexing and arithmetic that the GEMV and GEMM share are checked on every machine;
// test_cuda_w4a16_gemv / _gemm check the kernels around them on a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/w4a16_weights.cuh"
#include "kernels/int4_groups.hpp"
#include "kernels/int4_tiles.hpp"
#include "kernels/q4_0_split.hpp"
#include "kernels/q6_k_planes.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"
#include "kernels/read_only_quants.hpp"
#include "tests/support/test_support.hpp"

namespace k = nibble::kernels;
namespace w4a16 = nibble::kernels::cuda::w4a16;

namespace {

// Bytes in 16-byte aligned storage, as device allocations are.
struct Aligned {
  std::vector<uint4> storage;
  explicit Aligned(const void* data, size_t bytes) : storage((bytes + 15) / 16) {
    std::memcpy(storage.data(), data, bytes);
  }
  const uint8_t* bytes() const { return reinterpret_cast<const uint8_t*>(storage.data()); }
};

// Every unit of every row read by `reader` against want: [n_out, k].
template <typename Reader>
void expect_reads(const Reader& reader, int64_t n_out, int64_t kk, const std::vector<float>& want) {
  const int64_t nb = kk / k::kQK4_0;
  for (int64_t r = 0; r < n_out; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      float wv[k::kQK4_0];
      reader.load(r, nb, b, wv);
      for (int j = 0; j < k::kQK4_0; ++j) {
        ASSERT_EQ(wv[j], want[static_cast<size_t>(r * kk + b * k::kQK4_0 + j)])
            << "row " << r << " unit " << b << " weight " << j;
      }
    }
  }
}

std::vector<uint8_t> random_rows(k::DType type, int64_t n_out, int64_t kk, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t rb = k::row_bytes(type, kk);
  std::vector<uint8_t> blocks(static_cast<size_t>(n_out * rb));
  std::vector<float> row(static_cast<size_t>(kk));
  for (int64_t o = 0; o < n_out; ++o) {
    // Rows of different magnitudes and offsets, so K-quant mins and scales vary.
    const float scale = 0.01f + 0.2f * static_cast<float>(o % 5);
    const float offset = static_cast<float>(o % 3) * 0.1f;
    for (float& v : row) v = normal(rng) * scale + offset;
    EXPECT_EQ(k::quantize_row(type, row.data(), blocks.data() + o * rb, kk), k::Status::ok);
  }
  return blocks;
}

std::vector<float> dequantized(k::DType type, const void* blocks, int64_t n_out, int64_t kk) {
  std::vector<float> out(static_cast<size_t>(n_out * kk));
  EXPECT_EQ(k::dequantize_row(type, blocks, out.data(), n_out * kk), k::Status::ok);
  return out;
}

// sum over a unit (16 bytes in the split nibble order: byte j holds input j in its low nibble and
// input j + 16 in its high one) of x * (q - z) in double, and the sum of the products' magnitudes.
void levels_dot(const uint8_t (&bytes)[16], const float (&x)[32], int z, double& want, double& magnitude) {
  for (int j = 0; j < 16; ++j) {
    const double lo = static_cast<double>(x[j]) * ((bytes[j] & 0xF) - z);
    const double hi = static_cast<double>(x[j + 16]) * ((bytes[j] >> 4) - z);
    want += lo + hi;
    magnitude += std::fabs(lo) + std::fabs(hi);
  }
}

// The staged GEMV's unit arithmetic: sum over the unit of x * (q - z) in the split nibble order, against
// a double-precision sum of the same products (each product is exact in fp32, so only the 32 fp32
// additions round: at most 32 * 2^-24 of the sum of |products|), for every zero 0..15.
TEST(W4A16WeightReaders, UnitLevelDotMatchesTheLevelsDotProduct) {
  std::mt19937 rng(77);
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int trial = 0; trial < 200; ++trial) {
    uint8_t bytes[16];
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(byte(rng));
    uint4 q;
    std::memcpy(&q, bytes, sizeof q);
    alignas(16) float x[32];
    for (float& v : x) v = k::fp16_to_fp32(k::fp32_to_fp16(normal(rng)));  // fp16 activations
    const int z = trial % 16;
    double want = 0.0, magnitude = 0.0;
    levels_dot(bytes, x, z, want, magnitude);
    const float got = w4a16::int4_unit_level_dot(q, -(w4a16::kTwo23 + static_cast<float>(z)), x);
    EXPECT_LE(std::fabs(static_cast<double>(got) - want), 32.0 * 0x1.0p-24 * magnitude + 1e-30)
        << "trial " << trial << " zero " << z;
  }
}

// The half2 GEMV's unit arithmetic (int4_unit_half2_dot) with the activations staged in the order
// int4_half2_staged_input gives: with integer activations in [-4, 4] every fp16 sum is an exact integer
// (at most 16 * 4 * 31 = 1984 < 2048), so the result must equal the levels' dot product exactly, for
// every zero 0..31 (asymmetric GPTQ zeros go up to 31); with fp16 activations it must be within 16 fp16
// roundings of the unit's sum|x * (q - z)|.
TEST(W4A16WeightReaders, UnitHalf2DotMatchesTheLevelsDotProduct) {
  std::mt19937 rng(78);
  std::uniform_int_distribution<int> byte(0, 255), small(-4, 4);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int trial = 0; trial < 256; ++trial) {
    const bool integers = trial % 2 == 0;
    uint8_t bytes[16];
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(byte(rng));
    uint4 q;
    std::memcpy(&q, bytes, sizeof q);
    float x[32];
    for (float& v : x)
      v = k::fp16_to_fp32(k::fp32_to_fp16(integers ? static_cast<float>(small(rng)) : normal(rng)));
    uint4 staged[4];
    uint16_t xh[32];
    for (int j = 0; j < 32; ++j) xh[j] = k::fp32_to_fp16(x[j]);
    for (int i = 0; i < 4; ++i) {
      uint16_t halves[8];
      for (int h = 0; h < 8; ++h) halves[h] = xh[w4a16::int4_half2_staged_input(i, h)];
      std::memcpy(&staged[i], halves, sizeof halves);
      // The kernel's staging (byte permutes of the activations as they lie) gives the same word.
      uint2 lo, hi;
      std::memcpy(&lo, xh + 4 * i, sizeof lo);
      std::memcpy(&hi, xh + 16 + 4 * i, sizeof hi);
      const uint4 word = w4a16::int4_half2_staged_word(lo, hi);
      ASSERT_EQ(std::memcmp(&word, &staged[i], sizeof word), 0) << "word " << i;
    }
    const int z = (trial / 2) % 32;
    double want = 0.0, magnitude = 0.0;
    levels_dot(bytes, x, z, want, magnitude);
    const float got =
        w4a16::int4_unit_half2_dot(q, w4a16::int4_half2_biased_zero(static_cast<uint32_t>(z)), staged);
    if (integers) {
      EXPECT_EQ(static_cast<double>(got), want) << "trial " << trial << " zero " << z;
    } else {
      EXPECT_LE(std::fabs(static_cast<double>(got) - want), 16.0 * 0x1.0p-11 * magnitude + 1e-30)
          << "trial " << trial << " zero " << z;
    }
  }
  // Each staged half is one input, each input staged once.
  bool seen[32] = {};
  for (int i = 0; i < 4; ++i) {
    for (int h = 0; h < 8; ++h) {
      const int input = w4a16::int4_half2_staged_input(i, h);
      ASSERT_TRUE(input >= 0 && input < 32 && !seen[input]) << i << " " << h;
      seen[input] = true;
    }
  }
}

// The half2 GEMV's Q4_K pieces: q4_k_pair_scale_min gives q4_k_scale_min's bits for both sub-blocks of
// every chunk, and q4_k_piece_half2_dot sums each nibble less its sub-block's centre against its own
// activation (exactly, with integer activations: at most 8 * 4 * 15 = 480 a running sum) into the right
// sub-block's half2.
TEST(W4A16WeightReaders, Q4KPieceHalf2DotMatchesTheSubBlocksLevels) {
  std::mt19937 rng(79);
  std::uniform_int_distribution<int> byte(0, 255), small(-4, 4);
  std::uniform_int_distribution<uint32_t> word;
  for (int trial = 0; trial < 200; ++trial) {
    uint4 head{word(rng), word(rng), word(rng), word(rng)};
    head.x = (head.x & 0x3FFF3FFFu) | 0x04000400u;  // finite d and dmin
    for (unsigned c = 0; c < 4; ++c) {
      float ds[2], dm[2];
      w4a16::q4_k_pair_scale_min(head, c, ds, dm);
      for (int s = 0; s < 2; ++s) {
        float want_ds, want_dm;
        w4a16::q4_k_scale_min(head, static_cast<int>(2 * c) + s, want_ds, want_dm);
        EXPECT_EQ(ds[s], want_ds) << "chunk " << c << " sub-block " << s;
        EXPECT_EQ(dm[s], want_dm) << "chunk " << c << " sub-block " << s;
      }
    }
    uint8_t bytes[16];
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(byte(rng));
    uint4 piece;
    std::memcpy(&piece, bytes, sizeof piece);
    uint16_t lo_x[16], hi_x[16];  // the low nibbles' activations, the high nibbles'
    const int z_lo = trial % 16, z_hi = (trial * 7 + 3) % 16;  // the sub-blocks' centres
    double want_lo = 0.0, want_hi = 0.0;
    for (int j = 0; j < 16; ++j) {
      const int a = small(rng), b = small(rng);
      lo_x[j] = k::fp32_to_fp16(static_cast<float>(a));
      hi_x[j] = k::fp32_to_fp16(static_cast<float>(b));
      want_lo += a * ((bytes[j] & 0xF) - z_lo);
      want_hi += b * ((bytes[j] >> 4) - z_hi);
    }
    uint4 staged[4];
    for (int i = 0; i < 4; ++i) {
      uint2 lo, hi;
      std::memcpy(&lo, lo_x + 4 * i, sizeof lo);
      std::memcpy(&hi, hi_x + 4 * i, sizeof hi);
      staged[i] = w4a16::int4_half2_staged_word(lo, hi);
    }
    __half2 acc_lo = w4a16::bits_half2(0u), acc_hi = w4a16::bits_half2(0u);
    w4a16::q4_k_piece_half2_dot(piece, staged, w4a16::int4_half2_biased_zero(static_cast<uint32_t>(z_lo)),
                                w4a16::int4_half2_biased_zero(static_cast<uint32_t>(z_hi)), acc_lo, acc_hi);
    EXPECT_EQ(static_cast<double>(__low2float(acc_lo)) + __high2float(acc_lo), want_lo) << "trial " << trial;
    EXPECT_EQ(static_cast<double>(__low2float(acc_hi)) + __high2float(acc_hi), want_hi) << "trial " << trial;
  }
}

}  // namespace

// The half2 GEMV's Q4_K arithmetic on whole rows (q4_k_chunk_half2_dot over every chunk, the activations
// staged and scaled as the kernel stages them): one large activation (2000, 60000: Llama's outlier
// channels) on an input whose weight is near 0 (the row's value there was 0 before quantizing) must not
// swamp the row's other products. Uncentred fp16 sums (z = 0) left rows 0.05-0.23 of sum|x w| off in
// emulation; the bound is the GPU test's 3e-2, and the worst row is expected far below it.
TEST(W4A16WeightReaders, Q4KHalf2ChunksStayAccurateWithALargeActivationOnAWeightNearZero) {
  std::mt19937 rng(80);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  constexpr int64_t kk = 512;
  double worst = 0.0;
  for (int trial = 0; trial < 400; ++trial) {
    const auto outlier = static_cast<size_t>((trial * 37) % kk);
    std::vector<float> row(kk);
    const float scale = 0.01f + 0.2f * static_cast<float>(trial % 5),
                offset = static_cast<float>(trial % 3) * 0.1f;
    for (float& v : row) v = normal(rng) * scale + offset;
    row[outlier] = 0.0f;
    std::vector<uint8_t> blocks(static_cast<size_t>(k::row_bytes(k::DType::Q4_K, kk)));
    ASSERT_EQ(k::quantize_row(k::DType::Q4_K, row.data(), blocks.data(), kk), k::Status::ok);
    std::vector<float> w(kk);
    ASSERT_EQ(k::dequantize_row(k::DType::Q4_K, blocks.data(), w.data(), kk), k::Status::ok);
    std::vector<float> x(kk);
    for (float& v : x) v = k::fp16_to_fp32(k::fp32_to_fp16(normal(rng)));
    x[outlier] = trial % 2 == 0 ? 2000.0f : 60000.0f;
    // Staged as stage_activations stages them: every value times 2^-shift so that |x| <= 64 (exact).
    int shift = 0;
    frexpf(x[outlier] / 64.0f, &shift);
    const float down = std::ldexp(1.0f, -shift);
    std::vector<uint16_t> xs(kk);
    for (int64_t i = 0; i < kk; ++i)
      xs[static_cast<size_t>(i)] = k::fp32_to_fp16(x[static_cast<size_t>(i)] * down);
    float acc = 0.0f;
    for (int64_t chunk = 0; chunk < kk / 64; ++chunk) {
      const uint8_t* block = blocks.data() + (chunk / 4) * static_cast<int64_t>(sizeof(k::BlockQ4_K));
      const auto c = static_cast<unsigned>(chunk % 4);
      uint4 head, pieces[2], staged[2][4];
      std::memcpy(&head, block, sizeof head);
      for (int h = 0; h < 2; ++h) {
        std::memcpy(&pieces[h], block + 16 + 32 * c + 16 * h, sizeof(uint4));
        for (int i = 0; i < 4; ++i) {
          uint2 lo, hi;
          std::memcpy(&lo, &xs[static_cast<size_t>(64 * chunk + 16 * h + 4 * i)], sizeof lo);
          std::memcpy(&hi, &xs[static_cast<size_t>(64 * chunk + 32 + 16 * h + 4 * i)], sizeof hi);
          staged[h][i] = w4a16::int4_half2_staged_word(lo, hi);
        }
      }
      float sums[2] = {};  // the sub-blocks' activation sums (the kernel adds them in pairs, then scales)
      for (int s = 0; s < 2; ++s) {
        for (int i = 0; i < 32; ++i) sums[s] += x[static_cast<size_t>(64 * chunk + 32 * s + i)];
        sums[s] *= down;
      }
      acc = w4a16::q4_k_chunk_half2_dot(head, c, pieces, staged, float2{sums[0], sums[1]}, acc);
    }
    double want = 0.0, magnitude = 0.0;
    for (int64_t i = 0; i < kk; ++i) {
      want += static_cast<double>(x[static_cast<size_t>(i)]) * w[static_cast<size_t>(i)];
      magnitude += std::fabs(static_cast<double>(x[static_cast<size_t>(i)]) * w[static_cast<size_t>(i)]);
    }
    const double error = std::fabs(std::ldexp(static_cast<double>(acc), shift) - want) / magnitude;
    worst = std::max(worst, error);
    EXPECT_LE(error, 3e-2) << "trial " << trial << ": got " << std::ldexp(acc, shift) << ", want " << want;
  }
  EXPECT_LE(worst, 3e-3) << "the worst row, far under the bound";
}

TEST(W4A16WeightReaders, Q4_0BothLayoutsReadTheCpuWeights) {
  std::mt19937 rng(1);
  for (const int64_t n_out : {int64_t{1}, int64_t{7}}) {
    for (const int64_t kk : {int64_t{32}, int64_t{160}, int64_t{4128}}) {
      SCOPED_TRACE("n_out=" + std::to_string(n_out) + " k=" + std::to_string(kk));
      const std::vector<uint8_t> blocks = random_rows(k::DType::Q4_0, n_out, kk, rng);
      const std::vector<float> want = dequantized(k::DType::Q4_0, blocks.data(), n_out, kk);
      const Aligned gguf(blocks.data(), blocks.size());
      expect_reads(w4a16::GgufQ4_0Blocks{gguf.bytes()}, n_out, kk, want);
      std::vector<uint8_t> quants(static_cast<size_t>(n_out * kk / 2));
      std::vector<uint16_t> scales(static_cast<size_t>(n_out * kk / 32));
      ASSERT_EQ(k::split_q4_0(blocks.data(), n_out, kk, quants.data(), scales.data()), k::Status::ok);
      const Aligned q(quants.data(), quants.size()), s(scales.data(), scales.size() * 2);
      expect_reads(w4a16::SplitQ4_0Blocks{q.bytes(), reinterpret_cast<const __half*>(s.bytes())}, n_out, kk,
                   want);
    }
  }
}

TEST(W4A16WeightReaders, Q4KReadsTheCpuWeights) {
  std::mt19937 rng(2);
  for (const int64_t n_out : {int64_t{1}, int64_t{5}}) {
    for (const int64_t kk : {int64_t{256}, int64_t{768}, int64_t{4352}}) {
      SCOPED_TRACE("n_out=" + std::to_string(n_out) + " k=" + std::to_string(kk));
      const std::vector<uint8_t> blocks = random_rows(k::DType::Q4_K, n_out, kk, rng);
      const std::vector<float> want = dequantized(k::DType::Q4_K, blocks.data(), n_out, kk);
      const Aligned w(blocks.data(), blocks.size());
      expect_reads(w4a16::Q4KBlocks{w.bytes()}, n_out, kk, want);
    }
  }
}

// Q8_0 as stored (2-byte aligned rows of 34-byte blocks), bit for bit the CPU's dequantize_row.
TEST(W4A16WeightReaders, Q8_0ReadsTheCpuWeights) {
  std::mt19937 rng(8);
  for (const int64_t n_out : {int64_t{1}, int64_t{5}}) {
    for (const int64_t kk : {int64_t{32}, int64_t{96}, int64_t{4128}}) {
      SCOPED_TRACE("n_out=" + std::to_string(n_out) + " k=" + std::to_string(kk));
      const std::vector<uint8_t> blocks = random_rows(k::DType::Q8_0, n_out, kk, rng);
      const std::vector<float> want = dequantized(k::DType::Q8_0, blocks.data(), n_out, kk);
      const Aligned w(blocks.data(), blocks.size());
      expect_reads(w4a16::Q8_0Blocks{w.bytes()}, n_out, kk, want);
    }
  }
}

// The other GGUF types as stored (Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q5_K, IQ4_XS, and the types Nibble
// reads but does not write: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, TQ1_0, TQ2_0, MXFP4, as
// random valid blocks: every grid index, sign and scale): every unit of every row through with_gguf_blocks,
// bit for bit the CPU's dequantize_row, on odd block counts (2-byte aligned rows for the 22-, 18-, 110-,
// 66-, 74-, 82-, 98-, 50- and 54-byte blocks, byte-aligned for MXFP4's 17: the reader's loads are only as
// wide as the block allows); misaligned and short rows and types without a reader refused by name.
TEST(W4A16WeightReaders, OtherGgufTypesReadTheCpuWeightsAsStored) {
  std::mt19937 rng(10);
  for (const k::DType type :
       {k::DType::Q4_1, k::DType::Q5_0, k::DType::Q5_1, k::DType::IQ4_NL, k::DType::Q2_K, k::DType::Q3_K,
        k::DType::Q5_K, k::DType::IQ4_XS, k::DType::IQ2_XXS, k::DType::IQ2_XS, k::DType::IQ2_S,
        k::DType::IQ3_XXS, k::DType::IQ3_S, k::DType::IQ1_S, k::DType::IQ1_M, k::DType::TQ1_0,
        k::DType::TQ2_0, k::DType::MXFP4}) {
    const int64_t block = k::type_info(type).block_elems;
    EXPECT_TRUE(w4a16::w4a16_reads_as_stored(type)) << k::type_name(type);
    for (const int64_t n_out : {int64_t{1}, int64_t{5}}) {
      for (const int64_t blocks : {int64_t{1}, int64_t{3}, int64_t{17}}) {
        const int64_t kk = blocks * block;
        SCOPED_TRACE(std::string(k::type_name(type)) + " n_out=" + std::to_string(n_out) +
                     " k=" + std::to_string(kk));
        const std::vector<uint8_t> q = k::is_read_only_type(type)
                                           ? nibble::test::random_quant_blocks(type, n_out, kk, rng())
                                           : random_rows(type, n_out, kk, rng);
        const std::vector<float> want = dequantized(type, q.data(), n_out, kk);
        const Aligned w(q.data(), q.size());
        const k::Status st = w4a16::with_gguf_blocks(type, w.bytes(), kk, [&](const auto& reader) {
          expect_reads(reader, n_out, kk, want);
          return k::Status::ok;
        });
        ASSERT_EQ(st, k::Status::ok);
      }
    }
    const Aligned w(std::vector<uint8_t>(512).data(), 512);
    const auto nothing = [](const auto&) { return k::Status::ok; };
    EXPECT_EQ(w4a16::with_gguf_blocks(type, w.bytes(), block + 16, nothing), k::Status::invalid_argument);
    EXPECT_EQ(w4a16::with_gguf_blocks(type, w.bytes() + 1, block, nothing),
              k::type_info(type).block_bytes % 2 == 0 ? k::Status::invalid_argument : k::Status::ok);
    EXPECT_EQ(w4a16::with_gguf_blocks(type, nullptr, block, nothing), k::Status::invalid_argument);
    if (k::type_info(type).block_bytes % 4 == 0)  // wider loads: 2-byte alignment is not enough
      EXPECT_EQ(w4a16::with_gguf_blocks(type, w.bytes() + 2, block, nothing), k::Status::invalid_argument);
    else
      EXPECT_EQ(w4a16::with_gguf_blocks(type, w.bytes() + 2, block, nothing), k::Status::ok);
  }
  for (const k::DType type :
       {k::DType::Q4_0, k::DType::Q4_K, k::DType::Q6_K, k::DType::Q8_0, k::DType::F16}) {
    EXPECT_FALSE(w4a16::w4a16_reads_as_stored(type)) << k::type_name(type);
    const Aligned w(std::vector<uint8_t>(512).data(), 512);
    EXPECT_EQ(w4a16::with_gguf_blocks(type, w.bytes(), 256, [](const auto&) { return k::Status::ok; }),
              k::Status::unsupported_type);
  }
}

// Every index of the IQ4 table, through the byte words the device permutes.
TEST(W4A16WeightReaders, IQ4ValuesComeFromThePackedTable) {
  for (uint32_t i = 0; i < 16; ++i) EXPECT_EQ(w4a16::iq4_value(i), static_cast<float>(k::kIQ4Values[i])) << i;
}

// MXFP4's values likewise, and the 8 sign bits the IQ2 / IQ3 readers make of 7 (ggml's ksigns_iq2xs).
TEST(W4A16WeightReaders, MXFP4ValuesAndSevenBitSignsAsTheCpuTakesThem) {
  for (uint32_t i = 0; i < 16; ++i)
    EXPECT_EQ(w4a16::mxfp4_value(i), static_cast<float>(k::kMXFP4Values[i])) << i;
  for (uint32_t bits = 0; bits < 256; ++bits)  // the eighth stored bit (another field's) is ignored
    EXPECT_EQ(w4a16::seven_bit_signs(bits), k::iq2_sign_byte(bits & 0x7F)) << bits;
}

// Q6_K in planes (kernels/q6_k_planes.hpp): every run of every half and quarter, bit for bit the CPU's
// dequantize_row of the blocks as stored.
TEST(W4A16WeightReaders, Q6KPlanesReadTheCpuWeights) {
  std::mt19937 rng(9);
  for (const int64_t n_out : {int64_t{1}, int64_t{5}}) {
    for (const int64_t kk : {int64_t{256}, int64_t{768}, int64_t{4352}}) {
      SCOPED_TRACE("n_out=" + std::to_string(n_out) + " k=" + std::to_string(kk));
      const std::vector<uint8_t> blocks = random_rows(k::DType::Q6_K, n_out, kk, rng);
      const std::vector<float> want = dequantized(k::DType::Q6_K, blocks.data(), n_out, kk);
      std::vector<uint8_t> planes(static_cast<size_t>(k::q6_k_planes_layout(n_out, kk).bytes));
      ASSERT_EQ(k::q6_k_planes_from_blocks(blocks.data(), n_out, kk, planes.data()), k::Status::ok);
      const Aligned w(planes.data(), planes.size());
      w4a16::Q6KPlanes reader{};
      ASSERT_TRUE(w4a16::make_q6_k_planes(w.bytes(), n_out, kk, reader));
      expect_reads(reader, n_out, kk, want);
    }
  }
  w4a16::Q6KPlanes reader{};
  const Aligned w(std::vector<uint8_t>(64).data(), 64);
  EXPECT_FALSE(w4a16::make_q6_k_planes(w.bytes(), 1, 128, reader));      // k not a multiple of 256
  EXPECT_FALSE(w4a16::make_q6_k_planes(w.bytes() + 2, 1, 256, reader));  // misaligned
  EXPECT_FALSE(w4a16::make_q6_k_planes(nullptr, 1, 256, reader));
}

// The half2 GEMV's Q6_K pieces: q6_k_piece_half2_dot sums each quarter's 16 levels (less 32) against
// their own activations, staged as the kernel stages them (exactly, with integer activations: at most
// 8 * 4 * 32 = 1024 a running sum);
// every level 0..63 of every byte and bit pair appears.
TEST(W4A16WeightReaders, Q6KPieceHalf2DotSumsEachQuarter) {
  std::mt19937 rng(62);
  std::uniform_int_distribution<int> byte(0, 255), small(-4, 4);  // a running sum: at most 8 * 4 * 32
  for (int trial = 0; trial < 300; ++trial) {
    uint8_t ql_lo[16], ql_hi[16], qh[16];
    for (int i = 0; i < 16; ++i) {
      ql_lo[i] = static_cast<uint8_t>(byte(rng));
      ql_hi[i] = static_cast<uint8_t>(byte(rng));
      qh[i] = static_cast<uint8_t>(byte(rng));
    }
    if (trial < 4) {  // the extremes: every level 0 or 63 in one trial each
      const uint8_t fill = trial % 2 == 0 ? 0x00 : 0xFF;
      std::memset(ql_lo, fill, 16);
      std::memset(ql_hi, fill, 16);
      std::memset(qh, fill, 16);
    }
    uint16_t xq[4][16];  // quarter q's activations, input i
    double want[4] = {};
    for (int q = 0; q < 4; ++q) {
      for (int i = 0; i < 16; ++i) {
        const int a = trial < 4 ? (trial < 2 ? 1 : -1) : small(rng);
        xq[q][i] = k::fp32_to_fp16(static_cast<float>(a));
        const uint8_t low_byte = q % 2 == 0 ? ql_lo[i] : ql_hi[i];
        const int level = ((q < 2 ? low_byte & 0xF : low_byte >> 4) | (((qh[i] >> (2 * q)) & 3) << 4)) - 32;
        want[q] += a * level;
      }
    }
    uint4 staged[8];
    for (int plane = 0; plane < 2; ++plane) {  // ql_lo: quarters 0 and 2; ql_hi: quarters 1 and 3
      for (int i = 0; i < 4; ++i) {
        uint2 lo, hi;
        std::memcpy(&lo, xq[plane] + 4 * i, sizeof lo);
        std::memcpy(&hi, xq[plane + 2] + 4 * i, sizeof hi);
        staged[4 * plane + i] = w4a16::int4_half2_staged_word(lo, hi);
      }
    }
    uint4 lo_piece, hi_piece, high_piece;
    std::memcpy(&lo_piece, ql_lo, 16);
    std::memcpy(&hi_piece, ql_hi, 16);
    std::memcpy(&high_piece, qh, 16);
    __half2 acc[4] = {w4a16::bits_half2(0u), w4a16::bits_half2(0u), w4a16::bits_half2(0u),
                      w4a16::bits_half2(0u)};
    w4a16::q6_k_piece_half2_dot(lo_piece, hi_piece, high_piece, staged, acc);
    for (int q = 0; q < 4; ++q) {
      EXPECT_EQ(static_cast<double>(__low2float(acc[q])) + __high2float(acc[q]), want[q])
          << "trial " << trial << " quarter " << q;
    }
  }
}

// The host's Q4_K chunks (kernels::q4_k_tiles_from_blocks) hold each block's qs bytes unchanged and
// exactly the (scale, min) pairs the Q4_K tensor-core kernels stage from the block as stored
// (w4a16::q4_k_packed_scale_min), so the tiled kernels compute the same bits; ragged rows are zero.
TEST(W4A16WeightReaders, Q4KTilesHoldWhatTheKernelsStage) {  // each sub-block in the fragment order
  std::mt19937 rng(10);
  const int64_t n_out = 130, kk = 768, stages = kk / k::kQK_K;
  const std::vector<uint8_t> blocks = random_rows(k::DType::Q4_K, n_out, kk, rng);
  std::vector<uint8_t> tiles(static_cast<size_t>(k::q4_k_tiles_bytes(n_out, kk)), 0xAB);
  ASSERT_EQ(tiles.size(), static_cast<size_t>(2 * stages * (16384 + 4096)));
  ASSERT_EQ(k::q4_k_tiles_from_blocks(blocks.data(), n_out, kk, tiles.data()), k::Status::ok);
  const int64_t chunk_bytes = k::int4_tiles_chunk_bytes(32);
  for (int64_t row = 0; row < 256; ++row) {
    for (int64_t s = 0; s < stages; ++s) {
      const uint8_t* chunk = tiles.data() + ((row / 128) * stages + s) * chunk_bytes;
      const int64_t r = row % 128;
      if (row >= n_out) {
        for (int b = 0; b < 128; ++b) ASSERT_EQ(chunk[r * 128 + b], 0) << "row " << row;
        for (int b = 0; b < 32; ++b) ASSERT_EQ(chunk[16384 + r * 32 + b], 0) << "row " << row;
        continue;
      }
      const uint8_t* blk = blocks.data() + (row * stages + s) * static_cast<int64_t>(sizeof(k::BlockQ4_K));
      for (int u = 0; u < 8; ++u) {  // sub-block u's levels, input i at int4_tile_nibble_index(i)
        uint32_t run[4];
        std::memcpy(run, chunk + r * 128 + 16 * u, 16);
        for (int i = 0; i < 32; ++i) {
          const int level = (blk[16 + 32 * (u / 2) + i] >> (4 * (u % 2))) & 0xF;
          ASSERT_EQ(k::int4_tile_level(run, i), level) << "row " << row << " block " << s << " sub " << u;
        }
      }
      uint4 head;
      std::memcpy(&head, blk, sizeof head);
      for (int j = 0; j < 8; ++j) {
        uint32_t pair = 0;
        std::memcpy(&pair, chunk + 16384 + (r * 8 + j) * 4, 4);
        ASSERT_EQ(pair, w4a16::q4_k_packed_scale_min(head, j))
            << "row " << row << " block " << s << " sub " << j;
      }
    }
  }
  EXPECT_EQ(k::q4_k_tiles_from_blocks(blocks.data(), n_out, 300, tiles.data()), k::Status::invalid_argument);
  EXPECT_EQ(k::q4_k_tiles_bytes(1, 300), 0);
}

TEST(W4A16WeightReaders, Int4GroupsReadTheCpuWeights) {
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> level(0, 15), zero(0, 16);
  std::uniform_real_distribution<float> scale(0.001f, 0.5f);
  for (const int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}}) {
    for (const int64_t n_out : {int64_t{1}, int64_t{9}}) {
      const int64_t kk = 384;
      SCOPED_TRACE("group=" + std::to_string(group) + " n_out=" + std::to_string(n_out));
      // Q8_0 blocks of asymmetric INT4 (GPTQ / AWQ as loaded): per group one scale, one zero.
      std::vector<k::BlockQ8_0> blocks(static_cast<size_t>(n_out * kk / 32));
      for (int64_t g = 0; g < n_out * kk / group; ++g) {
        const k::f16_bits d = k::fp32_to_fp16(scale(rng));
        const int z = zero(rng);
        for (int64_t b = 0; b < group / 32; ++b) {
          blocks[static_cast<size_t>(g * group / 32 + b)].d = d;
          for (auto& v : blocks[static_cast<size_t>(g * group / 32 + b)].qs)
            v = static_cast<int8_t>(level(rng) - z);
        }
      }
      const std::vector<float> want = dequantized(k::DType::Q8_0, blocks.data(), n_out, kk);
      std::vector<uint8_t> quants(static_cast<size_t>(n_out * kk / 2)),
          zeros(static_cast<size_t>(n_out * kk / group));
      std::vector<uint16_t> scales(zeros.size());
      ASSERT_EQ(k::int4_groups_from_blocks(k::DType::Q8_0, blocks.data(), n_out, kk, group, quants.data(),
                                           scales.data(), zeros.data()),
                k::Status::ok);
      const Aligned q(quants.data(), quants.size()), s(scales.data(), scales.size() * 2),
          z(zeros.data(), zeros.size());
      const int shift = group == 32 ? 0 : group == 64 ? 1 : 2;
      expect_reads(
          w4a16::Int4GroupBlocks{q.bytes(), reinterpret_cast<const __half*>(s.bytes()), z.bytes(), shift},
          n_out, kk, want);
    }
  }
}

// The tensor-core B fragments of group-wise INT4 (int4_unit_b_fragments) hold, for lane (g, t),
// the inputs PTX's mma.m16n8k16 B layout assigns to it: inputs 2t, 2t + 1 (b0, b1) and 2t + 8,
// 2t + 9 (b2, b3) of each 16-deep step, for weight row g; checked for every lane of a random
// unit against the reference dequantization, rounded to fp16. The tiled form (the unit's levels in
// int4_tiles.hpp's fragment order, one word a lane: int4_tile_word_b_fragments) gives the same bits.
TEST(W4A16WeightReaders, Int4FragmentsFollowThePtxLayout) {
  std::mt19937 rng(4);
  std::uniform_int_distribution<int> byte(0, 255), zero(0, 31);
  for (int trial = 0; trial < 20; ++trial) {
    uint8_t unit[8][16];  // an n8 tile's rows, one 32-input unit each
    float scale[8];
    int z[8];
    for (int r = 0; r < 8; ++r) {
      for (auto& v : unit[r]) v = static_cast<uint8_t>(byte(rng));
      // Scales as the kernels get them: fp16 values (the device path relies on that).
      scale[r] = k::fp16_to_fp32(k::fp32_to_fp16(0.001f * static_cast<float>(1 + byte(rng))));
      z[r] = zero(rng);
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      const auto word = [&](int at) { return static_cast<unsigned>(unit[g][at] | (unit[g][at + 1] << 8)); };
      uint32_t frag[2][2], packed[2][2];
      w4a16::int4_unit_b_fragments(word(2 * t), word(2 * t + 8), scale[g], z[g], frag);
      // The tensor-core GEMV's form (scale and zero packed in one word as it stages them): the same
      // bits; and the word 0 of rows outside the matrix gives zeros.
      w4a16::int4_unit_b_fragments_packed(word(2 * t), word(2 * t + 8),
                                          w4a16::int4_packed_scale_zero(k::fp32_to_fp16(scale[g]), z[g]),
                                          packed);
      for (int s = 0; s < 2; ++s)
        for (int h = 0; h < 2; ++h) ASSERT_EQ(packed[s][h], frag[s][h]) << "lane " << lane;
      // Tiled: the run's words in the chunk's order, word t for lane t.
      uint32_t run[4], tiled_words[4], tiled[2][2];
      std::memcpy(run, unit[g], 16);
      k::int4_tile_words_from_run(run, tiled_words);
      w4a16::int4_tile_word_b_fragments(
          tiled_words[t], w4a16::int4_packed_scale_zero(k::fp32_to_fp16(scale[g]), z[g]), tiled);
      for (int s = 0; s < 2; ++s)
        for (int h = 0; h < 2; ++h) ASSERT_EQ(tiled[s][h], frag[s][h]) << "tiled, lane " << lane;
      w4a16::int4_unit_b_fragments_packed(word(2 * t), word(2 * t + 8), 0u, packed);
      w4a16::int4_tile_word_b_fragments(tiled_words[t], 0u, tiled);
      for (int s = 0; s < 2; ++s) {
        for (int h = 0; h < 2; ++h) {
          ASSERT_EQ(packed[s][h] & 0x7FFF7FFFu, 0u) << "lane " << lane;
          ASSERT_EQ(tiled[s][h], packed[s][h]) << "tiled, lane " << lane;  // +0 as the rows give it
        }
      }
      // Input j of the unit in the split order: byte j % 16, low nibble for j < 16.
      const auto input = [&](int j) {
        const int q = j < 16 ? unit[g][j] & 0xF : unit[g][j - 16] >> 4;
        return k::fp16_to_fp32(k::fp32_to_fp16(static_cast<float>(q - z[g]) * scale[g]));
      };
      for (int st = 0; st < 2; ++st) {
        const int base = 16 * st + 2 * t;
        const int want[4] = {base, base + 1, base + 8, base + 9};  // b0, b1, b2, b3
        for (int e = 0; e < 4; ++e) {
          const auto bits = static_cast<uint16_t>(frag[st][e / 2] >> (16 * (e % 2)));
          ASSERT_EQ(k::fp16_to_fp32(bits), input(want[e])) << "lane " << lane << " step " << st << " b" << e;
        }
      }
    }
  }
}

namespace {

// The tensor-core B fragments of Q4_K as stored (q4_k_unit_b_fragments with q4_k_packed_scale_min)
// hold, for lane (g, t) and every sub-block of random super-blocks, PTX's inputs 2t, 2t + 1, 2t + 8,
// 2t + 9 of each 16-deep step, with the CPU's weight (dequantize_row) to within the fp16 roundings
// of the scale, the min and the result (a wrong nibble or sub-block would be off by a level or more).
TEST(W4A16WeightReaders, Q4KFragmentsFollowThePtxLayout) {
  std::mt19937 rng(6);
  const int64_t n_out = 8, kk = 768;  // 3 super-blocks a row; the n8 tile's rows are the 8 rows
  const std::vector<uint8_t> blocks = random_rows(k::DType::Q4_K, n_out, kk, rng);
  const std::vector<float> want = dequantized(k::DType::Q4_K, blocks.data(), n_out, kk);
  const int64_t super_blocks = kk / k::kQK_K;
  for (int64_t sb = 0; sb < super_blocks; ++sb) {
    for (int u = 0; u < 8; ++u) {  // sub-block
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        const uint8_t* blk =
            blocks.data() + (g * super_blocks + sb) * static_cast<int64_t>(sizeof(k::BlockQ4_K));
        uint4 head;
        std::memcpy(&head, blk, 16);
        const uint8_t* chunk = blk + 16 + 32 * (u / 2);
        const auto word = [&](int at) { return static_cast<unsigned>(chunk[at] | (chunk[at + 1] << 8)); };
        const uint32_t scale_min = w4a16::q4_k_packed_scale_min(head, u);
        const float scale = k::fp16_to_fp32(static_cast<k::f16_bits>(scale_min & 0xFFFF));
        const float neg_min = k::fp16_to_fp32(static_cast<k::f16_bits>(scale_min >> 16));
        uint32_t frag[2][2];
        w4a16::q4_k_unit_b_fragments(word(2 * t), word(2 * t + 8), word(2 * t + 16), word(2 * t + 24), u % 2,
                                     scale_min, frag);
        // From a Q4_K tiled chunk's run (lane t's word): the same bits.
        uint32_t qs32[8], run[4], tiled[2][2];
        std::memcpy(qs32, chunk, 32);
        k::q4_k_tile_words_from_sub_block(qs32, u % 2, run);
        w4a16::q4_k_tile_word_b_fragments(run[t], scale_min, tiled);
        for (int st = 0; st < 2; ++st)
          for (int h = 0; h < 2; ++h) ASSERT_EQ(tiled[st][h], frag[st][h]) << "tiled, lane " << lane;
        for (int st = 0; st < 2; ++st) {
          const int base = 16 * st + 2 * t;
          const int inputs[4] = {base, base + 1, base + 8, base + 9};  // b0, b1, b2, b3
          for (int e = 0; e < 4; ++e) {
            const float cpu = want[static_cast<size_t>(g * kk + sb * k::kQK_K + u * 32 + inputs[e])];
            const float got = k::fp16_to_fp32(static_cast<k::f16_bits>(frag[st][e / 2] >> (16 * (e % 2))));
            // |scale * q| <= 15 |scale|; each fp16 rounding is at most 2^-11 relative.
            const float bound =
                3.0f * 0x1p-11f * (15.0f * std::fabs(scale) + std::fabs(neg_min) + std::fabs(cpu));
            ASSERT_NEAR(got, cpu, bound) << "super-block " << sb << " sub-block " << u << " lane " << lane
                                         << " step " << st << " b" << e;
          }
        }
      }
    }
  }
}

}  // namespace
