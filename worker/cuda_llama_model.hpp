#pragma once
// Llama forward pass on one CUDA GPU over a ForwardBatch, with the semantics of LlamaModel::forward
// (multi-sequence batches, positions, block tables, logits for the chosen rows only), and its KV
// cache in device memory. This header needs no CUDA headers; the implementation
// (cuda_llama_model.cpp) is built only with NIBBLE_CUDA into nibble_worker_cuda. Without CUDA that
// library holds cuda_llama_model_stub.cpp instead, whose constructors throw CudaUnavailable, so
// callers need no #ifdef.
//
// Data flow per layer (all on one stream; kernels in kernels/cuda):
//   residual (fp32) --add_rms_norm_f32--> h (fp16) --[wq|wk|wv]--> qkv (fp32)
//   --rope_kv_write--> q (fp16), K/V rows (fp16) into the paged cache (a quantized cache's fp16 working
//   copy, kernels/cuda/kv_cache_quant.cuh: its blocks dequantized before, the new rows quantized after)
//   --attention_decode (decode/verify batches, head_dim 64/128) or paged_attention_f16 (else)--> (fp16)
//   --wo--> (fp32) --add_rms_norm_f32 (residual += it)--> (fp16) --[w_gate|w_up]--> (fp32)
//   --swiglu_f32_to_f16--> (fp16) --w_down--> (fp32), added to the residual by the next norm.
// The residual stream stays fp32 as on the CPU; matrix inputs are fp16 (the CPU quantizes them to
// Q8_0 for Q4_0/Q8_0 weights instead), matrix outputs fp32. The last norm runs on every row and the
// head only on the logit rows.
//
// Weights are uploaded at construction. 4-bit matrices stay 4-bit: GGUF Q4_0 and Q4_K as stored,
// GPTQ / AWQ (and Q4_0, by default) as group-wise INT4 (the kinds are listed in
// cuda_device_weights.hpp: DeviceKind); a Q4_K_M file's Q6_K matrices stay Q6_K and 8-bit Q8_0 matrices stay
// Q8_0 (the CUDA-core GEMV up to 32 rows, dequantized in chunks for cuBLAS above). Q4_K takes the tensor-core
// kernels from 2 rows;
// group-wise INT4 takes, per matrix shape and row range (1, 2-16, 17-32, 33-64, more), the fastest of its
// kernels as timed on this device at load (CudaModelOptions::int4_kernels, kernels/cuda/w4a16_tuning.cuh), in
// rows or in tiles (CudaModelOptions::int4_layout). Every other type (F32, F16, BF16, Q5_K, ...) is
// dequantized on the host and stored as fp16, multiplied by
// cuBLAS (fp16 inputs, fp32 accumulation and output): fp16 costs at most 2^-11 relative per weight
// (F32), the same order as the fp16 activations, while re-quantizing to 4 bits would change the
// model. q/k/v and gate/up are concatenated into one matrix each when their device types agree. The
// embedding table is Q4_0, Q8_0 or fp16 (embedding_lookup_f16's output is fp16 of the exact value
// every way, so converting a table to fp16 at load changes nothing); a tied head shares it.
// Norm weights are fp32.
//
// A dummy checkpoint (model/llama_checkpoint.hpp, "dummy:<shape>") is never bound on the host (a
// 70B one would need ~40 GB there): its Q4_0 matrices are generated in place on the device by
// kernels::cuda::fill_random_q4_0 with the checkpoint's per-tensor seeds, q/k/v and gate/up stacked
// as above, and its norms on the host by the same rule, so that it is the CPU's dummy model exactly.
// Each block of a dummy matrix shares one scale, so its layer matrices and head convert exactly to
// group-wise INT4 at group 128 on the device (what a GPTQ group-128 70B model would hold).
//
// Tensor and pipeline parallelism have LlamaModel's semantics (see there): a TensorShard of size
// T > 1 holds one Megatron shard, cut by worker/weight_shard (the CPU's slicing, so both hold the
// same slices), and forward is a collective over the T shards; a LayerRange holds one pipeline
// stage (forward_stage). The partial sums after attn_output and ffn_down go through
// ShardReducer::sum, the vocabulary-parallel logits through gather_columns, at the same points
// as on the CPU. A reducer with device_pointers() (NCCL) gets device buffers: its sums and the
// logits gather enqueued on the model's stream where it can (ShardReducer::sum_on_stream,
// gather_columns_on_stream: no host wait, and CUDA graphs hold them), else after the stream has been
// synchronized; any other (MPI, an in-process test group) gets host copies: each reduction copies
// [tokens, n_embd] floats to the host and back, which costs a round trip per reduction (fine for
// correctness and for ranks that share a GPU; NCCL is the fast path). Unlike the CPU,
// the first stage keeps the whole embedding table on every shard (embedding_lookup_f16 gathers
// rows, it cannot zero the rows of other shards' tokens), which saves the embedding's all-reduce
// at the cost of n_vocab x n_embd weights per GPU (0.56 GB for Llama-3-70B in Q4_0).
// A dummy checkpoint shards too: each part is generated whole in a temporary device buffer and
// the shard's rows or columns copied out (every rank generates the whole matrices: T times the
// generation work, and one whole matrix of temporary device memory at a time).
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "model/llama_checkpoint.hpp"
#include "model/llama_config.hpp"
#include "model/lora_adapter.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"
#include "worker/sampler.hpp"
#include "worker/tensor_shard.hpp"

