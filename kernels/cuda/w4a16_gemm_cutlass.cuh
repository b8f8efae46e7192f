#pragma once
// Group-wise INT4 weights times fp16 activations for many rows on Hopper, through CUTLASS's
// mixed-input GEMM (the warp-specialized wgmma main loop fed by TMA that widens the 4-bit operand to
// fp16 in registers; vLLM's Machete grew from it):
//   y[m, n_out] = x[m, k] · W[n_out, k]ᵀ
// Why a library here: our own tensor-core kernels use mma.sync, Ampere's instruction, and the best of
// them with dequant + cuBLAS reached 0.30-0.32x of fp16 cuBLAS at 256 rows on an H200 (docs/perf/gpu.md).
// Hopper's full tensor-core rate needs wgmma with operands staged by TMA and warp-specialized
// pipelines, which is what CUTLASS is for.
//
// Built only when CMake finds CUTLASS (the nvidia-cutlass wheel, or NIBBLE_CUTLASS_DIR) and 90 is
// among the CUDA architectures; this file is then compiled for sm_90a, wgmma's target. Elsewhere the
// launcher returns unsupported_type and w4a16_cutlass_supported() is false.
//
// The weights are a copy in CUTLASS's order, made on the device from kernels/int4_groups.hpp's
// layout (Int4CutlassWeights). Numerics: CUTLASS's zero-point form, w = q · scale + offset with
// offset = fp16(-scale · zero), evaluated in fp16 registers, then fp16 products summed in fp32; so
// each weight can differ from (q - zero) · scale by a few fp16 roundings, not bit for bit.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// One matrix [n_out, k] in the order the CUTLASS GEMM reads it. All device pointers.
struct Int4CutlassWeights {
  const uint8_t* quants = nullptr;  // [n_out * k / 2] bytes: the unsigned 4-bit levels, reordered
                                    // so each thread's wgmma fragment is contiguous (CUTLASS's
                                    // compute_memory_reordering_atom over 16 x 16 tiles)
  const __half* scales = nullptr;   // [k / group, n_out]: group g's scale of row r at g * n_out + r
  const __half* offsets = nullptr;  // [k / group, n_out]: fp16(-scale · zero), the same order
  int64_t n_out = 0;
  int64_t k = 0;
  int64_t group = 0;
};

// Whether this build holds the CUTLASS GEMM.
bool w4a16_cutlass_built();
// Whether it can run on the current device: built, the device is compute capability 9.0, and the
// environment does not set NIBBLE_DISABLE_CUTLASS (to anything but 0): a switch for a GPU session to
// run everything else should this GEMM misbehave on a device (its tests then skip, the benchmark
// leaves its columns out, cutlass_gemm is refused).
bool w4a16_cutlass_supported();

// Whether these shapes are ones the GEMM takes: n_out a multiple of 128 (whole weight tiles of either
// schedule: CUTLASS's examples never cut a tile of the reordered operand, so neither do we), k of 64,
// group 64 or 128 dividing k (the main loop's k step is 64 and a group must cover whole steps),
// n_out · k < 2^31. Every Llama matrix qualifies; only the activation rows may end mid-tile.
bool int4_cutlass_shape_ok(int64_t n_out, int64_t k, int64_t group);

// Bytes of one matrix's copy: the nibbles, then the scales, then the offsets, each 256-byte aligned.
size_t int4_cutlass_bytes(int64_t n_out, int64_t k, int64_t group);

// Where the copy keeps the weight of row `row`, input `j`: its index in 4-bit elements from
// Int4CutlassWeights::quants (CUTLASS's reordered layout, evaluated on the host, as the device repack
// evaluates it); -1 outside the shape, for a shape int4_cutlass_shape_ok refuses at group 64, or in a
// build without CUTLASS. For tests.
int64_t int4_cutlass_element_position(int64_t n_out, int64_t k, int64_t row, int64_t j);

// Fills `out` (device memory of int4_cutlass_bytes, 256-byte aligned) from one matrix in
// kernels/int4_groups.hpp's layout and points `weights` into it.
// quants: [n_out, k / 2] bytes; scales: [n_out, k / group] fp16 bits; zeros: [n_out, k / group]
// Returns invalid_argument for a null pointer or a shape int4_cutlass_shape_ok refuses,
// device_error if a launch fails. Enqueues a memset and two kernels on `stream`.
Status int4_cutlass_from_groups(const uint8_t* quants, const uint16_t* scales, const uint8_t* zeros,
                                int64_t n_out, int64_t k, int64_t group, void* out,
                                Int4CutlassWeights* weights, cudaStream_t stream);

// The configurations built (each sums 64 inputs a step in k order with no split of k, so a row's
// outputs do not depend on how many other rows share the call):
//   cooperative_128:  128 weight rows x 128 activation rows a tile, the weight rows split between two
//                     consumer warpgroups (prefill sizes)
//   pingpong_64:      64 x 128, the warpgroups on alternate tiles; twice the tiles, for few activation
//                     rows, where 128-row tiles leave SMs idle (8192 outputs: 64 tiles)
//   pingpong_64x16:   64 x 16 (wgmma's n = 16): decode batches of up to 16 rows without computing 112
//                     rows of zeros, the layout Machete serves every batch size from; whether wgmma
//                     can stream 4-bit weights near copy bandwidth here is what the kernel table asks
enum class CutlassSchedule { cooperative_128, pingpong_64, pingpong_64x16 };

// CUTLASS's own check (can_implement: alignments, the group against the k step) of a product of these
// shapes on `schedule`, run on the host with stand-in operands: false for shapes int4_cutlass_shape_ok
// refuses, or in a build without CUTLASS. For tests.
bool w4a16_gemm_int4_cutlass_implementable(int64_t n_out, int64_t k, int64_t group, int64_t m,
                                           CutlassSchedule schedule);

// x: [m, k] __half; y: [m, n_out] float, every element written; any m >= 1. x, y and the copy's three
// arrays 16-byte aligned (TMA reads and writes them; CUTLASS itself checks only shapes and strides, and
// a misaligned base would fault on the device, so it is refused here).
// This configuration's persistent tile scheduler needs no device workspace, so the call allocates
// nothing and can be captured in a CUDA graph (device_error should CUTLASS ever ask for one).
// Returns unsupported_type when !w4a16_cutlass_supported(), invalid_argument for a bad argument,
// device_error if CUTLASS refuses the problem or the launch fails.
Status w4a16_gemm_int4_cutlass(const __half* x, const Int4CutlassWeights& weights, int64_t m, float* y,
                               cudaStream_t stream,
                               CutlassSchedule schedule = CutlassSchedule::cooperative_128);

}  // namespace nibble::kernels::cuda
