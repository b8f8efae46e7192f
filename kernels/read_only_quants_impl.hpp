#pragma once
// The kernels of kernels/read_only_quants.hpp's types, compiled once per kernel set (matmul_scalar.cpp,
// matmul_avx2.cpp, matmul_avx512.cpp; where AVX2 is on, the sums are llama.cpp's maddubs products, else plain
// loops) and by read_only_quants.cpp. Everything has internal linkage, as in quant_internal.hpp: a shared
// inline copy could be resolved to one compiled with another file's -m flags.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "kernels/iq_grids.hpp"
#include "kernels/matmul_internal.hpp"
#include "kernels/quant_types.hpp"

namespace nibble::kernels::detail {
namespace {

constexpr uint64_t kEveryByte = 0x0101010101010101ull;

// Byte j of entry i: 0xFF (−1) where bit j of i is set, else 0x01: a run's signs as a multiplier, one table
// load a run instead of spreading bits (llama.cpp's AVX2 kernels keep the same table, keven_signs_q2xs).
constexpr auto kSignRuns = [] {
  std::array<uint64_t, 256> table{};
  for (unsigned i = 0; i < 256; ++i)
    for (int j = 0; j < 8; ++j) table[i] |= static_cast<uint64_t>(i >> j & 1 ? 0xFF : 0x01) << (8 * j);
  return table;
}();

// The same for the 7 stored bits of an IQ2_XXS / IQ2_XS / IQ3_XXS run, the eighth their parity.
constexpr auto kSevenBitSignRuns = [] {
  std::array<uint64_t, 128> table{};
  for (unsigned i = 0; i < 128; ++i) table[i] = kSignRuns[iq2_sign_byte(i)];
  return table;
}();

// Byte-wise a + b (mod 256 in each byte): the low 7 bits added, the top bit by xor, so no carry crosses a
// byte.
uint64_t add_bytes(uint64_t a, uint64_t b) {
  constexpr uint64_t kLow7 = 0x7F * kEveryByte;
  return ((a & kLow7) + (b & kLow7)) ^ ((a ^ b) & ~kLow7);
}

// An IQ1 run: 8 · the grid's coordinate (−1, 0, 1 as bytes) + the run's shift (±1, llama.cpp's ±1/8 in
// eighths). Shifting the word by 3 and masking each byte's low 3 bits multiplies each byte by 8 mod 256.
uint64_t iq1_run(uint64_t entry, int shift) {
  return add_bytes(entry << 3 & 0xF8 * kEveryByte, shift > 0 ? kEveryByte : 0xFF * kEveryByte);
}

uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

uint64_t load_u64(const void* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Sub-block s (32 weights) of a super-block: coordinate j = runs' byte j (int8) times signs' byte j (±1),
// weight = d · scales[j / 16] · coordinate · the type's constant (dot_constant). The IQ2 / IQ3 types give
// their grid's magnitudes (1 to 62) and the stored signs; IQ1 and TQ give signed coordinates, and
// kSignedRuns says so.
struct SubBlock {
  uint64_t runs[4];
  uint64_t signs[4];
  int scales[2];  // odd: 2·s + 1 of the stored 3- or 4-bit s (1 for TQ)
};

template <typename Block>
constexpr bool kSignedRuns = std::is_same_v<Block, BlockIQ1_S> || std::is_same_v<Block, BlockIQ1_M> ||
                             std::is_same_v<Block, BlockTQ1_0> || std::is_same_v<Block, BlockTQ2_0>;

// F16C's conversion where the kernel set has it (exact, as fp16_to_fp32), not a call a super-block.
float block_scale_to_float(f16_bits h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return fp16_to_fp32(h);
#endif
}

float super_block_scale(const BlockIQ1_M& b) { return block_scale_to_float(iq1_m_scale(b)); }

template <typename Block>
float super_block_scale(const Block& b) {
  return block_scale_to_float(b.d);
}

// Each sub_block is forced inline: GCC left IQ3_S's a call that returns its 80 bytes through memory, in the
// innermost loop.
[[gnu::always_inline]] inline SubBlock sub_block(const BlockIQ2_XXS& b, int s) {
  const uint32_t indices = load_u32(b.qs + 4 * s);
  const uint32_t signs_scale = load_u32(b.qs + 4 * s + 2);
  SubBlock out;
  out.scales[0] = out.scales[1] = 2 * static_cast<int>(signs_scale >> 28) + 1;
  for (int r = 0; r < 4; ++r) {
    out.runs[r] = kIQ2XXSGrid[indices >> (8 * r) & 0xFF];
    out.signs[r] = kSevenBitSignRuns[signs_scale >> (7 * r) & 0x7F];
  }
  return out;
}

[[gnu::always_inline]] inline SubBlock sub_block(const BlockIQ2_XS& b, int s) {
  SubBlock out;
  out.scales[0] = 2 * (b.scales[s] & 0xF) + 1;
  out.scales[1] = 2 * (b.scales[s] >> 4) + 1;
  const uint64_t fields = load_u64(b.qs + 4 * s);  // one load: GCC spilled four 16-bit ones, then reread them
  for (int r = 0; r < 4; ++r) {                    // wider, a stalled store forward each
    out.runs[r] = kIQ2XSGrid[fields >> (16 * r) & 511];
    out.signs[r] = kSevenBitSignRuns[fields >> (16 * r + 9) & 0x7F];
  }
  return out;
}

[[gnu::always_inline]] inline SubBlock sub_block(const BlockIQ2_S& b, int s) {
  const uint8_t* signs = b.qs + kQK_K / 8;
  SubBlock out;
  out.scales[0] = 2 * (b.scales[s] & 0xF) + 1;
  out.scales[1] = 2 * (b.scales[s] >> 4) + 1;
  for (int r = 0; r < 4; ++r) {
    out.runs[r] = kIQ2SGrid[b.qs[4 * s + r] | (b.qh[s] >> (2 * r) & 3) << 8];
    out.signs[r] = kSignRuns[signs[4 * s + r]];
  }
  return out;
}

[[gnu::always_inline]] inline SubBlock sub_block(const BlockIQ3_XXS& b, int s) {
  const uint32_t word = load_u32(b.qs + kQK_K / 4 + 4 * s);
  SubBlock out;
  out.scales[0] = out.scales[1] = 2 * static_cast<int>(word >> 28) + 1;
  for (int r = 0; r < 4; ++r) {  // a pair of 4-wide grid runs shares one 7-bit sign field
    out.runs[r] = kIQ3XXSGrid[b.qs[8 * s + 2 * r]] | uint64_t{kIQ3XXSGrid[b.qs[8 * s + 2 * r + 1]]} << 32;
    out.signs[r] = kSevenBitSignRuns[word >> (7 * r) & 0x7F];
  }
  return out;
}

[[gnu::always_inline]] inline SubBlock sub_block(const BlockIQ3_S& b, int s) {
  SubBlock out;
  out.scales[0] = out.scales[1] = 2 * (b.scales[s / 2] >> (4 * (s % 2)) & 0xF) + 1;
  for (int r = 0; r < 4; ++r) {  // a pair of 4-wide grid runs, its signs one byte
    const int low = b.qs[8 * s + 2 * r] | (b.qh[s] >> (2 * r) & 1) << 8;
    const int high = b.qs[8 * s + 2 * r + 1] | (b.qh[s] >> (2 * r + 1) & 1) << 8;
    out.runs[r] = kIQ3SGrid[low] | uint64_t{kIQ3SGrid[high]} << 32;
    out.signs[r] = kSignRuns[b.signs[4 * s + r]];
  }
  return out;
}

[[gnu::always_inline]] inline SubBlock sub_block(const BlockIQ1_S& b, int s) {
  const uint16_t qh = b.qh[s];
  SubBlock out;
  out.scales[0] = out.scales[1] = 2 * (qh >> 12 & 7) + 1;
  for (int r = 0; r < 4; ++r)
    out.runs[r] = iq1_run(kIQ1SGrid[b.qs[4 * s + r] | (qh >> (3 * r) & 7) << 8], qh & 0x8000 ? -1 : 1);
  return out;
}

[[gnu::always_inline]] inline SubBlock sub_block(const BlockIQ1_M& b, int s) {
  const int word = b.scales[2 * (s / 2)] | b.scales[2 * (s / 2) + 1] << 8;
  SubBlock out;
  out.scales[0] = 2 * (word >> (6 * (s % 2)) & 7) + 1;
  out.scales[1] = 2 * (word >> (6 * (s % 2) + 3) & 7) + 1;
  for (int r = 0; r < 4; ++r) {
    const int nibble = b.qh[2 * s + r / 2] >> (4 * (r % 2)) & 0xF;
    out.runs[r] = iq1_run(kIQ1SGrid[b.qs[4 * s + r] | (nibble & 7) << 8], nibble & 8 ? -1 : 1);
  }
  return out;
}

// TQ1_0: the first 160 weights are digit s of qs[0 .. 31] for s < 5, then two digits of qs[32 .. 47] a
// sub-block, then digit 4 of qs[32 .. 47] and the four digits of qh[0 .. 3].
[[gnu::always_inline]] inline SubBlock sub_block(const BlockTQ1_0& b, int s) {
  int8_t c[32];
  if (s < 5) {
    for (int m = 0; m < 32; ++m) c[m] = static_cast<int8_t>(tq1_digit(b.qs[m], s) - 1);
  } else {
    for (int half = 0; half < 2; ++half) {
      const int l = 2 * (s - 5) + half;  // 0 .. 5; digit 5 is qh's
      for (int m = 0; m < 16; ++m)
        c[16 * half + m] =
            static_cast<int8_t>(l < 5 ? tq1_digit(b.qs[32 + m], l) - 1 : tq1_digit(b.qh[m % 4], m / 4) - 1);
    }
  }
  SubBlock out;
  out.scales[0] = out.scales[1] = 1;
  std::memcpy(out.runs, c, sizeof c);
  return out;
}

// TQ2_0: sub-block s is bits 2·(s % 4) of the 32 bytes qs[32 · (s / 4) ...], less 1 (byte-wise: + 0xFF).
[[gnu::always_inline]] inline SubBlock sub_block(const BlockTQ2_0& b, int s) {
  const uint8_t* q = b.qs + 32 * (s / 4);
  SubBlock out;
  out.scales[0] = out.scales[1] = 1;
  for (int r = 0; r < 4; ++r)
    out.runs[r] = add_bytes(load_u64(q + 8 * r) >> (2 * (s % 4)) & 3 * kEveryByte, 0xFF * kEveryByte);
  return out;
}

// One super-block of 256 weights decoded to integers: weight e = d · scales[e / 16] · coords[e] · the type's
// constant (dot_constant: 1/8 for IQ2, 1/4 for IQ3_XXS, 1/8 for IQ1, whose coordinates are 8 times the grid's
// plus the run's ±1 shift, 1 otherwise). Scaling by a power of two is exact, so the products round as
// llama.cpp's.
struct Decoded {
  alignas(32) int8_t coords[kQK_K];  // aligned for the AVX2 sums' 32-byte loads
  int scales[kQK_K / 16];
#if defined(__AVX2__)
  alignas(32) uint8_t magnitudes[kQK_K];  // |coords|, what maddubs takes (its sign goes onto the activation)
  __m256i scale_vectors[kQK_K / 32];      // scale_lanes of each sub-block
#endif
  float d;  // the super-block's scale
};

#if defined(__AVX2__)
__m256i runs_vector(const uint64_t (&runs)[4]) {
  return _mm256_set_epi64x(static_cast<int64_t>(runs[3]), static_cast<int64_t>(runs[2]),
                           static_cast<int64_t>(runs[1]), static_cast<int64_t>(runs[0]));
}

// The sub-block's 32 coordinates, signs applied.
template <typename Block>
__m256i coords_vector(const SubBlock& sub) {
  if constexpr (kSignedRuns<Block>)
    return runs_vector(sub.runs);
  else
    return _mm256_sign_epi8(runs_vector(sub.runs), runs_vector(sub.signs));
}

// 16-bit lanes 0-7 hold scales[0], lanes 8-15 scales[1]: the pair sums maddubs makes of 32 elements.
__m256i scale_lanes(const int (&scales)[2]) {
  return _mm256_setr_m128i(_mm_set1_epi16(static_cast<int16_t>(scales[0])),
                           _mm_set1_epi16(static_cast<int16_t>(scales[1])));
}

int horizontal_sum(__m256i v) {
  __m128i half = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  half = _mm_add_epi32(half, _mm_unpackhi_epi64(half, half));
  half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 1));
  return _mm_cvtsi128_si32(half);
}

// Lane t: the sum of v[t]'s 8 lanes.
__m256i horizontal_sums(const __m256i (&v)[8]) {
  const __m256i low = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i high = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  // Each 128-bit half now holds 4 partial sums a row: rows 0-3 (low) or 4-7 (high), from the low or high half
  // of each v.
  return _mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20),
                          _mm256_permute2x128_si256(low, high, 0x31));
}

