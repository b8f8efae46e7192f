// CudaLlamaModel's choices at load (cuda_llama_model_impl.hpp): per INT4 matrix shape its layout
// (Int4Layout::measured) and its kernel per row range (Int4Kernels::measured: timed on the model's own
// weights), per Q4_K shape its one-row GEMV, and per fusable site of batch-1 decode whether the fused
// half2 kernel runs; the tiled and CUTLASS copies those choices call for.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/event_timer.cuh"
#include "kernels/cuda/int4_tiles.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/residual_norm.cuh"
#include "kernels/cuda/swiglu.cuh"
#include "kernels/int4_tiles.hpp"
#include "worker/cuda_llama_model_impl.hpp"

namespace nibble::worker {

namespace {

// Matrices grouped by shape (or site and shape), groups in order of first appearance, each with the
// record its choice fills in.
template <typename Record>
using MatrixGroups = std::vector<std::pair<Record, std::vector<DeviceMatrix*>>>;

// Puts w into the first group whose record and first matrix `same` says it goes with, else into a new
// group whose record is make(w).
template <typename Record, typename Same, typename Make>
void add_to_group(MatrixGroups<Record>& groups, DeviceMatrix& w, Same same, Make make) {
  for (auto& [record, list] : groups) {
    if (same(record, *list.front())) {
      list.push_back(&w);
      return;
    }
  }
  groups.push_back({make(w), {&w}});
}

// The median time of one call a matrix, the group's matrices in turn (enough of them that L2 holds
// few, as the kernels' timing per shape does), into us; false where a call failed: its status in st,
// the CUDA error behind it in err (the pending one, else the one its launcher kept) and the reason for
// the message at load in why (the launcher's library failure too: cuBLAS's or CUTLASS's status).
template <typename Call>
bool time_over(const std::vector<DeviceMatrix*>& list, cudaStream_t stream, Call&& call, double& us,
               kernels::Status& st, cudaError_t& err, std::string& why) {
  const int iterations = static_cast<int>(std::clamp<size_t>(list.size(), 8, 32));
  err = cudaSuccess;
  st = kernels::Status::ok;
  const bool timed = kc::median_call_us(
      stream, iterations, /*repetitions=*/3,
      [&](int i) {
        st = call(*list[static_cast<size_t>(i) % list.size()]);
        return st == kernels::Status::ok;
      },
      us, err);
  why.clear();
  if (timed) return true;
  if (err != cudaSuccess) {
    why = cudaGetErrorString(err);
  } else if (st == kernels::Status::device_error) {
    err = kc::last_launch_error();
    why = kc::last_launch_error_text();
  }
  if (why.empty()) why = kernels::status_name(st);
  return false;
}

}  // namespace

// CudaInt4KernelChoice mirrors the tuning's constants without CUDA headers.
static_assert(kc::kInt4RowRanges == CudaInt4KernelChoice::kRanges &&
              kc::kInt4Kernels == CudaInt4KernelChoice::kKernels);
static constexpr bool choice_mirrors_tuning() {
  for (int r = 0; r < kc::kInt4RowRanges; ++r) {
    if (CudaInt4KernelChoice{}.chosen[r] != static_cast<int>(kc::kInt4DefaultKernels[r])) return false;
    if (CudaInt4KernelChoice::range_max_rows[r] !=
        (kc::kInt4RangeMaxRows[r] == INT64_MAX ? -1 : kc::kInt4RangeMaxRows[r]))
      return false;
    for (int c = 0; c < 2; ++c)
      if (CudaInt4KernelChoice::range_timed_rows[r][c] != kc::kInt4RangeTimedRows[r][c]) return false;
  }
  return true;
}
static_assert(choice_mirrors_tuning());

void CudaLlamaModel::Impl::make_cutlass_copies() {
  // Int4Layout::cutlass, or measured (cutlass_gemm is refused with it): only the copy, matrix by matrix.
  const bool only = !options.cutlass_gemm;
  const auto takes = [&](const DeviceMatrix& w) {
    return w.kind == DeviceKind::int4_groups && w.layout == kc::Int4Layout::rows &&
           w.cutlass_mem == nullptr && kc::int4_cutlass_shape_ok(w.n_out, w.k, w.group) &&
           (options.cutlass_gemm || target_layout(w) == kc::Int4Layout::cutlass);
  };
  const auto copy = [&](DeviceMatrix& w) { w.cutlass_mem = int4_cutlass_copy_of(w, w.cutlass, stream); };
  if (only) {
    for_each_matrix([&](DeviceMatrix& w) {
      if (!takes(w)) return;  // e.g. Q4_0 at group 32: stays on the rows and their kernels
      copy(w);
      cuda_check(cudaStreamSynchronize(stream), "int4_cutlass_from_groups");  // before the rows are freed
      w.mem = nullptr;
      w.scales_offset = w.zeros_offset = 0;
      w.layout = kc::Int4Layout::cutlass;
    });
    return;
  }
  // All of them or none, with a message that says how much: the copies are as large as the weights.
  size_t needed = 0;
  for_each_matrix([&](const DeviceMatrix& w) {
    if (takes(w)) needed += kc::int4_cutlass_bytes(w.n_out, w.k, w.group);
  });
  size_t free_bytes = 0, total_bytes = 0;
  cuda_check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  if (needed > free_bytes) {
    const auto gib = [](size_t bytes) {
      char text[32];
      std::snprintf(text, sizeof text, "%.1f", static_cast<double>(bytes) / static_cast<double>(1 << 30));
      return std::string(text);
    };
    throw std::runtime_error("cutlass_gemm: the CUTLASS copies of the INT4 weights need " + gib(needed) +
                             " GiB of device memory and " + gib(free_bytes) +
                             " GiB are free; run without cutlass_gemm (or on a GPU with more memory)");
  }
  for_each_matrix([&](DeviceMatrix& w) {
    if (takes(w)) copy(w);
  });
  cuda_check(cudaStreamSynchronize(stream), "int4_cutlass_from_groups");  // before tiling frees the rows
}

kc::Int4Layout CudaLlamaModel::Impl::target_layout(const DeviceMatrix& w) const {
  switch (options.int4_layout) {
    case Int4Layout::rows:
      return kc::Int4Layout::rows;
    case Int4Layout::tiles:
      return kc::Int4Layout::tiles;
    case Int4Layout::cutlass:
      return kc::Int4Layout::cutlass;
    case Int4Layout::measured: {
      const MeasuredLayout* ml = measured_layout(w);
      return ml != nullptr ? ml->layout : kc::Int4Layout::rows;
    }
  }
  return kc::Int4Layout::rows;
}

const CudaLlamaModel::Impl::MeasuredLayout* CudaLlamaModel::Impl::measured_layout(
    const DeviceMatrix& w) const {
  if (w.kind != DeviceKind::int4_groups) return nullptr;
  for (const MeasuredLayout& ml : measured_layouts)
    if (ml.n_out == w.n_out && ml.k == w.k && ml.group == w.group) return &ml;
  return nullptr;
}

void CudaLlamaModel::Impl::choose_int4_layouts() {
  measured_layouts.clear();
  if (options.int4_layout != Int4Layout::measured) return;
  MatrixGroups<MeasuredLayout> shapes;  // the int4_groups matrices on rows by shape
  for_each_matrix([&](DeviceMatrix& w) {
    if (w.kind != DeviceKind::int4_groups || w.layout != kc::Int4Layout::rows) return;
    add_to_group(
        shapes, w,
        [&](const MeasuredLayout& ml, const DeviceMatrix&) {
          return ml.n_out == w.n_out && ml.k == w.k && ml.group == w.group;
        },
        [](const DeviceMatrix& first) {
          MeasuredLayout ml;
          ml.n_out = first.n_out;
          ml.k = first.k;
          ml.group = first.group;
          return ml;
        });
  });
  int l2_bytes = 0;
  cuda_check(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, options.device),
             "cudaDeviceGetAttribute");
  const bool cutlass_runs = kc::w4a16_cutlass_supported();
  for (auto& [ml, list] : shapes) {
    // The first matrices whose bytes pass 4x the L2 (all of them if fewer): the timed products rotate
    // among them, so the weights stream from device memory as in a forward pass.
    std::vector<const DeviceMatrix*> timed;
    int64_t timed_bytes = 0;
    for (const DeviceMatrix* w : list) {
      if (timed_bytes >= 4 * static_cast<int64_t>(l2_bytes)) break;
      timed.push_back(w);
      timed_bytes += w->bytes();
    }
    // A layout's decode time: the geometric mean of its chosen kernels' times at 1, 4 and 16 rows
    // (the range timings of kc::tune_int4_groups), 0 when one is missing.
    const auto decode_us = [&](std::vector<kc::Int4GroupsMatrix> matrices, kc::Int4Layout layout,
                               const std::vector<kc::Int4CutlassWeights>* cutlass) {
      kc::Int4GroupsTuning t;  // (tune_int4_groups starts from the layout's defaults)
      std::string error;
      const kernels::Status st =
          kc::tune_int4_groups(matrices, ml.group, ml.n_out, ml.k, nullptr, stream, t, error, layout, cutlass,
                               /*ranges=*/2);  // 1 and 2-16 rows
      if (st != kernels::Status::ok) {
        throw std::runtime_error("timing the INT4 layouts for a " + std::to_string(ml.n_out) + " x " +
                                 std::to_string(ml.k) + " matrix (" +
                                 int4_layout_name(worker_layout(layout)) +
                                 ") failed: " + (error.empty() ? kernels::status_name(st) : error));
      }
      const double one = t.us[0][static_cast<int>(t.chosen[0])][0];
      const double four = t.us[1][static_cast<int>(t.chosen[1])][0];
      const double sixteen = t.us[1][static_cast<int>(t.chosen[1])][1];
      return one > 0 && four > 0 && sixteen > 0 ? std::cbrt(one * four * sixteen) : 0.0;
    };
    std::vector<kc::Int4GroupsMatrix> rows;
    for (const DeviceMatrix* w : timed) rows.push_back(int4_operands(*w));
    ml.us[0] = decode_us(rows, kc::Int4Layout::rows, nullptr);
    {  // tiles: temporary chunks of the timed matrices
      std::vector<std::shared_ptr<DeviceMemory>> chunks;
      std::vector<kc::Int4GroupsMatrix> tiles;
      for (const DeviceMatrix* w : timed) {
        chunks.push_back(int4_tiles_of(*w, stream));
        tiles.push_back({chunks.back()->as<uint8_t>(), nullptr, nullptr});
      }
      ml.us[1] = decode_us(tiles, kc::Int4Layout::tiles, nullptr);  // synchronizes the stream
    }
    if (cutlass_runs && kc::int4_cutlass_shape_ok(ml.n_out, ml.k, ml.group)) {  // CUTLASS's order alone
      std::vector<std::shared_ptr<DeviceMemory>> copies;
      std::vector<kc::Int4CutlassWeights> cutlass(timed.size());
      for (size_t i = 0; i < timed.size(); ++i)
        copies.push_back(int4_cutlass_copy_of(*timed[i], cutlass[i], stream));
      const std::vector<kc::Int4GroupsMatrix> none(timed.size(),
                                                   kc::Int4GroupsMatrix{nullptr, nullptr, nullptr});
      ml.us[2] = decode_us(none, kc::Int4Layout::cutlass, &cutlass);
    }
    // Rows unless another layout is kInt4MinGain faster than the best so far (as the kernel choice
    // keeps its defaults), so that timing noise does not move a model between layouts.
    double best = ml.us[0];
    constexpr kc::Int4Layout kOthers[2] = {kc::Int4Layout::tiles, kc::Int4Layout::cutlass};
    for (int i = 1; i < CudaInt4KernelChoice::kLayouts; ++i) {
      if (ml.us[i] > 0 && (best <= 0 || ml.us[i] < best * (1.0 - kc::kInt4MinGain))) {
        best = ml.us[i];
        ml.layout = kOthers[i - 1];
      }
    }
    measured_layouts.push_back(ml);
  }
}

