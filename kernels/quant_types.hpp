#pragma once
// Tensor element types and their block layouts, bit-compatible with GGML/GGUF so that quantized
// weights are used straight from a memory-mapped file.
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace nibble::kernels {

// Values are GGML's type ids, as stored in GGUF tensor infos.
enum class DType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,  // activations only (Q4_1 / Q5_1 dot products)
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,  // activations only (K-quant dot products)
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,
};

struct TypeInfo {
  const char* name;
  int64_t block_elems;  // elements per block
  int64_t block_bytes;  // bytes per block
};

// Returns nullptr for ids Nibble does not handle.
const TypeInfo* type_info(uint32_t raw_type);
const TypeInfo& type_info(DType type);
const char* type_name(DType type);
// Bytes of a row of n elements; n must be a multiple of the block size.
int64_t row_bytes(DType type, int64_t n);

constexpr int kQK4_0 = 32;
constexpr int kQK8_0 = 32;
constexpr int kQK_K = 256;
constexpr int kKScaleBytes = 12;

using f16_bits = uint16_t;

struct BlockQ4_0 {
  f16_bits d;              // scale
  uint8_t qs[kQK4_0 / 2];  // element j in the low nibble of qs[j], element j+16 in the high
};
static_assert(sizeof(BlockQ4_0) == 18);

// Q4_0 with a per-block minimum instead of the fixed -8 offset: weight = d · q + m, q in 0..15.
struct BlockQ4_1 {
  f16_bits d;              // scale
  f16_bits m;              // minimum (the weight of level 0)
  uint8_t qs[kQK4_0 / 2];  // Q4_0's nibble order
};
static_assert(sizeof(BlockQ4_1) == 20);

// Q4_0 with a fifth bit: weight = d · (q − 16), q in 0..31. llama.cpp stores Q4_K rows whose length
// is not a multiple of 256 as Q5_0.
struct BlockQ5_0 {
  f16_bits d;
  uint8_t qh[4];           // bit j of the little-endian uint32: the fifth bit of element j
  uint8_t qs[kQK4_0 / 2];  // the low 4 bits, Q4_0's nibble order
};
static_assert(sizeof(BlockQ5_0) == 22);

// Q4_1 with a fifth bit: weight = d · q + m, q in 0..31 (llama.cpp's fallback for Q5_K rows).
struct BlockQ5_1 {
  f16_bits d;
  f16_bits m;
  uint8_t qh[4];           // as Q5_0's
  uint8_t qs[kQK4_0 / 2];  // as Q5_0's
};
static_assert(sizeof(BlockQ5_1) == 24);

// The fifth bits of a Q5_0 / Q5_1 block (bit j: element j).
static constexpr uint32_t q5_high_bits(const uint8_t (&qh)[4]) {
  return static_cast<uint32_t>(qh[0]) | static_cast<uint32_t>(qh[1]) << 8 |
         static_cast<uint32_t>(qh[2]) << 16 | static_cast<uint32_t>(qh[3]) << 24;
}

struct BlockQ8_0 {
  f16_bits d;
  int8_t qs[kQK8_0];
};
static_assert(sizeof(BlockQ8_0) == 34);

// Q2_K: 16 sub-blocks of 16, weight = d · sc · q − dmin · m with q in 0..3 and 4-bit sub-block scales
// sc and mins m. Element 128h + 32j + l (h = 0, 1; j = 0..3; l = 0..31) has its level in bits 2j, 2j + 1
// of qs[32h + l]; sub-block g (elements 16g .. 16g + 15) has sc = scales[g] & 15, m = scales[g] >> 4.
struct BlockQ2_K {
  uint8_t scales[kQK_K / 16];  // low nibble the scale, high nibble the min
  uint8_t qs[kQK_K / 4];
  f16_bits d;     // super-block scale of the sub-block scales
  f16_bits dmin;  // super-block scale of the sub-block mins
};
static_assert(sizeof(BlockQ2_K) == 84);

