// CUTLASS's Hopper mixed-input GEMM on group-wise INT4 (see the header). The configuration follows
// CUTLASS's example 55 (55_hopper_int4_bf16_gemm.cu): the 4-bit operand is passed as A so it goes
// through registers, which makes the problem the transposed one, yᵀ[n_out, m] = W · xᵀ, written
// column-major, i.e. y row-major.
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/w4a16_gemm_cutlass.cuh"

#if defined(NIBBLE_HAVE_CUTLASS)
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/mixed_dtype_utils.hpp"
#include "cutlass/util/packed_stride.hpp"
#endif

namespace nibble::kernels::cuda {

namespace {

constexpr int64_t kStepK = 64;  // the main loop's k step: 128 bytes of fp16

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

bool int4_cutlass_shape_ok(int64_t n_out, int64_t k, int64_t group) {
  return n_out > 0 && k > 0 && n_out % 128 == 0 && k % kStepK == 0 && (group == 64 || group == 128) &&
         k % group == 0 && n_out * k < (int64_t{1} << 31);
}

size_t int4_cutlass_bytes(int64_t n_out, int64_t k, int64_t group) {
  if (!int4_cutlass_shape_ok(n_out, k, group)) return 0;
  const size_t quant_bytes = static_cast<size_t>(n_out * k / 2);
  const size_t pair_bytes = static_cast<size_t>(n_out * (k / group)) * sizeof(__half);
  return align256(quant_bytes) + 2 * align256(pair_bytes);
}

#if defined(NIBBLE_HAVE_CUTLASS)

namespace {

using namespace cute;

using ActivationType = cutlass::half_t;
using QuantType = cutlass::uint4b_t;
using ScaleType = cutlass::half_t;
using OutputType = float;

// The activations, [m, k] row-major; in the swapped problem they are B, k-major.
using LayoutActivations = cutlass::layout::RowMajor;
using LayoutActivationsTransposed = cutlass::layout::LayoutTranspose<LayoutActivations>::type;
using StrideActivations = cutlass::detail::TagToStrideA_t<LayoutActivations>;
constexpr int kAlignActivations = 128 / cutlass::sizeof_bits<ActivationType>::value;

// The weights, [n_out, k] with k contiguous (CUTLASS's column-major [k, n_out]).
using LayoutWeights = cutlass::layout::ColumnMajor;
using StrideWeights = cutlass::detail::TagToStrideB_t<LayoutWeights>;
constexpr int kAlignWeights = 128 / cutlass::sizeof_bits<QuantType>::value;

// Each thread's eight values of a wgmma A fragment in one 32-bit word, in the [0,2,4,6,1,3,5,7]
// order the fast uint4 -> fp16 conversion wants.
using ValueShuffle = Layout<Shape<_2, _4>, Stride<_4, _1>>;
using ShuffleAtoms = Layout<Shape<_1, _1>>;
using LayoutAtomQuant =
    decltype(cutlass::compute_memory_reordering_atom<ActivationType, ShuffleAtoms, ValueShuffle>());
using LayoutWeightsReordered =
    decltype(cute::tile_to_shape(LayoutAtomQuant{}, Layout<Shape<int, int, int>, StrideWeights>{}));

// y, [m, n_out] row-major: the swapped problem's output, column-major.
using LayoutOutputTransposed = cutlass::layout::ColumnMajor;
constexpr int kAlignOutput = 128 / cutlass::sizeof_bits<OutputType>::value;

using ClusterShape = Shape<_1, _1, _1>;

// One GEMM configuration: a tile of weight rows x activation rows x 64 inputs and a warp-specialized
// schedule, over CUTLASS's persistent tile scheduler.
template <class TileShape, class KernelSchedule, class EpilogueSchedule>
struct GemmConfig {
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutOutputTransposed,
      kAlignOutput,  // no C: y = W · xᵀ only
      OutputType, LayoutOutputTransposed, kAlignOutput, EpilogueSchedule>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<QuantType, ScaleType, ScaleType>,
      LayoutWeightsReordered, kAlignWeights, ActivationType, LayoutActivationsTransposed, kAlignActivations,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using StrideScale = typename CollectiveMainloop::StrideScale;
  using StrideOutput = typename GemmKernel::StrideD;
};

// 128 weight rows a tile, two consumer warpgroups splitting them (cooperative): prefill-sized problems.
using Cooperative128 =
    GemmConfig<Shape<_128, _128, Int<kStepK>>, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
               cutlass::epilogue::TmaWarpSpecializedCooperative>;
// 64 weight rows a tile, the two consumer warpgroups on alternate tiles (ping-pong): twice the tiles,
// so that with few activation rows (one tile of them) more SMs stream weights.
using Pingpong64 = GemmConfig<Shape<_64, _128, Int<kStepK>>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                              cutlass::epilogue::TmaWarpSpecialized>;
// 64 weight rows x 16 activation rows: decode batches.
using Pingpong64x16 =
    GemmConfig<Shape<_64, _16, Int<kStepK>>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
               cutlass::epilogue::TmaWarpSpecialized>;

LayoutWeightsReordered reordered_layout(int64_t n_out, int64_t k) {
  return cute::tile_to_shape(LayoutAtomQuant{},
                             cute::make_shape(static_cast<int>(n_out), static_cast<int>(k), 1));
}

// One thread per 8 inputs of a row: our layout keeps input j of each 32-input run in the low nibble
// of the run's byte j and input j + 16 in its high nibble; CUTLASS's reordered position of each
// comes from the layout. Nibbles from different threads can share a destination word, so each is
// OR-ed in atomically into a zeroed buffer (a load-time pass; speed matters little).
__global__ void reorder_quants_kernel(const uint8_t* __restrict__ quants, int64_t n_out, int64_t k,
                                      LayoutWeightsReordered layout, uint32_t* __restrict__ out) {
  const int64_t eights_per_row = k / 8;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= n_out * eights_per_row) return;
  const int64_t row = index / eights_per_row;
  const int64_t first = (index % eights_per_row) * 8;
  const uint8_t* run = quants + row * (k / 2) + (first / 32) * 16;
  for (int e = 0; e < 8; ++e) {
    const int64_t j = first + e;
    const int in_run = static_cast<int>(j % 32);
    const uint32_t level = in_run < 16 ? (run[in_run] & 0xFu) : (run[in_run - 16] >> 4);
    const int64_t position = layout(static_cast<int>(row), static_cast<int>(j), 0);
    atomicOr(out + position / 8, level << (4 * (position % 8)));
  }
}

// scales [n_out, groups] -> [groups, n_out]; offsets = fp16(-scale · zero) the same way.
__global__ void transpose_scales_kernel(const uint16_t* __restrict__ scales,
                                        const uint8_t* __restrict__ zeros, int64_t n_out, int64_t groups,
                                        __half* __restrict__ scales_out, __half* __restrict__ offsets_out) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= n_out * groups) return;
  const int64_t row = index % n_out;  // consecutive threads write consecutive outputs
  const int64_t g = index / n_out;
  const __half scale = __ushort_as_half(scales[row * groups + g]);
  scales_out[g * n_out + row] = scale;
  offsets_out[g * n_out + row] =
      __float2half_rn(-__half2float(scale) * static_cast<float>(zeros[row * groups + g]));
}

