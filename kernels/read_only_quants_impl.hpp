#pragma once
// The kernels of kernels/read_only_quants.hpp's types, compiled once per kernel set (matmul_scalar.cpp,
// matmul_avx2.cpp, matmul_avx512.cpp: the compiler vectorizes the int8 sums for each ISA) and by
// read_only_quants.cpp. Everything has internal linkage, as in quant_internal.hpp: a shared inline copy
// could be resolved to one compiled with another file's -m flags.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/iq_grids.hpp"
#include "kernels/matmul_internal.hpp"
#include "kernels/quant_types.hpp"

namespace nibble::kernels::detail {
namespace {

// One super-block of 256 weights decoded to integers: weight e = d · scales[e / 16] · coords[e] · the type's
// constant (dot_constant: 1/8 for IQ2, 1/4 for IQ3_XXS, 1/8 for IQ1, whose coordinates are 8 times the grid's
// plus the run's ±1 shift, 1 otherwise). Scaling by a power of two is exact, so the products round as
// llama.cpp's.
struct Decoded {
  int8_t coords[kQK_K];
  int scales[kQK_K / 16];  // odd: 2·s + 1 of the stored 3- or 4-bit s (1 for TQ)
  float d;                 // the block's fp16 scale
};

// Bit j of `bits` (8 or 4 of them) moved to bit 0 of byte j.
uint64_t spread_bits8(uint64_t bits) {
  bits = (bits | bits << 28) & 0x0000000F0000000Full;
  bits = (bits | bits << 14) & 0x0003000300030003ull;
  return (bits | bits << 7) & 0x0101010101010101ull;
}

uint32_t spread_bits4(uint32_t bits) {
  bits = (bits | bits << 14) & 0x00030003u;
  return (bits | bits << 7) & 0x01010101u;
}

// Grid entry `entry`'s 8 (or 4) coordinates as int8, coordinate j negated where bit j of `signs` is set:
// −c is (c xor 0xFF) + 1 in a byte, done for all bytes at once; no carry crosses a byte, as the IQ2 / IQ3
// grids hold no 0 coordinate.
void put_run8(uint64_t entry, uint8_t signs, int8_t* out) {
  const uint64_t ones = spread_bits8(signs);
  const uint64_t coords = (entry ^ (ones * 0xFF)) + ones;
  std::memcpy(out, &coords, sizeof coords);
}

void put_run4(uint32_t entry, uint8_t signs, int8_t* out) {
  const uint32_t ones = spread_bits4(signs & 0xFu);
  const uint32_t coords = (entry ^ (ones * 0xFFu)) + ones;
  std::memcpy(out, &coords, sizeof coords);
}

// An IQ1 run: 8 · the grid's coordinate (−1, 0, 1) + the run's shift (±1, llama.cpp's ±1/8 in eighths).
void put_iq1_run(uint64_t entry, int shift, int8_t* out) {
  for (int j = 0; j < 8; ++j)
    out[j] = static_cast<int8_t>(8 * static_cast<int8_t>(static_cast<uint8_t>(entry >> (8 * j))) + shift);
}

uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

void set_scale32(Decoded& out, int sub, int scale) { out.scales[2 * sub] = out.scales[2 * sub + 1] = scale; }

void decode(const BlockIQ2_XXS& b, Decoded& out) {
  out.d = fp16_to_fp32(b.d);
  for (int s = 0; s < 8; ++s) {
    const uint32_t indices = load_u32(b.qs + 4 * s);
    const uint32_t signs_scale = load_u32(b.qs + 4 * s + 2);
    set_scale32(out, s, 2 * static_cast<int>(signs_scale >> 28) + 1);
    for (int r = 0; r < 4; ++r)
      put_run8(kIQ2XXSGrid[indices >> (8 * r) & 0xFF], iq2_sign_byte(signs_scale >> (7 * r)),
               out.coords + 32 * s + 8 * r);
  }
}

void decode(const BlockIQ2_XS& b, Decoded& out) {
  out.d = fp16_to_fp32(b.d);
  for (int s = 0; s < 8; ++s) {
    out.scales[2 * s] = 2 * (b.scales[s] & 0xF) + 1;
    out.scales[2 * s + 1] = 2 * (b.scales[s] >> 4) + 1;
    for (int r = 0; r < 4; ++r) {
      const uint16_t q = b.qs[4 * s + r];
      put_run8(kIQ2XSGrid[q & 511], iq2_sign_byte(q >> 9), out.coords + 32 * s + 8 * r);
    }
  }
}

void decode(const BlockIQ2_S& b, Decoded& out) {
  out.d = fp16_to_fp32(b.d);
  const uint8_t* signs = b.qs + kQK_K / 8;
  for (int s = 0; s < 8; ++s) {
    out.scales[2 * s] = 2 * (b.scales[s] & 0xF) + 1;
    out.scales[2 * s + 1] = 2 * (b.scales[s] >> 4) + 1;
    for (int r = 0; r < 4; ++r) {
      const int index = b.qs[4 * s + r] | (b.qh[s] >> (2 * r) & 3) << 8;
      put_run8(kIQ2SGrid[index], signs[4 * s + r], out.coords + 32 * s + 8 * r);
    }
  }
}

void decode(const BlockIQ3_XXS& b, Decoded& out) {
  out.d = fp16_to_fp32(b.d);
  const uint8_t* signs_scales = b.qs + kQK_K / 4;
  for (int s = 0; s < 8; ++s) {
    const uint32_t word = load_u32(signs_scales + 4 * s);
    set_scale32(out, s, 2 * static_cast<int>(word >> 28) + 1);
    for (int r = 0; r < 4; ++r) {  // a pair of 4-wide runs shares one 7-bit sign field
      const uint8_t signs = iq2_sign_byte(word >> (7 * r));
      int8_t* c = out.coords + 32 * s + 8 * r;
      put_run4(kIQ3XXSGrid[b.qs[8 * s + 2 * r]], signs, c);
      put_run4(kIQ3XXSGrid[b.qs[8 * s + 2 * r + 1]], static_cast<uint8_t>(signs >> 4), c + 4);
    }
  }
}

void decode(const BlockIQ3_S& b, Decoded& out) {
  out.d = fp16_to_fp32(b.d);
  for (int s = 0; s < 8; ++s) {
    set_scale32(out, s, 2 * (b.scales[s / 2] >> (4 * (s % 2)) & 0xF) + 1);
    for (int r = 0; r < 8; ++r) {
      const int index = b.qs[8 * s + r] | (b.qh[s] >> r & 1) << 8;
      put_run4(kIQ3SGrid[index], static_cast<uint8_t>(b.signs[4 * s + r / 2] >> (4 * (r % 2))),
               out.coords + 32 * s + 4 * r);
    }
  }
}

void decode(const BlockIQ1_S& b, Decoded& out) {
  out.d = fp16_to_fp32(b.d);
  for (int s = 0; s < 8; ++s) {
    const uint16_t qh = b.qh[s];
    set_scale32(out, s, 2 * (qh >> 12 & 7) + 1);
    for (int r = 0; r < 4; ++r)
      put_iq1_run(kIQ1SGrid[b.qs[4 * s + r] | (qh >> (3 * r) & 7) << 8], qh & 0x8000 ? -1 : 1,
                  out.coords + 32 * s + 8 * r);
  }
}

void decode(const BlockIQ1_M& b, Decoded& out) {
  out.d = fp16_to_fp32(iq1_m_scale(b));
  for (int s = 0; s < 8; ++s) {
    const int word = b.scales[2 * (s / 2)] | b.scales[2 * (s / 2) + 1] << 8;
    out.scales[2 * s] = 2 * (word >> (6 * (s % 2)) & 7) + 1;
    out.scales[2 * s + 1] = 2 * (word >> (6 * (s % 2) + 3) & 7) + 1;
    for (int r = 0; r < 4; ++r) {
      const int nibble = b.qh[2 * s + r / 2] >> (4 * (r % 2)) & 0xF;
      put_iq1_run(kIQ1SGrid[b.qs[4 * s + r] | (nibble & 7) << 8], nibble & 8 ? -1 : 1,
                  out.coords + 32 * s + 8 * r);
    }
  }
}

void decode(const BlockTQ1_0& b, Decoded& out) {
  out.d = fp16_to_fp32(b.d);
  for (int& s : out.scales) s = 1;
  int8_t* c = out.coords;
  for (int l = 0; l < 5; ++l)
    for (int m = 0; m < 32; ++m) *c++ = static_cast<int8_t>(tq1_digit(b.qs[m], l) - 1);
  for (int l = 0; l < 5; ++l)
    for (int m = 0; m < 16; ++m) *c++ = static_cast<int8_t>(tq1_digit(b.qs[32 + m], l) - 1);
  for (int l = 0; l < 4; ++l)
    for (int j = 0; j < 4; ++j) *c++ = static_cast<int8_t>(tq1_digit(b.qh[j], l) - 1);
}

void decode(const BlockTQ2_0& b, Decoded& out) {
  out.d = fp16_to_fp32(b.d);
  for (int& s : out.scales) s = 1;
  for (int e = 0; e < kQK_K; ++e)
    out.coords[e] = static_cast<int8_t>((b.qs[32 * (e / 128) + e % 32] >> (2 * (e % 128 / 32)) & 3) - 1);
}

// llama.cpp's GGML_E8M0_TO_FP32_HALF: 2^(e − 128), the E8M0 scale halved for the doubled E2M1 values.
float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One super-block's term of ggml_vec_dot_<type>_q8_K: its integer sums, then (d · d_x) · Σ_g scale_g ·
// (coords · q)_g. (IQ1's is 8 times llama.cpp's: its sum of the grid term and 1/8 of the shifts' term.)
float block_term(const Decoded& dec, const BlockQ8_K& x) {
  int scaled = 0;
  for (int g = 0; g < kQK_K / 16; ++g) {
    int dot = 0;
    for (int j = 0; j < 16; ++j) dot += dec.coords[16 * g + j] * x.qs[16 * g + j];
    scaled += dec.scales[g] * dot;
  }
  return dec.d * x.d * static_cast<float>(scaled);
}

// What ggml_vec_dot_<type>_q8_K multiplies the blocks' sum by at the end.
float dot_constant(DType type) {
  switch (type) {
    case DType::IQ2_XXS:
    case DType::IQ2_XS:
    case DType::IQ2_S:
    case DType::IQ1_S:
    case DType::IQ1_M:
      return 0.125f;
    case DType::IQ3_XXS:
      return 0.25f;
    default:
      return 1.0f;
  }
}

// The blocks' terms added in block order, then the constant: llama.cpp's generic vec_dot.
template <typename Block>
void matmul_blocks(DType type, const uint8_t* w, int64_t w_stride, const uint8_t* x, int64_t x_stride,
                   float* y, int64_t y_stride, int64_t m, int64_t k, int64_t o_begin, int64_t o_end) {
  const int64_t n_blocks = k / kQK_K;
  const float constant = dot_constant(type);
  Decoded dec;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const auto* row = reinterpret_cast<const Block*>(w + o * w_stride);
    for (int64_t r = 0; r < m; ++r) y[r * y_stride + o] = 0.0f;
    for (int64_t b = 0; b < n_blocks; ++b) {
      decode(row[b], dec);  // once for all activation rows
      for (int64_t r = 0; r < m; ++r)
        y[r * y_stride + o] += block_term(dec, reinterpret_cast<const BlockQ8_K*>(x + r * x_stride)[b]);
    }
    for (int64_t r = 0; r < m; ++r) y[r * y_stride + o] *= constant;
  }
}

float dot_mxfp4(const BlockMXFP4* w, const BlockQ8_0* x, int64_t n_blocks) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n_blocks; ++i) {
    int dot = 0;
    for (int j = 0; j < 16; ++j)
      dot += x[i].qs[j] * kMXFP4Values[w[i].qs[j] & 0xF] + x[i].qs[j + 16] * kMXFP4Values[w[i].qs[j] >> 4];
    sum += fp16_to_fp32(x[i].d) * e8m0_half(w[i].e) * static_cast<float>(dot);
  }
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

