// LoRA's shrink and expand (lora.cuh). Every block first looks its row's adapter up in the product's slot
// table (Punica's BGMV: one launch for every adapter of the batch) and leaves at once where the row takes
// no update or its ranks end before the block's. Shrink: the inputs cut into fixed splits of
// kLoraInputsPerSplit (so a decode step's one row still spreads over k / 256 blocks, not one block reading
// all of A), a block per (row, 32 ranks, split), its 8 warps each summing a slice of the split's inputs
// for the same 32 ranks (lanes read 32 consecutive Aᵀ entries: one coalesced load a warp an input), the
// slices added in a fixed order into the split's partial; then a block per row adds its splits' partials
// in split order. The splits depend on k only, so a row's bits depend neither on the batch nor on the
// other adapters in it. Expand: a block per (row, 256 outputs), each thread one output over the row's rank
// values staged in shared memory (threads read consecutive Bᵀ entries). Each row's blocks read its
// adapter's factors (the rows after the first mostly from L2): simple, and a decode step's few rows; a
// prompt's many rows would want the factors tiled across rows.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/lora.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kRanksPerBlock = 32;
constexpr int kSlices = 8;  // warps a shrink block
constexpr int kOutputsPerBlock = 256;
// Loads a thread issues before the sums that use them, in the order of those sums (so the same bits):
// where each multiply-add's load waited for the one before, a loop of n loads took n round trips to
// L2 or memory, not n / kAhead.
constexpr int kAhead = 8;

int64_t shrink_splits(int64_t k) { return (k + kLoraInputsPerSplit - 1) / kLoraInputsPerSplit; }

// The slot of row r's adapter (its index in the table), or -1 where the row takes no update.
__device__ __forceinline__ int32_t row_slot(const LoraSlots& t, const int32_t* __restrict__ row_adapter,
                                            int64_t r) {
  const int32_t a = row_adapter[r];
  if (a < 1 || a > t.slots) return -1;
  const int32_t slot = a - 1;
  if (t.a_t[slot] == nullptr || t.b_t[slot] == nullptr || t.rank[slot] < 1 || t.rank[slot] > t.max_rank)
    return -1;
  return slot;
}

// Block (r, chunk, split): ranks chunk * 32 .. + 31 of row r over the split's inputs, into
// partials[r][split][rank] (rows max_rank apart).
__global__ void __launch_bounds__(kRanksPerBlock* kSlices)
    lora_shrink_split_kernel(LoraSlots t, int64_t k, const __half* __restrict__ x, int64_t ldx,
                             const int32_t* __restrict__ row_adapter, float* __restrict__ partials) {
  __shared__ float partial[kSlices][kRanksPerBlock];
  const int64_t r = blockIdx.x;
  const int32_t slot = row_slot(t, row_adapter, r);
  if (slot < 0) return;  // uniform over the block
  const int64_t rank = t.rank[slot];
  if (static_cast<int64_t>(blockIdx.y) * kRanksPerBlock >= rank) return;  // past its ranks: uniform
  const __half* __restrict__ a_t = t.a_t[slot];
  const int lane = static_cast<int>(threadIdx.x % kRanksPerBlock);
  const int slice = static_cast<int>(threadIdx.x / kRanksPerBlock);
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kRanksPerBlock + lane;
  const int64_t split = blockIdx.z;
  const int64_t begin = split * kLoraInputsPerSplit;
  const int64_t end = begin + kLoraInputsPerSplit < k ? begin + kLoraInputsPerSplit : k;
  const __half* xr = x + r * ldx;
  float sum = 0.0f;
  if (j < rank) {
    int64_t c = begin + slice;
    for (; c + (kAhead - 1) * kSlices < end; c += kAhead * kSlices) {
      float a[kAhead], xv[kAhead];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        a[u] = __half2float(a_t[(c + u * kSlices) * rank + j]);
        xv[u] = __half2float(xr[c + u * kSlices]);
      }
#pragma unroll
      for (int u = 0; u < kAhead; ++u) sum += a[u] * xv[u];
    }
    for (; c < end; c += kSlices) sum += __half2float(a_t[c * rank + j]) * __half2float(xr[c]);
  }
  partial[slice][lane] = sum;
  __syncthreads();
  if (slice == 0 && j < rank) {
    float total = partial[0][lane];
    for (int s = 1; s < kSlices; ++s) total += partial[s][lane];
    partials[(r * gridDim.z + split) * t.max_rank + j] = total;
  }
}

// Block r: ax[r][j] = scale * the row's split partials added in split order (thread j, and j + 1024 ...).
__global__ void __launch_bounds__(kLoraMaxRank)
    lora_shrink_sum_kernel(LoraSlots t, const float* __restrict__ partials, int64_t splits,
                           const int32_t* __restrict__ row_adapter, float* __restrict__ ax) {
  const int64_t r = blockIdx.x;
  const int32_t slot = row_slot(t, row_adapter, r);
  if (slot < 0) return;  // uniform over the block
  const int64_t rank = t.rank[slot];
  const float scale = t.scale[slot];
  // Each rank's splits added in split order (the same bits whatever the batch), loaded kAhead at a time
  // (ffn_down's 28672 inputs are 112 splits).
  for (int64_t j = threadIdx.x; j < rank; j += blockDim.x) {
    const float* __restrict__ column = partials + r * splits * t.max_rank + j;
    float total = 0.0f;
    int64_t s = 0;
    for (; s + kAhead <= splits; s += kAhead) {
      float v[kAhead];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) v[u] = column[(s + u) * t.max_rank];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) total += v[u];
    }
    for (; s < splits; ++s) total += column[s * t.max_rank];
    ax[r * t.max_rank + j] = scale * total;
  }
}

