#pragma once
// The half2 GEMV: one activation row times group-wise INT4 weights (kernels/int4_groups.hpp, the
// row-major layout as stored) on the CUDA cores in fp16 pairs, for batch-1 decode. Why: the fp32
// GEMVs (w4a16_gemv.cuh) spend three to six instructions a weight, and an H200 issues about 8 T
// thread-instructions a second per TB/s of 4-bit weights, so they cannot stream the weights near
// copy bandwidth whatever the memory does (docs/perf/gpu.md, "Static instruction counts"). Here a
// weight costs about two: the levels become fp16 pairs in place (a LOP3 per pair), q - z is one
// half2 op a pair, the product and sum one HFMA2 a pair (int4_unit_half2_dot), and a 32-weight unit's
// fp16 sum goes into fp32 with its group's scale. The sums of 16 products in fp16 are the price
// (about 2^-11 of a unit's sum each, TensorRT-LLM's weight-only GEMV accumulates likewise), so this is
// a load-time candidate (w4a16_tuning.cuh), chosen only where it is measurably faster.
// Design: 8 warps a block, 2 weight rows a warp (16 a block); the block stages the whole activation
// row in shared memory once, in the order the level pairs need, scaled by a power of two so that
// |x| <= 64 (the fp16 sums cannot overflow; the power is undone in fp32 at the end); each lane then
// reads its units (16 bytes, a warp's 32 lanes one contiguous 512-byte run of a row) four at a time
// for both rows, the first four before the activations are staged. Its epilogues (below) end a row
// pair in the next step's work for batch-1 decode: RoPE and the KV write, SwiGLU, or the residual add
// and RMSNorm (by the last block to finish).
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "kernels/cuda/rope_kv_write.cuh"
#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// The most inputs the half2 GEMV takes: its shared memory holds the whole activation row in fp16.
constexpr int64_t kW4A16GemvHalf2MaxK = 96 * 1024;

// quants: [n_out, k / 2] bytes, 16-byte aligned; scales: [n_out, k / group] fp16; zeros: [n_out,
// k / group] bytes (w4a16_gemv_int4_groups's layout); x: [1, k] fp16, 16-byte aligned; y: [1, n_out]
// fp32. m must be 1 (the signature is the other group-wise launchers'). Every zero must be at most 31
// (as int4_groups_from_blocks makes them): the fp16 sums' overflow bound counts on |q - z| <= 31.
// invalid_argument for m != 1, k not a multiple of 32 or over kW4A16GemvHalf2MaxK (or over what the
// device's blocks can hold in shared memory: 2 bytes an input), a group other than 32, 64 or 128
// dividing k, null or misaligned pointers.
Status w4a16_gemv_int4_groups_half2(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                    int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                    float* y, cudaStream_t stream, bool programmatic = false);

// The same on GGUF Q4_K super-blocks as stored (w4a16_gemv_q4_k's layout): each sub-block's 32 levels,
// centred on the level nearest weight 0 (z), summed against their activations in fp16, then (d scale)
// times that sum plus (d scale z - dmin min) times the activations' sum, in fp32
// (w4a16::q4_k_chunk_half2_dot: a large activation on a weight near 0 adds almost nothing to the fp16
// sums). w: [n_out, k / 256] blocks, 16-byte
// aligned; x: [1, k] fp16, 16-byte aligned; y: [1, n_out] fp32. invalid_argument for m != 1, k not a
// multiple of 256 or over kW4A16GemvHalf2MaxK (or over what the device's blocks can hold in shared
// memory: 2.125 bytes an input), null or misaligned pointers.
Status w4a16_gemv_q4_k_half2(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                             cudaStream_t stream, bool programmatic = false);

// The same on GGUF Q6_K in planes (w4a16_gemv_q6_k's layout, kernels/q6_k_planes.hpp): each sub-block's
// 16 levels summed against their activations in fp16 (w4a16::q6_k_piece_half2_dot), then times d *
// scale in fp32. w: the [n_out, k] planes, 16-byte aligned; x: [1, k] fp16, 16-byte aligned; y: [1,
// n_out] fp32. invalid_argument for m != 1, k not a multiple of 256 or over kW4A16GemvHalf2MaxK (or
// over what the device's blocks can hold in shared memory: 2 bytes an input), null or misaligned
// pointers.
Status w4a16_gemv_q6_k_half2(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                             cudaStream_t stream, bool programmatic = false);