// Q3_K: 16 sub-blocks of 16, weight = d · (sc − 32) · (q − 4), q in 0..7: the low 2 bits as Q2_K's qs,
// the third in hmask (element 128h + 32j + l: bit 4h + j of hmask[l]), 6-bit sub-block scales sc (see
// q3_k_scale).
struct BlockQ3_K {
  uint8_t hmask[kQK_K / 8];
  uint8_t qs[kQK_K / 4];
  uint8_t scales[kKScaleBytes];
  f16_bits d;
};
static_assert(sizeof(BlockQ3_K) == 110);

// Level (0..3) of element e of a Q2_K block, or the low 2 bits of a Q3_K level.
static constexpr int q2_k_low_bits(const uint8_t (&qs)[kQK_K / 4], int e) {
  return (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
}

// Level (0..7, the weight's value + 4) of element e of a Q3_K block.
static constexpr int q3_k_level(const BlockQ3_K& block, int e) {
  const int high = (block.hmask[e % 32] >> (e / 32)) & 1;
  return q2_k_low_bits(block.qs, e) | (high << 2);
}

// Sub-block g's (0..15) signed scale, −32..31, of a Q3_K block: the low 4 bits in the low (g < 8) or
// high nibble of scales[g % 8], the top 2 in bits 2(g / 4), 2(g / 4) + 1 of scales[8 + g % 4].
static constexpr int q3_k_scale(const BlockQ3_K& block, int g) {
  const int low = (block.scales[g % 8] >> (4 * (g / 8))) & 0xF;
  const int high = (block.scales[8 + g % 4] >> (2 * (g / 4))) & 3;
  return (low | (high << 4)) - 32;
}

struct BlockQ4_K {
  f16_bits d;                    // super-block scale for the 6-bit sub-block scales
  f16_bits dmin;                 // super-block scale for the 6-bit sub-block mins
  uint8_t scales[kKScaleBytes];  // 8 scales and 8 mins, 6 bits each
  uint8_t qs[kQK_K / 2];
};
static_assert(sizeof(BlockQ4_K) == 144);

// Q4_K with a fifth bit per element: values 0..31.
struct BlockQ5_K {
  f16_bits d;                    // super-block scale for the 6-bit sub-block scales
  f16_bits dmin;                 // super-block scale for the 6-bit sub-block mins
  uint8_t scales[kKScaleBytes];  // 8 scales and 8 mins, 6 bits each, packed as in Q4_K
  uint8_t qh[kQK_K / 8];         // bit s of qh[l]: the high bit of element l of sub-block s
  uint8_t qs[kQK_K / 2];         // the low 4 bits, packed as Q4_K's qs
};
static_assert(sizeof(BlockQ5_K) == 176);

struct BlockQ6_K {
  uint8_t ql[kQK_K / 2];      // low 4 bits
  uint8_t qh[kQK_K / 4];      // high 2 bits
  int8_t scales[kQK_K / 16];  // 8-bit sub-block scales
  f16_bits d;
};
static_assert(sizeof(BlockQ6_K) == 210);

// IQ4_NL: Q4_0's layout, the nibbles indexing llama.cpp's non-linear table kIQ4Values.
struct BlockIQ4_NL {
  f16_bits d;
  uint8_t qs[kQK4_0 / 2];  // element j in the low nibble of qs[j], element j+16 in the high
};
static_assert(sizeof(BlockIQ4_NL) == 18);

// IQ4_XS: 4-bit indices into llama.cpp's non-linear table kIQ4Values, 8 sub-blocks of 32 with 6-bit
// scales (stored minus 32).
struct BlockIQ4_XS {
  f16_bits d;                    // super-block scale
  uint16_t scales_h;             // bits 2s, 2s + 1: the high 2 bits of sub-block s's scale
  uint8_t scales_l[kQK_K / 64];  // the low 4 bits: sub-block 2t in the low nibble of byte t, 2t + 1 high
  uint8_t qs[kQK_K / 2];         // sub-block s: qs[16s + j] holds element j (low nibble) and j + 16 (high)
};
static_assert(sizeof(BlockIQ4_XS) == 136);

// The 16 values an IQ4 index stands for (llama.cpp's kvalues_iq4nl).
inline constexpr int8_t kIQ4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                          1,    13,   25,  38,  53,  69,  89,  113};

