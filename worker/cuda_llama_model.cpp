#include "worker/cuda_llama_model.hpp"

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cuda/attention_decode.cuh"
#include "kernels/cuda/convert.cuh"
#include "kernels/cuda/device_delay.cuh"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/event_timer.cuh"
#include "kernels/cuda/int4_groups.cuh"
#include "kernels/cuda/int4_tiles.cuh"
#include "kernels/cuda/paged_attention.cuh"
#include "kernels/cuda/prefill_attention.cuh"
#include "kernels/cuda/random_weights.cuh"
#include "kernels/cuda/residual_norm.cuh"
#include "kernels/cuda/rope_kv_write.cuh"
#include "kernels/cuda/sampling.cuh"
#include "kernels/cuda/speculative_accept.cuh"
#include "kernels/cuda/swiglu.cuh"
#include "kernels/cuda/w4a16_gemm.cuh"
#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/cuda/w4a16_gemv_half2.cuh"
#include "kernels/cuda/w4a16_gemv_mma.cuh"
#include "kernels/cuda/w4a16_tuning.cuh"
#include "kernels/cuda/w4a8_gemv.cuh"
#include "kernels/int4_groups.hpp"
#include "kernels/int4_tiles.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"
#include "worker/forward_model.hpp"
#include "worker/weight_shard.hpp"

namespace nibble::worker {

namespace kc = kernels::cuda;

namespace {

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(err));
}

// Device sampling's workspace for rows of n_vocab logits, with the reason when the rows are too many.
size_t sampling_workspace_bytes(int64_t rows, int64_t n_vocab) {
  if (rows * n_vocab >= (int64_t{1} << 31)) {
    throw std::invalid_argument(std::to_string(rows) + " logit rows x " + std::to_string(n_vocab) +
                                " vocabulary entries exceed device sampling's 2^31 values a call");
  }
  size_t ws = 0;
  if (kc::sample_rows_workspace_bytes(rows, n_vocab, &ws) != kernels::Status::ok)
    throw std::invalid_argument("device sampling refuses " + std::to_string(rows) + " rows of " +
                                std::to_string(n_vocab) + " logits");
  return ws;
}

void check(kernels::Status status, const char* what) {
  if (status != kernels::Status::ok) {
    // A failed launch leaves its error in the runtime; name it when there is one.
    const cudaError_t err = cudaGetLastError();
    throw std::runtime_error(std::string("CUDA ") + what + " failed: " + kernels::status_name(status) +
                             (err != cudaSuccess ? std::string(" (") + cudaGetErrorString(err) + ")" : ""));
  }
}

void cublas_check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("cuBLAS ") + what + " failed with status " +
                             std::to_string(static_cast<int>(status)));
  }
}

void require_device(int device) {
  const std::string why = cuda_unavailable_reason();
  if (!why.empty()) throw CudaUnavailable(why);
  int count = 0;
  cuda_check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (device < 0 || device >= count) {
    throw CudaUnavailable("CUDA device " + std::to_string(device) + " does not exist (" +
                          std::to_string(count) + " found)");
  }
  cuda_check(cudaSetDevice(device), "cudaSetDevice");
  // The kernels are built for compute capability 9.0 (CMakeLists.txt): on an older GPU every launch
  // would fail with "no kernel image"; say why up front instead.
  int major = 0, minor = 0;
  cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
             "cudaDeviceGetAttribute");
  cuda_check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
             "cudaDeviceGetAttribute");
  if (major < 9) {
    throw CudaUnavailable("CUDA device " + std::to_string(device) + " has compute capability " +
                          std::to_string(major) + "." + std::to_string(minor) +
                          "; Nibble's CUDA kernels need 9.0 or newer (Hopper: H100 / H200)");
  }
}

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

// The device memory of the draft-distribution stores (CudaLlamaModel::make_kept_rows), shared with
// every store it handed out: a store's memory comes back here when its last handle goes, for the
// next store (cudaFree would wait for the whole device), and the pool lives as long as a store does.
class KeptRowsPool {
 public:
  explicit KeptRowsPool(int device) : device_(device) {}
  ~KeptRowsPool() {
    int current = 0;
    const bool switched =
        cudaGetDevice(&current) == cudaSuccess && current != device_ && cudaSetDevice(device_) == cudaSuccess;
    for (auto& [bytes, ptr] : free_) cudaFree(ptr);
    if (switched) cudaSetDevice(current);
  }
  KeptRowsPool(const KeptRowsPool&) = delete;
  KeptRowsPool& operator=(const KeptRowsPool&) = delete;

  // A block of `bytes` (a free one of that size, else a new one on the current device, which the
  // caller has set to device()). Callers round sizes to a few classes (CudaKeptRows: a power of two
  // of rows), so that freed blocks serve later stores and the pool stays a few blocks per class.
  float* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto it = free_.find(bytes);
      if (it != free_.end()) {
        float* p = it->second;
        free_.erase(it);
        return p;
      }
    }
    void* p = nullptr;
    cuda_check(cudaMalloc(&p, bytes), "cudaMalloc (kept draft distributions)");
    return static_cast<float*>(p);
  }
  void give(float* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace(bytes, p);
  }
  int device() const { return device_; }

 private:
  std::mutex mu_;
  std::multimap<size_t, float*> free_;
  int device_;
};

class CudaKeptRows final : public KeptRows {
 public:
  CudaKeptRows(std::shared_ptr<KeptRowsPool> pool, int64_t rows, int64_t row_size)
      : KeptRows(rows, row_size),
        pool_(std::move(pool)),
        bytes_(std::bit_ceil(static_cast<uint64_t>(rows)) * static_cast<size_t>(row_size) * sizeof(float)) {
    data_ = pool_->take(bytes_);
  }
  ~CudaKeptRows() override { pool_->give(data_, bytes_); }
  const float* device_data() const override { return data_; }
  float* data() const { return data_; }
  const KeptRowsPool* pool() const { return pool_.get(); }
  void copy_to_host(int64_t first, int64_t count, std::vector<float>& out) const override {
    if (first < 0 || count < 0 || first + count > rows())
      throw std::out_of_range("kept rows " + std::to_string(first) + " + " + std::to_string(count) + " of " +
                              std::to_string(rows()));
    out.resize(static_cast<size_t>(count * row_size()));
    // The rows were complete when forward_draft_sample returned (it waits for its stream).
    cuda_check(cudaMemcpy(out.data(), data_ + first * row_size(), out.size() * sizeof(float),
                          cudaMemcpyDeviceToHost),
               "cudaMemcpy (kept draft distributions)");
  }

 private:
  std::shared_ptr<KeptRowsPool> pool_;
  size_t bytes_;
  float* data_ = nullptr;
};

