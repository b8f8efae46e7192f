#pragma once
// The contract between the drivers (matmul.cpp, attention.cpp) and the per-ISA kernel sets.
#include <cstdint>

#include "kernels/quant_types.hpp"

namespace nibble::kernels::detail {

// What the packed Q4_0 kernels need of each Q8_0 activation block besides its quants, computed
// once per matmul: the scale as float, and 8·Σq, the block's share of the Q4_0 offset
// (Σ(w−8)·x = Σw·x − 8·Σx, so the kernels can multiply the unsigned nibbles directly).
struct Q8_0BlockInfo {
  float d;
  int32_t sum_times_8;
};

// One matmul's operands after the activations have been prepared for the weight type.
struct MatmulOperands {
  const uint8_t* w;  // w: [n_out, k] in the weight type, rows w_stride bytes apart
  int64_t w_stride;
  const uint8_t* x;  // x: [m, k] as float (F32/F16/BF16 weights), Q8_0 (blocks of 32), Q8_1 (Q4_1,
  int64_t x_stride;  //    Q5_1) or Q8_K (K-quants, IQ4_XS) blocks, rows x_stride bytes apart
  float* y;          // y: [m, n_out] floats, rows y_stride floats apart
  int64_t y_stride;
  int64_t m;
  int64_t k;
  // Only for packed Q4_0, Q5_0 and IQ4_NL weights (w then points to 8-row panels, w_stride bytes apart, see
  // kernels/packed_weights.hpp): [m, k/32] block infos of the activation rows, row-major. The other
  // packed types need none (Q8_1 and Q8_K blocks carry their sums).
  const Q8_0BlockInfo* x_info = nullptr;
};

// Computes y[r, o] for every activation row r in [0, m) and output o in [o_begin, o_end).
using MatmulRangeFn = void (*)(const MatmulOperands& op, int64_t o_begin, int64_t o_end);
// Quantizes one activation row of k floats (k a multiple of the block size) into `out`.
using QuantizeActivationFn = void (*)(const float* x, void* out, int64_t k);

// The tables (matmul_scalar.cpp, matmul_x86_impl.hpp) name every field (designated initializers), so
// a field added here in one place and listed elsewhere in a table cannot shift the others silently.
struct IsaKernels {
  const char* name;
  MatmulRangeFn f32;
  MatmulRangeFn f16;
  MatmulRangeFn bf16;
  MatmulRangeFn q4_0;
  MatmulRangeFn q4_1;
  MatmulRangeFn q5_0;
  MatmulRangeFn q5_1;
  MatmulRangeFn q8_0;
  MatmulRangeFn q2_k;
  MatmulRangeFn q3_k;
  MatmulRangeFn q4_k;
  MatmulRangeFn q5_k;
  MatmulRangeFn q6_k;
  MatmulRangeFn iq4_nl;
  MatmulRangeFn iq4_xs;
  // Q4_0 packed in 8-row panels × Q8_0 activations with x_info; o_begin is a multiple of 8.
  MatmulRangeFn q4_0_packed;
  // Q8_0 packed in 8-row panels × Q8_0 activations; o_begin is a multiple of 8.
  MatmulRangeFn q8_0_packed;
  // Q4_1 / Q5_1 packed in 8-row panels × Q8_1 activations, Q5_0 × Q8_0 activations with x_info; o_begin
  // is a multiple of 8.
  MatmulRangeFn q4_1_packed;
  MatmulRangeFn q5_0_packed;
  MatmulRangeFn q5_1_packed;
  // Q2_K ... Q6_K and IQ4_XS packed in 8-row panels × Q8_K activations; o_begin is a multiple of 8.
  MatmulRangeFn q2_k_packed;
  MatmulRangeFn q3_k_packed;
  MatmulRangeFn q4_k_packed;
  MatmulRangeFn q5_k_packed;
  MatmulRangeFn q6_k_packed;
  // IQ4_NL packed in 8-row panels (Q4_0's layout) × Q8_0 activations with x_info; o_begin is a multiple
  // of 8.
  MatmulRangeFn iq4_nl_packed;
  MatmulRangeFn iq4_xs_packed;
  // The kernel of a type kernels/read_only_quants.hpp reads (kernels/read_only_quants_impl.hpp compiled for
  // this set); nullptr for another type.
  MatmulRangeFn (*read_only)(DType w_type);
  QuantizeActivationFn quantize_q8_0;  // must give the same bytes as quantize_activations(Q8_0)
  QuantizeActivationFn quantize_q8_1;  // must give the same bytes as quantize_activations(Q8_1)
  QuantizeActivationFn quantize_q8_k;  // must give the same bytes as quantize_row(Q8_K)
  // Fills info[0, n_blocks) for one Q8_0 activation row.
  void (*q8_0_block_info)(const void* x_row, Q8_0BlockInfo* info, int64_t n_blocks);
  // Attention over fp16 KV-cache rows (attention.cpp), n_rows rows of dim values, row_stride apart:
  // scores[r] = scale * sum_d q[d] * rows[r][d], and out[d] += sum_r w[r] * rows[r][d].
  void (*f16_dot_rows)(const float* q, const uint16_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                       float scale, float* scores);
  void (*f16_axpy_rows)(const float* w, const uint16_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                        float* out);
  // The same over Q8_0 cache rows (dim a multiple of 32: dim / 32 blocks, rows row_stride bytes apart):
  // out[d] += sum_r w[r] * (the row's block scale * its int8 value at d). The scores' side is the Q8_0
  // matmul (q8_0 above) with the query quantized to Q8_0.
  void (*q8_0_axpy_rows)(const float* w, const uint8_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                         float* out);
  // The same over Q4_1 and Q5_1 rows (value d · level + m).
  void (*q4_1_axpy_rows)(const float* w, const uint8_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                         float* out);
  void (*q5_1_axpy_rows)(const float* w, const uint8_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                         float* out);
  // The same over Q4_0, Q5_0 and IQ4_NL rows (value d · (level - 8), d · (level - 16), d ·
  // kIQ4Values[level]).
  void (*q4_0_axpy_rows)(const float* w, const uint8_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                         float* out);
  void (*q5_0_axpy_rows)(const float* w, const uint8_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                         float* out);
  void (*iq4_nl_axpy_rows)(const float* w, const uint8_t* rows, int64_t row_stride, int64_t n_rows,
                           int64_t dim, float* out);
  // x[0, n) rounded to the nearest fp16 value (ties to even), in place.
  void (*round_to_f16)(float* x, int64_t n);
  // scores[0, n) (n >= 1) replaced by their softmax, each probability rounded to fp16.
  void (*softmax_to_f16)(float* scores, int64_t n);
  // The same without the rounding (the Q8_0 cache's weights meet V as floats, as in ggml).
  void (*softmax)(float* scores, int64_t n);
};

// The kernel set in use: the best the CPU supports, or the one matmul_force_isa() chose.
const IsaKernels& active_kernels();

const IsaKernels& scalar_kernels();
// Defined only in x86 builds; callers check CPU support first.
const IsaKernels& avx2_kernels();
const IsaKernels& avx512_kernels();

}  // namespace nibble::kernels::detail
