#pragma once
// A quantized paged KV cache on the device (llama.cpp's --cache-type-k / -v: Q8_0, Q5_1, Q5_0, Q4_1,
// Q4_0, IQ4_NL), read by the fp16 attention kernels through a one-layer fp16 working copy:
//   1. kv_cache_dequantize_blocks: the blocks a step attends over, from the quantized layer into the
//      working copy (the same block ids, so the attention kernels' block tables stay as they are);
//   2. the step's K and V rows are written into the working copy as for an fp16 cache (rope_kv_write or
//      a GEMV epilogue);
//   3. kv_cache_store_positions: each new position's rows rotated (llama.cpp's attention rotation, when
//      asked), quantized into the cache, and written back into the working copy as the cache now holds
//      them, so that this step attends over what later steps will read;
//   4. hadamard_rotate_f16 on the queries (and on the attention's output, for V's rotation).
// The working copy costs one layer's fp16 K and V; the attention reads it at fp16's bytes, and the
// dequantization reads the quantized blocks once more and writes the copy: about 2.5x an fp16 cache's
// attention traffic, for 1.9x (Q8_0) to 3.6x (Q4_0) the positions in the same memory. So decode steps
// skip step 1 and read the blocks as stored (attention_decode_quantized, attention_decode.cuh: the same
// values, turned into fp16 inside the kernel); prompt steps' attention kernels read the copy.
//
// Quantized layer layout: worker::KvCache's, [num_blocks, block_size, kv_dim / 32 blocks of the type]
// bytes (kv_dim = n_head_kv * head_dim, a multiple of 32), so a cache's bytes mean the same on the CPU
// and the GPU. The working copy: [num_blocks, block_size, kv_dim] __half, the fp16 cache's layout.
// Quantization is GGML's reference rounding (kernels::quantize_cache_row, bit for bit: the block
// functions, kv_cache_blocks.cuh, are __host__ __device__ and tested on the host against it).
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// The cache types this file handles (F16 on a side: that side is an ordinary fp16 cache, untouched).
constexpr bool kv_cache_quant_type(DType type) {
  return type == DType::Q8_0 || type == DType::Q5_1 || type == DType::Q5_0 || type == DType::Q4_1 ||
         type == DType::Q4_0 || type == DType::IQ4_NL;
}

struct KvCacheQuantShape {
  int64_t n_head_kv = 0;
  int64_t head_dim = 0;  // n_head_kv * head_dim: a multiple of 32, at most kKvCacheQuantMaxKvDim
  int64_t block_size = 0;
  int64_t num_blocks = 0;
  int64_t max_blocks_per_seq = 0;  // row stride of block_tables
  DType k_type = DType::F16;       // F16 or kv_cache_quant_type
  DType v_type = DType::F16;
};
constexpr int64_t kKvCacheQuantMaxKvDim = 8192;

// All pointers are device pointers; a side whose type is F16 is skipped and its pointers may be null.
// block_tables: [n_rows, max_blocks_per_seq] int32 block ids
// last_block:   [n_rows] int32: row r's blocks 0 .. last_block[r] are dequantized (-1: none)
// k_cache, v_cache: one quantized layer (see above), 8-byte aligned (checked)
// k_work, v_work:   [num_blocks, block_size, kv_dim] __half, 16-byte aligned (checked)
// A block id outside [0, num_blocks) is skipped and sets *error_flag = 1 (when given). Blocks shared by
// rows (prefix caching) are written by each with the same values. One kernel on `stream`.
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status kv_cache_dequantize_blocks(const KvCacheQuantShape& shape, int64_t n_rows, const int32_t* block_tables,
                                  const int32_t* last_block, const uint8_t* k_cache, const uint8_t* v_cache,
                                  __half* k_work, __half* v_work, int32_t* error_flag, cudaStream_t stream);

// token_pos:  [tokens] int32 positions; token_seq: [tokens] int32 rows of block_tables
// k_work, v_work: as above, holding the tokens' new K and V rows at their slots
// k_rotation_block, v_rotation_block: 0 (no rotation) or the power of two (2 .. 1024, dividing
//   head_dim) that llama.cpp's rotation multiplies each side by (kernels::hadamard_rotate's transform)
//   before quantizing it; ignored for an F16 side
// A token whose slot is invalid (rope_kv_write's rule) is skipped and sets *error_flag = 1. The tokens'
// slots must be distinct (two tokens on one slot race: each reads and rewrites the row). One kernel.
Status kv_cache_store_positions(const KvCacheQuantShape& shape, int64_t tokens, int64_t k_rotation_block,
                                int64_t v_rotation_block, const int32_t* token_pos, const int32_t* token_seq,
                                const int32_t* block_tables, __half* k_work, __half* v_work, uint8_t* k_cache,
                                uint8_t* v_cache, int32_t* error_flag, cudaStream_t stream);

// x: [rows, width] __half, each run of `block` values (a power of two, 2 .. 1024, dividing width)
// multiplied in place by H_block / sqrt(block) in fp32 (kernels::hadamard_rotate's operations) and
// rounded to fp16 once. One kernel.
Status hadamard_rotate_f16(__half* x, int64_t rows, int64_t width, int64_t block, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
