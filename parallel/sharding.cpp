#include "parallel/sharding.hpp"

#include <stdexcept>
#include <string>

namespace nibble::parallel {
namespace {

std::string str(size_t value) { return std::to_string(value); }

void check_part(const char* what, size_t parts, size_t index) {
  if (parts == 0) throw std::invalid_argument(std::string(what) + ": the number of parts must be >= 1");
  if (index >= parts) {
    throw std::invalid_argument(std::string(what) + ": index " + str(index) + " outside [0, " + str(parts) +
                                ")");
  }
}

// Uneven contiguous split: the first n % parts parts get one extra element.
ShardRange split_uneven(size_t n, size_t parts, size_t index) {
  const size_t base = n / parts;
  const size_t extra = n % parts;
  const size_t begin = index * base + (index < extra ? index : extra);
  return {begin, base + (index < extra ? 1 : 0)};
}

}  // namespace

HeadShard split_heads(size_t n_head, size_t n_head_kv, size_t tp_size, size_t tp_rank) {
  check_part("split_heads", tp_size, tp_rank);
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

ShardRange split_rows(size_t n, size_t tp_size, size_t tp_rank, size_t granularity) {
  check_part("split_rows", tp_size, tp_rank);
  if (granularity == 0) throw std::invalid_argument("split_rows: granularity must be >= 1");
  if (n % tp_size != 0 || (n / tp_size) % granularity != 0) {
    throw std::invalid_argument("split_rows: " + str(n) + " rows cannot be split over tensor size " +
                                str(tp_size) + " into parts that are multiples of " + str(granularity) +
                                " (need n % (T * " + str(granularity) + ") == 0)");
  }
  const size_t per_rank = n / tp_size;
  return {tp_rank * per_rank, per_rank};
}

ShardRange split_vocab(size_t n_vocab, size_t tp_size, size_t tp_rank) {
  check_part("split_vocab", tp_size, tp_rank);
  if (n_vocab < tp_size) {
    throw std::invalid_argument("split_vocab: vocabulary of " + str(n_vocab) +
                                " is smaller than tensor size " + str(tp_size));
  }
  return split_uneven(n_vocab, tp_size, tp_rank);
}

ShardRange split_layers(size_t n_layer, size_t pipeline, size_t stage) {
  check_part("split_layers", pipeline, stage);
  if (n_layer < pipeline) {
    throw std::invalid_argument("split_layers: " + str(n_layer) + " layers cannot fill " + str(pipeline) +
                                " pipeline stages (each stage needs at least one layer)");
  }
  return split_uneven(n_layer, pipeline, stage);
}

}  // namespace nibble::parallel
