#pragma once
// The epilogue of the fp32 q/k/v projections in the CUDA forward pass, fused into one kernel:
//   q ← RoPE(q), rounded to fp16 into q_out (what attention reads);
//   k ← RoPE(k), v: rounded to fp16 and written into the paged KV cache at each token's position.
// This is the CPU forward pass's sequence (kernels::rope_normal on float, then fp32_to_fp16 when the
// row enters the cache, q rounded to fp16 by the attention kernel) with one rounding per value.
// RoPE is GGUF "normal" (Llama) mode with the CPU's angle recurrence and scaling (kernels::rope_normal
// with its RopeScaling): angles are bit-identical to the CPU's, only cosf/sinf differ (within 2 ulp),
// so an output is the CPU's value or its fp16 neighbour.
//
// KV cache device layout (one layer), the one attention_decode.cuh and paged_attention.cuh read:
//   k_cache, v_cache: [num_blocks, block_size, n_head_kv, head_dim] __half
//   token t (sequence row token_seq[t], position token_pos[t]) is written to block
//   block_tables[token_seq[t]][token_pos[t] / block_size], slot token_pos[t] % block_size.
// Tokens whose position is negative or beyond the table, or whose block id is outside
// [0, num_blocks), are not written and set *error_flag = 1 (when given; the flag is only ever set,
// zero it first). Their q row is still written. Two tokens naming the same slot race (the caller's
// bug; the CPU keeps the later one).
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/rope.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

struct RopeKvWriteShape {
  int64_t tokens = 0;
  int64_t n_head = 0;
  int64_t n_head_kv = 0;
  int64_t head_dim = 0;
  int64_t rot_dims = 0;  // leading dims of each head that rotate: even, 2 <= rot_dims <= min(head_dim, 1024)
  float rope_base = 10000.0f;
  // The CPU's scaling (linear, Llama 3.1's factors, YaRN; LlamaConfig::rope_scaling), except that
  // rope_scaling.freq_factors is a device pointer: [rot_dims / 2], each > 0, or nullptr.
  kernels::RopeScaling rope_scaling;
  int64_t q_stride = 0;   // floats between consecutive tokens' rows of q (>= n_head * head_dim)
  int64_t kv_stride = 0;  // floats between consecutive tokens' rows of k and of v (>= n_head_kv * head_dim)
  int64_t block_size = 0;
  int64_t num_blocks = 0;
  int64_t max_blocks_per_seq = 0;  // row stride of block_tables
};

// All pointers are device pointers.
// q:            [tokens, q_stride] float, head h of token t at q + t * q_stride + h * head_dim
// k, v:         [tokens, kv_stride] float, likewise with n_head_kv heads (q, k and v may be column
//               ranges of one fused [tokens, q_dim + 2 kv_dim] projection output)
// token_pos:    [tokens] int32 positions; token_seq: [tokens] int32 rows of block_tables
// block_tables: [n_seqs, max_blocks_per_seq] int32 block ids
// q_out:        [tokens, n_head, head_dim] __half
// k_cache, v_cache: one layer of the cache (see above)
// error_flag:   [1] int32 or nullptr
// tokens >= 0 (0: nothing to do). Enqueues one kernel on `stream` (one block per token and head;
// n_head + n_head_kv <= 65535).
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
// programmatic: launched as a programmatic dependent launch (dependent_launch.cuh): it may start while
// the kernel before it finishes, and waits for it before touching memory; the same results.
// What rope_kv_write asks of a shape's heads, rotation and cache (not of its tokens and strides):
// shared with the GEMV epilogue that does its work (w4a16_gemv_half2.cuh).
bool rope_kv_heads_and_cache_valid(const RopeKvWriteShape& shape);

Status rope_kv_write(const RopeKvWriteShape& shape, const float* q, const float* k, const float* v,
                     const int32_t* token_pos, const int32_t* token_seq, const int32_t* block_tables,
                     __half* q_out, __half* k_cache, __half* v_cache, int32_t* error_flag,
                     cudaStream_t stream, bool programmatic = false);

}  // namespace nibble::kernels::cuda
