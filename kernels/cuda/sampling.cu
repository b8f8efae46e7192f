// argmax_rows: one block per row; each thread scans a strided slice keeping (value, lowest id), then
// a block reduction with the same order.
//
// sample_rows, in three steps on the stream:
//  1. build_keys: each logit becomes a 64-bit key whose high half orders s = logit / temperature
//     descending (the float's bits mapped to an order-preserving unsigned, complemented) and whose
//     low half is the id. The keys are unique, so an ascending sort gives exactly the CPU's
//     (s descending, id ascending) order with no reliance on sort stability. s == ±0 is made +0
//     (the CPU compares -0 == +0).
//  2. CUB's segmented radix sort, one segment per row.
//  3. select: one block per row walks the sorted row (distribution_rows: the same, writing the kept
//     candidates' probabilities into a dense row instead of drawing): the softmax normalizer over the top-k
//     candidates, the top-p cut and the min-p cut (first-index searches over block-wide inclusive
//     scans in chunks of the block size), the kept mass, and finally the inverse-CDF draw.
// Performance idea: a radix-select pre-pass to the top-k (or the top-p mass) instead of a full sort.
#include <cuda_runtime.h>

#include <climits>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/sampling.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kArgmaxThreads = 256;
constexpr int kSelectThreads = 512;
constexpr int kKeyThreads = 256;
constexpr size_t kAlign = 256;

size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// ---- argmax ----

// (value, id) order: larger value first, then lower id. -0 == +0 compare equal, as on the CPU.
__device__ __forceinline__ bool better(float v, int32_t id, float best, int32_t best_id) {
  return v > best || (v == best && id < best_id);
}

__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_kernel(const float* __restrict__ logits, int64_t n_vocab, int32_t* __restrict__ ids) {
  __shared__ float s_val[kArgmaxThreads / detail::kWarpSize];
  __shared__ int32_t s_id[kArgmaxThreads / detail::kWarpSize];
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * n_vocab;
  float best = -INFINITY;
  int32_t best_id = INT32_MAX;
  for (int64_t i = threadIdx.x; i < n_vocab; i += kArgmaxThreads) {
    const float v = row[i];
    if (better(v, static_cast<int32_t>(i), best, best_id)) {
      best = v;
      best_id = static_cast<int32_t>(i);
    }
  }
#pragma unroll
  for (int off = detail::kWarpSize / 2; off > 0; off /= 2) {
    const float v = __shfl_xor_sync(detail::kFullMask, best, off);
    const int32_t id = __shfl_xor_sync(detail::kFullMask, best_id, off);
    if (better(v, id, best, best_id)) {
      best = v;
      best_id = id;
    }
  }
  const int lane = threadIdx.x % detail::kWarpSize;
  const int warp = threadIdx.x / detail::kWarpSize;
  if (lane == 0) {
    s_val[warp] = best;
    s_id[warp] = best_id;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kArgmaxThreads / detail::kWarpSize; ++w) {
      if (better(s_val[w], s_id[w], best, best_id)) {
        best = s_val[w];
        best_id = s_id[w];
      }
    }
    // A row of NaNs only (unsupported) would leave INT32_MAX: clamp to a valid id.
    ids[blockIdx.x] = best_id == INT32_MAX ? 0 : best_id;
  }
}

// ---- sampling ----

__device__ __forceinline__ uint32_t order_bits(float f) {  // ascending float order → ascending unsigned
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint64_t key) {  // inverse of build_keys' high half
  const uint32_t ord = ~static_cast<uint32_t>(key >> 32);
  const uint32_t u = (ord & 0x80000000u) != 0 ? (ord & 0x7fffffffu) : ~ord;
  return __uint_as_float(u);
}

__device__ __forceinline__ int32_t key_id(uint64_t key) { return static_cast<int32_t>(key & 0xffffffffu); }

__global__ void __launch_bounds__(kKeyThreads)
    build_keys(const float* __restrict__ logits, const SamplingRowParams* __restrict__ params, int64_t rows,
               int64_t n_vocab, uint64_t* __restrict__ keys, int32_t* __restrict__ offsets) {
  const int64_t total = rows * n_vocab;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kKeyThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kKeyThreads + threadIdx.x; i < total; i += stride) {
    const int64_t row = i / n_vocab;
    const int64_t id = i - row * n_vocab;
    const float t = params[row].temperature;
    float s = t > 0.0f ? logits[i] / t : logits[i];  // IEEE division, as the CPU's adjusted / temperature
    if (s == 0.0f) s = 0.0f;                         // -0 → +0
    keys[i] = (static_cast<uint64_t>(~order_bits(s)) << 32) | static_cast<uint64_t>(id);
    if (id == 0) offsets[row] = static_cast<int32_t>(i);
    if (i == total - 1) offsets[rows] = static_cast<int32_t>(total);
  }
}

