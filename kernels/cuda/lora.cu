// LoRA's shrink and expand (lora.cuh) for a group of products that read the same input. Every block first
// looks its row's adapter up in its product's slot table (Punica's BGMV: one launch for every adapter of
// the batch) and leaves at once where the row takes no update or its ranks end before the block's. Shrink:
// the inputs cut into fixed splits of kLoraInputsPerSplit (so a decode step's one row still spreads over
// k / 256 blocks, not one block reading all of A), a block per (row, product and 32 ranks, split), its 8
// warps each summing a slice of the split's inputs for the same 32 ranks (lanes read 32 consecutive Aᵀ
// entries: one coalesced load a warp an input), the slices added in a fixed order into the split's
// partial. Expand: a block per (row, 256 outputs of one product); it first adds the row's split partials
// in split order and scales them (rank values into shared memory: each of the row's expand blocks does
// this again, a few KB from L2, where a third kernel cost a launch), then each thread one output over
// them (threads read consecutive Bᵀ entries). The splits depend on k only, so a row's bits depend neither
// on the batch, nor on the other adapters in it, nor on the group's other products. Each row's blocks read
// its adapter's factors (the rows after the first mostly from L2): simple, and a decode step's few rows;
// a prompt's many rows would want the factors tiled across rows.
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

// What both kernels need beyond the group: the partials' layout and where each product's expand blocks
// begin (first_block[p] .. first_block[p + 1] - 1 along the expand grid's y).
struct GroupLaunch {
  LoraGroup group;
  int64_t splits = 0;
  int64_t max_rank = 0;  // the targets' largest: the partials' row length
  int32_t rank_chunks = 0;
  int32_t first_block[kLoraMaxProducts + 1] = {};
};

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

// Row r's split partials of product p: [splits][max_rank].
__device__ __forceinline__ int64_t partials_row(const GroupLaunch& g, int64_t r, int p) {
  return (r * g.group.count + p) * g.splits * g.max_rank;
}

// Block (r, p * rank_chunks + chunk, split): ranks chunk * 32 .. + 31 of product p's update of row r over
// the split's inputs, into its partials.
__global__ void __launch_bounds__(kRanksPerBlock* kSlices)
    lora_shrink_kernel(GroupLaunch g, int64_t k, const __half* __restrict__ x, int64_t ldx,
                       const int32_t* __restrict__ row_adapter, float* __restrict__ partials) {
  __shared__ float partial[kSlices][kRanksPerBlock];
  const int64_t r = blockIdx.x;
  const int p = static_cast<int>(blockIdx.y) / g.rank_chunks;
  const int64_t chunk = static_cast<int64_t>(blockIdx.y) % g.rank_chunks;
  const LoraSlots& t = g.group.targets[p].slots;
  const int32_t slot = row_slot(t, row_adapter, r);
  if (slot < 0) return;  // uniform over the block
  const int64_t rank = t.rank[slot];
  if (chunk * kRanksPerBlock >= rank) return;  // past its ranks: uniform
  const __half* __restrict__ a_t = t.a_t[slot];
  const int lane = static_cast<int>(threadIdx.x % kRanksPerBlock);
  const int slice = static_cast<int>(threadIdx.x / kRanksPerBlock);
  const int64_t j = chunk * kRanksPerBlock + lane;
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
    partials[partials_row(g, r, p) + split * g.max_rank + j] = total;
  }
}

// Block (r, b): product p's outputs (b - first_block[p]) * 256 .. + 255 of row r, for the p whose blocks
// hold b.
__global__ void __launch_bounds__(kOutputsPerBlock)
    lora_expand_kernel(GroupLaunch g, const float* __restrict__ partials,
                       const int32_t* __restrict__ row_adapter) {
  extern __shared__ float ax_row[];
  const int64_t r = blockIdx.x;
  const auto b = static_cast<int32_t>(blockIdx.y);
  int p = 0;
  while (p + 1 < g.group.count && b >= g.first_block[p + 1]) ++p;
  const LoraTarget& target = g.group.targets[p];
  const LoraSlots& t = target.slots;
  const int32_t slot = row_slot(t, row_adapter, r);
  if (slot < 0) return;  // uniform over the block
  const int64_t rank = t.rank[slot];
  const float scale = t.scale[slot];
  // ax = scale * A x: each rank's splits added in split order (the same bits whatever the batch), loaded
  // kAhead at a time (ffn_down's 28672 inputs are 112 splits).
  const float* __restrict__ row_partials = partials + partials_row(g, r, p);
  for (int64_t j = threadIdx.x; j < rank; j += kOutputsPerBlock) {
    const float* __restrict__ column = row_partials + j;
    float total = 0.0f;
    int64_t s = 0;
    for (; s + kAhead <= g.splits; s += kAhead) {
      float v[kAhead];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) v[u] = column[(s + u) * g.max_rank];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) total += v[u];
    }
    for (; s < g.splits; ++s) total += column[s * g.max_rank];
    ax_row[j] = scale * total;
  }
  __syncthreads();
  const int64_t n_out = target.n_out;
  const int64_t o = static_cast<int64_t>(b - g.first_block[p]) * kOutputsPerBlock + threadIdx.x;
  if (o >= n_out) return;
  const __half* __restrict__ b_t = t.b_t[slot];
  float sum = 0.0f;
  int64_t j = 0;
  for (; j + kAhead <= rank; j += kAhead) {
    float bv[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) bv[u] = __half2float(b_t[(j + u) * n_out + o]);
#pragma unroll
    for (int u = 0; u < kAhead; ++u) sum += bv[u] * ax_row[j + u];
  }
  for (; j < rank; ++j) sum += __half2float(b_t[j * n_out + o]) * ax_row[j];
  target.y[r * target.ldy + o] += sum;
}