// Σ scale · c · q over 32 elements, 8 int32 lanes, as llama.cpp's AVX2 kernels: maddubs takes |c| (unsigned,
// ≤ 62) against q with c's sign (|q| ≤ 127, as Q8_K never holds −128), so a pair's sum stays under 2^15;
// madd then weights each pair by its scale (≤ 31).
__m256i scaled_products(__m256i c, __m256i q, __m256i scales) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(c), _mm256_sign_epi8(q, c)), scales);
}

// scaled_products with the coordinates' magnitudes and signs apart (signs: ±1 bytes), the signs put onto q.
__m256i signed_products(__m256i magnitudes, __m256i signs, __m256i scales, __m256i q) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(q, signs)), scales);
}

// scaled_products of a sub-block as sub_block gives it.
template <typename Block>
__m256i sub_block_products(const SubBlock& sub, __m256i q) {
  if constexpr (kSignedRuns<Block>)
    return scaled_products(runs_vector(sub.runs), q, scale_lanes(sub.scales));
  else
    return signed_products(runs_vector(sub.runs), runs_vector(sub.signs), scale_lanes(sub.scales), q);
}

__m256i load_activations(const int8_t* q) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)); }

// Σ over the super-block of scale · coordinate · q: one weight row's integer sum with one activation block.
template <typename Block>
int block_products(const Block& b, const BlockQ8_K& x) {
  __m256i products = _mm256_setzero_si256();
  for (int s = 0; s < kQK_K / 32; ++s) {
    const __m256i q = load_activations(x.qs + 32 * s);
    products = _mm256_add_epi32(products, sub_block_products<Block>(sub_block(b, s), q));
  }
  return horizontal_sum(products);
}