void CudaLlamaModel::Impl::tile_int4_matrices() {
  for_each_matrix([&](DeviceMatrix& w) {
    if ((w.kind != DeviceKind::int4_groups && w.kind != DeviceKind::q4_k) ||
        w.layout != kc::Int4Layout::rows || target_layout(w) != kc::Int4Layout::tiles)
      return;
    const uint8_t* base = w.mem->as<uint8_t>();
    std::shared_ptr<DeviceMemory> tiled;
    if (w.kind == DeviceKind::q4_k) {
      tiled = std::make_shared<DeviceMemory>(static_cast<size_t>(kernels::q4_k_tiles_bytes(w.n_out, w.k)));
      check_status(kc::q4_k_tiles_from_blocks(base, w.n_out, w.k, tiled->as<uint8_t>(), stream),
                   "q4_k_tiles_from_blocks");
    } else {
      tiled = int4_tiles_of(w, stream);
    }
    cuda_check(cudaStreamSynchronize(stream), "repacking into tiles");  // before the rows are freed
    w.mem = std::move(tiled);
    w.layout = kc::Int4Layout::tiles;
    w.scales_offset = w.zeros_offset = 0;
  });
}

void CudaLlamaModel::Impl::choose_int4_kernels() {
  MatrixGroups<CudaInt4KernelChoice> shapes;  // the int4_groups matrices by shape, layout and copies
  for_each_matrix([&](DeviceMatrix& w) {
    if (w.kind != DeviceKind::int4_groups) return;
    add_to_group(
        shapes, w,
        [&](const CudaInt4KernelChoice& choice, const DeviceMatrix& first) {
          return choice.n_out == w.n_out && choice.k == w.k && choice.group == w.group &&
                 first.layout == w.layout &&
                 (first.cutlass.quants != nullptr) == (w.cutlass.quants != nullptr);
        },
        [&](const DeviceMatrix& first) {
          CudaInt4KernelChoice choice;
          choice.n_out = first.n_out;
          choice.k = first.k;
          choice.group = first.group;
          choice.layout = worker_layout(first.layout);
          if (const MeasuredLayout* ml = measured_layout(first))
            std::copy(ml->us, ml->us + CudaInt4KernelChoice::kLayouts, choice.layout_us);
          return choice;
        });
  });
  int4_choices.clear();
  // dequant + cuBLAS's scratch (INT4 shapes, and the Q6_K, Q8_0 and other GGUF matrices' many-row products):
  // a chunk of the largest matrix, at most kDequantScratchBytes.
  int64_t largest = 0;
  for (const auto& [choice, list] : shapes) largest = std::max(largest, choice.n_out * choice.k);
  for_each_matrix([&](const DeviceMatrix& w) {
    if (w.kind == DeviceKind::q6_k || w.kind == DeviceKind::q8_0 || w.kind == DeviceKind::gguf_blocks)
      largest = std::max(largest, w.n_out * w.k);
  });
  dequant_cublas = {};
  if (largest > 0) {
    dequant_scratch.reserve(static_cast<size_t>(std::min(largest * 2, kDequantScratchBytes)));
    dequant_cublas = {cublas, dequant_scratch.as<__half>(),
                      static_cast<int64_t>(dequant_scratch.bytes() / 2)};
  }
  for (auto& [choice, list] : shapes) {
    choice.matrices = static_cast<int64_t>(list.size());
    const kc::Int4Layout layout = list.front()->layout;
    kc::Int4GroupsTuning t;
    std::copy(kc::int4_default_kernels(layout), kc::int4_default_kernels(layout) + kc::kInt4RowRanges,
              t.chosen);
    if (options.int4_kernels == Int4Kernels::measured) {
      std::vector<kc::Int4GroupsMatrix> matrices;
      std::vector<kc::Int4CutlassWeights> cutlass;  // every matrix's copy, or none
      for (const DeviceMatrix* w : list) {
        if (w->cutlass.quants != nullptr) cutlass.push_back(w->cutlass);
        matrices.push_back(int4_operands(*w));
      }
      std::string error;
      const kernels::Status st =
          kc::tune_int4_groups(matrices, choice.group, choice.n_out, choice.k, &dequant_cublas, stream, t,
                               error, layout, cutlass.empty() ? nullptr : &cutlass);
      if (st != kernels::Status::ok) {
        throw std::runtime_error("timing the INT4 kernels for a " + std::to_string(choice.n_out) + " x " +
                                 std::to_string(choice.k) +
                                 " matrix failed: " + (error.empty() ? kernels::status_name(st) : error));
      }
      std::copy(&t.us[0][0][0], &t.us[0][0][0] + sizeof t.us / sizeof(double), &choice.us[0][0][0]);
      static_assert(CudaInt4KernelChoice::kHalf2Variants == kc::kHalf2GemvVariantCount);
      std::copy(t.half2_variant_us, t.half2_variant_us + kc::kHalf2GemvVariantCount, choice.half2_variant_us);
      choice.half2_variant = kc::half2_gemv_variant_name(kc::kHalf2GemvVariants[t.half2_variant]);
      choice.skipped = t.skipped;
      // Every range's default is timed at its row counts, so a chosen kernel without a time failed
      // (no candidate of the range ran): say so at load, not at the first pass.
      static constexpr const char* kRangeNames[kc::kInt4RowRanges] = {"1", "2-16", "17-32", "33-64",
                                                                      "over 64"};
      for (int r = 0; r < kc::kInt4RowRanges; ++r) {
        if (t.us[r][static_cast<int>(t.chosen[r])][0] <= 0.0) {
          throw std::runtime_error("INT4 " + std::to_string(choice.n_out) + " x " + std::to_string(choice.k) +
                                   " (" + kc::int4_layout_name(layout) + "): no kernel ran at load for " +
                                   kRangeNames[r] + " rows (" + kc::int4_kernel_name(t.chosen[r]) +
                                   " the default; " + t.skipped + ")");
        }
      }
    } else if ((options.int4_kernels == Int4Kernels::tensor_cores ||
                options.int4_kernels == Int4Kernels::half2) &&
               layout != kc::Int4Layout::cutlass) {
      t.chosen[0] = t.chosen[1] = kc::Int4Kernel::gemv_tensor_cores;
      if (options.int4_kernels == Int4Kernels::half2 && half2_takes(*list.front()))
        t.chosen[0] = kc::Int4Kernel::gemv_half2;
      t.chosen[2] = kc::Int4Kernel::gemv_tensor_cores_32rows;
      t.chosen[3] = t.chosen[4] = kc::Int4Kernel::gemm_tensor_cores_64rows;
      // With CUTLASS copies, Hopper's wgmma from 17 rows on: 64-row tiles up to 64 activation rows
      // (more tiles to stream the weights), 128-row tiles above.
      if (list.front()->cutlass.quants != nullptr) {
        t.chosen[2] = t.chosen[3] = kc::Int4Kernel::cutlass_gemm_pingpong;
        t.chosen[4] = kc::Int4Kernel::cutlass_gemm;
      }
    }  // cuda_cores: the rows' defaults (tiles and cutlass refuse cuda_cores at construction); tensor_cores
       // on cutlass: its defaults (every CUTLASS schedule is on the tensor cores)
    // 8-bit activations where asked: one row on the W4A8 GEMV (it reads the row-major layout).
    if (options.int8_activations && layout == kc::Int4Layout::rows) t.chosen[0] = kc::Int4Kernel::w4a8_gemv;
    for (int r = 0; r < kc::kInt4RowRanges; ++r) {
      choice.chosen[r] = static_cast<int>(t.chosen[r]);
      for (DeviceMatrix* w : list) w->int4_kernel[r] = t.chosen[r];
    }
    for (DeviceMatrix* w : list) w->half2_variant = t.half2_variant;
    int4_choices.push_back(choice);
  }
  choose_q4_k_kernels();
  choose_one_row_fusions();
}