// Whether this device's blocks hold the shared memory the half2 GEMVs need for rows of k inputs (INT4
// groups and Q6_K: 2 bytes an input and the same static shared memory; or Q4_K when q4_k) with every one
// of their epilogues below (the launchers refuse a row that
// does not fit with invalid_argument). Remembered per device and k.
bool w4a16_gemv_half2_fits(int64_t k, bool q4_k);

// The INT4 GEMV's block shapes: warps a block, units a lane loads at once per row (16 bytes each), and
// persistent blocks (no more than the device's SMs hold at once, each taking row pairs gridDim.x *
// warps apart, so that it stages the activations once for all of them), or registers capped for a
// third block an SM (min_blocks 3). Each sums every row's units in the same order, so all give the bits
// of w4a16_gemv_int4_groups_half2 (the first one): the fastest is chosen per matrix shape at load
// (w4a16_tuning's tune_int4_groups), and the kernel table times them all (bench-gpu).
struct Half2GemvVariant {
  int warps = 8;
  int batch = 4;
  bool persistent = false;
  int min_blocks = 1;  // blocks an SM the registers must leave room for (__launch_bounds__)
};
inline constexpr Half2GemvVariant kHalf2GemvVariants[] = {
    {8, 4, false, 1}, {8, 4, true, 1},   {4, 4, false, 1}, {4, 4, true, 1}, {8, 8, false, 1},
    {8, 8, true, 1},  {16, 2, false, 1}, {16, 4, true, 1}, {8, 4, false, 3}};
inline constexpr int kHalf2GemvVariantCount =
    static_cast<int>(sizeof kHalf2GemvVariants / sizeof kHalf2GemvVariants[0]);
// "8w b4", "8w b4 pers", "8w b4 3/SM", ...
std::string half2_gemv_variant_name(const Half2GemvVariant& variant);
// The block shape an INT4 launch asked for `shape` (an index into kHalf2GemvVariants) runs on: the
// shape itself, or 0 (the default) at a group other than 128 (the other shapes are built for group
// 128 only) or, for the residual add + RMSNorm epilogue (`norm`), where the shape cannot carry its
// one-block tail (persistent, or not one block of 256 threads); -1 for an index out of range.
int half2_gemv_effective_shape(int shape, int64_t group, bool norm);
// Whether the shapes other than the default run: true unless the environment sets
// NIBBLE_HALF2_DEFAULT_SHAPE (to anything but 0), a switch for a GPU session should one of them
// misbehave on a device. Off, w4a16_gemv_int4_groups_half2_shape / _variant refuse the others, the
// fused epilogues run on the default (half2_gemv_effective_shape gives 0), and tune_int4_groups times
// the default alone.
bool half2_gemv_shapes_enabled();
// w4a16_gemv_int4_groups_half2 as `variant` (one of kHalf2GemvVariants, else invalid_argument); the
// variants other than the first are built for group 128 only (invalid_argument for other groups).
// The same by index into kHalf2GemvVariants (out of range refused).
Status w4a16_gemv_int4_groups_half2_shape(int shape, const uint8_t* quants, const __half* scales,
                                          const uint8_t* zeros, int64_t group, int64_t n_out, int64_t k,
                                          const __half* x, int64_t m, float* y, cudaStream_t stream,
                                          bool programmatic = false);
Status w4a16_gemv_int4_groups_half2_variant(const Half2GemvVariant& variant, const uint8_t* quants,
                                            const __half* scales, const uint8_t* zeros, int64_t group,
                                            int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                                            cudaStream_t stream, bool programmatic = false);

// Fused epilogues for batch-1 decode (on INT4 groups, Q4_K as stored and Q6_K in planes): the product's
// rows end in the next step's work instead of an
// fp32 row that another kernel reads back (a launch, and a write and read of the rows, fewer a layer).
// Each writes bit for bit what the plain half2 GEMV above followed by that kernel writes (a row's sum
// does not depend on the row sharing its warp), and refuses what either would refuse, but for no rows
// (n_ff 0: nothing to do, as for the plain GEMV, where swiglu_f32_to_f16 refuses). The INT4 ones
// take a block shape (`shape`, an index into kHalf2GemvVariants, out of range refused; every shape
// gives the same bits): the default shape where that one cannot carry the epilogue (the norm's tail
// needs one block of 256 threads and no persistent loop) or the group is not 128.
//
// SwiGLU: w is the stacked gate / up projection, [2 n_ff, k] (gate rows, then up rows; the plain
// GEMV's layout otherwise); act: [1, n_ff] fp16, silu(gate) * up as swiglu_f32_to_f16 writes it.
Status w4a16_gemv_int4_groups_half2_swiglu(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                           int64_t group, int64_t n_ff, int64_t k, const __half* x,
                                           __half* act, cudaStream_t stream, bool programmatic = false,
                                           int shape = 0);