// The 7 stored sign bits of each run (the low bits of each 16- or 32-bit lane, the rest 0) with the eighth,
// their parity, as bit 7: the parity of the xor of the low 4 and high 3 bits, looked up by nibble.
__m256i with_parity(__m256i seven) {
  const __m256i odd_parity =
      _mm256_setr_epi8(0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0, 0, -128, -128,
                       0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0);
  return _mm256_or_si256(
      seven, _mm256_shuffle_epi8(odd_parity, _mm256_xor_si256(seven, _mm256_srli_epi16(seven, 4))));
}

// A sub-block's 32 signs as ±1 bytes: `spread` copies each of its 4 runs' sign bytes from `half` over the
// run's 8 bytes, and byte j is −1 where bit j is set.
__m256i spread_signs(__m128i half, __m256i spread) {
  const __m256i bit_of_byte = _mm256_set1_epi64x(0x8040201008040201);
  const __m256i bytes = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(half), spread);
  return _mm256_or_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit_of_byte), bit_of_byte),
                         _mm256_set1_epi8(1));
}

// Each of 4 bytes, `stride` apart from byte `first`, copied to 8 bytes in a row.
__m256i spread_pattern(int first, int stride) {
  alignas(32) int8_t pattern[32];
  for (int j = 0; j < 32; ++j) pattern[j] = static_cast<int8_t>(first + stride * (j / 8));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(pattern));
}

