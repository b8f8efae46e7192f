#pragma once
// Megatron-style splits of a Llama model over T tensor-parallel ranks and P pipeline stages. Pure
// functions; every one throws std::invalid_argument with the offending numbers when a split is
// impossible, so a bad --tensor/--pipeline choice fails at start-up rather than mid-load.
//
// Which dimension each function is for:
//   split_heads   attention: each rank owns whole query heads and the KV heads they read
//   split_rows    column-parallel weights (output features: ffn_up/ffn_gate rows, n_ff) and,
//                 with a granularity, row-parallel inputs (the k dimension of ffn_down/attn_output,
//                 which must stay whole quantization blocks: 32 for Q4_0/Q8_0, 256 for K-quants)
//   split_vocab   the output projection / embedding over n_vocab (uneven allowed)
//   split_layers  transformer blocks over pipeline stages (uneven allowed)

#include <cstddef>

namespace nibble::parallel {

// The half-open range [begin, begin + count) of some dimension that one rank holds.
struct ShardRange {
  size_t begin = 0;
  size_t count = 0;

  size_t end() const { return begin + count; }
  bool operator==(const ShardRange&) const = default;
};

struct HeadShard {
  ShardRange q_heads;   // query heads this rank computes
  ShardRange kv_heads;  // KV heads this rank holds (and caches)
  // True when T > n_head_kv: KV heads are copied, each to T / n_head_kv ranks, and kv_heads.count
  // is 1. The KV weights are then not split, only selected.
  bool kv_replicated = false;
};

// Query heads split evenly (n_head % tp_size == 0 required). KV heads (grouped-query attention,
// n_head % n_head_kv == 0) are split evenly when n_head_kv % tp_size == 0; otherwise they are
// replicated, which requires tp_size % n_head_kv == 0 so that each rank's query heads all read one
// KV head. E.g. n_head 8, n_head_kv 2, T 4: ranks 0,1 hold KV head 0; ranks 2,3 hold KV head 1.
HeadShard split_heads(size_t n_head, size_t n_head_kv, size_t tp_size, size_t tp_rank);

// An even split of n into tp_size parts whose size is a multiple of granularity (1: any size).
// Throws unless n % (tp_size * granularity) == 0.
ShardRange split_rows(size_t n, size_t tp_size, size_t tp_rank, size_t granularity = 1);

// n_vocab over tp_size ranks; the first n_vocab % tp_size ranks get one extra row. Requires
// n_vocab >= tp_size.
ShardRange split_vocab(size_t n_vocab, size_t tp_size, size_t tp_rank);

// Contiguous blocks of layers per stage, as even as possible; the first n_layer % pipeline stages
// get one extra. Requires n_layer >= pipeline (a stage without layers is a configuration error).
ShardRange split_layers(size_t n_layer, size_t pipeline, size_t stage);

}  // namespace nibble::parallel
