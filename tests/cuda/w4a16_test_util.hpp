#pragma once
// Helpers shared by the W4A16 kernel tests (GEMV and GEMM): random quantized weights with their
// exact dequantization, and the comparison of a kernel's output with a double-precision reference.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/w4a16_gemm_cutlass.cuh"
#include "kernels/int4_groups.hpp"
#include "kernels/q6_k_planes.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"
#include "kernels/read_only_quants.hpp"
#include "tests/cuda/cuda_test_util.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::cuda_test {

namespace k = nibble::kernels;

// Runs launch(x, m, y) (device pointers; x: [m, k] fp16, y: [m, n_out] float) on random activations
// and compares y with a double-precision product of x and wf: [n_out, k], the weights the kernel
// should see, dequantized on the CPU.
//
// The error is measured relative to sum|x * w| (not |y|, which can cancel towards 0) against `bound`;
// each test says why its bound holds.
template <typename Launch>
void expect_matches_reference(const std::vector<float>& wf, int64_t n_out, int64_t kk, int64_t m,
                              double bound, std::mt19937& rng, Launch launch) {
  SCOPED_TRACE("n_out=" + std::to_string(n_out) + " k=" + std::to_string(kk) + " m=" + std::to_string(m));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<k::f16_bits> xh(static_cast<size_t>(m * kk));
  std::vector<float> xf(xh.size());
  for (size_t i = 0; i < xh.size(); ++i) {
    xh[i] = k::fp32_to_fp16(normal(rng));
    xf[i] = k::fp16_to_fp32(xh[i]);
  }
  DeviceBuffer<k::f16_bits> dx(xh.size());
  DeviceBuffer<float> dy(static_cast<size_t>(m * n_out));
  ASSERT_NE(dx.ptr, nullptr);
  ASSERT_NE(dy.ptr, nullptr);
  ASSERT_EQ(cudaMemcpy(dx.ptr, xh.data(), xh.size() * sizeof(k::f16_bits), cudaMemcpyHostToDevice),
            cudaSuccess);
  ASSERT_EQ(cudaMemset(dy.ptr, 0xff, static_cast<size_t>(m * n_out) * sizeof(float)), cudaSuccess);  // NaNs
  ASSERT_EQ(launch(reinterpret_cast<const __half*>(dx.ptr), m, dy.ptr), k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> y(static_cast<size_t>(m * n_out));
  ASSERT_EQ(cudaMemcpy(y.data(), dy.ptr, y.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  int bad = 0;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t o = 0; o < n_out; ++o) {
      double ref = 0.0;
      double mag = 0.0;
      for (int64_t i = 0; i < kk; ++i) {
        const double p = static_cast<double>(xf[r * kk + i]) * wf[o * kk + i];
        ref += p;
        mag += std::fabs(p);
      }
      const double got = y[r * n_out + o];
      const double rel = std::fabs(got - ref) / (mag > 0.0 ? mag : 1.0);
      if (!(rel < bound) && ++bad <= 5) {
        ADD_FAILURE() << "y[" << r << ", " << o << "] = " << got << ", reference " << ref
                      << ", relative error " << rel;
      }
    }
  }
  ASSERT_EQ(bad, 0);
}

// n_out rows of k random weights quantized by the project's quantizer to `type` (wq), and the same
// rows dequantized back (wf): the reference uses exactly the values the kernel sees. The types Nibble
// reads but does not write (kernels/read_only_quants.hpp) are random valid blocks
// (test::random_quant_blocks).
inline void random_quantized(k::DType type, int64_t n_out, int64_t kk, std::mt19937& rng,
                             std::vector<uint8_t>& wq, std::vector<float>& wf) {
  if (k::is_read_only_type(type)) {
    wq = test::random_quant_blocks(type, n_out, kk, rng());
    wf.assign(static_cast<size_t>(n_out * kk), 0.0f);
    ASSERT_EQ(k::dequantize_row(type, wq.data(), wf.data(), n_out * kk), k::Status::ok);
    return;
  }
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t row_bytes = k::row_bytes(type, kk);
  wq.assign(static_cast<size_t>(n_out * row_bytes), 0);
  wf.assign(static_cast<size_t>(n_out * kk), 0.0f);
  std::vector<float> row(static_cast<size_t>(kk));
  for (int64_t o = 0; o < n_out; ++o) {
    for (auto& v : row) v = normal(rng) * 0.05f;
    ASSERT_EQ(k::quantize_row(type, row.data(), wq.data() + o * row_bytes, kk), k::Status::ok);
    ASSERT_EQ(k::dequantize_row(type, wq.data() + o * row_bytes, wf.data() + o * kk, kk), k::Status::ok);
  }
}

// GGUF rows of `type` as the GPU kernels take them: Q6_K repacked into planes (kernels/q6_k_planes.hpp,
// as the model uploads it), every other type as stored.
inline std::vector<uint8_t> as_uploaded(k::DType type, int64_t n_out, int64_t kk,
                                        const std::vector<uint8_t>& wq) {
  if (type != k::DType::Q6_K) return wq;
  std::vector<uint8_t> planes(static_cast<size_t>(k::q6_k_planes_layout(n_out, kk).bytes));
  EXPECT_EQ(k::q6_k_planes_from_blocks(wq.data(), n_out, kk, planes.data()), k::Status::ok);
  return planes;
}

// Q8_0 blocks holding asymmetric group-wise INT4, as model/hf_quantized.hpp loads GPTQ / AWQ: per
// group of `group` inputs one random fp16 scale and zero z in 0..15, every value a level 0..15 minus z.
inline std::vector<k::BlockQ8_0> asymmetric_int4_blocks(int64_t n_out, int64_t kk, int64_t group,
                                                        std::mt19937& rng) {
  std::uniform_int_distribution<int> level(0, 15), zero(0, 15);
  std::uniform_real_distribution<float> scale(0.001f, 0.02f);
  std::vector<k::BlockQ8_0> blocks(static_cast<size_t>(n_out * kk / 32));
  for (int64_t g = 0; g < n_out * kk / group; ++g) {
    const k::f16_bits d = k::fp32_to_fp16(scale(rng));
    const int z = zero(rng);
    for (int64_t b = 0; b < group / 32; ++b) {
      k::BlockQ8_0& blk = blocks[static_cast<size_t>(g * group / 32 + b)];
      blk.d = d;
      for (auto& q : blk.qs) q = static_cast<int8_t>(level(rng) - z);
    }
  }
  return blocks;
}

// asymmetric_int4_blocks converted to group-wise INT4 (kernels/int4_groups.hpp) and uploaded, as the
// model uploads GPTQ / AWQ weights; wf: [n_out, kk] their exact dequantization.
struct DeviceInt4Groups {
  std::vector<float> wf;
  std::unique_ptr<DeviceBuffer<uint8_t>> quants, zeros;  // [n_out, kk / 2], [n_out, kk / group]
  std::unique_ptr<DeviceBuffer<uint16_t>> scales;        // [n_out, kk / group] fp16
  const __half* scales_half() const { return reinterpret_cast<const __half*>(scales->ptr); }
};
// The same from given Q8_0 blocks of "level minus zero" (each group exactly INT4 at `group`).
inline void make_device_int4_groups_from_blocks(const std::vector<k::BlockQ8_0>& blocks, int64_t n_out,
                                                int64_t kk, int64_t group, DeviceInt4Groups& out) {
  out.wf.resize(static_cast<size_t>(n_out * kk));
  ASSERT_EQ(k::dequantize_row(k::DType::Q8_0, blocks.data(), out.wf.data(), n_out * kk), k::Status::ok);
  ASSERT_EQ(k::int4_group_size(k::DType::Q8_0, blocks.data(), n_out, kk), group);
  std::vector<uint8_t> quants(static_cast<size_t>(n_out * kk / 2)),
      zeros(static_cast<size_t>(n_out * kk / group));
  std::vector<uint16_t> scales(zeros.size());
  ASSERT_EQ(k::int4_groups_from_blocks(k::DType::Q8_0, blocks.data(), n_out, kk, group, quants.data(),
                                       scales.data(), zeros.data()),
            k::Status::ok);
  out.quants = std::make_unique<DeviceBuffer<uint8_t>>(quants);
  out.zeros = std::make_unique<DeviceBuffer<uint8_t>>(zeros);
  out.scales = std::make_unique<DeviceBuffer<uint16_t>>(scales);
  ASSERT_TRUE(out.quants->ptr && out.zeros->ptr && out.scales->ptr);
}
inline void make_device_int4_groups(int64_t n_out, int64_t kk, int64_t group, std::mt19937& rng,
                                    DeviceInt4Groups& out) {
  make_device_int4_groups_from_blocks(asymmetric_int4_blocks(n_out, kk, group, rng), n_out, kk, group, out);
}

// A DeviceInt4Groups matrix's copy in CUTLASS's order (kernels/cuda/w4a16_gemm_cutlass.cuh), made on
// the device; the shape must be one int4_cutlass_shape_ok takes.
struct CutlassCopy {
  std::unique_ptr<DeviceBuffer<uint8_t>> bytes;
  kernels::cuda::Int4CutlassWeights weights;
};
inline void make_cutlass_copy(const DeviceInt4Groups& w, int64_t n_out, int64_t kk, int64_t group,
                              CutlassCopy& out) {
  const size_t bytes = kernels::cuda::int4_cutlass_bytes(n_out, kk, group);
  ASSERT_GT(bytes, size_t{0});
  out.bytes = std::make_unique<DeviceBuffer<uint8_t>>(bytes);
  ASSERT_NE(out.bytes->ptr, nullptr);
  ASSERT_EQ(kernels::cuda::int4_cutlass_from_groups(w.quants->ptr, w.scales->ptr, w.zeros->ptr, n_out, kk,
                                                    group, out.bytes->ptr, &out.weights, nullptr),
            k::Status::ok);
}

}  // namespace nibble::cuda_test
