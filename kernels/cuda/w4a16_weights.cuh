#pragma once
// Device-side readers of the W4A16 weight layouts, shared by the decode GEMV (w4a16_gemv) and the
// prefill GEMM (w4a16_gemm). Each reader's load(row, nb, b, wv) dequantizes the 32 weights of unit b
// (inputs 32b .. 32b + 31) of weight row `row`, whose rows hold nb = k / 32 units, into fp32
// registers in input order. The kernels only see this interface, so a layout's arithmetic is the
// same in both, and a new layout is one struct.
//
// The readers are __host__ __device__: on the host, load_ro is a plain load and the rounded products
// are plain float arithmetic (the host build has no FMA contraction), so the CPU test
// test_w4a16_weight_readers checks each reader's indexing and arithmetic against
// kernels::dequantize_row without a GPU.
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/iq_grids.hpp"
#include "kernels/q6_k_planes.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels::cuda::w4a16 {

// #pragma unroll for device code only (the host compiler warns about the pragma).
#if defined(__CUDA_ARCH__)
#define NIBBLE_DEVICE_UNROLL _Pragma("unroll")
#else
#define NIBBLE_DEVICE_UNROLL
#endif

// A read-only load: through the read-only data cache on the device.
template <typename T>
__host__ __device__ inline T load_ro(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// a * b and a - b rounded once each: never fused into an FMA, so the device rounds as the CPU does.
__host__ __device__ inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__host__ __device__ inline float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// The float whose bits these are.
__host__ __device__ inline float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}
// 2^23 + v for 0 <= v < 2^23, exactly, without an integer-to-float conversion: v in the low mantissa
// bits of 2^23's pattern. The readers below subtract 2^23 + bias from it (exact: both are integers
// below 2^24) to get float(level - bias). An int-to-float conversion runs 16 a clock on an SM
// (sm_80 / sm_90), an fp32 add 128: with one conversion per weight the conversions alone would cap
// the CUDA-core GEMV near 2 TB/s of 4-bit weights on an H200, which is where it measured (~1.6).
__host__ __device__ inline float two23_plus(uint32_t v) { return bits_float(0x4B000000u | v); }
constexpr float kTwo23 = 8388608.0f;
// 2^23 + (byte t of `word`) as a float: one byte permute on the device (the byte under 0x4B's exponent
// and two zero bytes), the same bits by shifts on the host.
__host__ __device__ inline float two23_plus_byte(uint32_t word, int t) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7650u | static_cast<unsigned>(t)));
#else
  return bits_float(0x4B000000u | ((word >> (8 * t)) & 0xFFu));
#endif
}

// Where a row's Q4_0 blocks are: GGUF's 18-byte blocks (read as nine 2-byte words, the only
// alignment they have), or the split layout of kernels/q4_0_split.hpp (one 16-byte load of nibbles,
// the scale from its own array). Both give the 32 dequantized weights of block b in element order.
struct GgufQ4_0Blocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const auto* blk =
        reinterpret_cast<const uint16_t*>(w + (row * nb + b) * static_cast<int64_t>(sizeof(BlockQ4_0)));
    const float d = __half2float(__ushort_as_half(load_ro(blk)));
    NIBBLE_DEVICE_UNROLL
    for (int j = 0; j < kQK4_0 / 4; ++j) {
      const unsigned q2 = load_ro(blk + 1 + j);  // qs[2j] in the low byte, qs[2j+1] in the high byte
      // d * float(q - 8), with q - 8 formed as (2^23 + q) - (2^23 + 8) (exact, see two23_plus).
      wv[2 * j] = d * (two23_plus(q2 & 0xF) - (kTwo23 + 8.0f));
      wv[2 * j + 1] = d * (two23_plus((q2 >> 8) & 0xF) - (kTwo23 + 8.0f));
      wv[2 * j + 16] = d * (two23_plus((q2 >> 4) & 0xF) - (kTwo23 + 8.0f));
      wv[2 * j + 17] = d * (two23_plus((q2 >> 12) & 0xF) - (kTwo23 + 8.0f));
    }
  }
};

struct SplitQ4_0Blocks {
  const uint8_t* quants;
  const __half* scales;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const uint4 q = load_ro(reinterpret_cast<const uint4*>(quants) + row * nb + b);
    const float d = __half2float(load_ro(scales + row * nb + b));
    const unsigned words[4] = {q.x, q.y, q.z, q.w};  // qs[4i..4i+3], little-endian
    NIBBLE_DEVICE_UNROLL
    for (int i = 0; i < 4; ++i) {
      // Four low and four high nibbles a word with two masks, then one byte permute a weight.
      const uint32_t lo = words[i] & 0x0F0F0F0Fu, hi = (words[i] >> 4) & 0x0F0F0F0Fu;
      NIBBLE_DEVICE_UNROLL
      for (int t = 0; t < 4; ++t) {
        wv[4 * i + t] = d * (two23_plus_byte(lo, t) - (kTwo23 + 8.0f));
        wv[4 * i + t + 16] = d * (two23_plus_byte(hi, t) - (kTwo23 + 8.0f));
      }
    }
  }
};

// Group-wise INT4 (kernels/int4_groups.hpp): the split layout's nibbles with one fp16 scale and one
// zero per group of 32 << group_shift inputs. At group 32 with zeros of 8 its weights are the split
// layout's, computed the same way (d * float(q - z)), so the results are bit-identical.
struct Int4GroupBlocks {
  const uint8_t* quants;
  const __half* scales;
  const uint8_t* zeros;
  int group_shift;  // log2(group / 32)
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const uint4 q = load_ro(reinterpret_cast<const uint4*>(quants) + row * nb + b);
    const int64_t g = (row * nb + b) >> group_shift;  // rows are whole groups
    const float d = __half2float(load_ro(scales + g));
    const float biased_zero = two23_plus(load_ro(zeros + g));  // 2^23 + z
    const unsigned words[4] = {q.x, q.y, q.z, q.w};
    NIBBLE_DEVICE_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = words[i] & 0x0F0F0F0Fu, hi = (words[i] >> 4) & 0x0F0F0F0Fu;  // as above
      NIBBLE_DEVICE_UNROLL
      for (int t = 0; t < 4; ++t) {
        // d * float(q - z), q - z formed exactly as (2^23 + q) - (2^23 + z).
        wv[4 * i + t] = d * (two23_plus_byte(lo, t) - biased_zero);
        wv[4 * i + t + 16] = d * (two23_plus_byte(hi, t) - biased_zero);
      }
    }
  }
};

// sum over the 32 inputs of one group-wise INT4 unit (the split nibble order: byte j holds input j in
// its low nibble and input j + 16 in its high one) of x[i] * (q[i] - z), the levels' dot product
// with the scale left out: the staged GEMV multiplies it by the group's scale once per unit instead
// of once per weight. q - z is exact ((2^23 + q) - (2^23 + z)), and so is each product (an fp16 value
// times an integer of at most 4 bits); the sum is fp32 FMAs in the order 0..3, 16..19, 4..7, 20..23,
// ... Per weight that is a byte permute, an add and an FMA; the dequantizing readers above with the
// GEMV's fp16 activations take about six (extract, bias, subtract, scale, convert x, FMA), and at an
// H200's issue rate that alone caps the CUDA-core GEMV near the ~1.8 TB/s it measured.
// q: the unit's 16 bytes; neg_biased_zero: -(2^23 + z); x: the unit's 32 activations in fp32,
// 16-byte aligned (shared memory in the kernel).
__host__ __device__ inline float int4_unit_level_dot(const uint4& q, float neg_biased_zero, const float* x) {
  const unsigned words[4] = {q.x, q.y, q.z, q.w};
  const auto* x4 = reinterpret_cast<const float4*>(x);
  float s = 0.0f;
  NIBBLE_DEVICE_UNROLL
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = words[i] & 0x0F0F0F0Fu;         // inputs 4i .. 4i + 3
    const uint32_t hi = (words[i] >> 4) & 0x0F0F0F0Fu;  // inputs 16 + 4i .. 16 + 4i + 3
    const float4 xl = x4[i];
    const float4 xh = x4[4 + i];
    s = fmaf(xl.x, two23_plus_byte(lo, 0) + neg_biased_zero, s);
    s = fmaf(xl.y, two23_plus_byte(lo, 1) + neg_biased_zero, s);
    s = fmaf(xl.z, two23_plus_byte(lo, 2) + neg_biased_zero, s);
    s = fmaf(xl.w, two23_plus_byte(lo, 3) + neg_biased_zero, s);
    s = fmaf(xh.x, two23_plus_byte(hi, 0) + neg_biased_zero, s);
    s = fmaf(xh.y, two23_plus_byte(hi, 1) + neg_biased_zero, s);
    s = fmaf(xh.z, two23_plus_byte(hi, 2) + neg_biased_zero, s);
    s = fmaf(xh.w, two23_plus_byte(hi, 3) + neg_biased_zero, s);
  }
  return s;
}

