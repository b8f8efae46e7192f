#pragma once
// CUDA decode GEMV for GGUF Q4_0 weights and fp16 activations (fp32 accumulation):
//   y[m, n_out] = x[m, k] · W[n_out, k]ᵀ,  1 <= m <= 32 (the memory-bound decode shape).
// Weights are read straight from the GGUF layout (kernels::BlockQ4_0, 18 bytes per 32 elements:
// fp16 scale d, element j in the low nibble of qs[j] and element j+16 in the high nibble, value
// (q - 8) * d), or repacked into the split layout of kernels/q4_0_split.hpp, whose nibbles are one
// aligned 16-byte load per block (w4a16_gemv_q4_0_split; bit-identical results). Also: group-wise
// INT4 (GPTQ / AWQ style, kernels/int4_groups.hpp) and GGUF Q4_K super-blocks, read as stored.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// Largest number of activation rows one call handles.
constexpr int64_t kW4A16GemvMaxM = 32;

// All pointers are device pointers.
// w: [n_out, k / 32] Q4_0 blocks (BlockQ4_0), rows k / 32 * 18 bytes apart, 2-byte aligned
// x: [m, k] __half, row-major (rows k apart), 16-byte aligned
// y: [m, n_out] float, row-major (rows n_out apart)
// k must be a multiple of 32 and 1 <= m <= 32. Enqueues one kernel on `stream` (asynchronous);
// programmatic: as a programmatic dependent launch (kernels/cuda/dependent_launch.cuh: its blocks
// may be scheduled before the previous kernel ends and wait for its results; the same results). Returns
// invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status w4a16_gemv_q4_0(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic = false);

// The same product from the split layout (kernels::split_q4_0), all device pointers:
// quants: [n_out, k / 2] bytes, 16-byte aligned; scales: [n_out, k / 32] __half, 2-byte aligned;
// x, y, k, m as above. Returns what w4a16_gemv_q4_0 returns, bit-identical results.
Status w4a16_gemv_q4_0_split(const uint8_t* quants, const __half* scales, int64_t n_out, int64_t k,
                             const __half* x, int64_t m, float* y, cudaStream_t stream,
                             bool programmatic = false);

// Group-wise INT4 (kernels/int4_groups.hpp), all device pointers:
// quants: [n_out, k / 2] bytes, 16-byte aligned; scales: [n_out, k / group] __half, 2-byte aligned;
// zeros: [n_out, k / group] bytes; weight (q - z) * s. group: 32, 64 or 128, dividing k. x, y, m as
// above. At group 32 with every zero 8 the results equal w4a16_gemv_q4_0_split's bit for bit.
Status w4a16_gemv_int4_groups(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                              int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                              cudaStream_t stream, bool programmatic = false);

// The same product at one activation row (m == 1; invalid_argument otherwise) computed as
// scale * sum x * (q - z) per 32-input unit (w4a16::int4_unit_level_dot) with the activations widened
// to fp32 in shared memory once per block: about three instructions a weight instead of six, for
// batch-1 decode, where the one above is bound by the SMs' issue rate (docs/perf/gpu.md). Not the
// same bits as w4a16_gemv_int4_groups (the scale multiplies the unit's sum, not each weight); the
// same error bound. A load-time candidate for one row (w4a16_tuning.cuh).
Status w4a16_gemv_int4_groups_staged(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                     int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                     float* y, cudaStream_t stream, bool programmatic = false);

// GGUF Q4_K (kernels::BlockQ4_K, 144 bytes per 256 weights), read as stored:
// w: [n_out, k / 256] blocks, rows k / 256 * 144 bytes apart, 16-byte aligned; k a multiple of 256.
// Each weight is (d * scale) * q - dmin * min rounded as kernels::dequantize_row rounds it.
Status w4a16_gemv_q4_k(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic = false);

// GGUF Q8_0 (kernels::BlockQ8_0, 34 bytes per 32 weights), read as stored: 8-bit matrices (a Q8_0
// model's, and the heads `nibble quantize` keeps at Q8_0), 8.5 bits a weight instead of fp16's 16.
// w: [n_out, k / 32] blocks, rows k / 32 * 34 bytes apart, 2-byte aligned; k a multiple of 32. Each
// weight is d * level, exactly as kernels::dequantize_row computes it.
Status w4a16_gemv_q8_0(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic = false);

// GGUF Q6_K (kernels::BlockQ6_K, 210 bytes per 256 weights) repacked into planes at load
// (kernels/q6_k_planes.hpp, the same bytes in 16-byte loads): the 6-bit matrices of a Q4_K_M file
// (llama.cpp keeps attn_v, half the ffn_down and the output there), 6.56 bits a weight instead of
// fp16's 16 for cuBLAS. w: q6_k_planes_from_blocks's [n_out, k] planes, 16-byte aligned; k a multiple
// of 256. Each weight is (d * scale) * level rounded as kernels::dequantize_row rounds it.
Status w4a16_gemv_q6_k(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic = false);

// The other GGUF types, read as stored (w4a16_weights.cuh's readers): Q4_1, Q5_0, Q5_1, IQ4_NL (32-weight
// blocks), Q2_K, Q3_K, Q5_K, IQ4_XS (256-weight super-blocks), and the types Nibble reads but does not
// write (kernels/read_only_quants.hpp: the i-quants IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M,
// the ternary TQ1_0 and TQ2_0, and MXFP4's 32-weight blocks), so that a file of them keeps its size on the
// device instead of fp16's 16 bits a weight.
inline constexpr DType kW4A16GgufBlockTypes[] = {
    DType::Q4_1,  DType::Q5_0,   DType::Q5_1,    DType::IQ4_NL, DType::Q2_K,  DType::Q3_K,
    DType::Q5_K,  DType::IQ4_XS, DType::IQ2_XXS, DType::IQ2_XS, DType::IQ2_S, DType::IQ3_XXS,
    DType::IQ3_S, DType::IQ1_S,  DType::IQ1_M,   DType::TQ1_0,  DType::TQ2_0, DType::MXFP4};
// True for those types.
constexpr bool w4a16_reads_gguf_blocks(DType type) {
  for (const DType t : kW4A16GgufBlockTypes) {
    if (t == type) return true;
  }
  return false;
}
// w: [n_out, k / block] blocks as in the file (kernels::row_bytes(type, k) bytes a row), aligned as the
// type's block size allows (1 to 16 bytes; a cudaMalloc'd matrix is); k a multiple of the type's block.
// Each weight is kernels::dequantize_row's value. x, y, m as above. unsupported_type for another type.
Status w4a16_gemv_gguf_blocks(DType type, const uint8_t* w, int64_t n_out, int64_t k, const __half* x,
                              int64_t m, float* y, cudaStream_t stream, bool programmatic = false);

}  // namespace nibble::kernels::cuda
