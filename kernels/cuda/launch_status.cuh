#pragma once
// What a launcher returns after its launches. The runtime's pending error is read, which clears it (so
// that the next launcher does not report it as its own), and kept for this thread (last_launch_error),
// since a Status cannot carry it: the caller's message can then name it ("too many resources requested
// for launch", "an illegal memory access was encountered", ...). A library that fails on its own
// (cuBLAS's status, CUTLASS's, which reads and clears the CUDA error itself) is named the same way
// through library_failure, so every device_error can say why (last_launch_error_text).
#include <cuda_runtime.h>

#include <string>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

namespace detail {
inline thread_local cudaError_t last_launch_error_value = cudaSuccess;
inline thread_local std::string last_library_error_value;  // empty: no library failure
}  // namespace detail

// ok where `launched` (a launch call's own result) and the runtime's pending error are both cudaSuccess,
// else device_error, the first of the two kept for last_launch_error().
inline Status launch_status(cudaError_t launched = cudaSuccess) {
  const cudaError_t pending = cudaGetLastError();
  detail::last_launch_error_value = launched != cudaSuccess ? launched : pending;
  detail::last_library_error_value.clear();
  return detail::last_launch_error_value == cudaSuccess ? Status::ok : Status::device_error;
}

// device_error for a library call that failed: `call` (e.g. "cuBLAS cublasGemmEx") and the library's
// own words for its status are kept for last_launch_error_text, with the runtime's pending error, if
// any, for last_launch_error (read, so cleared, as launch_status does).
inline Status library_failure(const char* call, const char* library_status) {
  detail::last_launch_error_value = cudaGetLastError();
  detail::last_library_error_value = std::string(call) + ": " + library_status;
  return Status::device_error;
}

// The CUDA error behind this thread's last launch_status or library_failure (cudaSuccess when it was
// ok, when none was pending at a library's failure, or before any).
inline cudaError_t last_launch_error() { return detail::last_launch_error_value; }

// What went wrong in this thread's last launch_status or library_failure, for a message: the library's
// call and status, then the CUDA error's description; empty when it was ok (or none yet).
inline std::string last_launch_error_text() {
  std::string text = detail::last_library_error_value;
  if (detail::last_launch_error_value != cudaSuccess)
    text += (text.empty() ? "" : "; ") + std::string(cudaGetErrorString(detail::last_launch_error_value));
  return text;
}

}  // namespace nibble::kernels::cuda