// The group-wise INT4 reader for the launchers' arguments (all device pointers, see
// w4a16_gemv_int4_groups): false for a null or misaligned array (quants 16-byte, scales 2-byte) or
// a group other than 32, 64 or 128 that divides k.
inline bool make_int4_group_blocks(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                   int64_t group, int64_t k, Int4GroupBlocks& out) {
  if (quants == nullptr || scales == nullptr || zeros == nullptr ||
      reinterpret_cast<uintptr_t>(quants) % 16 != 0 || reinterpret_cast<uintptr_t>(scales) % 2 != 0) {
    return false;
  }
  if ((group != 32 && group != 64 && group != 128) || k % group != 0) return false;
  out = Int4GroupBlocks{quants, scales, zeros, group == 32 ? 0 : group == 64 ? 1 : 2};
  return true;
}
// The same for the tensor-core launchers, which also take x (16-byte aligned for cp.async) and y here.
inline bool make_int4_group_operands(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                     int64_t group, int64_t k, const __half* x, const float* y,
                                     Int4GroupBlocks& out) {
  return make_int4_group_blocks(quants, scales, zeros, group, k, out) && x != nullptr && y != nullptr &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

// Sub-block j's scale d * scale and min dmin * min (both exact in fp32: 11 x 6 bits) from a Q4_K
// super-block's 16-byte header as four little-endian words (d | dmin << 16, then the 12 bytes of
// 6-bit scales and mins), unpacked as kernels/quant_internal.hpp's q4_k_scale_min does.
__host__ __device__ inline void q4_k_scale_min(uint4 head, int j, float& ds, float& dm) {
  const float d = __half2float(__ushort_as_half(static_cast<unsigned short>(head.x & 0xFFFF)));
  const float dmin = __half2float(__ushort_as_half(static_cast<unsigned short>(head.x >> 16)));
  // BlockQ4_K::scales[i] (header bytes 4..15), from the words: no local array to index at run time.
  const auto sc = [&head](int i) -> int {
    const unsigned word = i < 4 ? head.y : i < 8 ? head.z : head.w;
    return static_cast<int>((word >> (8 * (i % 4))) & 0xFF);
  };
  int scale, min;
  if (j < 4) {
    scale = sc(j) & 63;
    min = sc(j + 4) & 63;
  } else {
    scale = (sc(j + 4) & 0xF) | ((sc(j - 4) >> 6) << 4);
    min = (sc(j + 4) >> 4) | ((sc(j) >> 6) << 4);
  }
  ds = mul_rn(d, static_cast<float>(scale));
  dm = mul_rn(dmin, static_cast<float>(min));
}

// GGUF Q4_K super-blocks as stored (144 bytes per 256 weights, so 16-byte aligned when the matrix
// is): 32-weight unit b is sub-block b % 8 of super-block b / 8. Its 16-byte header (d, dmin, 12
// bytes of 6-bit scales and mins) is one load; its 32 levels are the low (even sub-block) or high
// (odd) nibbles of the 32 qs bytes it shares with its neighbour, which reads the same two 16-byte
// loads (an L1 hit: each byte still comes from memory once). The value is
// (d * scale) * q - dmin * min, rounded as the CPU's dequantize_row rounds it (no FMA contraction).
struct Q4KBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const int64_t super_blocks = nb / (kQK_K / kQK4_0);
    const uint8_t* blk =
        w + (row * super_blocks + b / (kQK_K / kQK4_0)) * static_cast<int64_t>(sizeof(BlockQ4_K));
    const int j = static_cast<int>(b % (kQK_K / kQK4_0));
    const uint4 head = load_ro(reinterpret_cast<const uint4*>(blk));
    float ds, dm;
    q4_k_scale_min(head, j, ds, dm);
    const auto* qs = reinterpret_cast<const uint4*>(blk + 16 + 32 * (j / 2));
    const uint4 q0 = load_ro(qs);
    const uint4 q1 = load_ro(qs + 1);
    const unsigned words[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
    const int shift = 4 * (j % 2);
    NIBBLE_DEVICE_UNROLL
    for (int i = 0; i < 8; ++i) {
      const uint32_t levels = (words[i] >> shift) & 0x0F0F0F0Fu;  // four levels, one a byte
      NIBBLE_DEVICE_UNROLL
      for (int t = 0; t < 4; ++t) {
        // float(level), exactly: 2^23 + level by one byte permute, less 2^23.
        wv[4 * i + t] = sub_rn(mul_rn(ds, two23_plus_byte(levels, t) - kTwo23), dm);
      }
    }
  }
};

// GGUF Q8_0 blocks as stored (34 bytes per 32 weights: 2-byte aligned): unit b is block b, d then 32
// int8 levels; weight d * level, exact in fp32 (an 11-bit d times an 8-bit level), as
// kernels::dequantize_row computes it. 16-bit loads.
struct Q8_0Blocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const auto* blk =
        reinterpret_cast<const uint16_t*>(w + (row * nb + b) * static_cast<int64_t>(sizeof(BlockQ8_0)));
    const float d = __half2float(__ushort_as_half(load_ro(blk)));
    NIBBLE_DEVICE_UNROLL
    for (int i = 0; i < kQK8_0 / 2; ++i) {
      const unsigned pair = load_ro(blk + 1 + i);  // qs[2i] in the low byte, qs[2i + 1] in the high byte
      wv[2 * i] = mul_rn(d, static_cast<float>(static_cast<int8_t>(pair & 0xFF)));
      wv[2 * i + 1] = mul_rn(d, static_cast<float>(static_cast<int8_t>(pair >> 8)));
    }
  }
};

// The other GGUF types, read as stored, so that a file of them stays as small on the device as in the
// file (as fp16 for cuBLAS a 70B Q5_K_M or Q3_K_M file does not fit one GPU): Q4_1, Q5_0, Q5_1 and
// IQ4_NL (32-weight blocks), Q2_K, Q3_K, Q5_K and IQ4_XS (256-weight super-blocks; 32-weight unit b is
// run b % 8 of super-block b / 8). Each weight is kernels::dequantize_row's value bit for bit: every
// product below is exact in fp32 (an 11-bit fp16 mantissa times at most 13 bits of scale and level), so
// only the one addition or subtraction of the *_1 and K-quant mins rounds, once, as the CPU's does. Loads
// are as wide as the block size allows (Q3_K, Q5_0 and IQ4_NL blocks are only 2-byte aligned).

__host__ __device__ inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
__host__ __device__ inline float half_bits_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xFFFF)));
}
// Byte t of `word` (0..255) as a float, exactly (see two23_plus).
__host__ __device__ inline float byte_level(uint32_t word, int t) {
  return two23_plus_byte(word, t) - kTwo23;
}
// Two 2-byte loads as one little-endian word (for blocks only 2-byte aligned).
__host__ __device__ inline uint32_t load_word16(const uint16_t* p) {
  return static_cast<uint32_t>(load_ro(p)) | static_cast<uint32_t>(load_ro(p + 1)) << 16;
}
// Bits s .. s + 3 of qh moved to bit 4 of bytes 0 .. 3: the fifth bits of four consecutive weights of a
// Q5_0 / Q5_1 block, to OR into their nibbles.
__host__ __device__ inline uint32_t q5_fifth_bits(uint32_t qh, int s) {
  const uint32_t bits = (qh >> s) & 0xF;
  return ((bits & 1u) << 4) | ((bits & 2u) << 11) | ((bits & 4u) << 18) | ((bits & 8u) << 25);
}

// A 16-entry table of small integers (kIQ4Values, kMXFP4Values) + 128 as bytes, index i in byte i % 4 of
// word i / 4.
constexpr uint32_t biased_table_word(const int8_t (&values)[16], int w) {
  uint32_t word = 0;
  for (int t = 0; t < 4; ++t) word |= static_cast<uint32_t>(values[4 * w + t] + 128) << (8 * t);
  return word;
}
// values[index] (index 0..15) of the table whose words these are, as a float, exactly: one byte permute of
// the words on the device (no table in memory), the same bytes by shifts on the host.
__host__ __device__ inline float biased_table_value(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3,
                                                    uint32_t index) {
#if defined(__CUDA_ARCH__)
  const uint32_t byte = index < 8 ? __byte_perm(w0, w1, index) : __byte_perm(w2, w3, index - 8);
#else
  const uint32_t words[4] = {w0, w1, w2, w3};
  const uint32_t byte = words[index / 4] >> (8 * (index % 4));
#endif
  return two23_plus(byte & 0xFF) - (kTwo23 + 128.0f);
}
constexpr uint32_t kIQ4Biased0 = biased_table_word(kIQ4Values, 0),
                   kIQ4Biased1 = biased_table_word(kIQ4Values, 1),
                   kIQ4Biased2 = biased_table_word(kIQ4Values, 2),
                   kIQ4Biased3 = biased_table_word(kIQ4Values, 3);
// kIQ4Values[index] as a float.
__host__ __device__ inline float iq4_value(uint32_t index) {
  return biased_table_value(kIQ4Biased0, kIQ4Biased1, kIQ4Biased2, kIQ4Biased3, index);
}

// Q4_1: d, m, then Q4_0's nibble order; weight d * level + m. 20-byte blocks: 4-byte loads.
struct Q4_1Blocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const auto* blk =
        reinterpret_cast<const uint32_t*>(w + (row * nb + b) * static_cast<int64_t>(sizeof(BlockQ4_1)));
    const uint32_t dm = load_ro(blk);
    const float d = half_bits_float(dm), m = half_bits_float(dm >> 16);
    NIBBLE_DEVICE_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint32_t word = load_ro(blk + 1 + i);
      const uint32_t lo = word & 0x0F0F0F0Fu, hi = (word >> 4) & 0x0F0F0F0Fu;
      NIBBLE_DEVICE_UNROLL
      for (int t = 0; t < 4; ++t) {
        wv[4 * i + t] = add_rn(mul_rn(d, byte_level(lo, t)), m);
        wv[4 * i + t + 16] = add_rn(mul_rn(d, byte_level(hi, t)), m);
      }
    }
  }
};

// Q5_0: d, the fifth bits, Q4_0's nibble order; weight d * (level - 16). 22-byte blocks: 2-byte loads.
struct Q5_0Blocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const auto* blk =
        reinterpret_cast<const uint16_t*>(w + (row * nb + b) * static_cast<int64_t>(sizeof(BlockQ5_0)));
    const float d = half_bits_float(load_ro(blk));
    const uint32_t qh = load_word16(blk + 1);
    NIBBLE_DEVICE_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint32_t word = load_word16(blk + 3 + 2 * i);
      const uint32_t lo = (word & 0x0F0F0F0Fu) | q5_fifth_bits(qh, 4 * i);
      const uint32_t hi = ((word >> 4) & 0x0F0F0F0Fu) | q5_fifth_bits(qh, 16 + 4 * i);
      NIBBLE_DEVICE_UNROLL
      for (int t = 0; t < 4; ++t) {
        wv[4 * i + t] = mul_rn(d, two23_plus_byte(lo, t) - (kTwo23 + 16.0f));
        wv[4 * i + t + 16] = mul_rn(d, two23_plus_byte(hi, t) - (kTwo23 + 16.0f));
      }
    }
  }
};

// Q5_1: d, m, the fifth bits, Q4_0's nibble order; weight d * level + m. 24-byte blocks: 8-byte loads.
struct Q5_1Blocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const auto* blk =
        reinterpret_cast<const uint2*>(w + (row * nb + b) * static_cast<int64_t>(sizeof(BlockQ5_1)));
    const uint2 head = load_ro(blk), q01 = load_ro(blk + 1), q23 = load_ro(blk + 2);
    const float d = half_bits_float(head.x), m = half_bits_float(head.x >> 16);
    const uint32_t words[4] = {q01.x, q01.y, q23.x, q23.y};
    NIBBLE_DEVICE_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = (words[i] & 0x0F0F0F0Fu) | q5_fifth_bits(head.y, 4 * i);
      const uint32_t hi = ((words[i] >> 4) & 0x0F0F0F0Fu) | q5_fifth_bits(head.y, 16 + 4 * i);
      NIBBLE_DEVICE_UNROLL
      for (int t = 0; t < 4; ++t) {
        wv[4 * i + t] = add_rn(mul_rn(d, byte_level(lo, t)), m);
        wv[4 * i + t + 16] = add_rn(mul_rn(d, byte_level(hi, t)), m);
      }
    }
  }
};