// The current device and its SM count (the persistent scheduler's grid); cheap, the runtime caches
// attributes, and per call so that a process on several GPUs gets each one's own.
cutlass::KernelHardwareInfo current_device() {
  cutlass::KernelHardwareInfo info;
  if (cudaGetDevice(&info.device_id) != cudaSuccess) return info;
  if (cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, info.device_id) != cudaSuccess)
    info.sm_count = 0;  // CUTLASS then queries it itself
  return info;
}

template <class Config>
typename Config::Gemm::Arguments gemm_arguments(const __half* x, const Int4CutlassWeights& w, int64_t m,
                                                float* y) {
  const int n_out = static_cast<int>(w.n_out), k = static_cast<int>(w.k), rows = static_cast<int>(m);
  const int groups = static_cast<int>(w.k / w.group);
  const auto stride_x = cutlass::make_cute_packed_stride(StrideActivations{}, cute::make_shape(rows, k, 1));
  const auto stride_scale =
      cutlass::make_cute_packed_stride(typename Config::StrideScale{}, cute::make_shape(n_out, groups, 1));
  const auto stride_y =
      cutlass::make_cute_packed_stride(typename Config::StrideOutput{}, cute::make_shape(n_out, rows, 1));
  typename Config::Gemm::Arguments arguments{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {n_out, rows, k, 1},
      {reinterpret_cast<const QuantType*>(w.quants), reordered_layout(w.n_out, w.k),
       reinterpret_cast<const ActivationType*>(x), stride_x, reinterpret_cast<const ScaleType*>(w.scales),
       stride_scale, static_cast<int>(w.group), reinterpret_cast<const ScaleType*>(w.offsets)},
      {{1.0f, 0.0f}, nullptr, stride_y, y, stride_y}};
  arguments.hw_info = current_device();
  return arguments;
}

