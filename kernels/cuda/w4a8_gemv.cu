#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>

#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/w4a16_weights.cuh"
#include "kernels/cuda/w4a8_gemv.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarpSize * kWarps;
constexpr int kRun = 32;         // inputs a run: one activation block, 16 bytes of nibbles
constexpr int kLanesPerRun = 4;  // staging: 8 inputs a lane
constexpr int kBlocksPerSm = 2;  // 16 warps an SM streaming weights (see launch)
constexpr unsigned kFullMask = 0xffffffffu;

// Four products of unsigned bytes of a and signed bytes of b, added to c (dp4a.u32.s32).
__device__ __forceinline__ int dp4a_unsigned_signed(uint32_t a, int b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Where the quantized rows lie in shared memory, padded so that a warp's reads hit 32 distinct banks: 16
// bytes after every QPeriod activation bytes (lanes read QPeriod bytes apart: 32 -> 48 bytes, 256 -> 272)
// and, with SPeriod > 0, one word after every SPeriod runs' scales and sums (the Q4_K kernel's lanes
// read 8 runs apart: 8 -> 9 words). Unpadded, a lane per super-block put all 32 lanes' 16-byte reads on
// banks 0-3 (32 wavefronts where 4 do).
template <int QPeriod, int SPeriod>
struct Staging {
  // Bytes a row of xq, and input i's byte in it.
  __host__ __device__ static constexpr int64_t q_row(int64_t k) { return k + k / QPeriod * 16; }
  __host__ __device__ static constexpr int64_t q_at(int64_t i) { return i + i / QPeriod * 16; }
  // Words a row of xd (and of xs), and run r's word in it.
  __host__ __device__ static constexpr int64_t s_row(int64_t runs) { return runs + s_pad(runs); }
  __host__ __device__ static constexpr int64_t s_at(int64_t run) { return run + s_pad(run); }
  __host__ __device__ static constexpr int64_t s_pad(int64_t runs) {
    return SPeriod > 0 ? runs / SPeriod : 0;
  }
  // Shared memory for m rows: xq, then xd and xs.
  static constexpr size_t bytes(int64_t m, int64_t k) {
    return static_cast<size_t>(m * q_row(k)) + static_cast<size_t>(m * s_row(k / kRun)) * 8;
  }
};
using Int4Staging = Staging<kRun, 0>;  // lanes a run (32 bytes) apart; scales and sums a word apart
using Q4KStaging = Staging<256, 8>;    // lanes a super-block (256 bytes, 8 runs) apart

// The m = M rows of x quantized into shared memory (kernels::quantize_activations_q8's steps): xq [M]
// rows of S::q_row(k) int8, xd and xs [M] rows of S::s_row(k / 32) scales and sums. Every thread of the
// block calls it; a barrier must follow before the results are read.
template <int M, class S>
__device__ void quantize_to_shared(const __half* __restrict__ x, int64_t k, int8_t* xq, float* xd, int* xs) {
  const int64_t runs = k / kRun, q_row = S::q_row(k), s_row = S::s_row(runs);
  // Quantize: 4 consecutive lanes per run (aligned in the warp, so their shuffles stay among them),
  // every lane of the block in every pass so that the shuffles see full warps.
  const int64_t parts = M * runs * kLanesPerRun;
  for (int64_t base = 0; base < parts; base += kThreads) {
    const int64_t e = base + threadIdx.x;
    const bool active = e < parts;
    const int64_t row = active ? e / (runs * kLanesPerRun) : 0;
    const int64_t run = active ? (e / kLanesPerRun) % runs : 0;
    const int part = static_cast<int>(e % kLanesPerRun);
    float v[8] = {};
    if (active) {
      const uint4 raw = *reinterpret_cast<const uint4*>(x + row * k + run * kRun + part * 8);
      const auto* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
      }
    }
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
    amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, 2));
    // kernels::quantize_activations_q8's steps: IEEE division and product, roundf.
    const float d = amax / 127.0f;
    const float inv = d != 0.0f ? 1.0f / d : 0.0f;
    uint32_t packed[2] = {0, 0};
    int sum = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int q = static_cast<int>(roundf(v[i] * inv));
      sum += q;
      packed[i / 4] |= (static_cast<uint32_t>(q) & 0xFFu) << (8 * (i % 4));
    }
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    if (active) {
      *reinterpret_cast<uint2*>(xq + row * q_row + S::q_at(run * kRun + part * 8)) =
          make_uint2(packed[0], packed[1]);
      if (part == 0) {
        xd[row * s_row + S::s_at(run)] = d;
        xs[row * s_row + S::s_at(run)] = sum;
      }
    }
  }
}

