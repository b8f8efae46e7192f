#pragma once
// What a launcher returns after its launches. The runtime's pending error is read, which clears it (so
// that the next launcher does not report it as its own), and kept for this thread (last_launch_error),
// since a Status cannot carry it: the caller's message can then name it ("too many resources requested
// for launch", "an illegal memory access was encountered", ...).
#include <cuda_runtime.h>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

namespace detail {
inline thread_local cudaError_t last_launch_error_value = cudaSuccess;
}  // namespace detail

// ok where `launched` (a launch call's own result) and the runtime's pending error are both cudaSuccess,
// else device_error, the first of the two kept for last_launch_error().
inline Status launch_status(cudaError_t launched = cudaSuccess) {
  const cudaError_t pending = cudaGetLastError();
  detail::last_launch_error_value = launched != cudaSuccess ? launched : pending;
  return detail::last_launch_error_value == cudaSuccess ? Status::ok : Status::device_error;
}

// The CUDA error behind this thread's last launch_status (cudaSuccess when it was ok, or none yet).
inline cudaError_t last_launch_error() { return detail::last_launch_error_value; }

}  // namespace nibble::kernels::cuda
