// The CUDA element-wise layer kernels (RMSNorm with the fused residual add, RoPE, SwiGLU, embedding
// lookup) against the project's CPU kernels on random inputs of odd sizes. Skips when there is no
// CUDA device.
//
// Error bounds: every kernel reads fp16, computes in fp32 and rounds its output to fp16 once. The
// CPU reference runs on the same fp16 inputs (widened to float), so the difference is the output
// rounding, at most 2^-11 ≈ 4.9e-4 of |ref| (half an fp16 ulp, normal range), plus fp32 rounding
// differences of order 1e-6 relative (summation order, FMA contraction, cosf/sinf/expf within
// 2 ulp), plus half the fp16 subnormal spacing (3e-8) near zero. Hence |got - ref| <= 1e-3 * |ref|
// + 1e-7, with the magnitude taken where cancellation could make |ref| itself small (RoPE: the
// norm of the rotated pair).
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/activation.hpp"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/rms_norm.cuh"
#include "kernels/cuda/rope.cuh"
#include "kernels/cuda/swiglu.cuh"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"
#include "kernels/rms_norm.hpp"
#include "kernels/rope.hpp"
#include "tests/cuda/cuda_test_util.hpp"

namespace k = nibble::kernels;
using nibble::cuda_test::DeviceBuffer;
using nibble::cuda_test::random_f16;

namespace {

std::vector<float> widen(const std::vector<uint16_t>& h) {
  std::vector<float> f(h.size());
  for (size_t i = 0; i < h.size(); ++i) f[i] = k::fp16_to_fp32(h[i]);
  return f;
}

__half* as_half(uint16_t* p) { return reinterpret_cast<__half*>(p); }

// Counts elements outside |got - ref| <= 1e-3 * mag + 1e-7, reporting the first few.
int count_bad(const std::vector<uint16_t>& got, const std::vector<float>& ref,
              const std::vector<float>& mag) {
  int bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = k::fp16_to_fp32(got[i]);
    const double err = std::fabs(g - ref[i]);
    if (!(err <= 1e-3 * mag[i] + 1e-7) && ++bad <= 5) {
      ADD_FAILURE() << "element " << i << ": got " << g << ", reference " << ref[i] << ", error " << err;
    }
  }
  return bad;
}

std::vector<float> abs_of(const std::vector<float>& v) {
  std::vector<float> a(v.size());
  for (size_t i = 0; i < v.size(); ++i) a[i] = std::fabs(v[i]);
  return a;
}

}  // namespace

TEST(CudaRmsNorm, MatchesCpuWithAndWithoutResidual) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float eps = 1e-5f;
  for (const int64_t rows : {1, 3, 37}) {
    for (const int64_t n : {1, 96, 4100}) {
      // mode 0: y separate; 1: y aliases x; 2: residual, y separate; 3: residual, y aliases residual
      for (int mode = 0; mode < 4; ++mode) {
        SCOPED_TRACE("rows=" + std::to_string(rows) + " n=" + std::to_string(n) +
                     " mode=" + std::to_string(mode));
        const bool with_residual = mode >= 2;
        const auto xh = random_f16(static_cast<size_t>(rows * n), 2.0f, rng);
        const auto rh = random_f16(static_cast<size_t>(rows * n), 2.0f, rng);
        std::vector<float> w(static_cast<size_t>(n));
        for (auto& v : w) v = normal(rng);

        // Reference: h = fp16(x + residual) (the same single rounding as the kernel), then the CPU norm.
        std::vector<uint16_t> hh = xh;
        if (with_residual) {
          for (size_t i = 0; i < hh.size(); ++i)
            hh[i] = k::fp32_to_fp16(k::fp16_to_fp32(xh[i]) + k::fp16_to_fp32(rh[i]));
        }
        const std::vector<float> hf = widen(hh);
        std::vector<float> ref(hf.size());
        ASSERT_EQ(k::rms_norm(hf.data(), w.data(), ref.data(), rows, n, eps), k::Status::ok);

        DeviceBuffer<uint16_t> dx(xh), dr(rh), dy(xh.size());
        DeviceBuffer<float> dw(w);
        ASSERT_TRUE(dx.ptr && dr.ptr && dy.ptr && dw.ptr);
        __half* y = mode == 1 ? as_half(dx.ptr) : mode == 3 ? as_half(dr.ptr) : as_half(dy.ptr);
        ASSERT_EQ(k::cuda::rms_norm_f16(as_half(dx.ptr), with_residual ? as_half(dr.ptr) : nullptr, dw.ptr, y,
                                        rows, n, eps, nullptr),
                  k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const auto got = mode == 1 ? dx.to_host() : mode == 3 ? dr.to_host() : dy.to_host();
        ASSERT_EQ(got.size(), ref.size());
        EXPECT_EQ(count_bad(got, ref, abs_of(ref)), 0);
        if (mode == 2) {
          EXPECT_EQ(dr.to_host(), hh) << "residual written back must be fp16(x + residual) exactly";
          EXPECT_EQ(dx.to_host(), xh) << "x must be left alone";
        }
      }
    }
  }
}

