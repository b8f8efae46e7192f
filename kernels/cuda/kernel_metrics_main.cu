// nibble-kernel-metrics: hardware counters of the decode GEMVs, one launch each (kernel_metrics.cuh),
// for the question the timings leave open: what holds a W4A16 GEMV at a third of the copy bandwidth
// (device memory, issue slots, latency with too few warps, barriers, shared-memory conflicts). Each
// INT4 kernel on group-128 weights in each layout it reads, the tensor-core GEMV's loads-only probe,
// the W4A8 GEMV and fp16 cuBLAS (the memory-bound peer), on shapes larger than the L2 (so replayed
// passes stream from device memory too).
//
//   nibble-kernel-metrics [--shapes 8192x28672,28672x8192] [--rows 1,16]   (shapes: k x n_out)
//
// Prints a summary line per launch (time, DRAM throughput, issue activity, warps a scheduler, the
// three largest stall reasons in warps per issued instruction), then every metric of every launch.
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/int4_tiles.cuh"
#include "kernels/cuda/kernel_metrics.cuh"
#include "kernels/cuda/random_weights.cuh"
#include "kernels/cuda/w4a16_gemm_cutlass.cuh"
#include "kernels/cuda/w4a16_gemv_mma.cuh"
#include "kernels/cuda/w4a16_tuning.cuh"
#include "kernels/cuda/w4a8_gemv.cuh"
#include "kernels/int4_tiles.hpp"

