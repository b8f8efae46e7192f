// CudaLlamaModel's implementation state (internal to worker/cuda_llama_model.cpp, which runs passes,
// and worker/cuda_kernel_choice.cpp, which chooses layouts, kernels and fusions at load).
#pragma once

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cuda/lora.cuh"
#include "kernels/cuda/rope_kv_write.cuh"
#include "kernels/cuda/sampling.cuh"
#include "kernels/cuda/w4a16_dequant_cublas.cuh"
#include "kernels/cuda/w4a16_gemm.cuh"
#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/cuda/w4a16_gemv_half2.cuh"
#include "kernels/cuda/w4a16_gemv_mma.cuh"
#include "kernels/cuda/w4a16_tuning.cuh"
#include "kernels/cuda/w4a8_gemv.cuh"
#include "worker/cuda_device_weights.hpp"
#include "worker/cuda_llama_model.hpp"
#include "worker/forward_model.hpp"

namespace nibble::worker {

class KeptRowsPool;  // cuda_llama_model.cpp

// Batches up to this many tokens are replayed from captured graphs with CudaModelOptions::graphs.
constexpr int64_t kGraphMaxTokens = 64;
// Graphs held at most (all are dropped when one more is needed), and batch shapes remembered as
// seen once (a shape is captured when seen again): a long-running server meets many shapes.
constexpr size_t kMaxGraphs = 128;
constexpr size_t kMaxSeenShapes = 4096;
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
// The chunks of an INT4 matrix that dequant + cuBLAS dequantizes at a time (w4a16_dequant_cublas.cuh):
// 4096 rows of llama-70b's k = 8192, 1152 of k = 28672. Only models with group-wise INT4 matrices take it.
constexpr int64_t kDequantScratchBytes = int64_t{64} << 20;
// profile_greedy's head start for the host: a 70B pass queues ~2,000 kernels and events in well under
// this, and a step profile is a one-off.
constexpr int64_t kProfileHeadStartNs = 50'000'000;

// The sections of a pass that profile_greedy times (CudaStepProfile::sections, in this order).
enum class Section : int { embedding, norms, qkv, rope_kv, attention, attn_out, gate_up, swiglu, down, head };
inline constexpr const char* kSectionNames[] = {
    "embedding", "norms", "qkv", "rope + KV write", "attention", "attention output", "gate / up",
    "SwiGLU",    "down",  "head"};
constexpr int kSections = static_cast<int>(std::size(kSectionNames));

// CUDA events around the sections of one pass: each span is a (start, end) pair recorded on the
// stream; the events are kept for the next profile.
class StepTimer {
 public:
  StepTimer() = default;
  StepTimer(const StepTimer&) = delete;
  StepTimer& operator=(const StepTimer&) = delete;
  ~StepTimer() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }
  void clear() { spans_.clear(); }
  void begin(Section section, cudaStream_t stream) {
    spans_.push_back({section, event(2 * spans_.size()), event(2 * spans_.size() + 1)});
    cuda_check(cudaEventRecord(spans_.back().start, stream), "cudaEventRecord (profile)");
  }
  // Never throws (it runs in destructors); a failed record shows as a failed elapsed time in result(),
  // and its error is cleared so that the next kernel's launch does not report it as its own.
  void end(cudaStream_t stream) noexcept {
    if (cudaEventRecord(spans_.back().end, stream) != cudaSuccess) cudaGetLastError();
  }
  // After the stream has synchronized.
  CudaStepProfile result() const {
    CudaStepProfile out;
    double ms[kSections] = {};
    for (const Span& s : spans_) {
      float t = 0.0f;
      cuda_check(cudaEventElapsedTime(&t, s.start, s.end), "cudaEventElapsedTime (profile)");
      ms[static_cast<int>(s.section)] += t;
    }
    for (int i = 0; i < kSections; ++i) out.sections.emplace_back(kSectionNames[i], ms[i]);
    if (!spans_.empty()) {
      float t = 0.0f;
      cuda_check(cudaEventElapsedTime(&t, spans_.front().start, spans_.back().end), "cudaEventElapsedTime");
      out.total_ms = t;
    }
    out.spans = static_cast<int64_t>(spans_.size());
    return out;
  }

