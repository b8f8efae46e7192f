// Hardware counters through CUPTI's range profiler (kernels/cuda/kernel_metrics): on the host, every
// metric nibble-kernel-metrics asks for is one an H100 / H200 (GH100) knows, and a made-up one is
// refused; on a GPU, each kernel launched in the window is one range with plausible values (a GEMV
// that streams its weights reads at least their bytes from device memory, and issues instructions).
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kernels/cuda/kernel_metrics.cuh"
#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/quant_types.hpp"
#include "tests/cuda/cuda_test_util.hpp"

namespace {

namespace k = nibble::kernels;
namespace kc = nibble::kernels::cuda;
namespace ct = nibble::cuda_test;

TEST(KernelMetrics, EveryMetricAskedForIsKnownToHopper) {
  std::vector<std::string> names = kc::kernel_metric_names();
  ASSERT_FALSE(names.empty());
  names.push_back("made_up__metric.sum");
  std::vector<std::string> unknown;
  std::string error;
  const k::Status st = kc::unknown_kernel_metrics("GH100", names, unknown, error);
  if (st == k::Status::device_error) GTEST_SKIP() << "CUPTI's host API is not usable here: " << error;
  ASSERT_EQ(st, k::Status::ok);
  EXPECT_EQ(unknown, std::vector<std::string>{"made_up__metric.sum"});
}

TEST(KernelMetrics, RefusesNoMetricsBeforeProfiling) {
  std::vector<kc::KernelMetricsRange> ranges;
  std::string error;
  EXPECT_EQ(kc::profile_kernel_metrics(
                {}, 4, [] { return true; }, ranges, error),
            k::Status::invalid_argument);
  EXPECT_EQ(kc::profile_kernel_metrics(
                kc::kernel_metric_names(), 0, [] { return true; }, ranges, error),
            k::Status::invalid_argument);
}

TEST(KernelMetrics, EachLaunchIsARangeWithItsCounters) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  // 134 MB of nibbles, over twice an H100's or H200's L2: the profiled launches read them from device
  // memory whatever the launch before left in L2. Filled on the device (the values do not matter here).
  const int64_t n_out = 32768, kk = 8192, group = 128;
  const size_t nibble_bytes = static_cast<size_t>(n_out * kk / 2),
               groups = static_cast<size_t>(n_out * kk / group);
  ct::DeviceBuffer<uint8_t> quants(nibble_bytes), zeros(groups);
  ct::DeviceBuffer<uint16_t> scales(groups);
  ct::DeviceBuffer<k::f16_bits> x(std::vector<k::f16_bits>(static_cast<size_t>(kk), k::fp32_to_fp16(0.5f)));
  ct::DeviceBuffer<float> y(static_cast<size_t>(n_out));
  ASSERT_TRUE(quants.ptr && zeros.ptr && scales.ptr && x.ptr && y.ptr);
  ASSERT_EQ(cudaMemset(quants.ptr, 0x5A, nibble_bytes), cudaSuccess);
  ASSERT_EQ(cudaMemset(zeros.ptr, 8, groups), cudaSuccess);
  ASSERT_EQ(cudaMemset(scales.ptr, 0x14, groups * 2), cudaSuccess);  // fp16 0x1414: ~0.001
  const auto gemv = [&] {
    return kc::w4a16_gemv_int4_groups(quants.ptr, reinterpret_cast<const __half*>(scales.ptr), zeros.ptr,
                                      group, n_out, kk, reinterpret_cast<const __half*>(x.ptr), 1, y.ptr,
                                      nullptr) == k::Status::ok;
  };
  ASSERT_TRUE(gemv());  // loaded once before the profiler
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> want = y.to_host();
  ASSERT_EQ(cudaMemset(y.ptr, 0xff, y.count * sizeof(float)), cudaSuccess);
  // lts__t_sector_hit_rate needs a second pass: CUPTI replays the kernel, restoring what it wrote.
  const std::vector<std::string> metrics = {
      "gpu__time_duration.sum", "dram__bytes_read.sum", "smsp__inst_executed.sum",
      "dram__throughput.avg.pct_of_peak_sustained_elapsed", "lts__t_sector_hit_rate.pct"};
  std::vector<kc::KernelMetricsRange> ranges;
  std::string error;
  const k::Status st = kc::profile_kernel_metrics(
      metrics, 4, [&] { return gemv() && gemv(); }, ranges, error);
  if (st == k::Status::device_error && error.find("PRIVILEGES") != std::string::npos)
    GTEST_SKIP() << "this machine does not let us read the GPU's counters: " << error;
  ASSERT_EQ(st, k::Status::ok) << error;
  ASSERT_EQ(ranges.size(), 2u);  // two launches, two ranges
  EXPECT_NE(ranges[0].name, ranges[1].name);
  EXPECT_EQ(y.to_host(), want);  // the replays left the product the launches compute
  // A second session in the same process (the driver profiles each launch in its own).
  std::vector<kc::KernelMetricsRange> again;
  ASSERT_EQ(kc::profile_kernel_metrics(metrics, 4, gemv, again, error), k::Status::ok) << error;
  ASSERT_EQ(again.size(), 1u);
  // More kernels than max_ranges: refused with the reason, not silently dropped.
  EXPECT_EQ(kc::profile_kernel_metrics(
                metrics, 1, [&] { return gemv() && gemv(); }, again, error),
            k::Status::device_error);
  EXPECT_NE(error.find("max_ranges"), std::string::npos) << error;
  for (const kc::KernelMetricsRange& r : ranges) {
    SCOPED_TRACE(r.name);
    ASSERT_EQ(r.values.size(), metrics.size());
    EXPECT_FALSE(r.name.empty());
    EXPECT_GT(r.values[0], 0.0);                                      // ns
    EXPECT_GT(r.values[1], 0.5 * static_cast<double>(nibble_bytes));  // the weights, from device memory
    EXPECT_LT(r.values[1], 4.0 * static_cast<double>(nibble_bytes));
    EXPECT_GT(r.values[2], 0.0);
    EXPECT_GE(r.values[3], 0.0);
    EXPECT_LE(r.values[3], 100.0);
    EXPECT_GE(r.values[4], 0.0);
    EXPECT_LE(r.values[4], 100.0);
  }
}

}  // namespace