using BlockScan = cub::BlockScan<double, kSelectThreads>;

struct SelectShared {
  typename BlockScan::TempStorage scan;
  double sums[detail::kWarpSize];
  int found;
  unsigned long long first_fail;
};

// First i in [0, n) whose inclusive prefix sum of f reaches the target (>= when `ge`, else >), or n.
// Every thread must call it; the result is the same in all threads.
template <typename F>
__device__ int64_t first_prefix_reaching(int64_t n, F f, double target, bool ge, SelectShared& sh) {
  double carry = 0.0;
  for (int64_t base = 0; base < n; base += kSelectThreads) {
    const int64_t i = base + threadIdx.x;
    const double v = i < n ? f(i) : 0.0;
    if (threadIdx.x == 0) sh.found = kSelectThreads;
    __syncthreads();  // found initialized; the previous scan's storage is free
    double incl = 0.0;
    double chunk = 0.0;
    BlockScan(sh.scan).InclusiveSum(v, incl, chunk);
    const double cum = carry + incl;
    if (i < n && (ge ? cum >= target : cum > target)) atomicMin(&sh.found, static_cast<int>(threadIdx.x));
    __syncthreads();
    const int hit = sh.found;
    __syncthreads();  // everyone has read `found` before anyone re-initializes it
    if (hit < kSelectThreads) return base + hit;
    carry += chunk;
  }
  return n;
}

// Draws one id per row (dense == nullptr: ids, uniforms used) or writes each row's whole
// distribution as a dense vector (dense != nullptr: [rows, n_vocab], ids and uniforms unused).
__global__ void __launch_bounds__(kSelectThreads)
    select_kernel(const uint64_t* __restrict__ sorted, int64_t n_vocab,
                  const SamplingRowParams* __restrict__ params, const double* __restrict__ uniforms,
                  int32_t* __restrict__ ids, float* __restrict__ dense) {
  __shared__ SelectShared sh;
  const int64_t row = blockIdx.x;
  const uint64_t* keys = sorted + row * n_vocab;
  const SamplingRowParams prm = params[row];
  float* dense_row = dense != nullptr ? dense + row * n_vocab : nullptr;
  if (dense_row != nullptr) {
    for (int64_t i = threadIdx.x; i < n_vocab; i += kSelectThreads) dense_row[i] = 0.0f;
    __syncthreads();  // zeros before any thread writes a probability
  }
  // The one-token outcomes: the whole distribution on keys[0].
  const auto single = [&] {
    if (threadIdx.x != 0) return;
    if (dense_row != nullptr)
      dense_row[key_id(keys[0])] = 1.0f;
    else
      ids[row] = key_id(keys[0]);
  };
  if (!(prm.temperature > 0.0f)) {  // greedy: the first key is the maximum with the lowest id
    single();
    return;
  }
  const int64_t n_cand = prm.top_k > 0 && prm.top_k < n_vocab ? prm.top_k : n_vocab;
  const double max_logit = key_value(keys[0]);
  const auto weight = [&](int64_t i) { return exp(static_cast<double>(key_value(keys[i])) - max_logit); };

  // Softmax normalizer over the top-k candidates.
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < n_cand; i += kSelectThreads) part += weight(i);
  const double z = detail::block_sum(part, sh.sums);
  const auto prob = [&](int64_t i) { return weight(i) / z; };

  // Top-p: keep up to the first candidate whose cumulative probability reaches top_p.
  int64_t n_keep = n_cand;
  if (prm.top_p < 1.0f) {
    const int64_t cut = first_prefix_reaching(n_cand, prob, static_cast<double>(prm.top_p), true, sh);
    if (cut < n_cand) n_keep = cut + 1;
  }
  // Min-p: keep the top candidate and those after it while p >= p_top * min_p.
  if (prm.min_p > 0.0f && n_keep > 1) {
    const double threshold = prob(0) * static_cast<double>(prm.min_p);
    if (threadIdx.x == 0) sh.first_fail = static_cast<unsigned long long>(n_keep);
    __syncthreads();
    for (int64_t i = 1 + threadIdx.x; i < n_keep; i += kSelectThreads) {
      if (prob(i) < threshold) {
        atomicMin(&sh.first_fail, static_cast<unsigned long long>(i));
        break;  // this thread's later indices are larger
      }
    }
    __syncthreads();
    n_keep = static_cast<int64_t>(sh.first_fail);
    __syncthreads();
  }
  if (n_keep == 1) {  // the CPU returns the only candidate without drawing
    single();
    return;
  }

  // Renormalize over the kept candidates (probabilities rounded to float, as the CPU's
  // TokenProbability), then the first candidate whose cumulative probability exceeds u.
  double kept = 0.0;
  for (int64_t i = threadIdx.x; i < n_keep; i += kSelectThreads) kept += prob(i);
  const double kept_mass = detail::block_sum(kept, sh.sums);
  const auto final_p = [&](int64_t i) {
    return static_cast<double>(static_cast<float>(prob(i) / kept_mass));
  };
  if (dense_row != nullptr) {
    for (int64_t i = threadIdx.x; i < n_keep; i += kSelectThreads)
      dense_row[key_id(keys[i])] = static_cast<float>(final_p(i));
    return;
  }
  int64_t pick = first_prefix_reaching(n_keep, final_p, uniforms[row], false, sh);
  if (pick >= n_keep) pick = n_keep - 1;  // rounding left u just above the total
  if (threadIdx.x == 0) ids[row] = key_id(keys[pick]);
}

