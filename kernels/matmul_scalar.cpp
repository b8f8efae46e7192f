// Portable kernels: one dot product per (activation row, weight row), integer block dot products
// for the quantized types. They define the integer math the SIMD kernels must reproduce.
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels/matmul_internal.hpp"
#include "kernels/packed_weights.hpp"
#include "kernels/quant_internal.hpp"
#include "kernels/read_only_quants_impl.hpp"

namespace nibble::kernels::detail {
namespace {

float dot_f32(const uint8_t* w_row, const float* x, int64_t k) {
  const auto* w = reinterpret_cast<const float*>(w_row);
  float sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) sum += w[i] * x[i];
  return sum;
}

float dot_f16(const uint8_t* w_row, const float* x, int64_t k) {
  const auto* w = reinterpret_cast<const f16_bits*>(w_row);
  float sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) sum += fp16_to_fp32(w[i]) * x[i];
  return sum;
}

float dot_bf16(const uint8_t* w_row, const float* x, int64_t k) {
  const auto* w = reinterpret_cast<const uint16_t*>(w_row);
  float sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) sum += bf16_to_fp32(w[i]) * x[i];
  return sum;
}

// The signed value of element j of a block of 32 with one scale: Q4_0's level − 8, Q5_0's level − 16,
// IQ4_NL's table entry, Q8_0's quant.
template <typename Block>
int block32_value(const Block& block, int j) {
  if constexpr (std::is_same_v<Block, BlockQ8_0>) {
    return block.qs[j];
  } else if constexpr (std::is_same_v<Block, BlockIQ4_NL>) {
    return kIQ4Values[block32_level(block, j)];
  } else if constexpr (std::is_same_v<Block, BlockQ5_0>) {
    return block32_level(block, j) - 16;
  } else {
    static_assert(std::is_same_v<Block, BlockQ4_0>);
    return block32_level(block, j) - 8;
  }
}

// Q4_0, Q5_0, IQ4_NL and Q8_0 × Q8_0 activations: per block (d·dx)·Σ value·x, the sum in integers.
template <typename Block>
float dot_block32(const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  const auto* w = reinterpret_cast<const Block*>(w_row);
  const auto* x = reinterpret_cast<const BlockQ8_0*>(x_row);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK8_0; ++b) {
    int sumi = 0;
    for (int j = 0; j < kQK8_0; ++j) sumi += block32_value(w[b], j) * x[b].qs[j];
    sum += fp16_to_fp32(w[b].d) * fp16_to_fp32(x[b].d) * static_cast<float>(sumi);
  }
  return sum;
}

// Q4_1 and Q5_1 (weight d · q + m) × Q8_1 activations: per block (d·dx)·Σq·x + m·s, s the activation
// block's sum (llama.cpp's ggml_vec_dot_q4_1_q8_1 / _q5_1_q8_1), the two terms added in that order.
template <typename Block>
float dot_q4_1_or_q5_1(const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  const auto* w = reinterpret_cast<const Block*>(w_row);
  const auto* x = reinterpret_cast<const BlockQ8_1*>(x_row);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK4_0; ++b) {
    int sumi = 0;
    for (int j = 0; j < kQK4_0; ++j) sumi += block32_level(w[b], j) * x[b].qs[j];
    sum += fp16_to_fp32(w[b].d) * fp16_to_fp32(x[b].d) * static_cast<float>(sumi) +
           fp16_to_fp32(w[b].m) * fp16_to_fp32(x[b].s);
  }
  return sum;
}

float dot_q4_1(const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  return dot_q4_1_or_q5_1<BlockQ4_1>(w_row, x_row, k);
}

float dot_q5_1(const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  return dot_q4_1_or_q5_1<BlockQ5_1>(w_row, x_row, k);
}

