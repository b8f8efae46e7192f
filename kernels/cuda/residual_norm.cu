// Each row is split over a thread-block cluster of up to 8 blocks (Hopper), 256 threads each: a
// strided pass over the block's slice adds delta (written back) and accumulates the sum of squares in
// fp32, a block reduction gives the slice's sum, the cluster's blocks read all slices' sums from
// distributed shared memory in rank order (the same fixed order in every block: deterministic, and the
// same bits for a row whatever the other rows), and a second pass writes y. Element i is read and
// written by the same thread in both passes.
//
// Why a cluster: at decode a call has one row (llama-70b: 8192 values), and one block on one SM took
// ~9 us a call (1.44 of a 22.8 ms llama-70b step, 160 calls: docs/perf/gpu.md) with 1024 threads,
// after ~27 us with 256 and a loop the compiler could not unroll; its time is dependent memory round
// trips on one SM. Eight blocks on eight SMs each move an eighth of the row with 4 independent loads a
// thread.
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/residual_norm.cuh"

namespace nibble::kernels::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = detail::kAddRmsNormThreads;

// Blocks (row, part) in clusters of (1, parts): part `part` of row `row` covers [part * slice, + slice).
__global__ void __launch_bounds__(kThreads)
    add_rms_norm_kernel(float* __restrict__ residual, const float* __restrict__ delta,
                        const float* __restrict__ weight, __half* __restrict__ y, int64_t n, int64_t slice,
                        float eps) {
  __shared__ float scratch[detail::kWarpSize];
  __shared__ float slice_sum;
  detail::wait_for_prior_grids();    // delta and residual come from earlier kernels
  detail::allow_dependent_launch();  // the matrix product that reads y may start (it waits for us)
  cg::cluster_group cluster = cg::this_cluster();
  const int part = static_cast<int>(cluster.block_rank()), parts = static_cast<int>(cluster.num_blocks());
  const int64_t row_off = static_cast<int64_t>(blockIdx.x) * n;
  float* rr = residual + row_off;
  const float* dr = delta != nullptr ? delta + row_off : nullptr;
  __half* yr = y + row_off;
  const int64_t begin = part * slice, end = min(n, begin + slice);

  float sum_sq = 0.0f;
  if (dr != nullptr) {
#pragma unroll 4
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      const float h = __fadd_rn(rr[i], dr[i]);
      rr[i] = h;
      sum_sq = fmaf(h, h, sum_sq);
    }
  } else {
#pragma unroll 4
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      const float h = rr[i];
      sum_sq = fmaf(h, h, sum_sq);
    }
  }
  sum_sq = detail::block_sum(sum_sq, scratch);
  if (threadIdx.x == 0) slice_sum = sum_sq;
  cluster.sync();  // every part's slice_sum is written and visible cluster-wide
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int q = 0; q < parts; ++q) total += *cluster.map_shared_rank(&slice_sum, q);
    scratch[0] = total;
  }
  cluster.sync();  // the total is in scratch[0]; and no block leaves while another reads its slice_sum
  // Same formula as kernels::rms_norm: 1 / sqrt(mean + eps), IEEE division and square root.
  const float scale = 1.0f / sqrtf(scratch[0] / static_cast<float>(n) + eps);
#pragma unroll 4
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    yr[i] = __float2half_rn(__fmul_rn(__fmul_rn(rr[i], scale), weight[i]));
  }
}

}  // namespace

Status add_rms_norm_f32(float* residual, const float* delta, const float* weight, __half* y, int64_t rows,
                        int64_t n, float eps, cudaStream_t stream, bool programmatic) {
  if (residual == nullptr || weight == nullptr || y == nullptr) return Status::invalid_argument;
  if (rows < 0 || n < 1 || !(eps >= 0.0f)) return Status::invalid_argument;
  if (rows > INT32_MAX) return Status::invalid_argument;
  if (rows == 0) return Status::ok;
  const int parts = detail::add_rms_norm_parts(n);
  const int64_t slice = (n + parts - 1) / parts;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(rows), static_cast<unsigned>(parts), 1);
  config.blockDim = dim3(kThreads, 1, 1);
  config.stream = stream;
  cudaLaunchAttribute attrs[2]{};
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = 1;
  attrs[0].val.clusterDim.y = static_cast<unsigned>(parts);
  attrs[0].val.clusterDim.z = 1;
  attrs[1] = detail::programmatic_launch_attribute();
  config.attrs = attrs;
  config.numAttrs = programmatic ? 2 : 1;
  const cudaError_t launched =
      cudaLaunchKernelEx(&config, add_rms_norm_kernel, residual, delta, weight, y, n, slice, eps);
  return launch_status(launched);
}

}  // namespace nibble::kernels::cuda
