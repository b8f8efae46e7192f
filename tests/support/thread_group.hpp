#pragma once
// An in-process tensor-parallel group for tests: T shards of one model run in T threads, and their
// collectives go through ThreadGroup::Reducer (host memory), so that sharded forward passes can be
// checked against the whole model without MPI.
#include <algorithm>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "worker/tensor_shard.hpp"

namespace nibble::test {

// The collectives of T shards that run in T threads of this process. Each shard publishes its
// buffer, everyone waits, each reads all of them (summing in rank order, so every shard gets
// bit-identical results), everyone waits again before anyone overwrites its buffer.
class ThreadGroup {
 public:
  explicit ThreadGroup(int size) : size_(size), barrier_(size), buffers_(static_cast<size_t>(size)) {}

  class Reducer final : public worker::ShardReducer {
   public:
    Reducer(ThreadGroup& group, int rank) : group_(group), rank_(rank) {}
    void sum(float* data, size_t n) override {
      group_.buffers_[rank_] = data;
      group_.barrier_.arrive_and_wait();
      std::vector<float> total(n, 0.0f);
      for (const float* theirs : group_.buffers_)
        for (size_t i = 0; i < n; ++i) total[i] += theirs[i];
      group_.barrier_.arrive_and_wait();
      std::copy(total.begin(), total.end(), data);
    }
    void gather_columns(const float* local, int64_t rows, const std::vector<int64_t>& col_counts,
                        float* out) override {
      group_.buffers_[rank_] = local;
      group_.barrier_.arrive_and_wait();
      int64_t total_cols = 0;
      for (int64_t c : col_counts) total_cols += c;
      int64_t col_begin = 0;
      for (int s = 0; s < group_.size_; ++s) {
        for (int64_t r = 0; r < rows; ++r)
          std::copy_n(group_.buffers_[s] + r * col_counts[s], col_counts[s],
                      out + r * total_cols + col_begin);
        col_begin += col_counts[s];
      }
      group_.barrier_.arrive_and_wait();
    }

   private:
    ThreadGroup& group_;
    int rank_;
  };

 private:
  int size_;
  std::barrier<> barrier_;
  std::vector<const float*> buffers_;  // [size] the buffer each shard published
};

}  // namespace nibble::test