void CudaLlamaModel::Impl::choose_q4_k_kernels() {
  MatrixGroups<CudaQ4KChoice> shapes;  // the q4_k and q6_k matrices by kind, shape and layout
  for_each_matrix([&](DeviceMatrix& w) {
    if (w.kind != DeviceKind::q4_k && w.kind != DeviceKind::q6_k) return;
    add_to_group(
        shapes, w,
        [&](const CudaQ4KChoice& choice, const DeviceMatrix& first) {
          return first.kind == w.kind && choice.n_out == w.n_out && choice.k == w.k &&
                 first.layout == w.layout;
        },
        [](const DeviceMatrix& first) {
          CudaQ4KChoice choice;
          choice.n_out = first.n_out;
          choice.k = first.k;
          choice.q6_k = first.kind == DeviceKind::q6_k;
          choice.tiles = first.layout == kc::Int4Layout::tiles;
          return choice;
        });
  });
  q4_k_choices.clear();
  for (auto& [choice, list] : shapes) {
    choice.matrices = static_cast<int64_t>(list.size());
    if (choice.q6_k) {
      choose_q6_k_kernel(choice, list);
      q4_k_choices.push_back(choice);
      continue;
    }
    choice.tensor_cores = options.int4_kernels == Int4Kernels::tensor_cores || choice.tiles;
    if (options.int4_kernels ==
        Int4Kernels::half2) {  // the tensor cores where the half2 GEMV refuses the row
      choice.half2 = half2_takes(*list.front());
      choice.tensor_cores = !choice.half2;
    }
    // int8_activations: one row runs on the W4A8 GEMV whatever this says: nothing to time.
    if (options.int4_kernels == Int4Kernels::measured && !choice.tiles && !options.int8_activations) {
      // One row on each GEMV, the shape's matrices in turn (enough of them and L2 holds few), the
      // tensor cores kept only when kInt4MinGain faster (as the INT4 choice keeps its default).
      DeviceMemory x(static_cast<size_t>(choice.k) * sizeof(__half)),
          y(static_cast<size_t>(choice.n_out) * sizeof(float));
      cuda_check(cudaMemsetAsync(x.as<void>(), 0x2C, x.bytes(), stream), "cudaMemsetAsync (Q4_K timing)");
      enum class OneRow { cuda_cores, tensor_cores, half2 };
      const auto time = [&](OneRow kernel, double& us) {
        kernels::Status st;
        cudaError_t err;
        std::string why;
        const auto one_row = [&](const DeviceMatrix& w) {
          const auto* wd = w.mem->as<uint8_t>();
          return kernel == OneRow::tensor_cores
                     ? kc::w4a16_gemv_q4_k_mma(wd, w.n_out, w.k, x.as<__half>(), 1, y.as<float>(), stream)
                 : kernel == OneRow::half2
                     ? kc::w4a16_gemv_q4_k_half2(wd, w.n_out, w.k, x.as<__half>(), 1, y.as<float>(), stream)
                     : kc::w4a16_gemv_q4_k(wd, w.n_out, w.k, x.as<__half>(), 1, y.as<float>(), stream);
        };
        if (!time_over(list, stream, one_row, us, st, err, why)) {
          throw std::runtime_error("timing the Q4_K kernels for a " + std::to_string(choice.n_out) + " x " +
                                   std::to_string(choice.k) + " matrix failed: " + why);
        }
      };
      time(OneRow::cuda_cores, choice.cuda_cores_us);
      time(OneRow::tensor_cores, choice.tensor_cores_us);
      // The half2 GEMV refuses rows longer than the device's shared memory holds: then not a candidate.
      if (half2_takes(*list.front())) time(OneRow::half2, choice.half2_us);
      // The faster of the other two, where it is kInt4MinGain faster than the CUDA cores.
      const bool half2_faster = choice.half2_us > 0.0 && choice.half2_us < choice.tensor_cores_us;
      const double other_us = half2_faster ? choice.half2_us : choice.tensor_cores_us;
      const bool other = other_us < (1.0 - kc::kInt4MinGain) * choice.cuda_cores_us;
      choice.tensor_cores = other && !half2_faster;
      choice.half2 = other && half2_faster;
    }
    for (DeviceMatrix* w : list) {
      w->q4_k_tensor_cores_one_row = choice.tensor_cores;
      w->q4_k_half2_one_row = choice.half2;
    }
    q4_k_choices.push_back(choice);
  }
}

