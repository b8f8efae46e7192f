#pragma once
// Hardware counters of single kernel launches, through CUPTI's range profiler (CUDA 12.6+): every
// kernel launched inside profile_kernel_metrics's window becomes one range, replayed by CUPTI until
// each requested metric is collected. What timings cannot say: why a kernel runs at the speed it does
// (device-memory throughput, issue-slot use, resident warps, why warps stall, shared-memory bank
// conflicts). The metric names are Nsight Compute's (`ncu --query-metrics`), which the lent GPU
// machines do not have. Needs CUPTI's libraries at run time (libcupti, libnvperf_host; the toolkit's
// lib64, or tools/gpu-bundle.sh's copies) and permission to read the GPU's counters (root, or
// NVreg_RestrictProfilingToAdminUsers=0).
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// The metrics nibble-kernel-metrics reports, in order: duration, device-memory throughput, tensor and
// load/store pipe activity, cycles between a warp's instructions, issue activity, occupancy, L2 hit
// rate, shared-memory bank conflicts, instructions, then the average number of warps stalled per
// issued instruction for each stall reason (Hopper's 19, wgmma's included: their sum is about the
// cycles between a warp's instructions). About 7 replay passes a kernel on an H100 / H200.
const std::vector<std::string>& kernel_metric_names();

// The names among `names` that chip `chip` (CUPTI's name: "GH100" for an H100 / H200) does not know,
// found on the host alone (no GPU needed: CUPTI's host API compiles metric configurations offline).
// Returns device_error (with `error` set) when CUPTI's host API cannot start (e.g. its libraries are
// missing or do not know the chip).
Status unknown_kernel_metrics(const std::string& chip, const std::vector<std::string>& names,
                              std::vector<std::string>& unknown, std::string& error);

// One profiled kernel launch: CUPTI's range name (in automatic range mode a number, the launch's
// position in the window: "0", "1", ...) and the value of each metric asked for, in the order asked.
struct KernelMetricsRange {
  std::string name;
  std::vector<double> values;
};

// The chip name of CUDA device `device` (e.g. "GH100"), or device_error with `error` set.
Status kernel_metrics_chip(int device, std::string& chip, std::string& error);

// Profiles the kernels `launch` enqueues (at most max_ranges of them, each its own range, on the
// current device's primary context; `launch` runs once, CUPTI replays each kernel as many passes
// as the metrics need, saving and restoring the memory it writes) and returns each range's metric
// values. The device must be idle when it starts. Returns invalid_argument for no metrics or
// max_ranges < 1, device_error (with `error` set: CUPTI's message, e.g. that counters need
// privileges, or that more than max_ranges kernels ran) when profiling fails; `launch` reports its own
// failures by returning false (device_error, error "the launches failed").
Status profile_kernel_metrics(const std::vector<std::string>& metrics, int max_ranges,
                              const std::function<bool()>& launch, std::vector<KernelMetricsRange>& ranges,
                              std::string& error);

}  // namespace nibble::kernels::cuda
