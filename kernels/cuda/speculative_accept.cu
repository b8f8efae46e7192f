// One block per sequence. Thread 0 walks the proposals (k is small: a few loads each). The final
// draw is an inverse CDF over the whole vocabulary: each thread sums a contiguous chunk of the
// weights (in index order), thread 0 finds the chunk where u * total falls and walks it (and, if
// rounding left the crossing just past it, the chunks after it) exactly as the CPU walks the row.
#include <cuda_runtime.h>

#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/speculative_accept.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 256;

struct AcceptShared {
  double chunk_sum[kThreads];
  int accepted;
  int rejected;  // 1: the draw is from the residual at position `accepted`
  int pick;
};

// The CPU's inverse CDF (rejection_sampler.cpp's sample_dense / sample_residual) over weight(v) >= 0,
// v in [0, n): the first v of positive weight whose running sum exceeds u * total, else the last
// one of positive weight; -1 when the total is not positive. Every thread calls it; every thread
// gets the result.
template <typename Weight>
__device__ int64_t inverse_cdf(Weight weight, int64_t n, double u, AcceptShared& sh) {
  const int64_t chunk = (n + kThreads - 1) / kThreads;
  const int64_t begin = threadIdx.x * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  double sum = 0.0;
  for (int64_t v = begin; v < end; ++v) sum += weight(v);
  sh.chunk_sum[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int c = 0; c < kThreads; ++c) total += sh.chunk_sum[c];
    int64_t pick = -1;
    // A non-finite total (an infinite weight: a bad row) picks nothing, as the CPU's sample_dense
    // refuses it; walking it would run past the row's end.
    if (total > 0.0 && isfinite(total)) {
      const double target = u * total;
      double before = 0.0;
      int c = 0;
      while (c + 1 < kThreads && !(target < before + sh.chunk_sum[c])) before += sh.chunk_sum[c++];
      double cumulative = before;
      for (int64_t v = c * chunk; v < n; ++v) {
        const double w = weight(v);
        if (w <= 0.0) continue;
        cumulative += w;
        pick = v;
        if (target < cumulative) break;
      }
      if (pick < 0) {  // the crossing chunk held no mass after rounding: the last id of positive weight
        for (int64_t v = (c * chunk < n ? c * chunk : n) - 1; v >= 0 && pick < 0; --v)
          if (weight(v) > 0.0) pick = v;
      }
    }
    sh.pick = static_cast<int>(pick);
  }
  __syncthreads();
  const int64_t pick = sh.pick;
  __syncthreads();  // everyone has read pick before shared memory is reused
  return pick;
}