template <class Config>
Status run_gemm(const __half* x, const Int4CutlassWeights& weights, int64_t m, float* y,
                cudaStream_t stream) {
  using Gemm = typename Config::Gemm;
  const auto arguments = gemm_arguments<Config>(x, weights, m, y);
  if (Gemm::get_workspace_size(arguments) != 0)
    return library_failure("CUTLASS get_workspace_size", "a workspace, which these schedules never ask for");
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(arguments);
  if (status != cutlass::Status::kSuccess)
    return library_failure("CUTLASS can_implement", cutlass::cutlassGetStatusString(status));
  status = gemm.initialize(arguments, nullptr, stream);
  if (status != cutlass::Status::kSuccess)
    return library_failure("CUTLASS initialize", cutlass::cutlassGetStatusString(status));
  // run() checks its launch itself and clears the CUDA error (nothing older is blamed on this call),
  // so only its status can be named.
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess)
    return library_failure("CUTLASS run", cutlass::cutlassGetStatusString(status));
  return launch_status();
}

// CUTLASS's own check of these shapes (alignments, group against the k step), on the host.
template <class Config>
bool implementable(int64_t n_out, int64_t k, int64_t group, int64_t m) {
  // Stand-in operands, aligned as cudaMalloc's: can_implement reads only shapes, strides and whether
  // the scales and offsets are given.
  auto* aligned = reinterpret_cast<uint8_t*>(uintptr_t{1} << 20);
  Int4CutlassWeights shape;
  shape.quants = aligned;
  shape.scales = shape.offsets = reinterpret_cast<const __half*>(aligned);
  shape.n_out = n_out;
  shape.k = k;
  shape.group = group;
  return Config::Gemm::can_implement(gemm_arguments<Config>(reinterpret_cast<const __half*>(aligned), shape,
                                                            m, reinterpret_cast<float*>(aligned))) ==
         cutlass::Status::kSuccess;
}

}  // namespace

bool w4a16_cutlass_built() { return true; }

bool w4a16_gemm_int4_cutlass_implementable(int64_t n_out, int64_t k, int64_t group, int64_t m,
                                           CutlassSchedule schedule) {
  if (!int4_cutlass_shape_ok(n_out, k, group) || m < 1 || m >= (int64_t{1} << 31)) return false;
  switch (schedule) {
    case CutlassSchedule::cooperative_128:
      return implementable<Cooperative128>(n_out, k, group, m);
    case CutlassSchedule::pingpong_64:
      return implementable<Pingpong64>(n_out, k, group, m);
    case CutlassSchedule::pingpong_64x16:
      return implementable<Pingpong64x16>(n_out, k, group, m);
  }
  return false;
}

int64_t int4_cutlass_element_position(int64_t n_out, int64_t k, int64_t row, int64_t j) {
  if (!int4_cutlass_shape_ok(n_out, k, 64) || row < 0 || row >= n_out || j < 0 || j >= k) return -1;
  return reordered_layout(n_out, k)(static_cast<int>(row), static_cast<int>(j), 0);
}

bool w4a16_cutlass_supported() {
  static std::once_flag once;
  static bool supported = false;
  std::call_once(once, [] {
    int device = 0, major = 0, minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return;
    if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return;
    const char* disabled = std::getenv("NIBBLE_DISABLE_CUTLASS");
    supported = major == 9 && minor == 0 &&
                (disabled == nullptr || *disabled == '\0' || std::strcmp(disabled, "0") == 0);
  });
  return supported;
}