bool sizes_ok(int64_t rows, int64_t n_vocab) {
  return rows >= 0 && n_vocab >= 1 && rows <= INT32_MAX && n_vocab <= INT32_MAX &&
         rows * n_vocab <= INT32_MAX;
}

Status sort_storage_bytes(int64_t rows, int64_t n_vocab, size_t* bytes) {
  *bytes = 0;
  if (rows == 0) return Status::ok;
  const cudaError_t err = cub::DeviceSegmentedRadixSort::SortKeys(
      nullptr, *bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
      static_cast<int>(rows * n_vocab), static_cast<int>(rows), static_cast<const int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr));
  return launch_status(err);
}

// One block per row: the row's adjustments, one a thread (distinct ids, so no two threads write the
// same logit). The same float operations as worker::apply_logit_adjustments.
constexpr int kAdjustThreads = 128;

__global__ void __launch_bounds__(kAdjustThreads)
    logit_adjustments_kernel(float* logits, int64_t n_vocab, const LogitAdjustment* __restrict__ adjustments,
                             const int32_t* __restrict__ offsets) {
  const int64_t row = blockIdx.x;
  float* lr = logits + row * n_vocab;
  for (int32_t i = offsets[row] + static_cast<int32_t>(threadIdx.x); i < offsets[row + 1];
       i += kAdjustThreads) {
    const LogitAdjustment a = adjustments[i];
    if (a.id < 0 || a.id >= n_vocab) continue;  // the host filters these; never write outside the row
    // __fadd_rn / __fdiv_rn / __fmul_rn / __fsub_rn: IEEE round-to-nearest, never contracted into an
    // FMA, so the result is the host's bit for bit.
    float v = __fadd_rn(lr[a.id], a.bias);
    v = v > 0.0f ? __fdiv_rn(v, a.penalty) : __fmul_rn(v, a.penalty);
    lr[a.id] = __fsub_rn(v, a.subtract);
  }
}

}  // namespace

Status apply_logit_adjustments(float* logits, int64_t rows, int64_t n_vocab,
                               const LogitAdjustment* adjustments, const int32_t* offsets,
                               cudaStream_t stream) {
  if (logits == nullptr || offsets == nullptr || rows < 0 || n_vocab < 1) return Status::invalid_argument;
  if (rows > INT32_MAX) return Status::invalid_argument;
  if (rows == 0) return Status::ok;
  logit_adjustments_kernel<<<static_cast<unsigned>(rows), kAdjustThreads, 0, stream>>>(logits, n_vocab,
                                                                                       adjustments, offsets);
  return launch_status();
}