// IQ2_XS in llama.cpp's form, four sub-blocks (16 runs) at a time: the grid indices masked in one vector, the
// 7 sign bits shifted out in one and their parities looked up (with_parity), each run's sign byte spread over
// its 8 bytes (spread_signs), the 16 scales unpacked once a block. The generic form's two shifts, table load
// and insert a run were a third of its time (0.90 against 1.25 ms at one row of 8192 x 2048).
int block_products(const BlockIQ2_XS& b, const BlockQ8_K& x) {
  const __m256i spread_first = spread_pattern(0, 2);  // runs 0-3 of 8 (16-bit lanes) in a 128-bit half
  const __m256i spread_second = spread_pattern(8, 2);
  const __m128i low4 = _mm_set1_epi8(0xF);
  const __m128i packed_scales = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b.scales));
  const __m128i nibbles = _mm_unpacklo_epi8(_mm_and_si128(packed_scales, low4),
                                            _mm_and_si128(_mm_srli_epi16(packed_scales, 4), low4));
  const __m128i scales = _mm_add_epi8(_mm_add_epi8(nibbles, nibbles), _mm_set1_epi8(1));  // scale g in byte g
  const __m128i scale_pair = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m256i products = _mm256_setzero_si256();
  for (int s0 = 0; s0 < kQK_K / 32; s0 += 4) {  // 16 runs: a 9-bit grid index and 7 sign bits each
    const __m256i fields = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 4 * s0));
    alignas(32) uint16_t index[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(index), _mm256_and_si256(fields, _mm256_set1_epi16(511)));
    const __m256i sign_bytes = with_parity(_mm256_srli_epi16(fields, 9));
    for (int h = 0; h < 4; ++h) {
      const int s = s0 + h;
      const __m128i half =
          h < 2 ? _mm256_castsi256_si128(sign_bytes) : _mm256_extracti128_si256(sign_bytes, 1);
      const uint16_t* i = index + 4 * h;
      const __m256i magnitudes =
          _mm256_set_epi64x(static_cast<int64_t>(kIQ2XSGrid[i[3]]), static_cast<int64_t>(kIQ2XSGrid[i[2]]),
                            static_cast<int64_t>(kIQ2XSGrid[i[1]]), static_cast<int64_t>(kIQ2XSGrid[i[0]]));
      const __m256i scale = _mm256_cvtepi8_epi16(
          _mm_shuffle_epi8(scales, _mm_add_epi8(scale_pair, _mm_set1_epi8(static_cast<char>(2 * s)))));
      products = _mm256_add_epi32(
          products, signed_products(magnitudes, spread_signs(half, h % 2 == 0 ? spread_first : spread_second),
                                    scale, load_activations(x.qs + 32 * s)));
    }
  }
  return horizontal_sum(products);
}