Status int4_cutlass_from_groups(const uint8_t* quants, const uint16_t* scales, const uint8_t* zeros,
                                int64_t n_out, int64_t k, int64_t group, void* out,
                                Int4CutlassWeights* weights, cudaStream_t stream) {
  // out's 256-byte alignment: the reorder's atomicOr faults (and takes the context with it) on a
  // misaligned word. int4_cutlass_shape_ok stays as strict as it is: CUTLASS's TMA descriptors were
  // checked valid for every shape it accepts, and a failed encode is silent under NDEBUG.
  if (!quants || !scales || !zeros || !out || !weights || !int4_cutlass_shape_ok(n_out, k, group) ||
      reinterpret_cast<uintptr_t>(out) % 256 != 0)
    return Status::invalid_argument;
  // An error left by earlier work is not this call's: report it as such before launching.
  if (cudaPeekAtLastError() != cudaSuccess) return launch_status();
  const int64_t groups = k / group;
  auto* base = static_cast<uint8_t*>(out);
  const size_t quant_bytes = static_cast<size_t>(n_out * k / 2);
  const size_t pair_bytes = align256(static_cast<size_t>(n_out * groups) * sizeof(__half));
  auto* quants_out = reinterpret_cast<uint32_t*>(base);
  auto* scales_out = reinterpret_cast<__half*>(base + align256(quant_bytes));
  auto* offsets_out = reinterpret_cast<__half*>(base + align256(quant_bytes) + pair_bytes);

  if (const cudaError_t set = cudaMemsetAsync(quants_out, 0, quant_bytes, stream); set != cudaSuccess)
    return launch_status(set);
  constexpr int kThreads = 256;
  const int64_t eights = n_out * k / 8;
  reorder_quants_kernel<<<static_cast<unsigned>((eights + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      quants, n_out, k, reordered_layout(n_out, k), quants_out);
  if (launch_status() != Status::ok) return Status::device_error;
  const int64_t pairs = n_out * groups;
  transpose_scales_kernel<<<static_cast<unsigned>((pairs + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      scales, zeros, n_out, groups, scales_out, offsets_out);
  if (launch_status() != Status::ok) return Status::device_error;

  weights->quants = base;
  weights->scales = scales_out;
  weights->offsets = offsets_out;
  weights->n_out = n_out;
  weights->k = k;
  weights->group = group;
  return Status::ok;
}

Status w4a16_gemm_int4_cutlass(const __half* x, const Int4CutlassWeights& weights, int64_t m, float* y,
                               cudaStream_t stream, CutlassSchedule schedule) {
  if (!w4a16_cutlass_supported()) return Status::unsupported_type;
  if (!x || !y || !weights.quants || !weights.scales || !weights.offsets || m < 1 ||
      m >= (int64_t{1} << 31) || !int4_cutlass_shape_ok(weights.n_out, weights.k, weights.group))
    return Status::invalid_argument;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!aligned(x) || !aligned(y) || !aligned(weights.quants) || !aligned(weights.scales) ||
      !aligned(weights.offsets))
    return Status::invalid_argument;
  switch (schedule) {
    case CutlassSchedule::cooperative_128:
      return run_gemm<Cooperative128>(x, weights, m, y, stream);
    case CutlassSchedule::pingpong_64:
      return run_gemm<Pingpong64>(x, weights, m, y, stream);
    case CutlassSchedule::pingpong_64x16:
      return run_gemm<Pingpong64x16>(x, weights, m, y, stream);
  }
  return Status::invalid_argument;
}

#else  // !NIBBLE_HAVE_CUTLASS

bool w4a16_cutlass_built() { return false; }
bool w4a16_gemm_int4_cutlass_implementable(int64_t, int64_t, int64_t, int64_t, CutlassSchedule) {
  return false;
}
int64_t int4_cutlass_element_position(int64_t, int64_t, int64_t, int64_t) { return -1; }
bool w4a16_cutlass_supported() { return false; }

Status int4_cutlass_from_groups(const uint8_t*, const uint16_t*, const uint8_t*, int64_t, int64_t, int64_t,
                                void*, Int4CutlassWeights*, cudaStream_t) {
  return Status::unsupported_type;
}

Status w4a16_gemm_int4_cutlass(const __half*, const Int4CutlassWeights&, int64_t, float*, cudaStream_t,
                               CutlassSchedule) {
  return Status::unsupported_type;
}

#endif  // NIBBLE_HAVE_CUTLASS

}  // namespace nibble::kernels::cuda