TEST(CudaRope, MatchesCpuOnQAndK) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(11);
  struct Case {
    int64_t head_dim, rot_dims;
  };
  const Case cases[] = {{64, 64}, {128, 128}, {96, 32}, {5, 4}};  // partial rotation, odd head_dim
  for (const Case c : cases) {
    for (const int64_t tokens : {1, 3, 37}) {
      for (const bool with_k : {true, false}) {
        SCOPED_TRACE("head_dim=" + std::to_string(c.head_dim) + " rot_dims=" + std::to_string(c.rot_dims) +
                     " tokens=" + std::to_string(tokens) + " with_k=" + std::to_string(with_k));
        const int64_t n_head = 5, n_head_kv = 2;
        const float base = 10000.0f;
        std::vector<int32_t> pos(static_cast<size_t>(tokens));
        std::uniform_int_distribution<int32_t> pick(0, 4095);
        for (auto& p : pos) p = pick(rng);
        pos[0] = tokens > 2 ? 131071 : pos[0];  // a long-context angle: full range reduction
        const auto qh = random_f16(static_cast<size_t>(tokens * n_head * c.head_dim), 1.5f, rng);
        const auto kh = random_f16(static_cast<size_t>(tokens * n_head_kv * c.head_dim), 1.5f, rng);

        DeviceBuffer<uint16_t> dq(qh), dk(kh);
        DeviceBuffer<int32_t> dp(pos);
        ASSERT_TRUE(dq.ptr && dk.ptr && dp.ptr);
        ASSERT_EQ(k::cuda::rope_normal_f16(as_half(dq.ptr), n_head, with_k ? as_half(dk.ptr) : nullptr,
                                           n_head_kv, dp.ptr, tokens, c.head_dim, c.rot_dims, base, nullptr),
                  k::Status::ok);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

        const auto check = [&](const std::vector<uint16_t>& in, const std::vector<uint16_t>& got,
                               int64_t heads) {
          std::vector<float> ref = widen(in);
          ASSERT_EQ(k::rope_normal(ref.data(), pos.data(), tokens, heads, c.head_dim, c.rot_dims, base),
                    k::Status::ok);
          ASSERT_EQ(got.size(), ref.size());
          // Magnitude: the norm of the input pair (rotation preserves it); dims past rot_dims exact.
          std::vector<float> mag(ref.size(), 0.0f);
          const std::vector<float> inf = widen(in);
          for (size_t i = 0; i < ref.size(); ++i) {
            const int64_t d = static_cast<int64_t>(i) % c.head_dim;
            if (d >= c.rot_dims) {
              EXPECT_EQ(got[i], in[i]) << "unrotated dim " << d << " changed";
              continue;
            }
            const size_t i0 = i - static_cast<size_t>(d % 2);
            mag[i] = std::hypot(inf[i0], inf[i0 + 1]);
          }
          EXPECT_EQ(count_bad(got, ref, mag), 0);
        };
        check(qh, dq.to_host(), n_head);
        if (with_k) {
          check(kh, dk.to_host(), n_head_kv);
        } else {
          EXPECT_EQ(dk.to_host(), kh) << "k == nullptr: the k buffer must be untouched";
        }
      }
    }
  }
}

TEST(CudaSwiglu, MatchesCpu) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(13);
  for (const int64_t n : {1, 37, 4100, 100003}) {
    for (const bool alias : {false, true}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " alias=" + std::to_string(alias));
      auto gh = random_f16(static_cast<size_t>(n), 3.0f, rng);
      gh[0] = k::fp32_to_fp16(-20.0f);  // far negative: silu → -0
      const auto uh = random_f16(static_cast<size_t>(n), 1.0f, rng);
      const std::vector<float> gf = widen(gh), uf = widen(uh);
      std::vector<float> ref(gf.size());
      ASSERT_EQ(k::swiglu(gf.data(), uf.data(), ref.data(), n), k::Status::ok);
      DeviceBuffer<uint16_t> dg(gh), du(uh), dout(gh.size());
      ASSERT_TRUE(dg.ptr && du.ptr && dout.ptr);
      uint16_t* out = alias ? dg.ptr : dout.ptr;
      ASSERT_EQ(k::cuda::swiglu_f16(as_half(dg.ptr), as_half(du.ptr), as_half(out), n, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const auto got = alias ? dg.to_host() : dout.to_host();
      ASSERT_EQ(got.size(), ref.size());
      EXPECT_EQ(count_bad(got, ref, abs_of(ref)), 0);
    }
  }
}

