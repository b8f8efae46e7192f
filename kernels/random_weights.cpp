#include "kernels/random_weights.hpp"

#include <cmath>

#include "kernels/random_weights_hash.hpp"

namespace nibble::kernels {

namespace rw = random_weights;
static_assert(sizeof(BlockQ4_0) == rw::kBlockBytes);

f16_bits random_q4_0_scale(int64_t k) {
  // Uniform over the 15 integers -7..7: variance (2 * (1 + 4 + ... + 49)) / 15 = 56 / 3.
  return fp32_to_fp16(static_cast<float>(1.0 / std::sqrt(static_cast<double>(k) * 56.0 / 3.0)));
}

Status fill_random_q4_0(uint8_t* blocks, int64_t n_out, int64_t k, uint64_t seed) {
  if (n_out < 0 || k <= 0 || k % kQK4_0 != 0) return Status::invalid_argument;
  const int64_t n_blocks = n_out * (k / kQK4_0);
  if (n_blocks == 0) return Status::ok;
  if (blocks == nullptr) return Status::invalid_argument;
  const uint64_t key = rw::key_of(seed);
  const f16_bits d = random_q4_0_scale(k);
  for (int64_t b = 0; b < n_blocks; ++b)
    rw::q4_0_block(key, static_cast<uint64_t>(b), d, blocks + b * rw::kBlockBytes);
  return Status::ok;
}

Status fill_random_uniform(float* out, int64_t n, float lo, float hi, uint64_t seed) {
  if (n < 0 || (out == nullptr && n > 0)) return Status::invalid_argument;
  const uint64_t key = rw::key_of(seed);
  for (int64_t i = 0; i < n; ++i) {
    const float u = static_cast<float>(rw::word(key, static_cast<uint64_t>(i)) >> 40) * (1.0f / 16777216.0f);
    out[i] = lo + (hi - lo) * u;
  }
  return Status::ok;
}

}  // namespace nibble::kernels