// IQ4_NL: Q4_0's layout, the nibbles indexing kIQ4Values; weight d * value. 18-byte blocks: 2-byte loads.
struct IQ4NLBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const auto* blk =
        reinterpret_cast<const uint16_t*>(w + (row * nb + b) * static_cast<int64_t>(sizeof(BlockIQ4_NL)));
    const float d = half_bits_float(load_ro(blk));
    NIBBLE_DEVICE_UNROLL
    for (int j = 0; j < kQK4_0 / 4; ++j) {
      const unsigned q2 = load_ro(blk + 1 + j);  // qs[2j] in the low byte, qs[2j+1] in the high byte
      wv[2 * j] = mul_rn(d, iq4_value(q2 & 0xF));
      wv[2 * j + 1] = mul_rn(d, iq4_value((q2 >> 8) & 0xF));
      wv[2 * j + 16] = mul_rn(d, iq4_value((q2 >> 4) & 0xF));
      wv[2 * j + 17] = mul_rn(d, iq4_value((q2 >> 12) & 0xF));
    }
  }
};

// IQ4_XS: d, the scales' high and low bits, then per 32-weight sub-block s 16 bytes of indices (weight j
// in the low nibble of byte j, j + 16 in the high); weight (d * scale) * value. 136-byte super-blocks:
// 8-byte loads.
struct IQ4XSBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const int64_t super_blocks = nb / (kQK_K / kQK4_0);
    const uint8_t* blk =
        w + (row * super_blocks + b / (kQK_K / kQK4_0)) * static_cast<int64_t>(sizeof(BlockIQ4_XS));
    const int s = static_cast<int>(b % (kQK_K / kQK4_0));
    const uint2 head = load_ro(reinterpret_cast<const uint2*>(blk));  // d | scales_h << 16, scales_l
    const auto low = static_cast<int>((head.y >> (4 * s)) & 0xF);     // byte s / 2, nibble s % 2
    const auto high = static_cast<int>((head.x >> (16 + 2 * s)) & 3);
    const float dl = mul_rn(half_bits_float(head.x), static_cast<float>((low | (high << 4)) - 32));
    const auto* qs = reinterpret_cast<const uint2*>(blk + 8 + 16 * s);
    const uint2 q0 = load_ro(qs), q1 = load_ro(qs + 1);
    const uint32_t words[4] = {q0.x, q0.y, q1.x, q1.y};
    NIBBLE_DEVICE_UNROLL
    for (int i = 0; i < 4; ++i) {
      NIBBLE_DEVICE_UNROLL
      for (int t = 0; t < 4; ++t) {
        const uint32_t byte = words[i] >> (8 * t);
        wv[4 * i + t] = mul_rn(dl, iq4_value(byte & 0xF));
        wv[4 * i + t + 16] = mul_rn(dl, iq4_value((byte >> 4) & 0xF));
      }
    }
  }
};

// Q5_K: Q4_K's 16-byte header (so q4_k_scale_min), then qh (bit j of byte l: the fifth bit of weight l of
// sub-block j), then Q4_K's qs; weight (d * scale) * level - dmin * min. 176-byte super-blocks: 16-byte
// loads.
struct Q5KBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const int64_t super_blocks = nb / (kQK_K / kQK4_0);
    const uint8_t* blk =
        w + (row * super_blocks + b / (kQK_K / kQK4_0)) * static_cast<int64_t>(sizeof(BlockQ5_K));
    const int j = static_cast<int>(b % (kQK_K / kQK4_0));
    const auto* v = reinterpret_cast<const uint4*>(blk);
    const uint4 head = load_ro(v);
    float ds, dm;
    q4_k_scale_min(head, j, ds, dm);
    const uint4 h0 = load_ro(v + 1), h1 = load_ro(v + 2);
    const uint4 q0 = load_ro(v + 3 + 2 * (j / 2)), q1 = load_ro(v + 4 + 2 * (j / 2));
    const unsigned qh[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
    const unsigned qs[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
    const int shift = 4 * (j % 2);
    NIBBLE_DEVICE_UNROLL
    for (int i = 0; i < 8; ++i) {
      const uint32_t levels = ((qs[i] >> shift) & 0x0F0F0F0Fu) | (((qh[i] >> j) & 0x01010101u) << 4);
      NIBBLE_DEVICE_UNROLL
      for (int t = 0; t < 4; ++t) wv[4 * i + t] = sub_rn(mul_rn(ds, byte_level(levels, t)), dm);
    }
  }
};

// Q2_K: 16 bytes of 4-bit scales and mins (sub-block g: scales[g]), 64 bytes of 2-bit levels (weight
// 32h + l of run r = 4h + jj in bits 2jj, 2jj + 1 of qs[32h + l]), d, dmin; weight
// (d * sc) * level - dmin * m. 84-byte super-blocks: 4-byte loads.
struct Q2KBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const int64_t super_blocks = nb / (kQK_K / kQK4_0);
    const auto* blk = reinterpret_cast<const uint32_t*>(w + (row * super_blocks + b / (kQK_K / kQK4_0)) *
                                                                static_cast<int64_t>(sizeof(BlockQ2_K)));
    const int r = static_cast<int>(b % (kQK_K / kQK4_0)), h = r / 4, jj = r % 4;
    const uint32_t scales = load_ro(blk + r / 2) >> (16 * (r % 2));  // sub-blocks 2r, 2r + 1: bytes 0, 1
    const uint32_t d_dmin = load_ro(blk + 20);
    const float d = half_bits_float(d_dmin), dmin = half_bits_float(d_dmin >> 16);
    float dsc[2], dm[2];
    NIBBLE_DEVICE_UNROLL
    for (int g = 0; g < 2; ++g) {
      const uint32_t sc = (scales >> (8 * g)) & 0xFF;
      dsc[g] = mul_rn(d, two23_plus(sc & 0xF) - kTwo23);
      dm[g] = mul_rn(dmin, two23_plus(sc >> 4) - kTwo23);
    }
    NIBBLE_DEVICE_UNROLL
    for (int i = 0; i < 8; ++i) {
      const uint32_t levels = (load_ro(blk + 4 + 8 * h + i) >> (2 * jj)) & 0x03030303u;
      NIBBLE_DEVICE_UNROLL
      for (int t = 0; t < 4; ++t)
        wv[4 * i + t] = sub_rn(mul_rn(dsc[i / 4], byte_level(levels, t)), dm[i / 4]);
    }
  }
};

// Q3_K: hmask (weight 32r + l's third bit: bit r of hmask[l]), Q2_K's 2-bit levels, 12 bytes of 6-bit
// scales (kernels::q3_k_scale), d; weight (d * scale) * (level - 4). 110-byte super-blocks: 2-byte loads.
struct Q3KBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const int64_t super_blocks = nb / (kQK_K / kQK4_0);
    const auto* blk = reinterpret_cast<const uint16_t*>(w + (row * super_blocks + b / (kQK_K / kQK4_0)) *
                                                                static_cast<int64_t>(sizeof(BlockQ3_K)));
    const int r = static_cast<int>(b % (kQK_K / kQK4_0)), h = r / 4, jj = r % 4;
    const float d = half_bits_float(load_ro(blk + 54));
    const uint32_t s0 = load_word16(blk + 48), s1 = load_word16(blk + 50), s2 = load_word16(blk + 52);
    // scales[i] from the words: no local array indexed at run time.
    const auto sc = [&](int i) -> uint32_t {
      return ((i < 4 ? s0 : i < 8 ? s1 : s2) >> (8 * (i % 4))) & 0xFF;
    };
    float ds[2];
    NIBBLE_DEVICE_UNROLL
    for (int e = 0; e < 2; ++e) {
      const int g = 2 * r + e;
      const uint32_t low = (sc(g % 8) >> (4 * (g / 8))) & 0xF, high = (sc(8 + g % 4) >> (2 * (g / 4))) & 3;
      ds[e] = mul_rn(d, two23_plus(low | (high << 4)) - (kTwo23 + 32.0f));
    }
    NIBBLE_DEVICE_UNROLL
    for (int i = 0; i < 8; ++i) {
      const uint32_t low = (load_word16(blk + 16 + 16 * h + 2 * i) >> (2 * jj)) & 0x03030303u;
      const uint32_t third = (load_word16(blk + 2 * i) >> r) & 0x01010101u;
      const uint32_t levels = low | (third << 2);
      NIBBLE_DEVICE_UNROLL
      for (int t = 0; t < 4; ++t)
        wv[4 * i + t] = mul_rn(ds[i / 4], two23_plus_byte(levels, t) - (kTwo23 + 4.0f));
    }
  }
};

// The types Nibble reads but does not write (kernels/read_only_quants.hpp), read as stored, so that a file
// of them keeps its size on the device (as fp16 a 70B IQ2_XS file of ~20 GB took ~140 GB): llama.cpp's
// i-quants IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M (runs of 8 or 4 weights as points of
// kernels/iq_grids.hpp's lattices, signs apart for IQ2 / IQ3), the ternary TQ1_0 / TQ2_0 (256-weight
// super-blocks: unit b is sub-block b % 8 of super-block b / 8) and MXFP4 (17-byte blocks of 32, so byte
// loads). Each weight is kernels::dequantize_row's value bit for bit: the CPU's (d · scale) · constant
// (kernels/read_only_quants_impl.hpp's dot_constant) times the integer coordinate, every product exact in
// fp32 (d's 11 bits, a 5-bit odd scale, a power of two, a coordinate of at most 62), in the CPU's order.
// The lattices are global-memory arrays on the device (as in llama.cpp's CUDA kernels), the host's
// kernels::kIQ*Grid in the host build.
#if defined(__CUDACC__)
namespace device_iq_grids {
#define NIBBLE_IQ_GRID(type, name, count) [[maybe_unused]] static __device__ const type name[count] =
#include "kernels/iq_grids.inc"
#undef NIBBLE_IQ_GRID
}  // namespace device_iq_grids
#endif
#if defined(__CUDA_ARCH__)
#define NIBBLE_IQ_GRID_TABLE(name) device_iq_grids::name
#else
#define NIBBLE_IQ_GRID_TABLE(name) ::nibble::kernels::name
#endif
__host__ __device__ inline uint64_t iq2xxs_grid(uint32_t i) {
  return load_ro(NIBBLE_IQ_GRID_TABLE(kIQ2XXSGrid) + i);
}
__host__ __device__ inline uint64_t iq2xs_grid(uint32_t i) {
  return load_ro(NIBBLE_IQ_GRID_TABLE(kIQ2XSGrid) + i);
}
__host__ __device__ inline uint64_t iq2s_grid(uint32_t i) {
  return load_ro(NIBBLE_IQ_GRID_TABLE(kIQ2SGrid) + i);
}
__host__ __device__ inline uint32_t iq3xxs_grid(uint32_t i) {
  return load_ro(NIBBLE_IQ_GRID_TABLE(kIQ3XXSGrid) + i);
}
__host__ __device__ inline uint32_t iq3s_grid(uint32_t i) {
  return load_ro(NIBBLE_IQ_GRID_TABLE(kIQ3SGrid) + i);
}
__host__ __device__ inline uint64_t iq1s_grid(uint32_t i) {
  return load_ro(NIBBLE_IQ_GRID_TABLE(kIQ1SGrid) + i);
}
#undef NIBBLE_IQ_GRID_TABLE

