// Programmatic dependent launches (kernels/cuda/dependent_launch.cuh): every W4A16 kernel launched
// that way right after the kernel that writes its input (add_rms_norm_f32, as in the forward pass)
// must read that kernel's output, not what the buffer held before, and give the bits of a plain
// launch. The input buffer is filled with NaNs before each norm, so a product that read too early
// would come out NaN (the W4A8 GEMVs round a NaN activation to 0: there only the equality with the
// plain launch catches it). Likewise the kernels between the products (the norm after a product that writes
// its delta, SwiGLU after the gate / up product) read the product's output when launched that way.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/residual_norm.cuh"
#include "kernels/cuda/rope_kv_write.cuh"
#include "kernels/cuda/swiglu.cuh"
#include "kernels/cuda/w4a16_gemm.cuh"
#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/cuda/w4a16_gemv_mma.cuh"
#include "kernels/cuda/w4a16_tuning.cuh"
#include "kernels/cuda/w4a8_gemv.cuh"
#include "tests/cuda/cuda_test_util.hpp"
#include "tests/cuda/w4a16_test_util.hpp"

namespace {

namespace kc = nibble::kernels::cuda;
namespace ct = nibble::cuda_test;
using nibble::kernels::Status;
using k_f16 = nibble::kernels::f16_bits;

struct Case {
  const char* name;
  kc::Int4GroupsLauncher kernel;
  int64_t m;
};

// A launcher's status keeps the CUDA error behind a device_error for the caller's message (the runtime's
// own is cleared, so that the next launcher does not report it), and forgets it on the next success.
// Host only; where the runtime has no driver (every call answers an error: this machine without a
// GPU) the part that needs a clean runtime is skipped.
TEST(LaunchStatus, KeepsTheErrorBehindADeviceErrorForTheCaller) {
  EXPECT_EQ(kc::launch_status(cudaErrorInvalidConfiguration), Status::device_error);
  EXPECT_EQ(kc::last_launch_error(), cudaErrorInvalidConfiguration);
  if (cudaGetLastError() != cudaSuccess && cudaGetLastError() != cudaSuccess)
    GTEST_SKIP() << "the CUDA runtime answers every call with an error here (no driver)";
  // A launch that failed while another call's error was pending: the launch's error is kept, and the
  // pending one is taken too (nothing left for the next launcher).
  EXPECT_NE(cudaMemcpy(nullptr, nullptr, 1, static_cast<cudaMemcpyKind>(99)), cudaSuccess);
  EXPECT_EQ(kc::launch_status(cudaErrorInvalidConfiguration), Status::device_error);
  EXPECT_EQ(kc::last_launch_error(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(kc::launch_status(cudaSuccess), Status::ok);
  EXPECT_EQ(kc::last_launch_error(), cudaSuccess);
  // The error of a call that failed before the launcher asks: pending in the runtime, taken from it.
  EXPECT_NE(cudaMemcpy(nullptr, nullptr, 1, static_cast<cudaMemcpyKind>(99)), cudaSuccess);
  EXPECT_EQ(kc::launch_status(), Status::device_error);
  EXPECT_NE(kc::last_launch_error(), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// A library's failure (cuBLAS's status, CUTLASS's, which clears the CUDA error itself) is named for the
// caller's message like a launch's CUDA error, with the runtime's pending error when there is one, until
// the next launcher's status replaces it. Host only, like the test above.
TEST(LaunchStatus, NamesALibrarysFailureUntilTheNextLaunch) {
  EXPECT_EQ(kc::library_failure("cuBLAS cublasGemmEx", "the GPU program failed to execute"),
            Status::device_error);
  std::string text = kc::last_launch_error_text();
  EXPECT_EQ(text.rfind("cuBLAS cublasGemmEx: the GPU program failed to execute", 0), 0u) << text;
  if (cudaGetLastError() != cudaSuccess && cudaGetLastError() != cudaSuccess)
    GTEST_SKIP() << "the CUDA runtime answers every call with an error here (no driver)";
  EXPECT_EQ(kc::library_failure("CUTLASS run", "Error Internal"), Status::device_error);
  EXPECT_EQ(kc::last_launch_error(), cudaSuccess);
  EXPECT_EQ(kc::last_launch_error_text(), "CUTLASS run: Error Internal");
  // A CUDA error pending at the library's failure is taken from the runtime and named after it.
  EXPECT_NE(cudaMemcpy(nullptr, nullptr, 1, static_cast<cudaMemcpyKind>(99)), cudaSuccess);
  EXPECT_EQ(kc::library_failure("CUTLASS initialize", "Error Internal"), Status::device_error);
  const cudaError_t pending = kc::last_launch_error();
  EXPECT_NE(pending, cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(kc::last_launch_error_text(),
            std::string("CUTLASS initialize: Error Internal; ") + cudaGetErrorString(pending));
  // A launch's own error replaces the library's words; a success forgets both.
  EXPECT_EQ(kc::launch_status(cudaErrorInvalidConfiguration), Status::device_error);
  EXPECT_EQ(kc::last_launch_error_text(), cudaGetErrorString(cudaErrorInvalidConfiguration));
  EXPECT_EQ(kc::launch_status(cudaSuccess), Status::ok);
  EXPECT_EQ(kc::last_launch_error_text(), "");
}

TEST(CudaDependentLaunch, ProductsLaunchedProgrammaticallyReadTheNormsOutput) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  const int64_t k = 8192, n_out = 3001, group = 128;
  std::mt19937 rng(11);
  ct::DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(n_out, k, group, rng, w));
  const int64_t max_m = 80;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> residual_host(static_cast<size_t>(max_m * k)), norm_weight_host(static_cast<size_t>(k));
  for (auto& v : residual_host) v = normal(rng);
  for (auto& v : norm_weight_host) v = 0.5f + 0.1f * normal(rng);
  ct::DeviceBuffer<float> residual(residual_host), norm_weight(norm_weight_host);
  ct::DeviceBuffer<uint16_t> x(static_cast<size_t>(max_m * k));
  ct::DeviceBuffer<float> y(static_cast<size_t>(max_m * n_out));
  ASSERT_TRUE(residual.ptr && norm_weight.ptr && x.ptr && y.ptr);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  auto* xh = reinterpret_cast<__half*>(x.ptr);

  // NaNs into x, the norm writes x, product(programmatic) reads it; y back on the host.
  const auto run = [&](int64_t m, bool programmatic, const std::function<Status(bool)>& product) {
    EXPECT_EQ(cudaMemsetAsync(x.ptr, 0xFF, x.count * sizeof(uint16_t), stream), cudaSuccess);
    EXPECT_EQ(cudaMemsetAsync(y.ptr, 0, y.count * sizeof(float), stream), cudaSuccess);
    EXPECT_EQ(kc::add_rms_norm_f32(residual.ptr, nullptr, norm_weight.ptr, xh, m, k, 1e-5f, stream),
              Status::ok);
    EXPECT_EQ(product(programmatic), Status::ok);
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    std::vector<float> out = y.to_host();
    out.resize(static_cast<size_t>(m * n_out));
    return out;
  };
  // A plain launch, then 20 programmatic ones, each the plain one's bits (a missing wait would be a
  // race, not a certainty).
  const auto expect_programmatic_as_plain = [&](int64_t m, const std::function<Status(bool)>& product) {
    const std::vector<float> plain = run(m, false, product);
    for (float v : plain) ASSERT_TRUE(std::isfinite(v)) << "the plain launch read NaNs";
    for (int rep = 0; rep < 20; ++rep) {
      const std::vector<float> programmatic = run(m, true, product);
      ASSERT_EQ(programmatic, plain) << "repetition " << rep;
    }
  };
  const Case cases[] = {
      {"CUDA-core GEMV", kc::w4a16_gemv_int4_groups, 1},
      {"CUDA-core GEMV", kc::w4a16_gemv_int4_groups, 7},
      {"tensor-core GEMV", kc::w4a16_gemv_int4_groups_mma, 1},
      {"tensor-core GEMV", kc::w4a16_gemv_int4_groups_mma, 16},
      {"tensor-core GEMV, 512 threads", kc::w4a16_gemv_int4_groups_mma_512, 16},
      {"tensor-core GEMV, 2 blocks an SM", kc::w4a16_gemv_int4_groups_mma_2bps, 1},
      {"WMMA GEMM", kc::w4a16_gemm_int4_groups, 48},
      {"mma GEMM", kc::w4a16_gemm_int4_groups_mma, 48},
      {"tensor-core GEMV, 32 rows", kc::w4a16_gemv_int4_groups_mma_32rows, 29},
      {"tensor-core GEMM, 64-row slabs", kc::w4a16_gemm_int4_groups_mma_64rows, 80},
      {"staged GEMV", kc::w4a16_gemv_int4_groups_staged, 1},
      {"W4A8 GEMV", kc::w4a8_gemv_int4_groups, 1},
      {"W4A8 GEMV", kc::w4a8_gemv_int4_groups, 4},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c.name) + ", m = " + std::to_string(c.m));
    expect_programmatic_as_plain(c.m, [&](bool programmatic) {
      return c.kernel(w.quants->ptr, w.scales_half(), w.zeros->ptr, group, n_out, k, xh, c.m, y.ptr, stream,
                      programmatic);
    });
  }
  // The W4A8 GEMV on GGUF Q4_K as stored (it quantizes the activations after its wait).
  std::vector<uint8_t> q4k;
  std::vector<float> q4k_f;
  ASSERT_NO_FATAL_FAILURE(ct::random_quantized(nibble::kernels::DType::Q4_K, n_out, k, rng, q4k, q4k_f));
  ct::DeviceBuffer<uint8_t> q4k_d(q4k);
  ASSERT_TRUE(q4k_d.ptr);
  for (const int64_t m : {int64_t{1}, int64_t{3}}) {
    SCOPED_TRACE("W4A8 GEMV on Q4_K, m = " + std::to_string(m));
    expect_programmatic_as_plain(m, [&](bool programmatic) {
      return kc::w4a8_gemv_q4_k(q4k_d.ptr, n_out, k, xh, m, y.ptr, stream, programmatic);
    });
  }
  cudaStreamDestroy(stream);
}

// The norm, SwiGLU and RoPE + KV write launched programmatically right after the W4A16 product that
// writes their input (NaNs in it before the product): the bits of plain launches, every time.
TEST(CudaDependentLaunch, LayerKernelsLaunchedProgrammaticallyReadTheProductsOutput) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  const int64_t k = 4096, n = 8192, group = 128;  // the product: [m, k] -> [m, n]; n = 2 n_ff for SwiGLU
  std::mt19937 rng(12);
  ct::DeviceInt4Groups w;
  ASSERT_NO_FATAL_FAILURE(ct::make_device_int4_groups(n, k, group, rng, w));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t m = 3;
  std::vector<k_f16> x_host(static_cast<size_t>(m * k));
  for (auto& v : x_host) v = nibble::kernels::fp32_to_fp16(normal(rng));
  std::vector<float> residual_host(static_cast<size_t>(m * n)), norm_weight_host(static_cast<size_t>(n));
  for (auto& v : residual_host) v = normal(rng);
  for (auto& v : norm_weight_host) v = 0.5f + 0.1f * normal(rng);
  ct::DeviceBuffer<k_f16> x(x_host);
  ct::DeviceBuffer<float> product(static_cast<size_t>(m * n)), residual(residual_host),
      norm_weight(norm_weight_host);
  ct::DeviceBuffer<uint16_t> out(static_cast<size_t>(m * n));
  ASSERT_TRUE(x.ptr && product.ptr && residual.ptr && norm_weight.ptr && out.ptr);
  // RoPE + KV write: the product's rows as one token's stacked q / k / v each (32 / 16 heads of 128: 4096
  // + 2 x 2048 = n), tokens 0..m-1 of one sequence into a cache of 4 blocks of 16.
  kc::RopeKvWriteShape rope;
  rope.tokens = m;
  rope.n_head = 32;
  rope.n_head_kv = 16;
  rope.head_dim = rope.rot_dims = 128;
  rope.rope_base = 500000.0f;
  rope.q_stride = rope.kv_stride = n;
  rope.block_size = 16;
  rope.num_blocks = 4;
  rope.max_blocks_per_seq = 2;
  const int64_t q_dim = rope.n_head * rope.head_dim, kv_dim = rope.n_head_kv * rope.head_dim;
  ASSERT_EQ(q_dim + 2 * kv_dim, n);
  std::vector<int32_t> token_pos_host(static_cast<size_t>(m));
  std::iota(token_pos_host.begin(), token_pos_host.end(), 0);
  ct::DeviceBuffer<int32_t> token_pos(token_pos_host),
      token_seq(std::vector<int32_t>(static_cast<size_t>(m), 0)), tables(std::vector<int32_t>{2, 0}),
      flag(std::vector<int32_t>{0});
  const size_t cache_count = static_cast<size_t>(rope.num_blocks * rope.block_size * kv_dim);
  ct::DeviceBuffer<uint16_t> k_cache(cache_count), v_cache(cache_count);
  ASSERT_TRUE(token_pos.ptr && token_seq.ptr && tables.ptr && flag.ptr && k_cache.ptr && v_cache.ptr);
  enum class Kernel { norm, swiglu, rope_kv_write };
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const auto* xh = reinterpret_cast<const __half*>(x.ptr);
  auto* outh = reinterpret_cast<__half*>(out.ptr);
  // NaNs into the product's output, the product (plain), then the kernel under test; its fp16 output
  // (and the residual it updates) back on the host.
  const auto run = [&](Kernel kernel, bool programmatic) {
    const bool swiglu = kernel == Kernel::swiglu;
    // NaNs in every output too: a launch that wrote nothing cannot pass for the plain one.
    for (ct::DeviceBuffer<uint16_t>* o : {&out, &k_cache, &v_cache})
      EXPECT_EQ(cudaMemsetAsync(o->ptr, 0xFF, o->count * sizeof(uint16_t), stream), cudaSuccess);
    EXPECT_EQ(cudaMemcpyAsync(residual.ptr, residual_host.data(), residual_host.size() * sizeof(float),
                              cudaMemcpyHostToDevice, stream),
              cudaSuccess);
    EXPECT_EQ(cudaMemsetAsync(product.ptr, 0xFF, product.count * sizeof(float), stream), cudaSuccess);
    EXPECT_EQ(kc::w4a16_gemv_int4_groups_mma(w.quants->ptr, w.scales_half(), w.zeros->ptr, group, n, k, xh, m,
                                             product.ptr, stream, false),
              Status::ok);
    if (kernel == Kernel::rope_kv_write) {
      EXPECT_EQ(kc::rope_kv_write(rope, product.ptr, product.ptr + q_dim, product.ptr + q_dim + kv_dim,
                                  token_pos.ptr, token_seq.ptr, tables.ptr, outh,
                                  reinterpret_cast<__half*>(k_cache.ptr),
                                  reinterpret_cast<__half*>(v_cache.ptr), flag.ptr, stream, programmatic),
                Status::ok);
      EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      EXPECT_EQ(flag.to_host(), std::vector<int32_t>{0});
      std::vector<uint16_t> bits = out.to_host();
      bits.resize(static_cast<size_t>(m * q_dim));
      // The slots written: positions 0..m-1 of block 2.
      const std::vector<uint16_t> kb = k_cache.to_host(), vb = v_cache.to_host();
      const auto first = static_cast<std::ptrdiff_t>(2 * rope.block_size * kv_dim), count = m * kv_dim;
      bits.insert(bits.end(), kb.begin() + first, kb.begin() + first + count);
      bits.insert(bits.end(), vb.begin() + first, vb.begin() + first + count);
      return bits;
    }
    if (swiglu) {
      EXPECT_EQ(
          kc::swiglu_f32_to_f16(product.ptr, product.ptr + n / 2, n, outh, m, n / 2, stream, programmatic),
          Status::ok);
    } else {
      EXPECT_EQ(kc::add_rms_norm_f32(residual.ptr, product.ptr, norm_weight.ptr, outh, m, n, 1e-5f, stream,
                                     programmatic),
                Status::ok);
    }
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    std::vector<uint16_t> bits = out.to_host();
    bits.resize(static_cast<size_t>(m * (swiglu ? n / 2 : n)));
    if (!swiglu) {
      const std::vector<float> r = residual.to_host();
      for (const float v : r) bits.push_back(static_cast<uint16_t>(std::isnan(v) ? 0x7E00 : 0));
    }
    return bits;
  };
  for (const Kernel kernel : {Kernel::norm, Kernel::swiglu, Kernel::rope_kv_write}) {
    SCOPED_TRACE(kernel == Kernel::swiglu ? "SwiGLU"
                 : kernel == Kernel::norm ? "add + RMSNorm"
                                          : "RoPE + KV write");
    const std::vector<uint16_t> plain = run(kernel, false);
    for (const uint16_t b : plain) ASSERT_NE(b & 0x7C00, 0x7C00) << "the plain launch read NaNs";
    for (int rep = 0; rep < 20; ++rep) ASSERT_EQ(run(kernel, true), plain) << "repetition " << rep;
  }
  cudaStreamDestroy(stream);
}

}  // namespace
