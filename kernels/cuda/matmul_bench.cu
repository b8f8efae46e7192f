#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cuda/bench_support.cuh"
#include "kernels/cuda/event_timer.cuh"
#include "kernels/cuda/int4_tiles.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/matmul_bench.cuh"
#include "kernels/cuda/random_weights.cuh"
#include "kernels/cuda/w4a16_gemm.cuh"
#include "kernels/cuda/w4a16_gemm_cutlass.cuh"
#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/cuda/w4a16_gemv_half2.cuh"
#include "kernels/cuda/w4a16_gemv_mma.cuh"
#include "kernels/cuda/w4a16_tuning.cuh"
#include "kernels/cuda/w4a8_gemv.cuh"
#include "kernels/int4_tiles.hpp"
#include "kernels/q6_k_planes.hpp"
#include "kernels/quant_types.hpp"

namespace nibble::kernels::cuda {
namespace {

// A probe of the tensor-core GEMV (w4a16_gemv_int4_groups_mma_probe) with the INT4 launchers' signature.
template <GemvMmaProbe P>
Status launch_probe(const uint8_t* quants, const __half* scales, const uint8_t* zeros, int64_t group,
                    int64_t n_out, int64_t k, const __half* x, int64_t m, float* y, cudaStream_t stream,
                    bool) {
  return w4a16_gemv_int4_groups_mma_probe(P, quants, scales, zeros, group, n_out, k, x, m, y, stream);
}

// Failures inside the benchmark unwind to run_matmul_bench, which turns them into a Status.
using bench::BenchFailure;
using bench::check;
using bench::DeviceMemory;
using bench::failure_reason;
void check(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw BenchFailure(std::string(what) + ": " + cublasGetStatusString(st) + " (cuBLAS status " +
                       std::to_string(st) + ")");
}

// Random benchmark operands (kernels/cuda/random_weights.cuh): never all zeros, which would flatter
// the timings.
void fill_halves(__half* p, int64_t n, float scale, uint64_t seed, cudaStream_t stream) {
  if (fill_random_halves(p, n, scale, seed, stream) != Status::ok)
    throw BenchFailure("filling operands failed");
}

// Enough copies of a weight matrix of `bytes` that a sweep over them is 4x the L2 cache.
int copies_for(size_t bytes, int l2_bytes) {
  const size_t want = 4 * static_cast<size_t>(std::max(l2_bytes, 1 << 20));
  return static_cast<int>(std::clamp<size_t>((want + bytes - 1) / bytes, 2, 64));
}

// Columns left out of the table because their kernel failed while the device stayed usable (a
// first run of a kernel on new hardware must not cost the rest of the table). Set by
// run_matmul_bench for its run; the benchmark is single-threaded.
std::vector<std::string>* skipped_columns = nullptr;

// Median over repetitions of the mean time of one call, in microseconds (median_call_us). `call(i)`
// enqueues product i (it picks its weight copy from i: i keeps counting across the warm-up and the
// timed loops, so that every loop sweeps on through the copies instead of restarting at copy 0) and
// throws BenchFailure when it cannot. A failure that leaves the device usable (no sticky error once
// the stream drains) gives 0, '-' in the table, and is named in skipped_columns; any other rethrows.
template <typename Call>
double time_us(cudaStream_t stream, int iterations, int repetitions, Call call) {
  double us = 0.0;
  cudaError_t err = cudaSuccess;
  int next = 0;
  try {
    median_call_us(
        stream, iterations, repetitions,
        [&](int) {
          call(next++);
          return true;
        },
        us, err);
    check(err, "timing with CUDA events");
  } catch (const BenchFailure& e) {
    // A sticky error (the context is lost) fails the drain; a launch error only shows in the last error.
    const cudaError_t drained = cudaStreamSynchronize(stream);
    const cudaError_t last = cudaGetLastError();  // (and clears it)
    if (drained != cudaSuccess || skipped_columns == nullptr) throw;
    skipped_columns->push_back(
        std::string(e.what()) +
        (last != cudaSuccess ? std::string(" (") + cudaGetErrorString(last) + ")" : ""));
    return 0.0;
  }
  return us;
}

double measure_copy_gbps(cudaStream_t stream) {
  const size_t bytes = size_t{1} << 30;
  DeviceMemory a(bytes), b(bytes);
  check(cudaMemsetAsync(a.ptr, 1, bytes, stream), "cudaMemsetAsync");
  const double us = time_us(stream, 10, 5, [&](int) {
    check(cudaMemcpyAsync(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
  });
  return 2.0 * static_cast<double>(bytes) / (us * 1e-6) / 1e9;
}

void bench_shape(const MatmulShape& shape, const std::vector<int64_t>& ms, int iterations, int repetitions,
                 int l2_bytes, cudaStream_t stream, cublasHandle_t cublas, MatmulBenchResult& result) {
  const int64_t k = shape.k, n = shape.n_out;
  const int64_t max_m = *std::max_element(ms.begin(), ms.end());
  const size_t q4_bytes = static_cast<size_t>(n * (k / kQK4_0)) * sizeof(BlockQ4_0);
  const size_t f16_bytes = static_cast<size_t>(n * k) * sizeof(__half);
  const int q4_copies = copies_for(q4_bytes, l2_bytes), f16_copies = copies_for(f16_bytes, l2_bytes);
  DeviceMemory x(static_cast<size_t>(max_m * k) * sizeof(__half));
  DeviceMemory y(static_cast<size_t>(max_m * n) * sizeof(float));
  auto* xh = static_cast<__half*>(x.ptr);
  fill_halves(xh, max_m * k, 1.0f, 7, stream);
  check(cudaGetLastError(), "fill x");

  std::vector<double> ours(ms.size()), theirs(ms.size()), split(ms.size(), 0.0);
  {
    DeviceMemory w(q4_bytes * q4_copies);
    if (fill_random_q4_0(static_cast<uint8_t*>(w.ptr), n * q4_copies, k, 11, stream) != Status::ok)
      throw BenchFailure("fill weights failed");
    for (size_t mi = 0; mi < ms.size(); ++mi) {
      const int64_t m = ms[mi];
      ours[mi] = time_us(stream, iterations, repetitions, [&](int i) {
        const uint8_t* wi =
            static_cast<const uint8_t*>(w.ptr) + q4_bytes * static_cast<size_t>(i % q4_copies);
        const Status st = m <= kW4A16GemvMaxM
                              ? w4a16_gemv_q4_0(wi, n, k, xh, m, static_cast<float*>(y.ptr), stream)
                              : w4a16_gemm_q4_0(wi, n, k, xh, m, static_cast<float*>(y.ptr), stream);
        if (st != Status::ok) throw BenchFailure(std::string("W4A16 kernel failed: ") + failure_reason(st));
      });
    }
  }
  {
    // The split layout (kernels/q4_0_split.hpp): the same bytes in two arrays; values do not matter
    // for timing, only that the scales are ordinary numbers.
    const size_t quant_bytes = static_cast<size_t>(n * k / 2),
                 scale_count = static_cast<size_t>(n * (k / kQK4_0));
    DeviceMemory quants(quant_bytes * q4_copies), scales(scale_count * sizeof(__half) * q4_copies);
    fill_halves(static_cast<__half*>(quants.ptr), static_cast<int64_t>(quant_bytes / 2) * q4_copies, 1.0f, 17,
                stream);
    fill_halves(static_cast<__half*>(scales.ptr), static_cast<int64_t>(scale_count) * q4_copies, 0.01f, 19,
                stream);
    check(cudaGetLastError(), "fill split weights");
    for (size_t mi = 0; mi < ms.size(); ++mi) {
      const int64_t m = ms[mi];
      if (m > kW4A16GemvMaxM) continue;
      split[mi] = time_us(stream, iterations, repetitions, [&](int i) {
        const size_t copy = static_cast<size_t>(i % q4_copies);
        const Status st = w4a16_gemv_q4_0_split(static_cast<const uint8_t*>(quants.ptr) + quant_bytes * copy,
                                                static_cast<const __half*>(scales.ptr) + scale_count * copy,
                                                n, k, xh, m, static_cast<float*>(y.ptr), stream);
        if (st != Status::ok)
          throw BenchFailure(std::string("W4A16 split kernel failed: ") + failure_reason(st));
      });
    }
  }
  std::vector<double> g128(ms.size(), 0.0), g128_mma(ms.size(), 0.0), g128_tc(ms.size(), 0.0),
      g128_staged(ms.size(), 0.0), g128_half2(ms.size(), 0.0), g128_w4a8(ms.size(), 0.0),
      q4k_w4a8(ms.size(), 0.0), g128_tc32(ms.size(), 0.0), g128_tc64(ms.size(), 0.0),
      g128_tc_loads(ms.size(), 0.0), g128_tc_compute(ms.size(), 0.0), g128_deq(ms.size(), 0.0),
      tiles_tc(ms.size(), 0.0), tiles_tc32(ms.size(), 0.0), tiles_tc64(ms.size(), 0.0),
      tiles_deq(ms.size(), 0.0), tiles_loads(ms.size(), 0.0), q4k(ms.size(), 0.0), q4k_tc(ms.size(), 0.0),
      q4k_half2(ms.size(), 0.0), q4k_tiles_tc(ms.size(), 0.0), g128_cutlass(ms.size(), 0.0),
      g128_cutlass_pp(ms.size(), 0.0), g128_cutlass16(ms.size(), 0.0), q6k(ms.size(), 0.0),
      q6k_half2(ms.size(), 0.0);
  std::vector<const char*> tiles_tc_shape(ms.size(), "");
  std::vector<std::vector<double>> g128_half2_variants(ms.size());
  const size_t g128_quant_bytes = static_cast<size_t>(n * k / 2);
  const size_t g128_groups = static_cast<size_t>(n * (k / 128));
  // nibbles, then scales, then zeros, each 16-byte aligned (as CudaLlamaModel stores them)
  const size_t g128_stride = (g128_quant_bytes + g128_groups * 2 + g128_groups + 15) / 16 * 16;
  const size_t g128_bytes = g128_quant_bytes + g128_groups * 3;
  if (k % 128 == 0) {
    const int copies = copies_for(g128_stride, l2_bytes);
    DeviceMemory w(g128_stride * copies);
    for (int c = 0; c < copies; ++c) {
      uint8_t* base = static_cast<uint8_t*>(w.ptr) + g128_stride * c;
      fill_halves(reinterpret_cast<__half*>(base), static_cast<int64_t>(g128_quant_bytes / 2), 1.0f, 23 + c,
                  stream);
      fill_halves(reinterpret_cast<__half*>(base + g128_quant_bytes), static_cast<int64_t>(g128_groups),
                  0.01f, 29 + c, stream);
      check(cudaMemsetAsync(base + g128_quant_bytes + g128_groups * 2, 8, g128_groups, stream), "zeros");
    }
    check(cudaGetLastError(), "fill group-128 weights");
    // Every group-128 kernel has the same signature; each is timed on the rotating weight copies.
    const auto time_g128 = [&](Int4GroupsLauncher kernel, int64_t m, const char* what) {
      return time_us(stream, iterations, repetitions, [&](int i) {
        const uint8_t* base =
            static_cast<const uint8_t*>(w.ptr) + g128_stride * static_cast<size_t>(i % copies);
        const auto* scales = reinterpret_cast<const __half*>(base + g128_quant_bytes);
        const uint8_t* zeros = base + g128_quant_bytes + g128_groups * 2;
        const Status st =
            kernel(base, scales, zeros, 128, n, k, xh, m, static_cast<float*>(y.ptr), stream, false);
        if (st != Status::ok) throw BenchFailure(std::string(what) + " failed: " + failure_reason(st));
      });
    };
    for (size_t mi = 0; mi < ms.size(); ++mi) {
      const int64_t m = ms[mi];
      g128[mi] = m <= kW4A16GemvMaxM ? time_g128(w4a16_gemv_int4_groups, m, "W4A16 group-128 kernel")
                                     : time_g128(w4a16_gemm_int4_groups, m, "W4A16 group-128 kernel");
      // The tensor-core GEMV on the same weights (up to 16 rows), and the mma GEMM (past 32).
      if (m <= kW4A16GemvMmaMaxM)
        g128_tc[mi] = time_g128(w4a16_gemv_int4_groups_mma, m, "W4A16 tensor-core GEMV");
      if (m > kW4A16GemvMaxM) g128_mma[mi] = time_g128(w4a16_gemm_int4_groups_mma, m, "W4A16 mma kernel");
      if (m == 1) g128_staged[mi] = time_g128(w4a16_gemv_int4_groups_staged, m, "W4A16 staged GEMV");
      // The half2 GEMV refuses rows longer than the device's shared memory holds: '-' then.
      const auto* first = static_cast<const uint8_t*>(w.ptr);
      if (m == 1 &&
          w4a16_gemv_int4_groups_half2(first, reinterpret_cast<const __half*>(first + g128_quant_bytes),
                                       first + g128_quant_bytes + g128_groups * 2, 128, n, k, xh, m,
                                       static_cast<float*>(y.ptr), stream) != Status::invalid_argument)
        g128_half2[mi] = time_g128(w4a16_gemv_int4_groups_half2, m, "W4A16 half2 GEMV");
      if (m == 1 && g128_half2[mi] > 0) {  // the sweep over the half2 GEMV's shapes
        for (const Half2GemvVariant& v : kHalf2GemvVariants) {
          const std::string what = "W4A16 half2 GEMV (" + half2_gemv_variant_name(v) + ")";
          g128_half2_variants[mi].push_back(time_us(stream, iterations, repetitions, [&](int i) {
            const uint8_t* base =
                static_cast<const uint8_t*>(w.ptr) + g128_stride * static_cast<size_t>(i % copies);
            const Status st = w4a16_gemv_int4_groups_half2_variant(
                v, base, reinterpret_cast<const __half*>(base + g128_quant_bytes),
                base + g128_quant_bytes + g128_groups * 2, 128, n, k, xh, m, static_cast<float*>(y.ptr),
                stream);
            if (st != Status::ok) throw BenchFailure(what + " failed: " + failure_reason(st));
          }));
        }
      }
      if (m <= kW4A8GemvMaxM) g128_w4a8[mi] = time_g128(w4a8_gemv_int4_groups, m, "W4A8 dp4a GEMV");
      if (m <= kW4A16GemvMma32RowsMaxM)
        g128_tc32[mi] = time_g128(w4a16_gemv_int4_groups_mma_32rows, m, "W4A16 tensor-core GEMV, 32 rows");
      g128_tc64[mi] = time_g128(w4a16_gemm_int4_groups_mma_64rows, m, "W4A16 tensor-core GEMM, 64 rows");
      if (m <= kW4A16GemvMmaMaxM) {
        g128_tc_loads[mi] =
            time_g128(launch_probe<GemvMmaProbe::loads_only>, m, "W4A16 tensor-core GEMV, loads only");
        g128_tc_compute[mi] =
            time_g128(launch_probe<GemvMmaProbe::compute_only>, m, "W4A16 tensor-core GEMV, compute only");
      }
    }
    // Dequantized to fp16 in chunks for cuBLAS, with the model's scratch size (from 17 rows).
    const int64_t scratch_halves = std::min<int64_t>(n * k, (int64_t{64} << 20) / 2);
    DeviceMemory scratch(static_cast<size_t>(scratch_halves) * sizeof(__half));
    const Int4CublasContext context{cublas, static_cast<__half*>(scratch.ptr), scratch_halves};
    for (size_t mi = 0; mi < ms.size(); ++mi) {
      const int64_t m = ms[mi];
      if (m < 17) continue;
      g128_deq[mi] = time_us(stream, iterations, repetitions, [&](int i) {
        const uint8_t* base =
            static_cast<const uint8_t*>(w.ptr) + g128_stride * static_cast<size_t>(i % copies);
        const Status st = w4a16_int4_groups_dequant_cublas(
            context, base, reinterpret_cast<const __half*>(base + g128_quant_bytes),
            base + g128_quant_bytes + g128_groups * 2, 128, n, k, xh, m, static_cast<float*>(y.ptr), stream);
        if (st != Status::ok)
          throw BenchFailure(std::string("dequant + cuBLAS failed: ") + failure_reason(st));
      });
    }
    // CUTLASS's Hopper GEMM on its own reordered copy of each row-major copy (at every m: where it
    // overtakes the other kernels is what the table is for).
    if (w4a16_cutlass_supported() && int4_cutlass_shape_ok(n, k, 128)) {
      const size_t copy_bytes = int4_cutlass_bytes(n, k, 128);
      DeviceMemory cutlass_copies(copy_bytes * copies);
      std::vector<Int4CutlassWeights> cutlass_weights(static_cast<size_t>(copies));
      for (int c = 0; c < copies; ++c) {
        const uint8_t* base = static_cast<const uint8_t*>(w.ptr) + g128_stride * c;
        const Status st =
            int4_cutlass_from_groups(base, reinterpret_cast<const uint16_t*>(base + g128_quant_bytes),
                                     base + g128_quant_bytes + g128_groups * 2, n, k, 128,
                                     static_cast<uint8_t*>(cutlass_copies.ptr) + copy_bytes * c,
                                     &cutlass_weights[static_cast<size_t>(c)], stream);
        if (st != Status::ok)
          throw BenchFailure(std::string("int4_cutlass_from_groups failed: ") + failure_reason(st));
      }
      for (size_t mi = 0; mi < ms.size(); ++mi) {
        const int64_t m = ms[mi];
        const auto time_cutlass = [&](CutlassSchedule schedule) {
          return time_us(stream, iterations, repetitions, [&](int i) {
            const Status st = w4a16_gemm_int4_cutlass(xh, cutlass_weights[static_cast<size_t>(i % copies)], m,
                                                      static_cast<float*>(y.ptr), stream, schedule);
            if (st != Status::ok)
              throw BenchFailure(std::string("CUTLASS INT4 GEMM failed: ") + failure_reason(st));
          });
        };
        // Only the problems CUTLASS says it can run ('-' otherwise).
        const auto implementable = [&](CutlassSchedule schedule) {
          return w4a16_gemm_int4_cutlass_implementable(n, k, 128, m, schedule);
        };
        if (implementable(CutlassSchedule::cooperative_128))
          g128_cutlass[mi] = time_cutlass(CutlassSchedule::cooperative_128);
        if (implementable(CutlassSchedule::pingpong_64))
          g128_cutlass_pp[mi] = time_cutlass(CutlassSchedule::pingpong_64);
        if (m <= 32 && implementable(CutlassSchedule::pingpong_64x16))
          g128_cutlass16[mi] = time_cutlass(CutlassSchedule::pingpong_64x16);
      }
    }
    // The same weights repacked into tiles (one tiled copy per row-major copy, made on the device).
    const auto tiles_bytes = static_cast<size_t>(int4_tiles_bytes(n, k, 128));
    DeviceMemory tiles(tiles_bytes * copies);
    for (int c = 0; c < copies; ++c) {
      const uint8_t* base = static_cast<const uint8_t*>(w.ptr) + g128_stride * c;
      const Status st =
          int4_tiles_from_groups(base, reinterpret_cast<const uint16_t*>(base + g128_quant_bytes),
                                 base + g128_quant_bytes + g128_groups * 2, n, k, 128,
                                 static_cast<uint8_t*>(tiles.ptr) + tiles_bytes * c, stream);
      if (st != Status::ok)
        throw BenchFailure(std::string("int4_tiles_from_groups failed: ") + failure_reason(st));
    }
    const auto time_tiles = [&](Int4Kernel kernel, int64_t m, const char* what) {
      return time_us(stream, iterations, repetitions, [&](int i) {
        const uint8_t* t =
            static_cast<const uint8_t*>(tiles.ptr) + tiles_bytes * static_cast<size_t>(i % copies);
        const Status st = launch_int4_kernel(kernel, &context, t, nullptr, nullptr, 128, n, k, xh, m,
                                             static_cast<float*>(y.ptr), stream, false, Int4Layout::tiles);
        if (st != Status::ok) throw BenchFailure(std::string(what) + " failed: " + failure_reason(st));
      });
    };
    for (size_t mi = 0; mi < ms.size(); ++mi) {
      const int64_t m = ms[mi];
      if (m <= kW4A16GemvMmaMaxM) {
        const std::pair<Int4Kernel, const char*> shapes[] = {
            {Int4Kernel::gemv_tensor_cores, "256 thr"},
            {Int4Kernel::gemv_tensor_cores_512, "512 thr"},
            {Int4Kernel::gemv_tensor_cores_2bps, "2 blk/SM"}};
        for (const auto& [kernel, shape] : shapes) {
          const double us = time_tiles(kernel, m, "W4A16 tensor-core GEMV on tiles");
          if (tiles_tc[mi] == 0.0 || us < tiles_tc[mi]) {
            tiles_tc[mi] = us;
            tiles_tc_shape[mi] = shape;
          }
        }
        tiles_loads[mi] = time_us(stream, iterations, repetitions, [&](int i) {
          const uint8_t* t =
              static_cast<const uint8_t*>(tiles.ptr) + tiles_bytes * static_cast<size_t>(i % copies);
          const Status st =
              w4a16_gemv_int4_groups_mma_probe(GemvMmaProbe::tiles_loads_only, t, nullptr, nullptr, 128, n, k,
                                               xh, m, static_cast<float*>(y.ptr), stream);
          if (st != Status::ok)
            throw BenchFailure(std::string("tiled loads-only probe failed: ") + failure_reason(st));
        });
      }
      if (m <= kW4A16GemvMma32RowsMaxM)
        tiles_tc32[mi] =
            time_tiles(Int4Kernel::gemv_tensor_cores_32rows, m, "W4A16 tensor-core GEMV 32 rows on tiles");
      tiles_tc64[mi] =
          time_tiles(Int4Kernel::gemm_tensor_cores_64rows, m, "W4A16 tensor-core GEMM 64 rows on tiles");
      if (m >= 17) tiles_deq[mi] = time_tiles(Int4Kernel::dequant_cublas, m, "dequant + cuBLAS on tiles");
    }
  }
  const size_t q4k_bytes = static_cast<size_t>(n * (k / kQK_K)) * sizeof(BlockQ4_K);
  if (k % kQK_K == 0) {
    const int copies = copies_for(q4k_bytes, l2_bytes);
    DeviceMemory w(q4k_bytes * copies);
    // Random halves: every d and dmin an ordinary small number, the rest random bits.
    fill_halves(static_cast<__half*>(w.ptr), static_cast<int64_t>(q4k_bytes / 2) * copies, 0.01f, 31, stream);
    check(cudaGetLastError(), "fill Q4_K weights");
    for (size_t mi = 0; mi < ms.size(); ++mi) {
      const int64_t m = ms[mi];
      q4k[mi] = time_us(stream, iterations, repetitions, [&](int i) {
        const uint8_t* wi = static_cast<const uint8_t*>(w.ptr) + q4k_bytes * static_cast<size_t>(i % copies);
        const Status st = m <= kW4A16GemvMaxM
                              ? w4a16_gemv_q4_k(wi, n, k, xh, m, static_cast<float*>(y.ptr), stream)
                              : w4a16_gemm_q4_k(wi, n, k, xh, m, static_cast<float*>(y.ptr), stream);
        if (st != Status::ok)
          throw BenchFailure(std::string("W4A16 Q4_K kernel failed: ") + failure_reason(st));
      });
      if (m == 1 && w4a16_gemv_q4_k_half2(static_cast<const uint8_t*>(w.ptr), n, k, xh, m,
                                          static_cast<float*>(y.ptr), stream) != Status::invalid_argument) {
        q4k_half2[mi] = time_us(stream, iterations, repetitions, [&](int i) {
          const uint8_t* wi =
              static_cast<const uint8_t*>(w.ptr) + q4k_bytes * static_cast<size_t>(i % copies);
          const Status st = w4a16_gemv_q4_k_half2(wi, n, k, xh, m, static_cast<float*>(y.ptr), stream);
          if (st != Status::ok)
            throw BenchFailure(std::string("W4A16 Q4_K half2 GEMV failed: ") + failure_reason(st));
        });
      }
      if (m <= kW4A8GemvMaxM) {
        q4k_w4a8[mi] = time_us(stream, iterations, repetitions, [&](int i) {
          const uint8_t* wi =
              static_cast<const uint8_t*>(w.ptr) + q4k_bytes * static_cast<size_t>(i % copies);
          const Status st = w4a8_gemv_q4_k(wi, n, k, xh, m, static_cast<float*>(y.ptr), stream);
          if (st != Status::ok)
            throw BenchFailure(std::string("W4A8 Q4_K GEMV failed: ") + failure_reason(st));
        });
      }
      q4k_tc[mi] = time_us(stream, iterations, repetitions, [&](int i) {
        const uint8_t* wi = static_cast<const uint8_t*>(w.ptr) + q4k_bytes * static_cast<size_t>(i % copies);
        const Status st =
            w4a16_q4_k_tensor_cores(wi, /*tiles=*/false, n, k, xh, m, static_cast<float*>(y.ptr), stream);
        if (st != Status::ok)
          throw BenchFailure(std::string("W4A16 Q4_K tensor-core kernel failed: ") + failure_reason(st));
      });
    }
    // The same blocks in Q4_K chunks (kernels/int4_tiles.hpp), on the same three kernels.
    const auto tiles_bytes = static_cast<size_t>(q4_k_tiles_bytes(n, k));
    DeviceMemory tiles(tiles_bytes * copies);
    for (int c = 0; c < copies; ++c) {
      const Status st = q4_k_tiles_from_blocks(static_cast<const uint8_t*>(w.ptr) + q4k_bytes * c, n, k,
                                               static_cast<uint8_t*>(tiles.ptr) + tiles_bytes * c, stream);
      if (st != Status::ok)
        throw BenchFailure(std::string("q4_k_tiles_from_blocks failed: ") + failure_reason(st));
    }
    for (size_t mi = 0; mi < ms.size(); ++mi) {
      const int64_t m = ms[mi];
      q4k_tiles_tc[mi] = time_us(stream, iterations, repetitions, [&](int i) {
        const uint8_t* t =
            static_cast<const uint8_t*>(tiles.ptr) + tiles_bytes * static_cast<size_t>(i % copies);
        const Status st =
            w4a16_q4_k_tensor_cores(t, /*tiles=*/true, n, k, xh, m, static_cast<float*>(y.ptr), stream);
        if (st != Status::ok)
          throw BenchFailure(std::string("W4A16 Q4_K tensor-core kernel on tiles failed: ") +
                             failure_reason(st));
      });
    }
  }
  // GGUF Q6_K in planes (kernels/q6_k_planes.hpp): the CUDA-core GEMV and, for one row, the half2 one.
  // Random small halves throughout (timing only: the values do not change the work).
  const auto q6k_bytes = static_cast<size_t>(q6_k_planes_layout(n, k).bytes);
  if (k % kQK_K == 0) {
    const size_t stride = (q6k_bytes + 255) / 256 * 256;  // each copy 16-byte aligned
    const int copies = copies_for(stride, l2_bytes);
    DeviceMemory w(stride * copies);
    fill_halves(static_cast<__half*>(w.ptr), static_cast<int64_t>(stride / 2) * copies, 0.01f, 37, stream);
    const auto copy = [&](int i) {
      return static_cast<const uint8_t*>(w.ptr) + stride * static_cast<size_t>(i % copies);
    };
    for (size_t mi = 0; mi < ms.size(); ++mi) {
      const int64_t m = ms[mi];
      if (m > kW4A16GemvMaxM) continue;
      q6k[mi] = time_us(stream, iterations, repetitions, [&](int i) {
        const Status st = w4a16_gemv_q6_k(copy(i), n, k, xh, m, static_cast<float*>(y.ptr), stream);
        if (st != Status::ok)
          throw BenchFailure(std::string("W6A16 Q6_K GEMV failed: ") + failure_reason(st));
      });
      if (m == 1 && w4a16_gemv_q6_k_half2(copy(0), n, k, xh, m, static_cast<float*>(y.ptr), stream) !=
                        Status::invalid_argument) {
        q6k_half2[mi] = time_us(stream, iterations, repetitions, [&](int i) {
          const Status st = w4a16_gemv_q6_k_half2(copy(i), n, k, xh, m, static_cast<float*>(y.ptr), stream);
          if (st != Status::ok)
            throw BenchFailure(std::string("W6A16 Q6_K half2 GEMV failed: ") + failure_reason(st));
        });
      }
    }
  }
  // The other GGUF types as stored (w4a16_gemv_gguf_blocks), m <= 32, the read-only ones included. Random
  // small halves throughout: a d that leads its block an ordinary number, the rest random bits (the values
  // do not change the work).
  std::vector<std::vector<MatmulBenchRow::GgufBlocksTiming>> gguf_blocks(ms.size());
  for (const DType type : kW4A16GgufBlockTypes) {
    if (k % type_info(type).block_elems != 0) continue;
    const auto bytes = static_cast<size_t>(row_bytes(type, k) * n);
    const size_t stride = (bytes + 255) / 256 * 256;  // each copy 256-byte aligned, as cudaMalloc's
    const int copies = copies_for(stride, l2_bytes);
    DeviceMemory w(stride * copies);
    fill_halves(static_cast<__half*>(w.ptr), static_cast<int64_t>(stride / 2) * copies, 0.01f, 41, stream);
    check(cudaGetLastError(), "fill GGUF blocks");
    for (size_t mi = 0; mi < ms.size(); ++mi) {
      const int64_t m = ms[mi];
      if (m > kW4A16GemvMaxM) continue;
      const double us = time_us(stream, iterations, repetitions, [&](int i) {
        const uint8_t* wi = static_cast<const uint8_t*>(w.ptr) + stride * static_cast<size_t>(i % copies);
        const Status st = w4a16_gemv_gguf_blocks(type, wi, n, k, xh, m, static_cast<float*>(y.ptr), stream);
        if (st != Status::ok)
          throw BenchFailure(std::string("W4A16 ") + type_name(type) + " GEMV failed: " + failure_reason(st));
      });
      gguf_blocks[mi].push_back({type, us, static_cast<double>(bytes) + 2.0 * m * k + 4.0 * m * n});
    }
  }
  {
    DeviceMemory w(f16_bytes * f16_copies);
    fill_halves(static_cast<__half*>(w.ptr), n * k * f16_copies, 0.02f, 13, stream);
    check(cudaGetLastError(), "fill fp16 weights");
    const float alpha = 1.0f, beta = 0.0f;
    for (size_t mi = 0; mi < ms.size(); ++mi) {
      const int64_t m = ms[mi];
      theirs[mi] = time_us(stream, iterations, repetitions, [&](int i) {
        const auto* wi = static_cast<const __half*>(w.ptr) + static_cast<size_t>(n * k) * (i % f16_copies);
        // Row-major W [n, k] is column-major k x n: y^T [n, m] = W [n, k] . x^T [k, m], fp16 out.
        check(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                           static_cast<int>(k), &alpha, wi, CUDA_R_16F, static_cast<int>(k), xh, CUDA_R_16F,
                           static_cast<int>(k), &beta, y.ptr, CUDA_R_16F, static_cast<int>(n),
                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              "cublasGemmEx");
      });
    }
  }
  for (size_t mi = 0; mi < ms.size(); ++mi) {
    MatmulBenchRow row;
    row.shape = shape;
    row.m = ms[mi];
    row.ours_us = ours[mi];
    row.ours_kernel = ms[mi] <= kW4A16GemvMaxM ? "gemv" : "gemm";
    row.split_us = split[mi];
    row.g128_us = g128[mi];
    row.g128_mma_us = g128_mma[mi];
    row.g128_tc_us = g128_tc[mi];
    row.g128_staged_us = g128_staged[mi];
    row.g128_half2_us = g128_half2[mi];
    row.g128_half2_variant_us = g128_half2_variants[mi];
    row.g128_w4a8_us = g128_w4a8[mi];
    row.g128_tc32_us = g128_tc32[mi];
    row.g128_tc64_us = g128_tc64[mi];
    row.g128_tc_loads_us = g128_tc_loads[mi];
    row.g128_tc_compute_us = g128_tc_compute[mi];
    row.g128_deq_us = g128_deq[mi];
    row.g128_cutlass_us = g128_cutlass[mi];
    row.g128_cutlass_pp_us = g128_cutlass_pp[mi];
    row.g128_cutlass16_us = g128_cutlass16[mi];
    row.g128_tiles_tc_us = tiles_tc[mi];
    row.g128_tiles_tc_shape = tiles_tc_shape[mi];
    row.g128_tiles_tc32_us = tiles_tc32[mi];
    row.g128_tiles_tc64_us = tiles_tc64[mi];
    row.g128_tiles_deq_us = tiles_deq[mi];
    row.g128_tiles_loads_us = tiles_loads[mi];
    row.q4k_us = q4k[mi];
    row.q4k_tc_us = q4k_tc[mi];
    row.q4k_half2_us = q4k_half2[mi];
    row.q4k_w4a8_us = q4k_w4a8[mi];
    row.q4k_tiles_tc_us = q4k_tiles_tc[mi];
    row.q6k_us = q6k[mi];
    row.q6k_half2_us = q6k_half2[mi];
    row.gguf_blocks = gguf_blocks[mi];
    row.q6k_bytes = static_cast<double>(q6k_bytes) + 2.0 * ms[mi] * k + 4.0 * ms[mi] * n;
    row.g128_bytes = static_cast<double>(g128_bytes) + 2.0 * ms[mi] * k + 4.0 * ms[mi] * n;
    row.q4k_bytes = static_cast<double>(q4k_bytes) + 2.0 * ms[mi] * k + 4.0 * ms[mi] * n;
    row.cublas_us = theirs[mi];
    row.ours_bytes = static_cast<double>(q4_bytes) + 2.0 * ms[mi] * k + 4.0 * ms[mi] * n;
    row.cublas_bytes = static_cast<double>(f16_bytes) + 2.0 * ms[mi] * k + 2.0 * ms[mi] * n;
    result.rows.push_back(row);
  }
}

}  // namespace

Status measure_copy_bandwidth(double& gbps, std::string& error) {
  cudaStream_t stream = nullptr;
  try {
    check(cudaStreamCreate(&stream), "cudaStreamCreate");
    gbps = measure_copy_gbps(stream);
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  } catch (const BenchFailure& e) {
    error = e.what();
    if (stream != nullptr) cudaStreamDestroy(stream);
    return Status::device_error;
  }
  cudaStreamDestroy(stream);
  return Status::ok;
}

Status run_matmul_bench(const std::vector<MatmulShape>& shapes, const std::vector<int64_t>& ms,
                        int iterations, int repetitions, MatmulBenchResult& result, std::string& error,
                        const std::function<void(const MatmulBenchRow&)>& measured) {
  if (ms.empty() || iterations < 1 || repetitions < 1) return Status::invalid_argument;
  for (int64_t m : ms)
    if (m < 1) return Status::invalid_argument;
  for (const MatmulShape& s : shapes)
    if (s.k <= 0 || s.n_out <= 0 || s.k % kQK4_0 != 0) return Status::invalid_argument;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  skipped_columns = &result.skipped;
  struct ResetSkipped {
    ~ResetSkipped() { skipped_columns = nullptr; }
  } reset_skipped;
  try {
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    char name[320];
    std::snprintf(name, sizeof name, "%s, %.1f GiB, %d SMs, L2 %d MiB", prop.name,
                  static_cast<double>(prop.totalGlobalMem) / (1 << 30), prop.multiProcessorCount,
                  prop.l2CacheSize >> 20);
    result.device = name;
    check(cudaStreamCreate(&stream), "cudaStreamCreate");
    check(cublasCreate(&cublas), "cublasCreate");
    check(cublasSetStream(cublas, stream), "cublasSetStream");
    result.copy_gbps = measure_copy_gbps(stream);
    for (const MatmulShape& s : shapes) {
      const size_t before = result.rows.size();
      bench_shape(s, ms, iterations, repetitions, prop.l2CacheSize, stream, cublas, result);
      if (measured)
        for (size_t i = before; i < result.rows.size(); ++i) measured(result.rows[i]);
    }
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  } catch (const BenchFailure& e) {
    error = e.what();
    if (cublas != nullptr) cublasDestroy(cublas);
    if (stream != nullptr) cudaStreamDestroy(stream);
    return Status::device_error;
  }
  cublasDestroy(cublas);
  cudaStreamDestroy(stream);
  return Status::ok;
}

}  // namespace nibble::kernels::cuda