// Q2_K: Σ_g sc[g]·(q·x)[g] · d·dx − Σ_g m[g]·Σx[g] · dmin·dx over its 16 sub-blocks of 16, the mins
// term from the activation block's 16-element sums (llama.cpp's ggml_vec_dot_q2_K_q8_K).
float dot_q2_k(const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  const auto* w = reinterpret_cast<const BlockQ2_K*>(w_row);
  const auto* x = reinterpret_cast<const BlockQ8_K*>(x_row);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK_K; ++b) {
    int sum_scaled = 0;
    int sum_mins = 0;
    for (int g = 0; g < kQK_K / 16; ++g) {
      int dot = 0;
      for (int i = 0; i < 16; ++i) dot += q2_k_low_bits(w[b].qs, 16 * g + i) * x[b].qs[16 * g + i];
      sum_scaled += (w[b].scales[g] & 0xF) * dot;
      sum_mins += (w[b].scales[g] >> 4) * x[b].bsums[g];
    }
    sum += fp16_to_fp32(w[b].d) * x[b].d * static_cast<float>(sum_scaled) -
           fp16_to_fp32(w[b].dmin) * x[b].d * static_cast<float>(sum_mins);
  }
  return sum;
}

// Σ_sub scale[sub]·(q·x)[sub] · d·dx  −  Σ_sub min[sub]·Σx[sub] · dmin·dx; the mins term uses the
// activation block's precomputed 16-element sums. Q5_K adds each level's fifth bit (bit sub of
// qh[l]): levels 0..31 instead of 0..15.
template <typename Block>
float dot_q4_k_or_q5_k(const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  const auto* w = reinterpret_cast<const Block*>(w_row);
  const auto* x = reinterpret_cast<const BlockQ8_K*>(x_row);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK_K; ++b) {
    int sum_scaled = 0;
    int sum_mins = 0;
    for (int sub = 0; sub < 8; ++sub) {
      uint8_t scale, min;
      q4_k_scale_min(sub, w[b].scales, &scale, &min);
      const uint8_t* q = w[b].qs + 32 * (sub / 2);
      const int shift = (sub % 2) * 4;
      int dot = 0;
      for (int l = 0; l < 32; ++l) {
        int level = (q[l] >> shift) & 0xF;
        if constexpr (std::is_same_v<Block, BlockQ5_K>) level |= ((w[b].qh[l] >> sub) & 1) << 4;
        dot += level * x[b].qs[32 * sub + l];
      }
      sum_scaled += scale * dot;
      sum_mins += min * (x[b].bsums[2 * sub] + x[b].bsums[2 * sub + 1]);
    }
    sum += fp16_to_fp32(w[b].d) * x[b].d * static_cast<float>(sum_scaled) -
           fp16_to_fp32(w[b].dmin) * x[b].d * static_cast<float>(sum_mins);
  }
  return sum;
}

float dot_q4_k(const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  return dot_q4_k_or_q5_k<BlockQ4_K>(w_row, x_row, k);
}

float dot_q5_k(const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  return dot_q4_k_or_q5_k<BlockQ5_K>(w_row, x_row, k);
}

// Σ_sub scale[sub] · Σ kIQ4Values[index] · x over the super-block in integers (|sum| < 2^28), then
// one float term per super-block.
float dot_iq4_xs(const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  const auto* w = reinterpret_cast<const BlockIQ4_XS*>(w_row);
  const auto* x = reinterpret_cast<const BlockQ8_K*>(x_row);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK_K; ++b) {
    int sum_scaled = 0;
    for (int sub = 0; sub < 8; ++sub) {
      const uint8_t* q = w[b].qs + 16 * sub;
      const int8_t* xq = x[b].qs + 32 * sub;
      int dot = 0;
      for (int j = 0; j < 16; ++j) dot += kIQ4Values[q[j] & 0xF] * xq[j] + kIQ4Values[q[j] >> 4] * xq[j + 16];
      sum_scaled += iq4_xs_scale(w[b], sub) * dot;
    }
    sum += fp16_to_fp32(w[b].d) * x[b].d * static_cast<float>(sum_scaled);
  }
  return sum;
}