// IQ3_XXS the same way, two sub-blocks at a time: each run's 7 sign bits shifted out of its sub-block's word.
// Its 8 grid loads a sub-block stay its main cost (1.43 against 1.60 ms at one row of 8192 x 2048).
int block_products(const BlockIQ3_XXS& b, const BlockQ8_K& x) {
  const __m256i spread = spread_pattern(0, 4);  // the 4 runs of a sub-block (32-bit lanes) in a 128-bit half
  const __m256i word_per_run = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i run_shift = _mm256_setr_epi32(0, 7, 14, 21, 0, 7, 14, 21);
  const uint8_t* words = b.qs + kQK_K / 4;  // a sub-block's 4 runs' 7 sign bits, then its scale
  __m256i products = _mm256_setzero_si256();
  for (int s0 = 0; s0 < kQK_K / 32; s0 += 2) {
    const __m256i pair =
        _mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(words + 4 * s0)));
    const __m256i sign_bytes = with_parity(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_permutevar8x32_epi32(pair, word_per_run), run_shift),
                         _mm256_set1_epi32(0x7F)));
    for (int h = 0; h < 2; ++h) {
      const int s = s0 + h;
      const __m128i half =
          h == 0 ? _mm256_castsi256_si128(sign_bytes) : _mm256_extracti128_si256(sign_bytes, 1);
      const uint8_t* i = b.qs + 8 * s;
      const __m256i magnitudes =
          _mm256_set_epi32(static_cast<int>(kIQ3XXSGrid[i[7]]), static_cast<int>(kIQ3XXSGrid[i[6]]),
                           static_cast<int>(kIQ3XXSGrid[i[5]]), static_cast<int>(kIQ3XXSGrid[i[4]]),
                           static_cast<int>(kIQ3XXSGrid[i[3]]), static_cast<int>(kIQ3XXSGrid[i[2]]),
                           static_cast<int>(kIQ3XXSGrid[i[1]]), static_cast<int>(kIQ3XXSGrid[i[0]]));
      const __m256i scale = _mm256_set1_epi16(static_cast<int16_t>(2 * (load_u32(words + 4 * s) >> 28) + 1));
      products = _mm256_add_epi32(products, signed_products(magnitudes, spread_signs(half, spread), scale,
                                                            load_activations(x.qs + 32 * s)));
    }
  }
  return horizontal_sum(products);
}

// IQ3_S likewise, a sub-block at a time: its 8 grid indices made in one vector (each index's ninth bit
// shifted out of qh into bit 8, as llama.cpp does), its 4 sign bytes spread over their runs.
int block_products(const BlockIQ3_S& b, const BlockQ8_K& x) {
  const __m256i spread = spread_pattern(0, 1);
  const __m256i ninth_bit_shift = _mm256_setr_epi32(8, 7, 6, 5, 4, 3, 2, 1);
  __m256i products = _mm256_setzero_si256();
  for (int s = 0; s < kQK_K / 32; ++s) {
    const __m256i low = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b.qs + 8 * s)));
    const __m256i ninth = _mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(b.qh[s]), ninth_bit_shift),
                                           _mm256_set1_epi32(256));
    alignas(32) uint32_t i[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(i), _mm256_or_si256(low, ninth));
    const __m256i magnitudes =
        _mm256_set_epi32(static_cast<int>(kIQ3SGrid[i[7]]), static_cast<int>(kIQ3SGrid[i[6]]),
                         static_cast<int>(kIQ3SGrid[i[5]]), static_cast<int>(kIQ3SGrid[i[4]]),
                         static_cast<int>(kIQ3SGrid[i[3]]), static_cast<int>(kIQ3SGrid[i[2]]),
                         static_cast<int>(kIQ3SGrid[i[1]]), static_cast<int>(kIQ3SGrid[i[0]]));
    const __m256i scale =
        _mm256_set1_epi16(static_cast<int16_t>(2 * (b.scales[s / 2] >> (4 * (s % 2)) & 0xF) + 1));
    const __m128i sign_bytes = _mm_cvtsi32_si128(static_cast<int>(load_u32(b.signs + 4 * s)));
    products = _mm256_add_epi32(products, signed_products(magnitudes, spread_signs(sign_bytes, spread), scale,
                                                          load_activations(x.qs + 32 * s)));
  }
  return horizontal_sum(products);
}

