#pragma once
// CUDA rotary position embedding on fp16 q and k, in place, with fp32 math; GGUF "normal" (Llama)
// mode exactly as kernels::rope_normal without scaling (the model's scaled RoPE is rope_kv_write's): each
// head's adjacent pairs (x[2i], x[2i+1]) of the first rot_dims dims rotate by pos · base^(-2i/rot_dims). The
// angles follow the CPU's recurrence (theta_0 = pos, theta_{i+1} = theta_i * base^(-2/rot_dims), the factor
// computed on the host with std::pow), so they are bit-identical to the CPU's; only cosf/sinf and the final
// fp16 rounding differ.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// All pointers are device pointers.
// q:         [tokens, n_head, head_dim] __half, rotated in place
// k:         [tokens, n_head_kv, head_dim] __half, rotated in place; or nullptr (then n_head_kv is
//            ignored)
// positions: [tokens] int32 position of each token (any value; the CPU uses them as given)
// rot_dims: how many leading dims of each head rotate (even, 2 <= rot_dims <= head_dim); the rest
// are left as they are. tokens >= 0 (0: nothing to do), n_head >= 1, base > 0.
// Enqueues one kernel on `stream` (asynchronous).
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status rope_normal_f16(__half* q, int64_t n_head, __half* k, int64_t n_head_kv, const int32_t* positions,
                       int64_t tokens, int64_t head_dim, int64_t rot_dims, float base, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
