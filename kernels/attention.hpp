#pragma once
// Causal grouped-query attention of a batch of query tokens against a paged KV cache. Tokens of
// several sequences can share one call (continuous batching, speculative verification): each token
// names its sequence (a row of block_tables) and its position, and attends to positions 0..pos of
// that sequence, which must already be in the cache.
#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"
#include "kernels/thread_pool.hpp"

namespace nibble::kernels {

struct PagedAttentionShape {
  int64_t tokens = 0;
  int64_t n_head = 0;
  int64_t n_head_kv = 0;  // divides n_head; query head h reads KV head h / (n_head / n_head_kv)
  int64_t head_dim = 0;
  int64_t block_size = 0;          // positions per KV block
  int64_t max_blocks_per_seq = 0;  // row stride of block_tables
};

// q: [tokens, n_head, head_dim]
// k_cache, v_cache: [n_blocks, block_size, n_head_kv, head_dim] fp16 bits (one layer). fp16 halves
//   the cache and is llama.cpp's default; like ggml, q and the softmax weights are rounded to fp16
//   before they meet the cache, so results match llama.cpp closely.
// block_tables: [n_seqs, max_blocks_per_seq] block ids; position p of sequence s lives in block
//   block_tables[s][p / block_size], slot p % block_size
// token_seq: [tokens] row of block_tables for each token
// token_pos: [tokens] position of each token
// out: [tokens, n_head, head_dim]
Status paged_attention(const PagedAttentionShape& shape, const float* q, const uint16_t* k_cache,
                       const uint16_t* v_cache, const int32_t* block_tables, const int32_t* token_seq,
                       const int32_t* token_pos, float scale, float* out, ThreadPool& pool);

// The same over a quantized cache (llama.cpp's --cache-type-k / -v, each side its own type): every
// cached position's K (V) row of n_head_kv * head_dim values is stored as blocks of 32 of `k_type`
// (`v_type`): Q8_0 (an fp16 scale and 32 int8, 17/32 of fp16's bytes), Q4_0, Q4_1, Q5_0, Q5_1 or IQ4_NL
// (9/32 to 12/32), or F16 on one side; head_dim a multiple of 32. As ggml's flash attention does, each
// query head is quantized to K's activation blocks (Q8_1 for Q4_1 and Q5_1, Q8_0 for the others) and its
// scores are that type's matmul dot products (an F16 K: the query rounded to fp16, as paged_attention);
// the softmax weights meet V, read back as floats, in f32 (an F16 V: the weights rounded to fp16 first,
// as paged_attention and llama.cpp without flash attention, which is how it runs a quantized K alone).
// Other types: unsupported_type.
// k_cache: [n_blocks, block_size, row_bytes(k_type, n_head_kv * head_dim)] bytes (one layer); v_cache
// likewise with v_type. The other buffers as paged_attention's.
Status paged_attention_quantized(const PagedAttentionShape& shape, DType k_type, DType v_type, const float* q,
                                 const uint8_t* k_cache, const uint8_t* v_cache, const int32_t* block_tables,
                                 const int32_t* token_seq, const int32_t* token_pos, float scale, float* out,
                                 ThreadPool& pool);
// Whether a quantized cache side can be of `type` (F16 is paged_attention's, and either side's).
bool paged_attention_quantized_takes(DType type);

// The plain loops paged_attention_quantized is tested against (one thread, no ISA kernels): the query
// rounded through K's activation blocks (or fp16), K and V dequantized, sums in double.
Status paged_attention_quantized_reference(const PagedAttentionShape& shape, DType k_type, DType v_type,
                                           const float* q, const uint8_t* k_cache, const uint8_t* v_cache,
                                           const int32_t* block_tables, const int32_t* token_seq,
                                           const int32_t* token_pos, float scale, float* out);

}  // namespace nibble::kernels