// IQ2_S likewise: each run's two high index bits moved to bits 8 and 9 by one shift, its sign byte spread
// over the run.
int block_products(const BlockIQ2_S& b, const BlockQ8_K& x) {
  const __m256i spread = spread_pattern(0, 1);
  const uint8_t* signs = b.qs + kQK_K / 8;
  __m256i products = _mm256_setzero_si256();
  for (int s = 0; s < kQK_K / 32; ++s) {
    const int high = b.qh[s];
    const uint8_t* q = b.qs + 4 * s;
    const __m256i magnitudes = _mm256_set_epi64x(static_cast<int64_t>(kIQ2SGrid[q[3] | (high << 2 & 0x300)]),
                                                 static_cast<int64_t>(kIQ2SGrid[q[2] | (high << 4 & 0x300)]),
                                                 static_cast<int64_t>(kIQ2SGrid[q[1] | (high << 6 & 0x300)]),
                                                 static_cast<int64_t>(kIQ2SGrid[q[0] | (high << 8 & 0x300)]));
    const int scales[2] = {2 * (b.scales[s] & 0xF) + 1, 2 * (b.scales[s] >> 4) + 1};
    const __m128i sign_bytes = _mm_cvtsi32_si128(static_cast<int>(load_u32(signs + 4 * s)));
    products =
        _mm256_add_epi32(products, signed_products(magnitudes, spread_signs(sign_bytes, spread),
                                                   scale_lanes(scales), load_activations(x.qs + 32 * s)));
  }
  return horizontal_sum(products);
}
#endif

template <typename Block>
void decode(const Block& b, Decoded& out) {
  out.d = super_block_scale(b);
  for (int s = 0; s < kQK_K / 32; ++s) {
    const SubBlock sub = sub_block(b, s);
    out.scales[2 * s] = sub.scales[0];
    out.scales[2 * s + 1] = sub.scales[1];
#if defined(__AVX2__)
    const __m256i c = coords_vector<Block>(sub);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out.coords + 32 * s), c);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out.magnitudes + 32 * s), _mm256_abs_epi8(c));
    out.scale_vectors[s] = scale_lanes(sub.scales);
#else
    uint64_t runs[4];
    for (int r = 0; r < 4; ++r) {
      // −c is (c xor 0xFF) + 1 in a byte, for all bytes at once; no carry crosses a byte, as the grids hold
      // no 0 coordinate.
      const uint64_t negative = kSignedRuns<Block> ? 0 : sub.signs[r] >> 7 & kEveryByte;
      runs[r] = (sub.runs[r] ^ (negative * 0xFF)) + negative;
    }
    std::memcpy(out.coords + 32 * s, runs, sizeof runs);
#endif
  }
}

// llama.cpp's GGML_E8M0_TO_FP32_HALF: 2^(e − 128), the E8M0 scale halved for the doubled E2M1 values.
float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Up to kTileRows weight rows' super-blocks at one block index, decoded once for all activation rows.
// add_terms adds each one's term of ggml_vec_dot_<type>_q8_K with an activation block: its integer sums, then
// (d · d_x) · Σ_g scale_g · (coords · q)_g. (IQ1's is 8 times llama.cpp's: its sum of the grid term and 1/8
// of the shifts' term.)
constexpr int kTileRows = 8;

struct Tile {
  Decoded blocks[kTileRows];
  int n_rows = 0;
#if defined(__AVX2__)
  __m256 d;  // the blocks' scales, 0 past n_rows
#endif

  // The super-blocks at index b of n rows of blocks, `stride` bytes apart, from `first`.
  template <typename Block>
  void decode_rows(const uint8_t* first, int64_t stride, int n, int64_t b) {
    if (n != n_rows) {
      n_rows = n;
      // AVX2 sums all kTileRows: the rows past n add nothing (magnitudes and d 0).
      for (int t = n; t < kTileRows; ++t) std::memset(&blocks[t], 0, sizeof blocks[t]);
    }
    for (int t = 0; t < n; ++t) decode(reinterpret_cast<const Block*>(first + t * stride)[b], blocks[t]);
#if defined(__AVX2__)
    d = _mm256_setr_ps(blocks[0].d, blocks[1].d, blocks[2].d, blocks[3].d, blocks[4].d, blocks[5].d,
                       blocks[6].d, blocks[7].d);
#endif
  }

  // sums[t] += block t's term with x.
  void add_terms(const BlockQ8_K& x, float* sums) const {
#if defined(__AVX2__)
    __m256i per_row[kTileRows];  // the 8 sums stay in registers; each activation vector is loaded once
    for (__m256i& sum : per_row) sum = _mm256_setzero_si256();
    for (int s = 0; s < kQK_K / 32; ++s) {
      const __m256i q = load_activations(x.qs + 32 * s);
      for (int t = 0; t < kTileRows; ++t) {
        const Decoded& dec = blocks[t];
        const __m256i c = _mm256_load_si256(reinterpret_cast<const __m256i*>(dec.coords + 32 * s));
        const __m256i magnitudes =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(dec.magnitudes + 32 * s));
        per_row[t] = _mm256_add_epi32(
            per_row[t], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(q, c)),
                                          dec.scale_vectors[s]));
      }
    }
    const __m256 terms = _mm256_mul_ps(d, _mm256_set1_ps(x.d));
    _mm256_storeu_ps(
        sums, _mm256_fmadd_ps(_mm256_cvtepi32_ps(horizontal_sums(per_row)), terms, _mm256_loadu_ps(sums)));
