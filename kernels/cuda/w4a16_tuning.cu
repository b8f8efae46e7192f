#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "kernels/cuda/event_timer.cuh"
#include "kernels/cuda/w4a16_gemm.cuh"
#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/cuda/w4a16_gemv_mma.cuh"
#include "kernels/cuda/w4a16_tuning.cuh"

namespace nibble::kernels::cuda {

void choose_int4_groups_kernels(Int4GroupsTuning& t) {
  const double* cc = t.gemv_cuda_cores_us;
  const double* tc = t.gemv_tensor_cores_us;
  t.decode_tensor_cores = cc[0] > 0.0 && cc[1] > 0.0 && tc[0] > 0.0 && tc[1] > 0.0 &&
                          std::sqrt((tc[0] / cc[0]) * (tc[1] / cc[1])) < 1.0;
  t.prefill_mma = t.gemm_mma_us > 0.0 && (t.gemm_wmma_us <= 0.0 || t.gemm_mma_us < t.gemm_wmma_us);
}

namespace {

using Int4GroupsKernel = Status (*)(const uint8_t*, const __half*, const uint8_t*, int64_t, int64_t, int64_t,
                                    const __half*, int64_t, float*, cudaStream_t, bool);

struct Scratch {
  void* ptr = nullptr;
  ~Scratch() { cudaFree(ptr); }
};

}  // namespace

Status tune_int4_groups(const std::vector<Int4GroupsMatrix>& matrices, int64_t group, int64_t n_out,
                        int64_t k, cudaStream_t stream, Int4GroupsTuning& out, std::string& error) {
  out = Int4GroupsTuning{};
  if (matrices.empty() || n_out < 1 || k < 1 || (group != 32 && group != 64 && group != 128) ||
      k % group != 0)
    return Status::invalid_argument;
  Scratch x, y;
  const auto fail = [&](cudaError_t err, const char* what) {
    error = std::string(what) + ": " + cudaGetErrorString(err);
    return Status::device_error;
  };
  cudaError_t err = cudaMalloc(&x.ptr, static_cast<size_t>(kTunePrefillRows * k) * sizeof(__half));
  if (err == cudaSuccess)
    err = cudaMalloc(&y.ptr, static_cast<size_t>(kTunePrefillRows * n_out) * sizeof(float));
  if (err != cudaSuccess) return fail(err, "cudaMalloc (tuning activations)");
  // Every half 0x2C2C (about 0.06): ordinary finite inputs; the kernels' time does not depend on them.
  err = cudaMemsetAsync(x.ptr, 0x2C, static_cast<size_t>(kTunePrefillRows * k) * sizeof(__half), stream);
  if (err != cudaSuccess) return fail(err, "cudaMemsetAsync (tuning activations)");

  // Enough products per loop to visit every matrix (up to 32), so that L2 holds few of them.
  const int iterations = static_cast<int>(std::clamp<size_t>(matrices.size(), 8, 32));
  const auto time = [&](Int4GroupsKernel kernel, int64_t m, const char* name, double& us) -> Status {
    Status launch = Status::ok;
    cudaError_t event_err = cudaSuccess;
    const bool timed = median_call_us(
        stream, iterations, /*repetitions=*/3,
        [&](int i) {
          const Int4GroupsMatrix& w = matrices[static_cast<size_t>(i) % matrices.size()];
          launch = kernel(w.quants, w.scales, w.zeros, group, n_out, k, static_cast<const __half*>(x.ptr), m,
                          static_cast<float*>(y.ptr), stream, /*programmatic=*/false);
          return launch == Status::ok;
        },
        us, event_err);
    if (timed) return Status::ok;
    us = 0.0;
    if (event_err != cudaSuccess) return fail(event_err, "timing W4A16 kernels");
    // A launch that failed: a sticky error (the context is lost) ends the tuning; otherwise this
    // candidate is out.
    const cudaError_t sticky = cudaStreamSynchronize(stream);
    if (sticky != cudaSuccess) return fail(sticky, name);
    if (!out.skipped.empty()) out.skipped += "; ";
    out.skipped += std::string(name) + " (" + std::to_string(m) + " rows): " + status_name(launch);
    return Status::ok;
  };
  Status st = Status::ok;
  for (int r = 0; r < 2 && st == Status::ok; ++r) {
    st = time(w4a16_gemv_int4_groups, kTuneDecodeRows[r], "CUDA-core GEMV", out.gemv_cuda_cores_us[r]);
    if (st == Status::ok)
      st = time(w4a16_gemv_int4_groups_mma, kTuneDecodeRows[r], "tensor-core GEMV",
                out.gemv_tensor_cores_us[r]);
  }
  if (st == Status::ok) st = time(w4a16_gemm_int4_groups, kTunePrefillRows, "WMMA GEMM", out.gemm_wmma_us);
  if (st == Status::ok) st = time(w4a16_gemm_int4_groups_mma, kTunePrefillRows, "mma GEMM", out.gemm_mma_us);
  if (st != Status::ok) return st;
  err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return fail(err, "tuning W4A16 kernels");
  choose_int4_groups_kernels(out);
  return Status::ok;
}

}  // namespace nibble::kernels::cuda