// The quantized activation rows in shared memory as Staging lays them out: q int8, d scales, s sums.
struct QuantizedRows {
  const int8_t* q;
  const float* d;
  const int* s;
};

// What both kernels do before their rows: the warp's first row of weights (row_bytes bytes a row from
// `weights`) on its way to L2 while the activations are quantized (and, launched programmatically, while
// the kernel before us finishes: weights are no kernel's output), one 128-byte line a lane at a time;
// the wait for that kernel; the M rows of x quantized into shared memory; a barrier; the next kernel
// allowed to start.
template <int M, class S>
__device__ QuantizedRows prologue(const uint8_t* weights, int64_t row_bytes, int64_t first, int64_t n_out,
                                  int64_t k, const __half* __restrict__ x, int lane) {
  extern __shared__ __align__(16) uint8_t smem[];
  auto* xq = reinterpret_cast<int8_t*>(smem);
  auto* xd = reinterpret_cast<float*>(smem + M * S::q_row(k));  // q_row(k): a multiple of 16
  auto* xs = reinterpret_cast<int*>(xd + M * S::s_row(k / kRun));
  if (first < n_out) {
    for (int64_t line = lane; line * 128 < row_bytes; line += kWarpSize)
      detail::prefetch_l2(weights + first * row_bytes + line * 128);
  }
  detail::wait_for_prior_grids();  // x comes from the kernel before us
  quantize_to_shared<M, S>(x, k, xq, xd, xs);
  __syncthreads();
  detail::allow_dependent_launch();  // the kernel after us may start (it waits for us)
  return {xq, xd, xs};
}

// A warp's per-lane sums of one output row for each of the M activation rows, reduced across the warp
// and stored by lane 0.
template <int M>
__device__ __forceinline__ void store_row_sums(const float (&acc)[M], int lane, float* __restrict__ y,
                                               int64_t n_out, int64_t out) {
#pragma unroll
  for (int r = 0; r < M; ++r) {
    float v = acc[r];
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
    if (lane == 0) y[r * n_out + out] = v;
  }
}

template <int M>
__global__ void __launch_bounds__(kThreads)
    w4a8_gemv_kernel(w4a16::Int4GroupBlocks w, int64_t n_out, int64_t k, const __half* __restrict__ x,
                     float* __restrict__ y) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t runs = k / kRun;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const QuantizedRows rows = prologue<M, Int4Staging>(w.quants, k / 2, first, n_out, k, x, lane);
  const int8_t* xq = rows.q;
  const float* xd = rows.d;
  const int* xs = rows.s;

  const int runs32 = static_cast<int>(runs), groups = static_cast<int>(runs >> w.group_shift);
  const int q_row = static_cast<int>(Int4Staging::q_row(k));  // rows: 48 bytes a run
  for (int64_t out = first; out < n_out; out += static_cast<int64_t>(gridDim.x) * kWarps) {
    const auto* quants = reinterpret_cast<const uint4*>(w.quants) + out * runs;
    const __half* scales = w.scales + out * groups;
    const uint8_t* zeros = w.zeros + out * groups;
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; ++r) acc[r] = 0.0f;
      // Four runs a pass: the loop and address work shared (1.69 -> 1.24 instructions a weight at one
      // row in the main loop, by the SASS; the compiler's own choice was a 7-run body with its remainder).
