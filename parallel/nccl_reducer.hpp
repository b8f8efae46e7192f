#pragma once
// worker::ShardReducer over an NCCL group, for tensor-parallel GPU workers that each own a GPU: the
// buffers are device memory of the group's device (device_pointers() is true), so that
// CudaLlamaModel hands its activations over without copying them through the host. Built only
// with CUDA. (A group of ranks that share one GPU uses CommunicatorReducer over MPI instead.)
#include <vector>

#include "parallel/nccl_communicator.hpp"
#include "worker/tensor_shard.hpp"

namespace nibble::parallel {

class NcclReducer final : public worker::ShardReducer {
 public:
  // group: the tensor-parallel group, whose rank r holds TensorShard{r, size}. Must outlive this.
  explicit NcclReducer(NcclCommunicator& group) : group_(group) {}
  ~NcclReducer() override;
  NcclReducer(const NcclReducer&) = delete;
  NcclReducer& operator=(const NcclReducer&) = delete;

  // data: [n] floats in device memory.
  void sum(float* data, size_t n) override;
  // The same, enqueued on the caller's CUDA stream (NcclCommunicator::all_reduce_sum_on): true.
  bool sum_on_stream(float* data, size_t n, void* cuda_stream) override;
  void check_async_errors() override { group_.check_async_error(); }
  // local: [rows, col_counts[rank]], out: [rows, Σ col_counts], both device memory. As
  // CommunicatorReducer: each rank's block padded to the widest ([rows, max_cols]), all-gathered
  // into [size, rows, max_cols], then copied into place with strided device copies. Blocking: on the
  // communicator's stream, which it synchronizes.
  void gather_columns(const float* local, int64_t rows, const std::vector<int64_t>& col_counts,
                      float* out) override;
  // The same on the caller's stream (the all-gather by NcclCommunicator::all_gather_on), on scratch
  // reserve_gather made; throws CommunicatorError for rows it did not reserve. Where every rank has
  // the same number of columns and rows == 1 (batch-1 decode), the all-gather writes out directly.
  bool gather_columns_on_stream(const float* local, int64_t rows, const std::vector<int64_t>& col_counts,
                                float* out, void* cuda_stream) override;
  bool reserve_gather(int64_t rows, const std::vector<int64_t>& col_counts) override;
  bool stream_ordered() const override { return true; }
  bool device_pointers() const override { return true; }

 private:
  // Grows the device scratch to hold `floats` floats in each of send_ and recv_; true where either moved.
  bool reserve(size_t send_floats, size_t recv_floats);
  // The widest rank's column count; throws CommunicatorError unless col_counts has one count a rank.
  int64_t max_columns(const std::vector<int64_t>& col_counts) const;

  NcclCommunicator& group_;
  float* send_ = nullptr;  // [rows, max_cols] device
  float* recv_ = nullptr;  // [size, rows, max_cols] device
  size_t send_cap_ = 0, recv_cap_ = 0;
};

}  // namespace nibble::parallel
