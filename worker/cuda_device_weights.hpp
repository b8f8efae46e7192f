// The CUDA model's weights on the device, shared by its sources (worker/cuda_llama_model.cpp,
// worker/cuda_kernel_choice.cpp; not an interface for other code): owned device and pinned memory, how
// each matrix is stored (DeviceKind) and its upload from a checkpoint or generation on the device
// (dummy checkpoints), and the error checks that turn CUDA, kernel and cuBLAS failures into exceptions.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <utility>
#include <vector>

#include "kernels/cuda/w4a16_gemm_cutlass.cuh"
#include "kernels/cuda/w4a16_tuning.cuh"
#include "kernels/status.hpp"
#include "model/llama_checkpoint.hpp"
#include "worker/cuda_llama_model.hpp"
#include "worker/weight_shard.hpp"

namespace nibble::worker {

namespace kc = kernels::cuda;

// Each throws std::runtime_error naming `what` (and the runtime's error, where one is pending) on failure.
void cuda_check(cudaError_t err, const char* what);
void check_status(kernels::Status status, const char* what);
void cublas_check(cublasStatus_t status, const char* what);
// Makes `device` current; CudaUnavailable where there is none, or it is older than Hopper.
void require_device(int device);

// One owned device allocation; reserve() grows it (contents lost).
class DeviceMemory {
 public:
  DeviceMemory() = default;
  explicit DeviceMemory(size_t bytes) { reserve(bytes); }
  ~DeviceMemory() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  // True when the allocation moved.
  bool reserve(size_t bytes) {
    if (bytes <= bytes_ && ptr_ != nullptr) return false;
    if (ptr_ != nullptr) cuda_check(cudaFree(ptr_), "cudaFree");
    ptr_ = nullptr;
    bytes_ = 0;
    cuda_check(cudaMalloc(&ptr_, bytes == 0 ? 1 : bytes), "cudaMalloc");
    bytes_ = bytes;
    return true;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory, reserve() as DeviceMemory's: the small per-pass copies (metadata up, the
// error flag and ids down) go straight to and from it, where pageable memory would make the driver
// stage each one through a buffer of its own and wait for it.
class PinnedMemory {
 public:
  PinnedMemory() = default;
  ~PinnedMemory() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
  }
  PinnedMemory(const PinnedMemory&) = delete;
  PinnedMemory& operator=(const PinnedMemory&) = delete;

  void reserve(size_t bytes) {
    if (bytes <= bytes_ && ptr_ != nullptr) return;
    if (ptr_ != nullptr) cuda_check(cudaFreeHost(ptr_), "cudaFreeHost");
    ptr_ = nullptr;
    bytes_ = 0;
    cuda_check(cudaMallocHost(&ptr_, bytes == 0 ? 1 : bytes), "cudaMallocHost");
    bytes_ = bytes;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

std::shared_ptr<DeviceMemory> upload(const void* host, size_t bytes);

// How a matrix is stored on the device, read by the W4A16 kernels where its weights are 4-bit:
//   q4_0         GGUF Q4_0 blocks as in the file
//   q4_k         GGUF Q4_K super-blocks as in the file (k a multiple of 256)
//   q6_k         GGUF Q6_K super-blocks repacked into planes (kernels/q6_k_planes.hpp; k a multiple of
//                256): a Q4_K_M file's 6-bit matrices, 6.56 bits a weight where fp16 for cuBLAS took 16
//   q8_0         GGUF Q8_0 blocks as in the file, for 8-bit weights (Q8_0 models, and the heads
//                `nibble quantize` keeps at Q8_0): 8.5 bits a weight
//   int4_groups  group-wise INT4 (kernels/int4_groups.hpp) recovered exactly from Q8_0 blocks of
//                asymmetric GPTQ / AWQ, or from Q4_0 blocks that share scales over 64 or 128 inputs
//                (symmetric GPTQ): 4.125 bits a weight at group 128; and from any Q4_0 (group 32,
//                zeros 8: 4.75 bits) with CudaModelOptions::q4_0_as_int4_groups
//   gguf_blocks  the other GGUF types as in the file (Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q5_K,
//                IQ4_XS, and the read-only i-quants, TQ1_0 / TQ2_0 and MXFP4: kernels/cuda/w4a16_gemv.cuh's
//                w4a16_gemv_gguf_blocks), so a Q5_K_M, Q3_K_M, IQ4_XS or IQ2_XS file takes its own bits on
//                the device, not fp16's 16; gguf_type says which
//   f16          fp16 rows for everything else (F32, F16, BF16; rows that are not whole blocks; and
//                act-order GPTQ matrices, whose grouped columns go back to input order on upload), cuBLAS
// Lookup tables (the embedding) are only ever q4_0, q8_0 or f16: what embedding_lookup_f16 reads.
enum class DeviceKind { q4_0, q4_k, q6_k, q8_0, int4_groups, gguf_blocks, f16 };

// q4_0_min_group: the narrowest group at which Q4_0 matrices go up as int4_groups (32: all of them).
DeviceKind device_kind(const model::WeightMatrix& w, int64_t q4_0_min_group, bool lookup = false);
// Whether a and b can be one device matrix: the same kind and, as gguf_blocks, the same type.
bool same_device_storage(const model::WeightMatrix& a, const model::WeightMatrix& b, int64_t q4_0_min_group);

struct DeviceMatrix {
  DeviceKind kind = DeviceKind::f16;
  kernels::DType gguf_type = kernels::DType::F16;  // gguf_blocks: the blocks' type
  std::shared_ptr<DeviceMemory> mem;
  int64_t n_out = 0, k = 0;
  // int4_groups: inputs per group, and where the scales ([n_out, k / group] fp16) and zeros
  // ([n_out, k / group] bytes) follow the nibbles ([n_out, k / 2] bytes) in mem.
  int64_t group = 0;
  size_t scales_offset = 0, zeros_offset = 0;
  // int4_groups: the kernel chosen for its shape per row range (CudaModelOptions::int4_kernels).
  kc::Int4Kernel int4_kernel[kc::kInt4RowRanges] = {kc::kInt4DefaultKernels[0], kc::kInt4DefaultKernels[1],
                                                    kc::kInt4DefaultKernels[2], kc::kInt4DefaultKernels[3],
                                                    kc::kInt4DefaultKernels[4]};
  // int4_groups and q4_k: tiles: mem holds the chunks of Int4Layout::tiles (kernels/int4_tiles.hpp)
  // instead of the rows or blocks (the offsets above are then unused); cutlass (int4_groups only):
  // mem is null, the CUTLASS copy below is the matrix.
  kc::Int4Layout layout = kc::Int4Layout::rows;
  // int4_groups: the half2 GEMV's block shape where it runs, and its fused epilogue's (the faster of
  // that one and the default, choose_one_row_fusions): indices into kc::kHalf2GemvVariants.
  int half2_variant = 0;
  int half2_fused_variant = 0;
  // q4_k: one activation row on the Q4_K tensor-core GEMV or the half2 GEMV rather than the CUDA-core one.
  bool q4_k_tensor_cores_one_row = false;
  bool q4_k_half2_one_row = false;
  // q6_k: one activation row on the Q6_K half2 GEMV rather than the CUDA-core one.
  bool q6_k_half2_one_row = false;
  // int4_groups, q4_k and q6_k: at one row its product and the step after it run apart, not fused: under
  // Int4Kernels::measured unless the fused kernel timed faster at load (choose_one_row_fusions).
  bool fusion_off = false;
  // int4_groups, q4_k and q6_k: the half2 GEMV (and its epilogues) take a row of k on this device (set at
  // load).
  bool half2_fits = false;
  // int4_groups under CudaModelOptions::cutlass_gemm or Int4Layout::cutlass: the same weights in
  // CUTLASS's order, for the CUTLASS GEMM (cutlass.quants null: no copy).
  std::shared_ptr<DeviceMemory> cutlass_mem;
  kc::Int4CutlassWeights cutlass;
  int64_t bytes() const {
    return (mem != nullptr ? static_cast<int64_t>(mem->bytes()) : 0) +
           (cutlass_mem != nullptr ? static_cast<int64_t>(cutlass_mem->bytes()) : 0);
  }
};

Int4Layout worker_layout(kc::Int4Layout layout);

// An int4_groups matrix's operands as the INT4 kernels take them: on rows its three arrays; on tiles
// the chunks alone; on cutlass none (the kernels read the CUTLASS copy).
kc::Int4GroupsMatrix int4_operands(const DeviceMatrix& w);

// Enqueues the tiled copy of a row-major int4_groups matrix (kernels/int4_tiles.hpp) on `stream`.
std::shared_ptr<DeviceMemory> int4_tiles_of(const DeviceMatrix& w, cudaStream_t stream);

// Enqueues the CUTLASS copy of a row-major int4_groups matrix on `stream`; `weights` points into it.
std::shared_ptr<DeviceMemory> int4_cutlass_copy_of(const DeviceMatrix& w, kc::Int4CutlassWeights& weights,
                                                   cudaStream_t stream);

// Q4_0 blocks on the device as group-wise INT4 at `group`, converted there (kernels/cuda/int4_groups:
// the nibbles move unchanged, a group's scale is its first block's, every zero 8). Exact when every
// block of a group has one scale (always at group 32), which the device checks.
DeviceMatrix q4_0_to_int4_groups(const DeviceMatrix& q4, int64_t group, cudaStream_t stream);

// The rows of `parts` (same k and device kind) stacked into one device matrix; q4_0_min_group and
// lookup (for embedding_lookup_f16): see device_kind.
DeviceMatrix upload_matrix(std::initializer_list<const model::WeightMatrix*> parts, int64_t q4_0_min_group,
                           bool lookup = false);

std::shared_ptr<DeviceMemory> upload_floats(const std::vector<float>& v);

// A projection: one device matrix, or several (types that cannot be stacked) written one after the
// other into the output buffer.
struct Projection {
  std::vector<DeviceMatrix> parts;
  int64_t bytes() const {
    int64_t b = 0;
    for (const auto& p : parts) b += p.bytes();
    return b;
  }
};

Projection upload_projection(std::initializer_list<const model::WeightMatrix*> parts, int64_t q4_0_min_group);

// One part of a dummy checkpoint's stacked matrix: the whole tensor's rows and seed, and the rows of
// it this shard keeps.
struct DummyPart {
  int64_t n_out = 0;
  uint64_t seed = 0;
  ShardRange rows;
};

// A dummy checkpoint's matrix made on the device: the parts (row length k each) stacked as
// upload_matrix stacks them, each generated with the generator that LlamaCheckpoint::bind_weights
// uses on the host, so the weights equal the CPU model's bit for bit. cols: the input columns kept
// (whole blocks of 32). A whole part is generated in place; a sliced one whole in a temporary
// buffer, then its rows and columns copied out (the cost of sharding a dummy: every shard
// generates every whole matrix).
DeviceMatrix dummy_matrix(int64_t k, ShardRange cols, const std::vector<DummyPart>& parts,
                          cudaStream_t stream);

// A Q4_0 matrix made on the device (dummy weights) as group-wise INT4 at the widest group dividing
// its rows (128 for every Llama shape): 4.19 bits a weight instead of 4.5, as a GPTQ group-128
// checkpoint would be. Every block of a dummy matrix has the same scale (random_q4_0_scale), so the
// conversion is exact, and the device checks that it was.
DeviceMatrix to_int4_groups(const DeviceMatrix& q4, cudaStream_t stream);

// Layer `layer`'s matrices `which` stacked, each part cut to rows[i] and every part to cols.
DeviceMatrix dummy_layer_matrix(const model::LlamaCheckpoint& ckpt, int64_t layer,
                                std::initializer_list<std::pair<model::LayerMatrix, ShardRange>> which,
                                ShardRange cols, cudaStream_t stream);

struct Layer {
  std::shared_ptr<DeviceMemory> attn_norm, ffn_norm;  // [n_embd] float
  Projection qkv;                                     // [q_dim + 2 kv_dim, n_embd], stacked or three parts
  DeviceMatrix wo;
  Projection gate_up;  // [2 n_ff, n_embd], stacked or two parts
  DeviceMatrix down;
};

}  // namespace nibble::worker