void CudaLlamaModel::Impl::choose_q6_k_kernel(CudaQ4KChoice& choice, const std::vector<DeviceMatrix*>& list) {
  // The half2 GEMV refuses rows longer than the device's shared memory holds: then not a candidate.
  const bool half2_candidate =
      (options.int4_kernels == Int4Kernels::measured || options.int4_kernels == Int4Kernels::half2) &&
      half2_takes(*list.front());
  choice.half2 = half2_candidate && options.int4_kernels == Int4Kernels::half2;
  if (half2_candidate && options.int4_kernels == Int4Kernels::measured) {
    // One row on each GEMV, the shape's matrices in turn; the half2 GEMV kept only when kInt4MinGain
    // faster (as the INT4 choice keeps its default).
    DeviceMemory x(static_cast<size_t>(choice.k) * sizeof(__half)),
        y(static_cast<size_t>(choice.n_out) * sizeof(float));
    cuda_check(cudaMemsetAsync(x.as<void>(), 0x2C, x.bytes(), stream), "cudaMemsetAsync (Q6_K timing)");
    const auto time = [&](bool half2, double& us) {
      kernels::Status st;
      cudaError_t err;
      std::string why;
      const auto one_row = [&](const DeviceMatrix& w) {
        const auto* wd = w.mem->as<uint8_t>();
        return half2 ? kc::w4a16_gemv_q6_k_half2(wd, w.n_out, w.k, x.as<__half>(), 1, y.as<float>(), stream)
                     : kc::w4a16_gemv_q6_k(wd, w.n_out, w.k, x.as<__half>(), 1, y.as<float>(), stream);
      };
      if (!time_over(list, stream, one_row, us, st, err, why)) {
        throw std::runtime_error("timing the Q6_K kernels for a " + std::to_string(choice.n_out) + " x " +
                                 std::to_string(choice.k) + " matrix failed: " + why);
      }
    };
    time(false, choice.cuda_cores_us);
    time(true, choice.half2_us);
    choice.half2 = choice.half2_us < (1.0 - kc::kInt4MinGain) * choice.cuda_cores_us;
  }
  for (DeviceMatrix* w : list) w->q6_k_half2_one_row = choice.half2;
}