namespace nibble::worker {

// Thrown when the CUDA backend cannot be used: built without CUDA, or no usable device.
class CudaUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Empty when this build has CUDA and a device is usable, otherwise why not (for messages).
std::string cuda_unavailable_reason();
// The number of usable CUDA devices: 0 without CUDA or without a device.
int cuda_device_count();

// A device's free and total memory in bytes (cudaMemGetInfo; selects the device). Throws
// CudaUnavailable without a usable device.
struct CudaMemoryInfo {
  int64_t free = 0;
  int64_t total = 0;
};
CudaMemoryInfo cuda_memory_info(int device = 0);

// The paged KV cache in device memory: for every layer, K and V as [n_blocks, block_size, n_head_kv,
// head_dim] fp16 (the layout of worker::KvCache and of the CUDA attention kernels), or a side quantized
// as llama.cpp's --cache-type-k / -v (types: Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, IQ4_NL; worker::KvCache's
// bytes, [n_blocks, block_size, kv_dim / 32 blocks]) plus one layer's fp16 working copy of that side,
// which the attention kernels read (kernels/cuda/kv_cache_quant.cuh says how a pass fills it).
// Zero-filled at construction, on `device` (the model's CudaModelOptions::device). Throws
// CudaUnavailable without a usable device, std::invalid_argument for types the model's heads cannot
// take (KvCache::unsupported), std::runtime_error when allocation fails.
class CudaKvCache {
 public:
  CudaKvCache(const model::LlamaConfig& config, int64_t n_blocks, int64_t block_size = 16, int device = 0,
              KvCacheTypes types = {});
  ~CudaKvCache();
  CudaKvCache(const CudaKvCache&) = delete;
  CudaKvCache& operator=(const CudaKvCache&) = delete;