// Unsigned 6-bit value (0..63) of element e of a Q6_K block; the signed value is this minus 32.
int q6_k_unsigned(const BlockQ6_K& block, int e) {
  const int half = e / 128;
  const int run = (e % 128) / 32;  // which of the four 32-element runs of this half
  const int l = e % 32;
  const uint8_t low_byte = block.ql[64 * half + l + 32 * (run % 2)];
  const int low = run < 2 ? (low_byte & 0xF) : (low_byte >> 4);
  const int high = (block.qh[32 * half + l] >> (2 * run)) & 3;
  return low | (high << 4);
}

// Q3_K and Q6_K: Σ_g scale[g]·(level·x)[g] over the 16-element groups, on the unsigned levels (Q3_K's
// 0..7, Q6_K's 0..63), minus offset·Σ_g scale[g]·Σx[g] for their signed values (offset 4 or 32), in
// integers; one float term per super-block.
template <typename Block>
float dot_signed_groups16(const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  constexpr bool kQ6 = std::is_same_v<Block, BlockQ6_K>;
  constexpr int kOffset = kQ6 ? 32 : 4;
  const auto* w = reinterpret_cast<const Block*>(w_row);
  const auto* x = reinterpret_cast<const BlockQ8_K*>(x_row);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK_K; ++b) {
    int sum_scaled = 0;
    int sum_offset = 0;
    for (int g = 0; g < kQK_K / 16; ++g) {
      int dot = 0;
      for (int i = 0; i < 16; ++i) {
        const int e = 16 * g + i;
        int level;
        if constexpr (kQ6) {
          level = q6_k_unsigned(w[b], e);
        } else {
          level = q3_k_level(w[b], e);
        }
        dot += level * x[b].qs[e];
      }
      int scale;
      if constexpr (kQ6) {
        scale = w[b].scales[g];
      } else {
        scale = q3_k_scale(w[b], g);
      }
      sum_scaled += scale * dot;
      sum_offset += scale * x[b].bsums[g];
    }
    sum += fp16_to_fp32(w[b].d) * x[b].d * static_cast<float>(sum_scaled - kOffset * sum_offset);
  }
  return sum;
}

float dot_q3_k(const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  return dot_signed_groups16<BlockQ3_K>(w_row, x_row, k);
}

float dot_q6_k(const uint8_t* w_row, const uint8_t* x_row, int64_t k) {
  return dot_signed_groups16<BlockQ6_K>(w_row, x_row, k);
}

template <float (*Dot)(const uint8_t*, const float*, int64_t)>
void float_range(const MatmulOperands& op, int64_t o_begin, int64_t o_end) {
  for (int64_t r = 0; r < op.m; ++r) {
    const auto* x = reinterpret_cast<const float*>(op.x + r * op.x_stride);
    for (int64_t o = o_begin; o < o_end; ++o)
      op.y[r * op.y_stride + o] = Dot(op.w + o * op.w_stride, x, op.k);
  }
}

template <float (*Dot)(const uint8_t*, const uint8_t*, int64_t)>
void quant_range(const MatmulOperands& op, int64_t o_begin, int64_t o_end) {
  for (int64_t r = 0; r < op.m; ++r) {
    for (int64_t o = o_begin; o < o_end; ++o)
      op.y[r * op.y_stride + o] = Dot(op.w + o * op.w_stride, op.x + r * op.x_stride, op.k);
  }
}

// A packed matrix (kernels/packed_weights.hpp) read back a block at a time into the file's layout
// and dotted by the same function as the unpacked matrix: the same integer sums and float
// accumulation, so the same results.
template <DType kType, float (*Dot)(const uint8_t*, const uint8_t*, int64_t)>
void packed_range(const MatmulOperands& op, int64_t o_begin, int64_t o_end) {
  const TypeInfo& info = type_info(kType);
  const int64_t n_blocks = op.k / info.block_elems;
  const int64_t x_block_bytes = op.x_stride / n_blocks;  // Q8_0 or Q8_K blocks
  uint8_t block[kMaxBlockBytes];
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* panel = op.w + (o / kPanelRows) * op.w_stride;
    const int lane = static_cast<int>(o % kPanelRows);
    for (int64_t r = 0; r < op.m; ++r) op.y[r * op.y_stride + o] = 0.0f;
    for (int64_t b = 0; b < n_blocks; ++b) {
      unpack_panel_lane(kType, panel + b * packed_group_bytes(kType), lane, block);  // once for all rows
      for (int64_t r = 0; r < op.m; ++r)
        op.y[r * op.y_stride + o] += Dot(block, op.x + r * op.x_stride + b * x_block_bytes, info.block_elems);
    }
  }
}

