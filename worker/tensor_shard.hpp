#pragma once
// Megatron tensor parallelism as the forward pass sees it: which shard of the model this process
// holds (TensorShard), the split arithmetic that decides what each shard owns, and the two
// collectives the forward pass needs (ShardReducer). Header-only and standard-library-only, so that
// parallel/ (which sits above worker/) can reuse the split functions and implement ShardReducer
// over a Communicator without worker/ knowing about MPI.
//
// The split functions throw std::invalid_argument with the offending numbers when a split is
// impossible, so a bad --tensor/--pipeline choice fails at start-up rather than mid-load.
//   split_heads   attention: each rank owns whole query heads and the KV heads they read
//   split_rows    column-parallel weights (output features: ffn_up/ffn_gate rows, n_ff) and,
//                 with a granularity, row-parallel inputs (the k dimension of ffn_down/attn_output,
//                 which must stay whole quantization blocks: 32 for Q4_0/Q8_0, 256 for K-quants)
//   split_vocab   the output projection / embedding over n_vocab (uneven allowed)
//   split_layers  transformer blocks over pipeline stages (uneven allowed)
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace nibble::worker {

// This process's place in a tensor-parallel group of `size` shards.
struct TensorShard {
  int rank = 0;
  int size = 1;
};

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

namespace shard_detail {

inline std::string str(size_t value) { return std::to_string(value); }

inline void check_part(const char* what, size_t parts, size_t index) {
  if (parts == 0) throw std::invalid_argument(std::string(what) + ": the number of parts must be >= 1");
  if (index >= parts) {
    throw std::invalid_argument(std::string(what) + ": index " + str(index) + " outside [0, " + str(parts) +
                                ")");
  }
}

// Uneven contiguous split: the first n % parts parts get one extra element.
inline ShardRange split_uneven(size_t n, size_t parts, size_t index) {
  const size_t base = n / parts;
  const size_t extra = n % parts;
  const size_t begin = index * base + (index < extra ? index : extra);
  return {begin, base + (index < extra ? 1 : 0)};
}

}  // namespace shard_detail

// Query heads split evenly (n_head % tp_size == 0 required). KV heads (grouped-query attention,
// n_head % n_head_kv == 0) are split evenly when n_head_kv % tp_size == 0; otherwise they are
// replicated, which requires tp_size % n_head_kv == 0 so that each rank's query heads all read one
// KV head. E.g. n_head 8, n_head_kv 2, T 4: ranks 0,1 hold KV head 0; ranks 2,3 hold KV head 1.
// Either way a rank's local query head i reads its local KV head i / (n_head / n_head_kv), the
// same grouping as the unsharded model.
inline HeadShard split_heads(size_t n_head, size_t n_head_kv, size_t tp_size, size_t tp_rank) {
  using shard_detail::str;
  shard_detail::check_part("split_heads", tp_size, tp_rank);
  if (n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0) {
    throw std::invalid_argument("split_heads: n_head " + str(n_head) +
                                " must be a positive multiple of n_head_kv " + str(n_head_kv));
  }
  if (n_head % tp_size != 0) {
    throw std::invalid_argument("split_heads: " + str(n_head) +
                                " query heads cannot be split evenly over tensor size " + str(tp_size));
  }
  HeadShard shard;
  const size_t q_per_rank = n_head / tp_size;
  shard.q_heads = {tp_rank * q_per_rank, q_per_rank};
  if (n_head_kv % tp_size == 0) {
    const size_t kv_per_rank = n_head_kv / tp_size;
    shard.kv_heads = {tp_rank * kv_per_rank, kv_per_rank};
    return shard;
  }
  if (tp_size % n_head_kv != 0) {
    throw std::invalid_argument(
        "split_heads: " + str(n_head_kv) + " KV heads can be neither split over nor replicated" +
        " across tensor size " + str(tp_size) + " (need n_head_kv % T == 0 or T % n_head_kv == 0)");
  }
  // T / n_head_kv consecutive ranks share one KV head; their query heads are exactly that head's group.
  const size_t ranks_per_kv_head = tp_size / n_head_kv;
  shard.kv_heads = {tp_rank / ranks_per_kv_head, 1};
  shard.kv_replicated = true;
  return shard;
}

// An even split of n into tp_size parts whose size is a multiple of granularity (1: any size).
// Throws unless n % (tp_size * granularity) == 0.
inline ShardRange split_rows(size_t n, size_t tp_size, size_t tp_rank, size_t granularity = 1) {
  using shard_detail::str;
  shard_detail::check_part("split_rows", tp_size, tp_rank);
  if (granularity == 0) throw std::invalid_argument("split_rows: granularity must be >= 1");
  if (n % tp_size != 0 || (n / tp_size) % granularity != 0) {
    throw std::invalid_argument("split_rows: " + str(n) + " rows cannot be split over tensor size " +
                                str(tp_size) + " into parts that are multiples of " + str(granularity) +
                                " (need n % (T * " + str(granularity) + ") == 0)");
  }
  const size_t per_rank = n / tp_size;
  return {tp_rank * per_rank, per_rank};
}

// n_vocab over tp_size ranks; the first n_vocab % tp_size ranks get one extra row. Requires
// n_vocab >= tp_size.
inline ShardRange split_vocab(size_t n_vocab, size_t tp_size, size_t tp_rank) {
  using shard_detail::str;
  shard_detail::check_part("split_vocab", tp_size, tp_rank);
  if (n_vocab < tp_size) {
    throw std::invalid_argument("split_vocab: vocabulary of " + str(n_vocab) +
                                " is smaller than tensor size " + str(tp_size));
  }
  return shard_detail::split_uneven(n_vocab, tp_size, tp_rank);
}

// Contiguous blocks of layers per stage, as even as possible; the first n_layer % pipeline stages
// get one extra. Requires n_layer >= pipeline (a stage without layers is a configuration error).
inline ShardRange split_layers(size_t n_layer, size_t pipeline, size_t stage) {
  using shard_detail::str;
  shard_detail::check_part("split_layers", pipeline, stage);
  if (n_layer < pipeline) {
    throw std::invalid_argument("split_layers: " + str(n_layer) + " layers cannot fill " + str(pipeline) +
                                " pipeline stages (each stage needs at least one layer)");
  }
  return shard_detail::split_uneven(n_layer, pipeline, stage);
}

// The collectives the sharded forward pass calls, once per layer for each sum and once per step for
// the logits. Every shard of the group must make the same calls in the same order with the same
// sizes (they are collectives); implementations block until the group has joined (but sum_on_stream,
// which only enqueues).
class ShardReducer {
 public:
  virtual ~ShardReducer() = default;

  // data: [n] this shard's partial sums; on return every shard holds the element-wise sum over all
  // shards (in place). Used after the row-parallel attn_output and ffn_down matmuls.
  virtual void sum(float* data, size_t n) = 0;

  // Concatenates column blocks: local: [rows, col_counts[rank]] (this shard's columns, rows
  // contiguous); out: [rows, Σ col_counts], shard r's columns at offset Σ_{s<r} col_counts[s] of
  // each row. col_counts: [size], the same on every shard. Used for the vocabulary-parallel logits.
  virtual void gather_columns(const float* local, int64_t rows, const std::vector<int64_t>& col_counts,
                              float* out) = 0;

  // Where the buffers of sum and gather_columns live. false (the default): host memory, as the
  // CPU forward pass and a host communicator (MPI) want them; the GPU forward pass then copies each
  // buffer to the host and back. true: device memory of the caller's GPU (an NCCL group), passed
  // to the reducer as they are.
  virtual bool device_pointers() const { return false; }

  // A stream-ordered sum, for a reducer with device_pointers(): enqueued on the caller's CUDA stream
  // (a cudaStream_t, here untyped: this header knows no CUDA) behind the work that made `data`, and
  // returning at once, the sums there for what the stream runs next. true where done so; false (the
  // default) where the reducer cannot, and the caller then waits for its stream and calls sum().
  virtual bool sum_on_stream(float* data, size_t n, void* cuda_stream) { return false; }
  // A stream-ordered gather_columns, for a reducer with device_pointers(): enqueued on the caller's
  // CUDA stream and returning at once, out there for what the stream runs next. Its scratch is what
  // reserve_gather made (for at least `rows` rows of these col_counts): it allocates nothing, so that
  // a CUDA graph capture can hold it. true where done so; false (the default) where the reducer
  // cannot, and the caller then waits for its stream and calls gather_columns().
  virtual bool gather_columns_on_stream(const float* local, int64_t rows,
                                        const std::vector<int64_t>& col_counts, float* out,
                                        void* cuda_stream) {
    return false;
  }
  // Makes gather_columns_on_stream's scratch hold `rows` rows of col_counts. true where the scratch
  // moved: a graph that captured a gather holds the old address and must be dropped.
  virtual bool reserve_gather(int64_t rows, const std::vector<int64_t>& col_counts) { return false; }
  // true where sum_on_stream and gather_columns_on_stream (after reserve_gather) both only enqueue
  // (device_pointers() too): a pass that calls nothing else of the reducer can be captured into a CUDA
  // graph and replayed. A reducer then serves one model: the blocking gather_columns may move the
  // scratch under that model's graphs.
  virtual bool stream_ordered() const { return false; }
  // Throws the failure of stream-ordered work that failed after sum_on_stream returned (a dead peer,
  // a transport error); called by the caller after its stream synchronized (every pass).
  virtual void check_async_errors() {}
};

// The group of one: sum is a no-op, gather_columns a copy.
class SingleShardReducer final : public ShardReducer {
 public:
  void sum(float*, size_t) override {}
  void gather_columns(const float* local, int64_t rows, const std::vector<int64_t>& col_counts,
                      float* out) override {
    const int64_t cols = col_counts.empty() ? 0 : col_counts[0];
    for (int64_t i = 0; i < rows * cols; ++i) out[i] = local[i];
  }
};

}  // namespace nibble::worker