 private:
  struct Span {
    Section section;
    cudaEvent_t start, end;
  };
  cudaEvent_t event(size_t i) {
    while (events_.size() <= i) {
      cudaEvent_t e = nullptr;
      cuda_check(cudaEventCreate(&e), "cudaEventCreate (profile)");
      events_.push_back(e);
    }
    return events_[i];
  }
  std::vector<cudaEvent_t> events_;
  std::vector<Span> spans_;
};

struct CudaLlamaModel::Impl {
  std::shared_ptr<const model::LlamaCheckpoint> checkpoint;
  model::LlamaConfig config;        // the whole model's
  model::LlamaConfig shard_config;  // this shard's heads, ffn rows and stage layers
  CudaModelOptions options;
  KvCacheTypes kv_cache_types;  // what CudaForwardModel makes this model's caches with
  // LoRA adapters (CudaLlamaModel::set_lora): per slot - 1, this stage's factors on the device.
  struct DeviceLoraProduct {
    int64_t rank = 0, k = 0, n_out = 0;
    float scale = 1.0f;
    DeviceMemory a_t, b_t;  // [k, rank] and [rank, n_out] fp16
  };
  struct DeviceLora {
    std::vector<std::array<std::unique_ptr<DeviceLoraProduct>, 7>> layers;  // [stage layers][LayerMatrix]
    std::unique_ptr<DeviceLoraProduct> output;                              // the head (last stage)
  };
  std::vector<std::unique_ptr<DeviceLora>> loras;
  int32_t default_lora = 0;
  int64_t lora_max_rank = 0, lora_max_k = 0;  // over the loaded adapters' products
  int64_t lora_generation = 0;                // changes with every set / remove: part of a graph's key
  DeviceMemory lora_work;  // the updates' split partials (kernels::cuda::lora_workspace_bytes)
  // The kernels' slot tables (kernels::cuda::LoraSlots: one call for a layer's products that read one
  // input serves every adapter of a batch): per product site (stage layer * 7 + LayerMatrix, then the head)
  // and slot, each adapter's factor pointers, rank and scale; rebuilt by set_lora / remove_lora
  // (build_lora_tables).
  struct LoraSite {
    int64_t k = 0, n_out = 0, max_rank = 0;  // max_rank 0: no loaded adapter adapts this product
    uint64_t adapters = 0;  // bit a - 1: adapter a adapts it (all bits: one above slot 64 does)
  };
  std::vector<LoraSite> lora_sites;
  std::unique_ptr<DeviceMemory> lora_tables;  // [sites][slots] a_t pointers, then b_t pointers, ranks, scales
  size_t lora_table_slots = 0;
  // The sites and a new device table for `adapters` (per slot - 1, null where empty); nothing of the model
  // changes, so set_lora / remove_lora commit them only once they are built (a failed allocation or copy
  // leaves the tables in use, and the factors they point at, as they were).
  void build_lora_tables(const std::vector<const DeviceLora*>& adapters, std::vector<LoraSite>& sites,
                         std::unique_ptr<DeviceMemory>& table) const;
  kc::LoraSlots lora_slots(size_t site) const;
  TensorShard shard;
  ShardReducer* reducer = nullptr;  // null when unsharded (no collectives); see the constructor
  int64_t layer_begin = 0, layer_end = 0;
  ModelShard split;  // what this shard owns (the whole model when unsharded)
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;

  DeviceMatrix embedding;     // Q4_0 or fp16 rows, [n_vocab, n_embd] (whole on every shard); first stage only
  std::vector<Layer> layers;  // the stage's
  std::shared_ptr<DeviceMemory> output_norm;  // last stage only
  // [rope_dims / 2] floats: the config's RoPE frequency factors (Llama 3.1's), or null without them.
  std::shared_ptr<DeviceMemory> rope_freq_factors;
  // [local vocab, n_embd], last stage only; shares embedding's memory when unsharded, tied and
  // the kinds agree.
  DeviceMatrix head;

