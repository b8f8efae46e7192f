#include <cuda.h>
#include <cuda_runtime.h>
#include <cupti_profiler_host.h>
#include <cupti_profiler_target.h>
#include <cupti_range_profiler.h>
#include <cupti_result.h>
#include <cupti_target.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda/kernel_metrics.cuh"

namespace nibble::kernels::cuda {
namespace {

// A CUPTI parameter struct, zeroed, with its size set (what every CUPTI call checks first).
template <typename P>
P params(size_t struct_size) {
  P p{};
  p.structSize = struct_size;
  return p;
}

// CUPTI's message for a failed call, prefixed with the call.
std::string cupti_error(const char* call, CUptiResult result) {
  const char* text = nullptr;
  if (cuptiGetErrorMessage(result, &text) != CUPTI_SUCCESS || text == nullptr) text = "unknown CUPTI error";
  std::string message = text;  // some end in " \n"
  while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
  return std::string(call) + ": " + message + " (CUPTI " + std::to_string(static_cast<int>(result)) + ")";
}

std::vector<const char*> c_names(const std::vector<std::string>& names) {
  std::vector<const char*> out;
  out.reserve(names.size());
  for (const std::string& n : names) out.push_back(n.c_str());
  return out;
}

// CUPTI's host object for one chip (metric configurations and evaluation), destroyed on every path.
class HostObject {
 public:
  HostObject() = default;
  HostObject(const HostObject&) = delete;
  HostObject& operator=(const HostObject&) = delete;
  ~HostObject() {
    if (object_ == nullptr) return;
    auto p =
        params<CUpti_Profiler_Host_Deinitialize_Params>(CUpti_Profiler_Host_Deinitialize_Params_STRUCT_SIZE);
    p.pHostObject = object_;
    cuptiProfilerHostDeinitialize(&p);
  }
  // availability: the device's counter availability image, or empty (offline: names only).
  CUptiResult start(const std::string& chip, std::vector<uint8_t>& availability) {
    auto p = params<CUpti_Profiler_Host_Initialize_Params>(CUpti_Profiler_Host_Initialize_Params_STRUCT_SIZE);
    p.profilerType = CUPTI_PROFILER_TYPE_RANGE_PROFILER;
    p.pChipName = chip.c_str();
    p.pCounterAvailabilityImage = availability.empty() ? nullptr : availability.data();
    const CUptiResult r = cuptiProfilerHostInitialize(&p);
    object_ = p.pHostObject;
    return r;
  }
  CUpti_Profiler_Host_Object* get() const { return object_; }