  int64_t n_blocks() const { return n_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t kv_dim() const { return kv_dim_; }
  int64_t n_layer() const { return n_layer_; }
  const KvCacheTypes& types() const { return types_; }
  // Device pointers to the fp16 K and V the attention kernels read for `layer`: the layer itself for an
  // F16 side, the working copy (one for every layer) for a quantized one.
  uint16_t* k(int64_t layer) const {
    return k_work_ != nullptr ? k_work_ : reinterpret_cast<uint16_t*>(k_data(layer));
  }
  uint16_t* v(int64_t layer) const {
    return v_work_ != nullptr ? v_work_ : reinterpret_cast<uint16_t*>(v_data(layer));
  }
  // Device pointers to one layer's K and V as stored: [n_blocks, block_size, k_row_bytes()] bytes.
  uint8_t* k_data(int64_t layer) const { return base_ + layer * layer_stride_; }
  uint8_t* v_data(int64_t layer) const { return base_ + layer * layer_stride_ + v_offset_; }
  int64_t k_row_bytes() const { return k_row_bytes_; }
  int64_t v_row_bytes() const { return v_row_bytes_; }
  // One layer's K (or V) copied to the host, for tests: as fp16 (an F16 side only; std::logic_error
  // otherwise), or as stored.
  std::vector<uint16_t> layer_to_host(int64_t layer, bool values) const;
  std::vector<uint8_t> layer_bytes_to_host(int64_t layer, bool values) const;
  // Device bytes per block, all layers, K and V, working copies included: what sizing from free device
  // memory divides by.
  static int64_t bytes_per_block(const model::LlamaConfig& config, int64_t block_size,
                                 KvCacheTypes types = {}) {
    const int64_t work_sides =
        (types.k != kernels::DType::F16 ? 1 : 0) + (types.v != kernels::DType::F16 ? 1 : 0);
    return KvCache::bytes_per_block(config, block_size, types) +
           work_sides * block_size * config.kv_dim() * static_cast<int64_t>(sizeof(uint16_t));
  }

 private:
  int64_t n_blocks_, block_size_, kv_dim_, n_layer_, k_row_bytes_, v_row_bytes_;
  int64_t v_offset_ = 0, layer_stride_ = 0;  // bytes: V after K in a layer's segment; one segment (K and V)
  KvCacheTypes types_;
  uint8_t* base_ = nullptr;
  uint16_t* k_work_ = nullptr;  // the working copies (quantized sides only)
  uint16_t* v_work_ = nullptr;
};

// How group-wise INT4 matrices (GPTQ / AWQ, dummy weights, Q4_0 whose scale repeats over 64 or more
// inputs) pick their kernels (kernels/cuda/w4a16_tuning.cuh), per range of activation rows:
//   measured:     the fastest on this device, timed per matrix shape on the model's weights at load
//                 (from 17 rows on, dequantizing chunks to fp16 for cuBLAS is a candidate too);
//   cuda_cores:   the CUDA-core GEMV up to 32 rows, the WMMA GEMM above;
//   tensor_cores: the tensor-core GEMV up to 16 rows, its two-tile shape up to 32, the 64-row
//                 tensor-core GEMM above.
//   half2:        one row on the half2 GEMV (kernels/cuda/w4a16_gemv_half2.cuh; where a row is longer
//                 than the device's shared memory holds, tensor_cores' choice), the rest as tensor_cores.
// GGUF Q4_K matrices (read as stored) follow the same words: cuda_cores the CUDA-core Q4_K GEMV and
// WMMA GEMM as before, tensor_cores the tensor-core kernels on Q4_K at every row count, half2 the Q4_K
// half2 GEMV for one row and the tensor cores above, measured the tensor-core kernels from 2 rows and,
// for one row, whichever GEMV its timing at load prefers (CudaQ4KChoice). cuda_cores and half2 read
// the rows (int4_layout rows) only. GGUF Q6_K matrices (in planes) take the half2 GEMV for one row under
// half2, the faster of it and the CUDA-core GEMV under measured, else the CUDA-core GEMV.
enum class Int4Kernels { measured, cuda_cores, tensor_cores, half2 };
inline const char* int4_kernels_name(Int4Kernels kernels) {
  return kernels == Int4Kernels::cuda_cores     ? "cuda_cores"
         : kernels == Int4Kernels::tensor_cores ? "tensor_cores"
         : kernels == Int4Kernels::half2        ? "half2"
                                                : "measured";
}

// How group-wise INT4 and GGUF Q4_K matrices lie in device memory. rows: as loaded
// (kernels/int4_groups.hpp's three row-major arrays; Q4_K blocks as in the file), which every
// kernel reads. tiles: repacked on the device at load into the tensor-core kernels' own chunks
// (kernels/int4_tiles.hpp, Marlin's idea: a block's pipeline stage is one contiguous 17-20 KB read
// instead of 128 lines a row apart), which the tensor-core kernels (and, for INT4, dequant + cuBLAS)
// read with the same bits as the rows; the CUDA-core GEMVs and the older GEMMs do not
// (Int4Kernels::cuda_cores is refused with tiles), so a tiled Q4_K matrix takes the tensor cores at
// every row count. cutlass: each group-wise INT4 matrix CUTLASS's Hopper GEMM takes (group 64 or 128,
// n_out a multiple of 128) is kept only in CUTLASS's order, and every product of it runs on that GEMM
// (wgmma: 16-row activation tiles up to 32 rows, 64- and 128-row ones above, timed at load under
// Int4Kernels::measured): one copy of the weights where CudaModelOptions::cutlass_gemm keeps two. The
// other matrices (Q4_0 at group 32, Q4_K, ...) stay as under rows. Needs what cutlass_gemm needs;
// refuses Int4Kernels::cuda_cores. measured: per group-wise INT4 matrix shape, the layout whose
// kernels decode fastest on this GPU, timed at load on the shape's first matrices (enough of them to
// stream from device memory) in rows, in tiles and, where the CUTLASS GEMM runs, in CUTLASS's order;
// rows stays unless another is kInt4MinGain faster (CudaInt4KernelChoice::layout_us says what each
// took); GGUF Q4_K stays as stored. Needs Int4Kernels::measured; refuses cutlass_gemm (it weighs
// the CUTLASS copy itself).
enum class Int4Layout { rows, tiles, cutlass, measured };
inline const char* int4_layout_name(Int4Layout layout) {
  switch (layout) {
    case Int4Layout::tiles:
      return "tiles";
    case Int4Layout::cutlass:
      return "cutlass";
    case Int4Layout::measured:
      return "measured";
    case Int4Layout::rows:
      break;
  }
  return "rows";
}

// The kernels one group-wise INT4 matrix shape uses, with the load-time times behind the choice.
struct CudaInt4KernelChoice {
  static constexpr int kKernels = 15;
  static constexpr const char* kernel_names[kKernels] = {
      "CUDA-core GEMV",  "tensor-core GEMV", "WMMA GEMM",     "mma GEMM",        "dequant + cuBLAS",
      "TC GEMV 512 thr", "TC GEMV 2 blk/SM", "staged GEMV",   "TC GEMV 32 rows", "TC GEMM 64 rows",
      "CUTLASS GEMM",    "CUTLASS GEMM 64",  "CUTLASS 64x16", "W4A8 GEMV",       "half2 GEMV"};
  // The row ranges 1, 2-16, 17-32, 33-64 and over 64 (their largest row counts; -1: any), and the
  // row counts each is timed at (0: none).
  static constexpr int kRanges = 5;
  static constexpr int64_t range_max_rows[kRanges] = {1, 16, 32, 64, -1};
  static constexpr int64_t range_timed_rows[kRanges][2] = {{1, 0}, {4, 16}, {32, 0}, {64, 0}, {256, 0}};
  int64_t n_out = 0, k = 0, group = 0;
  Int4Layout layout = Int4Layout::rows;   // how the matrices lie (only the kernels that read it timed)
  int64_t matrices = 0;                   // how many of the model's matrices have this shape
  int chosen[kRanges] = {0, 0, 0, 2, 2};  // per range, the kernel (an index into kernel_names)
  double us[kRanges][kKernels][2] = {};   // device microseconds per product by range, kernel and timed
                                          // row count; 0: not timed (a fixed choice, a kernel that does
                                          // not take that many rows, or one that failed to launch)
  std::string skipped;                    // candidates that failed to launch, and how
  // Under Int4Layout::measured, each layout's decode time at load: the geometric mean of its chosen
  // kernels' times at 1, 4 and 16 rows, in rows, tiles and CUTLASS's order (us; 0: not timed, e.g.
  // no CUTLASS GEMM on this GPU or for this shape); `layout` is the one taken.
  static constexpr int kLayouts = 3;
  static constexpr const char* layout_names[kLayouts] = {"rows", "tiles", "cutlass"};
  double layout_us[kLayouts] = {};
  // The half2 GEMV's block shape at one row (the kernel table's "half2 GEMV shapes"): under measured,
  // on the rows at group 128, each shape timed at load and the fastest kept (the same bits whichever);
  // otherwise the default, "8w b4" (8 warps a block, 4 units a lane in flight).
  static constexpr int kHalf2Variants = 9;
  std::string half2_variant = "8w b4";
  double half2_variant_us[kHalf2Variants] = {};  // by shape, in the kernel table's order; 0: not timed
};

// The one-row GEMV of one GGUF Q4_K matrix shape (more rows always take the Q4_K tensor-core
// kernels, unless pinned to the CUDA cores): under Int4Kernels::measured the faster of the tensor-core
// and half2 GEMVs when it is kInt4MinGain (5%) faster than the CUDA-core one on the model's weights at
// load. The same for a Q6_K shape (q6_k), which has no tensor-core kernel: the half2 GEMV where it is
// kInt4MinGain faster than the CUDA-core one (pinned: half2 takes it, the others the CUDA cores).
struct CudaQ4KChoice {
  int64_t n_out = 0, k = 0;
  bool q6_k = false;           // a Q6_K shape (tensor_cores_us stays 0)
  bool tiles = false;          // in Q4_K chunks (Int4Layout::tiles): the tensor cores at every row count
  int64_t matrices = 0;        // how many of the model's matrices have this shape
  double cuda_cores_us = 0.0;  // device us per one-row product; 0: not timed (a pinned choice)
  double tensor_cores_us = 0.0;
  double half2_us = 0.0;      // 0 also where the half2 GEMV refuses k (its activations in shared memory)
  bool tensor_cores = false;  // one row on the tensor-core GEMV
  bool half2 = false;         // one row on the half2 GEMV (w4a16_gemv_q4_k_half2; fp16 sub-block sums)
};

// Batch-1 decode's fused epilogues at one site of the layers and one matrix shape there, under
// Int4Kernels::measured with CudaModelOptions::fused_epilogues: the fused half2 kernel against the
// one-row kernel chosen for the shape (CudaInt4KernelChoice, CudaQ4KChoice) plus the kernel the fusion
// would save, both timed at load on the site's matrices; the faster runs. Fused, the site's matrices
// take the half2 GEMV at one row even where it alone was not the fastest product (the choices per
// shape above still say what was fastest alone); unfused, the plain product and the separate kernel
// run even where that product is the half2 GEMV.
struct CudaFusionChoice {
  static constexpr int kSites = 4;
  // RoPE + KV write after q / k / v (stacked), SwiGLU after gate / up (stacked), and, unsharded with
  // fused_norms, the residual add + RMSNorm after the attention output and down projections.
  static constexpr const char* site_names[kSites] = {"q/k/v + RoPE + KV write", "gate/up + SwiGLU",
                                                     "attention output + add + RMSNorm",
                                                     "down + add + RMSNorm"};
  int site = 0;  // an index into site_names
  int64_t n_out = 0, k = 0;
  bool q4_k = false;           // GGUF Q4_K as stored (neither: group-wise INT4)
  bool q6_k = false;           // GGUF Q6_K in planes
  int64_t matrices = 0;        // the model's matrices at this site with this shape
  std::string unfused_kernel;  // the one-row kernel chosen for the shape
  bool half2_alone = false;    // that kernel is the half2 GEMV (fusing then changes no bits)
  double unfused_us = 0.0;     // that kernel, then the kernel the fusion saves: device us a call
  double fused_us = 0.0;       // the fused half2 kernel; 0: it did not launch (unfused then)
  // The fused kernel's block shape: the faster of the default and (INT4 at group 128) the shape kept
  // for the plain product (CudaInt4KernelChoice::half2_variant), where the epilogue can run on it.
  std::string fused_shape = "8w b4";
  // fused_us > 0 and below unfused_us, by 5% (kInt4MinGain) where fusing moves the product to the half2
  // GEMV (other bits: timing noise must not change a model's output from one load to the next).
  bool fused = false;
};

// Where one forward pass's device time goes (CudaLlamaModel::profile_greedy): per section of the
// pass, the device milliseconds between a CUDA event recorded before its first kernel and one
// after its last, summed over the layers.
struct CudaStepProfile {
  // In pass order: "embedding", "norms", "qkv", "rope + KV write", "attention", "attention output",
  // "gate / up", "SwiGLU", "down", "head" (the output norm, row gather and head matmul; the argmax
  // after the pass, one small kernel, is in no section).
  std::vector<std::pair<std::string, double>> sections;
  double total_ms = 0.0;  // from the first section's start to the last one's end
  int64_t spans = 0;      // timed spans (about one per kernel)
};

struct CudaModelOptions {
  int device = 0;
  Int4Kernels int4_kernels = Int4Kernels::measured;
  Int4Layout int4_layout = Int4Layout::rows;
  // Q4_0 matrices (not the embedding table) go up as group-wise INT4 at group 32 with zeros of 8:
  // the same weights, bit for bit on the CUDA-core GEMV, at 4.75 bits a weight instead of 4.5, and
  // every INT4 kernel becomes a candidate (on an H200 the tensor-core GEMV took 31.6 us on 8192 x
  // 8192 at 16 rows where the Q4_0 GEMV took 320.8; the GEMMs and dequant + cuBLAS for prefill).
  // false: GGUF Q4_0 blocks as stored (the CUDA-core GEMV up to 32 rows, the WMMA GEMM above).
  bool q4_0_as_int4_groups = true;
  // A sequence's run of at most 64 / (n_head / n_head_kv) consecutive tokens (decode, speculative
  // verification) takes attention_decode when head_dim is 64 or 128, in a batch of such runs and in one
  // that also holds prompt chunks (those take the prefill kernel's tiles), so that a decode row's
  // attention does not depend on what else its batch holds; false sends every batch to the prefill
  // tiles or the general paged_attention_f16 (tests compare the two).
  bool decode_attention = true;
  // Positions one block of attention_decode takes (a positive multiple of 32): every sequence is cut
  // at this size whatever the batch, so that each query's sum runs in an order that does not depend on
  // the other sequences and a verification row equals the decode step it replaces bit for bit (greedy
  // speculation stays exact at any context length). Short
  // contexts run faster cut finer (more blocks at work), long ones coarser (fewer partials to combine);
  // `nibble bench-gpu`'s decode attention table times the sizes on the GPU at hand.
  int64_t decode_split_tokens = 256;
  // Prompt chunks' attention on the tensor cores (kernels::cuda::prefill_attention_mma_f16: 64 query
  // rows a block, FlashAttention-2's schedule) instead of prefill_attention_f16's CUDA cores, where the
  // head grouping is at most 64 and head_dim 64 or 128. The weights meet V in fp16 (not the CPU's
  // rounding, close to it). Off until a GPU run measures it (bench-gpu --model times a long prompt
  // both ways).
  bool mma_prefill_attention = false;
  // Replay batches of up to 64 tokens from CUDA graphs, captured the second time a batch shape
  // (tokens, logit rows, table width rounded up to a power of two, runs, the cache) is seen:
  // one-off shapes such as prompts run directly. Decode steps of a fixed batch shape then cost one
  // graph launch instead of ~10 launches per layer (the argmax or sampling after it). Graphs are
  // dropped when a buffer has to grow, and all at once when 128 are held. The results equal direct
  // launches (same kernels, same arguments). A model with a reducer keeps them where the reducer is
  // stream-ordered (ShardReducer::stream_ordered: NCCL, whose all-reduces and logits gather a graph
  // holds): the shards of a tensor group run the same batches, so each captures and replays the same
  // collectives at the same steps, as NCCL requires (what each wants of the logits, ids or logits,
  // is not part of the graph); a host reducer (MPI) synchronizes at every reduction, so its model
  // launches directly.
  bool graphs = false;
  // Launch the W4A16 matrix products, and the norm, RoPE + KV write, attention and SwiGLU kernels
  // between them, as programmatic dependent launches (Hopper's PDL, kernels/cuda/dependent_launch.cuh):
  // each may start while the kernel before it still runs (its launch and block scheduling overlap that
  // kernel's tail; a product's first weights are on their way before it waits for its input). The
  // same results; off until a GPU run shows what it saves (bench-gpu --model times both).
  bool programmatic_launch = false;
  // Also hold every group-wise INT4 matrix that CUTLASS's Hopper GEMM takes (group 64 or 128, n_out a
  // multiple of 128: GPTQ / AWQ checkpoints and dummy weights; not GGUF Q4_0, which is group 32, nor
  // Q4_K) in CUTLASS's order, and make its schedules (wgmma, kernels/cuda/w4a16_gemm_cutlass.cuh)
  // load-time candidates: 128-row activation tiles from 17 rows, 16-row ones up to 32, chosen where
  // they time faster; under Int4Kernels::tensor_cores they take every product of 17 rows or more. The
  // copy costs as much device memory again as those INT4 weights (~0.52 bytes a weight). Off until a
  // GPU run measures it; needs a build with CUTLASS and a compute 9.0 device, and int4_kernels
  // measured or tensor_cores (std::invalid_argument otherwise).
  bool cutlass_gemm = false;
  // One-row products of group-wise INT4 and GGUF Q4_K matrices (batch-1 decode; Q4_0 goes up as INT4
  // groups) on the W4A8 GEMVs (kernels/cuda/w4a8_gemv.cuh): the activations rounded to 8 bits per 32
  // inputs on the device,
  // as llama.cpp's CUDA backend and this project's CPU backend do, and multiplied on dp4a, about a
  // quarter of the instructions a weight of the fp16 CUDA-core GEMV. Not W4A16: logits move by the
  // activations' rounding (the CPU backend's order of magnitude), so it is asked for, never chosen by
  // timing; the other row counts keep int4_kernels' choice. Needs int4_layout rows
  // (std::invalid_argument otherwise).
  bool int8_activations = false;
  // Where a one-row product runs on the half2 GEMV (chosen at load, or Int4Kernels::half2), the step
  // after it runs in the GEMV's epilogue: the stacked q / k / v rows are rotated and written into q
  // and the KV cache (no rope_kv_write), the stacked gate / up rows become SwiGLU's fp16 row (no SwiGLU
  // kernel), and, unsharded, the attention output and down projections' last block adds their row into
  // the residual and norms it for the next product (no add_rms_norm_f32): four launches a layer fewer
  // in batch-1 decode, with the same bits (the tests compare). false: the separate kernels (bench-gpu
  // --model times both at batch 1). Under Int4Kernels::measured each site's fusion is timed at load
  // against the best plain product plus the separate kernel, and kept where faster (CudaFusionChoice);
  // only then, so a site not timed at load (this false then) never fuses later.
  bool fused_epilogues = true;
  // With fused_epilogues, the residual add + RMSNorm in the products before them too (false: those
  // as their own kernel, RoPE / KV write and SwiGLU still fused; bench-gpu --model times all three
  // ways at batch 1; under Int4Kernels::measured each norm site is weighed at load like the others).
  bool fused_norms = true;
  // llama.cpp's attention rotation for a quantized KV cache (worker::KvCache::rotation: Q and K after
  // RoPE, V before it is stored, by a Walsh-Hadamard transform per block of each head, the attention's
  // output rotated back), as LlamaModel::set_kv_cache_rotation; false is LLAMA_ATTN_ROT_DISABLE=1. An
  // fp16 cache is never rotated.
  bool kv_cache_rotation = true;
  // Decode and verification runs (those on attention_decode) read a quantized KV cache's blocks as
  // stored (attention_decode_quantized: each tile's blocks turned into fp16 in the kernel), where prompt
  // runs dequantize the blocks they attend over into the fp16 working copy first: the same bits, at the
  // quantized bytes' traffic instead of the copy's ~2.5x fp16's. false: the working copy for every run
  // (tests compare the two).
  bool kv_cache_decode_as_stored = true;
};

class CudaLlamaModel {
 public:
  // Opens a GGUF file, HF checkpoint directory or dummy spec (see LlamaModel::load) and uploads
  // its shard of its stage (see the constructor).
  static std::unique_ptr<CudaLlamaModel> load(const std::string& path, CudaModelOptions options = {},
                                              TensorShard shard = {}, ShardReducer* reducer = nullptr,
                                              LayerRange layers = {});
  // shard, reducer, layers: as for LlamaModel (the reducer is required when shard.size > 1, not
  // owned, must outlive the model; see the class comment for where its buffers live). At size 1 a
  // reducer is optional: given, it is a group of one that the pass's collectives go through as at
  // T > 1 (an NCCL group of one on the one GPU a test has: the sharded pass's stream order and graphs,
  // with the whole model's results). Throws
  // CudaUnavailable without a usable device, std::invalid_argument for a model the GPU path cannot
  // run (n_embd or n_ff not a multiple of 32, head_dim odd or above 256) or split that way,
  // std::runtime_error when a CUDA call fails (e.g. out of device memory).
  explicit CudaLlamaModel(std::shared_ptr<const model::LlamaCheckpoint> checkpoint,
                          CudaModelOptions options = {}, TensorShard shard = {},
                          ShardReducer* reducer = nullptr, LayerRange layers = {});
  ~CudaLlamaModel();
  CudaLlamaModel(const CudaLlamaModel&) = delete;
  CudaLlamaModel& operator=(const CudaLlamaModel&) = delete;

