#pragma once
// Orthonormal Walsh-Hadamard rotations, which llama.cpp applies to the queries, keys and values of a
// quantized KV cache (its attention rotation): they spread a head's outliers over all its values
// before the cache's block quantization, while q·k is unchanged (H is orthonormal) and so is the
// attention's output once rotated back (H is symmetric: H·H = I).
#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels {

// x: [rows, block], each row multiplied in place by H_block / sqrt(block), H_block the Sylvester
// Hadamard matrix (entry (i, j) = (-1)^popcount(i & j)), by the fast transform (block log2(block) adds);
// block a power of two.
Status hadamard_rotate(float* x, int64_t rows, int64_t block);

// Plain reference: the product with llama.cpp's rotation matrix (ggml_gen_hadamard: H_1 = 1/sqrt(n),
// H_2s = [[H_s, H_s], [H_s, -H_s]]), float sums.
Status hadamard_rotate_reference(float* x, int64_t rows, int64_t block);

}  // namespace nibble::kernels
