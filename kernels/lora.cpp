#include "kernels/lora.hpp"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/matmul.hpp"

namespace nibble::kernels {

namespace {

bool valid(const void* factor, int64_t a, int64_t b, const void* in, const int64_t* rows, int64_t n_rows,
           const void* out) {
  return factor != nullptr && in != nullptr && out != nullptr && (rows != nullptr || n_rows == 0) && a > 0 &&
         b > 0 && n_rows >= 0;
}

bool use_avx2() { return std::strcmp(matmul_isa(), "scalar") != 0; }

// Outputs an expand task takes: a multiple of 8 (the AVX2 width).
constexpr int64_t kOutputsPerTask = 256;
// Inputs a shrink task sums: fixed, so that the sums' order (and so every bit of the result) does not
// depend on the thread count, while one decoding row's A x still spreads over the threads.
constexpr int64_t kInputsPerTask = 512;

}  // namespace

Status lora_shrink_reference(const f16_bits* a_t, int64_t k, int64_t rank, float scale, const float* x,
                             const int64_t* rows, int64_t n_rows, float* ax) {
  if (!valid(a_t, k, rank, x, rows, n_rows, ax)) return Status::invalid_argument;
  for (int64_t i = 0; i < n_rows; ++i) {
    const float* xr = x + rows[i] * k;
    for (int64_t j = 0; j < rank; ++j) {
      float sum = 0;
      for (int64_t c = 0; c < k; ++c) sum += fp16_to_fp32(a_t[c * rank + j]) * xr[c];
      ax[i * rank + j] = scale * sum;
    }
  }
  return Status::ok;
}

Status lora_expand_reference(const f16_bits* b_t, int64_t rank, int64_t n_out, const float* ax,
                             const int64_t* rows, int64_t n_rows, float* y) {
  if (!valid(b_t, rank, n_out, ax, rows, n_rows, y)) return Status::invalid_argument;
  for (int64_t i = 0; i < n_rows; ++i) {
    float* yr = y + rows[i] * n_out;
    for (int64_t o = 0; o < n_out; ++o) {
      float sum = 0;
      for (int64_t j = 0; j < rank; ++j) sum += fp16_to_fp32(b_t[j * n_out + o]) * ax[i * rank + j];
      yr[o] += sum;
    }
  }
  return Status::ok;
}

Status lora_shrink(const f16_bits* a_t, int64_t k, int64_t rank, float scale, const float* x,
                   const int64_t* rows, int64_t n_rows, float* ax, ThreadPool& pool) {
  if (!valid(a_t, k, rank, x, rows, n_rows, ax)) return Status::invalid_argument;
  if (!use_avx2()) return lora_shrink_reference(a_t, k, rank, scale, x, rows, n_rows, ax);
  const int64_t tasks = (k + kInputsPerTask - 1) / kInputsPerTask;
  std::vector<float> partial(static_cast<size_t>(tasks * n_rows * rank));  // [tasks, n_rows, rank]
  pool.parallel_for(tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      detail::lora_shrink_avx2(a_t, k, rank, x, rows, n_rows, t * kInputsPerTask,
                               std::min(k, (t + 1) * kInputsPerTask), partial.data() + t * n_rows * rank);
  });
  for (int64_t e = 0; e < n_rows * rank; ++e) {
    float sum = 0;
    for (int64_t t = 0; t < tasks; ++t) sum += partial[static_cast<size_t>(t * n_rows * rank + e)];
    ax[e] = scale * sum;
  }
  return Status::ok;
}

Status lora_expand(const f16_bits* b_t, int64_t rank, int64_t n_out, const float* ax, const int64_t* rows,
                   int64_t n_rows, float* y, ThreadPool& pool) {
  if (!valid(b_t, rank, n_out, ax, rows, n_rows, y)) return Status::invalid_argument;
  if (!use_avx2()) return lora_expand_reference(b_t, rank, n_out, ax, rows, n_rows, y);
  // Split over the outputs, so that one decoding row still uses every thread.
  pool.parallel_for((n_out + kOutputsPerTask - 1) / kOutputsPerTask, 1, [&](int64_t begin, int64_t end) {
    detail::lora_expand_avx2(b_t, rank, n_out, ax, rows, n_rows, begin * kOutputsPerTask,
                             std::min(n_out, end * kOutputsPerTask), y);
  });
  return Status::ok;
}

}  // namespace nibble::kernels
