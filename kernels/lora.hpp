#pragma once
// The two products of a LoRA update y += scale * B (A x) on a batch's rows (Punica's and vLLM's
// "shrink" and "expand"), with the factors stored as fp16 and transposed, so that each product is a
// run of contiguous multiply-adds: A x reads Aᵀ a row of `rank` at a time, B (A x) reads Bᵀ a row of
// n_out at a time. Both are tiled so that a factor is read once a call, not once a row (decode is
// bound by reading them: fp16 halves that against fp32). AVX2 + FMA + F16C where matmul_isa() is not
// "scalar" (matmul_force_isa chooses for tests); the scalar functions are the reference.
#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"
#include "kernels/thread_pool.hpp"

namespace nibble::kernels {

// ax[i] = scale * A x[rows[i]] for i < n_rows.
// a_t: [k, rank] fp16 (Aᵀ); x: [*, k] (row rows[i] is read); rows: [n_rows]; ax: [n_rows, rank].
Status lora_shrink(const f16_bits* a_t, int64_t k, int64_t rank, float scale, const float* x,
                   const int64_t* rows, int64_t n_rows, float* ax, ThreadPool& pool);
// y[rows[i]] += B ax[i] for i < n_rows, each row's update summed apart and added to y once.
// b_t: [rank, n_out] fp16 (Bᵀ); ax: [n_rows, rank]; rows: [n_rows]; y: [*, n_out].
Status lora_expand(const f16_bits* b_t, int64_t rank, int64_t n_out, const float* ax, const int64_t* rows,
                   int64_t n_rows, float* y, ThreadPool& pool);

// The plain loops (the reference the tests hold the fast path to).
Status lora_shrink_reference(const f16_bits* a_t, int64_t k, int64_t rank, float scale, const float* x,
                             const int64_t* rows, int64_t n_rows, float* ax);
Status lora_expand_reference(const f16_bits* b_t, int64_t rank, int64_t n_out, const float* ax,
                             const int64_t* rows, int64_t n_rows, float* y);

namespace detail {
// The AVX2 bodies: shrink's partial sums over inputs [c_begin, c_end) of every row into partial
// [n_rows, rank] (unscaled), expand over outputs [o_begin, o_end).
void lora_shrink_avx2(const f16_bits* a_t, int64_t k, int64_t rank, const float* x, const int64_t* rows,
                      int64_t n_rows, int64_t c_begin, int64_t c_end, float* partial);
void lora_expand_avx2(const f16_bits* b_t, int64_t rank, int64_t n_out, const float* ax, const int64_t* rows,
                      int64_t n_rows, int64_t o_begin, int64_t o_end, float* y);
}  // namespace detail

}  // namespace nibble::kernels
