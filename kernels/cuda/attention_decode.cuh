#pragma once
// CUDA attention of a few query tokens per sequence against the paged fp16 KV cache: decode (one
// query per sequence) and speculative verification (up to k + 1 queries per sequence, causal among
// themselves). Grouped-query attention: query head h reads KV head h / (n_head / n_head_kv).
// Long contexts are split along the sequence (flash-decoding): each (split, KV head, sequence) block
// keeps an online fp32 softmax over its positions and writes an unnormalized partial; a second
// kernel combines a sequence's partials. Both kernels run on `stream`, in order.
//
// KV cache device layout (one layer), the same as worker::KvCache and kernels::paged_attention:
//   k_cache, v_cache: [num_blocks, block_size, n_head_kv, head_dim] __half
//   position p of sequence s lives in block block_tables[s][p / block_size], slot p % block_size.
//
// Query tokens are grouped by sequence: sequence s owns tokens query_start[s] .. query_start[s+1]-1
// (n_q of them), and they are its last n_q positions: query i sits at position
// seq_lens[s] - n_q + i and attends to positions 0 .. that position (all K/V, the queries' own
// included, are in the cache before the call, as in the CPU forward pass).
//
// Numerics: q·k in fp32 from fp16 q and K, fp32 online softmax (expf), fp32 accumulation of the
// weights times fp16 V, output rounded to fp16 once. Unlike the CPU kernel, the softmax weights are
// not rounded to fp16 before meeting V (the normalizer is not known yet when they do).
//
// Bad metadata found on the device (a sequence with n_q < 0 or n_q > max_q_len or query tokens
// outside [0, tokens), seq_lens[s] < n_q or beyond max_seq_len or the table's capacity, a block id
// outside [0, num_blocks)) sets *error_flag = 1 when error_flag is given, and never reads or writes
// out of bounds: lengths are clamped, bad blocks are masked out, queries that see no position get a
// zero output, and the output rows of a sequence whose query range is bad are left unwritten.
// The flag is only ever set: zero it before the call.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// Query rows one KV head's block handles at once: max_q_len * (n_head / n_head_kv) <= this.
constexpr int64_t kAttentionMaxRowsPerKvHead = 64;

struct DecodeAttentionShape {
  int64_t n_seqs = 0;
  int64_t tokens = 0;     // query tokens in q / out (query_start[n_seqs] on the device)
  int64_t max_q_len = 1;  // bound on every sequence's n_q: 1 for decode, k + 1 for verification
  int64_t n_head = 0;
  int64_t n_head_kv = 0;           // divides n_head
  int64_t head_dim = 0;            // 64 or 128
  int64_t block_size = 0;          // positions per KV block
  int64_t num_blocks = 0;          // blocks in the cache (block ids must be below this)
  int64_t max_blocks_per_seq = 0;  // row stride of block_tables
  int64_t max_seq_len = 0;         // bound on every seq_lens[s]; sizes the split grid
  int64_t split_tokens = 0;        // KV positions per split: 0 picks one, else a multiple of 32
};

// Bytes of scratch attention_decode needs for this shape (the fp32 partials of every split).
size_t attention_decode_workspace_bytes(const DecodeAttentionShape& shape);

// All pointers are device pointers.
// q:            [tokens, n_head, head_dim] __half, 16-byte aligned (RoPE already applied)
// k_cache:      [num_blocks, block_size, n_head_kv, head_dim] __half, 16-byte aligned
// v_cache:      same layout as k_cache
// block_tables: [n_seqs, max_blocks_per_seq] int32 block ids
// seq_lens:     [n_seqs] int32 positions of each sequence in the cache, its queries' included
// query_start:  [n_seqs + 1] int32, non-decreasing; sequence s's queries are tokens
//               query_start[s] .. query_start[s+1]-1 (attention_decode_quantized: see query_end)
// out:          [tokens, n_head, head_dim] __half, 16-byte aligned
// workspace:    attention_decode_workspace_bytes(shape) bytes, 16-byte aligned
// error_flag:   [1] int32 or nullptr (see above)
// scale: the softmax scale, usually 1 / sqrt(head_dim).
// Returns invalid_argument (nothing launched) for a bad argument, device_error if a launch fails.
// programmatic: both kernels launched as programmatic dependent launches (dependent_launch.cuh): each
// may start while the kernel before it finishes, and waits for it before touching memory; the same
// results.
// combine_counters: [n_seqs, n_head_kv] uint32 or nullptr. Given, they must be zero before the call
// (cudaMemset once after allocating them); the call leaves them zero. With them the combining pass
// runs inside the first kernel (the last split of each sequence and KV head to finish combines), one
// launch instead of two, with the same bits.
Status attention_decode(const DecodeAttentionShape& shape, const __half* q, const __half* k_cache,
                        const __half* v_cache, const int32_t* block_tables, const int32_t* seq_lens,
                        const int32_t* query_start, float scale, __half* out, void* workspace,
                        size_t workspace_bytes, int32_t* error_flag, cudaStream_t stream,
                        bool programmatic = false, unsigned* combine_counters = nullptr);

// The same attention over a cache whose sides may be quantized as stored (llama.cpp's --cache-type-k /
// -v; kv_cache_quant.cuh's layout and types): each tile's blocks are read straight from the cache and
// turned into fp16 as kv_cache_dequantize_blocks would write them into a working copy, so the outputs are
// attention_decode's over that copy bit for bit, at the quantized bytes' traffic (Q8_0 0.53x fp16's)
// instead of the copy's ~2.5x.
// k_type / v_type: F16 (that side as attention_decode's k_cache / v_cache, 16-byte aligned) or a type
//   kv_cache_quant_type admits, that side then one quantized layer, [num_blocks, block_size, kv_dim / 32
//   blocks] bytes, 4-byte aligned, readable up to the next 4-byte boundary after its last block (a block
//   is read as the aligned 32-bit words that cover it; worker::CudaKvCache pads each side to 256 bytes).
// query_end: [n_seqs] int32 or nullptr. Given, sequence s's queries are tokens query_start[s] ..
//   query_end[s] - 1 (query_start then needs n_seqs entries): the sequences need not cover the batch, so
//   the decode and verification runs of a batch that also holds prompt chunks take this kernel and the
//   other tokens' rows of `out` are left to another (vLLM's split of a mixed batch).
// Everything else as attention_decode's; invalid_argument for a type outside these.
Status attention_decode_quantized(const DecodeAttentionShape& shape, const __half* q, const void* k_cache,
                                  DType k_type, const void* v_cache, DType v_type,
                                  const int32_t* block_tables, const int32_t* seq_lens,
                                  const int32_t* query_start, float scale, __half* out, void* workspace,
                                  size_t workspace_bytes, int32_t* error_flag, cudaStream_t stream,
                                  bool programmatic = false, unsigned* combine_counters = nullptr,
                                  const int32_t* query_end = nullptr);

}  // namespace nibble::kernels::cuda