TEST(CudaEmbedding, GathersRowsBitExactly) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  struct Case {
    k::DType type;
    int64_t n_embd;
  };
  const Case cases[] = {{k::DType::Q4_0, 96},   {k::DType::Q4_0, 4128}, {k::DType::Q8_0, 96},
                        {k::DType::Q8_0, 4128}, {k::DType::F16, 96},    {k::DType::F16, 4100}};
  const int64_t n_rows = 1001;
  for (const Case c : cases) {
    const int64_t rb = k::row_bytes(c.type, c.n_embd);
    std::vector<uint8_t> table(static_cast<size_t>(n_rows * rb));
    std::vector<float> row(static_cast<size_t>(c.n_embd));
    for (int64_t r = 0; r < n_rows; ++r) {
      for (auto& v : row) v = normal(rng) * 0.1f;
      ASSERT_EQ(k::quantize_row(c.type, row.data(), table.data() + r * rb, c.n_embd), k::Status::ok);
    }
    DeviceBuffer<uint8_t> dt(table);
    ASSERT_NE(dt.ptr, nullptr);
    for (const int64_t tokens : {1, 3, 37}) {
      SCOPED_TRACE(std::string(k::type_name(c.type)) + " n_embd=" + std::to_string(c.n_embd) +
                   " tokens=" + std::to_string(tokens));
      std::vector<int32_t> ids(static_cast<size_t>(tokens));
      std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(n_rows - 1));
      for (auto& id : ids) id = pick(rng);
      ids.back() = static_cast<int32_t>(n_rows - 1);
      ids.front() = 0;
      DeviceBuffer<int32_t> di(ids), dflag(std::vector<int32_t>{0});
      DeviceBuffer<uint16_t> dout(static_cast<size_t>(tokens * c.n_embd));
      ASSERT_TRUE(di.ptr && dflag.ptr && dout.ptr);
      ASSERT_EQ(k::cuda::embedding_lookup_f16(dt.ptr, c.type, n_rows, c.n_embd, 0, di.ptr, tokens,
                                              as_half(dout.ptr), dflag.ptr, nullptr),
                k::Status::ok);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const auto got = dout.to_host();
      ASSERT_EQ(got.size(), static_cast<size_t>(tokens * c.n_embd));
      int bad = 0;
      for (int64_t t = 0; t < tokens; ++t) {
        ASSERT_EQ(k::dequantize_row(c.type, table.data() + ids[t] * rb, row.data(), c.n_embd), k::Status::ok);
        for (int64_t i = 0; i < c.n_embd; ++i) {
          const uint16_t want = k::fp32_to_fp16(row[i]);
          if (got[t * c.n_embd + i] != want && ++bad <= 5) {
            ADD_FAILURE() << "token " << t << " (id " << ids[t] << ") element " << i << ": got bits "
                          << got[t * c.n_embd + i] << ", want " << want;
          }
        }
      }
      EXPECT_EQ(bad, 0);
      EXPECT_EQ(dflag.to_host(), std::vector<int32_t>{0}) << "no id was out of range";
    }
  }
}