// Block (r, chunk): outputs chunk * 256 .. + 255 of row r.
__global__ void __launch_bounds__(kOutputsPerBlock)
    lora_expand_kernel(LoraSlots t, int64_t n_out, const float* __restrict__ ax,
                       const int32_t* __restrict__ row_adapter, float* __restrict__ y, int64_t ldy) {
  extern __shared__ float ax_row[];
  const int64_t r = blockIdx.x;
  const int32_t slot = row_slot(t, row_adapter, r);
  if (slot < 0) return;  // uniform over the block
  const int64_t rank = t.rank[slot];
  const __half* __restrict__ b_t = t.b_t[slot];
  for (int64_t j = threadIdx.x; j < rank; j += kOutputsPerBlock) ax_row[j] = ax[r * t.max_rank + j];
  __syncthreads();
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kOutputsPerBlock + threadIdx.x;
  if (o >= n_out) return;
  float sum = 0.0f;
  int64_t j = 0;
  for (; j + kAhead <= rank; j += kAhead) {
    float b[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) b[u] = __half2float(b_t[(j + u) * n_out + o]);
#pragma unroll
    for (int u = 0; u < kAhead; ++u) sum += b[u] * ax_row[j + u];
  }
  for (; j < rank; ++j) sum += __half2float(b_t[j * n_out + o]) * ax_row[j];
  y[r * ldy + o] += sum;
}

bool rows_ok(int64_t n, const int32_t* row_adapter) {
  return n >= 0 && n <= INT32_MAX && row_adapter != nullptr;
}

bool slots_ok(const LoraSlots& t) {
  return t.a_t != nullptr && t.b_t != nullptr && t.rank != nullptr && t.scale != nullptr && t.slots >= 1 &&
         t.max_rank >= 1 && t.max_rank <= kLoraMaxRank;
}

}  // namespace

size_t lora_shrink_workspace_bytes(int64_t n, int64_t k, int64_t max_rank) {
  if (n < 0 || n > INT32_MAX || k < 1 || k > kLoraMaxInputs || max_rank < 1 || max_rank > kLoraMaxRank)
    return 0;
  return static_cast<size_t>(n) * static_cast<size_t>(shrink_splits(k)) * static_cast<size_t>(max_rank) *
         sizeof(float);
}

Status lora_shrink_f16(const LoraSlots& slots, int64_t k, const __half* x, int64_t ldx,
                       const int32_t* row_adapter, int64_t n, float* ax, void* workspace,
                       size_t workspace_bytes, cudaStream_t stream) {
  if (!slots_ok(slots) || x == nullptr || ax == nullptr || !rows_ok(n, row_adapter) || k < 1 ||
      k > kLoraMaxInputs || ldx < k)
    return Status::invalid_argument;
  if (n == 0) return Status::ok;
  const int64_t splits = shrink_splits(k);
  if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % alignof(float) != 0 ||
      workspace_bytes < lora_shrink_workspace_bytes(n, k, slots.max_rank))
    return Status::invalid_argument;
  auto* partials = static_cast<float*>(workspace);
  const dim3 grid(static_cast<unsigned>(n),
                  static_cast<unsigned>((slots.max_rank + kRanksPerBlock - 1) / kRanksPerBlock),
                  static_cast<unsigned>(splits));
  lora_shrink_split_kernel<<<grid, kRanksPerBlock * kSlices, 0, stream>>>(slots, k, x, ldx, row_adapter,
                                                                          partials);
  if (launch_status() != Status::ok) return Status::device_error;
  const auto threads =
      static_cast<unsigned>((slots.max_rank + kRanksPerBlock - 1) / kRanksPerBlock * kRanksPerBlock);
  lora_shrink_sum_kernel<<<static_cast<unsigned>(n), threads, 0, stream>>>(slots, partials, splits,
                                                                           row_adapter, ax);
  return launch_status();
}

Status lora_expand_f16(const LoraSlots& slots, int64_t n_out, const float* ax, const int32_t* row_adapter,
                       int64_t n, float* y, int64_t ldy, cudaStream_t stream) {
  if (!slots_ok(slots) || ax == nullptr || y == nullptr || !rows_ok(n, row_adapter) || n_out < 1 ||
      n_out > kLoraMaxOutputs || ldy < n_out)
    return Status::invalid_argument;
  if (n == 0) return Status::ok;
  const dim3 grid(static_cast<unsigned>(n),
                  static_cast<unsigned>((n_out + kOutputsPerBlock - 1) / kOutputsPerBlock));
  const size_t shared = static_cast<size_t>(slots.max_rank) * sizeof(float);  // 4 KiB at most
  lora_expand_kernel<<<grid, kOutputsPerBlock, shared, stream>>>(slots, n_out, ax, row_adapter, y, ldy);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
