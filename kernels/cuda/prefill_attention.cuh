#pragma once
// Tiled causal attention for prompt chunks against the paged fp16 KV cache (FlashAttention-style:
// online softmax over key tiles staged in shared memory and shared by a tile of queries). A block
// takes one tile (up to prefill_attention_tile_tokens consecutive batch tokens of one sequence at
// consecutive positions) and one KV head with its query heads: 32 query rows (tokens x heads of the
// group) against the tile's causal window, 32 key positions at a time. Each cached K/V row is read
// once per tile and KV head instead of once per query and head (paged_attention_f16's cost).
//
// Arithmetic is paged_attention_f16's step for step (q·k in fp32 in dimension order with fmaf, the
// same key tiles of 32 from position 0, the same warp reductions, expf, accumulation order and
// final rounding), so its outputs equal paged_attention_f16's bit for bit; the GPU test checks that.
// head_dim 64 or 128 (the Llama shapes; others take paged_attention_f16).
//
// Layout, bad metadata and the error flag as in paged_attention.cuh. A tile that is not a run (its
// tokens of different sequences or not at consecutive positions, a count outside 1..tile_tokens, or
// past the batch) also sets the flag; its tokens' outputs for that KV head (the first tile_tokens of them
// inside the batch) are then zero.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/paged_attention.cuh"
#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// Query rows a block handles: tile tokens x query heads per KV head.
constexpr int64_t kPrefillAttentionRows = 32;

// Tokens per tile for this head grouping (32 / (n_head / n_head_kv)); 0 when the grouping does not
// fit a tile (more than 32 query heads per KV head) or is invalid.
int64_t prefill_attention_tile_tokens(int64_t n_head, int64_t n_head_kv);

// All pointers are device pointers; q, k_cache, v_cache, block_tables, token_seq, token_pos, out,
// error_flag and scale as in paged_attention_f16.
// tiles: [n_tiles, 2] int32: (first batch token, token count), covering every token once.
// shape.head_dim must be 64 or 128. Enqueues one kernel (grid n_tiles x n_head_kv) on `stream`.
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status prefill_attention_f16(const PagedAttentionShape& shape, const __half* q, const __half* k_cache,
                             const __half* v_cache, const int32_t* block_tables, const int32_t* token_seq,
                             const int32_t* token_pos, const int32_t* tiles, int64_t n_tiles, float scale,
                             __half* out, int32_t* error_flag, cudaStream_t stream);

// The same attention on the tensor cores (FlashAttention-2's schedule on mma.sync): a block takes 64
// query rows (tile tokens x query heads of one KV head; 4 warps of 16 rows) and walks the keys 64 at a
// time, K and V staged by cp.async two chunks deep; S = Q K^T and O += P V are m16n8k16 mmas (fp16
// operands, fp32 sums), the online softmax in fp32 on the accumulators (exp2 of scores prescaled by
// log2 e). Why: the CUDA-core kernel above spends two fp32 FMAs a query row, key and dimension and
// shares each key tile among 32 rows, so long prompts are bound by its FMAs (a 4k-token Llama-70B
// prompt: ~2e13 flops of attention); here the tensor cores do them. Numerics differ from the CUDA-core
// kernel's: the unnormalized weights P are rounded to fp16 to meet V (FlashAttention's rounding, where
// the CPU rounds the normalized weights), and the sums run in the mma's order; the GPU test bounds it
// against the CPU. Tiles as above, up to prefill_attention_mma_tile_tokens tokens each.
constexpr int64_t kPrefillAttentionMmaRows = 64;
// 64 / (n_head / n_head_kv) rounded down (a grouping that does not divide 64, Llama-3.2-3B's 3, leaves
// the last rows of a tile empty), 0 for more than 64 query heads a KV head or an invalid grouping.
int64_t prefill_attention_mma_tile_tokens(int64_t n_head, int64_t n_head_kv);
// Arguments as prefill_attention_f16's, but q, k_cache and v_cache 16-byte aligned (cp.async) and
// tiles of up to prefill_attention_mma_tile_tokens tokens. Needs ~88 KB of shared memory a block at
// head_dim 128 (compute capability 8.0 and later); invalid_argument where the device has less.
Status prefill_attention_mma_f16(const PagedAttentionShape& shape, const __half* q, const __half* k_cache,
                                 const __half* v_cache, const int32_t* block_tables, const int32_t* token_seq,
                                 const int32_t* token_pos, const int32_t* tiles, int64_t n_tiles, float scale,
                                 __half* out, int32_t* error_flag, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