TEST(CudaEmbedding, OutOfRangeIdsGiveZeroRowsAndRaiseTheFlag) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  const int64_t n_rows = 10, n_embd = 64, row_begin = 100;  // a shard holding rows 100..109
  const int64_t rb = k::row_bytes(k::DType::Q8_0, n_embd);
  std::vector<uint8_t> table(static_cast<size_t>(n_rows * rb));
  std::vector<float> row(static_cast<size_t>(n_embd), 0.5f);
  for (int64_t r = 0; r < n_rows; ++r) {
    ASSERT_EQ(k::quantize_row(k::DType::Q8_0, row.data(), table.data() + r * rb, n_embd), k::Status::ok);
  }
  const std::vector<int32_t> ids = {-1, 99, 100, 109, 110, 2147483647, -2147483647 - 1};
  DeviceBuffer<uint8_t> dt(table);
  DeviceBuffer<int32_t> di(ids), dflag(std::vector<int32_t>{0});
  const auto tokens = static_cast<int64_t>(ids.size());
  DeviceBuffer<uint16_t> dout(std::vector<uint16_t>(static_cast<size_t>(tokens * n_embd), 0x7e00));  // NaNs
  ASSERT_TRUE(dt.ptr && di.ptr && dflag.ptr && dout.ptr);
  ASSERT_EQ(k::cuda::embedding_lookup_f16(dt.ptr, k::DType::Q8_0, n_rows, n_embd, row_begin, di.ptr, tokens,
                                          as_half(dout.ptr), dflag.ptr, nullptr),
            k::Status::ok);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = dout.to_host();
  ASSERT_EQ(got.size(), static_cast<size_t>(tokens * n_embd));
  for (int64_t t = 0; t < tokens; ++t) {
    const bool inside = ids[t] >= row_begin && ids[t] < row_begin + n_rows;
    const uint16_t want = inside ? k::fp32_to_fp16(0.5f) : 0;
    for (int64_t i = 0; i < n_embd; ++i)
      ASSERT_EQ(got[t * n_embd + i], want) << "token " << t << " element " << i;
  }
  EXPECT_EQ(dflag.to_host(), std::vector<int32_t>{1});
}

TEST(CudaLayerKernels, RejectBadArguments) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  DeviceBuffer<uint16_t> a(256), b(256);
  DeviceBuffer<float> w(64);
  DeviceBuffer<int32_t> ids(std::vector<int32_t>{0, 0});
  ASSERT_TRUE(a.ptr && b.ptr && w.ptr && ids.ptr);
  __half* x = as_half(a.ptr);
  __half* y = as_half(b.ptr);
  EXPECT_EQ(k::cuda::rms_norm_f16(nullptr, nullptr, w.ptr, y, 1, 64, 1e-5f, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::rms_norm_f16(x, nullptr, w.ptr, y, 1, 0, 1e-5f, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::rms_norm_f16(x, nullptr, w.ptr, y, -1, 64, 1e-5f, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::rms_norm_f16(x, nullptr, w.ptr, y, 1, 64, NAN, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::rope_normal_f16(x, 1, nullptr, 0, ids.ptr, 1, 64, 63, 1e4f, nullptr),
            k::Status::invalid_argument);  // odd rot_dims
  EXPECT_EQ(k::cuda::rope_normal_f16(x, 1, nullptr, 0, ids.ptr, 1, 64, 66, 1e4f, nullptr),
            k::Status::invalid_argument);  // rot_dims > head_dim
  EXPECT_EQ(k::cuda::rope_normal_f16(x, 1, y, 0, ids.ptr, 1, 64, 64, 1e4f, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::rope_normal_f16(x, 1, nullptr, 0, nullptr, 1, 64, 64, 1e4f, nullptr),
            k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::swiglu_f16(x, nullptr, y, 4, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::swiglu_f16(x, x, y, -1, nullptr), k::Status::invalid_argument);
  EXPECT_EQ(k::cuda::embedding_lookup_f16(a.ptr, k::DType::Q4_K, 1, 256, 0, ids.ptr, 1, y, nullptr, nullptr),
            k::Status::unsupported_type);
  EXPECT_EQ(k::cuda::embedding_lookup_f16(a.ptr, k::DType::Q4_0, 1, 48, 0, ids.ptr, 1, y, nullptr, nullptr),
            k::Status::invalid_argument);  // not a multiple of 32
  EXPECT_EQ(k::cuda::embedding_lookup_f16(a.ptr, k::DType::F16, 1, 3, 0, ids.ptr, 1, y, nullptr, nullptr),
            k::Status::invalid_argument);  // odd width
  EXPECT_EQ(k::cuda::embedding_lookup_f16(reinterpret_cast<uint8_t*>(a.ptr) + 1, k::DType::F16, 1, 4, 0,
                                          ids.ptr, 1, y, nullptr, nullptr),
            k::Status::invalid_argument);      // table not 2-byte aligned
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // nothing was launched
  // Empty work is fine.
  EXPECT_EQ(k::cuda::rms_norm_f16(x, nullptr, w.ptr, y, 0, 64, 1e-5f, nullptr), k::Status::ok);
  EXPECT_EQ(k::cuda::swiglu_f16(x, x, y, 0, nullptr), k::Status::ok);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}
