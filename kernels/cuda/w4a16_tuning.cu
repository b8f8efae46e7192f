#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "kernels/cuda/event_timer.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/w4a16_dequant_cublas.cuh"
#include "kernels/cuda/w4a16_gemm.cuh"
#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/cuda/w4a16_gemv_half2.cuh"
#include "kernels/cuda/w4a16_gemv_mma.cuh"
#include "kernels/cuda/w4a16_tuning.cuh"
#include "kernels/cuda/w4a8_gemv.cuh"

namespace nibble::kernels::cuda {

bool is_cutlass(Int4Kernel kernel) {
  return kernel == Int4Kernel::cutlass_gemm || kernel == Int4Kernel::cutlass_gemm_pingpong ||
         kernel == Int4Kernel::cutlass_gemm_16rows;
}

const char* int4_kernel_name(Int4Kernel kernel) {
  switch (kernel) {
    case Int4Kernel::gemv_cuda_cores:
      return "CUDA-core GEMV";
    case Int4Kernel::gemv_tensor_cores:
      return "tensor-core GEMV";
    case Int4Kernel::gemm_wmma:
      return "WMMA GEMM";
    case Int4Kernel::gemm_mma:
      return "mma GEMM";
    case Int4Kernel::dequant_cublas:
      return "dequant + cuBLAS";
    case Int4Kernel::gemv_tensor_cores_512:
      return "TC GEMV 512 thr";
    case Int4Kernel::gemv_tensor_cores_2bps:
      return "TC GEMV 2 blk/SM";
    case Int4Kernel::gemv_cuda_cores_staged:
      return "staged GEMV";
    case Int4Kernel::gemv_tensor_cores_32rows:
      return "TC GEMV 32 rows";
    case Int4Kernel::gemm_tensor_cores_64rows:
      return "TC GEMM 64 rows";
    case Int4Kernel::cutlass_gemm:
      return "CUTLASS GEMM";
    case Int4Kernel::cutlass_gemm_pingpong:
      return "CUTLASS GEMM 64";
    case Int4Kernel::cutlass_gemm_16rows:
      return "CUTLASS 64x16";
    case Int4Kernel::w4a8_gemv:
      return "W4A8 GEMV";
    case Int4Kernel::gemv_half2:
      return "half2 GEMV";
  }
  return "?";
}

int64_t int4_kernel_min_rows(Int4Kernel kernel) {
  return kernel == Int4Kernel::dequant_cublas || kernel == Int4Kernel::cutlass_gemm ||
                 kernel == Int4Kernel::cutlass_gemm_pingpong
             ? 17
             : 1;
}

int64_t int4_kernel_max_rows(Int4Kernel kernel) {
  switch (kernel) {
    case Int4Kernel::gemv_cuda_cores:
      return kW4A16GemvMaxM;
    case Int4Kernel::gemv_cuda_cores_staged:
    case Int4Kernel::gemv_half2:
      return 1;
    case Int4Kernel::gemv_tensor_cores:
    case Int4Kernel::gemv_tensor_cores_512:
    case Int4Kernel::gemv_tensor_cores_2bps:
      return kW4A16GemvMmaMaxM;
    case Int4Kernel::gemv_tensor_cores_32rows:
      return kW4A16GemvMma32RowsMaxM;
    case Int4Kernel::cutlass_gemm_16rows:
      return 32;
    case Int4Kernel::w4a8_gemv:
      return kW4A8GemvMaxM;
    default:
      return INT64_MAX;
  }
}

Int4GroupsLauncher int4_kernel_launcher(Int4Kernel kernel) {
  switch (kernel) {
    case Int4Kernel::gemv_cuda_cores:
      return w4a16_gemv_int4_groups;
    case Int4Kernel::gemv_tensor_cores:
      return w4a16_gemv_int4_groups_mma;
    case Int4Kernel::gemm_wmma:
      return w4a16_gemm_int4_groups;
    case Int4Kernel::gemm_mma:
      return w4a16_gemm_int4_groups_mma;
    case Int4Kernel::dequant_cublas:
    case Int4Kernel::cutlass_gemm:
    case Int4Kernel::cutlass_gemm_pingpong:
    case Int4Kernel::cutlass_gemm_16rows:
      return nullptr;
    case Int4Kernel::gemv_tensor_cores_512:
      return w4a16_gemv_int4_groups_mma_512;
    case Int4Kernel::gemv_tensor_cores_2bps:
      return w4a16_gemv_int4_groups_mma_2bps;
    case Int4Kernel::gemv_cuda_cores_staged:
      return w4a16_gemv_int4_groups_staged;
    case Int4Kernel::gemv_tensor_cores_32rows:
      return w4a16_gemv_int4_groups_mma_32rows;
    case Int4Kernel::gemm_tensor_cores_64rows:
      return w4a16_gemm_int4_groups_mma_64rows;
    case Int4Kernel::w4a8_gemv:
      return w4a8_gemv_int4_groups;
    case Int4Kernel::gemv_half2:
      return w4a16_gemv_int4_groups_half2;
  }
  return nullptr;
}

const char* int4_layout_name(Int4Layout layout) {
  switch (layout) {
    case Int4Layout::rows:
      return "rows";
    case Int4Layout::tiles:
      return "tiles";
    case Int4Layout::cutlass:
      return "cutlass";
  }
  return "?";
}

bool int4_kernel_reads(Int4Kernel kernel, Int4Layout layout) {
  if (is_cutlass(kernel)) return true;
  switch (layout) {
    case Int4Layout::rows:
      return true;
    case Int4Layout::tiles:
      return kernel == Int4Kernel::dequant_cublas || int4_tiles_kernel_launcher(kernel) != nullptr;
    case Int4Layout::cutlass:
      return false;
  }
  return false;
}

namespace {

// The tiled kernels' signature differs (no scales or zeros); these adapt them to Int4GroupsLauncher's.
template <Status (*Tiled)(const uint8_t*, int64_t, int64_t, int64_t, const __half*, int64_t, float*,
                          cudaStream_t, bool)>
Status on_tiles(const uint8_t* tiles, const __half*, const uint8_t*, int64_t group, int64_t n_out, int64_t k,
                const __half* x, int64_t m, float* y, cudaStream_t stream, bool programmatic) {
  return Tiled(tiles, group, n_out, k, x, m, y, stream, programmatic);
}

}  // namespace

Int4GroupsLauncher int4_tiles_kernel_launcher(Int4Kernel kernel) {
  switch (kernel) {
    case Int4Kernel::gemv_tensor_cores:
      return on_tiles<w4a16_gemv_int4_tiles_mma>;
    case Int4Kernel::gemv_tensor_cores_512:
      return on_tiles<w4a16_gemv_int4_tiles_mma_512>;
    case Int4Kernel::gemv_tensor_cores_2bps:
      return on_tiles<w4a16_gemv_int4_tiles_mma_2bps>;
    case Int4Kernel::gemv_tensor_cores_32rows:
      return on_tiles<w4a16_gemv_int4_tiles_mma_32rows>;
    case Int4Kernel::gemm_tensor_cores_64rows:
      return on_tiles<w4a16_gemm_int4_tiles_mma_64rows>;
    default:
      return nullptr;
  }
}

Status launch_int4_kernel(Int4Kernel kernel, const Int4CublasContext* cublas, const uint8_t* quants,
                          const __half* scales, const uint8_t* zeros, int64_t group, int64_t n_out, int64_t k,
                          const __half* x, int64_t m, float* y, cudaStream_t stream, bool programmatic,
                          Int4Layout layout, const Int4CutlassWeights* cutlass, int half2_variant) {
  if (is_cutlass(kernel)) {
    if (cutlass == nullptr || cutlass->n_out != n_out || cutlass->k != k || cutlass->group != group)
      return Status::invalid_argument;
    const CutlassSchedule schedule = kernel == Int4Kernel::cutlass_gemm ? CutlassSchedule::cooperative_128
                                     : kernel == Int4Kernel::cutlass_gemm_pingpong
                                         ? CutlassSchedule::pingpong_64
                                         : CutlassSchedule::pingpong_64x16;
    return w4a16_gemm_int4_cutlass(x, *cutlass, m, y, stream, schedule);
  }
  if (layout == Int4Layout::cutlass) return Status::invalid_argument;  // only the CUTLASS GEMMs read it
  if (kernel == Int4Kernel::dequant_cublas) {
    if (cublas == nullptr) return Status::invalid_argument;
    if (layout == Int4Layout::tiles)
      return w4a16_int4_tiles_dequant_cublas(*cublas, quants, group, n_out, k, x, m, y, stream);
    return w4a16_int4_groups_dequant_cublas(*cublas, quants, scales, zeros, group, n_out, k, x, m, y, stream);
  }
  if (kernel == Int4Kernel::gemv_half2 && half2_variant != 0) {
    if (half2_variant < 0 || half2_variant >= kHalf2GemvVariantCount || layout != Int4Layout::rows)
      return Status::invalid_argument;
    return w4a16_gemv_int4_groups_half2_shape(half2_variant, quants, scales, zeros, group, n_out, k, x, m, y,
                                              stream, programmatic);
  }
  const Int4GroupsLauncher launcher =
      layout == Int4Layout::tiles ? int4_tiles_kernel_launcher(kernel) : int4_kernel_launcher(kernel);
  if (launcher == nullptr) return Status::invalid_argument;
  return launcher(quants, scales, zeros, group, n_out, k, x, m, y, stream, programmatic);
}

void choose_int4_groups_kernels(Int4GroupsTuning& t, Int4Layout layout) {
  for (int r = 0; r < kInt4RowRanges; ++r) {
    const bool two = kInt4RangeTimedRows[r][1] > 0;
    const auto mean_us = [&](int kernel) {  // 0: not timed at every count
      const double* us = t.us[r][kernel];
      if (!(us[0] > 0.0) || (two && !(us[1] > 0.0))) return 0.0;
      return two ? std::sqrt(us[0] * us[1]) : us[0];
    };
    int best = -1;
    for (int kernel = 0; kernel < kInt4Kernels; ++kernel) {
      const auto which = static_cast<Int4Kernel>(kernel);
      if (!int4_kernel_reads(which, layout) || !is_w4a16(which)) continue;
      const double mean = mean_us(kernel);
      if (mean > 0.0 && (best < 0 || mean < mean_us(best))) best = kernel;
    }
    const int fallback = static_cast<int>(int4_default_kernels(layout)[r]);
    const double fallback_us = mean_us(fallback);
    if (best < 0 || (fallback_us > 0.0 && mean_us(best) > (1.0 - kInt4MinGain) * fallback_us))
      best = fallback;
    t.chosen[r] = static_cast<Int4Kernel>(best);
  }
}

namespace {

struct Scratch {
  void* ptr = nullptr;
  ~Scratch() { cudaFree(ptr); }
};

constexpr int64_t kMaxTimedRows = 256;

}  // namespace

Status tune_int4_groups(const std::vector<Int4GroupsMatrix>& matrices, int64_t group, int64_t n_out,
                        int64_t k, const Int4CublasContext* cublas, cudaStream_t stream,
                        Int4GroupsTuning& out, std::string& error, Int4Layout layout,
                        const std::vector<Int4CutlassWeights>* cutlass, int ranges) {
  out = Int4GroupsTuning{};
  std::copy(int4_default_kernels(layout), int4_default_kernels(layout) + kInt4RowRanges, out.chosen);
  if (matrices.empty() || n_out < 1 || k < 1 || (group != 32 && group != 64 && group != 128) ||
      k % group != 0 || ranges < 1 || ranges > kInt4RowRanges)
    return Status::invalid_argument;
  if (cutlass != nullptr && cutlass->size() != matrices.size()) return Status::invalid_argument;
  if (layout == Int4Layout::cutlass && cutlass == nullptr) return Status::invalid_argument;
  Scratch x, y;
  const auto fail = [&](cudaError_t err, const char* what) {
    error = std::string(what) + ": " + cudaGetErrorString(err);
    return Status::device_error;
  };
  cudaError_t err = cudaMalloc(&x.ptr, static_cast<size_t>(kMaxTimedRows * k) * sizeof(__half));
  if (err == cudaSuccess)
    err = cudaMalloc(&y.ptr, static_cast<size_t>(kMaxTimedRows * n_out) * sizeof(float));
  if (err != cudaSuccess) return fail(err, "cudaMalloc (tuning activations)");
  // Every half 0x2C2C (about 0.06): ordinary finite inputs; the kernels' time does not depend on them.
  err = cudaMemsetAsync(x.ptr, 0x2C, static_cast<size_t>(kMaxTimedRows * k) * sizeof(__half), stream);
  if (err != cudaSuccess) return fail(err, "cudaMemsetAsync (tuning activations)");

  // Enough products per loop to visit every matrix (up to 32), so that L2 holds few of them.
  const int iterations = static_cast<int>(std::clamp<size_t>(matrices.size(), 8, 32));
  const auto time = [&](Int4Kernel which, int64_t m, double& us, int half2_variant = 0) -> Status {
    Status launch = Status::ok;
    cudaError_t event_err = cudaSuccess;
    const bool timed = median_call_us(
        stream, iterations, /*repetitions=*/3,
        [&](int i) {
          const size_t index = static_cast<size_t>(i) % matrices.size();
          const Int4GroupsMatrix& w = matrices[index];
          launch = launch_int4_kernel(
              which, cublas, w.quants, w.scales, w.zeros, group, n_out, k, static_cast<const __half*>(x.ptr),
              m, static_cast<float*>(y.ptr), stream,
              /*programmatic=*/false, layout, cutlass ? &(*cutlass)[index] : nullptr, half2_variant);
          return launch == Status::ok;
        },
        us, event_err);
    if (timed) return Status::ok;
    us = 0.0;
    if (event_err != cudaSuccess) return fail(event_err, "timing W4A16 kernels");
    // A launch that failed: a sticky error (the context is lost) ends the tuning; otherwise this
    // candidate is out.
    const cudaError_t sticky = cudaStreamSynchronize(stream);
    if (sticky != cudaSuccess) return fail(sticky, int4_kernel_name(which));
    if (!out.skipped.empty()) out.skipped += "; ";
    out.skipped +=
        std::string(int4_kernel_name(which)) +
        (half2_variant != 0 ? " " + half2_gemv_variant_name(kHalf2GemvVariants[half2_variant]) : "") + " (" +
        std::to_string(m) + " rows): " + status_name(launch) +
        (launch == Status::device_error && !last_launch_error_text().empty()
             ? " (" + last_launch_error_text() + ")"
             : "");
    return Status::ok;
  };
  for (int r = 0; r < ranges; ++r) {
    for (int kernel = 0; kernel < kInt4Kernels; ++kernel) {
      const auto which = static_cast<Int4Kernel>(kernel);
      for (int c = 0; c < 2; ++c) {
        const int64_t m = kInt4RangeTimedRows[r][c];
        if (m == 0 || m > int4_kernel_max_rows(which) || m < int4_kernel_min_rows(which) ||
            !int4_kernel_reads(which, layout) || !is_w4a16(which))
          continue;
        if (which == Int4Kernel::dequant_cublas && cublas == nullptr) continue;
        if (is_cutlass(which) && cutlass == nullptr) continue;
        const Status st = time(which, m, out.us[r][kernel][c]);
        if (st != Status::ok) return st;
      }
    }
  }
  // The half2 GEMV's other shapes (built for group 128 only) at one row: the fastest one runs.
  double& half2_us = out.us[0][static_cast<int>(Int4Kernel::gemv_half2)][0];
  if (layout == Int4Layout::rows && group == 128 && half2_us > 0.0 && half2_gemv_shapes_enabled()) {
    out.half2_variant_us[0] = half2_us;
    double fastest = half2_us;
    for (int v = 1; v < kHalf2GemvVariantCount; ++v) {
      const Status st = time(Int4Kernel::gemv_half2, 1, out.half2_variant_us[v], v);
      if (st != Status::ok) return st;
      if (out.half2_variant_us[v] > 0.0 && out.half2_variant_us[v] < fastest) {
        fastest = out.half2_variant_us[v];
        out.half2_variant = v;
      }
    }
    // The least of nine noisy times is biased low: the kept shape is timed once more for the choice
    // among kernels, which keeps its default unless another is kInt4MinGain faster (so that noise does
    // not move a model to the half2 GEMV's bits on one load and not the next). Timed again no faster
    // than the default shape (or refused this time), the default it is.
    if (out.half2_variant != 0) {
      double again = 0.0;
      const Status st = time(Int4Kernel::gemv_half2, 1, again, out.half2_variant);
      if (st != Status::ok) return st;
      out.half2_variant = half2_shape_after_retime(out.half2_variant, again, out.half2_variant_us[0]);
      if (out.half2_variant != 0) half2_us = again;  // (else the default's time stays)
    }
  }
  err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return fail(err, "tuning W4A16 kernels");
  choose_int4_groups_kernels(out, layout);
  return Status::ok;
}

int half2_shape_after_retime(int fastest, double again_us, double default_us) {
  return fastest != 0 && again_us > 0.0 && (default_us <= 0.0 || again_us < default_us) ? fastest : 0;
}

}  // namespace nibble::kernels::cuda
