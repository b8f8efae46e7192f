#pragma once
// Group-wise INT4 weights (kernels/int4_groups.hpp) times fp16 activations through cuBLAS:
//   y[m, n_out] = x[m, k] · W[n_out, k]ᵀ
// by dequantizing W to fp16 a chunk of rows at a time into a scratch buffer and multiplying each
// chunk with cublasGemmEx (fp32 accumulation). For many rows this beats our own INT4 GEMMs: on an H200
// (2026-12-04, docs/perf/gpu.md) the mma GEMM took 214-280 us on 8192 x 8192 at 32-256 rows where fp16
// cuBLAS took 36-54, and dequantizing costs about one pass over the fp16 weights. vLLM's AWQ layer
// takes the same route from 256 tokens on. The model's load-time timing (w4a16_tuning.cuh) decides
// where it is used.
//
// Numerics: each weight (q - zero) · scale rounded once to fp16, as the tensor-core kernels do; cuBLAS
// sums in fp32 in its own order (deterministic for a given handle, shape and workspace, but not the
// order of our kernels).
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// All pointers are device pointers.
// quants, scales, zeros: one matrix [n_out, k] as w4a16_gemv_int4_groups takes it
//   (kernels/cuda/w4a16_gemv_mma.cuh: quants 16-byte aligned, group 32, 64 or 128 dividing k)
// out: [rows, k] __half, 16-byte aligned: rows row_begin .. row_begin + rows - 1 of W
// Returns invalid_argument (nothing launched) for a bad argument or rows outside [0, n_out),
// device_error if the launch fails. One kernel on `stream`.
Status dequantize_int4_groups_f16(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                  int64_t group, int64_t n_out, int64_t k, int64_t row_begin, int64_t rows,
                                  __half* out, cudaStream_t stream);

// What the cuBLAS path needs besides the operands: a handle (set to the call's stream when it is on
// another; give it the stream and its workspace beforehand to use it inside graph capture) and a
// scratch buffer for the dequantized chunks.
struct Int4CublasContext {
  cublasHandle_t cublas = nullptr;
  __half* scratch = nullptr;   // [scratch_halves] device memory, 16-byte aligned
  int64_t scratch_halves = 0;  // at least k: one row of W
};

// Rows of W per chunk for this scratch: as many as fit, rounded down to a multiple of 128 (cuBLAS's
// tile) when at least 128 fit, at most n_out; 0 when not even one row fits.
int64_t int4_cublas_chunk_rows(const Int4CublasContext& context, int64_t n_out, int64_t k);

// quants, scales, zeros, group, n_out, k, x, m, y: as w4a16_gemv_int4_groups (x: [m, k] __half,
// 16-byte aligned; y: [m, n_out] float, every element written); any m >= 1. Enqueues, per chunk of
// int4_cublas_chunk_rows rows, one dequantizing kernel and one cublasGemmEx on `stream` (the chunks
// share the scratch, so they run in stream order). Returns invalid_argument for a bad argument or a
// scratch smaller than one row, device_error if a launch or cuBLAS call fails.
Status w4a16_int4_groups_dequant_cublas(const Int4CublasContext& context, const uint8_t* quants,
                                        const __half* scales, const uint8_t* zeros, int64_t group,
                                        int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                                        cudaStream_t stream);

// GGUF Q8_0 blocks as stored and Q6_K in planes (w4a16_gemv_q8_0's and w4a16_gemv_q6_k's layouts: 2-
// and 16-byte aligned, k a multiple of 32 / 256) through cuBLAS the same way, for the many-row products where
// their CUDA-core GEMV runs out of FMAs and the WMMA GEMM is far below cuBLAS: each weight is
// kernels::dequantize_row's value rounded once to fp16 (what the fp16 upload of these types computed
// before they stayed as stored). Arguments and errors as w4a16_int4_groups_dequant_cublas's.
Status w4a16_q8_0_dequant_cublas(const Int4CublasContext& context, const uint8_t* w, int64_t n_out, int64_t k,
                                 const __half* x, int64_t m, float* y, cudaStream_t stream);
Status w4a16_q6_k_dequant_cublas(const Int4CublasContext& context, const uint8_t* w, int64_t n_out, int64_t k,
                                 const __half* x, int64_t m, float* y, cudaStream_t stream);
// The other GGUF types as stored (w4a16_gemv_gguf_blocks's types and layout) the same way: each weight
// kernels::dequantize_row's value rounded once to fp16. Errors as above; unsupported_type for a type
// without a reader (w4a16_reads_gguf_blocks).
Status w4a16_gguf_blocks_dequant_cublas(const Int4CublasContext& context, DType type, const uint8_t* w,
                                        int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                                        cudaStream_t stream);

// The same two on group-wise INT4 in the tensor-core GEMV's chunks (kernels/int4_tiles.hpp): the
// same halves out, so the same products. tiles: [int4_tiles_bytes(n_out, k, group)] bytes, 16-byte
// aligned; the rest as above.
Status dequantize_int4_tiles_f16(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k,
                                 int64_t row_begin, int64_t rows, __half* out, cudaStream_t stream);
Status w4a16_int4_tiles_dequant_cublas(const Int4CublasContext& context, const uint8_t* tiles, int64_t group,
                                       int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                                       cudaStream_t stream);

}  // namespace nibble::kernels::cuda