#pragma unroll 4
    for (int run = lane; run < runs32; run += kWarpSize) {
      const uint4 q = __ldg(quants + run);
      const int g = run >> w.group_shift;
      const float scale = __half2float(__ldg(scales + g));
      const int zero = __ldg(zeros + g);
      // Byte j holds input j (low nibble) and input j + 16 (high): word i's low nibbles are inputs
      // 4i .. 4i + 3 and its high nibbles 16 + 4i .. 16 + 4i + 3. The high ones are used in place
      // (16 times the level, an unsigned byte), their dot product shifted back once.
      const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int r = 0; r < M; ++r) {
        const auto* xr = reinterpret_cast<const int4*>(xq + r * q_row + run * (kRun + 16));
        const int4 a = xr[0], b = xr[1];  // inputs 0..15, 16..31
        const int xa[4] = {a.x, a.y, a.z, a.w}, xb[4] = {b.x, b.y, b.z, b.w};
        int lo = 0, hi16 = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          lo = dp4a_unsigned_signed(words[i] & 0x0F0F0F0Fu, xa[i], lo);
          hi16 = dp4a_unsigned_signed(words[i] & 0xF0F0F0F0u, xb[i], hi16);
        }
        const int dot = lo + (hi16 >> 4);  // hi16 is 16 times an integer: exact
        const int at = r * runs32 + run;
        acc[r] = fmaf(xd[at] * scale, static_cast<float>(dot - zero * xs[at]), acc[r]);
      }
    }
    store_row_sums<M>(acc, lane, y, n_out, out);
  }
}

// GGUF Q4_K super-blocks as stored (144 bytes a 256 weights): lane l takes the super-blocks l, l + 32,
// ... of its row (nine 16-byte loads each; its 8 sub-blocks' scales unpacked once); qs bytes
// 32c .. 32c + 31 hold sub-block 2c in their low nibbles and 2c + 1 in their high ones, input i in
// byte i; per sub-block j of scale ds = d * scale_j and min dm = dmin * min_j (exact in fp32) it adds
// d_x * (ds * dot(q, xq) - dm * sum(xq)).
struct Q4KWeights {
  const uint8_t* blocks;  // [n_out, k / 256] BlockQ4_K
};