  // Activations, grown on demand. n: batch tokens.
  DeviceMemory meta;               // int32 metadata (see forward_impl)
  DeviceMemory h16;                // [n, n_embd] half: embedding rows, then each norm's output
  DeviceMemory resid;              // [n, n_embd] float: the residual stream
  DeviceMemory delta;              // [n, n_embd] float: wo and w_down outputs
  DeviceMemory qkv;                // [n, q_dim + 2 kv_dim] float
  DeviceMemory q16;                // [n, q_dim] half
  DeviceMemory att16;              // [n, q_dim] half
  DeviceMemory gate_up;            // [n, 2 n_ff] float
  DeviceMemory act16;              // [n, n_ff] half
  DeviceMemory picked16;           // [n_out, n_embd] half
  DeviceMemory logits;             // [n_out, n_vocab] float
  DeviceMemory local_logits;       // [n_out, local vocab] float, sharded heads only
  std::vector<float> host_reduce;  // host copies for a reducer without device_pointers()
  std::vector<float> host_gathered;
  DeviceMemory ids;        // [n_out] int32
  DeviceMemory workspace;  // attention_decode's partials
  // attention_decode's combine counters ([runs, n_head_kv] uint32) and matmul_add_norm's block counter
  // (one uint32): zero at rest.
  DeviceMemory attention_counters, norm_counter;
  DeviceMemory sample_params;      // [n_out] SamplingRowParams (forward_sample)
  DeviceMemory sample_uniforms;    // [n_out] double
  DeviceMemory sample_workspace;   // sample_rows' keys and sort storage
  DeviceMemory adjustment_buffer;  // the rows' logit adjustments and their offsets (forward_sample)
  // forward_verify: the target's distributions packed as the logits, then per sequence in k_max + 1
  // slots; the draft's in k_max; int32 tokens, counts and results; double uniforms.
  DeviceMemory verify_p_packed, verify_p, verify_q, verify_ints, verify_uniforms;
  std::shared_ptr<KeptRowsPool> kept_pool;  // make_kept_rows's stores (made on first use)
  DeviceMemory flag;                        // [1] int32: bad metadata seen on the device
  PinnedMemory meta_pinned;                 // meta_host's copy, uploaded from here
  PinnedMemory results_pinned;              // the flag's copy, then the ids ([1 + n_out] int32)
  DeviceMemory cublas_workspace;  // set as cuBLAS's workspace, so that graph capture allocates nothing
  DeviceMemory dequant_scratch;   // dequant + cuBLAS's chunks (choose_int4_kernels sizes it)
  kc::Int4CublasContext dequant_cublas;
  std::vector<int32_t> meta_host;
  // Captured passes by plan key (CudaModelOptions::graphs).
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, bool, int64_t, bool, int64_t, size_t, const void*,
                      uint16_t*, int64_t, bool, int64_t, int, int64_t, int64_t, int64_t, uint64_t>,
           cudaGraphExec_t>
      graphs;
  std::set<decltype(graphs)::key_type> seen_once;  // shapes run directly once, captured when seen again
  std::vector<CudaInt4KernelChoice> int4_choices;  // per int4_groups shape (choose_int4_kernels)
  // Under Int4Layout::measured, per int4_groups shape, the layout its matrices take and what each
  // layout's decode took (choose_int4_layouts).
  struct MeasuredLayout {
    int64_t n_out = 0, k = 0, group = 0;
    kc::Int4Layout layout = kc::Int4Layout::rows;
    double us[CudaInt4KernelChoice::kLayouts] = {};
  };
  std::vector<MeasuredLayout> measured_layouts;
  std::vector<CudaQ4KChoice> q4_k_choices;       // per q4_k shape (choose_q4_k_kernels)
  std::vector<CudaFusionChoice> fusion_choices;  // per fusable site and shape (choose_one_row_fusions)
  StepTimer* timer = nullptr;                    // set while profile_greedy runs its pass
  std::unique_ptr<StepTimer> step_timer;

