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

void NcclReducer::reserve(size_t send_floats, size_t recv_floats) {
  if (send_floats > send_cap_) {
    cudaFree(send_);
    send_ = nullptr;
    send_cap_ = 0;
    cuda_check(cudaMalloc(reinterpret_cast<void**>(&send_), send_floats * sizeof(float)), "cudaMalloc");
    send_cap_ = send_floats;
  }
  if (recv_floats > recv_cap_) {
    cudaFree(recv_);
    recv_ = nullptr;
    recv_cap_ = 0;
    cuda_check(cudaMalloc(reinterpret_cast<void**>(&recv_), recv_floats * sizeof(float)), "cudaMalloc");
    recv_cap_ = recv_floats;
  }
}

void NcclReducer::sum(float* data, size_t n) {
  if (group_.size() > 1) group_.all_reduce_sum(data, n);
}

bool NcclReducer::sum_on_stream(float* data, size_t n, void* cuda_stream) {
  if (group_.size() > 1) group_.all_reduce_sum_on(data, data, n, static_cast<cudaStream_t>(cuda_stream));
  return true;
}

void NcclReducer::gather_columns(const float* local, int64_t rows, const std::vector<int64_t>& col_counts,
                                 float* out) {
  const int size = group_.size();
  if (static_cast<int>(col_counts.size()) != size) {
    throw CommunicatorError("gather_columns: " + std::to_string(col_counts.size()) +
                            " column counts for a group of " + std::to_string(size));
  }
  const int64_t max_cols = *std::max_element(col_counts.begin(), col_counts.end());
  const int64_t my_cols = col_counts[static_cast<size_t>(group_.rank())];
  int64_t total_cols = 0;
  for (int64_t c : col_counts) total_cols += c;
  if (rows == 0 || total_cols == 0) return;
  const auto send_count = static_cast<size_t>(rows * max_cols);
  reserve(send_count, send_count * static_cast<size_t>(size));
  cudaStream_t stream = group_.stream();
  const size_t f = sizeof(float);
  // The padding columns are sent too (all_gather needs equal counts); zero them so nothing
  // uninitialized travels.
  cuda_check(cudaMemsetAsync(send_, 0, send_count * f, stream), "cudaMemsetAsync");
  if (my_cols > 0) {
    cuda_check(cudaMemcpy2DAsync(send_, static_cast<size_t>(max_cols) * f, local,
                                 static_cast<size_t>(my_cols) * f, static_cast<size_t>(my_cols) * f,
                                 static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, stream),
               "cudaMemcpy2DAsync (pad)");
  }
  group_.all_gather(send_, send_count, recv_);  // on the same stream; returns synchronized
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
  cuda_check(cudaStreamSynchronize(stream), "gather_columns");
}

}  // namespace nibble::parallel