  // The whole model's hyperparameters (logits are always [*, config().n_vocab]).
  const model::LlamaConfig& config() const;
  // This shard's share (local n_head, n_head_kv, n_ff, n_layer): size the CudaKvCache from this.
  const model::LlamaConfig& shard_config() const;
  TensorShard shard() const;
  LayerRange layers() const;
  bool is_first_stage() const;
  bool is_last_stage() const;
  const model::LlamaCheckpoint& checkpoint() const;
  // Bytes of weights held in device memory.
  int64_t weight_bytes() const;
  // CUDA graphs captured and held now (CudaModelOptions::graphs), for tests.
  int64_t captured_graphs() const;
  // Switches CudaModelOptions::programmatic_launch for later passes (drops captured graphs).
  void set_programmatic_launch(bool on);
  // Switches CudaModelOptions::fused_epilogues / fused_norms for later passes (drops captured graphs).
  // Under Int4Kernels::measured only the sites timed faster at load fuse: switched on after a load
  // without them, these fuse nothing (the products stay as chosen; load with them to have them weighed).
  void set_fused_epilogues(bool on);
  void set_fused_norms(bool on);
  // The KV cache types this model's caches are made with where the model makes them (CudaForwardModel),
  // as LlamaModel::set_kv_cache_types; a CudaKvCache made directly takes its own. Throws
  // std::invalid_argument for types the model's heads cannot take (KvCache::unsupported, or a quantized
  // cache on more than kernels::cuda::kKvCacheQuantMaxKvDim K values a position).
  void set_kv_cache_types(const KvCacheTypes& types);
  const KvCacheTypes& kv_cache_types() const;
  // Switches CudaModelOptions::kv_cache_rotation for later passes (a plan's key holds it).
  void set_kv_cache_rotation(bool on);
  // LoRA adapters, as LlamaModel's: set_lora puts an adapter (scaled by user_scale as llama.cpp scales)
  // into `slot` (>= 1), which batches name in ForwardBatch::seq_adapters; remove_lora empties it;
  // set_default_lora names the adapter of batches without seq_adapters (0: none). The factors go up as
  // fp16 (worker::shard_lora's: this stage's layers, a tensor shard's cut); every product of a row that
  // names an adapter adds scale * B (A x) on kernels/cuda/lora before the product's all-reduce or logits
  // gather (a one-row step keeps the fused residual add + RMSNorm, the attention output's and down
  // projection's updates going onto the residual first, but not the RoPE or SwiGLU epilogues, which need
  // the updated outputs). std::invalid_argument for an adapter whose
  // shapes do not fit the whole model (check_lora_fits) or the kernels' limits.
  void set_lora(int32_t slot, const model::LoraAdapter& adapter, float user_scale = 1.0f);
  void remove_lora(int32_t slot);
  void set_default_lora(int32_t slot);
  bool has_lora(int32_t slot) const;
  // Switches CudaModelOptions::mma_prefill_attention for later passes.
  void set_mma_prefill_attention(bool on);
  // Whether the tensor-core prefill attention takes this model's (shard's) heads: head_dim 64 or 128
  // and at most 64 query heads a KV head. Elsewhere the option changes nothing.
  bool mma_prefill_attention_applies() const;
  // The options the model was made with, as switched since (set_programmatic_launch, ...).
  const CudaModelOptions& options() const;
  // Per group-wise INT4 matrix shape, the kernels it uses (CudaModelOptions::int4_kernels), in the
  // order the shapes first occur (q/k/v, attn_output, gate/up, down, head); empty without such matrices.
  const std::vector<CudaInt4KernelChoice>& int4_kernel_choices() const;
  // Per GGUF Q4_K matrix shape, its one-row GEMV, in the same order; empty without such matrices.
  const std::vector<CudaQ4KChoice>& q4_k_choices() const;
  // Per fusable site and matrix shape, whether batch-1 decode fuses there and the times at load behind
  // it (Int4Kernels::measured with fused_epilogues; empty otherwise, or where the half2 GEMV takes no
  // matrix at a site).
  const std::vector<CudaFusionChoice>& one_row_fusions() const;

