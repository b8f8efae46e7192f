#pragma once
// A kernel that keeps the stream busy for a given time: one thread spinning on the GPU's global
// timer. A profile (CudaLlamaModel::profile_greedy) puts it in front of a forward pass so that the
// host has queued the pass's kernels before the first one starts, and CUDA events around the
// pass's sections then time the device, not the host's launches. Unlike a host function that holds
// the stream, it never blocks the host: once the launch queue is full the host waits for the device,
// which keeps running.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// Enqueues one single-thread kernel on `stream` that returns once `nanoseconds` have passed on the
// device's global timer (at least that long; the timer ticks every ~32 ns to ~1 us by GPU).
// 0 <= nanoseconds <= 10 s. Returns invalid_argument (nothing launched) for a bad argument,
// device_error if the launch fails.
Status device_delay(int64_t nanoseconds, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