template <int M>
__global__ void __launch_bounds__(kThreads)
    w4a8_gemv_q4_k_kernel(Q4KWeights w, int64_t n_out, int64_t k, const __half* __restrict__ x,
                          float* __restrict__ y) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t row_bytes = (k / 256) * 144;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * kWarps;
  const QuantizedRows rows = prologue<M, Q4KStaging>(w.blocks, row_bytes, first, n_out, k, x, lane);
  const int8_t* xq = rows.q;
  const float* xd = rows.d;
  const int* xs = rows.s;

  const int super_blocks = static_cast<int>(k / 256);
  const int q_row = static_cast<int>(Q4KStaging::q_row(k)),
            s_row = static_cast<int>(Q4KStaging::s_row(k / kRun));
  // A lane's super-blocks, row after row: sb = lane, lane + 32, ... of rows first, first + row_step, ...
  // The next one's nine loads are issued before this one is computed, so that a lane always has a
  // super-block in flight (left to itself the compiler issued them in small groups, each waited for in
  // turn).
  const auto* row = reinterpret_cast<const uint4*>(w.blocks + first * row_bytes);  // 9 uint4 a super-block
  const int64_t row_step_u4 = row_step * (row_bytes / 16);
  uint4 next[9];
  const auto fetch = [&](const uint4* blk) {
#pragma unroll
    for (int i = 0; i < 9; ++i) next[i] = __ldg(blk + i);
  };
  if (first < n_out && lane < super_blocks) fetch(row + lane * 9);
  for (int64_t out = first; out < n_out; out += row_step, row += row_step_u4) {
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; ++r) acc[r] = 0.0f;
    for (int sb = lane; sb < super_blocks; sb += kWarpSize) {
      uint4 blk[9];  // the header, then 8 x 16 bytes of qs
#pragma unroll
      for (int i = 0; i < 9; ++i) blk[i] = next[i];
      if (sb + kWarpSize < super_blocks) {
        fetch(row + (sb + kWarpSize) * 9);
      } else if (out + row_step < n_out && lane < super_blocks) {
        fetch(row + row_step_u4 + lane * 9);
      }
      // The 8 sub-blocks' scales and mins, each index known at compile time (no selects).
      float ds[8], dm[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) w4a16::q4_k_scale_min(blk[0], j, ds[j], dm[j]);
#pragma unroll
      for (int r = 0; r < M; ++r) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {  // qs bytes 32c .. 32c + 31: sub-blocks 2c (low) and 2c + 1 (high)
          const uint4 q0 = blk[1 + 2 * c], q1 = blk[2 + 2 * c];
          const uint32_t words[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
          // Sub-block 2c's activation block, 2c + 1's following it (Q4KStaging: 272 bytes a super-block).
          const auto* x0 = reinterpret_cast<const int4*>(xq + r * q_row + sb * 272 + c * 64);
          const int4 a0 = x0[0], a1 = x0[1], b0 = x0[2], b1 = x0[3];
          const int xa[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
          const int xb[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
          int lo = 0, hi16 = 0;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            lo = dp4a_unsigned_signed(words[i] & 0x0F0F0F0Fu, xa[i], lo);
            hi16 = dp4a_unsigned_signed(words[i] & 0xF0F0F0F0u, xb[i], hi16);
          }
          const int at = r * s_row + sb * 9 + 2 * c;  // Q4KStaging: 9 words a super-block
          acc[r] =
              fmaf(xd[at], fmaf(ds[2 * c], static_cast<float>(lo), -dm[2 * c] * static_cast<float>(xs[at])),
                   acc[r]);
          acc[r] = fmaf(xd[at + 1],
                        fmaf(ds[2 * c + 1], static_cast<float>(hi16 >> 4),
                             -dm[2 * c + 1] * static_cast<float>(xs[at + 1])),
                        acc[r]);
        }
      }
    }
    store_row_sums<M>(acc, lane, y, n_out, out);
  }
}

// One of the kernels above for m rows: shared memory for the quantized rows, at most kBlocksPerSm
// blocks an SM (each taking rows in turn: every block quantizes all m rows of x first, k reads from L2
// and ~k / 64 instructions a thread, so one block per 8 rows would spend about a third of its
// instructions there on an 8192 x 8192 product and read x from L2 once per 8 rows, half the weights'
// bytes again).
// What a launch of `kernel` with `smem` bytes on a device needs to know (its shared memory allowed, its
// blocks an SM, the SMs), asked of the runtime once and remembered: eager passes (cuda_graphs: false, a
// host reducer) launch these kernels hundreds of times a step, and the queries cost microseconds.
struct LaunchFacts {
  int max_smem = 0, sms = 0, per_sm = 0;
};
std::mutex launch_facts_mutex;
std::map<std::tuple<const void*, int, size_t>, LaunchFacts> launch_facts_known;

template <typename Kernel>
cudaError_t launch_facts(Kernel kernel, int device, size_t smem, LaunchFacts& facts) {
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, smem);
  const std::lock_guard<std::mutex> lock(launch_facts_mutex);
  if (const auto it = launch_facts_known.find(key); it != launch_facts_known.end()) {
    facts = it->second;
    return cudaSuccess;
  }
  LaunchFacts f;
  cudaError_t err = cudaDeviceGetAttribute(&f.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (smem <= static_cast<size_t>(f.max_smem)) {  // else refused by the caller, nothing more to ask
    // Raised to all the device allows (the kernels have no static shared memory), never lowered: every
    // raise sets the same value, so no launch's setting can undo another's.
    if (smem > 48 * 1024)
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, f.max_smem);
    if (err == cudaSuccess)
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&f.per_sm, kernel, kThreads, smem);
    if (err != cudaSuccess) return err;
  }
  launch_facts_known.emplace(key, f);
  facts = f;
  return cudaSuccess;
}