__global__ void __launch_bounds__(kThreads)
    accept_kernel(const int32_t* __restrict__ draft_tokens, const int32_t* __restrict__ draft_counts,
                  const float* __restrict__ draft_probs, const float* __restrict__ target_probs,
                  const double* __restrict__ uniforms, int64_t k_max, int64_t n_vocab,
                  int32_t* __restrict__ out_tokens, int32_t* __restrict__ out_accepted, int32_t* bad_input) {
  __shared__ AcceptShared sh;
  const int64_t s = blockIdx.x;
  const int k = draft_counts[s];
  const int32_t* tokens = draft_tokens + s * k_max;
  const double* u = uniforms + s * (k_max + 1);
  int32_t* out = out_tokens + s * (k_max + 1);
  if (threadIdx.x == 0) {
    int accepted = 0, rejected = 0;
    if (k < 0 || k > k_max) accepted = -1;
    // Every proposal is checked before any is judged, as verify() does: a bad token after the
    // first rejection is still the caller's error.
    for (int i = 0; accepted >= 0 && i < k; ++i) {
      if (tokens[i] < 0 || tokens[i] >= n_vocab) accepted = -1;
    }
    if (accepted >= 0) {
      for (int i = 0; i < k; ++i) {
        const int32_t x = tokens[i];
        const double qx = draft_probs[(s * k_max + i) * n_vocab + x];
        const double px = target_probs[(s * (k_max + 1) + i) * n_vocab + x];
        if (qx > 0.0 && u[i] * qx < px) {
          out[i] = x;
          ++accepted;
        } else {
          rejected = 1;
          break;
        }
      }
    }
    if (accepted < 0) {
      *bad_input = 1;
      out_accepted[s] = -1;
    }
    sh.accepted = accepted;
    sh.rejected = rejected;
  }
  __syncthreads();
  const int accepted = sh.accepted;
  const int rejected = sh.rejected;
  if (accepted < 0) return;
  const float* p = target_probs + (s * (k_max + 1) + accepted) * n_vocab;
  const double final_u = u[k];
  int64_t pick = -1;
  if (rejected) {
    const float* q = draft_probs + (s * k_max + accepted) * n_vocab;
    // In double, so that p == q gives exactly 0.
    pick = inverse_cdf(
        [&](int64_t v) {
          const double r = static_cast<double>(p[v]) - static_cast<double>(q[v]);
          return r > 0.0 ? r : 0.0;
        },
        n_vocab, final_u, sh);
  }
  if (pick < 0)
    pick = inverse_cdf([&](int64_t v) { return static_cast<double>(p[v]); }, n_vocab, final_u, sh);
  if (threadIdx.x == 0) {
    if (pick < 0) {  // p sums to 0: not a distribution (verify() throws here)
      *bad_input = 1;
      out_accepted[s] = -1;
      return;
    }
    out[accepted] = static_cast<int32_t>(pick);
    out_accepted[s] = accepted;
  }
}

// One block per row: the draft's draw from its own dense distribution (sample_dense).
__global__ void __launch_bounds__(kThreads)
    sample_dense_kernel(const float* __restrict__ probs, const double* __restrict__ uniforms, int64_t n_vocab,
                        int32_t* __restrict__ ids) {
  __shared__ AcceptShared sh;
  const int64_t r = blockIdx.x;
  const float* p = probs + r * n_vocab;
  const int64_t pick =
      inverse_cdf([&](int64_t v) { return static_cast<double>(p[v]); }, n_vocab, uniforms[r], sh);
  if (threadIdx.x == 0) ids[r] = static_cast<int32_t>(pick);
}

}  // namespace

Status sample_dense_rows(const float* probs, const double* uniforms, int64_t rows, int64_t n_vocab,
                         int32_t* ids, cudaStream_t stream) {
  if (probs == nullptr || uniforms == nullptr || ids == nullptr) return Status::invalid_argument;
  if (rows < 0 || rows > INT32_MAX || n_vocab < 1 || n_vocab > INT32_MAX) return Status::invalid_argument;
  if (rows == 0) return Status::ok;
  sample_dense_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(probs, uniforms, n_vocab, ids);
  return launch_status();
}

Status speculative_accept(const int32_t* draft_tokens, const int32_t* draft_counts, const float* draft_probs,
                          const float* target_probs, const double* uniforms, int64_t seqs, int64_t k_max,
                          int64_t n_vocab, int32_t* out_tokens, int32_t* out_accepted, int32_t* bad_input,
                          cudaStream_t stream) {
  if (draft_counts == nullptr || target_probs == nullptr || uniforms == nullptr || out_tokens == nullptr ||
      out_accepted == nullptr || bad_input == nullptr) {
    return Status::invalid_argument;
  }
  if (k_max > 0 && (draft_tokens == nullptr || draft_probs == nullptr)) return Status::invalid_argument;
  if (seqs < 0 || seqs > INT32_MAX || k_max < 0 || k_max > 1024 || n_vocab < 1 || n_vocab > INT32_MAX)
    return Status::invalid_argument;
  if (seqs == 0) return Status::ok;
  accept_kernel<<<static_cast<unsigned>(seqs), kThreads, 0, stream>>>(draft_tokens, draft_counts, draft_probs,
                                                                      target_probs, uniforms, k_max, n_vocab,
                                                                      out_tokens, out_accepted, bad_input);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