Status argmax_rows(const float* logits, int64_t rows, int64_t n_vocab, int32_t* ids, cudaStream_t stream) {
  if (logits == nullptr || ids == nullptr || rows < 0 || n_vocab < 1) return Status::invalid_argument;
  if (rows > INT32_MAX || n_vocab > INT32_MAX) return Status::invalid_argument;
  if (rows == 0) return Status::ok;
  argmax_kernel<<<static_cast<unsigned>(rows), kArgmaxThreads, 0, stream>>>(logits, n_vocab, ids);
  return launch_status();
}

Status sample_rows_workspace_bytes(int64_t rows, int64_t n_vocab, size_t* bytes) {
  if (bytes == nullptr) return Status::invalid_argument;
  *bytes = 0;
  if (!sizes_ok(rows, n_vocab)) return Status::invalid_argument;
  size_t sort_bytes = 0;
  const Status st = sort_storage_bytes(rows, n_vocab, &sort_bytes);
  if (st != Status::ok) return st;
  const size_t n = static_cast<size_t>(rows) * static_cast<size_t>(n_vocab);
  *bytes = 2 * round_up(n * sizeof(uint64_t)) + round_up((static_cast<size_t>(rows) + 1) * sizeof(int32_t)) +
           round_up(sort_bytes);
  return Status::ok;
}

namespace {

// sample_rows and distribution_rows: the same keys, sort and selection; `dense` chooses the output.
Status select_rows(const float* logits, const SamplingRowParams* params, const double* uniforms, int64_t rows,
                   int64_t n_vocab, int32_t* ids, float* dense, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream) {
  if (!sizes_ok(rows, n_vocab)) return Status::invalid_argument;
  if (rows == 0) return Status::ok;
  size_t need = 0;
  const Status st = sample_rows_workspace_bytes(rows, n_vocab, &need);
  if (st != Status::ok) return st;
  if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 16 != 0 || workspace_bytes < need) {
    return Status::invalid_argument;
  }
  size_t sort_bytes = 0;
  if (sort_storage_bytes(rows, n_vocab, &sort_bytes) != Status::ok) return Status::device_error;

  const size_t n = static_cast<size_t>(rows) * static_cast<size_t>(n_vocab);
  auto* base = static_cast<uint8_t*>(workspace);
  auto* keys_in = reinterpret_cast<uint64_t*>(base);
  auto* keys_out = reinterpret_cast<uint64_t*>(base + round_up(n * sizeof(uint64_t)));
  auto* offsets = reinterpret_cast<int32_t*>(base + 2 * round_up(n * sizeof(uint64_t)));
  void* sort_storage =
      base + 2 * round_up(n * sizeof(uint64_t)) + round_up((static_cast<size_t>(rows) + 1) * 4);

  int64_t key_blocks = (static_cast<int64_t>(n) + kKeyThreads - 1) / kKeyThreads;
  if (key_blocks > 65536) key_blocks = 65536;
  build_keys<<<static_cast<unsigned>(key_blocks), kKeyThreads, 0, stream>>>(logits, params, rows, n_vocab,
                                                                            keys_in, offsets);
  if (launch_status() != Status::ok) return Status::device_error;
  const cudaError_t sorted = cub::DeviceSegmentedRadixSort::SortKeys(
      sort_storage, sort_bytes, keys_in, keys_out, static_cast<int>(n), static_cast<int>(rows),
      static_cast<const int32_t*>(offsets), static_cast<const int32_t*>(offsets + 1), 0, 64, stream);
  if (sorted != cudaSuccess) return launch_status(sorted);
  select_kernel<<<static_cast<unsigned>(rows), kSelectThreads, 0, stream>>>(keys_out, n_vocab, params,
                                                                            uniforms, ids, dense);
  return launch_status();
}

}  // namespace

Status sample_rows(const float* logits, const SamplingRowParams* params, const double* uniforms, int64_t rows,
                   int64_t n_vocab, int32_t* ids, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream) {
  if (logits == nullptr || params == nullptr || uniforms == nullptr || ids == nullptr) {
    return Status::invalid_argument;
  }
  return select_rows(logits, params, uniforms, rows, n_vocab, ids, nullptr, workspace, workspace_bytes,
                     stream);
}

Status distribution_rows(const float* logits, const SamplingRowParams* params, int64_t rows, int64_t n_vocab,
                         float* probs, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (logits == nullptr || params == nullptr || probs == nullptr) return Status::invalid_argument;
  return select_rows(logits, params, nullptr, rows, n_vocab, nullptr, probs, workspace, workspace_bytes,
                     stream);
}

}  // namespace nibble::kernels::cuda
