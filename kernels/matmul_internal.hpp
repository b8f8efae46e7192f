#pragma once
// The contract between the matmul driver (matmul.cpp) and the per-ISA kernel sets.
#include <cstdint>

namespace nibble::kernels::detail {

// One matmul's operands after the activations have been prepared for the weight type.
struct MatmulOperands {
  const uint8_t* w;  // w: [n_out, k] in the weight type, rows w_stride bytes apart
  int64_t w_stride;
  const uint8_t* x;  // x: [m, k] as float (F32/F16/BF16 weights), Q8_0 (Q4_0/Q8_0) or Q8_K
  int64_t x_stride;  //    (Q4_K/Q6_K) blocks, rows x_stride bytes apart
  float* y;          // y: [m, n_out] floats, rows y_stride floats apart
  int64_t y_stride;
  int64_t m;
  int64_t k;
};

// Computes y[r, o] for every activation row r in [0, m) and output o in [o_begin, o_end).
using MatmulRangeFn = void (*)(const MatmulOperands& op, int64_t o_begin, int64_t o_end);
// Quantizes one activation row of k floats (k a multiple of the block size) into `out`.
using QuantizeActivationFn = void (*)(const float* x, void* out, int64_t k);

struct IsaKernels {
  const char* name;
  MatmulRangeFn f32;
  MatmulRangeFn f16;
  MatmulRangeFn bf16;
  MatmulRangeFn q4_0;
  MatmulRangeFn q8_0;
  MatmulRangeFn q4_k;
  MatmulRangeFn q6_k;
  QuantizeActivationFn quantize_q8_0;  // must give the same bytes as quantize_row(Q8_0)
  QuantizeActivationFn quantize_q8_k;  // must give the same bytes as quantize_row(Q8_K)
};

const IsaKernels& scalar_kernels();
// Defined only in x86 builds; callers check CPU support first.
const IsaKernels& avx2_kernels();
const IsaKernels& avx512_kernels();

}  // namespace nibble::kernels::detail