#else
    for (int t = 0; t < n_rows; ++t) {
      const Decoded& dec = blocks[t];
      int scaled = 0;
      for (int g = 0; g < kQK_K / 16; ++g) {
        int dot = 0;
        for (int j = 0; j < 16; ++j) dot += dec.coords[16 * g + j] * x.qs[16 * g + j];
        scaled += dec.scales[g] * dot;
      }
      sums[t] += dec.d * x.d * static_cast<float>(scaled);
    }
#endif
  }
};

// What ggml_vec_dot_<type>_q8_K multiplies the blocks' sum by at the end.
template <typename Block>
constexpr float dot_constant() {
  if constexpr (std::is_same_v<Block, BlockIQ3_XXS>)
    return 0.25f;
  else if constexpr (std::is_same_v<Block, BlockIQ2_XXS> || std::is_same_v<Block, BlockIQ2_XS> ||
                     std::is_same_v<Block, BlockIQ2_S> || std::is_same_v<Block, BlockIQ1_S> ||
                     std::is_same_v<Block, BlockIQ1_M>)
    return 0.125f;
  else
    return 1.0f;
}

// The blocks' terms added in block order, then the constant: llama.cpp's generic vec_dot.
template <typename Block>
void matmul_blocks(const uint8_t* w, int64_t w_stride, const uint8_t* x, int64_t x_stride, float* y,
                   int64_t y_stride, int64_t m, int64_t k, int64_t o_begin, int64_t o_end) {
  const int64_t n_blocks = k / kQK_K;
  constexpr float constant = dot_constant<Block>();
#if defined(__AVX2__)
  if (m == 1) {  // one activation row (generation): each sub-block's coordinates stay in registers
    const auto* x_blocks = reinterpret_cast<const BlockQ8_K*>(x);
    for (int64_t o = o_begin; o < o_end; ++o) {
      const auto* row = reinterpret_cast<const Block*>(w + o * w_stride);
      float sum = 0.0f;
      for (int64_t b = 0; b < n_blocks; ++b) {
        // One rounding for the product and sum, as add_terms' fmadd, so a row's result does not depend on
        // the batch.
        sum = std::fma(super_block_scale(row[b]) * x_blocks[b].d,
                       static_cast<float>(block_products(row[b], x_blocks[b])), sum);
      }
      y[o] = sum * constant;
    }
    return;
  }
#endif
  // Several activation rows: a tile of weight rows' super-blocks decoded once for all of them, so each
  // activation block is read once a tile rather than once a weight row. The sums gather in a local array:
  // y's rows lie n_out floats apart, often a multiple of 4 KiB, where each row's load would wait on the
  // previous row's store (4K aliasing).
  constexpr int64_t kChunkRows = 64;
  Tile tile;
  float sums[kChunkRows][kTileRows];
  for (int64_t o0 = o_begin; o0 < o_end; o0 += kTileRows) {
    const int n_tile = static_cast<int>(std::min<int64_t>(kTileRows, o_end - o0));
    for (int64_t r0 = 0; r0 < m; r0 += kChunkRows) {
      const int64_t n_rows = std::min(kChunkRows, m - r0);
      for (int64_t r = 0; r < n_rows; ++r)
        for (int t = 0; t < kTileRows; ++t) sums[r][t] = 0.0f;
      for (int64_t b = 0; b < n_blocks; ++b) {
        tile.decode_rows<Block>(w + o0 * w_stride, w_stride, n_tile, b);
        for (int64_t r = 0; r < n_rows; ++r)
          tile.add_terms(reinterpret_cast<const BlockQ8_K*>(x + (r0 + r) * x_stride)[b], sums[r]);
      }
      for (int64_t r = 0; r < n_rows; ++r)
        for (int t = 0; t < n_tile; ++t) y[(r0 + r) * y_stride + o0 + t] = sums[r][t] * constant;
    }
  }
}

