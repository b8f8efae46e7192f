// LoRA's shrink and expand (lora.cuh). Shrink: a block per (row, 32 ranks), its 8 warps each summing a
// slice of the inputs for the same 32 ranks (lanes read 32 consecutive Aᵀ entries: one coalesced load a
// warp an input), the slices then added in a fixed order. Expand: a block per (row, 256 outputs), each
// thread one output over the row's rank values staged in shared memory (threads read consecutive Bᵀ
// entries). Each row's blocks read the factors (the rows after the first mostly from L2): simple, and
// a decode step's few rows; a prompt's many rows would want the factors tiled across rows.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/lora.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kRanksPerBlock = 32;
constexpr int kSlices = 8;  // warps a shrink block
constexpr int kOutputsPerBlock = 256;

// Block (r, chunk): ranks chunk * 32 .. + 31 of row r.
__global__ void __launch_bounds__(kRanksPerBlock* kSlices)
    lora_shrink_kernel(const __half* __restrict__ a_t, int64_t k, int64_t rank, float scale,
                       const __half* __restrict__ x, int64_t ldx, const int32_t* __restrict__ row_adapter,
                       int32_t adapter, float* __restrict__ ax) {
  __shared__ float partial[kSlices][kRanksPerBlock];
  const int64_t r = blockIdx.x;
  if (row_adapter[r] != adapter) return;  // uniform over the block
  const int lane = static_cast<int>(threadIdx.x % kRanksPerBlock);
  const int slice = static_cast<int>(threadIdx.x / kRanksPerBlock);
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kRanksPerBlock + lane;
  const __half* xr = x + r * ldx;
  float sum = 0.0f;
  if (j < rank) {
    for (int64_t c = slice; c < k; c += kSlices) sum += __half2float(a_t[c * rank + j]) * __half2float(xr[c]);
  }
  partial[slice][lane] = sum;
  __syncthreads();
  if (slice == 0 && j < rank) {
    float total = partial[0][lane];
    for (int s = 1; s < kSlices; ++s) total += partial[s][lane];
    ax[r * rank + j] = scale * total;
  }
}

// Block (r, chunk): outputs chunk * 256 .. + 255 of row r.
__global__ void __launch_bounds__(kOutputsPerBlock)
    lora_expand_kernel(const __half* __restrict__ b_t, int64_t rank, int64_t n_out,
                       const float* __restrict__ ax, const int32_t* __restrict__ row_adapter, int32_t adapter,
                       float* __restrict__ y, int64_t ldy) {
  extern __shared__ float ax_row[];
  const int64_t r = blockIdx.x;
  if (row_adapter[r] != adapter) return;  // uniform over the block
  for (int64_t j = threadIdx.x; j < rank; j += kOutputsPerBlock) ax_row[j] = ax[r * rank + j];
  __syncthreads();
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kOutputsPerBlock + threadIdx.x;
  if (o >= n_out) return;
  float sum = 0.0f;
  for (int64_t j = 0; j < rank; ++j) sum += __half2float(b_t[j * n_out + o]) * ax_row[j];
  y[r * ldy + o] += sum;
}

bool rows_ok(int64_t n, const int32_t* row_adapter) {
  return n >= 0 && n <= INT32_MAX && row_adapter != nullptr;
}

}  // namespace

Status lora_shrink_f16(const __half* a_t, int64_t k, int64_t rank, float scale, const __half* x, int64_t ldx,
                       const int32_t* row_adapter, int32_t adapter, int64_t n, float* ax,
                       cudaStream_t stream) {
  if (a_t == nullptr || x == nullptr || ax == nullptr || !rows_ok(n, row_adapter) || k < 1 || ldx < k ||
      rank < 1 || rank > kLoraMaxRank)
    return Status::invalid_argument;
  if (n == 0) return Status::ok;
  const dim3 grid(static_cast<unsigned>(n),
                  static_cast<unsigned>((rank + kRanksPerBlock - 1) / kRanksPerBlock));
  lora_shrink_kernel<<<grid, kRanksPerBlock * kSlices, 0, stream>>>(a_t, k, rank, scale, x, ldx, row_adapter,
                                                                    adapter, ax);
  return launch_status();
}

Status lora_expand_f16(const __half* b_t, int64_t rank, int64_t n_out, const float* ax,
                       const int32_t* row_adapter, int32_t adapter, int64_t n, float* y, int64_t ldy,
                       cudaStream_t stream) {
  if (b_t == nullptr || ax == nullptr || y == nullptr || !rows_ok(n, row_adapter) || rank < 1 ||
      rank > kLoraMaxRank || n_out < 1 || n_out > kLoraMaxOutputs || ldy < n_out)
    return Status::invalid_argument;
  if (n == 0) return Status::ok;
  const dim3 grid(static_cast<unsigned>(n),
                  static_cast<unsigned>((n_out + kOutputsPerBlock - 1) / kOutputsPerBlock));
  const size_t shared = static_cast<size_t>(rank) * sizeof(float);  // 4 KiB at most
  lora_expand_kernel<<<grid, kOutputsPerBlock, shared, stream>>>(b_t, rank, n_out, ax, row_adapter, adapter,
                                                                 y, ldy);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
