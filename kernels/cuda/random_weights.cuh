#pragma once
// Random Q4_0 weights generated on the device: the same bytes as kernels::fill_random_q4_0 on the
// host (both use kernels/random_weights_hash.hpp), so that a dummy model (model/llama_checkpoint.hpp,
// "dummy:<shape>") is the same model on the CPU and on the GPU without its weights ever being on the
// host.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// blocks: device pointer, [n_out, k / 32] GGUF Q4_0 blocks (18 bytes each, 2-byte aligned), written.
// n_out >= 0, k > 0 and a multiple of 32. Enqueues one kernel on `stream` (asynchronous).
// Returns invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status fill_random_q4_0(uint8_t* blocks, int64_t n_out, int64_t k, uint64_t seed, cudaStream_t stream);

// Benchmark operands (values that only must not be trivial, e.g. all zeros, which would flatter a
// timing): p: [n] device values, written from the same counter-based stream (random_weights_hash.hpp).
// Halves uniform in [-scale, scale); bytes uniform, and-ed with mask (0x0F: 4-bit levels). n >= 0;
// one kernel on `stream`. Returns invalid_argument for a bad argument, device_error if the launch fails.
Status fill_random_halves(__half* p, int64_t n, float scale, uint64_t seed, cudaStream_t stream);
Status fill_random_bytes(uint8_t* p, int64_t n, uint8_t mask, uint64_t seed, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