 private:
  CUpti_Profiler_Host_Object* object_ = nullptr;
};

CUptiResult add_metrics(CUpti_Profiler_Host_Object* host, std::vector<const char*>& names) {
  auto p = params<CUpti_Profiler_Host_ConfigAddMetrics_Params>(
      CUpti_Profiler_Host_ConfigAddMetrics_Params_STRUCT_SIZE);
  p.pHostObject = host;
  p.ppMetricNames = names.data();
  p.numMetrics = names.size();
  return cuptiProfilerHostConfigAddMetrics(&p);
}

}  // namespace

const std::vector<std::string>& kernel_metric_names() {
  static const std::vector<std::string> names = {
      "gpu__time_duration.sum",
      "dram__throughput.avg.pct_of_peak_sustained_elapsed",
      "dram__bytes_read.sum",
      "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
      "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active",
      "smsp__average_warp_latency_per_inst_issued.ratio",
      "smsp__issue_active.avg.pct_of_peak_sustained_active",
      "smsp__warps_active.avg.per_cycle_active",
      "sm__warps_active.avg.pct_of_peak_sustained_active",
      "lts__t_sector_hit_rate.pct",
      "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
      "smsp__inst_executed.sum",
      "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_selected_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_membar_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_sleeping_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_drain_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_imc_miss_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_tex_throttle_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_misc_per_issue_active.ratio",
      "smsp__average_warps_issue_stalled_gmma_per_issue_active.ratio",
  };
  return names;
}

Status unknown_kernel_metrics(const std::string& chip, const std::vector<std::string>& names,
                              std::vector<std::string>& unknown, std::string& error) {
  unknown.clear();
  std::vector<uint8_t> none;
  // One host object per name: a configuration that refused a name is not trusted with the next.
  for (const std::string& name : names) {
    HostObject host;
    const CUptiResult started = host.start(chip, none);
    if (started != CUPTI_SUCCESS) {
      error = cupti_error("cuptiProfilerHostInitialize", started);
      return Status::device_error;
    }
    std::vector<const char*> one = {name.c_str()};
    if (add_metrics(host.get(), one) != CUPTI_SUCCESS) unknown.push_back(name);
  }
  return Status::ok;
}

Status kernel_metrics_chip(int device, std::string& chip, std::string& error) {
  auto p = params<CUpti_Device_GetChipName_Params>(CUpti_Device_GetChipName_Params_STRUCT_SIZE);
  p.deviceIndex = static_cast<size_t>(device);
  const CUptiResult r = cuptiDeviceGetChipName(&p);
  if (r != CUPTI_SUCCESS || p.pChipName == nullptr) {
    error = cupti_error("cuptiDeviceGetChipName", r);
    return Status::device_error;
  }
  chip = p.pChipName;
  return Status::ok;
}

Status profile_kernel_metrics(const std::vector<std::string>& metrics, int max_ranges,
                              const std::function<bool()>& launch, std::vector<KernelMetricsRange>& ranges,
                              std::string& error) {
  ranges.clear();
  if (metrics.empty() || max_ranges < 1 || !launch) return Status::invalid_argument;
  const auto fail = [&](const char* call, CUptiResult r) {
    error = cupti_error(call, r);
    return Status::device_error;
  };
  // The runtime's primary context, made current (cudaFree(0) creates it).
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaFree(nullptr) != cudaSuccess) {
    error = "no usable CUDA device";
    return Status::device_error;
  }
  // The driver's cuCtxGetCurrent through the runtime: the library links no libcuda (a machine without
  // a driver still loads it, for unknown_kernel_metrics).
  using CtxGetCurrent = CUresult (*)(CUcontext*);
  void* get_current = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  CUcontext context = nullptr;
  if (cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &get_current, 12000, cudaEnableDefault, &found) !=
          cudaSuccess ||
      found != cudaDriverEntryPointSuccess || get_current == nullptr ||
      reinterpret_cast<CtxGetCurrent>(get_current)(&context) != CUDA_SUCCESS || context == nullptr) {
    error = "no current CUDA context";
    return Status::device_error;
  }
  std::string chip;
  if (kernel_metrics_chip(device, chip, error) != Status::ok) return Status::device_error;

  // Once a process (it loads the profiler's libraries and hooks the driver), as NVIDIA's samples do;
  // never undone: later sessions reuse it.
  static const CUptiResult initialized = [] {
    auto init = params<CUpti_Profiler_Initialize_Params>(CUpti_Profiler_Initialize_Params_STRUCT_SIZE);
    return cuptiProfilerInitialize(&init);
  }();
  CUptiResult r = initialized;
  if (r != CUPTI_SUCCESS) return fail("cuptiProfilerInitialize", r);

  // Which counters this device exposes, then the configuration (the passes) for the metrics.
  std::vector<uint8_t> availability;
  {
    auto p = params<CUpti_Profiler_GetCounterAvailability_Params>(
        CUpti_Profiler_GetCounterAvailability_Params_STRUCT_SIZE);
    p.ctx = context;
    if ((r = cuptiProfilerGetCounterAvailability(&p)) != CUPTI_SUCCESS)
      return fail("cuptiProfilerGetCounterAvailability", r);
    availability.resize(p.counterAvailabilityImageSize);
    p.pCounterAvailabilityImage = availability.data();
    if ((r = cuptiProfilerGetCounterAvailability(&p)) != CUPTI_SUCCESS)
      return fail("cuptiProfilerGetCounterAvailability", r);
  }
  HostObject host;
  if ((r = host.start(chip, availability)) != CUPTI_SUCCESS) return fail("cuptiProfilerHostInitialize", r);
  std::vector<const char*> names = c_names(metrics);
  if ((r = add_metrics(host.get(), names)) != CUPTI_SUCCESS)
    return fail("cuptiProfilerHostConfigAddMetrics", r);
  std::vector<uint8_t> config;
  {
    auto size = params<CUpti_Profiler_Host_GetConfigImageSize_Params>(
        CUpti_Profiler_Host_GetConfigImageSize_Params_STRUCT_SIZE);
    size.pHostObject = host.get();
    if ((r = cuptiProfilerHostGetConfigImageSize(&size)) != CUPTI_SUCCESS)
      return fail("cuptiProfilerHostGetConfigImageSize", r);
    config.resize(size.configImageSize);
    auto image = params<CUpti_Profiler_Host_GetConfigImage_Params>(
        CUpti_Profiler_Host_GetConfigImage_Params_STRUCT_SIZE);
    image.pHostObject = host.get();
    image.pConfigImage = config.data();
    image.configImageSize = config.size();
    if ((r = cuptiProfilerHostGetConfigImage(&image)) != CUPTI_SUCCESS)
      return fail("cuptiProfilerHostGetConfigImage", r);
  }

  // The counter data image outlives the profiler object (SetConfig keeps a pointer to it, and Disable
  // may still write it): declared before the object's guard, so destroyed after it.
  std::vector<uint8_t> counters;
  // The range profiler on the context: automatic ranges (one a kernel), replayed by CUPTI.
  auto enable = params<CUpti_RangeProfiler_Enable_Params>(CUpti_RangeProfiler_Enable_Params_STRUCT_SIZE);
  enable.ctx = context;
  if ((r = cuptiRangeProfilerEnable(&enable)) != CUPTI_SUCCESS) return fail("cuptiRangeProfilerEnable", r);
  CUpti_RangeProfiler_Object* profiler = enable.pRangeProfilerObject;
  struct Disable {
    CUpti_RangeProfiler_Object* object;
    ~Disable() {
      auto p = params<CUpti_RangeProfiler_Disable_Params>(CUpti_RangeProfiler_Disable_Params_STRUCT_SIZE);
      p.pRangeProfilerObject = object;
      cuptiRangeProfilerDisable(&p);
    }
  } disable{profiler};

  {
    auto size = params<CUpti_RangeProfiler_GetCounterDataSize_Params>(
        CUpti_RangeProfiler_GetCounterDataSize_Params_STRUCT_SIZE);
    size.pRangeProfilerObject = profiler;
    size.pMetricNames = names.data();
    size.numMetrics = names.size();
    size.maxNumOfRanges = static_cast<size_t>(max_ranges);
    size.maxNumRangeTreeNodes = static_cast<size_t>(max_ranges);
    if ((r = cuptiRangeProfilerGetCounterDataSize(&size)) != CUPTI_SUCCESS)
      return fail("cuptiRangeProfilerGetCounterDataSize", r);
    counters.assign(size.counterDataSize, 0);
    auto image = params<CUpti_RangeProfiler_CounterDataImage_Initialize_Params>(
        CUpti_RangeProfiler_CounterDataImage_Initialize_Params_STRUCT_SIZE);
    image.pRangeProfilerObject = profiler;
    image.pCounterData = counters.data();
    image.counterDataSize = counters.size();
    if ((r = cuptiRangeProfilerCounterDataImageInitialize(&image)) != CUPTI_SUCCESS)
      return fail("cuptiRangeProfilerCounterDataImageInitialize", r);
  }
  auto set = params<CUpti_RangeProfiler_SetConfig_Params>(CUpti_RangeProfiler_SetConfig_Params_STRUCT_SIZE);
  set.pRangeProfilerObject = profiler;
  set.configSize = config.size();
  set.pConfig = config.data();
  set.counterDataImageSize = counters.size();
  set.pCounterDataImage = counters.data();
  set.range = CUPTI_AutoRange;
  set.replayMode = CUPTI_KernelReplay;
  set.maxRangesPerPass = static_cast<size_t>(max_ranges);
  set.numNestingLevels = 1;
  set.minNestingLevel = 1;
  set.passIndex = 0;
  set.targetNestingLevel = 1;
  if ((r = cuptiRangeProfilerSetConfig(&set)) != CUPTI_SUCCESS) return fail("cuptiRangeProfilerSetConfig", r);

  // Kernel replay submits every pass of a kernel at its launch: one window normally does; the loop
  // follows CUPTI's protocol (stop says whether all passes were submitted).
  for (int window = 0;; ++window) {
    auto start = params<CUpti_RangeProfiler_Start_Params>(CUpti_RangeProfiler_Start_Params_STRUCT_SIZE);
    start.pRangeProfilerObject = profiler;
    if ((r = cuptiRangeProfilerStart(&start)) != CUPTI_SUCCESS) return fail("cuptiRangeProfilerStart", r);
    const bool launched = launch() && cudaDeviceSynchronize() == cudaSuccess;
    auto stop = params<CUpti_RangeProfiler_Stop_Params>(CUpti_RangeProfiler_Stop_Params_STRUCT_SIZE);
    stop.pRangeProfilerObject = profiler;
    if ((r = cuptiRangeProfilerStop(&stop)) != CUPTI_SUCCESS) return fail("cuptiRangeProfilerStop", r);
    if (!launched) {
      error = "the launches failed";
      return Status::device_error;
    }
    if (stop.isAllPassSubmitted) break;
    if (window >= 64) {
      error = "CUPTI still wanted passes after 64 windows";
      return Status::device_error;
    }
  }
  auto decode =
      params<CUpti_RangeProfiler_DecodeData_Params>(CUpti_RangeProfiler_DecodeData_Params_STRUCT_SIZE);
  decode.pRangeProfilerObject = profiler;
  if ((r = cuptiRangeProfilerDecodeData(&decode)) != CUPTI_SUCCESS)
    return fail("cuptiRangeProfilerDecodeData", r);
  if (decode.numOfRangeDropped > 0) {
    error = std::to_string(decode.numOfRangeDropped) + " kernel launches past max_ranges (" +
            std::to_string(max_ranges) + ") were not profiled";
    return Status::device_error;
  }

  auto info = params<CUpti_RangeProfiler_GetCounterDataInfo_Params>(
      CUpti_RangeProfiler_GetCounterDataInfo_Params_STRUCT_SIZE);
  info.pCounterDataImage = counters.data();
  info.counterDataImageSize = counters.size();
  if ((r = cuptiRangeProfilerGetCounterDataInfo(&info)) != CUPTI_SUCCESS)
    return fail("cuptiRangeProfilerGetCounterDataInfo", r);
  for (size_t i = 0; i < info.numTotalRanges; ++i) {
    auto range = params<CUpti_RangeProfiler_CounterData_GetRangeInfo_Params>(
        CUpti_RangeProfiler_CounterData_GetRangeInfo_Params_STRUCT_SIZE);
    range.pCounterDataImage = counters.data();
    range.counterDataImageSize = counters.size();
    range.rangeIndex = i;
    range.rangeDelimiter = "/";
    if ((r = cuptiRangeProfilerCounterDataGetRangeInfo(&range)) != CUPTI_SUCCESS)
      return fail("cuptiRangeProfilerCounterDataGetRangeInfo", r);
    KernelMetricsRange out;
    out.name = range.rangeName != nullptr ? range.rangeName : "";
    out.values.assign(metrics.size(), 0.0);
    auto eval = params<CUpti_Profiler_Host_EvaluateToGpuValues_Params>(
        CUpti_Profiler_Host_EvaluateToGpuValues_Params_STRUCT_SIZE);
    eval.pHostObject = host.get();
    eval.pCounterDataImage = counters.data();
    eval.counterDataImageSize = counters.size();
    eval.rangeIndex = i;
    eval.ppMetricNames = names.data();
    eval.numMetrics = names.size();
    eval.pMetricValues = out.values.data();
    if ((r = cuptiProfilerHostEvaluateToGpuValues(&eval)) != CUPTI_SUCCESS)
      return fail("cuptiProfilerHostEvaluateToGpuValues", r);
    ranges.push_back(std::move(out));
  }
  return Status::ok;
}

}  // namespace nibble::kernels::cuda