std::shared_ptr<DeviceMemory> upload(const void* host, size_t bytes) {
  auto mem = std::make_shared<DeviceMemory>(bytes);
  if (bytes > 0) cuda_check(cudaMemcpy(mem->as<void>(), host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  return mem;
}

// How a matrix is stored on the device, read by the W4A16 kernels where its weights are 4-bit:
//   q4_0         GGUF Q4_0 blocks as in the file
//   q4_k         GGUF Q4_K super-blocks as in the file (k a multiple of 256)
//   q6_k         GGUF Q6_K super-blocks as in the file (k a multiple of 256): a Q4_K_M file's 6-bit
//                matrices, 6.56 bits a weight where fp16 for cuBLAS took 16
//   q8_0         GGUF Q8_0 blocks as in the file, for 8-bit weights (Q8_0 models, and the heads
//                `nibble quantize` keeps at Q8_0): 8.5 bits a weight
//   int4_groups  group-wise INT4 (kernels/int4_groups.hpp) recovered exactly from Q8_0 blocks of
//                asymmetric GPTQ / AWQ, or from Q4_0 blocks that share scales over 64 or 128 inputs
//                (symmetric GPTQ): 4.125 bits a weight at group 128; and from any Q4_0 (group 32,
//                zeros 8: 4.75 bits) with CudaModelOptions::q4_0_as_int4_groups
//   f16          fp16 rows for everything else (F32, F16, BF16, Q5_K, ...; and act-order
//                GPTQ matrices, whose grouped columns go back to input order on upload), cuBLAS
// Lookup tables (the embedding) are only ever q4_0, q8_0 or f16: what embedding_lookup_f16 reads.
enum class DeviceKind { q4_0, q4_k, q6_k, q8_0, int4_groups, f16 };
// q4_0_min_group: the narrowest group at which Q4_0 matrices go up as int4_groups (32: all of them).
DeviceKind device_kind(const model::WeightMatrix& w, int64_t q4_0_min_group, bool lookup = false) {
  if (w.input_order != nullptr) return DeviceKind::f16;
  if (w.type == kernels::DType::Q4_0) {
    if (lookup) return DeviceKind::q4_0;
    return kernels::int4_group_size(w.type, w.data, w.n_out, w.k) >= q4_0_min_group ? DeviceKind::int4_groups
                                                                                    : DeviceKind::q4_0;
  }
  if (lookup) return w.type == kernels::DType::Q8_0 ? DeviceKind::q8_0 : DeviceKind::f16;
  if (w.type == kernels::DType::Q4_K && w.k % kernels::kQK_K == 0) return DeviceKind::q4_k;
  if (w.type == kernels::DType::Q6_K && w.k % kernels::kQK_K == 0) return DeviceKind::q6_k;
  if (w.type == kernels::DType::Q8_0) {
    return kernels::int4_group_size(w.type, w.data, w.n_out, w.k) > 0 ? DeviceKind::int4_groups
                                                                      : DeviceKind::q8_0;
  }
  return DeviceKind::f16;
}

struct DeviceMatrix {
  DeviceKind kind = DeviceKind::f16;
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
  // int4_groups and q4_k: at one row its fused epilogue timed slower at load than the plain product
  // and the separate kernel (choose_one_row_fusions): the two run apart.
  bool fusion_slower = false;
  // int4_groups under CudaModelOptions::cutlass_gemm or Int4Layout::cutlass: the same weights in
  // CUTLASS's order, for the CUTLASS GEMM (cutlass.quants null: no copy).
  std::shared_ptr<DeviceMemory> cutlass_mem;
  kc::Int4CutlassWeights cutlass;
  int64_t bytes() const {
    return (mem != nullptr ? static_cast<int64_t>(mem->bytes()) : 0) +
           (cutlass_mem != nullptr ? static_cast<int64_t>(cutlass_mem->bytes()) : 0);
  }
};

Int4Layout worker_layout(kc::Int4Layout layout) {
  switch (layout) {
    case kc::Int4Layout::rows:
      return Int4Layout::rows;
    case kc::Int4Layout::tiles:
      return Int4Layout::tiles;
    case kc::Int4Layout::cutlass:
      return Int4Layout::cutlass;
  }
  return Int4Layout::rows;
}

// An int4_groups matrix's operands as the INT4 kernels take them: on rows its three arrays; on tiles
// the chunks alone; on cutlass none (the kernels read the CUTLASS copy).
kc::Int4GroupsMatrix int4_operands(const DeviceMatrix& w) {
  const uint8_t* base = w.mem != nullptr ? w.mem->as<uint8_t>() : nullptr;
  if (w.layout != kc::Int4Layout::rows) return {base, nullptr, nullptr};
  return {base, reinterpret_cast<const __half*>(base + w.scales_offset), base + w.zeros_offset};
}

// Enqueues the tiled copy of a row-major int4_groups matrix (kernels/int4_tiles.hpp) on `stream`.
std::shared_ptr<DeviceMemory> int4_tiles_of(const DeviceMatrix& w, cudaStream_t stream) {
  const uint8_t* base = w.mem->as<uint8_t>();
  auto tiled =
      std::make_shared<DeviceMemory>(static_cast<size_t>(kernels::int4_tiles_bytes(w.n_out, w.k, w.group)));
  check(
      kc::int4_tiles_from_groups(base, reinterpret_cast<const uint16_t*>(base + w.scales_offset),
                                 base + w.zeros_offset, w.n_out, w.k, w.group, tiled->as<uint8_t>(), stream),
      "int4_tiles_from_groups");
  return tiled;
}

// Enqueues the CUTLASS copy of a row-major int4_groups matrix on `stream`; `weights` points into it.
std::shared_ptr<DeviceMemory> int4_cutlass_copy_of(const DeviceMatrix& w, kc::Int4CutlassWeights& weights,
                                                   cudaStream_t stream) {
  const uint8_t* base = w.mem->as<uint8_t>();
  auto copy = std::make_shared<DeviceMemory>(kc::int4_cutlass_bytes(w.n_out, w.k, w.group));
  check(kc::int4_cutlass_from_groups(base, reinterpret_cast<const uint16_t*>(base + w.scales_offset),
                                     base + w.zeros_offset, w.n_out, w.k, w.group, copy->as<uint8_t>(),
                                     &weights, stream),
        "int4_cutlass_from_groups");
  return copy;
}

// Q4_0 blocks on the device as group-wise INT4 at `group`, converted there (kernels/cuda/int4_groups:
// the nibbles move unchanged, a group's scale is its first block's, every zero 8). Exact when every
// block of a group has one scale (always at group 32), which the device checks.
DeviceMatrix q4_0_to_int4_groups(const DeviceMatrix& q4, int64_t group, cudaStream_t stream) {
  DeviceMatrix d;
  d.kind = DeviceKind::int4_groups;
  d.n_out = q4.n_out;
  d.k = q4.k;
  d.group = group;
  const auto groups = static_cast<size_t>(d.n_out * (d.k / d.group));
  d.scales_offset = (static_cast<size_t>(d.n_out * d.k / 2) + 15) / 16 * 16;
  d.zeros_offset = d.scales_offset + groups * sizeof(uint16_t);
  d.mem = std::make_shared<DeviceMemory>(d.zeros_offset + groups);
  DeviceMemory mismatch(sizeof(int32_t));
  cuda_check(cudaMemsetAsync(mismatch.as<int32_t>(), 0, sizeof(int32_t), stream), "cudaMemsetAsync");
  uint8_t* base = d.mem->as<uint8_t>();
  check(kc::int4_groups_from_q4_0(q4.mem->as<uint8_t>(), d.n_out, d.k, d.group, base,
                                  reinterpret_cast<uint16_t*>(base + d.scales_offset), base + d.zeros_offset,
                                  mismatch.as<int32_t>(), stream),
        "int4_groups_from_q4_0");
  int32_t host = 0;
  cuda_check(cudaMemcpyAsync(&host, mismatch.as<int32_t>(), sizeof host, cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync");
  cuda_check(cudaStreamSynchronize(stream), "int4_groups_from_q4_0");  // before q4 and mismatch are freed
  if (host != 0) throw std::logic_error("Q4_0 to INT4 groups: a group holds more than one scale");
  return d;
}

// The rows of `parts` (same k and device kind) stacked into one device matrix; q4_0_min_group and
// lookup (for embedding_lookup_f16): see device_kind.
DeviceMatrix upload_matrix(std::initializer_list<const model::WeightMatrix*> parts, int64_t q4_0_min_group,
                           bool lookup = false) {
  DeviceMatrix d;
  const model::WeightMatrix& first = **parts.begin();
  d.kind = device_kind(first, q4_0_min_group, lookup);
  d.k = first.k;
  for (const model::WeightMatrix* w : parts) {
    if (w->data == nullptr) throw std::invalid_argument("a weight matrix has no data to upload");
    if (w->k != d.k || device_kind(*w, q4_0_min_group, lookup) != d.kind)
      throw std::logic_error("upload_matrix: parts disagree");
    d.n_out += w->n_out;
  }
  std::vector<uint8_t> host;
  if (d.kind == DeviceKind::q4_0 || d.kind == DeviceKind::q4_k || d.kind == DeviceKind::q6_k ||
      d.kind == DeviceKind::q8_0) {
    for (const model::WeightMatrix* w : parts)
      host.insert(host.end(), w->data, w->data + w->n_out * w->row_bytes());
  } else if (d.kind == DeviceKind::int4_groups) {
    // The narrowest group any part needs (an exact group of 128 is exact at 64 and 32 too).
    d.group = 128;
    for (const model::WeightMatrix* w : parts)
      d.group = std::min(d.group, kernels::int4_group_size(w->type, w->data, w->n_out, w->k));
    if (first.type == kernels::DType::Q4_0) {  // every part is (device_kind): convert on the device
      DeviceMatrix q4;
      q4.kind = DeviceKind::q4_0;
      q4.n_out = d.n_out;
      q4.k = d.k;
      for (const model::WeightMatrix* w : parts)
        host.insert(host.end(), w->data, w->data + w->n_out * w->row_bytes());
      q4.mem = upload(host.data(), host.size());
      return q4_0_to_int4_groups(q4, d.group, nullptr);
    }
    const auto groups = static_cast<size_t>(d.n_out * (d.k / d.group));
    const auto quant_bytes = static_cast<size_t>(d.n_out * d.k / 2);
    d.scales_offset = (quant_bytes + 15) / 16 * 16;
    d.zeros_offset = d.scales_offset + groups * sizeof(uint16_t);
    host.resize(d.zeros_offset + groups);
    int64_t row = 0;
    for (const model::WeightMatrix* w : parts) {
      const int64_t g0 = row * (d.k / d.group);
      check(kernels::int4_groups_from_blocks(w->type, w->data, w->n_out, w->k, d.group,
                                             host.data() + row * d.k / 2,
                                             reinterpret_cast<uint16_t*>(host.data() + d.scales_offset) + g0,
                                             host.data() + d.zeros_offset + g0),
            "int4_groups_from_blocks (weight upload)");
      row += w->n_out;
    }
  } else {
    host.resize(static_cast<size_t>(d.n_out * d.k) * sizeof(uint16_t));
    auto* out = reinterpret_cast<uint16_t*>(host.data());
    std::vector<float> row(static_cast<size_t>(d.k));
    for (const model::WeightMatrix* w : parts) {
      for (int64_t r = 0; r < w->n_out; ++r, out += d.k) {
        const uint8_t* src = w->data + r * w->row_bytes();
        if (w->type == kernels::DType::F16) {
          std::memcpy(out, src, static_cast<size_t>(d.k) * sizeof(uint16_t));
          continue;
        }
        check(kernels::dequantize_row(w->type, src, row.data(), d.k), "dequantize_row (weight upload)");
        for (int64_t i = 0; i < d.k; ++i) {
          const int64_t to = w->input_order != nullptr ? (*w->input_order)[static_cast<size_t>(i)] : i;
          out[to] = kernels::fp32_to_fp16(row[static_cast<size_t>(i)]);
        }
      }
    }
  }
  d.mem = upload(host.data(), host.size());
  return d;
}

std::shared_ptr<DeviceMemory> upload_floats(const std::vector<float>& v) {
  return upload(v.data(), v.size() * sizeof(float));
}

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

Projection upload_projection(std::initializer_list<const model::WeightMatrix*> parts,
                             int64_t q4_0_min_group) {
  Projection p;
  bool same = true;
  for (const model::WeightMatrix* w : parts)
    same = same && device_kind(*w, q4_0_min_group) == device_kind(**parts.begin(), q4_0_min_group);
  if (same) {
    p.parts.push_back(upload_matrix(parts, q4_0_min_group));
  } else {
    for (const model::WeightMatrix* w : parts) p.parts.push_back(upload_matrix({w}, q4_0_min_group));
  }
  return p;
}

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
                          cudaStream_t stream) {
  DeviceMatrix d;
  d.kind = DeviceKind::q4_0;
  d.k = static_cast<int64_t>(cols.count);
  if (cols.begin % 32 != 0 || cols.count % 32 != 0) {
    throw std::invalid_argument("tensor parallel: dummy columns [" + std::to_string(cols.begin) + ", " +
                                std::to_string(cols.end()) + ") do not fall on Q4_0 block boundaries (32)");
  }
  for (const DummyPart& part : parts) d.n_out += static_cast<int64_t>(part.rows.count);
  const int64_t whole_row_bytes = kernels::row_bytes(kernels::DType::Q4_0, k);
  const int64_t row_bytes = kernels::row_bytes(kernels::DType::Q4_0, d.k);
  const int64_t col_offset = kernels::row_bytes(kernels::DType::Q4_0, static_cast<int64_t>(cols.begin));
  d.mem = std::make_shared<DeviceMemory>(static_cast<size_t>(d.n_out * row_bytes));
  int64_t row = 0;
  for (const DummyPart& part : parts) {
    uint8_t* dst = d.mem->as<uint8_t>() + row * row_bytes;
    const auto count = static_cast<int64_t>(part.rows.count);
    if (count == part.n_out && d.k == k) {
      check(kc::fill_random_q4_0(dst, part.n_out, k, part.seed, stream), "fill_random_q4_0 (dummy weights)");
    } else {
      DeviceMemory whole(static_cast<size_t>(part.n_out * whole_row_bytes));
      check(kc::fill_random_q4_0(whole.as<uint8_t>(), part.n_out, k, part.seed, stream),
            "fill_random_q4_0 (dummy weights)");
      cuda_check(cudaMemcpy2DAsync(dst, static_cast<size_t>(row_bytes),
                                   whole.as<uint8_t>() +
                                       static_cast<int64_t>(part.rows.begin) * whole_row_bytes + col_offset,
                                   static_cast<size_t>(whole_row_bytes), static_cast<size_t>(row_bytes),
                                   static_cast<size_t>(count), cudaMemcpyDeviceToDevice, stream),
                 "cudaMemcpy2DAsync (dummy shard)");
      cuda_check(cudaStreamSynchronize(stream), "dummy shard");  // before `whole` is freed
    }
    row += count;
  }
  return d;
}

// A Q4_0 matrix made on the device (dummy weights) as group-wise INT4 at the widest group dividing
// its rows (128 for every Llama shape): 4.19 bits a weight instead of 4.5, as a GPTQ group-128
// checkpoint would be. Every block of a dummy matrix has the same scale (random_q4_0_scale), so the
// conversion is exact, and the device checks that it was.
DeviceMatrix to_int4_groups(const DeviceMatrix& q4, cudaStream_t stream) {
  return q4_0_to_int4_groups(q4, q4.k % 128 == 0 ? 128 : q4.k % 64 == 0 ? 64 : 32, stream);
}

// Layer `layer`'s matrices `which` stacked, each part cut to rows[i] and every part to cols.
DeviceMatrix dummy_layer_matrix(const model::LlamaCheckpoint& ckpt, int64_t layer,
                                std::initializer_list<std::pair<model::LayerMatrix, ShardRange>> which,
                                ShardRange cols, cudaStream_t stream) {
  const model::LlamaConfig& c = ckpt.config();
  const int64_t k = model::layer_matrix_shape(c, which.begin()->first).second;
  std::vector<DummyPart> parts;
  for (const auto& [m, rows] : which) {
    parts.push_back({model::layer_matrix_shape(c, m).first,
                     ckpt.dummy_tensor_seed(model::DummyTensor::matrix, layer, m), rows});
  }
  return to_int4_groups(dummy_matrix(k, cols, parts, stream), stream);
}

// Batches up to this many tokens are replayed from captured graphs with CudaModelOptions::graphs.
constexpr int64_t kGraphMaxTokens = 64;
// Graphs held at most (all are dropped when one more is needed), and batch shapes remembered as
// seen once (a shape is captured when seen again): a long-running server meets many shapes.
constexpr size_t kMaxGraphs = 128;
constexpr size_t kMaxSeenShapes = 4096;
// attention_decode's positions per split, fixed: each query's sum then runs in an order that does
// not depend on the rest of the batch, so a verification row equals the decode step it replaces bit
// for bit (greedy speculation stays exact at any context length).
constexpr int64_t kDecodeSplitTokens = 256;
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
// The chunks of an INT4 matrix that dequant + cuBLAS dequantizes at a time (w4a16_dequant_cublas.cuh):
// 4096 rows of llama-70b's k = 8192, 1152 of k = 28672. Only models with group-wise INT4 matrices take it.
constexpr int64_t kDequantScratchBytes = int64_t{64} << 20;
// profile_greedy's head start for the host: a 70B pass queues ~2,000 kernels and events in well under
// this, and a step profile is a one-off.
constexpr int64_t kProfileHeadStartNs = 50'000'000;

struct Layer {
  std::shared_ptr<DeviceMemory> attn_norm, ffn_norm;  // [n_embd] float
  Projection qkv;                                     // [q_dim + 2 kv_dim, n_embd], stacked or three parts
  DeviceMatrix wo;
  Projection gate_up;  // [2 n_ff, n_embd], stacked or two parts
  DeviceMatrix down;
};

}  // namespace

std::string cuda_unavailable_reason() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return std::string("no usable CUDA device: ") + cudaGetErrorString(err);
  if (count == 0) return "no CUDA device found";
  return {};
}

int cuda_device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

CudaMemoryInfo cuda_memory_info(int device) {
  require_device(device);
  size_t free_bytes = 0, total_bytes = 0;
  cuda_check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  return {static_cast<int64_t>(free_bytes), static_cast<int64_t>(total_bytes)};
}

// ---------------------------------------------------------------------------------------------
// CudaKvCache

CudaKvCache::CudaKvCache(const model::LlamaConfig& config, int64_t n_blocks, int64_t block_size, int device)
    : n_blocks_(n_blocks), block_size_(block_size), kv_dim_(config.kv_dim()), n_layer_(config.n_layer) {
  if (n_blocks < 1 || block_size < 1) throw std::invalid_argument("a KV cache needs at least one block");
  require_device(device);
  layer_elems_ = n_blocks_ * block_size_ * kv_dim_;
  const size_t bytes = static_cast<size_t>(2 * n_layer_ * layer_elems_) * sizeof(uint16_t);
  cuda_check(cudaMalloc(reinterpret_cast<void**>(&base_), bytes), "cudaMalloc (KV cache)");
  // cudaMemset runs on the legacy default stream, which the model's non-blocking stream does not wait
  // for: finish it here.
  cudaError_t err = cudaMemset(base_, 0, bytes);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    cudaFree(base_);
    cuda_check(err, "cudaMemset (KV cache)");
  }
}

CudaKvCache::~CudaKvCache() { cudaFree(base_); }

std::vector<uint16_t> CudaKvCache::layer_to_host(int64_t layer, bool values) const {
  std::vector<uint16_t> host(static_cast<size_t>(layer_elems_));
  cuda_check(cudaMemcpy(host.data(), values ? v(layer) : k(layer), host.size() * sizeof(uint16_t),
                        cudaMemcpyDeviceToHost),
             "cudaMemcpy (KV cache to host)");
  return host;
}

// ---------------------------------------------------------------------------------------------
// CudaLlamaModel

