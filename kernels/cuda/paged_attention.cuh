#pragma once
// CUDA causal grouped-query attention of any batch of query tokens against the paged fp16 KV cache,
// with the interface of the CPU kernel (kernels::paged_attention): each token names its sequence (a
// row of block_tables) and its position, and attends to positions 0 .. pos of that sequence, which
// must be in the cache. This is the forward pass's general path: prompt chunks of any length, tokens
// of a sequence in any order, and head sizes attention_decode does not handle (it takes 64 and 128;
// this takes any head_dim up to 256). Decode and short verification batches go to attention_decode,
// which splits long contexts across blocks; this kernel does not split: one warp walks all pos + 1
// positions of its (token, head), so a query's cost is O(pos · head_dim) on one warp and a prompt
// chunk of c tokens at context L costs O(c · L) warp steps per head, each reading its K/V rows
// itself. For head_dim 64 and 128 the forward pass takes prefill_attention_f16 instead (the same
// arithmetic, K/V tiles shared by 32 query rows); this kernel is its reference and the path for
// other head sizes.
//
// KV cache device layout (one layer), as in attention_decode.cuh and worker::KvCache:
//   k_cache, v_cache: [num_blocks, block_size, n_head_kv, head_dim] __half
//   position p of sequence s lives in block block_tables[s][p / block_size], slot p % block_size.
// Query head h reads KV head h / (n_head / n_head_kv).
//
// Numerics: q·k in fp32 from fp16 q and K, fp32 online softmax (expf), fp32 accumulation of the
// weights times fp16 V, output rounded to fp16 once (as attention_decode; the CPU kernel rounds the
// normalized weights to fp16 before they meet V, which this cannot do without a second pass).
//
// Bad metadata found on the device (a position < 0 or beyond the table, a sequence row < 0, a block
// id outside [0, num_blocks)) sets *error_flag = 1 when given, and is never read through: such a
// token's output is zero, and positions in bad blocks are masked out. The flag is only ever set.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

constexpr int64_t kPagedAttentionMaxHeadDim = 256;

struct PagedAttentionShape {
  int64_t tokens = 0;
  int64_t n_head = 0;
  int64_t n_head_kv = 0;           // divides n_head
  int64_t head_dim = 0;            // even, at most kPagedAttentionMaxHeadDim
  int64_t block_size = 0;          // positions per KV block
  int64_t num_blocks = 0;          // blocks in the cache
  int64_t max_blocks_per_seq = 0;  // row stride of block_tables
};

// All pointers are device pointers.
// q:            [tokens, n_head, head_dim] __half, 4-byte aligned (RoPE already applied)
// k_cache:      [num_blocks, block_size, n_head_kv, head_dim] __half, 4-byte aligned
// v_cache:      same layout as k_cache
// block_tables: [n_seqs, max_blocks_per_seq] int32 block ids
// token_seq:    [tokens] int32 row of block_tables for each token
// token_pos:    [tokens] int32 position of each token
// out:          [tokens, n_head, head_dim] __half
// error_flag:   [1] int32 or nullptr
// scale: the softmax scale, usually 1 / sqrt(head_dim). tokens >= 0 (0: nothing to do).
// Enqueues one kernel on `stream`. Returns invalid_argument (nothing launched) for a bad argument,
// device_error if the launch fails.
Status paged_attention_f16(const PagedAttentionShape& shape, const __half* q, const __half* k_cache,
                           const __half* v_cache, const int32_t* block_tables, const int32_t* token_seq,
                           const int32_t* token_pos, float scale, __half* out, int32_t* error_flag,
                           cudaStream_t stream);

}  // namespace nibble::kernels::cuda