__host__ __device__ inline uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
#endif
}
// The 8 sign bits of a run from its 7 stored ones, the eighth their parity (kernels::iq2_sign_byte).
__host__ __device__ inline uint32_t seven_bit_signs(uint32_t bits) {
  const uint32_t s = bits & 0x7F;
#if defined(__CUDA_ARCH__)
  return s | (static_cast<uint32_t>(__popc(s)) & 1u) << 7;
#else
  return s | (static_cast<uint32_t>(__builtin_popcount(s)) & 1u) << 7;
#endif
}
// Byte t of `word` as a signed 8-bit integer, as a float (exact: the byte + 128 below 2^23's pattern).
__host__ __device__ inline float signed_byte_level(uint32_t word, int t) {
  return two23_plus_byte(word ^ 0x80808080u, t) - (kTwo23 + 128.0f);
}
// out[j] = factor · (byte j of the run, negated where bit j of signs is set): a run of 8 grid magnitudes,
// byte j the magnitude of weight j. Negating before the product gives the CPU's factor · float(−m) exactly.
__host__ __device__ inline void magnitude_run(uint64_t run, uint32_t signs, float factor, float* out) {
  NIBBLE_DEVICE_UNROLL
  for (int j = 0; j < 8; ++j) {
    const float m = byte_level(static_cast<uint32_t>(run >> (32 * (j / 4))), j % 4);
    out[j] = mul_rn(factor, bits_float(float_bits(m) ^ ((signs >> j) & 1u) << 31));
  }
}
// out[j] = factor · (8 · byte j of an IQ1 lattice run, −1..1 as int8, + shift): llama.cpp's
// d · (2s + 1) · (coordinate ± 1/8) as the CPU computes it, in eighths with factor's 1/8.
__host__ __device__ inline void iq1_run(uint64_t run, float shift, float factor, float* out) {
  NIBBLE_DEVICE_UNROLL
  for (int j = 0; j < 8; ++j) {
    const float c = signed_byte_level(static_cast<uint32_t>(run >> (32 * (j / 4))), j % 4);
    out[j] = mul_rn(factor, add_rn(mul_rn(c, 8.0f), shift));
  }
}
// (d · scale) · constant, the CPU's factor of a run of 16.
__host__ __device__ inline float iq_factor(float d, int scale, float constant) {
  return mul_rn(mul_rn(d, static_cast<float>(scale)), constant);
}
// Where super-block b / 8 of `row` starts, its rows nb / 8 super-blocks of BlockBytes.
template <int64_t BlockBytes>
__host__ __device__ inline const uint8_t* super_block_at(const uint8_t* w, int64_t row, int64_t nb,
                                                         int64_t b) {
  return w + (row * (nb / (kQK_K / kQK4_0)) + b / (kQK_K / kQK4_0)) * BlockBytes;
}

// IQ2_XXS: d, then per sub-block two words (2-byte loads): 4 grid indices a byte, and the 4 runs' 7-bit
// signs with the scale in the top 4 bits.
struct IQ2XXSBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const auto* q = reinterpret_cast<const uint16_t*>(super_block_at<sizeof(BlockIQ2_XXS)>(w, row, nb, b));
    const int s = static_cast<int>(b % (kQK_K / kQK4_0));
    const float d = half_bits_float(load_ro(q));
    const uint32_t indices = load_word16(q + 1 + 4 * s), signs_scale = load_word16(q + 3 + 4 * s);
    const float factor = iq_factor(d, 2 * static_cast<int>(signs_scale >> 28) + 1, 0.125f);
    NIBBLE_DEVICE_UNROLL
    for (int r = 0; r < 4; ++r)
      magnitude_run(iq2xxs_grid((indices >> (8 * r)) & 0xFF), seven_bit_signs(signs_scale >> (7 * r)), factor,
                    wv + 8 * r);
  }
};

// IQ2_XS: d, per run a 16-bit field (a 9-bit grid index, 7 sign bits), then a byte of two 4-bit scales a
// sub-block (its first 16 weights' low).
struct IQ2XSBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const uint8_t* blk = super_block_at<sizeof(BlockIQ2_XS)>(w, row, nb, b);
    const auto* q = reinterpret_cast<const uint16_t*>(blk);
    const int s = static_cast<int>(b % (kQK_K / kQK4_0));
    const float d = half_bits_float(load_ro(q));
    const uint32_t scales = load_ro(blk + offsetof(BlockIQ2_XS, scales) + s);
    const float factors[2] = {iq_factor(d, 2 * static_cast<int>(scales & 0xF) + 1, 0.125f),
                              iq_factor(d, 2 * static_cast<int>(scales >> 4) + 1, 0.125f)};
    NIBBLE_DEVICE_UNROLL
    for (int r = 0; r < 4; ++r) {
      const uint32_t field = load_ro(q + 1 + 4 * s + r);
      magnitude_run(iq2xs_grid(field & 511), seven_bit_signs(field >> 9), factors[r / 2], wv + 8 * r);
    }
  }
};

// IQ2_S: d, the grid indices' low bytes, the runs' sign bytes, their indices' high 2 bits (qh) and IQ2_XS's
// scales: byte loads.
struct IQ2SBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const uint8_t* blk = super_block_at<sizeof(BlockIQ2_S)>(w, row, nb, b);
    const int s = static_cast<int>(b % (kQK_K / kQK4_0));
    const float d = half_bits_float(load_ro(reinterpret_cast<const uint16_t*>(blk)));
    const uint32_t scales = load_ro(blk + offsetof(BlockIQ2_S, scales) + s);
    const uint32_t high = load_ro(blk + offsetof(BlockIQ2_S, qh) + s);
    const float factors[2] = {iq_factor(d, 2 * static_cast<int>(scales & 0xF) + 1, 0.125f),
                              iq_factor(d, 2 * static_cast<int>(scales >> 4) + 1, 0.125f)};
    const uint8_t* qs = blk + offsetof(BlockIQ2_S, qs);
    NIBBLE_DEVICE_UNROLL
    for (int r = 0; r < 4; ++r) {
      const uint32_t index = load_ro(qs + 4 * s + r) | ((high >> (2 * r)) & 3) << 8;
      magnitude_run(iq2s_grid(index), load_ro(qs + kQK_K / 8 + 4 * s + r), factors[r / 2], wv + 8 * r);
    }
  }
};

// IQ3_XXS: d, 64 grid indices (runs of 4), then a word a sub-block (2-byte loads): its 4 pairs of runs'
// 7-bit signs and its scale in the top 4 bits.
struct IQ3XXSBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const uint8_t* blk = super_block_at<sizeof(BlockIQ3_XXS)>(w, row, nb, b);
    const int s = static_cast<int>(b % (kQK_K / kQK4_0));
    const float d = half_bits_float(load_ro(reinterpret_cast<const uint16_t*>(blk)));
    const uint8_t* qs = blk + offsetof(BlockIQ3_XXS, qs);
    const uint32_t word = load_word16(reinterpret_cast<const uint16_t*>(qs + kQK_K / 4 + 4 * s));
    const float factor = iq_factor(d, 2 * static_cast<int>(word >> 28) + 1, 0.25f);
    NIBBLE_DEVICE_UNROLL
    for (int r = 0; r < 4; ++r) {
      const uint64_t run = iq3xxs_grid(load_ro(qs + 8 * s + 2 * r)) |
                           static_cast<uint64_t>(iq3xxs_grid(load_ro(qs + 8 * s + 2 * r + 1))) << 32;
      magnitude_run(run, seven_bit_signs(word >> (7 * r)), factor, wv + 8 * r);
    }
  }
};

// IQ3_S: d, the grid indices' low bytes, their ninth bits (qh), a sign bit a weight, a 4-bit scale a
// sub-block: byte loads.
struct IQ3SBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const uint8_t* blk = super_block_at<sizeof(BlockIQ3_S)>(w, row, nb, b);
    const int s = static_cast<int>(b % (kQK_K / kQK4_0));
    const float d = half_bits_float(load_ro(reinterpret_cast<const uint16_t*>(blk)));
    const uint32_t scale = (load_ro(blk + offsetof(BlockIQ3_S, scales) + s / 2) >> (4 * (s % 2))) & 0xF;
    const float factor = iq_factor(d, 2 * static_cast<int>(scale) + 1, 1.0f);
    const uint32_t high = load_ro(blk + offsetof(BlockIQ3_S, qh) + s);
    const uint8_t* qs = blk + offsetof(BlockIQ3_S, qs) + 8 * s;
    NIBBLE_DEVICE_UNROLL
    for (int r = 0; r < 4; ++r) {
      const uint32_t low = load_ro(qs + 2 * r) | ((high >> (2 * r)) & 1) << 8;
      const uint32_t upper = load_ro(qs + 2 * r + 1) | ((high >> (2 * r + 1)) & 1) << 8;
      const uint64_t run = iq3s_grid(low) | static_cast<uint64_t>(iq3s_grid(upper)) << 32;
      magnitude_run(run, load_ro(blk + offsetof(BlockIQ3_S, signs) + 4 * s + r), factor, wv + 8 * r);
    }
  }
};

// IQ1_S: d, the grid indices' low bytes, a 16-bit word a sub-block (2-byte loads): 3 high index bits a run,
// the 3-bit scale, the shift's sign.
struct IQ1SBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const uint8_t* blk = super_block_at<sizeof(BlockIQ1_S)>(w, row, nb, b);
    const int s = static_cast<int>(b % (kQK_K / kQK4_0));
    const float d = half_bits_float(load_ro(reinterpret_cast<const uint16_t*>(blk)));
    const uint32_t qh = load_ro(reinterpret_cast<const uint16_t*>(blk + offsetof(BlockIQ1_S, qh)) + s);
    const float factor = iq_factor(d, 2 * static_cast<int>((qh >> 12) & 7) + 1, 0.125f);
    const float shift = (qh & 0x8000) != 0 ? -1.0f : 1.0f;
    NIBBLE_DEVICE_UNROLL
    for (int r = 0; r < 4; ++r) {
      const uint32_t index = load_ro(blk + offsetof(BlockIQ1_S, qs) + 4 * s + r) | ((qh >> (3 * r)) & 7) << 8;
      iq1_run(iq1s_grid(index), shift, factor, wv + 8 * r);
    }
  }
};

