#pragma once
// Helpers shared by the CUDA kernel tests: the skip-without-a-device check and an owning device
// buffer with typed copies.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/quant_types.hpp"

namespace nibble::cuda_test {

// Empty when a CUDA device is usable, otherwise why not.
inline std::string no_device_reason() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  if (count == 0) return "cudaGetDeviceCount returned 0 devices";
  return {};
}

#define NIBBLE_REQUIRE_CUDA_DEVICE()                                                 \
  do {                                                                               \
    const std::string nibble_reason = ::nibble::cuda_test::no_device_reason();       \
    if (!nibble_reason.empty()) GTEST_SKIP() << "no CUDA device: " << nibble_reason; \
  } while (0)

// Owns one device allocation of `count` elements (ptr is nullptr when cudaMalloc failed).
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(size_t n) : count(n) {
    if (cudaMalloc(reinterpret_cast<void**>(&ptr), (n == 0 ? 1 : n) * sizeof(T)) != cudaSuccess)
      ptr = nullptr;
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    if (ptr != nullptr && !host.empty() &&
        cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) != cudaSuccess) {
      cudaFree(ptr);
      ptr = nullptr;
    }
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // The whole buffer back on the host (empty on failure, which the caller's size check catches).
  std::vector<T> to_host() const {
    std::vector<T> host(count);
    if (count != 0 &&
        cudaMemcpy(host.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost) != cudaSuccess) {
      return {};
    }
    return host;
  }
};

// n normal values of standard deviation stddev, rounded to fp16 (bits).
inline std::vector<uint16_t> random_f16(size_t n, float stddev, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = kernels::fp32_to_fp16(normal(rng));
  return v;
}

}  // namespace nibble::cuda_test
