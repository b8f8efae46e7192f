#pragma once
// Device time of enqueued work measured with CUDA events: shared by `nibble bench-gpu`'s kernel table
// (kernels/cuda/matmul_bench) and the load-time kernel choice (kernels/cuda/w4a16_tuning).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/cuda/device_delay.cuh"

namespace nibble::kernels::cuda {

// Device time of the calls alone: each timed loop is queued behind a device_delay long enough for
// the host to enqueue every call of the loop first (kHeadStartNs plus kHeadStartPerCallNs a call), so
// the calls run back to back as from a CUDA graph, and a call whose host side costs more than its
// kernel (CUTLASS builds TMA descriptors per call: tens of us) is not timed at the host's pace.
constexpr int64_t kHeadStartNs = 1'000'000;
constexpr int64_t kHeadStartPerCallNs = 100'000;

// Median over `repetitions` timed loops of the mean device time of one call, in microseconds, after
// three untimed calls (first-launch costs, clocks). call(i) enqueues call i on `stream` (it may pick
// its inputs from i) and returns false when it could not: then this returns false at once. A CUDA
// call that fails (an event, the head start's launch) also returns false, with `err` set (otherwise
// err is cudaSuccess).
template <typename Call>
bool median_call_us(cudaStream_t stream, int iterations, int repetitions, Call call, double& us,
                    cudaError_t& err) {
  err = cudaSuccess;
  for (int i = 0; i < 3; ++i)
    if (!call(i)) return false;
  struct Events {  // destroyed on every return
    cudaEvent_t start = nullptr, stop = nullptr;
    ~Events() {
      if (start != nullptr) cudaEventDestroy(start);
      if (stop != nullptr) cudaEventDestroy(stop);
    }
  } ev;
  if ((err = cudaEventCreate(&ev.start)) != cudaSuccess || (err = cudaEventCreate(&ev.stop)) != cudaSuccess)
    return false;
  std::vector<double> runs;
  for (int r = 0; r < repetitions; ++r) {
    // At most device_delay's 10 s: a longer loop only starts before the head start ends.
    const int64_t head_start =
        std::min<int64_t>(kHeadStartNs + kHeadStartPerCallNs * iterations, 10'000'000'000);
    if (device_delay(head_start, stream) != Status::ok) {
      err = cudaErrorLaunchFailure;  // device_delay took the launch's error (cudaGetLastError clears it)
      return false;
    }
    if ((err = cudaEventRecord(ev.start, stream)) != cudaSuccess) return false;
    for (int i = 0; i < iterations; ++i)
      if (!call(i)) return false;
    float ms = 0.0f;
    if ((err = cudaEventRecord(ev.stop, stream)) != cudaSuccess ||
        (err = cudaEventSynchronize(ev.stop)) != cudaSuccess ||
        (err = cudaEventElapsedTime(&ms, ev.start, ev.stop)) != cudaSuccess) {
      return false;
    }
    runs.push_back(1e3 * static_cast<double>(ms) / iterations);
  }
  std::sort(runs.begin(), runs.end());
  us = runs[runs.size() / 2];
  return true;
}

}  // namespace nibble::kernels::cuda
