#pragma once
// Kernel launchers return a Status instead of throwing: errors become exceptions only at the
// layers above (process boundaries).

namespace nibble::kernels {

enum class Status {
  ok = 0,
  invalid_argument,  // a null pointer, a negative size, a size not divisible by the block size
  unsupported_type,  // a tensor type this kernel does not handle
  device_error,      // a CUDA call failed
};

const char* status_name(Status status);

}  // namespace nibble::kernels
