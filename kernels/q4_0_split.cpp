#include "kernels/q4_0_split.hpp"

#include <cstring>

#include "kernels/quant_types.hpp"

namespace nibble::kernels {

namespace {
bool valid(const void* a, const void* b, const void* c, int64_t n_out, int64_t k) {
  return a != nullptr && b != nullptr && c != nullptr && n_out >= 0 && k >= 0 && k % kQK4_0 == 0;
}
}  // namespace

Status split_q4_0(const void* blocks, int64_t n_out, int64_t k, uint8_t* quants, uint16_t* scales) {
  if (!valid(blocks, quants, scales, n_out, k)) return Status::invalid_argument;
  const auto* in = static_cast<const BlockQ4_0*>(blocks);
  const int64_t n = n_out * (k / kQK4_0);
  for (int64_t b = 0; b < n; ++b) {
    scales[b] = in[b].d;
    std::memcpy(quants + b * (kQK4_0 / 2), in[b].qs, kQK4_0 / 2);
  }
  return Status::ok;
}

Status join_q4_0(const uint8_t* quants, const uint16_t* scales, int64_t n_out, int64_t k, void* blocks) {
  if (!valid(blocks, quants, scales, n_out, k)) return Status::invalid_argument;
  auto* out = static_cast<BlockQ4_0*>(blocks);
  const int64_t n = n_out * (k / kQK4_0);
  for (int64_t b = 0; b < n; ++b) {
    out[b].d = scales[b];
    std::memcpy(out[b].qs, quants + b * (kQK4_0 / 2), kQK4_0 / 2);
  }
  return Status::ok;
}

}  // namespace nibble::kernels