float dot_mxfp4(const BlockMXFP4* w, const BlockQ8_0* x, int64_t n_blocks) {
  float sum = 0.0f;
#if defined(__AVX2__)
  // The 16 doubled E2M1 values looked up by byte shuffle: the low nibbles are elements 0-15, the high 16-31.
  const __m128i values = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kMXFP4Values));
  const __m128i low4 = _mm_set1_epi8(0xF);
  for (int64_t i = 0; i < n_blocks; ++i) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[i].qs));
    const __m256i c =
        _mm256_setr_m128i(_mm_shuffle_epi8(values, _mm_and_si128(packed, low4)),
                          _mm_shuffle_epi8(values, _mm_and_si128(_mm_srli_epi16(packed, 4), low4)));
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i].qs));
    const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(c), _mm256_sign_epi8(q, c)),
                                           _mm256_set1_epi16(1));
    __m128i half = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
    half = _mm_add_epi32(half, _mm_unpackhi_epi64(half, half));
    half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 1));
    sum += fp16_to_fp32(x[i].d) * e8m0_half(w[i].e) * static_cast<float>(_mm_cvtsi128_si32(half));
  }
#else
  for (int64_t i = 0; i < n_blocks; ++i) {
    int dot = 0;
    for (int j = 0; j < 16; ++j)
      dot += x[i].qs[j] * kMXFP4Values[w[i].qs[j] & 0xF] + x[i].qs[j + 16] * kMXFP4Values[w[i].qs[j] >> 4];
    sum += fp16_to_fp32(x[i].d) * e8m0_half(w[i].e) * static_cast<float>(dot);
  }
#endif
  return sum;
}

// Calls f(typed pointer) for a read-only super-block type; false for another type.
template <typename F>
bool with_blocks(DType type, const void* p, F&& f) {
  switch (type) {
    case DType::IQ2_XXS:
      f(static_cast<const BlockIQ2_XXS*>(p));
      return true;
    case DType::IQ2_XS:
      f(static_cast<const BlockIQ2_XS*>(p));
      return true;
    case DType::IQ2_S:
      f(static_cast<const BlockIQ2_S*>(p));
      return true;
    case DType::IQ3_XXS:
      f(static_cast<const BlockIQ3_XXS*>(p));
      return true;
    case DType::IQ3_S:
      f(static_cast<const BlockIQ3_S*>(p));
      return true;
    case DType::IQ1_S:
      f(static_cast<const BlockIQ1_S*>(p));
      return true;
    case DType::IQ1_M:
      f(static_cast<const BlockIQ1_M*>(p));
      return true;
    case DType::TQ1_0:
      f(static_cast<const BlockTQ1_0*>(p));
      return true;
    case DType::TQ2_0:
      f(static_cast<const BlockTQ2_0*>(p));
      return true;
    default:
      return false;
  }
}

void matmul_mxfp4(const uint8_t* w, int64_t w_stride, const uint8_t* x, int64_t x_stride, float* y,
                  int64_t y_stride, int64_t m, int64_t k, int64_t o_begin, int64_t o_end) {
  for (int64_t o = o_begin; o < o_end; ++o)
    for (int64_t r = 0; r < m; ++r)
      y[r * y_stride + o] = dot_mxfp4(reinterpret_cast<const BlockMXFP4*>(w + o * w_stride),
                                      reinterpret_cast<const BlockQ8_0*>(x + r * x_stride), k / kQK4_0);
}

// y[r, o] for activation rows r in [0, m) and weight rows o in [o_begin, o_end) (see matmul_read_only_rows).
[[maybe_unused]] void read_only_rows(DType type, const uint8_t* w, int64_t w_stride, const uint8_t* x,
                                     int64_t x_stride, float* y, int64_t y_stride, int64_t m, int64_t k,
                                     int64_t o_begin, int64_t o_end) {
  if (type == DType::MXFP4) {
    matmul_mxfp4(w, w_stride, x, x_stride, y, y_stride, m, k, o_begin, o_end);
    return;
  }
  with_blocks(type, w, [&](auto* typed) {
    using Block = std::remove_cv_t<std::remove_pointer_t<decltype(typed)>>;
    matmul_blocks<Block>(w, w_stride, x, x_stride, y, y_stride, m, k, o_begin, o_end);
  });
}

template <typename Block>
void block_type_range(const MatmulOperands& op, int64_t o_begin, int64_t o_end) {
  matmul_blocks<Block>(op.w, op.w_stride, op.x, op.x_stride, op.y, op.y_stride, op.m, op.k, o_begin, o_end);
}

void mxfp4_range(const MatmulOperands& op, int64_t o_begin, int64_t o_end) {
  matmul_mxfp4(op.w, op.w_stride, op.x, op.x_stride, op.y, op.y_stride, op.m, op.k, o_begin, o_end);
}

// IsaKernels::read_only for the kernel set that includes this file.
[[maybe_unused]] MatmulRangeFn read_only_range(DType w_type) {
  if (w_type == DType::MXFP4) return mxfp4_range;
  MatmulRangeFn range = nullptr;
  with_blocks(w_type, nullptr, [&](auto* typed) {
    range = block_type_range<std::remove_cv_t<std::remove_pointer_t<decltype(typed)>>>;
  });
  return range;
}

}  // namespace
}  // namespace nibble::kernels::detail