  // A span of `section` around the enqueues of its scope when a profile is being taken.
  class Timed {
   public:
    Timed(const Impl& m, Section section) : m_(m) {
      if (m_.timer != nullptr) m_.timer->begin(section, m_.stream);
    }
    ~Timed() {
      if (m_.timer != nullptr) m_.timer->end(m_.stream);
    }
    Timed(const Timed&) = delete;
    Timed& operator=(const Timed&) = delete;

   private:
    const Impl& m_;
  };

  ~Impl() {
    clear_graphs();
    if (cublas != nullptr) cublasDestroy(cublas);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  void matmul(const DeviceMatrix& w, const __half* x, int64_t m, float* y) {
    const bool gemv = m <= kc::kW4A16GemvMaxM;
    const bool pdl = options.programmatic_launch;
    const auto* wd = w.mem != nullptr ? w.mem->as<uint8_t>() : nullptr;
    switch (w.kind) {
      case DeviceKind::q4_0:
        check_status(gemv ? kc::w4a16_gemv_q4_0(wd, w.n_out, w.k, x, m, y, stream, pdl)
                          : kc::w4a16_gemm_q4_0(wd, w.n_out, w.k, x, m, y, stream, pdl),
                     "W4A16 matmul (Q4_0)");
        return;
      case DeviceKind::q4_k: {
        // As stored. Pinned to the CUDA cores: the CUDA-core GEMV up to 32 rows, the WMMA GEMM above;
        // otherwise one row on the GEMV timed at load (CUDA cores, tensor cores or half2) and the
        // tensor-core kernels on Q4_K for more rows (every row under tensor_cores). Not timed at load: on an
        // H200 the CUDA-core Q4_K GEMV took 328 us at 16 rows on 8192 x 8192, ten times the group-wise
        // tensor-core GEMV.
        const Int4Kernels pin = options.int4_kernels;
        kernels::Status st;
        // Tiles: only the tensor-core kernels read Q4_K chunks.
        const bool tiles = w.layout == kc::Int4Layout::tiles;
        if (m == 1 && options.int8_activations) {  // 8-bit activations where asked (blocks as stored)
          check_status(kc::w4a8_gemv_q4_k(wd, w.n_out, w.k, x, m, y, stream, pdl), "W4A8 matmul (Q4_K)");
          return;
        }
        if (!tiles && m == 1 && w.q4_k_half2_one_row) {  // timed at load (measured), or pinned (half2)
          st = kc::w4a16_gemv_q4_k_half2(wd, w.n_out, w.k, x, m, y, stream, pdl);
        } else if (!tiles && (pin == Int4Kernels::cuda_cores || (m == 1 && !w.q4_k_tensor_cores_one_row))) {
          st = gemv ? kc::w4a16_gemv_q4_k(wd, w.n_out, w.k, x, m, y, stream, pdl)
                    : kc::w4a16_gemm_q4_k(wd, w.n_out, w.k, x, m, y, stream, pdl);
        } else {
          st = kc::w4a16_q4_k_tensor_cores(wd, tiles, w.n_out, w.k, x, m, y, stream, pdl);
        }
        check_status(st, "W4A16 matmul (Q4_K)");
        return;
      }
      // In planes (Q6_K) or as stored (Q8_0): the CUDA-core GEMV up to 32 rows (Q6_K's one row on the half2
      // GEMV where chosen at load); above, dequantized to fp16 in chunks for cuBLAS (what these types'
      // fp16 upload ran before; the WMMA GEMM is far below cuBLAS there).
      case DeviceKind::q6_k:
        check_status(
            m == 1 && w.q6_k_half2_one_row ? kc::w4a16_gemv_q6_k_half2(wd, w.n_out, w.k, x, m, y, stream, pdl)
            : gemv                         ? kc::w4a16_gemv_q6_k(wd, w.n_out, w.k, x, m, y, stream, pdl)
                   : kc::w4a16_q6_k_dequant_cublas(dequant_cublas, wd, w.n_out, w.k, x, m, y, stream),
            "W6A16 matmul (Q6_K)");
        return;
      case DeviceKind::q8_0:
        check_status(gemv ? kc::w4a16_gemv_q8_0(wd, w.n_out, w.k, x, m, y, stream, pdl)
                          : kc::w4a16_q8_0_dequant_cublas(dequant_cublas, wd, w.n_out, w.k, x, m, y, stream),
                     "W8A16 matmul (Q8_0)");
        return;
      case DeviceKind::gguf_blocks: {  // as stored: the CUDA-core GEMV up to 32 rows, dequant + cuBLAS above
        const kernels::Status st =
            gemv ? kc::w4a16_gemv_gguf_blocks(w.gguf_type, wd, w.n_out, w.k, x, m, y, stream, pdl)
                 : kc::w4a16_gguf_blocks_dequant_cublas(dequant_cublas, w.gguf_type, wd, w.n_out, w.k, x, m,
                                                        y, stream);
        if (st != kernels::Status::ok)  // the message built only on failure (graph capture runs here)
          check_status(st,
                       (std::string("matmul (") + kernels::type_name(w.gguf_type) + " as stored)").c_str());
        return;
      }
      case DeviceKind::int4_groups: {
        const bool rows = w.layout == kc::Int4Layout::rows;
        const auto* scales = rows ? reinterpret_cast<const __half*>(wd + w.scales_offset) : nullptr;
        const uint8_t* zeros = rows ? wd + w.zeros_offset : nullptr;
        const kc::Int4Kernel kernel = w.int4_kernel[kc::int4_row_range(m)];
        const kernels::Status st = kc::launch_int4_kernel(
            kernel, &dequant_cublas, wd, scales, zeros, w.group, w.n_out, w.k, x, m, y, stream, pdl, w.layout,
            w.cutlass.quants != nullptr ? &w.cutlass : nullptr, w.half2_variant);
        if (st != kernels::Status::ok) {  // the message built only on failure (graph capture runs here)
          check_status(st, (std::string("W4A16 matmul (INT4 groups, ") + kc::int4_kernel_name(kernel) +
                            " on " + kc::int4_layout_name(w.layout) + ", " + std::to_string(w.n_out) + " x " +
                            std::to_string(w.k) + ", " + std::to_string(m) + " rows)")
                               .c_str());
        }
        return;
      }
      case DeviceKind::f16:
        break;
    }
    // Column-major view: W row-major [n_out, k] is W^T column-major with ld k; x [m, k] row-major is
    // column-major [k, m]; y = W x^T column-major [n_out, m] is row-major [m, n_out].
    const float one = 1.0f, zero = 0.0f;
    cublas_check(
        cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(w.n_out), static_cast<int>(m),
                     static_cast<int>(w.k), &one, w.mem->as<__half>(), CUDA_R_16F, static_cast<int>(w.k), x,
                     CUDA_R_16F, static_cast<int>(w.k), &zero, y, CUDA_R_32F, static_cast<int>(w.n_out),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
  }

  // Whether one activation row times this projection runs on the half2 GEMV (its timing at load, or
  // Int4Kernels::half2) with its fused epilogues asked for: then it can end in the next step's work.
  bool fuses_one_row(const Projection& p) const {
    return p.parts.size() == 1 && fuses_one_row(p.parts.front());
  }
  bool fuses_one_row(const DeviceMatrix& w) const {
    // (A row the plain half2 GEMV takes can be too long for an epilogue's extra shared memory.)
    if (!options.fused_epilogues || w.fusion_off || !w.half2_fits) return false;
    if (w.kind == DeviceKind::int4_groups) {
      return w.layout == kc::Int4Layout::rows &&
             w.int4_kernel[kc::int4_row_range(1)] == kc::Int4Kernel::gemv_half2;
    }
    if (w.kind == DeviceKind::q6_k) return w.q6_k_half2_one_row;
    return w.kind == DeviceKind::q4_k && w.layout == kc::Int4Layout::rows && w.q4_k_half2_one_row &&
           !options.int8_activations;
  }
  // One token's product into y (the attention output or down projection), then the residual add and
  // RMSNorm with norm_weight into h, in one kernel (fuses_one_row, unsharded: no all-reduce between):
  // what matmul then add_rms_norm_f32 do. y, residual: [1, n_out] fp32; h: [1, n_out] fp16; counter:
  // one uint32, zero at rest.
  kernels::Status matmul_add_norm(const DeviceMatrix& w, const __half* x, const float* norm_weight, float* y,
                                  float* residual, __half* h, unsigned* counter) {
    const auto* wd = w.mem->as<uint8_t>();
    const kc::Int4GroupsMatrix op = int4_operands(w);  // the INT4 arrays (rows)
    const bool pdl = options.programmatic_launch;
    const float eps = shard_config.rms_eps;
    return w.kind == DeviceKind::q4_k
               ? kc::w4a16_gemv_q4_k_half2_add_norm(wd, w.n_out, w.k, x, y, residual, norm_weight, eps, h,
                                                    counter, stream, pdl)
           : w.kind == DeviceKind::q6_k
               ? kc::w4a16_gemv_q6_k_half2_add_norm(wd, w.n_out, w.k, x, y, residual, norm_weight, eps, h,
                                                    counter, stream, pdl)
               : kc::w4a16_gemv_int4_groups_half2_add_norm(
                     op.quants, op.scales, op.zeros, w.group, w.n_out, w.k, x, y, residual, norm_weight,
                     shard_config.rms_eps, h, counter, stream, pdl, w.half2_fused_variant);
  }
  // Whether the half2 GEMV takes one row of w, an INT4 (rows), Q4_K or Q6_K matrix: one launch on a zero row;
  // false where it refuses the row (longer than the device's shared memory holds).
  bool half2_takes(const DeviceMatrix& w) {
    DeviceMemory x(static_cast<size_t>(w.k) * sizeof(__half)),
        y(static_cast<size_t>(w.n_out) * sizeof(float));
    cuda_check(cudaMemsetAsync(x.as<void>(), 0, x.bytes(), stream), "cudaMemsetAsync (half2 probe)");
    const auto* wd = w.mem->as<uint8_t>();
    const kc::Int4GroupsMatrix op = int4_operands(w);  // the INT4 arrays (rows)
    const kernels::Status st =
        w.kind == DeviceKind::q4_k
            ? kc::w4a16_gemv_q4_k_half2(wd, w.n_out, w.k, x.as<__half>(), 1, y.as<float>(), stream)
        : w.kind == DeviceKind::q6_k
            ? kc::w4a16_gemv_q6_k_half2(wd, w.n_out, w.k, x.as<__half>(), 1, y.as<float>(), stream)
            : kc::w4a16_gemv_int4_groups_half2(op.quants, op.scales, op.zeros, w.group, w.n_out, w.k,
                                               x.as<__half>(), 1, y.as<float>(), stream);
    if (st == kernels::Status::invalid_argument) return false;
    check_status(st, "the half2 GEMV (probe at load)");
    cuda_check(cudaStreamSynchronize(stream), "the half2 GEMV (probe at load)");
    return true;
  }
  // One token's stacked q / k / v projection, RoPE and KV cache write in one kernel (fuses_one_row):
  // what project then rope_kv_write do.
  kernels::Status project_rope_kv(const DeviceMatrix& w, const __half* x, const kc::RopeKvWriteShape& s,
                                  const int32_t* pos, const int32_t* seq, const int32_t* tables,
                                  __half* q_out, __half* k_cache, __half* v_cache, int32_t* error_flag) {
    // The kernel takes its rows from the heads: they must be the matrix's.
    if (w.n_out != (s.n_head + 2 * s.n_head_kv) * s.head_dim) return kernels::Status::invalid_argument;
    const auto* wd = w.mem->as<uint8_t>();
    const kc::Int4GroupsMatrix op = int4_operands(w);  // the INT4 arrays (rows)
    const bool pdl = options.programmatic_launch;
    return w.kind == DeviceKind::q4_k
               ? kc::w4a16_gemv_q4_k_half2_rope_kv(wd, s, w.k, x, pos, seq, tables, q_out, k_cache, v_cache,
                                                   error_flag, stream, pdl)
           : w.kind == DeviceKind::q6_k
               ? kc::w4a16_gemv_q6_k_half2_rope_kv(wd, s, w.k, x, pos, seq, tables, q_out, k_cache, v_cache,
                                                   error_flag, stream, pdl)
               : kc::w4a16_gemv_int4_groups_half2_rope_kv(op.quants, op.scales, op.zeros, w.group, s, w.k, x,
                                                          pos, seq, tables, q_out, k_cache, v_cache,
                                                          error_flag, stream, pdl, w.half2_fused_variant);
  }
  // One token's stacked gate / up projection and SwiGLU in one kernel (fuses_one_row): act, [1, n_ff]
  // fp16, as project then swiglu_f32_to_f16 write it.
  kernels::Status project_swiglu(const DeviceMatrix& w, const __half* x, __half* act) {
    if (w.n_out % 2 != 0) return kernels::Status::invalid_argument;  // [gate | up], n_ff rows each
    const auto* wd = w.mem->as<uint8_t>();
    const kc::Int4GroupsMatrix op = int4_operands(w);  // the INT4 arrays (rows)
    const bool pdl = options.programmatic_launch;
    const int64_t n_ff = w.n_out / 2;
    return w.kind == DeviceKind::q4_k ? kc::w4a16_gemv_q4_k_half2_swiglu(wd, n_ff, w.k, x, act, stream, pdl)
           : w.kind == DeviceKind::q6_k
               ? kc::w4a16_gemv_q6_k_half2_swiglu(wd, n_ff, w.k, x, act, stream, pdl)
               : kc::w4a16_gemv_int4_groups_half2_swiglu(op.quants, op.scales, op.zeros, w.group, n_ff, w.k,
                                                         x, act, stream, pdl, w.half2_fused_variant);
  }

  // Runs the projection's parts: stacked, y is [m, total]; in parts, part i's [m, n_out_i] follows
  // part i-1's whole output.
  void project(const Projection& p, const __half* x, int64_t m, float* y) {
    for (const DeviceMatrix& part : p.parts) {
      matmul(part, x, m, y);
      y += m * part.n_out;
    }
  }

  bool first_stage() const { return layer_begin == 0; }
  bool last_stage() const { return layer_end == config.n_layer; }
  // Graphs need a pass without host synchronization: no reducer, or one whose collectives only
  // enqueue on the model's stream (NCCL).
  bool use_graphs(int64_t n) const {
    return options.graphs &&
           (reducer == nullptr || (reducer->device_pointers() && reducer->stream_ordered())) &&
           n <= kGraphMaxTokens;
  }
  // The all-reduce of data: [count] floats on the device (see the class comment).
  void reduce_sum(float* data, size_t count);
  // logits: [n_out, n_vocab] on the device from every shard's local_logits: [n_out, local vocab].
  void gather_logits(int64_t n_out);
  // A dummy checkpoint's weights, generated on the device (see dummy_matrix); norms on the host.
  void make_dummy_weights();
  // weights: the stage's layers, bound and not yet sliced.
  void upload_weights(model::LlamaWeights weights);
  // Sets every int4_groups matrix's kernels by options.int4_kernels (timing them when measured) and
  // records the choices per shape in int4_choices.
  // f(matrix) for every layer matrix in pass order (q/k/v parts, attn_output, gate/up parts, down),
  // then the head on the last stage.
  template <typename F>
  void for_each_matrix(F&& f) {
    for (Layer& l : layers) {
      for (DeviceMatrix& part : l.qkv.parts) f(part);
      f(l.wo);
      for (DeviceMatrix& part : l.gate_up.parts) f(part);
      f(l.down);
    }
    if (last_stage()) f(head);
  }
  void choose_int4_kernels();
  // Under Int4Layout::measured: per int4_groups shape, rows, tiles and (where CUTLASS runs) CUTLASS's
  // order timed on the shape's first matrices (temporary copies, freed before returning); records
  // measured_layouts, which target_layout reads. Before make_cutlass_copies and tile_int4_matrices.
  void choose_int4_layouts();
  // The layout matrix w is to take at load: the option's, or under measured its shape's (Q4_K and the
  // other kinds stay as they are).
  kc::Int4Layout target_layout(const DeviceMatrix& w) const;
  // The measured layout of w's shape (int4_groups under Int4Layout::measured), or null.
  const MeasuredLayout* measured_layout(const DeviceMatrix& w) const;
  // Under Int4Layout::tiles: every int4_groups and q4_k matrix repacked into chunks on the device, one
  // at a time (one matrix of extra device memory at the peak).
  void tile_int4_matrices();
  // Under options.cutlass_gemm, each int4_groups matrix's CUTLASS copy (before tiling: made from rows);
  // under Int4Layout::cutlass, each one CUTLASS takes becomes its copy alone (the rows freed, one matrix
  // at a time: one matrix of extra device memory at the peak).
  void make_cutlass_copies();
  // Per Q4_K and Q6_K matrix shape, the one-row GEMV (q4_k_tensor_cores_one_row, q4_k_half2_one_row,
  // q6_k_half2_one_row), timed on the
  // model's weights under Int4Kernels::measured; records q4_k_choices. Called by choose_int4_kernels.
  void choose_q4_k_kernels();
  void choose_q6_k_kernel(CudaQ4KChoice& choice, const std::vector<DeviceMatrix*>& list);  // one Q6_K shape
  // Under Int4Kernels::measured with fused_epilogues (not int8_activations): per fusable site of the
  // layers (CudaFusionChoice::site_names) and matrix shape there that the half2 GEMV takes, the fused
  // half2 kernel timed against the shape's chosen one-row kernel plus the kernel the fusion saves, on
  // the site's matrices and scratch buffers; the faster kept (the half2 GEMV at one row, or
  // fusion_off). Records fusion_choices. Called by choose_int4_kernels after the choices per shape.
  void choose_one_row_fusions();
  void validate(const ForwardBatch& batch, const CudaKvCache& cache) const;
  struct Plan;
  Plan plan_batch(const ForwardBatch& batch, const CudaKvCache& cache, std::vector<int32_t>& meta_out) const;
  // Tokens a prefill attention tile takes for this shard's heads (0: neither tiled kernel takes them;
  // the general paged kernel runs); mma: the tiles are the tensor-core kernel's
  // (CudaModelOptions::mma_prefill_attention, where it takes the heads).
  int64_t prefill_tile_tokens(bool& mma) const;
  // Grows every buffer the plan needs; true when one moved (captured graphs hold old addresses).
  // On failure every graph is dropped first.
  bool reserve_buffers(const Plan& p);
  bool grow_buffers(const Plan& p);
  // Enqueues the pass on the stream (or into a capture): reads the metadata already in `meta`.
  void enqueue(const Plan& p);
  // Replays the plan's graph, capturing it first when it is new.
  void launch_graph(const Plan& p);
  void clear_graphs();
  // The whole pass; ids_out: argmax ids come back instead of logits; on a stage that is not the
  // last, logits_out gets the hidden states.
  // sampling: per logit row, when the ids are to be sampled rather than the argmax.
  struct RowSampling {
    const std::vector<kc::SamplingRowParams>* params = nullptr;
    const std::vector<double>* uniforms = nullptr;
    // Logit bias and penalties (null: none): per row its worker::logit_adjustments in CSR form.
    const std::vector<LogitAdjustment>* adjustments = nullptr;  // [adjustment_offsets.back()]
    const std::vector<int32_t>* adjustment_offsets = nullptr;   // [rows + 1]
  };
  void forward_impl(const ForwardBatch& batch, CudaKvCache& cache, const float* hidden_in,
                    std::vector<float>* logits_out, std::vector<int32_t>* ids_out, RowSampling sampling);
};

}  // namespace nibble::worker