void q8_0_block_info(const void* x_row, Q8_0BlockInfo* info, int64_t n_blocks) {
  const auto* x = static_cast<const BlockQ8_0*>(x_row);
  for (int64_t b = 0; b < n_blocks; ++b) {
    int sum = 0;
    for (int j = 0; j < kQK8_0; ++j) sum += x[b].qs[j];
    info[b] = {fp16_to_fp32(x[b].d), 8 * sum};
  }
}

void quantize_q8_0(const float* x, void* out, int64_t k) {
  for (int64_t b = 0; b < k / kQK8_0; ++b)
    quantize_activation_block_q8_0(x + b * kQK8_0, static_cast<BlockQ8_0*>(out) + b);
}

void quantize_q8_1(const float* x, void* out, int64_t k) {
  for (int64_t b = 0; b < k / kQK8_0; ++b)
    quantize_activation_block_q8_1(x + b * kQK8_0, static_cast<BlockQ8_1*>(out) + b);
}

void quantize_q8_k(const float* x, void* out, int64_t k) {
  for (int64_t b = 0; b < k / kQK_K; ++b)
    quantize_block_q8_k(x + b * kQK_K, static_cast<BlockQ8_K*>(out) + b);
}

void f16_dot_rows(const float* q, const uint16_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                  float scale, float* scores) {
  for (int64_t r = 0; r < n_rows; ++r) {
    float sum = 0.0f;
    for (int64_t d = 0; d < dim; ++d) sum += q[d] * fp16_to_fp32(rows[r * row_stride + d]);
    scores[r] = sum * scale;
  }
}

void f16_axpy_rows(const float* w, const uint16_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                   float* out) {
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t d = 0; d < dim; ++d) out[d] += w[r] * fp16_to_fp32(rows[r * row_stride + d]);
}

void q8_0_axpy_rows(const float* w, const uint8_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                    float* out) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const auto* blocks = reinterpret_cast<const BlockQ8_0*>(rows + r * row_stride);
    for (int64_t b = 0; b < dim / kQK8_0; ++b) {
      const float d = fp16_to_fp32(blocks[b].d);
      for (int64_t i = 0; i < kQK8_0; ++i)
        out[b * kQK8_0 + i] += w[r] * (d * static_cast<float>(blocks[b].qs[i]));
    }
  }
}

// Q4_0 / Q5_0 / IQ4_NL / Q4_1 / Q5_1 rows: the level's value (level - 8, level - 16, the IQ4 table's, or
// with a minimum d · level + m) times the weight.
template <typename Block>
void block32_axpy_rows(const float* w, const uint8_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                       float* out) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const auto* blocks = reinterpret_cast<const Block*>(rows + r * row_stride);
    for (int64_t b = 0; b < dim / kQK4_0; ++b) {
      const float d = fp16_to_fp32(blocks[b].d);
      for (int j = 0; j < kQK4_0; ++j) {
        const int level = block32_level(blocks[b], j);
        float value = d * static_cast<float>(level - 8);
        if constexpr (std::is_same_v<Block, BlockQ5_0>) value = d * static_cast<float>(level - 16);
        if constexpr (std::is_same_v<Block, BlockIQ4_NL>) value = d * static_cast<float>(kIQ4Values[level]);
        if constexpr (requires { blocks[b].m; })
          value = static_cast<float>(level) * d + fp16_to_fp32(blocks[b].m);
        out[b * kQK4_0 + j] += w[r] * value;
      }
    }
  }
}

void round_to_f16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = fp16_to_fp32(fp32_to_fp16(x[i]));
}