// Sub-block s's scale of an IQ4_XS block, -32..31. Static: the SIMD translation units call it too, and
// a shared inline (COMDAT) copy could be resolved to one compiled with their -m flags.
static constexpr int iq4_xs_scale(const BlockIQ4_XS& block, int s) {
  const int low = (block.scales_l[s / 2] >> (4 * (s % 2))) & 0xF;
  const int high = (block.scales_h >> (2 * s)) & 3;
  return (low | (high << 4)) - 32;
}

// llama.cpp's sub-4-bit i-quants: each run of 8 (IQ2, IQ1) or 4 (IQ3) weights is a point of a fixed
// lattice (kernels/iq_grids.hpp) named by its index, with signs and a scale per sub-block of 32. They
// multiply Q8_K activations. The sign of a run of 8 is a 7-bit field with the eighth sign the parity of the
// other seven (iq2_sign_byte).
struct BlockIQ2_XXS {
  f16_bits d;
  // Sub-block s (32 weights) in qs[4s .. 4s + 3], read as two uint32: the first holds the 4 grid indices
  // (one a byte, kIQ2XXSGrid), the second the 4 runs' 7-bit signs (bits 7r .. 7r + 6) and the scale (the
  // top 4 bits): weight = d · (2·scale + 1) / 8 · coordinate.
  uint16_t qs[kQK_K / 8];
};
static_assert(sizeof(BlockIQ2_XXS) == 66);

struct BlockIQ2_XS {
  f16_bits d;
  uint16_t qs[kQK_K / 8];  // per run of 8: a 9-bit kIQ2XSGrid index, the 7-bit signs above it
  uint8_t
      scales[kQK_K / 32];  // sub-block s: its first 16 weights' scale in the low nibble, its last 16's high
};
static_assert(sizeof(BlockIQ2_XS) == 74);

struct BlockIQ2_S {
  f16_bits d;
  uint8_t qs[kQK_K / 4];       // the low 8 bits of the 32 kIQ2SGrid indices, then the 32 runs' 8 sign bits
  uint8_t qh[kQK_K / 32];      // sub-block s: bits 2r, 2r + 1 are the high bits of its run r's index
  uint8_t scales[kQK_K / 32];  // as IQ2_XS's
};
static_assert(sizeof(BlockIQ2_S) == 82);

struct BlockIQ3_XXS {
  f16_bits d;
  // 64 kIQ3XXSGrid indices (one a byte, runs of 4), then 8 uint32, one a sub-block: its 4 pairs of runs'
  // 7-bit signs and its scale in the top 4 bits: weight = d · (2·scale + 1) / 4 · coordinate.
  uint8_t qs[3 * kQK_K / 8];
};
static_assert(sizeof(BlockIQ3_XXS) == 98);

struct BlockIQ3_S {
  f16_bits d;
  uint8_t qs[kQK_K / 4];     // the low 8 bits of the 64 kIQ3SGrid indices
  uint8_t qh[kQK_K / 32];    // bit r of qh[s]: the ninth bit of sub-block s's index r
  uint8_t signs[kQK_K / 8];  // one bit a weight
  uint8_t
      scales[kQK_K / 64];  // sub-blocks 2t (low nibble) and 2t + 1: weight = d · (2·scale + 1) · coordinate
};
static_assert(sizeof(BlockIQ3_S) == 110);

struct BlockIQ1_S {
  f16_bits d;
  uint8_t qs[kQK_K / 8];  // the low 8 bits of the 32 kIQ1SGrid indices
  // Sub-block s: bits 3r .. 3r + 2 the high bits of run r's index, bits 12-14 the scale, bit 15 the sign of
  // the shift: weight = d · (2·scale + 1) · (coordinate ± 1/8).
  uint16_t qh[kQK_K / 32];
};
static_assert(sizeof(BlockIQ1_S) == 50);

struct BlockIQ1_M {
  uint8_t qs[kQK_K / 8];  // the low 8 bits of the 32 kIQ1SGrid indices
  // Run r's high index bits (3) and shift sign (the fourth): the low nibble of qh[r / 2] for even r, the high
  // for odd r.
  uint8_t qh[kQK_K / 16];
  // Four uint16: the 3-bit scales of the 16 half sub-blocks (12 bits a word), and in their top nibbles the
  // fp16 super-block scale d, 4 bits a word (iq1_m_scale).
  uint8_t scales[kQK_K / 32];
};
static_assert(sizeof(BlockIQ1_M) == 56);