// IQ1_M: the grid indices' low bytes, a nibble a run (3 high index bits, the shift's sign), then four
// 16-bit scale words (8-byte load): 3-bit scales of the half sub-blocks, d in their top nibbles.
struct IQ1MBlocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const uint8_t* blk = super_block_at<sizeof(BlockIQ1_M)>(w, row, nb, b);
    const int s = static_cast<int>(b % (kQK_K / kQK4_0));
    const uint2 words = load_ro(reinterpret_cast<const uint2*>(blk + offsetof(BlockIQ1_M, scales)));
    const uint32_t d_bits =
        (words.x >> 12 & 0xF) | (words.x >> 28) << 4 | (words.y >> 12 & 0xF) << 8 | (words.y >> 28) << 12;
    const float d = half_bits_float(d_bits);
    const uint32_t word = ((s < 4 ? words.x : words.y) >> (16 * ((s / 2) % 2))) & 0xFFFF;
    const float factors[2] = {
        iq_factor(d, 2 * static_cast<int>((word >> (6 * (s % 2))) & 7) + 1, 0.125f),
        iq_factor(d, 2 * static_cast<int>((word >> (6 * (s % 2) + 3)) & 7) + 1, 0.125f)};
    NIBBLE_DEVICE_UNROLL
    for (int r = 0; r < 4; ++r) {
      const uint32_t nibble =
          (load_ro(blk + offsetof(BlockIQ1_M, qh) + 2 * s + r / 2) >> (4 * (r % 2))) & 0xF;
      const uint32_t index = load_ro(blk + offsetof(BlockIQ1_M, qs) + 4 * s + r) | (nibble & 7) << 8;
      iq1_run(iq1s_grid(index), (nibble & 8) != 0 ? -1.0f : 1.0f, factors[r / 2], wv + 8 * r);
    }
  }
};

// One ternary digit (0..2) of a TQ1_0 byte: kernels::tq1_digit.
__host__ __device__ inline int tq1_digit_of(uint32_t byte, int l) {
  constexpr uint32_t kPow3[5] = {1, 3, 9, 27, 81};
  return static_cast<int>((((byte * kPow3[l]) & 0xFF) * 3) >> 8);
}

// TQ1_0: five ternary digits a byte (qs), four more a byte (qh), d last: sub-block s < 5 is digit s of
// qs[0 .. 31]; sub-blocks 5, 6, 7 take two digits of qs[32 .. 47] each, the last of them qh's.
struct TQ1_0Blocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const uint8_t* blk = super_block_at<sizeof(BlockTQ1_0)>(w, row, nb, b);
    const int s = static_cast<int>(b % (kQK_K / kQK4_0));
    const float d =
        half_bits_float(load_ro(reinterpret_cast<const uint16_t*>(blk + offsetof(BlockTQ1_0, d))));
    const float factor = iq_factor(d, 1, 1.0f);
    NIBBLE_DEVICE_UNROLL
    for (int m = 0; m < kQK4_0; ++m) {
      int digit;
      if (s < 5) {
        digit = tq1_digit_of(load_ro(blk + m), s);
      } else {
        const int l = 2 * (s - 5) + m / 16, mm = m % 16;
        digit = l < 5 ? tq1_digit_of(load_ro(blk + 32 + mm), l)
                      : tq1_digit_of(load_ro(blk + offsetof(BlockTQ1_0, qh) + mm % 4), mm / 4);
      }
      wv[m] = mul_rn(factor, static_cast<float>(digit - 1));
    }
  }
};

// TQ2_0: four 2-bit levels a byte (sub-block s: bits 2 (s % 4) of bytes 32 (s / 4) ..), d last.
struct TQ2_0Blocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const uint8_t* blk = super_block_at<sizeof(BlockTQ2_0)>(w, row, nb, b);
    const int s = static_cast<int>(b % (kQK_K / kQK4_0));
    const float d =
        half_bits_float(load_ro(reinterpret_cast<const uint16_t*>(blk + offsetof(BlockTQ2_0, d))));
    const float factor = iq_factor(d, 1, 1.0f);
    const auto* q = reinterpret_cast<const uint16_t*>(blk + 32 * (s / 4));
    NIBBLE_DEVICE_UNROLL
    for (int i = 0; i < 8; ++i) {
      const uint32_t levels = (load_word16(q + 2 * i) >> (2 * (s % 4))) & 0x03030303u;
      NIBBLE_DEVICE_UNROLL
      for (int t = 0; t < 4; ++t)
        wv[4 * i + t] = mul_rn(factor, two23_plus_byte(levels, t) - (kTwo23 + 1.0f));
    }
  }
};

constexpr uint32_t kMXFP4Biased0 = biased_table_word(kMXFP4Values, 0),
                   kMXFP4Biased1 = biased_table_word(kMXFP4Values, 1),
                   kMXFP4Biased2 = biased_table_word(kMXFP4Values, 2),
                   kMXFP4Biased3 = biased_table_word(kMXFP4Values, 3);
// kMXFP4Values[index] as a float.
__host__ __device__ inline float mxfp4_value(uint32_t index) {
  return biased_table_value(kMXFP4Biased0, kMXFP4Biased1, kMXFP4Biased2, kMXFP4Biased3, index);
}

// MXFP4: an E8M0 exponent, then Q4_0's nibble order (17-byte blocks: byte loads); weight value · 2^(e − 128)
// (the CPU's e8m0_half: the values are doubled E2M1).
struct MXFP4Blocks {
  const uint8_t* w;
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const uint8_t* blk = w + (row * nb + b) * static_cast<int64_t>(sizeof(BlockMXFP4));
    const uint32_t e = load_ro(blk);
    const float d = bits_float(e < 2 ? 0x00200000u << e : (e - 1) << 23);
    NIBBLE_DEVICE_UNROLL
    for (int j = 0; j < kQK4_0 / 2; ++j) {
      const uint32_t q = load_ro(blk + 1 + j);
      wv[j] = mul_rn(mxfp4_value(q & 0xF), d);
      wv[j + 16] = mul_rn(mxfp4_value(q >> 4), d);
    }
  }
};

// Whether `type` has a reader above (with_gguf_blocks takes it): w4a16_gemv.cuh's list.
constexpr bool w4a16_reads_as_stored(DType type) { return w4a16_reads_gguf_blocks(type); }
// The reader of `type`'s blocks at w, handed to f (f(reader) returns a Status); invalid_argument for
// a null w, one not aligned as the type's loads need (its block size's largest power of two, at most
// 16: MXFP4's 17-byte blocks need none), or k not a positive multiple of its block; unsupported_type for a
// type without a reader above.
template <typename F>
Status with_gguf_blocks(DType type, const uint8_t* w, int64_t k, F&& f) {
  if (!w4a16_reads_as_stored(type)) return Status::unsupported_type;
  const TypeInfo& info = type_info(type);
  const auto address = reinterpret_cast<uintptr_t>(w);
  const size_t align = info.block_bytes % 16 == 0  ? 16
                       : info.block_bytes % 8 == 0 ? 8
                       : info.block_bytes % 4 == 0 ? 4
                       : info.block_bytes % 2 == 0 ? 2
                                                   : 1;
  if (w == nullptr || address % align != 0 || k <= 0 || k % info.block_elems != 0)
    return Status::invalid_argument;
  switch (type) {
    case DType::Q4_1:
      return f(Q4_1Blocks{w});
    case DType::Q5_0:
      return f(Q5_0Blocks{w});
    case DType::Q5_1:
      return f(Q5_1Blocks{w});
    case DType::IQ4_NL:
      return f(IQ4NLBlocks{w});
    case DType::Q2_K:
      return f(Q2KBlocks{w});
    case DType::Q3_K:
      return f(Q3KBlocks{w});
    case DType::Q5_K:
      return f(Q5KBlocks{w});
    case DType::IQ4_XS:
      return f(IQ4XSBlocks{w});
    case DType::IQ2_XXS:
      return f(IQ2XXSBlocks{w});
    case DType::IQ2_XS:
      return f(IQ2XSBlocks{w});
    case DType::IQ2_S:
      return f(IQ2SBlocks{w});
    case DType::IQ3_XXS:
      return f(IQ3XXSBlocks{w});
    case DType::IQ3_S:
      return f(IQ3SBlocks{w});
    case DType::IQ1_S:
      return f(IQ1SBlocks{w});
    case DType::IQ1_M:
      return f(IQ1MBlocks{w});
    case DType::TQ1_0:
      return f(TQ1_0Blocks{w});
    case DType::TQ2_0:
      return f(TQ2_0Blocks{w});
    case DType::MXFP4:
      return f(MXFP4Blocks{w});
    default:
      return Status::unsupported_type;
  }
}