bool slots_ok(const LoraSlots& t) {
  return t.a_t != nullptr && t.b_t != nullptr && t.rank != nullptr && t.scale != nullptr && t.slots >= 1 &&
         t.max_rank >= 1 && t.max_rank <= kLoraMaxRank;
}

int64_t output_blocks(int64_t n_out) { return (n_out + kOutputsPerBlock - 1) / kOutputsPerBlock; }

}  // namespace

size_t lora_workspace_bytes(int64_t n, int64_t k, int64_t max_rank, int products) {
  if (n < 0 || n > INT32_MAX || k < 1 || k > kLoraMaxInputs || max_rank < 1 || max_rank > kLoraMaxRank ||
      products < 1 || products > kLoraMaxProducts)
    return 0;
  return static_cast<size_t>(n) * static_cast<size_t>(products) * static_cast<size_t>(shrink_splits(k)) *
         static_cast<size_t>(max_rank) * sizeof(float);
}

Status lora_add_f16(const LoraGroup& group, int64_t k, const __half* x, int64_t ldx,
                    const int32_t* row_adapter, int64_t n, void* workspace, size_t workspace_bytes,
                    cudaStream_t stream) {
  if (group.count < 1 || group.count > kLoraMaxProducts || x == nullptr || row_adapter == nullptr || n < 0 ||
      n > INT32_MAX || k < 1 || k > kLoraMaxInputs || ldx < k)
    return Status::invalid_argument;
  GroupLaunch g;
  g.group = group;
  g.splits = shrink_splits(k);
  int64_t blocks = 0;
  for (int p = 0; p < group.count; ++p) {
    const LoraTarget& t = group.targets[p];
    if (!slots_ok(t.slots) || t.y == nullptr || t.n_out < 1 || t.n_out > kLoraMaxOutputs || t.ldy < t.n_out)
      return Status::invalid_argument;
    g.max_rank = t.slots.max_rank > g.max_rank ? t.slots.max_rank : g.max_rank;
    g.first_block[p] = static_cast<int32_t>(blocks);
    blocks += output_blocks(t.n_out);
  }
  if (blocks * kOutputsPerBlock > kLoraMaxOutputs) return Status::invalid_argument;  // over the grid's y
  g.first_block[group.count] = static_cast<int32_t>(blocks);
  g.rank_chunks = static_cast<int32_t>((g.max_rank + kRanksPerBlock - 1) / kRanksPerBlock);
  if (n == 0) return Status::ok;
  if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % alignof(float) != 0 ||
      workspace_bytes < lora_workspace_bytes(n, k, g.max_rank, group.count))
    return Status::invalid_argument;
  auto* partials = static_cast<float*>(workspace);
  const dim3 shrink_grid(static_cast<unsigned>(n), static_cast<unsigned>(group.count * g.rank_chunks),
                         static_cast<unsigned>(g.splits));
  lora_shrink_kernel<<<shrink_grid, kRanksPerBlock * kSlices, 0, stream>>>(g, k, x, ldx, row_adapter,
                                                                           partials);
  if (launch_status() != Status::ok) return Status::device_error;
  const dim3 expand_grid(static_cast<unsigned>(n), static_cast<unsigned>(blocks));
  const size_t shared = static_cast<size_t>(g.max_rank) * sizeof(float);  // 4 KiB at most
  lora_expand_kernel<<<expand_grid, kOutputsPerBlock, shared, stream>>>(g, partials, row_adapter);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