// Ternary (BitNet-style) weights: weight = d · (t − 1), t in 0..2.
struct BlockTQ1_0 {
  // Five ternary digits a byte, stored as ceil(value · 256 / 243): digit l of byte b is (b · 3^l · 3) >> 8
  // on 8 bits. Bytes 0..31 hold elements 32l + m, bytes 32..47 elements 160 + 16l + m.
  uint8_t qs[(kQK_K - 4 * kQK_K / 64) / 5];
  uint8_t qh[kQK_K / 64];  // four digits a byte: elements 240 + 4l + j
  f16_bits d;
};
static_assert(sizeof(BlockTQ1_0) == 54);

struct BlockTQ2_0 {
  uint8_t qs[kQK_K / 4];  // element 128h + 32l + m: bits 2l, 2l + 1 of qs[32h + m]
  f16_bits d;
};
static_assert(sizeof(BlockTQ2_0) == 66);

// MXFP4 (OCP microscaling): 32 FP4 (E2M1) values with a power-of-two scale; Q8_0 activations.
struct BlockMXFP4 {
  uint8_t e;       // E8M0 exponent: the values below times 2^(e − 128)
  uint8_t qs[16];  // element j in the low nibble of qs[j], j + 16 in the high (Q4_0's order)
};
static_assert(sizeof(BlockMXFP4) == 17);

// E2M1 values doubled (llama.cpp's kvalues_mxfp4), indexed by the nibble.
inline constexpr int8_t kMXFP4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// The 8 sign bits of a run from its 7 stored ones: the eighth makes their count even (ggml's ksigns_iq2xs).
static constexpr uint8_t iq2_sign_byte(uint32_t seven_bits) {
  const uint32_t s = seven_bits & 0x7F;
  return static_cast<uint8_t>(s | (static_cast<uint32_t>(__builtin_popcount(s) & 1) << 7));
}

// IQ1_M's fp16 super-block scale, gathered from the top nibbles of its four scale words.
static constexpr f16_bits iq1_m_scale(const BlockIQ1_M& block) {
  f16_bits bits = 0;
  for (int w = 0; w < 4; ++w) {
    const uint16_t word = static_cast<uint16_t>(block.scales[2 * w] | block.scales[2 * w + 1] << 8);
    bits = static_cast<f16_bits>(bits | (word >> 12) << (4 * w));
  }
  return bits;
}

// One ternary digit (0..2) of a TQ1_0 byte: digit l of b as ggml's (uint8_t(b · 3^l) · 3) >> 8.
static constexpr int tq1_digit(uint8_t b, int l) {
  constexpr uint8_t kPow3[5] = {1, 3, 9, 27, 81};
  const auto shifted = static_cast<uint8_t>(b * kPow3[l]);
  return (shifted * 3) >> 8;
}

// Q8_0 plus the block's sum: llama.cpp's activation blocks for Q4_1 and Q5_1 weights, whose minimum m
// multiplies the activations' sum (Σ (d·q + m)·x = d·Σ q·x + m·Σx).
struct BlockQ8_1 {
  f16_bits d;
  f16_bits s;  // d · Σ qs, with d before its rounding to fp16 (llama.cpp's quantize_row_q8_1_ref)
  int8_t qs[32];
};
static_assert(sizeof(BlockQ8_1) == 36);

struct BlockQ8_K {
  float d;
  int8_t qs[kQK_K];
  int16_t bsums[kQK_K / 16];  // sums of groups of 16 quants (for the K-quant mins)
};
static_assert(sizeof(BlockQ8_K) == 292);

// IEEE half and bfloat16 conversions (round to nearest even).
float fp16_to_fp32(f16_bits h);
f16_bits fp32_to_fp16(float f);
inline float bf16_to_fp32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
uint16_t fp32_to_bf16(float f);

}  // namespace nibble::kernels