template <class S, typename Weights>
Status launch(void (*kernel)(Weights, int64_t, int64_t, const __half*, float*), int64_t m,
              const Weights& weights, int64_t n_out, int64_t k, const __half* x, float* y,
              cudaStream_t stream, bool programmatic) {
  const size_t smem = S::bytes(m, k);
  int device = 0;
  LaunchFacts facts;
  // A failed call's error goes to launch_status (taken from the runtime, kept for the caller's message).
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = launch_facts(kernel, device, smem, facts);
  if (err != cudaSuccess) return launch_status(err);
  if (smem > static_cast<size_t>(facts.max_smem)) return Status::invalid_argument;
  if (facts.per_sm < 1) return launch_status(cudaErrorInvalidConfiguration);  // no block fits an SM
  const int64_t wanted = (n_out + kWarps - 1) / kWarps;
  const int64_t resident =
      static_cast<int64_t>(facts.sms) * (facts.per_sm < kBlocksPerSm ? facts.per_sm : kBlocksPerSm);
  const int64_t grid = wanted < resident ? wanted : resident;
  const cudaError_t launched =
      detail::launch_kernel(kernel, dim3(static_cast<unsigned>(grid)), dim3(kThreads), smem, stream,
                            programmatic, weights, n_out, k, x, y);
  return launch_status(launched);
}

}  // namespace

Status w4a8_gemv_int4_groups(const uint8_t* quants, const __half* scales, const uint8_t* zeros, int64_t group,
                             int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                             cudaStream_t stream, bool programmatic) {
  w4a16::Int4GroupBlocks blocks{};
  if (!w4a16::make_int4_group_operands(quants, scales, zeros, group, k, x, y, blocks))
    return Status::invalid_argument;
  if (n_out < 0 || k < 0 || m < 1 || m > kW4A8GemvMaxM) return Status::invalid_argument;
  if (n_out == 0) return Status::ok;
  if (k == 0) {  // empty sums
    const cudaError_t err = cudaMemsetAsync(y, 0, static_cast<size_t>(m * n_out) * sizeof(float), stream);
    return launch_status(err);
  }
  using Kernel = void (*)(w4a16::Int4GroupBlocks, int64_t, int64_t, const __half*, float*);
  constexpr Kernel kKernels[kW4A8GemvMaxM] = {w4a8_gemv_kernel<1>, w4a8_gemv_kernel<2>, w4a8_gemv_kernel<3>,
                                              w4a8_gemv_kernel<4>};
  return launch<Int4Staging>(kKernels[m - 1], m, blocks, n_out, k, x, y, stream, programmatic);
}

Status w4a8_gemv_q4_k(const uint8_t* blocks, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                      cudaStream_t stream, bool programmatic) {
  if (blocks == nullptr || reinterpret_cast<uintptr_t>(blocks) % 16 != 0 || x == nullptr || y == nullptr ||
      reinterpret_cast<uintptr_t>(x) % 16 != 0 || n_out < 0 || k < 0 || k % 256 != 0 || m < 1 ||
      m > kW4A8GemvMaxM)
    return Status::invalid_argument;
  if (n_out == 0) return Status::ok;
  if (k == 0) {  // empty sums
    const cudaError_t err = cudaMemsetAsync(y, 0, static_cast<size_t>(m * n_out) * sizeof(float), stream);
    return launch_status(err);
  }
  using Kernel = void (*)(Q4KWeights, int64_t, int64_t, const __half*, float*);
  constexpr Kernel kKernels[kW4A8GemvMaxM] = {w4a8_gemv_q4_k_kernel<1>, w4a8_gemv_q4_k_kernel<2>,
                                              w4a8_gemv_q4_k_kernel<3>, w4a8_gemv_q4_k_kernel<4>};
  return launch<Q4KStaging>(kKernels[m - 1], m, Q4KWeights{blocks}, n_out, k, x, y, stream, programmatic);
}

}  // namespace nibble::kernels::cuda
