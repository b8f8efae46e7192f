#include "kernels/activation_q8.hpp"

#include <cmath>
#include <vector>

#include "kernels/quant_internal.hpp"
#include "kernels/quantize.hpp"

namespace nibble::kernels {

void quantize_activations_q8(const f16_bits* x, int64_t k, int8_t* q, float* d) {
  for (int64_t b = 0; b < k / kQ8ActivationBlock; ++b) {
    const f16_bits* xb = x + b * kQ8ActivationBlock;
    float amax = 0.0f;
    for (int64_t i = 0; i < kQ8ActivationBlock; ++i) amax = std::fmax(amax, std::fabs(fp16_to_fp32(xb[i])));
    const float scale = amax / 127.0f;
    const float inv = scale != 0.0f ? 1.0f / scale : 0.0f;
    d[b] = scale;
    for (int64_t i = 0; i < kQ8ActivationBlock; ++i)
      q[b * kQ8ActivationBlock + i] =
          static_cast<int8_t>(detail::rounded_to_int(std::roundf(fp16_to_fp32(xb[i]) * inv)));
  }
}

Status w4a8_gemv_int4_groups_reference(const uint8_t* quants, const f16_bits* scales, const uint8_t* zeros,
                                       int64_t group, int64_t n_out, int64_t k, const f16_bits* x, int64_t m,
                                       float* y) {
  if (quants == nullptr || scales == nullptr || zeros == nullptr || x == nullptr || y == nullptr ||
      n_out < 0 || m < 0 || k < 0 || (group != 32 && group != 64 && group != 128) || k % group != 0)
    return Status::invalid_argument;
  const int64_t runs = k / kQ8ActivationBlock, groups = k / group;
  std::vector<int8_t> xq(static_cast<size_t>(k));
  std::vector<float> xd(static_cast<size_t>(runs));
  for (int64_t r = 0; r < m; ++r) {
    quantize_activations_q8(x + r * k, k, xq.data(), xd.data());
    for (int64_t o = 0; o < n_out; ++o) {
      double acc = 0.0;
      for (int64_t run = 0; run < runs; ++run) {
        // Input j of the run in the low nibble of byte j, input j + 16 in its high nibble.
        const uint8_t* bytes = quants + o * (k / 2) + run * 16;
        int64_t dot = 0, sum = 0;
        for (int j = 0; j < 32; ++j) {
          const int level = j < 16 ? bytes[j] & 0xF : bytes[j - 16] >> 4;
          const int xv = xq[static_cast<size_t>(run * 32 + j)];
          dot += level * xv;
          sum += xv;
        }
        const int64_t g = o * groups + run * 32 / group;
        acc += static_cast<double>(xd[static_cast<size_t>(run)]) * fp16_to_fp32(scales[g]) *
               static_cast<double>(dot - static_cast<int64_t>(zeros[g]) * sum);
      }
      y[r * n_out + o] = static_cast<float>(acc);
    }
  }
  return Status::ok;
}

Status w4a8_gemv_q4_k_reference(const uint8_t* blocks, int64_t n_out, int64_t k, const f16_bits* x, int64_t m,
                                float* y) {
  if (blocks == nullptr || x == nullptr || y == nullptr || n_out < 0 || m < 0 || k < 0 || k % kQK_K != 0)
    return Status::invalid_argument;
  const auto row_bytes = static_cast<int64_t>(k / kQK_K * sizeof(BlockQ4_K));
  std::vector<float> w(static_cast<size_t>(k)), xd(static_cast<size_t>(k / kQ8ActivationBlock));
  std::vector<int8_t> xq(static_cast<size_t>(k));
  for (int64_t r = 0; r < m; ++r) {
    quantize_activations_q8(x + r * k, k, xq.data(), xd.data());
    for (int64_t o = 0; o < n_out; ++o) {
      const Status st = dequantize_row(DType::Q4_K, blocks + o * row_bytes, w.data(), k);
      if (st != Status::ok) return st;
      double acc = 0.0;
      for (int64_t j = 0; j < k; ++j)
        acc += static_cast<double>(w[static_cast<size_t>(j)]) *
               xd[static_cast<size_t>(j / kQ8ActivationBlock)] * xq[static_cast<size_t>(j)];
      y[r * n_out + o] = static_cast<float>(acc);
    }
  }
  return Status::ok;
}

}  // namespace nibble::kernels