// GGUF Q6_K repacked into planes at load (kernels/q6_k_planes.hpp: per row, pieces of 64 weights, each
// plane 16-byte loads). 32-weight unit b is quarter q = r % 4 of half h = r / 4 (r = b % 8) of
// super-block b / 8; its weights 16s + i (s = 0, 1) are weights i of quarter q in piece 2h + s of that
// super-block: the low (q < 2) or high nibble of byte i of its ql_lo (q even) or ql_hi (q odd) piece,
// with bits 2q, 2q + 1 of byte i of its qh piece above it, minus 32, times d * (the piece's scale byte
// q) (kernels/quantize.cpp's dequantize_block_q6_k, rounded as it rounds: (d * scale) * level).
struct Q6KPlanes {
  const uint4* ql_lo;       // [n_out, k / 64] 16-byte pieces
  const uint4* ql_hi;       // [n_out, k / 64]
  const uint4* qh;          // [n_out, k / 64]
  const uint32_t* scales;   // [n_out, k / 64] four int8 scales, quarter q in byte q
  const unsigned short* d;  // [n_out, k / 256] fp16 bits
  __host__ __device__ void load(int64_t row, int64_t nb, int64_t b, float (&wv)[kQK4_0]) const {
    const int64_t super_blocks = nb / (kQK_K / kQK4_0), block = b / (kQK_K / kQK4_0);
    const int run = static_cast<int>(b % (kQK_K / kQK4_0)), half = run / 4, quarter = run % 4;
    const int64_t p0 = (row * super_blocks + block) * 4 + 2 * half;  // piece s = 0; s = 1 follows
    const float d_block = __half2float(__ushort_as_half(load_ro(d + row * super_blocks + block)));
    const uint4* levels = quarter % 2 == 0 ? ql_lo : ql_hi;
    const int nibble_shift = quarter < 2 ? 0 : 4, high_shift = 2 * quarter;
    NIBBLE_DEVICE_UNROLL
    for (int s = 0; s < 2; ++s) {
      const auto scale = static_cast<int8_t>((load_ro(scales + p0 + s) >> (8 * quarter)) & 0xFF);
      const float ds = mul_rn(d_block, static_cast<float>(scale));
      const uint4 lw = load_ro(levels + p0 + s), hw = load_ro(qh + p0 + s);
      const unsigned low_words[4] = {lw.x, lw.y, lw.z, lw.w}, high_words[4] = {hw.x, hw.y, hw.z, hw.w};
      NIBBLE_DEVICE_UNROLL
      for (int i = 0; i < 16; ++i) {
        const unsigned low = ((low_words[i / 4] >> (8 * (i % 4))) >> nibble_shift) & 0xF;
        const unsigned high = ((high_words[i / 4] >> (8 * (i % 4))) >> high_shift) & 3;
        const int level = static_cast<int>(low | (high << 4)) - 32;
        wv[16 * s + i] = mul_rn(ds, static_cast<float>(level));
      }
    }
  }
};
// The planes of an [n_out, k] matrix at w (kernels/q6_k_planes.hpp's offsets; n_out must be the row count
// the matrix was repacked with, nothing here can check it): false for a null or misaligned w (16 bytes)
// or k not a positive multiple of 256.
inline bool make_q6_k_planes(const uint8_t* w, int64_t n_out, int64_t k, Q6KPlanes& out) {
  if (w == nullptr || reinterpret_cast<uintptr_t>(w) % 16 != 0 || n_out < 0 || k <= 0 || k % kQK_K != 0)
    return false;
  const Q6KPlanesLayout layout = q6_k_planes_layout(n_out, k);
  out.ql_lo = reinterpret_cast<const uint4*>(w + layout.ql_lo);
  out.ql_hi = reinterpret_cast<const uint4*>(w + layout.ql_hi);
  out.qh = reinterpret_cast<const uint4*>(w + layout.qh);
  out.scales = reinterpret_cast<const uint32_t*>(w + layout.scales);
  out.d = reinterpret_cast<const unsigned short*>(w + layout.d);
  return true;
}

// Tensor-core B operands straight from group-wise INT4 (the split nibble order above): the two
// mma.sync.m16n8k16 B fragments (k 0..15 and 16..31 of one 32-input unit) that lane (g = lane / 4,
// t = lane % 4) holds for weight row g of an n8 tile. PTX's layout puts inputs 2t, 2t + 1 (b0, b1)
// and 2t + 8, 2t + 9 (b2, b3) of a 16-deep step in a lane; in the split order input j is the low
// nibble of byte j and input j + 16 its high nibble, so both steps come from four bytes:
// lo = bytes 2t, 2t + 1 and hi = bytes 2t + 8, 2t + 9 of the row's unit (little-endian words).
// frag[s][0] packs inputs 16s + 2t (low half) and 16s + 2t + 1; frag[s][1] inputs 16s + 2t + 8, + 9.
// Values are fp16 of (q - zero) * scale, rounded once (as the WMMA GEMM rounds them).
//
// The halves are built without leaving fp16 (Marlin's trick): a nibble q OR-ed into the fp16 bit
// pattern of 1024 is exactly 1024 + q; subtracting 1024 + zero gives q - zero exactly, and one hmul2
// by the fp16 scale rounds the product once, so the bits equal those of the exact product rounded
// once, at about a third of the instructions of converting through float. The fp16 intrinsics also
// run on the host, so the CPU test checks this very code.

// A register of two fp16 values as a __half2 and back: a plain reinterpretation on the device
// (packing through __halves2half2 there costs byte permutes), portable code on the host.
__host__ __device__ inline __half2 bits_half2(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const __half2*>(&bits);
#else
  return __halves2half2(__ushort_as_half(static_cast<unsigned short>(bits & 0xFFFFu)),
                        __ushort_as_half(static_cast<unsigned short>(bits >> 16)));
#endif
}
__host__ __device__ inline uint32_t half2_bits(__half2 v) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(&v);
#else
  return static_cast<uint32_t>(__half_as_ushort(__low2half(v))) |
         (static_cast<uint32_t>(__half_as_ushort(__high2half(v))) << 16);
#endif
}
// (w & Mask) | 0x64006400: the levels under Mask or-ed into two fp16 1024s. One LOP3 on the device with
// 0x64006400 held in a register (from the C expression the compiler emits two, a LOP3 takes one
// immediate).
template <uint32_t Mask>
__host__ __device__ inline uint32_t levels_or_1024(uint32_t w) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w), "n"(Mask), "r"(0x64006400u));
  return r;
#else
  return (w & Mask) | 0x64006400u;
#endif
}
// Two fp16 values 1024 + q: q the nibble at bit 4s of byte 0 of `word` (low half) and of byte 1
// (high half).
__host__ __device__ inline uint32_t nibble_pairs_plus_1024(unsigned word, int s) {
  // Byte 0 stays, byte 1 moves to bits 16..23, the rest is zero: one byte permute on the device.
#if defined(__CUDA_ARCH__)
  const uint32_t spread = __byte_perm(word, 0, 0x4140);
#else
  const uint32_t spread = (word & 0xFFu) | ((word & 0xFF00u) << 8);
#endif
  return levels_or_1024<0x000F000Fu>(spread >> (4 * s));  // 0x6400: fp16 1024
}
// A group's (scale, zero) as the tensor-core GEMV stages it in shared memory: the fp16 scale's bits
// in the low half, the fp16 bits of 1024 + zero in the high half. The half2 ops then take each half
// for both lanes through their operand selectors, with no conversion instruction (an SM converts 16
// values a clock, a quarter of its issue rate) nor byte permute. 0 (outside the matrix) gives weights 0.
__host__ __device__ inline uint32_t int4_packed_scale_zero(uint16_t scale_bits, int zero) {
  return static_cast<uint32_t>(scale_bits) | (static_cast<uint32_t>(0x6400 + zero) << 16);
}
// int4_unit_b_fragments with the scale and zero as int4_packed_scale_zero packs them: the same bits.
__host__ __device__ inline void int4_unit_b_fragments_packed(unsigned lo, unsigned hi, uint32_t scale_zero,
                                                             uint32_t (&frag)[2][2]) {
  // __high2half2 / __low2half2: folded into the half2 ops' operand selectors (.H1_H1, .H0_H0) where a
  // byte permute would cost an instruction.
  const __half2 offset = __high2half2(bits_half2(scale_zero));
  const __half2 scale2 = __low2half2(bits_half2(scale_zero));
  const auto dequant = [&](uint32_t biased) {
    // _rn: never contracted into an fma.
    return half2_bits(__hmul2_rn(__hsub2_rn(bits_half2(biased), offset), scale2));
  };
  NIBBLE_DEVICE_UNROLL
  for (int s = 0; s < 2; ++s) {  // s = 1: the high nibbles
    frag[s][0] = dequant(nibble_pairs_plus_1024(lo, s));
    frag[s][1] = dequant(nibble_pairs_plus_1024(hi, s));
  }
}
__host__ __device__ inline void int4_unit_b_fragments(unsigned lo, unsigned hi, float scale, int zero,
                                                      uint32_t (&frag)[2][2]) {
  // exact: scale came from fp16
  int4_unit_b_fragments_packed(lo, hi, int4_packed_scale_zero(__half_as_ushort(__float2half_rn(scale)), zero),
                               frag);
}

// The same B fragments from GGUF Q4_K super-blocks as stored, for the tensor-core GEMV, which stages
// a super-block's 128 qs bytes unchanged: sub-block u's 32 levels are the low (even u) or high (odd
// u) nibbles of qs bytes 32 (u / 2) .. 32 (u / 2) + 31, input i in byte i. So lane (g, t) reads four
// little-endian 16-bit words of that chunk: w0 = bytes 2t, 2t + 1 (k-step 0's inputs 2t, 2t + 1),
// w8 = bytes 2t + 8, 2t + 9, w16 and w24 (k-step 1's), and `high` picks the sub-block's nibbles.
// A weight is fp16(d * scale) * q - fp16(dmin * min) in one fp16 fma: the sub-block's scale and min
// are rounded to fp16 first (2^-12 relative each), within the fp16 rounding the tensor-core paths
// apply to every weight; not the bits of Q4KBlocks, whose fp32 weights the CUDA-core GEMV uses.

// Sub-block j's scale and min (q4_k_scale_min) as the tensor-core GEMV stages them: fp16(d * scale)
// in the low half, fp16(-(dmin * min)) in the high half.
__host__ __device__ inline uint32_t q4_k_packed_scale_min(uint4 head, int j) {
  float ds, dm;
  q4_k_scale_min(head, j, ds, dm);
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(ds))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(-dm))) << 16);
}
// a * b + c on two fp16 values, rounded once (the device's fma; on the host exact in double, then
// rounded to fp16: the same for the operands here, a level times a scale plus a min).
__host__ __device__ inline __half2 fma_half2_rn(__half2 a, __half2 b, __half2 c) {
#if defined(__CUDA_ARCH__)
  return __hfma2(a, b, c);
#else
  const auto one = [](__half x, __half y, __half z) {
    return __double2half(static_cast<double>(__half2float(x)) * static_cast<double>(__half2float(y)) +
                         static_cast<double>(__half2float(z)));
  };
  return __halves2half2(one(__low2half(a), __low2half(b), __low2half(c)),
                        one(__high2half(a), __high2half(b), __high2half(c)));
#endif
}
__host__ __device__ inline void q4_k_unit_b_fragments(unsigned w0, unsigned w8, unsigned w16, unsigned w24,
                                                      int high, uint32_t scale_min, uint32_t (&frag)[2][2]) {
  const __half2 scale2 = __low2half2(bits_half2(scale_min));  // operand selectors, as above
  const __half2 neg_min2 = __high2half2(bits_half2(scale_min));
  const __half2 bias = bits_half2(0x64006400u);  // 1024, 1024
  const auto dequant = [&](uint32_t biased) {
    // 1024 + q - 1024 = q exactly; then q * scale - min rounded once.
    return half2_bits(fma_half2_rn(__hsub2_rn(bits_half2(biased), bias), scale2, neg_min2));
  };
  frag[0][0] = dequant(nibble_pairs_plus_1024(w0, high));
  frag[0][1] = dequant(nibble_pairs_plus_1024(w8, high));
  frag[1][0] = dequant(nibble_pairs_plus_1024(w16, high));
  frag[1][1] = dequant(nibble_pairs_plus_1024(w24, high));
}