namespace {

namespace kc = nibble::kernels::cuda;
using nibble::kernels::Status;

constexpr int64_t kGroup = 128;

struct Buffer {
  void* ptr = nullptr;
  explicit Buffer(size_t bytes) {
    if (cudaMalloc(&ptr, std::max<size_t>(bytes, 16)) != cudaSuccess) ptr = nullptr;
  }
  ~Buffer() { cudaFree(ptr); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

// The non-empty pieces of text between separators.
std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at <= text.size()) {
    const size_t end = std::min(text.find(sep, at), text.size());
    if (end > at) out.push_back(text.substr(at, end - at));
    at = end + 1;
  }
  return out;
}
std::vector<int64_t> parse_list(const std::string& text, char sep) {
  std::vector<int64_t> out;
  for (const std::string& piece : split(text, sep)) out.push_back(std::strtoll(piece.c_str(), nullptr, 10));
  return out;
}

struct Launch {
  std::string label;
  std::function<Status()> run;
};

// One launch's line; names: the metrics profiled (range.values' order).
void print_summary(const std::string& label, const std::vector<std::string>& names,
                   const kc::KernelMetricsRange& range) {
  const auto value = [&](const char* name) {  // 0 for a metric left out
    const size_t i = static_cast<size_t>(std::find(names.begin(), names.end(), name) - names.begin());
    return i < range.values.size() ? range.values[i] : 0.0;
  };
  const double ns = value("gpu__time_duration.sum");
  const double gbps = ns > 0 ? value("dram__bytes_read.sum") / ns : 0.0;  // bytes per ns = GB/s
  // The three largest stall reasons.
  const std::string prefix = "smsp__average_warps_issue_stalled_", suffix = "_per_issue_active.ratio";
  std::vector<std::pair<double, std::string>> stalls;
  for (size_t i = 0; i < names.size() && i < range.values.size(); ++i) {
    if (names[i].rfind(prefix, 0) != 0) continue;
    stalls.push_back(
        {range.values[i], names[i].substr(prefix.size(), names[i].size() - prefix.size() - suffix.size())});
  }
  std::sort(stalls.begin(), stalls.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::printf("%-44s %9.1f %6.1f %7.0f %6.1f %6.2f %6.1f %6.1f %10.0f  ", label.c_str(), ns / 1000.0,
              value("dram__throughput.avg.pct_of_peak_sustained_elapsed"), gbps,
              value("smsp__issue_active.avg.pct_of_peak_sustained_active"),
              value("smsp__warps_active.avg.per_cycle_active"), value("lts__t_sector_hit_rate.pct"),
              value("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"),
              value("l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"));
  for (size_t i = 0; i < 3 && i < stalls.size(); ++i)
    std::printf(" %s %.2f", stalls[i].second.c_str(), stalls[i].first);
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  // Line-buffered: run.sh tees this under a time limit, and a kill must not take the last lines.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::string shapes_text = "8192x28672,28672x8192", rows_text = "1,16";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--shapes" || arg == "--rows") && i + 1 < argc) {
      (arg == "--shapes" ? shapes_text : rows_text) = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--shapes KxN,...] [--rows M,...]\n", argv[0]);
      return 2;
    }
  }
  const std::vector<int64_t> rows = parse_list(rows_text, ',');
  int64_t max_m = 0;
  for (const int64_t m : rows) {
    if (m < 1 || m > 16) {
      std::fprintf(stderr, "--rows: 1 to 16 rows (the decode GEMVs)\n");
      return 2;
    }
    max_m = std::max(max_m, m);
  }
  int device = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    std::fprintf(stderr, "nibble-kernel-metrics: no CUDA device\n");
    return 1;
  }
  std::string chip, error;
  if (kc::kernel_metrics_chip(device, chip, error) != Status::ok) {
    std::fprintf(stderr, "nibble-kernel-metrics: %s\n", error.c_str());
    return 1;
  }
  std::vector<std::string> unknown;
  if (kc::unknown_kernel_metrics(chip, kc::kernel_metric_names(), unknown, error) != Status::ok) {
    std::fprintf(stderr, "nibble-kernel-metrics: %s\n", error.c_str());
    return 1;
  }
  std::vector<std::string> metrics;
  for (const std::string& m : kc::kernel_metric_names())
    if (std::find(unknown.begin(), unknown.end(), m) == unknown.end()) metrics.push_back(m);
  for (const std::string& m : unknown)
    std::printf("metric unknown to %s, left out: %s\n", chip.c_str(), m.c_str());
  std::printf("device: %s (%s), %d SMs, L2 %d MiB\n", prop.name, chip.c_str(), prop.multiProcessorCount,
              prop.l2CacheSize >> 20);

  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  if (cudaStreamCreate(&stream) != cudaSuccess || cublasCreate(&cublas) != CUBLAS_STATUS_SUCCESS ||
      cublasSetStream(cublas, stream) != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "nibble-kernel-metrics: stream or cuBLAS handle\n");
    return 1;
  }
  int status = 0;
  std::vector<std::pair<std::string, kc::KernelMetricsRange>> all;
  for (const std::string& shape : split(shapes_text, ',')) {
    const std::vector<int64_t> kn = parse_list(shape, 'x');
    if (kn.size() != 2 || kn[0] < kGroup || kn[0] % 256 != 0 || kn[1] < 1) {
      std::fprintf(stderr, "nibble-kernel-metrics: bad shape %s (k x n_out, k a multiple of 256)\n",
                   shape.c_str());
      return 2;
    }
    const int64_t k = kn[0], n = kn[1], groups = n * (k / kGroup);
    Buffer quants(static_cast<size_t>(n * k / 2)), scales(static_cast<size_t>(groups) * 2),
        zeros(static_cast<size_t>(groups)), x(static_cast<size_t>(max_m * k) * 2),
        y(static_cast<size_t>(max_m * n) * 4), f16(static_cast<size_t>(n * k) * 2),
        tiles(static_cast<size_t>(nibble::kernels::int4_tiles_bytes(n, k, kGroup)));
    if (!quants.ptr || !scales.ptr || !zeros.ptr || !x.ptr || !y.ptr || !f16.ptr || !tiles.ptr) {
      std::fprintf(stderr, "nibble-kernel-metrics: out of device memory for %s\n", shape.c_str());
      return 1;
    }
    // Random operands (their values do not matter here, only that they are not all zeros).
    if (kc::fill_random_bytes(quants.as<uint8_t>(), n * k / 2, 0xFF, 1, stream) != Status::ok ||
        kc::fill_random_bytes(zeros.as<uint8_t>(), groups, 0x0F, 2, stream) != Status::ok ||
        kc::fill_random_halves(scales.as<__half>(), groups, 0.01f, 3, stream) != Status::ok ||
        kc::fill_random_halves(x.as<__half>(), max_m * k, 1.0f, 4, stream) != Status::ok ||
        kc::fill_random_halves(f16.as<__half>(), n * k, 0.05f, 5, stream) != Status::ok) {
      std::fprintf(stderr, "nibble-kernel-metrics: filling the operands failed\n");
      return 1;
    }
    const auto* q = quants.as<uint8_t>();
    const auto* s = scales.as<__half>();
    const auto* z = zeros.as<uint8_t>();
    if (kc::int4_tiles_from_groups(q, scales.as<uint16_t>(), z, n, k, kGroup, tiles.as<uint8_t>(), stream) !=
        Status::ok) {
      std::fprintf(stderr, "nibble-kernel-metrics: int4_tiles_from_groups failed\n");
      return 1;
    }
    std::unique_ptr<Buffer> cutlass_copy;
    kc::Int4CutlassWeights cutlass;
    if (kc::w4a16_cutlass_supported() && kc::int4_cutlass_shape_ok(n, k, kGroup)) {
      cutlass_copy = std::make_unique<Buffer>(kc::int4_cutlass_bytes(n, k, kGroup));
      if (cutlass_copy->ptr == nullptr ||
          kc::int4_cutlass_from_groups(q, scales.as<uint16_t>(), z, n, k, kGroup, cutlass_copy->as<uint8_t>(),
                                       &cutlass, stream) != Status::ok)
        cutlass_copy.reset();
    }
    if (cudaStreamSynchronize(stream) != cudaSuccess) {
      std::fprintf(stderr, "nibble-kernel-metrics: filling the operands failed\n");
      return 1;
    }
    for (const int64_t m : rows) {
      const __half* xh = x.as<__half>();
      auto* yf = y.as<float>();
      std::vector<Launch> launches;
      const auto int4 = [&](kc::Int4Kernel kernel, kc::Int4Layout layout, const char* what) {
        if (m > kc::int4_kernel_max_rows(kernel) || !kc::int4_kernel_reads(kernel, layout)) return;
        if (kc::is_cutlass(kernel) && cutlass_copy == nullptr) return;
        const uint8_t* w = layout == kc::Int4Layout::tiles ? tiles.as<uint8_t>() : q;
        launches.push_back({what, [=, &cutlass] {
                              return kc::launch_int4_kernel(kernel, nullptr, w, s, z, kGroup, n, k, xh, m, yf,
                                                            stream, false, layout, &cutlass);
                            }});
      };
      using K = kc::Int4Kernel;
      using L = kc::Int4Layout;
      int4(K::gemv_cuda_cores, L::rows, "CUDA-core GEMV");
      if (m == 1) int4(K::gemv_cuda_cores_staged, L::rows, "staged GEMV");
      if (m == 1) int4(K::gemv_half2, L::rows, "half2 GEMV");
      int4(K::gemv_tensor_cores, L::rows, "TC GEMV");
      int4(K::gemv_tensor_cores_512, L::rows, "TC GEMV 512 threads");
      int4(K::gemv_tensor_cores_2bps, L::rows, "TC GEMV 2 blocks/SM");
      launches.push_back({"TC GEMV loads only", [=] {
                            return kc::w4a16_gemv_int4_groups_mma_probe(kc::GemvMmaProbe::loads_only, q, s, z,
                                                                        kGroup, n, k, xh, m, yf, stream);
                          }});
      launches.push_back({"TC GEMV compute only", [=] {
                            return kc::w4a16_gemv_int4_groups_mma_probe(kc::GemvMmaProbe::compute_only, q, s,
                                                                        z, kGroup, n, k, xh, m, yf, stream);
                          }});
      int4(K::gemv_tensor_cores, L::tiles, "TC GEMV on tiles");
      int4(K::gemv_tensor_cores_512, L::tiles, "TC GEMV 512 threads on tiles");
      int4(K::gemv_tensor_cores_2bps, L::tiles, "TC GEMV 2 blocks/SM on tiles");
      const uint8_t* t = tiles.as<uint8_t>();
      launches.push_back({"TC GEMV loads only on tiles", [=] {
                            return kc::w4a16_gemv_int4_groups_mma_probe(kc::GemvMmaProbe::tiles_loads_only, t,
                                                                        nullptr, nullptr, kGroup, n, k, xh, m,
                                                                        yf, stream);
                          }});
      int4(K::cutlass_gemm_16rows, L::cutlass, "CUTLASS 64x16");
      if (m <= kc::kW4A8GemvMaxM) {
        launches.push_back({"W4A8 GEMV (8-bit activations)", [=] {
                              return kc::w4a8_gemv_int4_groups(q, s, z, kGroup, n, k, xh, m, yf, stream);
                            }});
      }
      const __half* wf = f16.as<__half>();
      launches.push_back(
          {"fp16 cuBLAS", [=] {
             const float one = 1.0f, zero = 0.0f;
             return cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                                 static_cast<int>(k), &one, wf, CUDA_R_16F, static_cast<int>(k), xh,
                                 CUDA_R_16F, static_cast<int>(k), &zero, yf, CUDA_R_32F, static_cast<int>(n),
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS
                        ? Status::ok
                        : Status::device_error;
           }});

      std::printf("\n%lld x %lld (k x n_out), %lld rows, group %lld: %.1f MB of INT4 weights\n",
                  static_cast<long long>(k), static_cast<long long>(n), static_cast<long long>(m),
                  static_cast<long long>(kGroup), static_cast<double>(n * k / 2 + groups * 3) / 1e6);
      std::printf("%-44s %9s %6s %7s %6s %6s %6s %6s %10s   %s\n", "launch (kernel)", "us", "DRAM%", "GB/s",
                  "issue%", "warps", "L2hit%", "tensor%", "smem-cnfl", "top stalls (warps per issue)");
      for (const Launch& launch : launches) {
        // A warm-up launch first (module load, shared-memory attributes), outside the profiler.
        if (launch.run() != Status::ok || cudaStreamSynchronize(stream) != cudaSuccess) {
          std::printf("%-44s failed to launch: %s\n", launch.label.c_str(),
                      cudaGetErrorString(cudaGetLastError()));
          status = 1;
          continue;
        }
        std::vector<kc::KernelMetricsRange> ranges;
        const Status st = kc::profile_kernel_metrics(
            metrics, 8, [&] { return launch.run() == Status::ok; }, ranges, error);
        if (st != Status::ok) {
          std::printf("%-44s profiling failed: %s\n", launch.label.c_str(), error.c_str());
          status = 1;
          if (error.find("privilege") != std::string::npos || error.find("PRIVILEGE") != std::string::npos)
            return 1;  // no counters on this machine: the rest would fail the same way
          continue;
        }
        for (size_t ri = 0; ri < ranges.size(); ++ri) {  // a launch's kernels, in launch order
          const std::string label = launch.label + (ranges.size() > 1 ? " #" + std::to_string(ri) : "");
          print_summary(label, metrics, ranges[ri]);
          all.push_back(
              {std::to_string(k) + "x" + std::to_string(n) + " m=" + std::to_string(m) + " " + label,
               ranges[ri]});
        }
      }
    }
  }
  std::printf("\nEvery metric of every launch:\n");
  for (const auto& [label, range] : all) {
    std::printf("%s\n", label.c_str());
    for (size_t i = 0; i < metrics.size() && i < range.values.size(); ++i)
      std::printf("  %-76s %.4g\n", metrics[i].c_str(), range.values[i]);
  }
  cublasDestroy(cublas);
  cudaStreamDestroy(stream);
  return status;
}
