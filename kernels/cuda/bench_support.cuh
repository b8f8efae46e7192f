#pragma once
// What the GPU benchmarks behind `nibble bench-gpu` share (matmul_bench.cu, attention_bench.cu):
// failures that unwind to the benchmark's entry point, which turns them into a Status and a message;
// device memory freed on every path; a launcher's status named with the error it kept.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>

#include "kernels/cuda/launch_status.cuh"
#include "kernels/status.hpp"

namespace nibble::kernels::cuda::bench {

struct BenchFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw BenchFailure(std::string(what) + ": " + cudaGetErrorString(err));
}

// A launcher's status for a BenchFailure, with what its launcher kept of the error behind a device_error
// (its CUDA error, or cuBLAS's / CUTLASS's status: launch_status.cuh).
inline std::string failure_reason(Status st) {
  const std::string why = st == Status::device_error ? last_launch_error_text() : std::string();
  return std::string(status_name(st)) + (why.empty() ? "" : " (" + why + ")");
}

struct DeviceMemory {
  void* ptr = nullptr;
  explicit DeviceMemory(size_t bytes) { check(cudaMalloc(&ptr, std::max<size_t>(bytes, 16)), "cudaMalloc"); }
  ~DeviceMemory() { cudaFree(ptr); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

}  // namespace nibble::kernels::cuda::bench