void softmax_to_f16(float* scores, int64_t n) {
  float max_score = scores[0];
  for (int64_t i = 1; i < n; ++i) max_score = scores[i] > max_score ? scores[i] : max_score;
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += scores[i] = std::exp(scores[i] - max_score);
  for (int64_t i = 0; i < n; ++i) scores[i] = fp16_to_fp32(fp32_to_fp16(scores[i] / sum));
}

void softmax_f32(float* scores, int64_t n) {
  float max_score = scores[0];
  for (int64_t i = 1; i < n; ++i) max_score = scores[i] > max_score ? scores[i] : max_score;
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += scores[i] = std::exp(scores[i] - max_score);
  for (int64_t i = 0; i < n; ++i) scores[i] /= sum;
}

const IsaKernels kScalarKernels{
    .name = "scalar",
    .f32 = float_range<dot_f32>,
    .f16 = float_range<dot_f16>,
    .bf16 = float_range<dot_bf16>,
    .q4_0 = quant_range<dot_block32<BlockQ4_0>>,
    .q4_1 = quant_range<dot_q4_1>,
    .q5_0 = quant_range<dot_block32<BlockQ5_0>>,
    .q5_1 = quant_range<dot_q5_1>,
    .q8_0 = quant_range<dot_block32<BlockQ8_0>>,
    .q2_k = quant_range<dot_q2_k>,
    .q3_k = quant_range<dot_q3_k>,
    .q4_k = quant_range<dot_q4_k>,
    .q5_k = quant_range<dot_q5_k>,
    .q6_k = quant_range<dot_q6_k>,
    .iq4_nl = quant_range<dot_block32<BlockIQ4_NL>>,
    .iq4_xs = quant_range<dot_iq4_xs>,
    .q4_0_packed = packed_range<DType::Q4_0, dot_block32<BlockQ4_0>>,
    .q8_0_packed = packed_range<DType::Q8_0, dot_block32<BlockQ8_0>>,
    .q4_1_packed = packed_range<DType::Q4_1, dot_q4_1>,
    .q5_0_packed = packed_range<DType::Q5_0, dot_block32<BlockQ5_0>>,
    .q5_1_packed = packed_range<DType::Q5_1, dot_q5_1>,
    .q2_k_packed = packed_range<DType::Q2_K, dot_q2_k>,
    .q3_k_packed = packed_range<DType::Q3_K, dot_q3_k>,
    .q4_k_packed = packed_range<DType::Q4_K, dot_q4_k>,
    .q5_k_packed = packed_range<DType::Q5_K, dot_q5_k>,
    .q6_k_packed = packed_range<DType::Q6_K, dot_q6_k>,
    .iq4_nl_packed = packed_range<DType::IQ4_NL, dot_block32<BlockIQ4_NL>>,
    .iq4_xs_packed = packed_range<DType::IQ4_XS, dot_iq4_xs>,
    .read_only = read_only_range,
    .quantize_q8_0 = quantize_q8_0,
    .quantize_q8_1 = quantize_q8_1,
    .quantize_q8_k = quantize_q8_k,
    .q8_0_block_info = q8_0_block_info,
    .f16_dot_rows = f16_dot_rows,
    .f16_axpy_rows = f16_axpy_rows,
    .q8_0_axpy_rows = q8_0_axpy_rows,
    .q4_1_axpy_rows = block32_axpy_rows<BlockQ4_1>,
    .q5_1_axpy_rows = block32_axpy_rows<BlockQ5_1>,
    .q4_0_axpy_rows = block32_axpy_rows<BlockQ4_0>,
    .q5_0_axpy_rows = block32_axpy_rows<BlockQ5_0>,
    .iq4_nl_axpy_rows = block32_axpy_rows<BlockIQ4_NL>,
    .round_to_f16 = round_to_f16,
    .softmax_to_f16 = softmax_to_f16,
    .softmax = softmax_f32,
};

}  // namespace

const IsaKernels& scalar_kernels() { return kScalarKernels; }

}  // namespace nibble::kernels::detail
