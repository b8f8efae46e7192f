#pragma once
// Programmatic dependent launch (PDL, Hopper): a kernel launched with `programmatic` set may start
// while the kernel before it on the stream is still running, so that its launch, its block
// scheduling and whatever it can do without that kernel's results (reading weights) overlap that
// kernel's tail instead of following it. Such a kernel must call wait_for_prior_grids() before it
// reads anything an earlier kernel wrote or writes anything one reads; the wait returns once the
// earlier grid has completed and its memory is visible. A kernel lets the next one start early by
// calling allow_dependent_launch() (else that happens when its blocks exit). Both are no-ops for a
// kernel launched without the attribute, and the attribute is ignored after a copy or a host node,
// so a launch with it computes exactly what a plain launch does. (Internal: .cu files only.)
#include <cuda_runtime.h>

#include <utility>

namespace nibble::kernels::cuda::detail {

__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The attribute that makes a launch programmatic (one entry of a cudaLaunchConfig_t's attrs).
inline cudaLaunchAttribute programmatic_launch_attribute() {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  return attr;
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...), programmatic when asked.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                          cudaStream_t stream, bool programmatic, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attr = programmatic_launch_attribute();
  config.attrs = programmatic ? &attr : nullptr;
  config.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace nibble::kernels::cuda::detail
