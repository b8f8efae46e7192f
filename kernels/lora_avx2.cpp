// The AVX2 + FMA + F16C bodies of kernels/lora.hpp (compiled with those flags; called only where the
// CPU has them).
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "kernels/lora.hpp"

namespace nibble::kernels::detail {

namespace {

// Inputs a shrink tile takes: their rank-wide rows of Aᵀ stay in L1 while every row of x uses them.
constexpr int64_t kInputsPerTile = 64;

__m256 load8(const f16_bits* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

}  // namespace

void lora_shrink_avx2(const f16_bits* a_t, int64_t k, int64_t rank, const float* x, const int64_t* rows,
                      int64_t n_rows, int64_t c_begin, int64_t c_end, float* partial) {
  const int64_t vec = rank / 8 * 8;
  std::fill_n(partial, n_rows * rank, 0.0f);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kInputsPerTile) {
    const int64_t c1 = std::min(c_end, c0 + kInputsPerTile);
    for (int64_t i = 0; i < n_rows; ++i) {
      const float* xr = x + rows[i] * k;
      float* out = partial + i * rank;
      for (int64_t j = 0; j < vec; j += 8) {
        __m256 acc = _mm256_loadu_ps(out + j);
        for (int64_t c = c0; c < c1; ++c)
          acc = _mm256_fmadd_ps(load8(a_t + c * rank + j), _mm256_set1_ps(xr[c]), acc);
        _mm256_storeu_ps(out + j, acc);
      }
      for (int64_t j = vec; j < rank; ++j) {
        float sum = out[j];
        for (int64_t c = c0; c < c1; ++c) sum += fp16_to_fp32(a_t[c * rank + j]) * xr[c];
        out[j] = sum;
      }
    }
  }
}

void lora_expand_avx2(const f16_bits* b_t, int64_t rank, int64_t n_out, const float* ax, const int64_t* rows,
                      int64_t n_rows, int64_t o_begin, int64_t o_end, float* y) {
  constexpr int64_t kWidth = 256;  // outputs a pass takes: the rows' partial updates stay in L2
  std::vector<float> update(static_cast<size_t>(n_rows * kWidth));
  alignas(32) float b[kWidth];
  for (int64_t o0 = o_begin; o0 < o_end; o0 += kWidth) {
    const int64_t width = std::min(kWidth, o_end - o0);
    const int64_t vec = width / 8 * 8;
    std::fill(update.begin(), update.end(), 0.0f);
    for (int64_t j = 0; j < rank; ++j) {
      const f16_bits* row = b_t + j * n_out + o0;  // converted once, used by every row
      for (int64_t o = 0; o < vec; o += 8) _mm256_store_ps(b + o, load8(row + o));
      for (int64_t o = vec; o < width; ++o) b[o] = fp16_to_fp32(row[o]);
      for (int64_t i = 0; i < n_rows; ++i) {
        const __m256 s = _mm256_set1_ps(ax[i * rank + j]);
        float* u = update.data() + i * kWidth;
        for (int64_t o = 0; o < vec; o += 8)
          _mm256_storeu_ps(u + o, _mm256_fmadd_ps(_mm256_load_ps(b + o), s, _mm256_loadu_ps(u + o)));
        for (int64_t o = vec; o < width; ++o) u[o] += b[o] * ax[i * rank + j];
      }
    }
    for (int64_t i = 0; i < n_rows; ++i) {
      float* yr = y + rows[i] * n_out + o0;
      const float* u = update.data() + i * kWidth;
      for (int64_t o = 0; o < width; ++o) yr[o] += u[o];
    }
  }
}

}  // namespace nibble::kernels::detail
