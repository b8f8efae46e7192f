#pragma once
// The counter-based generator behind kernels::fill_random_q4_0 and kernels::cuda::fill_random_q4_0,
// in one header that host and device code both compile, so that the two cannot drift apart: every
// Q4_0 block is a pure function of (key, block index), whatever thread or device computes it.
#include <cstdint>

#include "kernels/host_device.hpp"

namespace nibble::kernels::random_weights {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;
constexpr int kWordsPerBlock = 8;  // 8 x 64 bits: one 16-bit draw per element of a 32-element block
constexpr int kBlockBytes = 18;    // sizeof(BlockQ4_0): fp16 d, then 16 bytes of nibbles

// splitmix64's output function (Steele, Lea, Flood 2014): a bijection of 64 bits whose output
// bits each depend on every input bit.
NIBBLE_HOST_DEVICE inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The stream key of a seed: mixed, so that nearby seeds (consecutive tensor indices) give unrelated
// streams.
NIBBLE_HOST_DEVICE inline uint64_t key_of(uint64_t seed) { return mix64(seed ^ 0x6e6962626c65ull); }

// Word `i` of the stream: splitmix64's i-th output for the state `key`.
NIBBLE_HOST_DEVICE inline uint64_t word(uint64_t key, uint64_t i) { return mix64(key + (i + 1) * kGolden); }

// A quantized value in 1..15 from 16 random bits: the high part of bits * 15 / 2^16. 65536 = 15 *
// 4369 + 1, so one value is 1/4369 more likely than the others: the mean of q - 8 is off 0 by at
// most 7 / 65536, against a standard deviation of 4.3.
NIBBLE_HOST_DEVICE inline uint32_t q_of(uint64_t bits16) {
  return 1u + static_cast<uint32_t>((bits16 * 15u) >> 16);
}

// Writes Q4_0 block `block` (18 bytes at out): the scale bits d_bits (little-endian fp16), then
// elements 0..15 in the low nibbles and 16..31 in the high nibbles of the 16 bytes after it.
// Element e comes from 16-bit lane e % 4 of word 8 * block + e / 4.
NIBBLE_HOST_DEVICE inline void q4_0_block(uint64_t key, uint64_t block, uint16_t d_bits, uint8_t* out) {
  out[0] = static_cast<uint8_t>(d_bits & 0xffu);
  out[1] = static_cast<uint8_t>(d_bits >> 8);
  const uint64_t first = block * kWordsPerBlock;
  for (int j = 0; j < 4; ++j) {
    const uint64_t lo = word(key, first + static_cast<uint64_t>(j));      // elements 4j .. 4j+3
    const uint64_t hi = word(key, first + 4 + static_cast<uint64_t>(j));  // elements 16+4j .. 16+4j+3
    for (int t = 0; t < 4; ++t) {
      const uint32_t q_lo = q_of((lo >> (16 * t)) & 0xffffu);
      const uint32_t q_hi = q_of((hi >> (16 * t)) & 0xffffu);
      out[2 + 4 * j + t] = static_cast<uint8_t>(q_lo | (q_hi << 4));
    }
  }
}

}  // namespace nibble::kernels::random_weights