// int4_unit_b_fragments_packed's fragments from a tiled chunk (kernels/int4_tiles.hpp), whose run holds in
// word t exactly lane t's eight levels: input 16 s + 8 c + 2 t + e at nibble 4 e + 2 s + c. Shifted by 8 s,
// an and-or with 0x000F000F gives frag[s][0]'s 1024 + q (less 1024 + zero: q - zero), one with 0x00F000F0
// frag[s][1]'s 1024 + 16 q (times 1/16, less 64 + zero, in one fma: q - zero); every step is exact, so
// after the same hmul2 by the scale the bits equal int4_unit_b_fragments_packed's on the row-major
// bytes. Eight levels cost a shift, four and-ors and four half2 ops (plus the scale's four), where the
// row-major bytes take four byte permutes, two shifts and four and-ors.
__host__ __device__ inline void int4_tile_word_b_fragments(uint32_t word, uint32_t scale_zero,
                                                           uint32_t (&frag)[2][2]) {
  const __half2 pair = bits_half2(scale_zero);  // halves by operand selectors, as above
  const __half2 offset = __high2half2(pair);    // 1024 + zero
  const __half2 scale2 = __low2half2(pair);
  // -(64 + zero) = (1024 + zero) * -1 + 960, exact (integers below 2048).
  const __half2 neg_offset_16 =
      fma_half2_rn(offset, bits_half2(0xBC00BC00u) /* -1 */, bits_half2(0x63806380u) /* 960 */);
  const __half2 sixteenth = bits_half2(0x2C002C00u);
  NIBBLE_DEVICE_UNROLL
  for (int s = 0; s < 2; ++s) {
    const uint32_t w = word >> (8 * s);
    frag[s][0] =
        half2_bits(__hmul2_rn(__hsub2_rn(bits_half2(levels_or_1024<0x000F000Fu>(w)), offset), scale2));
    frag[s][1] = half2_bits(__hmul2_rn(
        fma_half2_rn(bits_half2(levels_or_1024<0x00F000F0u>(w)), sixteenth, neg_offset_16), scale2));
  }
}

// q4_k_unit_b_fragments' fragments from a Q4_K tiled chunk, whose sub-block run holds lane t's eight
// levels in word t (as int4_tile_word_b_fragments reads them): q exactly (1024 + q less 1024, or
// 1024 + 16 q times 1/16 less 64), then the same fma with the scale and the min: the same bits.
__host__ __device__ inline void q4_k_tile_word_b_fragments(uint32_t word, uint32_t scale_min,
                                                           uint32_t (&frag)[2][2]) {
  const __half2 pair = bits_half2(scale_min);  // halves by operand selectors
  const __half2 scale2 = __low2half2(pair), neg_min2 = __high2half2(pair);
  const __half2 bias = bits_half2(0x64006400u);       // 1024
  const __half2 sixteenth = bits_half2(0x2C002C00u);  // 1/16
  const __half2 neg_64 = bits_half2(0xD400D400u);     // -64
  NIBBLE_DEVICE_UNROLL
  for (int s = 0; s < 2; ++s) {
    const uint32_t w = word >> (8 * s);
    const __half2 q0 = __hsub2_rn(bits_half2(levels_or_1024<0x000F000Fu>(w)), bias);
    const __half2 q1 = fma_half2_rn(bits_half2(levels_or_1024<0x00F000F0u>(w)), sixteenth, neg_64);
    frag[s][0] = half2_bits(fma_half2_rn(q0, scale2, neg_min2));
    frag[s][1] = half2_bits(fma_half2_rn(q1, scale2, neg_min2));
  }
}

// The half2 GEMV (w4a16_gemv_half2.cuh) reads word i of a group-wise INT4 unit (bytes 4i .. 4i + 3:
// inputs 4i .. 4i + 3 in the low nibbles, 4i + 16 .. 4i + 19 in the high ones) as four half2 levels
// without moving a nibble: (4i, 4i + 2) and (4i + 16, 4i + 18) from the word, (4i + 1, 4i + 3) and
// (4i + 17, 4i + 19) from the word shifted right by 8. It stages the activations in that order, so
// that each level pair meets its activation pair in one half2 op: staged half h (0..7) of word i is
// input int4_half2_staged_input(i, h).
__host__ __device__ constexpr int int4_half2_staged_input(int word, int h) {
  return 4 * word + 2 * (h & 1) + 16 * ((h >> 1) & 1) + (h >> 2);
}
// Word i of a unit as staged, from the unit's activations 4i .. 4i + 3 (`lo`, two halves a word, the
// lower input in the low half) and 4i + 16 .. 4i + 19 (`hi`): four byte permutes on the device.
__host__ __device__ inline uint4 int4_half2_staged_word(uint2 lo, uint2 hi) {
#if defined(__CUDA_ARCH__)
  return make_uint4(__byte_perm(lo.x, lo.y, 0x5410), __byte_perm(hi.x, hi.y, 0x5410),
                    __byte_perm(lo.x, lo.y, 0x7632), __byte_perm(hi.x, hi.y, 0x7632));
#else
  const auto low_halves = [](uint32_t a, uint32_t b) { return (a & 0xFFFFu) | (b << 16); };
  const auto high_halves = [](uint32_t a, uint32_t b) { return (a >> 16) | (b & 0xFFFF0000u); };
  return make_uint4(low_halves(lo.x, lo.y), low_halves(hi.x, hi.y), high_halves(lo.x, lo.y),
                    high_halves(hi.x, hi.y));
#endif
}
// The fp16 bits of 1024 + z in both halves: a zero as int4_unit_half2_dot takes it.
__host__ __device__ inline uint32_t int4_half2_biased_zero(uint32_t zero) {
  return (0x6400u + zero) * 0x10001u;
}

// sum over one unit of x[i] * (q[i] - z), as the half2 GEMV computes it: q - z exactly (1024 + q less
// 1024 + z; 1024 + 16 q times 1/16 less 64 + z), then fp16 FMAs into one half2 (two running sums of
// 16 products), added in fp32. Two instructions a level pair and one FMA an activation pair, about 1.7
// a weight (the fp32 readers above take three to six). The fp16 sums round (2^-11 relative each) and
// would overflow past 65504: the kernel scales its activations so that |x| <= 64 (|q - z| <= 31, so a
// running sum stays under 16 * 64 * 31 = 31744). Exact when every x is an integer and the sums stay
// under 2048 (what the CPU test checks the nibble order with).
// q: the unit's 16 bytes; biased_zero: int4_half2_biased_zero(z); xs: the unit's activations as staged
// (word i: staged halves int4_half2_staged_input(i, 0..7), 16 bytes).
__host__ __device__ inline float int4_unit_half2_dot(const uint4& q, uint32_t biased_zero,
                                                     const uint4 (&xs)[4]) {
  const unsigned words[4] = {q.x, q.y, q.z, q.w};
  const __half2 zero_1024 = bits_half2(biased_zero);                           // 1024 + z
  const __half2 neg_zero_64 = __hsub2_rn(bits_half2(0x63806380u), zero_1024);  // 960 - (1024 + z)
  const __half2 sixteenth = bits_half2(0x2C002C00u);                           // 1/16
  __half2 acc = bits_half2(0u);
  NIBBLE_DEVICE_UNROLL
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = words[i], w8 = words[i] >> 8;
    const __half2 l0 = __hsub2_rn(bits_half2(levels_or_1024<0x000F000Fu>(w)), zero_1024);  // 4i, 4i + 2
    const __half2 l1 = fma_half2_rn(bits_half2(levels_or_1024<0x00F000F0u>(w)), sixteenth, neg_zero_64);
    const __half2 l2 = __hsub2_rn(bits_half2(levels_or_1024<0x000F000Fu>(w8)), zero_1024);  // 4i + 1, 4i + 3
    const __half2 l3 = fma_half2_rn(bits_half2(levels_or_1024<0x00F000F0u>(w8)), sixteenth, neg_zero_64);
    acc = fma_half2_rn(l0, bits_half2(xs[i].x), acc);
    acc = fma_half2_rn(l1, bits_half2(xs[i].y), acc);
    acc = fma_half2_rn(l2, bits_half2(xs[i].z), acc);
    acc = fma_half2_rn(l3, bits_half2(xs[i].w), acc);
  }
  return __low2float(acc) + __high2float(acc);
}

// q4_k_scale_min for sub-blocks 2c and 2c + 1 at once (chunk c of the super-block, 0..3), without a
// branch: both scales and both mins come out of 16-bit lanes of the header's words (for c < 2 the low
// 6 bits of bytes 2c, 2c + 1 and 2c + 4, 2c + 5; for c >= 2 a nibble of bytes 2c + 4, 2c + 5 and the
// top 2 bits of bytes 2c - 4 .. 2c + 1). The same bits as q4_k_scale_min.
__host__ __device__ inline void q4_k_pair_scale_min(uint4 head, unsigned c, float (&ds)[2], float (&dm)[2]) {
  const float d = __half2float(__ushort_as_half(static_cast<unsigned short>(head.x & 0xFFFF)));
  const float dmin = __half2float(__ushort_as_half(static_cast<unsigned short>(head.x >> 16)));
  const unsigned at = 16 * (c % 2);
  const unsigned y = (head.y >> at) & 0xFFFFu, z = (head.z >> at) & 0xFFFFu, w = (head.w >> at) & 0xFFFFu;
  const bool high = c >= 2;
  const unsigned scales = high ? (w & 0x0F0Fu) | ((y >> 2) & 0x3030u) : y & 0x3F3Fu;
  const unsigned mins = high ? ((w >> 4) & 0x0F0Fu) | ((z >> 2) & 0x3030u) : z & 0x3F3Fu;
  ds[0] = mul_rn(d, static_cast<float>(scales & 0xFFu));
  ds[1] = mul_rn(d, static_cast<float>(scales >> 8));
  dm[0] = mul_rn(dmin, static_cast<float>(mins & 0xFFu));
  dm[1] = mul_rn(dmin, static_cast<float>(mins >> 8));
}

