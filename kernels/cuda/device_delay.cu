#include "kernels/cuda/device_delay.cuh"
#include "kernels/cuda/launch_status.cuh"

namespace nibble::kernels::cuda {
namespace {

__device__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void device_delay_kernel(uint64_t nanoseconds) {
  const uint64_t start = global_timer_ns();
  while (global_timer_ns() - start < nanoseconds) __nanosleep(1000);
}

}  // namespace

Status device_delay(int64_t nanoseconds, cudaStream_t stream) {
  constexpr int64_t kMaxNanoseconds = 10'000'000'000;
  if (nanoseconds < 0 || nanoseconds > kMaxNanoseconds) return Status::invalid_argument;
  if (nanoseconds == 0) return Status::ok;
  device_delay_kernel<<<1, 1, 0, stream>>>(static_cast<uint64_t>(nanoseconds));
  return launch_status();
}

}  // namespace nibble::kernels::cuda