Status w4a16_gemv_q4_k_half2_swiglu(const uint8_t* w, int64_t n_ff, int64_t k, const __half* x, __half* act,
                                    cudaStream_t stream, bool programmatic = false);
Status w4a16_gemv_q6_k_half2_swiglu(const uint8_t* w, int64_t n_ff, int64_t k, const __half* x, __half* act,
                                    cudaStream_t stream, bool programmatic = false);  // w: [2 n_ff, k] planes

// The residual add and RMSNorm after the product (the attention output or down projection, one token):
// y = W x as w4a16_gemv_int4_groups_half2 writes it ([1, n_out] fp32), then residual += y and h =
// RMSNorm(residual) * norm_weight as add_rms_norm_f32(residual, y, norm_weight, h, 1, n_out, eps)
// writes them, bit for bit, by the last of the GEMV's blocks to finish (one launch instead of two).
// residual: [1, n_out] fp32; norm_weight: [n_out]; h: [1, n_out] fp16 (none may overlap y). counter:
// one uint32, zero before the call (cudaMemset once); the call leaves it zero.
Status w4a16_gemv_int4_groups_half2_add_norm(const uint8_t* quants, const __half* scales,
                                             const uint8_t* zeros, int64_t group, int64_t n_out, int64_t k,
                                             const __half* x, float* y, float* residual,
                                             const float* norm_weight, float eps, __half* h,
                                             unsigned* counter, cudaStream_t stream,
                                             bool programmatic = false, int shape = 0);
Status w4a16_gemv_q4_k_half2_add_norm(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, float* y,
                                      float* residual, const float* norm_weight, float eps, __half* h,
                                      unsigned* counter, cudaStream_t stream, bool programmatic = false);
Status w4a16_gemv_q6_k_half2_add_norm(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, float* y,
                                      float* residual, const float* norm_weight, float eps, __half* h,
                                      unsigned* counter, cudaStream_t stream, bool programmatic = false);

// RoPE and the KV cache write: w is one token's stacked q / k / v projection, [q_dim + 2 kv_dim, k]
// (q_dim = n_head head_dim, kv_dim = n_head_kv head_dim of `shape`); then what rope_kv_write does
// with that row (its arguments and layouts: q_out [1, q_dim] fp16, the cache at the token's slot, the
// flag raised and the cache untouched for a bad slot). shape.tokens must be 1 and head_dim even (a
// warp's two rows are a rotation pair); the strides are not used.
Status w4a16_gemv_int4_groups_half2_rope_kv(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                            int64_t group, const RopeKvWriteShape& shape, int64_t k,
                                            const __half* x, const int32_t* token_pos,
                                            const int32_t* token_seq, const int32_t* block_tables,
                                            __half* q_out, __half* k_cache, __half* v_cache,
                                            int32_t* error_flag, cudaStream_t stream,
                                            bool programmatic = false, int block_shape = 0);
Status w4a16_gemv_q4_k_half2_rope_kv(const uint8_t* w, const RopeKvWriteShape& shape, int64_t k,
                                     const __half* x, const int32_t* token_pos, const int32_t* token_seq,
                                     const int32_t* block_tables, __half* q_out, __half* k_cache,
                                     __half* v_cache, int32_t* error_flag, cudaStream_t stream,
                                     bool programmatic = false);
Status w4a16_gemv_q6_k_half2_rope_kv(const uint8_t* w, const RopeKvWriteShape& shape, int64_t k,
                                     const __half* x, const int32_t* token_pos, const int32_t* token_seq,
                                     const int32_t* block_tables, __half* q_out, __half* k_cache,
                                     __half* v_cache, int32_t* error_flag, cudaStream_t stream,
                                     bool programmatic = false);  // w: [q_dim + 2 kv_dim, k] planes

}  // namespace nibble::kernels::cuda