// The half2 GEMV on GGUF Q4_K as stored: one 16-byte piece of a super-block's qs (bytes 16h .. 16h + 15
// of the 32 that chunk c shares: input 64c + 16h + j of sub-block 2c in byte j's low nibble, input
// 64c + 32 + 16h + j of sub-block 2c + 1 in its high nibble) times its activations staged as
// int4_half2_staged_word stages them (lo: the low nibbles' inputs, hi: the high nibbles'), summed into
// one half2 per sub-block: acc_lo += sum x * (q - z_lo) over the low nibbles, acc_hi += sum x * (q - z_hi)
// over the high ones (exactly: 1024 + q less 1024 + z, 1024 + 16 q times 1/16 less 64 + z).
// piece: the 16 qs bytes; xs: its activations, word i from inputs 4i .. 4i + 3 of each half;
// biased_zero_lo / _hi: int4_half2_biased_zero of each sub-block's z (q4_k_centre_level).
__host__ __device__ inline void q4_k_piece_half2_dot(const uint4& piece, const uint4 (&xs)[4],
                                                     uint32_t biased_zero_lo, uint32_t biased_zero_hi,
                                                     __half2& acc_lo, __half2& acc_hi) {
  const unsigned words[4] = {piece.x, piece.y, piece.z, piece.w};
  const __half2 zero_lo_1024 = bits_half2(biased_zero_lo);  // 1024 + z_lo
  const __half2 neg_zero_hi_64 =
      __hsub2_rn(bits_half2(0x63806380u), bits_half2(biased_zero_hi));  // 960 - (1024 + z_hi)
  const __half2 sixteenth = bits_half2(0x2C002C00u);                    // 1/16
  NIBBLE_DEVICE_UNROLL
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = words[i], w8 = words[i] >> 8;
    const __half2 l0 = __hsub2_rn(bits_half2(levels_or_1024<0x000F000Fu>(w)), zero_lo_1024);
    const __half2 l1 = fma_half2_rn(bits_half2(levels_or_1024<0x00F000F0u>(w)), sixteenth, neg_zero_hi_64);
    const __half2 l2 = __hsub2_rn(bits_half2(levels_or_1024<0x000F000Fu>(w8)), zero_lo_1024);
    const __half2 l3 = fma_half2_rn(bits_half2(levels_or_1024<0x00F000F0u>(w8)), sixteenth, neg_zero_hi_64);
    acc_lo = fma_half2_rn(l0, bits_half2(xs[i].x), acc_lo);
    acc_hi = fma_half2_rn(l1, bits_half2(xs[i].y), acc_hi);
    acc_lo = fma_half2_rn(l2, bits_half2(xs[i].z), acc_lo);
    acc_hi = fma_half2_rn(l3, bits_half2(xs[i].w), acc_hi);
  }
}

// A Q4_K sub-block's centre for the half2 sums: the level z whose weight ds z - dm is nearest 0 (dm / ds
// rounded, clamped to 0..15; on the device from an approximate quotient: any z keeps the sum exact, z
// only centres it). Why: summed uncentred, x q of a weight near 0 (q near dm / ds) is as large as the
// level, and one large activation there (Llama's outlier channels reach thousands) left fp16 rounding
// errors of 0.05-0.23 of sum|x w| in emulation; centred, it adds almost nothing to the fp16 sum.
__host__ __device__ inline float q4_k_centre_level(float ds, float dm) {
#if defined(__CUDA_ARCH__)
  float reciprocal;  // one MUFU.RCP (__fdividef adds range selects)
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(reciprocal) : "f"(ds));
  const float ratio = dm * reciprocal;
#else
  const float ratio = dm / ds;
#endif
  return fminf(fmaxf(rintf(ratio), 0.0f), 15.0f);  // NaN (0 / 0) gives 0
}

// One 64-input chunk c of a Q4_K super-block (sub-blocks 2c and 2c + 1; its two 16-byte pieces) against
// its staged activations (xs[h]: piece h's words) and the sub-blocks' activation sums (fp32, scaled as
// xs is): acc plus the chunk's sum of x w, w = ds q - dm, as ds times the centred fp16 sum of x (q - z)
// plus (ds z - dm) times the activations' sum, in fp32.
__host__ __device__ inline float q4_k_chunk_half2_dot(const uint4& head, unsigned c, const uint4 (&pieces)[2],
                                                      const uint4 (&xs)[2][4], float2 x_sum, float acc) {
  float ds[2], dm[2];
  q4_k_pair_scale_min(head, c, ds, dm);
  const float z0 = q4_k_centre_level(ds[0], dm[0]), z1 = q4_k_centre_level(ds[1], dm[1]);
  const uint32_t biased_z0 = int4_half2_biased_zero(static_cast<uint32_t>(z0));
  const uint32_t biased_z1 = int4_half2_biased_zero(static_cast<uint32_t>(z1));
  __half2 lo = bits_half2(0u), hi = bits_half2(0u);
  q4_k_piece_half2_dot(pieces[0], xs[0], biased_z0, biased_z1, lo, hi);
  q4_k_piece_half2_dot(pieces[1], xs[1], biased_z0, biased_z1, lo, hi);
  acc = fmaf(ds[0], __low2float(lo) + __high2float(lo), acc);
  acc = fmaf(fmaf(ds[0], z0, -dm[0]), x_sum.x, acc);
  acc = fmaf(ds[1], __low2float(hi) + __high2float(hi), acc);
  return fmaf(fmaf(ds[1], z1, -dm[1]), x_sum.y, acc);
}

// One Q6_K piece (kernels/q6_k_planes.hpp: the 16 weights of each quarter of one half's run) summed
// against its activations in fp16, one half2 per quarter (its 16 weights share a sub-block scale):
// acc[q] += sum over i of x * (level - 32). A level is its nibble and its two high bits or-ed into fp16
// 1024 (1024 + level, less 1056) or, for the high nibbles, into 1024 + 16 level (times 1/16, less 96):
// exact, as the INT4 and Q4_K readers build theirs, about 2.5 instructions a weight. The kernel scales
// its activations so that |x| <= 64: a running sum of 8 products stays under 8 * 64 * 32 = 16384.
// Exact when every x is an integer and the sums stay under 2048 (what the CPU test checks the bit
// order with). ql_lo, ql_hi, qh: the piece's 16 bytes of each plane; xs: its activations as staged,
// words 0..3 the ql_lo words' (int4_half2_staged_word of inputs 4i .. 4i + 3 of quarter 0 and of
// quarter 2) and words 4..7 the ql_hi words' (quarters 1 and 3).
// One 32-bit word of a Q6_K nibble plane against its staged activations: its low nibbles (bytes 0, 2
// then 1, 3) are one quarter's levels, summed into acc_low, its high nibbles another's, into acc_high;
// h_even and h_odd are the qh word shifted so that those quarters' bit pairs of bytes 0, 2 (h_even) and
// 1, 3 (h_odd) sit at bits 4-5 (beside a low nibble) and 8-9 (beside a high one, 16 times over).
__host__ __device__ inline void q6_k_word_half2_dot(uint32_t w, uint32_t h_even, uint32_t h_odd,
                                                    const uint4& xs, __half2& acc_low, __half2& acc_high) {
  const __half2 bias = bits_half2(0x64206420u);       // 1056 = 1024 + 32
  const __half2 sixteenth = bits_half2(0x2C002C00u);  // 1/16
  const __half2 neg_96 = bits_half2(0xD600D600u);     // -96 = -(64 + 32)
  const uint32_t w8 = w >> 8;
  const __half2 low_even =
      __hsub2_rn(bits_half2(levels_or_1024<0x000F000Fu>(w) | (h_even & 0x00300030u)), bias);
  const __half2 high_even =
      fma_half2_rn(bits_half2(levels_or_1024<0x00F000F0u>(w) | (h_even & 0x03000300u)), sixteenth, neg_96);
  const __half2 low_odd =
      __hsub2_rn(bits_half2(levels_or_1024<0x000F000Fu>(w8) | (h_odd & 0x00300030u)), bias);
  const __half2 high_odd =
      fma_half2_rn(bits_half2(levels_or_1024<0x00F000F0u>(w8) | (h_odd & 0x03000300u)), sixteenth, neg_96);
  acc_low = fma_half2_rn(low_even, bits_half2(xs.x), acc_low);
  acc_high = fma_half2_rn(high_even, bits_half2(xs.y), acc_high);
  acc_low = fma_half2_rn(low_odd, bits_half2(xs.z), acc_low);
  acc_high = fma_half2_rn(high_odd, bits_half2(xs.w), acc_high);
}

// One Q6_K piece (kernels/q6_k_planes.hpp: the 16 weights of each quarter of one half's run) summed
// against its activations in fp16, one half2 per quarter (its 16 weights share a sub-block scale):
// acc[q] += sum over i of x * (level - 32). A level is its nibble and its two high bits or-ed into fp16
// 1024 (1024 + level, less 1056) or, for the high nibbles, into 1024 + 16 level (times 1/16, less 96):
// exact, as the INT4 and Q4_K readers build theirs, about 2.5 instructions a weight. The kernel scales
// its activations so that |x| <= 64: a running sum of 8 products stays under 8 * 64 * 32 = 16384.
// Exact when every x is an integer and the sums stay under 2048 (what the CPU test checks the bit
// order with). ql_lo, ql_hi, qh: the piece's 16 bytes of each plane; xs: its activations as staged,
// words 0..3 the ql_lo words' (int4_half2_staged_word of inputs 4i .. 4i + 3 of quarter 0 and of
// quarter 2) and words 4..7 the ql_hi words' (quarters 1 and 3).
__host__ __device__ inline void q6_k_piece_half2_dot(const uint4& ql_lo, const uint4& ql_hi, const uint4& qh,
                                                     const uint4 (&xs)[8], __half2 (&acc)[4]) {
  const unsigned lo[4] = {ql_lo.x, ql_lo.y, ql_lo.z, ql_lo.w}, hi[4] = {ql_hi.x, ql_hi.y, ql_hi.z, ql_hi.w};
  const unsigned high_bits[4] = {qh.x, qh.y, qh.z, qh.w};
  NIBBLE_DEVICE_UNROLL
  for (int i = 0; i < 4; ++i) {
    const uint32_t h = high_bits[i];
    // Quarters 0 / 2 hold bits 0-1 / 4-5 of each qh byte: h << 4 for bytes 0, 2 and h >> 4 for 1, 3;
    // quarters 1 / 3 bits 2-3 / 6-7: h << 2 and h >> 6.
    q6_k_word_half2_dot(lo[i], h << 4, h >> 4, xs[i], acc[0], acc[2]);
    q6_k_word_half2_dot(hi[i], h << 2, h >> 6, xs[4 + i], acc[1], acc[3]);
  }
}

}  // namespace nibble::kernels::cuda::w4a16
