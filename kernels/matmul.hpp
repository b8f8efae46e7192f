#pragma once
// Y = X · Wᵀ for weights stored in any weight DType, reading quantized blocks directly (weights are
// never expanded to float). Activations are quantized to 8 bits as llama.cpp does on the CPU (Q8_0 for
// the blocks of 32 with one scale, Q8_1 for Q4_1 / Q5_1, Q8_K for the K-quants and IQ4_XS); F32 / F16 /
// BF16 weights use float activations.
#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"
#include "kernels/thread_pool.hpp"

namespace nibble::kernels {

// Which SIMD implementation is in use: "avx512", "avx2" or "scalar". Chosen once at run time.
const char* matmul_isa();
// For tests and benchmarks: force an implementation ("scalar", "avx2", "avx512"); false when the
// CPU does not support it.
bool matmul_force_isa(const char* isa);

// Whether matmul takes weights of `type` (every DType but the activation-only Q8_1 and Q8_K).
bool matmul_supports(DType type);

// w: [n_out, k] in w_type, rows row_bytes(w_type, k) bytes apart
// x: [m, k] float
// y: [m, n_out] float
// k must be a multiple of w_type's block size.
Status matmul(DType w_type, const void* w, int64_t n_out, int64_t k, const float* x, int64_t m, float* y,
              ThreadPool& pool);

// Plain scalar reference of the same contract (dequantize each weight row, float dot products),
// used by tests. Does not quantize activations.
Status matmul_reference(DType w_type, const void* w, int64_t n_out, int64_t k, const float* x, int64_t m,
                        float* y);

}  // namespace nibble::kernels