// y[r, o] for activation rows r in [0, m) and weight rows o in [o_begin, o_end) (see matmul_read_only_rows).
[[maybe_unused]] void read_only_rows(DType type, const uint8_t* w, int64_t w_stride, const uint8_t* x,
                                     int64_t x_stride, float* y, int64_t y_stride, int64_t m, int64_t k,
                                     int64_t o_begin, int64_t o_end) {
  if (type == DType::MXFP4) {
    for (int64_t o = o_begin; o < o_end; ++o)
      for (int64_t r = 0; r < m; ++r)
        y[r * y_stride + o] = dot_mxfp4(reinterpret_cast<const BlockMXFP4*>(w + o * w_stride),
                                        reinterpret_cast<const BlockQ8_0*>(x + r * x_stride), k / kQK4_0);
    return;
  }
  with_blocks(type, w, [&](auto* typed) {
    using Block = std::remove_cv_t<std::remove_pointer_t<decltype(typed)>>;
    matmul_blocks<Block>(type, w, w_stride, x, x_stride, y, y_stride, m, k, o_begin, o_end);
  });
}

template <DType kType>
void read_only_type_range(const MatmulOperands& op, int64_t o_begin, int64_t o_end) {
  read_only_rows(kType, op.w, op.w_stride, op.x, op.x_stride, op.y, op.y_stride, op.m, op.k, o_begin, o_end);
}

// IsaKernels::read_only for the kernel set that includes this file.
[[maybe_unused]] MatmulRangeFn read_only_range(DType w_type) {
  switch (w_type) {
    case DType::IQ2_XXS:
      return read_only_type_range<DType::IQ2_XXS>;
    case DType::IQ2_XS:
      return read_only_type_range<DType::IQ2_XS>;
    case DType::IQ2_S:
      return read_only_type_range<DType::IQ2_S>;
    case DType::IQ3_XXS:
      return read_only_type_range<DType::IQ3_XXS>;
    case DType::IQ3_S:
      return read_only_type_range<DType::IQ3_S>;
    case DType::IQ1_S:
      return read_only_type_range<DType::IQ1_S>;
    case DType::IQ1_M:
      return read_only_type_range<DType::IQ1_M>;
    case DType::TQ1_0:
      return read_only_type_range<DType::TQ1_0>;
    case DType::TQ2_0:
      return read_only_type_range<DType::TQ2_0>;
    case DType::MXFP4:
      return read_only_type_range<DType::MXFP4>;
    default:
      return nullptr;
  }
}

}  // namespace
}  // namespace nibble::kernels::detail