// The sections of a pass that profile_greedy times (CudaStepProfile::sections, in this order).
enum class Section : int { embedding, norms, qkv, rope_kv, attention, attn_out, gate_up, swiglu, down, head };
constexpr const char* kSectionNames[] = {
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
  // Never throws (it runs in destructors); a failed record shows as a failed elapsed time in result().
  void end(cudaStream_t stream) noexcept { cudaEventRecord(spans_.back().end, stream); }
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
  TensorShard shard;
  ShardReducer* reducer = nullptr;  // null when unsharded (no collectives)
  int64_t layer_begin = 0, layer_end = 0;
  ModelShard split;  // what this shard owns (the whole model when unsharded)
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;

  DeviceMatrix embedding;     // Q4_0 or fp16 rows, [n_vocab, n_embd] (whole on every shard); first stage only
  std::vector<Layer> layers;  // the stage's
  std::shared_ptr<DeviceMemory> output_norm;  // last stage only
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
  DeviceMemory sample_params;     // [n_out] SamplingRowParams (forward_sample)
  DeviceMemory sample_uniforms;   // [n_out] double
  DeviceMemory sample_workspace;  // sample_rows' keys and sort storage
  DeviceMemory penalty_buffer;    // the repetition penalty's ids, offsets and penalties (forward_sample)
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
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, int64_t, size_t, const void*, uint16_t*,
                      int64_t, int64_t>,
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
        check(gemv ? kc::w4a16_gemv_q4_0(wd, w.n_out, w.k, x, m, y, stream, pdl)
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
          check(kc::w4a8_gemv_q4_k(wd, w.n_out, w.k, x, m, y, stream, pdl), "W4A8 matmul (Q4_K)");
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
        check(st, "W4A16 matmul (Q4_K)");
        return;
      }
      // As stored: the CUDA-core GEMV up to 32 rows; above, dequantized to fp16 in chunks for cuBLAS
      // (what these types' fp16 upload ran before; the WMMA GEMM is far below cuBLAS there).
      case DeviceKind::q6_k:
        check(gemv ? kc::w4a16_gemv_q6_k(wd, w.n_out, w.k, x, m, y, stream, pdl)
                   : kc::w4a16_q6_k_dequant_cublas(dequant_cublas, wd, w.n_out, w.k, x, m, y, stream),
              "W6A16 matmul (Q6_K)");
        return;
      case DeviceKind::q8_0:
        check(gemv ? kc::w4a16_gemv_q8_0(wd, w.n_out, w.k, x, m, y, stream, pdl)
                   : kc::w4a16_q8_0_dequant_cublas(dequant_cublas, wd, w.n_out, w.k, x, m, y, stream),
              "W8A16 matmul (Q8_0)");
        return;
      case DeviceKind::int4_groups: {
        const bool rows = w.layout == kc::Int4Layout::rows;
        const auto* scales = rows ? reinterpret_cast<const __half*>(wd + w.scales_offset) : nullptr;
        const uint8_t* zeros = rows ? wd + w.zeros_offset : nullptr;
        const kc::Int4Kernel kernel = w.int4_kernel[kc::int4_row_range(m)];
        const kernels::Status st = kc::launch_int4_kernel(
            kernel, &dequant_cublas, wd, scales, zeros, w.group, w.n_out, w.k, x, m, y, stream, pdl, w.layout,
            w.cutlass.quants != nullptr ? &w.cutlass : nullptr, w.half2_variant);
        if (st != kernels::Status::ok) {  // the message built only on failure (graph capture runs here)
          check(st, (std::string("W4A16 matmul (INT4 groups, ") + kc::int4_kernel_name(kernel) + " on " +
                     kc::int4_layout_name(w.layout) + ", " + std::to_string(w.n_out) + " x " +
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
    if (!options.fused_epilogues || w.fusion_slower ||
        !kc::w4a16_gemv_half2_fits(w.k, w.kind == DeviceKind::q4_k))
      return false;
    if (w.kind == DeviceKind::int4_groups) {
      return w.layout == kc::Int4Layout::rows &&
             w.int4_kernel[kc::int4_row_range(1)] == kc::Int4Kernel::gemv_half2;
    }
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
    return w.kind == DeviceKind::q4_k
               ? kc::w4a16_gemv_q4_k_half2_add_norm(wd, w.n_out, w.k, x, y, residual, norm_weight,
                                                    shard_config.rms_eps, h, counter, stream, pdl)
               : kc::w4a16_gemv_int4_groups_half2_add_norm(
                     op.quants, op.scales, op.zeros, w.group, w.n_out, w.k, x, y, residual, norm_weight,
                     shard_config.rms_eps, h, counter, stream, pdl, w.half2_fused_variant);
  }
  // Whether the half2 GEMV takes one row of w, an INT4 (rows) or Q4_K matrix: one launch on a zero row;
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
            : kc::w4a16_gemv_int4_groups_half2(op.quants, op.scales, op.zeros, w.group, w.n_out, w.k,
                                               x.as<__half>(), 1, y.as<float>(), stream);
    if (st == kernels::Status::invalid_argument) return false;
    check(st, "the half2 GEMV (probe at load)");
    cuda_check(cudaStreamSynchronize(stream), "the half2 GEMV (probe at load)");
    return true;
  }
  // One token's stacked q / k / v projection, RoPE and KV cache write in one kernel (fuses_one_row):
  // what project then rope_kv_write do.
  kernels::Status project_rope_kv(const DeviceMatrix& w, const __half* x, const kc::RopeKvWriteShape& s,
                                  const int32_t* pos, const int32_t* seq, const int32_t* tables,
                                  __half* q_out, __half* k_cache, __half* v_cache, int32_t* error_flag) {
    const auto* wd = w.mem->as<uint8_t>();
    const kc::Int4GroupsMatrix op = int4_operands(w);  // the INT4 arrays (rows)
    const bool pdl = options.programmatic_launch;
    return w.kind == DeviceKind::q4_k
               ? kc::w4a16_gemv_q4_k_half2_rope_kv(wd, s, w.k, x, pos, seq, tables, q_out, k_cache, v_cache,
                                                   error_flag, stream, pdl)
               : kc::w4a16_gemv_int4_groups_half2_rope_kv(op.quants, op.scales, op.zeros, w.group, s, w.k, x,
                                                          pos, seq, tables, q_out, k_cache, v_cache,
                                                          error_flag, stream, pdl, w.half2_fused_variant);
  }
  // One token's stacked gate / up projection and SwiGLU in one kernel (fuses_one_row): act, [1, n_ff]
  // fp16, as project then swiglu_f32_to_f16 write it.
  kernels::Status project_swiglu(const DeviceMatrix& w, const __half* x, __half* act) {
    const auto* wd = w.mem->as<uint8_t>();
    const kc::Int4GroupsMatrix op = int4_operands(w);  // the INT4 arrays (rows)
    const bool pdl = options.programmatic_launch;
    const int64_t n_ff = w.n_out / 2;
    return w.kind == DeviceKind::q4_k
               ? kc::w4a16_gemv_q4_k_half2_swiglu(wd, n_ff, w.k, x, act, stream, pdl)
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
  // Graphs need a pass without host synchronization: no reducer.
  bool use_graphs(int64_t n) const { return options.graphs && reducer == nullptr && n <= kGraphMaxTokens; }
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
  // Per Q4_K matrix shape, the one-row GEMV (q4_k_tensor_cores_one_row, q4_k_half2_one_row), timed on the
  // model's weights under Int4Kernels::measured; records q4_k_choices. Called by choose_int4_kernels.
  void choose_q4_k_kernels();
  // Under Int4Kernels::measured with fused_epilogues (not int8_activations): per fusable site of the
  // layers (CudaFusionChoice::site_names) and matrix shape there that the half2 GEMV takes, the fused
  // half2 kernel timed against the shape's chosen one-row kernel plus the kernel the fusion saves, on
  // the site's matrices and scratch buffers; the faster kept (the half2 GEMV at one row, or
  // fusion_slower). Records fusion_choices. Called by choose_int4_kernels after the choices per shape.
  void choose_one_row_fusions();
  void validate(const ForwardBatch& batch, const CudaKvCache& cache) const;
  struct Plan;
  Plan plan_batch(const ForwardBatch& batch, const CudaKvCache& cache, bool greedy,
                  std::vector<int32_t>& meta_out) const;
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
    // The repetition penalty (empty: none): per row its penalized tokens in CSR form and its penalty.
    const std::vector<int32_t>* penalty_ids = nullptr;      // [penalty_offsets.back()]
    const std::vector<int32_t>* penalty_offsets = nullptr;  // [rows + 1]
    const std::vector<float>* penalties = nullptr;          // [rows]
  };
  void forward_impl(const ForwardBatch& batch, CudaKvCache& cache, const float* hidden_in,
                    std::vector<float>* logits_out, std::vector<int32_t>* ids_out, RowSampling sampling);
};

void CudaLlamaModel::Impl::make_dummy_weights() {
  using model::DummyTensor;
  using model::LayerMatrix;
  const model::LlamaCheckpoint& ckpt = *checkpoint;
  const auto& c = config;
  const auto whole = [](int64_t n) { return ShardRange{0, static_cast<size_t>(n)}; };
  const auto scaled = [](ShardRange r, int64_t by) {
    return ShardRange{r.begin * static_cast<size_t>(by), r.count * static_cast<size_t>(by)};
  };
  if (first_stage()) {
    embedding =
        dummy_matrix(c.n_embd, whole(c.n_embd),
                     {{c.n_vocab, ckpt.dummy_tensor_seed(DummyTensor::embedding), whole(c.n_vocab)}}, stream);
  }
  if (last_stage()) {
    head = to_int4_groups(
        dummy_matrix(c.n_embd, whole(c.n_embd),
                     {{c.n_vocab, ckpt.dummy_tensor_seed(DummyTensor::head), split.vocab}}, stream),
        stream);
    output_norm = upload_floats(ckpt.dummy_norm(DummyTensor::output_norm));
  }
  const ShardRange q_rows = scaled(split.heads.q_heads, c.head_dim);
  const ShardRange kv_rows = scaled(split.heads.kv_heads, c.head_dim);
  for (int64_t i = layer_begin; i < layer_end; ++i) {
    Layer l;
    l.attn_norm = upload_floats(ckpt.dummy_norm(DummyTensor::attn_norm, i));
    l.ffn_norm = upload_floats(ckpt.dummy_norm(DummyTensor::ffn_norm, i));
    l.qkv.parts.push_back(dummy_layer_matrix(
        ckpt, i,
        {{LayerMatrix::attn_q, q_rows}, {LayerMatrix::attn_k, kv_rows}, {LayerMatrix::attn_v, kv_rows}},
        whole(c.n_embd), stream));
    l.wo = dummy_layer_matrix(ckpt, i, {{LayerMatrix::attn_output, whole(c.n_embd)}}, q_rows, stream);
    l.gate_up.parts.push_back(
        dummy_layer_matrix(ckpt, i, {{LayerMatrix::ffn_gate, split.ff}, {LayerMatrix::ffn_up, split.ff}},
                           whole(c.n_embd), stream));
    l.down = dummy_layer_matrix(ckpt, i, {{LayerMatrix::ffn_down, whole(c.n_embd)}}, split.ff, stream);
    layers.push_back(std::move(l));
  }
}

void CudaLlamaModel::Impl::upload_weights(model::LlamaWeights weights) {
  const model::WeightMatrix whole_embedding = weights.token_embd;  // every shard keeps every row
  const bool tied = weights.output.data == weights.token_embd.data;
  if (shard.size > 1) slice_weights(weights, split, config.head_dim, first_stage(), last_stage());
  const int64_t q4_0_min_group = options.q4_0_as_int4_groups ? 32 : 64;
  if (first_stage()) embedding = upload_matrix({&whole_embedding}, q4_0_min_group, /*lookup=*/true);
  if (last_stage()) {
    const bool share_head = first_stage() && shard.size == 1 && tied &&
                            device_kind(weights.output, q4_0_min_group) == embedding.kind;
    head = share_head ? embedding : upload_matrix({&weights.output}, q4_0_min_group);
    output_norm = upload_floats(weights.output_norm);
  }
  for (const model::LlamaLayerWeights& lw : weights.layers) {
    Layer l;
    l.attn_norm = upload_floats(lw.attn_norm);
    l.ffn_norm = upload_floats(lw.ffn_norm);
    l.qkv = upload_projection({&lw.wq, &lw.wk, &lw.wv}, q4_0_min_group);
    l.wo = upload_matrix({&lw.wo}, q4_0_min_group);
    l.gate_up = upload_projection({&lw.w_gate, &lw.w_up}, q4_0_min_group);
    l.down = upload_matrix({&lw.w_down}, q4_0_min_group);
    layers.push_back(std::move(l));
  }
}

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
  std::vector<std::vector<DeviceMatrix*>> shapes;  // int4_groups matrices by shape, in order of appearance
  for_each_matrix([&](DeviceMatrix& w) {
    if (w.kind != DeviceKind::int4_groups || w.layout != kc::Int4Layout::rows) return;
    for (auto& list : shapes) {
      const DeviceMatrix& f = *list.front();
      if (f.n_out == w.n_out && f.k == w.k && f.group == w.group) {
        list.push_back(&w);
        return;
      }
    }
    shapes.push_back({&w});
  });
  int l2_bytes = 0;
  cuda_check(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, options.device),
             "cudaDeviceGetAttribute");
  const bool cutlass_runs = kc::w4a16_cutlass_supported();
  for (const auto& list : shapes) {
    const DeviceMatrix& first = *list.front();
    MeasuredLayout ml;
    ml.n_out = first.n_out;
    ml.k = first.k;
    ml.group = first.group;
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
      check(kc::q4_k_tiles_from_blocks(base, w.n_out, w.k, tiled->as<uint8_t>(), stream),
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
  // The matrices by shape, shapes in order of first appearance.
  std::vector<std::pair<CudaInt4KernelChoice, std::vector<DeviceMatrix*>>> shapes;
  const auto add = [&](DeviceMatrix& w) {
    if (w.kind != DeviceKind::int4_groups) return;
    for (auto& [choice, list] : shapes) {
      if (choice.n_out == w.n_out && choice.k == w.k && choice.group == w.group &&
          list.front()->layout == w.layout &&
          (list.front()->cutlass.quants != nullptr) == (w.cutlass.quants != nullptr)) {
        list.push_back(&w);
        return;
      }
    }
    CudaInt4KernelChoice choice;
    choice.n_out = w.n_out;
    choice.k = w.k;
    choice.group = w.group;
    choice.layout = worker_layout(w.layout);
    if (const MeasuredLayout* ml = measured_layout(w))
      std::copy(ml->us, ml->us + CudaInt4KernelChoice::kLayouts, choice.layout_us);
    shapes.push_back({choice, {&w}});
  };
  for_each_matrix(add);
  int4_choices.clear();
  // dequant + cuBLAS's scratch (INT4 shapes, and the Q6_K and Q8_0 matrices' many-row products): a
  // chunk of the largest matrix, at most kDequantScratchBytes.
  int64_t largest = 0;
  for (const auto& [choice, list] : shapes) largest = std::max(largest, choice.n_out * choice.k);
  for_each_matrix([&](const DeviceMatrix& w) {
    if (w.kind == DeviceKind::q6_k || w.kind == DeviceKind::q8_0) largest = std::max(largest, w.n_out * w.k);
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
  std::vector<std::pair<CudaQ4KChoice, std::vector<DeviceMatrix*>>> shapes;
  const auto add = [&](DeviceMatrix& w) {
    if (w.kind != DeviceKind::q4_k) return;
    for (auto& [choice, list] : shapes) {
      if (choice.n_out == w.n_out && choice.k == w.k && list.front()->layout == w.layout) {
        list.push_back(&w);
        return;
      }
    }
    CudaQ4KChoice choice;
    choice.n_out = w.n_out;
    choice.k = w.k;
    choice.tiles = w.layout == kc::Int4Layout::tiles;
    shapes.push_back({choice, {&w}});
  };
  for_each_matrix(add);
  q4_k_choices.clear();
  for (auto& [choice, list] : shapes) {
    choice.matrices = static_cast<int64_t>(list.size());
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
      const int iterations = static_cast<int>(std::clamp<size_t>(list.size(), 8, 32));
      enum class OneRow { cuda_cores, tensor_cores, half2 };
      const auto time = [&](OneRow kernel, double& us) {
        cudaError_t err = cudaSuccess;
        kernels::Status st = kernels::Status::ok;
        const bool timed = kc::median_call_us(
            stream, iterations, /*repetitions=*/3,
            [&](int i) {
              const DeviceMatrix& w = *list[static_cast<size_t>(i) % list.size()];
              const auto* wd = w.mem->as<uint8_t>();
              st = kernel == OneRow::tensor_cores
                       ? kc::w4a16_gemv_q4_k_mma(wd, w.n_out, w.k, x.as<__half>(), 1, y.as<float>(), stream)
                   : kernel == OneRow::half2
                       ? kc::w4a16_gemv_q4_k_half2(wd, w.n_out, w.k, x.as<__half>(), 1, y.as<float>(), stream)
                       : kc::w4a16_gemv_q4_k(wd, w.n_out, w.k, x.as<__half>(), 1, y.as<float>(), stream);
              return st == kernels::Status::ok;
            },
            us, err);
        if (!timed) {
          throw std::runtime_error("timing the Q4_K kernels for a " + std::to_string(choice.n_out) + " x " +
                                   std::to_string(choice.k) + " matrix failed: " +
                                   (err != cudaSuccess ? cudaGetErrorString(err) : kernels::status_name(st)));
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

void CudaLlamaModel::Impl::choose_one_row_fusions() {
  fusion_choices.clear();
  for_each_matrix([](DeviceMatrix& w) {
    w.fusion_slower = false;
    w.half2_fused_variant = 0;
  });
  if (options.int4_kernels != Int4Kernels::measured || !options.fused_epilogues || options.int8_activations)
    return;
  const auto& c = shard_config;  // local heads and ffn rows
  // The matrices per site and shape (sites: indices into CudaFusionChoice::site_names).
  enum Site { rope_kv = 0, swiglu = 1, attn_out_norm = 2, down_norm = 3 };
  std::vector<std::pair<CudaFusionChoice, std::vector<DeviceMatrix*>>> groups;
  const auto add = [&](Site site, DeviceMatrix& w) {
    const bool q4_k = w.kind == DeviceKind::q4_k;
    if ((!q4_k && w.kind != DeviceKind::int4_groups) || w.layout != kc::Int4Layout::rows ||
        !kc::w4a16_gemv_half2_fits(w.k, q4_k))
      return;
    for (auto& [choice, list] : groups) {
      const DeviceMatrix& f = *list.front();
      if (choice.site == site && f.kind == w.kind && f.n_out == w.n_out && f.k == w.k && f.group == w.group) {
        list.push_back(&w);
        return;
      }
    }
    CudaFusionChoice choice;
    choice.site = site;
    choice.n_out = w.n_out;
    choice.k = w.k;
    choice.q4_k = q4_k;
    groups.push_back({choice, {&w}});
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
    choice.unfused_kernel =
        choice.q4_k
            ? (front.q4_k_half2_one_row          ? "Q4_K half2 GEMV"
               : front.q4_k_tensor_cores_one_row ? "Q4_K tensor-core GEMV"
                                                 : "Q4_K CUDA-core GEMV")
            : CudaInt4KernelChoice::kernel_names[static_cast<int>(front.int4_kernel[kc::int4_row_range(1)])];
    if (!choice.q4_k && front.int4_kernel[kc::int4_row_range(1)] == kc::Int4Kernel::gemv_half2 &&
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
    // The site's matrices in turn (enough of them that L2 holds few), as the per-shape timing does.
    const int iterations = static_cast<int>(std::clamp<size_t>(list.size(), 8, 32));
    // The fused kernel on the default block shape and, for INT4, on the one kept for the plain product
    // where that differs (an epilogue's registers can change which is faster; the same bits).
    std::vector<int> fused_shapes = {0};
    if (!choice.q4_k) {
      const int kept =
          kc::half2_gemv_effective_shape(front.half2_variant, front.group, choice.site >= attn_out_norm);
      if (kept > 0) fused_shapes.push_back(kept);
    }
    int fused_shape = 0;
    // The plain product and the separate kernel (shape -1), then the fused kernel on each shape.
    for (int shape = -1; shape < static_cast<int>(fused_shapes.size()); ++shape) {
      const bool fuse = shape >= 0;
      if (fuse) {
        for (DeviceMatrix* w : list) w->half2_fused_variant = fused_shapes[static_cast<size_t>(shape)];
      }
      cudaError_t err = cudaSuccess;
      kernels::Status st = kernels::Status::ok;
      double us = 0.0;
      const bool timed = kc::median_call_us(
          stream, iterations, /*repetitions=*/3,
          [&](int i) {
            const DeviceMatrix& w = *list[static_cast<size_t>(i) % list.size()];
            if (fuse) {
              st = fused(w);
            } else {
              matmul(w, xh, 1, yf);  // the shape's chosen one-row kernel (throws if it fails)
              st = separate();
            }
            return st == kernels::Status::ok;
          },
          us, err);
      if (timed) {
        if (!fuse) {
          choice.unfused_us = us;
        } else if (choice.fused_us == 0.0 || us < choice.fused_us) {
          choice.fused_us = us;
          fused_shape = fused_shapes[static_cast<size_t>(shape)];
        }
        continue;
      }
      // A fused kernel that refuses the call leaves the site unfused; anything else (the plain path,
      // which the model runs anyway, a launch or CUDA call failing) is an error at load.
      if (fuse && err == cudaSuccess && st == kernels::Status::invalid_argument) continue;
      throw std::runtime_error(
          std::string("timing the fused epilogue ") + CudaFusionChoice::site_names[choice.site] + " for a " +
          std::to_string(choice.n_out) + " x " + std::to_string(choice.k) +
          " matrix failed: " + (err != cudaSuccess ? cudaGetErrorString(err) : kernels::status_name(st)));
    }
    // Fusing a product that runs on another kernel moves it to the half2 GEMV, whose bits differ: only
    // when kInt4MinGain faster, so that timing noise does not change a model's output from one load to
    // the next (as the kernels' choice per shape keeps its default). On the half2 GEMV already the bits
    // are the same either way.
    choice.half2_alone = choice.q4_k ? front.q4_k_half2_one_row
                                     : front.int4_kernel[kc::int4_row_range(1)] == kc::Int4Kernel::gemv_half2;
    choice.fused = choice.fused_us > 0.0 &&
                   choice.fused_us < (choice.half2_alone ? 1.0 : 1.0 - kc::kInt4MinGain) * choice.unfused_us;
    choice.fused_shape = kc::half2_gemv_variant_name(kc::kHalf2GemvVariants[fused_shape]);
    for (DeviceMatrix* w : list) {
      w->fusion_slower = !choice.fused;
      w->half2_fused_variant = fused_shape;
      if (!choice.fused) continue;
      if (choice.q4_k) {
        w->q4_k_half2_one_row = true;
        w->q4_k_tensor_cores_one_row = false;
      } else {
        w->int4_kernel[kc::int4_row_range(1)] = kc::Int4Kernel::gemv_half2;
      }
    }
    fusion_choices.push_back(choice);
  }
  cuda_check(cudaStreamSynchronize(stream), "fusion timing");
}

void CudaLlamaModel::Impl::reduce_sum(float* data, size_t count) {
  if (reducer == nullptr) return;
  if (reducer->device_pointers()) {  // NCCL runs on its own stream: the sums must be complete
    cuda_check(cudaStreamSynchronize(stream), "before an all-reduce");
    reducer->sum(data, count);
    return;
  }
  host_reduce.resize(count);
  cuda_check(cudaMemcpyAsync(host_reduce.data(), data, count * sizeof(float), cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync (all-reduce to host)");
  cuda_check(cudaStreamSynchronize(stream), "before an all-reduce");
  reducer->sum(host_reduce.data(), count);
  // From pageable memory the copy has staged host_reduce before it returns: the buffer may be reused.
  cuda_check(cudaMemcpyAsync(data, host_reduce.data(), count * sizeof(float), cudaMemcpyHostToDevice, stream),
             "cudaMemcpyAsync (all-reduce from host)");
}

void CudaLlamaModel::Impl::gather_logits(int64_t n_out) {
  const int64_t local = split.vocab_counts[static_cast<size_t>(shard.rank)];
  cuda_check(cudaStreamSynchronize(stream), "before the logits gather");
  if (reducer->device_pointers()) {
    reducer->gather_columns(local_logits.as<float>(), n_out, split.vocab_counts, logits.as<float>());
    return;
  }
  host_reduce.resize(static_cast<size_t>(n_out * local));
  host_gathered.resize(static_cast<size_t>(n_out * config.n_vocab));
  cuda_check(cudaMemcpy(host_reduce.data(), local_logits.as<float>(), host_reduce.size() * sizeof(float),
                        cudaMemcpyDeviceToHost),
             "cudaMemcpy (local logits to host)");
  reducer->gather_columns(host_reduce.data(), n_out, split.vocab_counts, host_gathered.data());
  cuda_check(cudaMemcpyAsync(logits.as<float>(), host_gathered.data(), host_gathered.size() * sizeof(float),
                             cudaMemcpyHostToDevice, stream),
             "cudaMemcpyAsync (gathered logits to the device)");
}

void CudaLlamaModel::Impl::validate(const ForwardBatch& batch, const CudaKvCache& cache) const {
  const auto& c = config;
  const auto n = static_cast<int64_t>(batch.tokens.size());
  if (batch.positions.size() != batch.tokens.size() || batch.seq_index.size() != batch.tokens.size()) {
    throw std::invalid_argument("forward batch: tokens, positions and seq_index differ in length");
  }
  if (cache.kv_dim() != shard_config.kv_dim() || cache.n_layer() != shard_config.n_layer) {
    throw std::invalid_argument("the CUDA KV cache was sized for another model (KV width " +
                                std::to_string(cache.kv_dim()) + ", " + std::to_string(cache.n_layer()) +
                                " layers; size it from shard_config())");
  }
  const int64_t mbps = batch.max_blocks_per_seq;
  const int64_t n_seqs = mbps > 0 ? static_cast<int64_t>(batch.block_tables.size()) / mbps : 0;
  std::vector<int64_t> max_pos(static_cast<size_t>(n_seqs), -1);
  for (int64_t t = 0; t < n; ++t) {
    if (batch.tokens[t] < 0 || batch.tokens[t] >= c.n_vocab) {
      throw std::invalid_argument("token id " + std::to_string(batch.tokens[t]) +
                                  " is outside the vocabulary");
    }
    if (batch.seq_index[t] < 0 || batch.seq_index[t] >= n_seqs || batch.positions[t] < 0 ||
        batch.positions[t] >= mbps * cache.block_size()) {
      throw std::invalid_argument("position " + std::to_string(batch.positions[t]) +
                                  " is outside the sequence's KV blocks");
    }
    auto& mp = max_pos[static_cast<size_t>(batch.seq_index[t])];
    mp = std::max<int64_t>(mp, batch.positions[t]);
  }
  // Every block a token writes or attends over must exist (the CPU would read out of bounds).
  for (int64_t s = 0; s < n_seqs; ++s) {
    const int64_t last = max_pos[static_cast<size_t>(s)];
    if (last < 0) continue;
    for (int64_t b = 0; b <= last / cache.block_size(); ++b) {
      const int32_t id = batch.block_tables[static_cast<size_t>(s * mbps + b)];
      if (id < 0 || id >= cache.n_blocks()) {
        throw std::invalid_argument("block id " + std::to_string(id) + " is outside the KV cache's " +
                                    std::to_string(cache.n_blocks()) + " blocks");
      }
    }
  }
  for (int32_t row : batch.logit_rows) {
    if (row < 0 || row >= n) throw std::invalid_argument("logit row outside the batch");
  }
}

// What one forward pass launches, fixed before anything is enqueued: everything a captured graph
// bakes in. Two passes with equal keys enqueue the same launches with the same arguments (the batch's
// values travel in `meta`, copied before the launches).
struct CudaLlamaModel::Impl::Plan {
  int64_t n = 0, n_out = 0, n_runs = 0, mbps = 0;
  bool use_decode = false, greedy = false;
  int64_t n_tiles = 0;  // > 0: prompt-chunk attention on prefill_attention_f16's tiles (else paged)
  int64_t off_tokens = 0, off_pos = 0, off_seq = 0, off_tables = 0, off_rows = 0;
  int64_t off_seq_lens = 0, off_query_start = 0, off_run_tables = 0, off_tiles = 0;
  kc::DecodeAttentionShape dshape;
  const CudaKvCache* cache = nullptr;
  size_t meta_count = 0;

  auto key() const {
    // The cache's geometry as well as its addresses: a new cache may reuse a freed one's memory.
    return std::make_tuple(n, n_out, n_runs, mbps, use_decode, greedy, dshape.max_q_len, meta_count,
                           static_cast<const void*>(cache), cache->k(0), n_tiles,
                           cache->block_size() * (int64_t{1} << 32) + cache->n_blocks());
  }
};

CudaLlamaModel::Impl::Plan CudaLlamaModel::Impl::plan_batch(const ForwardBatch& batch,
                                                            const CudaKvCache& cache, bool greedy,
                                                            std::vector<int32_t>& meta_out) const {
  const auto& c = config;
  Plan p;
  p.n = static_cast<int64_t>(batch.tokens.size());
  p.n_out = static_cast<int64_t>(batch.logit_rows.size());
  // Table rows padded with -1 to a power of two (never past the cache's block count unless the
  // batch's own width is): decode steps keep their plan, and graph, while sequences grow.
  const int64_t batch_mbps = batch.max_blocks_per_seq;
  p.mbps = 1;
  while (p.mbps < batch_mbps) p.mbps *= 2;
  p.mbps = std::max(batch_mbps, std::min(p.mbps, cache.n_blocks()));
  p.greedy = greedy;
  p.cache = &cache;
  const int64_t group = shard_config.n_head / shard_config.n_head_kv;

  // Runs: maximal stretches of consecutive batch rows of one sequence at consecutive positions. As
  // attention_decode "sequences" (each with its own copy of the table row) they cover any batch.
  std::vector<int32_t> run_start{0}, run_len;
  for (int64_t t = 1; t <= p.n; ++t) {
    const bool continues = t < p.n && batch.seq_index[t] == batch.seq_index[t - 1] &&
                           batch.positions[t] == batch.positions[t - 1] + 1;
    if (!continues) {
      run_len.push_back(static_cast<int32_t>(t - run_start.back()));
      if (t < p.n) run_start.push_back(static_cast<int32_t>(t));
    }
  }
  p.n_runs = static_cast<int64_t>(run_len.size());
  const int64_t max_run = *std::max_element(run_len.begin(), run_len.end());
  p.use_decode = options.decode_attention && (c.head_dim == 64 || c.head_dim == 128) &&
                 max_run * group <= kc::kAttentionMaxRowsPerKvHead && p.n_runs <= 65535;

  // int32 metadata, one copy: tokens, positions, seq_index, block tables, logit rows, then for
  // attention_decode the runs' lengths, query starts and table rows.
  meta_out.clear();
  auto append = [&](const std::vector<int32_t>& v) {
    const auto off = static_cast<int64_t>(meta_out.size());
    meta_out.insert(meta_out.end(), v.begin(), v.end());
    return off;
  };
  p.off_tokens = append(batch.tokens);
  p.off_pos = append(batch.positions);
  p.off_seq = append(batch.seq_index);
  std::vector<int32_t> tables(
      static_cast<size_t>(batch_mbps > 0 ? batch.block_tables.size() / batch_mbps : 0) *
          static_cast<size_t>(p.mbps),
      -1);
  for (size_t row = 0; batch_mbps > 0 && row < tables.size() / static_cast<size_t>(p.mbps); ++row) {
    std::copy_n(batch.block_tables.begin() + static_cast<int64_t>(row) * batch_mbps, batch_mbps,
                tables.begin() + static_cast<int64_t>(row) * p.mbps);
  }
  p.off_tables = append(tables);
  p.off_rows = append(batch.logit_rows);
  if (p.use_decode) {
    std::vector<int32_t> seq_lens, query_start, run_tables;
    for (int64_t r = 0; r < p.n_runs; ++r) {
      const int64_t last = run_start[r] + run_len[r] - 1;
      seq_lens.push_back(batch.positions[last] + 1);
      query_start.push_back(run_start[r]);
      const auto row = tables.begin() + batch.seq_index[run_start[r]] * p.mbps;
      run_tables.insert(run_tables.end(), row, row + p.mbps);
    }
    query_start.push_back(static_cast<int32_t>(p.n));
    p.off_seq_lens = append(seq_lens);
    p.off_query_start = append(query_start);
    p.off_run_tables = append(run_tables);
    p.dshape.n_seqs = p.n_runs;
    p.dshape.tokens = p.n;
    p.dshape.max_q_len = max_run;
    p.dshape.n_head = shard_config.n_head;
    p.dshape.n_head_kv = shard_config.n_head_kv;
    p.dshape.head_dim = c.head_dim;
    p.dshape.block_size = cache.block_size();
    p.dshape.num_blocks = cache.n_blocks();
    p.dshape.max_blocks_per_seq = p.mbps;
    // The (padded) tables' capacity rather than the batch's longest sequence: the split grid then
    // depends only on the plan, so decode steps keep one plan (and one graph) as sequences grow.
    // Splits past a sequence's length return at once.
    p.dshape.max_seq_len = p.mbps * cache.block_size();
    p.dshape.split_tokens = kDecodeSplitTokens;
  } else if (const int64_t tile_tokens =
                 kc::prefill_attention_tile_tokens(shard_config.n_head, shard_config.n_head_kv);
             (c.head_dim == 64 || c.head_dim == 128) && tile_tokens > 0) {
    // Prompt chunks: the runs cut into prefill_attention_f16's tiles.
    std::vector<int32_t> tiles;
    for (int64_t r = 0; r < p.n_runs; ++r) {
      for (int64_t off = 0; off < run_len[r]; off += tile_tokens) {
        tiles.push_back(static_cast<int32_t>(run_start[r] + off));
        tiles.push_back(static_cast<int32_t>(std::min<int64_t>(tile_tokens, run_len[r] - off)));
      }
    }
    p.n_tiles = static_cast<int64_t>(tiles.size() / 2);
    p.off_tiles = append(tiles);
  }
  p.meta_count = meta_out.size();
  return p;
}

bool CudaLlamaModel::Impl::reserve_buffers(const Plan& p) {
  try {
    return grow_buffers(p);
  } catch (...) {
    clear_graphs();  // buffers that moved before the failure are not reported: drop every graph
    throw;
  }
}

bool CudaLlamaModel::Impl::grow_buffers(const Plan& p) {
  const auto& c = shard_config;  // local heads and ffn rows; n_embd and n_vocab are whole
  const int64_t n = p.n, rows_out = std::max<int64_t>(p.n_out, 1);
  bool moved = false;
  moved |= meta.reserve(p.meta_count * sizeof(int32_t));
  moved |= h16.reserve(static_cast<size_t>(n * c.n_embd) * sizeof(__half));
  moved |= resid.reserve(static_cast<size_t>(n * c.n_embd) * sizeof(float));
  moved |= delta.reserve(static_cast<size_t>(n * c.n_embd) * sizeof(float));
  moved |= qkv.reserve(static_cast<size_t>(n * (c.q_dim() + 2 * c.kv_dim())) * sizeof(float));
  moved |= q16.reserve(static_cast<size_t>(n * c.q_dim()) * sizeof(__half));
  moved |= att16.reserve(static_cast<size_t>(n * c.q_dim()) * sizeof(__half));
  moved |= gate_up.reserve(static_cast<size_t>(n * 2 * c.n_ff) * sizeof(float));
  moved |= act16.reserve(static_cast<size_t>(n * c.n_ff) * sizeof(__half));
  moved |= picked16.reserve(static_cast<size_t>(rows_out * c.n_embd) * sizeof(__half));
  moved |= logits.reserve(static_cast<size_t>(rows_out * c.n_vocab) * sizeof(float));
  if (shard.size > 1 && last_stage()) {
    moved |= local_logits.reserve(static_cast<size_t>(rows_out * head.n_out) * sizeof(float));
  }
  moved |= ids.reserve(static_cast<size_t>(rows_out) * sizeof(int32_t));
  moved |= flag.reserve(sizeof(int32_t));
  if (norm_counter.reserve(sizeof(uint32_t))) {  // once
    moved = true;
    cuda_check(cudaMemsetAsync(norm_counter.as<void>(), 0, norm_counter.bytes(), stream),
               "cudaMemsetAsync (norm counter)");
  }
  if (p.use_decode) {
    moved |= workspace.reserve(kc::attention_decode_workspace_bytes(p.dshape));
    if (attention_counters.reserve(static_cast<size_t>(p.dshape.n_seqs * p.dshape.n_head_kv) *
                                   sizeof(uint32_t))) {
      moved = true;  // zero once: each pass leaves them zero
      cuda_check(cudaMemsetAsync(attention_counters.as<void>(), 0, attention_counters.bytes(), stream),
                 "cudaMemsetAsync (attention counters)");
    }
  }
  return moved;
}

void CudaLlamaModel::Impl::enqueue(const Plan& p) {
  const auto& c = shard_config;  // local heads, ffn rows and layers; n_embd, n_vocab, head_dim whole
  const int64_t n = p.n, n_out = p.n_out;
  const int64_t q_dim = c.q_dim(), kv_dim = c.kv_dim(), qkv_dim = q_dim + 2 * kv_dim;
  const CudaKvCache& cache = *p.cache;
  // Programmatic launches (CudaModelOptions::programmatic_launch) for the matrix products (matmul) and
  // the kernels between them.
  const bool pdl = options.programmatic_launch;
  int32_t* md = meta.as<int32_t>();
  int32_t* flag_d = flag.as<int32_t>();
  cuda_check(cudaMemsetAsync(flag_d, 0, sizeof(int32_t), stream), "cudaMemsetAsync");

  auto* h = h16.as<__half>();
  auto* x = resid.as<float>();
  auto* dl = delta.as<float>();
  if (first_stage()) {  // later stages find the previous stage's hidden states in resid
    const Timed timed(*this, Section::embedding);
    check(kc::embedding_lookup_f16(embedding.mem->as<void>(),
                                   embedding.kind == DeviceKind::q4_0   ? kernels::DType::Q4_0
                                   : embedding.kind == DeviceKind::q8_0 ? kernels::DType::Q8_0
                                                                        : kernels::DType::F16,
                                   embedding.n_out, c.n_embd, 0, md + p.off_tokens, n, h, flag_d, stream),
          "embedding lookup");
    check(kc::f16_to_f32(h, x, n * c.n_embd, stream), "f16_to_f32");
  }
  const auto hidden_count = static_cast<size_t>(n * c.n_embd);

  kc::RopeKvWriteShape rshape;
  rshape.tokens = n;
  rshape.n_head = c.n_head;
  rshape.n_head_kv = c.n_head_kv;
  rshape.head_dim = c.head_dim;
  rshape.rot_dims = c.rope_dims;
  rshape.rope_base = c.rope_base;
  rshape.block_size = cache.block_size();
  rshape.num_blocks = cache.n_blocks();
  rshape.max_blocks_per_seq = p.mbps;

  kc::PagedAttentionShape pshape;
  pshape.tokens = n;
  pshape.n_head = c.n_head;
  pshape.n_head_kv = c.n_head_kv;
  pshape.head_dim = c.head_dim;
  pshape.block_size = cache.block_size();
  pshape.num_blocks = cache.n_blocks();
  pshape.max_blocks_per_seq = p.mbps;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));

  // One token, unsharded: a product on the half2 GEMV followed by a residual add + RMSNorm does the
  // norm in its last block (matmul_add_norm); `normed` then says the next norm is done.
  const bool norm_in_products = n == 1 && reducer == nullptr && options.fused_norms;
  bool normed = false;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const Layer& w = layers[static_cast<size_t>(l)];
    // The previous layer's w_down output joins the residual here (the first layer has none).
    if (!normed) {
      const Timed timed(*this, Section::norms);
      check(kc::add_rms_norm_f32(x, l == 0 ? nullptr : dl, w.attn_norm->as<float>(), h, n, c.n_embd,
                                 c.rms_eps, stream, pdl),
            "add_rms_norm_f32");
    }
    auto* kc_l = reinterpret_cast<__half*>(cache.k(l));
    auto* vc_l = reinterpret_cast<__half*>(cache.v(l));
    if (n == 1 && fuses_one_row(w.qkv)) {
      const Timed timed(*this, Section::qkv);  // RoPE and the KV write in the product's epilogue
      check(project_rope_kv(w.qkv.parts.front(), h, rshape, md + p.off_pos, md + p.off_seq, md + p.off_tables,
                            q16.as<__half>(), kc_l, vc_l, flag_d),
            "half2 GEMV with RoPE and the KV write (q / k / v)");
    } else {
      auto* qkv_f = qkv.as<float>();
      {
        const Timed timed(*this, Section::qkv);
        project(w.qkv, h, n, qkv_f);
      }
      const float *qp = qkv_f, *kp = nullptr, *vp = nullptr;
      if (w.qkv.parts.size() == 1) {  // stacked: rows [q | k | v]
        kp = qkv_f + q_dim;
        vp = qkv_f + q_dim + kv_dim;
        rshape.q_stride = rshape.kv_stride = qkv_dim;
      } else {  // [n, q_dim], then [n, kv_dim] twice
        kp = qkv_f + n * q_dim;
        vp = kp + n * kv_dim;
        rshape.q_stride = q_dim;
        rshape.kv_stride = kv_dim;
      }
      const Timed timed(*this, Section::rope_kv);
      check(kc::rope_kv_write(rshape, qp, kp, vp, md + p.off_pos, md + p.off_seq, md + p.off_tables,
                              q16.as<__half>(), kc_l, vc_l, flag_d, stream, pdl),
            "rope_kv_write");
    }
    std::optional<Timed> attention_span(std::in_place, *this, Section::attention);
    if (p.use_decode) {
      check(kc::attention_decode(p.dshape, q16.as<__half>(), kc_l, vc_l, md + p.off_run_tables,
                                 md + p.off_seq_lens, md + p.off_query_start, scale, att16.as<__half>(),
                                 workspace.as<void>(), workspace.bytes(), flag_d, stream, pdl,
                                 attention_counters.as<unsigned>()),
            "attention_decode");
    } else {
      if (p.n_tiles > 0) {
        check(kc::prefill_attention_f16(pshape, q16.as<__half>(), kc_l, vc_l, md + p.off_tables,
                                        md + p.off_seq, md + p.off_pos, md + p.off_tiles, p.n_tiles, scale,
                                        att16.as<__half>(), flag_d, stream),
              "prefill_attention_f16");
      } else {
        check(kc::paged_attention_f16(pshape, q16.as<__half>(), kc_l, vc_l, md + p.off_tables, md + p.off_seq,
                                      md + p.off_pos, scale, att16.as<__half>(), flag_d, stream),
              "paged_attention_f16");
      }
    }
    attention_span.reset();
    if (norm_in_products && fuses_one_row(w.wo)) {
      const Timed timed(*this, Section::attn_out);  // the residual add and ffn norm in its last block
      check(matmul_add_norm(w.wo, att16.as<__half>(), w.ffn_norm->as<float>(), dl, x, h,
                            norm_counter.as<unsigned>()),
            "half2 GEMV with the residual add and RMSNorm");
    } else {
      {
        const Timed timed(*this, Section::attn_out);
        matmul(w.wo, att16.as<__half>(), n, dl);  // partial over the shard's heads
      }
      reduce_sum(dl, hidden_count);
      const Timed timed(*this, Section::norms);
      check(kc::add_rms_norm_f32(x, dl, w.ffn_norm->as<float>(), h, n, c.n_embd, c.rms_eps, stream, pdl),
            "add_rms_norm_f32");
    }
    if (n == 1 && fuses_one_row(w.gate_up)) {
      const Timed timed(*this, Section::gate_up);  // SwiGLU in the product's epilogue
      check(project_swiglu(w.gate_up.parts.front(), h, act16.as<__half>()),
            "half2 GEMV with SwiGLU (gate / up)");
    } else {
      auto* gu = gate_up.as<float>();
      {
        const Timed timed(*this, Section::gate_up);
        project(w.gate_up, h, n, gu);
      }
      const bool stacked = w.gate_up.parts.size() == 1;
      const Timed timed(*this, Section::swiglu);
      check(kc::swiglu_f32_to_f16(gu, stacked ? gu + c.n_ff : gu + n * c.n_ff, stacked ? 2 * c.n_ff : c.n_ff,
                                  act16.as<__half>(), n, c.n_ff, stream, pdl),
            "swiglu_f32_to_f16");
    }
    // The next norm: the next layer's attention norm, or after the last layer the output norm (last
    // stage only: a pipeline stage hands its residual on without one).
    const bool last_layer = l + 1 == c.n_layer;
    const DeviceMemory* next_norm = last_layer ? (last_stage() ? output_norm.get() : nullptr)
                                               : layers[static_cast<size_t>(l + 1)].attn_norm.get();
    normed = norm_in_products && next_norm != nullptr && fuses_one_row(w.down);
    if (normed) {
      const Timed timed(*this, Section::down);  // the residual add and the next norm in its last block
      check(matmul_add_norm(w.down, act16.as<__half>(), next_norm->as<float>(), dl, x, h,
                            norm_counter.as<unsigned>()),
            "half2 GEMV with the residual add and RMSNorm");
    } else {
      {
        const Timed timed(*this, Section::down);
        matmul(w.down, act16.as<__half>(), n, dl);  // partial over the shard's ffn rows
      }
      reduce_sum(dl, hidden_count);
    }
  }
  if (!last_stage()) {  // the last w_down output joins the residual, which goes to the next stage
    const float one = 1.0f;
    cublas_check(cublasSaxpy(cublas, static_cast<int>(hidden_count), &one, dl, 1, x, 1), "cublasSaxpy");
    return;
  }
  // The last w_down output joins the residual, and the output norm runs on every row (cheap next to
  // the head, which runs only on the logit rows).
  const Timed timed(*this, Section::head);
  if (!normed) {
    check(kc::add_rms_norm_f32(x, dl, output_norm->as<float>(), h, n, c.n_embd, c.rms_eps, stream, pdl),
          "add_rms_norm_f32");
  }
  if (n_out > 0) {
    check(kc::gather_rows_f16(h, n, c.n_embd, md + p.off_rows, n_out, picked16.as<__half>(), flag_d, stream),
          "gather_rows_f16");
    if (shard.size == 1) {
      matmul(head, picked16.as<__half>(), n_out, logits.as<float>());
    } else {  // the shard's vocabulary columns, gathered into full rows
      matmul(head, picked16.as<__half>(), n_out, local_logits.as<float>());
      gather_logits(n_out);
    }
    if (p.greedy) {
      check(kc::argmax_rows(logits.as<float>(), n_out, c.n_vocab, ids.as<int32_t>(), stream), "argmax_rows");
    }
  }
}

void CudaLlamaModel::Impl::clear_graphs() {
  for (auto& [key, exec] : graphs) cudaGraphExecDestroy(exec);
  graphs.clear();
}

void CudaLlamaModel::Impl::launch_graph(const Plan& p) {
  const auto key = p.key();
  auto it = graphs.find(key);
  if (it == graphs.end() && seen_once.insert(key).second) {
    // First sight: run directly. One-off shapes (prompts) are never captured, and a model's first
    // pass (cuBLAS's and every kernel's first use) is not made inside a capture.
    if (seen_once.size() > kMaxSeenShapes) seen_once = {key};
    enqueue(p);
    return;
  }
  if (it == graphs.end()) {
    if (graphs.size() >= kMaxGraphs) clear_graphs();
    cuda_check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    cudaGraph_t graph = nullptr;
    try {
      enqueue(p);
    } catch (...) {
      cudaStreamEndCapture(stream, &graph);  // leaves capture mode; the partial graph is dropped
      if (graph != nullptr) cudaGraphDestroy(graph);
      throw;
    }
    cuda_check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
    cudaGraphExec_t exec = nullptr;
    const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    cuda_check(err, "cudaGraphInstantiate");
    it = graphs.emplace(key, exec).first;
  }
  cuda_check(cudaGraphLaunch(it->second, stream), "cudaGraphLaunch");
}

void CudaLlamaModel::Impl::forward_impl(const ForwardBatch& batch, CudaKvCache& cache, const float* hidden_in,
                                        std::vector<float>* logits_out, std::vector<int32_t>* ids_out,
                                        RowSampling sampling) {
  validate(batch, cache);
  if ((hidden_in == nullptr) != first_stage()) {
    throw std::invalid_argument(first_stage() ? "the first pipeline stage embeds tokens: no hidden_in"
                                              : "a later pipeline stage needs hidden_in");
  }
  if (ids_out != nullptr && !last_stage())
    throw std::logic_error("forward_greedy: only the last stage has logits");
  const auto& c = config;
  const auto n = static_cast<int64_t>(batch.tokens.size());
  const auto n_out = static_cast<int64_t>(batch.logit_rows.size());
  if (n == 0) {
    if (logits_out != nullptr) logits_out->clear();
    if (ids_out != nullptr) ids_out->clear();
    return;
  }
  cuda_check(cudaSetDevice(options.device), "cudaSetDevice");
  // Sampled ids: the pass computes the logits (not the argmax), then sample_rows draws from them.
  const bool sample = sampling.params != nullptr;
  const Plan p = plan_batch(batch, cache, ids_out != nullptr && !sample, meta_host);
  // A buffer that moved invalidates every captured graph (they hold its old address).
  if (reserve_buffers(p)) clear_graphs();
  const size_t meta_bytes = meta_host.size() * sizeof(int32_t);
  meta_pinned.reserve(meta_bytes);  // the previous pass has synchronized: no copy still reads it
  std::memcpy(meta_pinned.as<int32_t>(), meta_host.data(), meta_bytes);
  cuda_check(cudaMemcpyAsync(meta.as<int32_t>(), meta_pinned.as<int32_t>(), meta_bytes,
                             cudaMemcpyHostToDevice, stream),
             "cudaMemcpyAsync (batch metadata)");
  const size_t hidden_bytes = static_cast<size_t>(n * c.n_embd) * sizeof(float);
  if (hidden_in != nullptr) {
    cuda_check(cudaMemcpyAsync(resid.as<float>(), hidden_in, hidden_bytes, cudaMemcpyHostToDevice, stream),
               "cudaMemcpyAsync (hidden states in)");
  }
  if (timer != nullptr) {
    // A profile: the stream first runs a delay kernel while the host queues the whole pass behind it,
    // so that the events time the device, not the host's launches. (A host function holding the
    // stream until the pass is queued deadlocks once the launch queue is full: a 70B pass is ~2,000
    // kernels and events.)
    check(kc::device_delay(kProfileHeadStartNs, stream), "device_delay (profile)");
    enqueue(p);
  } else if (use_graphs(n)) {
    launch_graph(p);
  } else {
    enqueue(p);
  }

  if (sample && n_out > 0) {
    sample_workspace.reserve(sampling_workspace_bytes(n_out, c.n_vocab));
    sample_params.reserve(static_cast<size_t>(n_out) * sizeof(kc::SamplingRowParams));
    sample_uniforms.reserve(static_cast<size_t>(n_out) * sizeof(double));
    cuda_check(cudaMemcpyAsync(sample_params.as<void>(), sampling.params->data(),
                               static_cast<size_t>(n_out) * sizeof(kc::SamplingRowParams),
                               cudaMemcpyHostToDevice, stream),
               "cudaMemcpyAsync (sampling parameters)");
    cuda_check(cudaMemcpyAsync(sample_uniforms.as<void>(), sampling.uniforms->data(),
                               static_cast<size_t>(n_out) * sizeof(double), cudaMemcpyHostToDevice, stream),
               "cudaMemcpyAsync (uniforms)");
    if (sampling.penalties != nullptr && !sampling.penalties->empty()) {
      // [offsets (rows + 1)][penalties (rows)][ids], int32 and float words, one copy.
      const size_t n_ids = sampling.penalty_ids->size();
      const size_t words = static_cast<size_t>(2 * n_out + 1) + n_ids;
      penalty_buffer.reserve(words * sizeof(int32_t));
      std::vector<int32_t> packed(words);
      std::copy(sampling.penalty_offsets->begin(), sampling.penalty_offsets->end(), packed.begin());
      std::memcpy(packed.data() + n_out + 1, sampling.penalties->data(),
                  static_cast<size_t>(n_out) * sizeof(float));
      std::copy(sampling.penalty_ids->begin(), sampling.penalty_ids->end(), packed.begin() + 2 * n_out + 1);
      // Pageable source: the copy has read it when the call returns.
      cuda_check(cudaMemcpyAsync(penalty_buffer.as<int32_t>(), packed.data(), words * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, stream),
                 "cudaMemcpyAsync (repetition penalty)");
      const int32_t* d = penalty_buffer.as<int32_t>();
      check(kc::apply_repetition_penalty(logits.as<float>(), n_out, c.n_vocab, d + 2 * n_out + 1, d,
                                         reinterpret_cast<const float*>(d + n_out + 1), stream),
            "apply_repetition_penalty");
    }
    check(kc::sample_rows(logits.as<float>(), sample_params.as<kc::SamplingRowParams>(),
                          sample_uniforms.as<double>(), n_out, c.n_vocab, ids.as<int32_t>(),
                          sample_workspace.as<void>(), sample_workspace.bytes(), stream),
          "sample_rows");
  }
  results_pinned.reserve(static_cast<size_t>(1 + n_out) * sizeof(int32_t));
  int32_t* flag_host = results_pinned.as<int32_t>();
  int32_t* ids_host = flag_host + 1;
  *flag_host = 0;
  cuda_check(cudaMemcpyAsync(flag_host, flag.as<int32_t>(), sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync (error flag)");
  if (logits_out != nullptr && !last_stage()) {
    logits_out->resize(static_cast<size_t>(n * c.n_embd));
    cuda_check(
        cudaMemcpyAsync(logits_out->data(), resid.as<float>(), hidden_bytes, cudaMemcpyDeviceToHost, stream),
        "cudaMemcpyAsync (hidden states out)");
  } else if (logits_out != nullptr) {
    logits_out->resize(static_cast<size_t>(n_out * c.n_vocab));
    if (n_out > 0) {
      cuda_check(cudaMemcpyAsync(logits_out->data(), logits.as<float>(), logits_out->size() * sizeof(float),
                                 cudaMemcpyDeviceToHost, stream),
                 "cudaMemcpyAsync (logits)");
    }
  }
  if (ids_out != nullptr && n_out > 0) {
    cuda_check(cudaMemcpyAsync(ids_host, ids.as<int32_t>(), static_cast<size_t>(n_out) * sizeof(int32_t),
                               cudaMemcpyDeviceToHost, stream),
               "cudaMemcpyAsync (ids)");
  }
  cuda_check(cudaStreamSynchronize(stream), "forward pass");
  if (ids_out != nullptr) ids_out->assign(ids_host, ids_host + n_out);
  if (*flag_host != 0) {
    throw std::runtime_error(
        "the CUDA forward pass found bad metadata on the device (a token, position or "
        "block id out of range) that the host checks missed");
  }
}

std::unique_ptr<CudaLlamaModel> CudaLlamaModel::load(const std::string& path, CudaModelOptions options,
                                                     TensorShard shard, ShardReducer* reducer,
                                                     LayerRange layers) {
  return std::make_unique<CudaLlamaModel>(model::LlamaCheckpoint::open(path), options, shard, reducer,
                                          layers);
}

CudaLlamaModel::CudaLlamaModel(std::shared_ptr<const model::LlamaCheckpoint> checkpoint,
                               CudaModelOptions options, TensorShard shard, ShardReducer* reducer,
                               LayerRange layers)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.checkpoint = std::move(checkpoint);
  m.config = m.checkpoint->config();
  m.options = options;
  m.shard = shard;
  const auto& c = m.config;
  if (shard.size < 1 || shard.rank < 0 || shard.rank >= shard.size) {
    throw std::invalid_argument("tensor shard " + std::to_string(shard.rank) + " of " +
                                std::to_string(shard.size) + " is not a valid shard");
  }
  if (shard.size > 1) {
    if (reducer == nullptr) throw std::invalid_argument("a sharded model needs a ShardReducer");
    m.reducer = reducer;
  }
  m.layer_begin = layers.begin;
  m.layer_end = layers.end < 0 ? c.n_layer : layers.end;
  if (m.layer_begin < 0 || m.layer_begin >= m.layer_end || m.layer_end > c.n_layer) {
    throw std::invalid_argument("layer range [" + std::to_string(m.layer_begin) + ", " +
                                std::to_string(m.layer_end) + ") is not inside the model's " +
                                std::to_string(c.n_layer) + " layers");
  }
  // The weights are bound (views into the file, or converted) before the device is touched, so that
  // a split that cannot be made fails first. A dummy's matrices are all Q4_0: blocks of 32.
  model::LlamaConfig stage = c;
  stage.n_layer = m.layer_end - m.layer_begin;
  model::LlamaWeights weights;
  if (m.checkpoint->is_dummy()) {
    m.split = plan_shard(stage, shard, 32);
  } else {
    weights = m.checkpoint->bind_weights(m.layer_begin, m.layer_end);
    weights.layers.erase(weights.layers.begin() + m.layer_end, weights.layers.end());
    weights.layers.erase(weights.layers.begin(), weights.layers.begin() + m.layer_begin);
    m.split = plan_shard(stage, shard, ffn_down_granularity(weights.layers));
  }
  m.shard_config = m.split.config;
  if (m.shard_config.n_ff % 32 != 0) {
    throw std::invalid_argument("the CUDA forward pass needs each shard's n_ff (" +
                                std::to_string(m.shard_config.n_ff) + ") to be a multiple of 32");
  }
  if (c.n_embd % 32 != 0 || c.n_ff % 32 != 0) {
    throw std::invalid_argument("the CUDA forward pass needs n_embd and n_ff to be multiples of 32");
  }
  if (c.head_dim % 2 != 0 || c.head_dim > kc::kPagedAttentionMaxHeadDim || c.rope_dims < 2 ||
      c.rope_dims % 2 != 0) {
    throw std::invalid_argument(
        "the CUDA forward pass needs an even head_dim of at most 256 (this model has " +
        std::to_string(c.head_dim) + ") and an even number of rotated dims");
  }
  const bool rows_only =
      options.int4_kernels == Int4Kernels::cuda_cores || options.int4_kernels == Int4Kernels::half2;
  if (options.int4_layout == Int4Layout::tiles && rows_only) {
    throw std::invalid_argument(
        std::string("int4_kernels ") + int4_kernels_name(options.int4_kernels) +
        " cannot read int4_layout tiles (only the tensor-core kernels and dequant + cuBLAS "
        "read tiles): use int4_layout rows, or int4_kernels measured or tensor_cores");
  }
  if (options.int4_layout == Int4Layout::cutlass && rows_only) {
    throw std::invalid_argument(std::string("int4_kernels ") + int4_kernels_name(options.int4_kernels) +
                                " cannot read int4_layout cutlass (only the CUTLASS GEMM reads it): use "
                                "int4_layout rows, or int4_kernels measured or tensor_cores");
  }
  if (options.int4_layout == Int4Layout::measured && options.int4_kernels != Int4Kernels::measured) {
    throw std::invalid_argument(
        std::string(
            "int4_layout measured times each layout's kernels at load: it needs int4_kernels measured, "
            "not ") +
        int4_kernels_name(options.int4_kernels));
  }
  if (options.int4_layout == Int4Layout::measured && options.cutlass_gemm) {
    throw std::invalid_argument(
        "int4_layout measured weighs the CUTLASS copy itself (and keeps one copy of each matrix): drop "
        "cutlass_gemm, or choose int4_layout rows or tiles with it");
  }
  if (options.int8_activations && options.int4_layout != Int4Layout::rows) {
    throw std::invalid_argument(
        std::string("int8_activations needs int4_layout rows (the W4A8 GEMV reads the "
                    "row-major layout), not ") +
        int4_layout_name(options.int4_layout));
  }
  if (options.cutlass_gemm && options.int4_kernels == Int4Kernels::cuda_cores) {
    throw std::invalid_argument(
        "cutlass_gemm needs int4_kernels measured, tensor_cores or half2 (cuda_cores pins every product to "
        "the CUDA "
        "cores)");
  }
  require_device(options.device);
  const bool wants_cutlass = options.cutlass_gemm || options.int4_layout == Int4Layout::cutlass;
  const char* cutlass_what = options.cutlass_gemm ? "cutlass_gemm" : "int4_layout cutlass";
  if (wants_cutlass && !kc::w4a16_cutlass_supported()) {
    throw std::invalid_argument(std::string(cutlass_what) +
                                (kc::w4a16_cutlass_built()
                                     ? ": the CUTLASS GEMM needs a compute capability 9.0 GPU (H100 / H200); "
                                       "this one is not"
                                     : ": this build has no CUTLASS GEMM (CUTLASS was not found at configure "
                                       "time: tools/fetch-cutlass.sh)"));
  }
  cuda_check(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  cublas_check(cublasCreate(&m.cublas), "cublasCreate");
  cublas_check(cublasSetStream(m.cublas, m.stream), "cublasSetStream");
  m.cublas_workspace.reserve(kCublasWorkspaceBytes);
  cublas_check(cublasSetWorkspace(m.cublas, m.cublas_workspace.as<void>(), kCublasWorkspaceBytes),
               "cublasSetWorkspace");

  if (m.checkpoint->is_dummy()) {
    // Never on the host: llama-70b's weights would take ~40 GB there.
    m.make_dummy_weights();
    cuda_check(cudaDeviceSynchronize(), "dummy weights");
  } else {
    m.upload_weights(std::move(weights));
    // A pageable cudaMemcpy may return before its DMA lands, and the model's stream does not wait
    // for the legacy default stream: make the uploads complete before the first forward pass.
    cuda_check(cudaDeviceSynchronize(), "weight upload");
  }
  m.choose_int4_layouts();
  m.make_cutlass_copies();
  m.tile_int4_matrices();
  m.choose_int4_kernels();
}

CudaLlamaModel::~CudaLlamaModel() = default;

const model::LlamaConfig& CudaLlamaModel::config() const { return impl_->config; }
const model::LlamaConfig& CudaLlamaModel::shard_config() const { return impl_->shard_config; }
TensorShard CudaLlamaModel::shard() const { return impl_->shard; }
LayerRange CudaLlamaModel::layers() const { return {impl_->layer_begin, impl_->layer_end}; }
bool CudaLlamaModel::is_first_stage() const { return impl_->first_stage(); }
bool CudaLlamaModel::is_last_stage() const { return impl_->last_stage(); }
const model::LlamaCheckpoint& CudaLlamaModel::checkpoint() const { return *impl_->checkpoint; }

int64_t CudaLlamaModel::weight_bytes() const {
  const Impl& m = *impl_;
  // A tied head shares the table (on a later stage both may be null: a CUTLASS-only head counts).
  const bool shared = m.head.mem != nullptr && m.head.mem == m.embedding.mem;
  int64_t b = m.embedding.bytes() + (shared ? 0 : m.head.bytes());
  for (const Layer& l : m.layers) b += l.qkv.bytes() + l.wo.bytes() + l.gate_up.bytes() + l.down.bytes();
  return b;
}

int64_t CudaLlamaModel::captured_graphs() const { return static_cast<int64_t>(impl_->graphs.size()); }

void CudaLlamaModel::set_programmatic_launch(bool on) {
  if (impl_->options.programmatic_launch == on) return;
  impl_->options.programmatic_launch = on;
  impl_->clear_graphs();  // they hold launches of the other kind
}

void CudaLlamaModel::set_fused_epilogues(bool on) {
  if (impl_->options.fused_epilogues == on) return;
  impl_->options.fused_epilogues = on;
  impl_->clear_graphs();  // they hold the other kernels
}

void CudaLlamaModel::set_fused_norms(bool on) {
  if (impl_->options.fused_norms == on) return;
  impl_->options.fused_norms = on;
  impl_->clear_graphs();
}

const std::vector<CudaInt4KernelChoice>& CudaLlamaModel::int4_kernel_choices() const {
  return impl_->int4_choices;
}

const std::vector<CudaQ4KChoice>& CudaLlamaModel::q4_k_choices() const { return impl_->q4_k_choices; }

const std::vector<CudaFusionChoice>& CudaLlamaModel::one_row_fusions() const { return impl_->fusion_choices; }

void CudaLlamaModel::forward(const ForwardBatch& batch, CudaKvCache& cache, std::vector<float>& logits) {
  impl_->forward_impl(batch, cache, nullptr, &logits, nullptr, Impl::RowSampling{});
}

void CudaLlamaModel::forward_greedy(const ForwardBatch& batch, CudaKvCache& cache,
                                    std::vector<int32_t>& ids) {
  impl_->forward_impl(batch, cache, nullptr, nullptr, &ids, Impl::RowSampling{});
}

void CudaLlamaModel::forward_stage_verify(const ForwardBatch& batch, CudaKvCache& cache,
                                          const float* hidden_in, const std::vector<VerifySequence>& seqs,
                                          std::vector<int32_t>& accepted,
                                          std::vector<std::vector<int32_t>>& tokens) {
  Impl& m = *impl_;
  if (!m.last_stage()) throw std::logic_error("forward_verify: only the last stage has logits to verify");
  const int64_t n_vocab = m.config.n_vocab;
  const auto v = static_cast<size_t>(n_vocab);
  size_t rows = 0;
  int64_t k_max = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const VerifySequence& seq = seqs[s];
    const size_t k = seq.drafts.size();
    const std::string where = "forward_verify: sequence " + std::to_string(s) + ": ";
    validate(seq.params);
    if (k < 1) throw std::invalid_argument(where + "no draft tokens to verify");
    if (seq.params.temperature <= 0.0f || seq.params.repetition_penalty != 1.0f)
      throw std::invalid_argument(where + "needs temperature > 0 and no repetition penalty");
    if (seq.kept_probs != nullptr) {
      const KeptRows& kept = *seq.kept_probs;
      if (kept.device_data() == nullptr || kept.row_size() != n_vocab ||
          kept.rows() < static_cast<int64_t>(k) || !seq.draft_probs.empty()) {
        throw std::invalid_argument(where + "kept draft distributions of " + std::to_string(kept.rows()) +
                                    " rows of " + std::to_string(kept.row_size()) + " (" +
                                    (kept.device_data() == nullptr ? "on the host" : "on a device") +
                                    ") for " + std::to_string(k) + " drafts (need device rows of n_vocab)");
      }
    } else if (seq.draft_probs.size() != k * v) {
      throw std::invalid_argument(where + std::to_string(seq.draft_probs.size()) +
                                  " draft probabilities for " + std::to_string(k) +
                                  " drafts (need [k, n_vocab])");
    }
    if (seq.uniforms.size() != k + 1) {
      throw std::invalid_argument(where + std::to_string(seq.uniforms.size()) + " uniforms for " +
                                  std::to_string(k) + " drafts (need k + 1)");
    }
    for (const double u : seq.uniforms)
      if (!(u >= 0.0 && u < 1.0)) throw std::invalid_argument(where + "a uniform outside [0, 1)");
    rows += k + 1;
    k_max = std::max(k_max, static_cast<int64_t>(k));
  }
  if (rows != batch.logit_rows.size()) {
    throw std::invalid_argument("forward_verify: " + std::to_string(batch.logit_rows.size()) +
                                " logit rows for sequences that verify " + std::to_string(rows) +
                                " positions");
  }
  // The pass, its logits (gathered whole on a tensor shard) left on the device.
  m.forward_impl(batch, cache, hidden_in, nullptr, nullptr, Impl::RowSampling{});
  accepted.clear();
  tokens.clear();
  if (seqs.empty()) return;

  const auto n_seqs = static_cast<int64_t>(seqs.size());
  const auto slots = static_cast<size_t>(k_max + 1);
  std::vector<kc::SamplingRowParams> row_params;
  std::vector<int32_t> ints(static_cast<size_t>(n_seqs) * (2 * slots + 1) + 1, 0);  // see below
  std::vector<double> uniforms(static_cast<size_t>(n_seqs) * slots, 0.0);
  // ints: draft tokens [n_seqs, k_max], counts [n_seqs], then the kernel's out tokens
  // [n_seqs, k_max + 1], accepted [n_seqs] and bad-input flag [1].
  int32_t* draft_tokens = ints.data();
  int32_t* counts = draft_tokens + n_seqs * k_max;
  int32_t* out_tokens = counts + n_seqs;
  int32_t* out_accepted = out_tokens + n_seqs * (k_max + 1);  // then the bad-input flag
  for (size_t s = 0; s < seqs.size(); ++s) {
    const VerifySequence& seq = seqs[s];
    const auto k = static_cast<int64_t>(seq.drafts.size());
    for (int64_t i = 0; i <= k; ++i)
      row_params.push_back({seq.params.temperature, seq.params.top_k, seq.params.top_p, seq.params.min_p});
    std::copy(seq.drafts.begin(), seq.drafts.end(), draft_tokens + static_cast<int64_t>(s) * k_max);
    counts[s] = static_cast<int32_t>(k);
    std::copy(seq.uniforms.begin(), seq.uniforms.end(), uniforms.begin() + static_cast<int64_t>(s * slots));
  }
  m.sample_workspace.reserve(sampling_workspace_bytes(static_cast<int64_t>(rows), n_vocab));
  m.sample_params.reserve(rows * sizeof(kc::SamplingRowParams));
  m.verify_p_packed.reserve(rows * v * sizeof(float));
  m.verify_p.reserve(static_cast<size_t>(n_seqs) * slots * v * sizeof(float));
  m.verify_q.reserve(std::max<size_t>(1, static_cast<size_t>(n_seqs * k_max) * v) * sizeof(float));
  m.verify_ints.reserve(ints.size() * sizeof(int32_t));
  m.verify_uniforms.reserve(uniforms.size() * sizeof(double));
  const cudaStream_t stream = m.stream;
  cuda_check(cudaMemcpyAsync(m.sample_params.as<void>(), row_params.data(),
                             rows * sizeof(kc::SamplingRowParams), cudaMemcpyHostToDevice, stream),
             "cudaMemcpyAsync (verification settings)");
  check(kc::distribution_rows(m.logits.as<float>(), m.sample_params.as<kc::SamplingRowParams>(),
                              static_cast<int64_t>(rows), n_vocab, m.verify_p_packed.as<float>(),
                              m.sample_workspace.as<void>(), m.sample_workspace.bytes(), stream),
        "distribution_rows");
  // Each sequence's k + 1 target rows and k draft rows into its slots of the kernel's layout.
  size_t row = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const size_t k = seqs[s].drafts.size();
    cuda_check(
        cudaMemcpyAsync(m.verify_p.as<float>() + s * slots * v, m.verify_p_packed.as<float>() + row * v,
                        (k + 1) * v * sizeof(float), cudaMemcpyDeviceToDevice, stream),
        "cudaMemcpyAsync (target distributions)");
    // The draft's rows: from the host, or (kept where a GPU draft made them) from device memory,
    // possibly another device's (a peer copy).
    const KeptRows* kept = seqs[s].kept_probs;
    cuda_check(cudaMemcpyAsync(m.verify_q.as<float>() + s * static_cast<size_t>(k_max) * v,
                               kept != nullptr ? kept->device_data() : seqs[s].draft_probs.data(),
                               k * v * sizeof(float),
                               kept != nullptr ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice, stream),
               "cudaMemcpyAsync (draft distributions)");
    row += k + 1;
  }
  auto* ints_d = m.verify_ints.as<int32_t>();
  const size_t in_ints = static_cast<size_t>(n_seqs * (k_max + 1));  // draft tokens and counts
  cuda_check(
      cudaMemcpyAsync(ints_d, ints.data(), ints.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream),
      "cudaMemcpyAsync (draft tokens)");
  cuda_check(cudaMemcpyAsync(m.verify_uniforms.as<double>(), uniforms.data(),
                             uniforms.size() * sizeof(double), cudaMemcpyHostToDevice, stream),
             "cudaMemcpyAsync (uniforms)");
  check(
      kc::speculative_accept(ints_d, ints_d + n_seqs * k_max, m.verify_q.as<float>(), m.verify_p.as<float>(),
                             m.verify_uniforms.as<double>(), n_seqs, k_max, n_vocab, ints_d + in_ints,
                             ints_d + in_ints + n_seqs * (k_max + 1), ints_d + ints.size() - 1, stream),
      "speculative_accept");
  cuda_check(cudaMemcpyAsync(out_tokens, ints_d + in_ints, (ints.size() - in_ints) * sizeof(int32_t),
                             cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync (verification results)");
  cuda_check(cudaStreamSynchronize(stream), "forward_verify");
  for (size_t s = 0; s < seqs.size(); ++s) {
    const int32_t a = out_accepted[s];
    if (a < 0 || a > static_cast<int32_t>(seqs[s].drafts.size())) {
      throw std::runtime_error(
          "forward_verify: sequence " + std::to_string(s) +
          ": a draft token outside the vocabulary, or a target distribution without mass");
    }
    accepted.push_back(a);
    const int32_t* t = out_tokens + static_cast<int64_t>(s) * (k_max + 1);
    tokens.emplace_back(t, t + a + 1);
  }
}

std::shared_ptr<KeptRows> CudaLlamaModel::make_kept_rows(int64_t rows) {
  Impl& m = *impl_;
  if (rows < 1) throw std::invalid_argument("make_kept_rows: " + std::to_string(rows) + " rows");
  cuda_check(cudaSetDevice(m.options.device), "cudaSetDevice");
  if (m.kept_pool == nullptr) m.kept_pool = std::make_shared<KeptRowsPool>(m.options.device);
  return std::make_shared<CudaKeptRows>(m.kept_pool, rows, m.config.n_vocab);
}

void CudaLlamaModel::forward_draft_sample(const ForwardBatch& batch, CudaKvCache& cache,
                                          const std::vector<SamplingParams>& params,
                                          const std::vector<double>& uniforms,
                                          const std::vector<KeptRowRef>& keep, std::vector<int32_t>& ids) {
  Impl& m = *impl_;
  if (!m.first_stage() || !m.last_stage() || m.shard.size != 1)
    throw std::logic_error("forward_draft_sample: only a whole, unsharded model drafts on the device");
  const size_t rows = batch.logit_rows.size();
  if (params.size() != rows || uniforms.size() != rows || keep.size() != rows) {
    throw std::invalid_argument("forward_draft_sample: " + std::to_string(params.size()) + " settings, " +
                                std::to_string(uniforms.size()) + " uniforms and " +
                                std::to_string(keep.size()) + " stores for " + std::to_string(rows) +
                                " logit rows");
  }
  const int64_t n_vocab = m.config.n_vocab;
  const auto v = static_cast<size_t>(n_vocab);
  std::vector<kc::SamplingRowParams> row_params;
  for (size_t r = 0; r < rows; ++r) {
    const std::string where = "forward_draft_sample: row " + std::to_string(r) + ": ";
    validate(params[r]);
    if (params[r].repetition_penalty != 1.0f) throw std::invalid_argument(where + "a repetition penalty");
    if (!(uniforms[r] >= 0.0 && uniforms[r] < 1.0))
      throw std::invalid_argument(where + "a uniform outside [0, 1)");
    if (keep[r].rows != nullptr) {
      const auto* kept = dynamic_cast<const CudaKeptRows*>(keep[r].rows);
      if (kept == nullptr || kept->pool() != m.kept_pool.get())
        throw std::invalid_argument(where + "a store this model did not make");
      if (keep[r].row < 0 || keep[r].row >= kept->rows())
        throw std::invalid_argument(where + "row " + std::to_string(keep[r].row) + " of a store of " +
                                    std::to_string(kept->rows()));
    }
    row_params.push_back({params[r].temperature, params[r].top_k, params[r].top_p, params[r].min_p});
  }
  // The pass, its logits left on the device.
  m.forward_impl(batch, cache, nullptr, nullptr, nullptr, Impl::RowSampling{});
  ids.assign(rows, 0);
  if (rows == 0) return;
  m.sample_workspace.reserve(sampling_workspace_bytes(static_cast<int64_t>(rows), n_vocab));
  m.sample_params.reserve(rows * sizeof(kc::SamplingRowParams));
  m.sample_uniforms.reserve(rows * sizeof(double));
  m.verify_p_packed.reserve(rows * v * sizeof(float));
  m.verify_ints.reserve(rows * sizeof(int32_t));
  const cudaStream_t stream = m.stream;
  cuda_check(cudaMemcpyAsync(m.sample_params.as<void>(), row_params.data(),
                             rows * sizeof(kc::SamplingRowParams), cudaMemcpyHostToDevice, stream),
             "cudaMemcpyAsync (draft settings)");
  cuda_check(cudaMemcpyAsync(m.sample_uniforms.as<void>(), uniforms.data(), rows * sizeof(double),
                             cudaMemcpyHostToDevice, stream),
             "cudaMemcpyAsync (draft uniforms)");
  float* q = m.verify_p_packed.as<float>();
  check(kc::distribution_rows(m.logits.as<float>(), m.sample_params.as<kc::SamplingRowParams>(),
                              static_cast<int64_t>(rows), n_vocab, q, m.sample_workspace.as<void>(),
                              m.sample_workspace.bytes(), stream),
        "distribution_rows");
  check(kc::sample_dense_rows(q, m.sample_uniforms.as<double>(), static_cast<int64_t>(rows), n_vocab,
                              m.verify_ints.as<int32_t>(), stream),
        "sample_dense_rows");
  for (size_t r = 0; r < rows; ++r) {
    if (keep[r].rows == nullptr) continue;
    auto* kept = static_cast<CudaKeptRows*>(keep[r].rows);
    cuda_check(cudaMemcpyAsync(kept->data() + keep[r].row * n_vocab, q + r * v, v * sizeof(float),
                               cudaMemcpyDeviceToDevice, stream),
               "cudaMemcpyAsync (keep a draft distribution)");
  }
  cuda_check(cudaMemcpyAsync(ids.data(), m.verify_ints.as<int32_t>(), rows * sizeof(int32_t),
                             cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync (draft ids)");
  cuda_check(cudaStreamSynchronize(stream), "forward_draft_sample");  // the kept rows are complete too
  for (size_t r = 0; r < rows; ++r) {
    if (ids[r] < 0 || ids[r] >= n_vocab)
      throw std::runtime_error("forward_draft_sample: row " + std::to_string(r) + " has no probability mass");
  }
}

CudaStepProfile CudaLlamaModel::profile_greedy(const ForwardBatch& batch, CudaKvCache& cache,
                                               std::vector<int32_t>& ids) {
  Impl& m = *impl_;
  if (!m.step_timer) m.step_timer = std::make_unique<StepTimer>();
  m.step_timer->clear();
  m.timer = m.step_timer.get();
  struct Stop {
    Impl& m;
    ~Stop() { m.timer = nullptr; }
  } stop{m};
  m.forward_impl(batch, cache, nullptr, nullptr, &ids, Impl::RowSampling{});
  m.timer = nullptr;
  return m.step_timer->result();
}

void CudaLlamaModel::forward_stage_greedy(const ForwardBatch& batch, CudaKvCache& cache,
                                          const float* hidden_in, std::vector<int32_t>& ids) {
  impl_->forward_impl(batch, cache, hidden_in, nullptr, &ids, Impl::RowSampling{});
}

void CudaLlamaModel::forward_sample(const ForwardBatch& batch, CudaKvCache& cache,
                                    const std::vector<SamplingParams>& params,
                                    const std::vector<double>& uniforms, std::vector<int32_t>& ids,
                                    const TokenHistories& histories) {
  check_sample_rows(batch, params, uniforms, histories);
  std::vector<kc::SamplingRowParams> rows_params;
  for (const SamplingParams& sp : params)
    rows_params.push_back({sp.temperature, sp.top_k, sp.top_p, sp.min_p});
  Impl::RowSampling sampling{&rows_params, &uniforms};
  // The rows' penalized tokens (worker::penalized_tokens, as the host sampler finds them).
  std::vector<int32_t> penalty_ids, penalty_offsets{0};
  std::vector<float> penalties;
  const bool any_penalty = std::any_of(params.begin(), params.end(), [](const SamplingParams& sp) {
    return sp.repetition_penalty != 1.0f && sp.repeat_last_n > 0;
  });
  if (any_penalty) {
    for (size_t r = 0; r < params.size(); ++r) {
      const std::vector<int32_t> row = penalized_tokens(params[r], histories[r], config().n_vocab);
      penalty_ids.insert(penalty_ids.end(), row.begin(), row.end());
      penalty_offsets.push_back(static_cast<int32_t>(penalty_ids.size()));
      penalties.push_back(params[r].repetition_penalty);
    }
    sampling.penalty_ids = &penalty_ids;
    sampling.penalty_offsets = &penalty_offsets;
    sampling.penalties = &penalties;
  }
  impl_->forward_impl(batch, cache, nullptr, nullptr, &ids, sampling);
}

void CudaLlamaModel::forward_stage(const ForwardBatch& batch, CudaKvCache& cache, const float* hidden_in,
                                   std::vector<float>& out) {
  impl_->forward_impl(batch, cache, hidden_in, &out, nullptr, Impl::RowSampling{});
}

}  // namespace nibble::worker