  // As LlamaModel::forward: fills the cache at the batch's positions and resizes logits to
  // [batch.logit_rows.size(), n_vocab] (fp32, copied back). Blocks until the results are on the host.
  // Throws std::invalid_argument for tokens, positions, sequence rows, block ids or logit rows out of
  // range (checked on the host before anything runs), std::runtime_error when a CUDA call fails.
  void forward(const ForwardBatch& batch, CudaKvCache& cache, std::vector<float>& logits);
  // The same pass, but only the argmax of each logit row comes back (argmax_rows on the device, ties
  // to the lowest id as worker::Sampler at temperature 0): ids resized to [batch.logit_rows.size()].
  // Last stage only (throws std::logic_error elsewhere).
  void forward_greedy(const ForwardBatch& batch, CudaKvCache& cache, std::vector<int32_t>& ids);
  // forward_greedy once more with every section of the pass timed by CUDA events: run directly
  // (not from a captured graph, so the launch gaps a graph hides are in total_ms but in no section),
  // behind a 50 ms device_delay kernel that lets the host queue the whole pass first, so that the
  // host's launch speed does not show in the times. For benchmarks: the events cost a little device time
  // themselves.
  CudaStepProfile profile_greedy(const ForwardBatch& batch, CudaKvCache& cache, std::vector<int32_t>& ids);
  // The same on the last pipeline stage of several: hidden_in as in forward_stage (null on a first
  // stage, which is then the whole model).
  // Speculative verification of sampled drafts on the device: the pass's logits stay there,
  // distribution_rows turns each row into the request's dense distribution p, and
  // speculative_accept applies speculative::verify's rule with the given uniforms, so the draft's
  // rows go up (or, kept on a GPU by forward_draft_sample, are copied there) and only ids come back. seqs:
  // one per sequence of the batch in batch order, each with exactly k + 1 logit rows (its k drafts' positions
  // and the bonus one). accepted[s]: drafts accepted; tokens[s]: those drafts, then the drawn token.
  // Throws std::invalid_argument for a shape or settings mismatch, std::runtime_error for what the
  // device reports (a draft token outside the vocabulary, a target row with no mass).
  void forward_verify(const ForwardBatch& batch, CudaKvCache& cache, const std::vector<VerifySequence>& seqs,
                      std::vector<int32_t>& accepted, std::vector<std::vector<int32_t>>& tokens) {
    forward_stage_verify(batch, cache, nullptr, seqs, accepted, tokens);
  }
  // The same on any last stage: a later pipeline stage (hidden_in as in forward_stage) or a tensor
  // shard, whose vocabulary columns are gathered into whole rows on the device before the
  // distributions are made (every shard of the stage runs the pass and its gather; the one that
  // samples verifies). Throws std::logic_error on a stage that is not the last.
  void forward_stage_verify(const ForwardBatch& batch, CudaKvCache& cache, const float* hidden_in,
                            const std::vector<VerifySequence>& seqs, std::vector<int32_t>& accepted,
                            std::vector<std::vector<int32_t>>& tokens);
  void forward_stage_greedy(const ForwardBatch& batch, CudaKvCache& cache, const float* hidden_in,
                            std::vector<int32_t>& ids);
  // The same pass with every logit row sampled on the device (kernels/cuda/sampling.cuh's
  // apply_logit_adjustments, then sample_rows: worker::Sampler's logit bias and penalties, temperature,
  // top-k, top-p and min-p, one draw by inverse CDF with the row's uniform), so that only the ids come
  // back. params, uniforms: [batch.logit_rows.size()] (uniforms in [0, 1), e.g. each sequence's
  // Sampler::uniform()); histories: as ForwardModel::forward_stage_sample's (empty without logit
  // adjustments; each row's worker::logit_adjustments go up with the step). Last stage only. Throws
  // std::invalid_argument for a size mismatch, a uniform outside [0, 1) or adjustments without
  // histories.
  void forward_sample(const ForwardBatch& batch, CudaKvCache& cache,
                      const std::vector<SamplingParams>& params, const std::vector<double>& uniforms,
                      std::vector<int32_t>& ids, const TokenHistories& histories = {});
  // A store of `rows` rows of n_vocab floats on this model's device, for forward_draft_sample to keep
  // distributions in. Its memory comes from a pool of the model's and goes back there (not to
  // cudaFree, which would wait for the whole device) when the last handle goes; the pool outlives
  // the model while a handle does. Throws std::invalid_argument for rows < 1.
  std::shared_ptr<KeptRows> make_kept_rows(int64_t rows);
  // A draft's pass that keeps its distributions on the device: per logit row r, distribution_rows
  // makes q (speculative::dense_distribution's: the sampler's kept candidates renormalized, one-hot
  // on the argmax at temperature 0), sample_dense_rows draws ids[r] from it with uniforms[r]
  // (speculative::sample_dense's inverse CDF in id order; the uniform is unused at temperature 0),
  // and q goes to keep[r] (a store from this model's make_kept_rows; rows == nullptr: not kept).
  // Only ids come back. No logit bias or penalty; a whole, unsharded model. Throws
  // std::invalid_argument for a size mismatch, a bias or penalty, a uniform outside [0, 1), or a store this
  // model did not make or a row outside it; std::logic_error on a shard or stage.
  void forward_draft_sample(const ForwardBatch& batch, CudaKvCache& cache,
                            const std::vector<SamplingParams>& params, const std::vector<double>& uniforms,
                            const std::vector<KeptRowRef>& keep, std::vector<int32_t>& ids);
  // One pipeline stage's part of forward, as LlamaModel::forward_stage: hidden_in: host
  // [batch.tokens.size(), n_embd] from the previous stage, or null on the first stage. out: on the
  // last stage the logits as in forward, elsewhere resized to [batch.tokens.size(), n_embd] (host),
  // the hidden states for the next stage.
  void forward_stage(const ForwardBatch& batch, CudaKvCache& cache, const float* hidden_in,
                     std::vector<float>& out);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nibble::worker