void CudaLlamaModel::Impl::choose_one_row_fusions() {
  fusion_choices.clear();
  // Under measured a site fuses only where it was timed faster here: a site not timed (the option off
  // at load, a norm site with fused_norms off) stays apart should the option be turned on later.
  const bool measured = options.int4_kernels == Int4Kernels::measured;
  for_each_matrix([&](DeviceMatrix& w) {
    w.fusion_off = measured;
    w.half2_fused_variant = 0;
    w.half2_fits =
        (w.kind == DeviceKind::int4_groups || w.kind == DeviceKind::q4_k || w.kind == DeviceKind::q6_k) &&
        kc::w4a16_gemv_half2_fits(w.k, w.kind == DeviceKind::q4_k);
  });
  if (options.int4_kernels != Int4Kernels::measured || !options.fused_epilogues || options.int8_activations)
    return;
  const auto& c = shard_config;  // local heads and ffn rows
  // The matrices per site and shape (sites: indices into CudaFusionChoice::site_names).
  enum Site { rope_kv = 0, swiglu = 1, attn_out_norm = 2, down_norm = 3 };
  MatrixGroups<CudaFusionChoice> groups;
  const auto add = [&](Site site, DeviceMatrix& w) {
    const bool q4_k = w.kind == DeviceKind::q4_k, q6_k = w.kind == DeviceKind::q6_k;
    if ((!q4_k && !q6_k && w.kind != DeviceKind::int4_groups) || w.layout != kc::Int4Layout::rows ||
        !kc::w4a16_gemv_half2_fits(w.k, q4_k))
      return;
    add_to_group(
        groups, w,
        [&](const CudaFusionChoice& choice, const DeviceMatrix& first) {
          return choice.site == site && first.kind == w.kind && first.n_out == w.n_out && first.k == w.k &&
                 first.group == w.group;
        },
        [&](const DeviceMatrix& first) {
          CudaFusionChoice choice;
          choice.site = site;
          choice.n_out = first.n_out;
          choice.k = first.k;
          choice.q4_k = q4_k;
          choice.q6_k = q6_k;
          return choice;
        });
  };
  // The norms fuse only unsharded (no all-reduce between the product and the add).
  const bool norms = reducer == nullptr && options.fused_norms;
  for (Layer& l : layers) {
    if (l.qkv.parts.size() == 1) add(rope_kv, l.qkv.parts.front());
    if (l.gate_up.parts.size() == 1) add(swiglu, l.gate_up.parts.front());
    if (norms) {
      add(attn_out_norm, l.wo);
      // A stage before the last hands its residual on without a norm after its last down projection.
      if (&l != &layers.back() || last_stage()) add(down_norm, l.down);
    }
  }
  if (groups.empty()) return;

  // Scratch: one activation row, the product's fp32 row and fp16 outputs, a residual, one 16-token block
  // of K and V, the token's position / sequence / table entry (all zero) and the flag, a counter.
  constexpr int64_t kBlock = 16;
  int64_t max_k = 0, max_out = 0;
  for (const auto& [choice, list] : groups) {
    max_k = std::max(max_k, choice.k);
    max_out = std::max(max_out, choice.n_out);
  }
  const int64_t q_dim = c.n_head * c.head_dim, kv_dim = c.n_head_kv * c.head_dim;
  DeviceMemory x16(static_cast<size_t>(max_k) * sizeof(__half)),
      y(static_cast<size_t>(max_out) * sizeof(float)), out16(static_cast<size_t>(max_out) * sizeof(__half)),
      residual(static_cast<size_t>(max_out) * sizeof(float)),
      k_block(static_cast<size_t>(kBlock * kv_dim) * sizeof(__half)),
      v_block(static_cast<size_t>(kBlock * kv_dim) * sizeof(__half)), ints(4 * sizeof(int32_t)),
      counter(sizeof(unsigned));
  cuda_check(cudaMemsetAsync(x16.as<void>(), 0x2C, x16.bytes(), stream), "cudaMemsetAsync (fusion timing)");
  for (DeviceMemory* zeroed : {&y, &residual, &ints, &counter})
    cuda_check(cudaMemsetAsync(zeroed->as<void>(), 0, zeroed->bytes(), stream),
               "cudaMemsetAsync (fusion timing)");
  const __half* xh = x16.as<__half>();
  auto* yf = y.as<float>();
  auto* oh = out16.as<__half>();
  const int32_t* zeros = ints.as<int32_t>();  // position 0 of sequence 0, whose table is block 0
  int32_t* error_flag = ints.as<int32_t>() + 3;
  const bool pdl = options.programmatic_launch;
  const Layer& first = layers.front();

  for (auto& [choice, list] : groups) {
    const DeviceMatrix& front = *list.front();
    choice.matrices = static_cast<int64_t>(list.size());
    const bool int4 = !choice.q4_k && !choice.q6_k;
    choice.unfused_kernel =
        choice.q4_k ? (front.q4_k_half2_one_row          ? "Q4_K half2 GEMV"
                       : front.q4_k_tensor_cores_one_row ? "Q4_K tensor-core GEMV"
                                                         : "Q4_K CUDA-core GEMV")
        : choice.q6_k
            ? (front.q6_k_half2_one_row ? "Q6_K half2 GEMV" : "Q6_K CUDA-core GEMV")
            : CudaInt4KernelChoice::kernel_names[static_cast<int>(front.int4_kernel[kc::int4_row_range(1)])];
    if (int4 && front.int4_kernel[kc::int4_row_range(1)] == kc::Int4Kernel::gemv_half2 &&
        front.half2_variant != 0)
      choice.unfused_kernel += " " + kc::half2_gemv_variant_name(kc::kHalf2GemvVariants[front.half2_variant]);
    kc::RopeKvWriteShape rs;
    rs.tokens = 1;
    rs.n_head = c.n_head;
    rs.n_head_kv = c.n_head_kv;
    rs.head_dim = c.head_dim;
    rs.rot_dims = c.rope_dims;
    rs.rope_base = c.rope_base;
    rs.q_stride = rs.kv_stride = choice.n_out;  // stacked [q | k | v]
    rs.block_size = kBlock;
    rs.num_blocks = 1;
    rs.max_blocks_per_seq = 1;
    const int64_t n_ff = choice.n_out / 2;
    const float* norm_weight =
        choice.site == attn_out_norm ? first.ffn_norm->as<float>() : first.attn_norm->as<float>();
    // The kernel the fusion saves, after the plain product into y.
    const auto separate = [&]() -> kernels::Status {
      switch (choice.site) {
        case rope_kv:
          return kc::rope_kv_write(rs, yf, yf + q_dim, yf + q_dim + kv_dim, zeros, zeros, zeros, oh,
                                   k_block.as<__half>(), v_block.as<__half>(), error_flag, stream, pdl);
        case swiglu:
          return kc::swiglu_f32_to_f16(yf, yf + n_ff, 2 * n_ff, oh, 1, n_ff, stream, pdl);
        default:
          return kc::add_rms_norm_f32(residual.as<float>(), yf, norm_weight, oh, 1, choice.n_out, c.rms_eps,
                                      stream, pdl);
      }
    };
    const auto fused = [&](const DeviceMatrix& w) -> kernels::Status {
      switch (choice.site) {
        case rope_kv:
          return project_rope_kv(w, xh, rs, zeros, zeros, zeros, oh, k_block.as<__half>(),
                                 v_block.as<__half>(), error_flag);
        case swiglu:
          return project_swiglu(w, xh, oh);
        default:
          return matmul_add_norm(w, xh, norm_weight, yf, residual.as<float>(), oh, counter.as<unsigned>());
      }
    };
    // The fused kernel on the default block shape and, for INT4, on the one kept for the plain product
    // where that differs (an epilogue's registers can change which is faster; the same bits).
    std::vector<int> fused_shapes = {0};
    if (int4) {
      const int kept =
          kc::half2_gemv_effective_shape(front.half2_variant, front.group, choice.site >= attn_out_norm);
      if (kept > 0) fused_shapes.push_back(kept);
    }
    // The median time of the plain product and the separate kernel (fuse false), or of the fused kernel
    // on block shape `shape`, into us; false where the fused kernel refuses the call (the site then
    // stays unfused). Anything else failing (the plain path, which the model runs anyway, a launch or
    // CUDA call) is an error at load.
    const auto time_path = [&](bool fuse, int shape, double& us) {
      for (DeviceMatrix* w : list) w->half2_fused_variant = shape;
      kernels::Status st;
      cudaError_t err;
      std::string why;
      const auto path = [&](const DeviceMatrix& w) {
        if (fuse) return fused(w);
        matmul(w, xh, 1, yf);  // the shape's chosen one-row kernel (throws if it fails)
        return separate();
      };
      if (time_over(list, stream, path, us, st, err, why)) return true;
      if (fuse && err == cudaSuccess && st == kernels::Status::invalid_argument) return false;
      throw std::runtime_error(
          std::string("timing the fused epilogue ") + CudaFusionChoice::site_names[choice.site] + " for a " +
          std::to_string(choice.n_out) + " x " + std::to_string(choice.k) + " matrix failed: " + why);
    };
    time_path(/*fuse=*/false, 0, choice.unfused_us);
    int fused_shape = 0;
    double default_us = 0.0;  // the fused kernel on the default shape
    for (const int shape : fused_shapes) {
      double us = 0.0;
      if (!time_path(/*fuse=*/true, shape, us)) continue;
      if (shape == 0) default_us = us;
      if (choice.fused_us == 0.0 || us < choice.fused_us) {
        choice.fused_us = us;
        fused_shape = shape;
      }
    }
    // The least of two noisy times is biased low against the one plain time: another shape than the
    // default, where it won, is timed once more, and kept only if still faster than the default (as
    // tune_int4_groups does with its kept block shape).
    if (fused_shape != 0) {
      double again = 0.0;
      if (!time_path(/*fuse=*/true, fused_shape, again)) again = 0.0;
      fused_shape = kc::half2_shape_after_retime(fused_shape, again, default_us);
      // The default where it lost its second look (0 where the default refused the call: unfused).
      choice.fused_us = fused_shape != 0 ? again : default_us;
    }
    // Fusing a product that runs on another kernel moves it to the half2 GEMV, whose bits differ: only
    // when kInt4MinGain faster, so that timing noise does not change a model's output from one load to
    // the next (as the kernels' choice per shape keeps its default). On the half2 GEMV already the bits
    // are the same either way.
    choice.half2_alone = choice.q4_k ? front.q4_k_half2_one_row
                         : choice.q6_k
                             ? front.q6_k_half2_one_row
                             : front.int4_kernel[kc::int4_row_range(1)] == kc::Int4Kernel::gemv_half2;
    choice.fused = choice.fused_us > 0.0 &&
                   choice.fused_us < (choice.half2_alone ? 1.0 : 1.0 - kc::kInt4MinGain) * choice.unfused_us;
    choice.fused_shape = kc::half2_gemv_variant_name(kc::kHalf2GemvVariants[fused_shape]);
    for (DeviceMatrix* w : list) {
      w->fusion_off = !choice.fused;
      w->half2_fused_variant = fused_shape;
      if (!choice.fused) continue;
      if (choice.q4_k) {
        w->q4_k_half2_one_row = true;
        w->q4_k_tensor_cores_one_row = false;
      } else if (choice.q6_k) {
        w->q6_k_half2_one_row = true;
      } else {
        w->int4_kernel[kc::int4_row_range(1)] = kc::Int4Kernel::gemv_half2;
      }
    }
    fusion_choices.push_back(choice);
  }
  cuda_check(cudaStreamSynchronize(stream), "fusion timing");
}

}  // namespace nibble::worker
