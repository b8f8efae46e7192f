#pragma once
// Random Q4_0 weights from a seed, for the dummy load format (model/llama_checkpoint.hpp:
// "dummy:<shape>"): deterministic, independent per block (so any slice can be made alone), and
// bit-identical to kernels::cuda::fill_random_q4_0 (both use kernels/random_weights_hash.hpp).
//
// Values: q uniform in 1..15, so w = d * (q - 8) is uniform over -7..7 * d with mean 0 (no bias to
// accumulate through 80 layers; a 0 nibble, -8, never occurs) and variance 56/3 * d^2. The scale
// d = 1 / sqrt(k * 56/3) gives weights of standard deviation 1/sqrt(k), as write_random_llama's
// N(0, 1/k): every projection keeps activations near unit scale.
#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels {

// The fp16 bits of the scale of every block of a matrix with rows of k elements (see above),
// converted by fp32_to_fp16 on the host; the CUDA launcher passes the same bits to its kernel.
f16_bits random_q4_0_scale(int64_t k);

// blocks: [n_out, k / 32] BlockQ4_0 (GGUF Q4_0), written. Block b (row-major index) comes from
// (seed, b) alone. n_out >= 0, k > 0 and a multiple of 32; otherwise (or blocks null with work to
// do) returns invalid_argument and writes nothing.
Status fill_random_q4_0(uint8_t* blocks, int64_t n_out, int64_t k, uint64_t seed);

// out: [n] floats uniform in [lo, hi) from the same generator (24-bit resolution); for norm
// weights. n >= 0; returns invalid_argument for a null out with n > 0.
Status fill_random_uniform(float* out, int64_t n, float lo, float hi, uint64_t seed);

}  // namespace nibble::kernels
