#pragma once
// worker::ShardReducer over a Communicator: the sharded forward pass's all-reduce and logits gather
// on a tensor-parallel group (MPI today). One reducer per tensor group; it does not own the group.
#include <vector>

#include "parallel/communicator.hpp"
#include "worker/tensor_shard.hpp"

namespace nibble::parallel {

class CommunicatorReducer final : public worker::ShardReducer {
 public:
  // group: the tensor-parallel group, whose rank r holds TensorShard{r, size}. Must outlive this.
  explicit CommunicatorReducer(Communicator& group) : group_(group) {}

  worker::TensorShard shard() const { return {group_.rank(), group_.size()}; }

  void sum(float* data, size_t n) override;
  // all_gather needs the same count on every rank, so each rank sends its block padded to the
  // widest one ([rows, max_cols]); the gathered [size, rows, max_cols] is then interleaved into
  // [rows, Σ cols].
  void gather_columns(const float* local, int64_t rows, const std::vector<int64_t>& col_counts,
                      float* out) override;

 private:
  Communicator& group_;
  std::vector<float> send_, recv_;  // scratch: [rows, max_cols] and [size, rows, max_cols]
};

}  // namespace nibble::parallel
