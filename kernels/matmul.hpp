#pragma once
// Y = X · Wᵀ for weights stored in any DType, reading quantized blocks directly (weights are never
// expanded to float). Activations are quantized to 8 bits (Q8_0 for Q4_0/Q8_0 weights, Q8_K for
// K-quants) as llama.cpp does on the CPU; F32/F16/BF16 weights use float activations.
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
