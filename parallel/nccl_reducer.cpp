#include "parallel/nccl_reducer.hpp"

#include <algorithm>
#include <string>

namespace nibble::parallel {

namespace {

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw CommunicatorError(std::string("NcclReducer: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

NcclReducer::~NcclReducer() {
  cudaFree(send_);
  cudaFree(recv_);
}

bool NcclReducer::reserve(size_t send_floats, size_t recv_floats) {
  bool moved = false;
  if (send_floats > send_cap_) {
    cudaFree(send_);
    send_ = nullptr;
    send_cap_ = 0;
    moved = true;
    cuda_check(cudaMalloc(reinterpret_cast<void**>(&send_), send_floats * sizeof(float)), "cudaMalloc");
    send_cap_ = send_floats;
  }
  if (recv_floats > recv_cap_) {
    cudaFree(recv_);
    recv_ = nullptr;
    recv_cap_ = 0;
    moved = true;
    cuda_check(cudaMalloc(reinterpret_cast<void**>(&recv_), recv_floats * sizeof(float)), "cudaMalloc");
    recv_cap_ = recv_floats;
  }
  return moved;
}

int64_t NcclReducer::max_columns(const std::vector<int64_t>& col_counts) const {
  if (static_cast<int>(col_counts.size()) != group_.size()) {
    throw CommunicatorError("gather_columns: " + std::to_string(col_counts.size()) +
                            " column counts for a group of " + std::to_string(group_.size()));
  }
  return *std::max_element(col_counts.begin(), col_counts.end());
}

void NcclReducer::sum(float* data, size_t n) {
  if (group_.size() > 1) group_.all_reduce_sum(data, n);
}

bool NcclReducer::sum_on_stream(float* data, size_t n, void* cuda_stream) {
  if (group_.size() > 1) group_.all_reduce_sum_on(data, data, n, static_cast<cudaStream_t>(cuda_stream));
  return true;
}

bool NcclReducer::reserve_gather(int64_t rows, const std::vector<int64_t>& col_counts) {
  const auto send_count = static_cast<size_t>(std::max<int64_t>(rows, 0) * max_columns(col_counts));
  return reserve(send_count, send_count * static_cast<size_t>(group_.size()));
}

void NcclReducer::gather_columns(const float* local, int64_t rows, const std::vector<int64_t>& col_counts,
                                 float* out) {
  reserve_gather(rows, col_counts);
  gather_columns_on_stream(local, rows, col_counts, out, group_.stream());
  cuda_check(cudaStreamSynchronize(group_.stream()), "gather_columns");
  group_.check_async_error();
}

bool NcclReducer::gather_columns_on_stream(const float* local, int64_t rows,
                                           const std::vector<int64_t>& col_counts, float* out,
                                           void* cuda_stream) {
  const int size = group_.size();
  const int64_t max_cols = max_columns(col_counts);
  const int64_t my_cols = col_counts[static_cast<size_t>(group_.rank())];
  int64_t total_cols = 0;
  for (int64_t c : col_counts) total_cols += c;
  if (rows <= 0 || total_cols == 0) return true;
  const auto send_count = static_cast<size_t>(rows * max_cols);
  if (send_count > send_cap_ || send_count * static_cast<size_t>(size) > recv_cap_) {
    throw CommunicatorError("gather_columns_on_stream: scratch for " + std::to_string(rows) +
                            " rows was not reserved (reserve_gather)");
  }
  const auto stream = static_cast<cudaStream_t>(cuda_stream);
  const size_t f = sizeof(float);
  // A rank at the widest count sends its block as it is ([rows, max_cols] already); a narrower one
  // pads it, zeroing the padding so that nothing uninitialized travels (all_gather needs equal counts).
  const float* send = local;
  if (my_cols < max_cols) {
    cuda_check(cudaMemsetAsync(send_, 0, send_count * f, stream), "cudaMemsetAsync");
    if (my_cols > 0) {
      cuda_check(cudaMemcpy2DAsync(send_, static_cast<size_t>(max_cols) * f, local,
                                   static_cast<size_t>(my_cols) * f, static_cast<size_t>(my_cols) * f,
                                   static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, stream),
                 "cudaMemcpy2DAsync (pad)");
    }
    send = send_;
  }
  // One row with equal counts: [size, 1, max_cols] is the gathered row itself.
  if (rows == 1 && max_cols * size == total_cols) {
    group_.all_gather_on(send, send_count, out, stream);
    return true;
  }
  group_.all_gather_on(send, send_count, recv_, stream);
  int64_t col_begin = 0;
  for (int s = 0; s < size; ++s) {
    const int64_t cols = col_counts[static_cast<size_t>(s)];
    if (cols > 0) {
      cuda_check(cudaMemcpy2DAsync(out + col_begin, static_cast<size_t>(total_cols) * f,
                                   recv_ + static_cast<int64_t>(s) * rows * max_cols,
                                   static_cast<size_t>(max_cols) * f, static_cast<size_t>(cols) * f,
                                   static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, stream),
                 "cudaMemcpy2DAsync (interleave)");
    }
    col_begin += cols;
  }
  return true;
}

}  // namespace nibble::parallel
