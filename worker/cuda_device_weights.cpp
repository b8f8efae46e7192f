#include "worker/cuda_device_weights.hpp"

#include <cuda_fp16.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/cuda/int4_groups.cuh"
#include "kernels/cuda/int4_tiles.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/random_weights.cuh"
#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/int4_groups.hpp"
#include "kernels/int4_tiles.hpp"
#include "kernels/q6_k_planes.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"

namespace nibble::worker {

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // the error is this exception's: not left for the next launch to report as its own
    throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(err));
  }
}

void check_status(kernels::Status status, const char* what) {
  if (status != kernels::Status::ok) {
    // Name the error behind it: a CUDA error still pending in the runtime, else what the launcher kept
    // (kernels/cuda/launch_status.cuh: its CUDA error, or cuBLAS's / CUTLASS's status).
    const cudaError_t err = cudaGetLastError();
    const std::string why = err != cudaSuccess                        ? cudaGetErrorString(err)
                            : status == kernels::Status::device_error ? kc::last_launch_error_text()
                                                                      : std::string();
    throw std::runtime_error(std::string("CUDA ") + what + " failed: " + kernels::status_name(status) +
                             (why.empty() ? "" : " (" + why + ")"));
  }
}

void cublas_check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("cuBLAS ") + what + " failed: " + cublasGetStatusString(status) +
                             " (status " + std::to_string(static_cast<int>(status)) + ")");
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

std::shared_ptr<DeviceMemory> upload(const void* host, size_t bytes) {
  auto mem = std::make_shared<DeviceMemory>(bytes);
  if (bytes > 0) cuda_check(cudaMemcpy(mem->as<void>(), host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  return mem;
}

DeviceKind device_kind(const model::WeightMatrix& w, int64_t q4_0_min_group, bool lookup) {
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
  if (kc::w4a16_reads_gguf_blocks(w.type) && w.k % kernels::type_info(w.type).block_elems == 0)
    return DeviceKind::gguf_blocks;
  return DeviceKind::f16;
}

bool same_device_storage(const model::WeightMatrix& a, const model::WeightMatrix& b, int64_t q4_0_min_group) {
  const DeviceKind kind = device_kind(a, q4_0_min_group);
  return kind == device_kind(b, q4_0_min_group) && (kind != DeviceKind::gguf_blocks || a.type == b.type);
}

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

kc::Int4GroupsMatrix int4_operands(const DeviceMatrix& w) {
  const uint8_t* base = w.mem != nullptr ? w.mem->as<uint8_t>() : nullptr;
  if (w.layout != kc::Int4Layout::rows) return {base, nullptr, nullptr};
  return {base, reinterpret_cast<const __half*>(base + w.scales_offset), base + w.zeros_offset};
}

std::shared_ptr<DeviceMemory> int4_tiles_of(const DeviceMatrix& w, cudaStream_t stream) {
  const uint8_t* base = w.mem->as<uint8_t>();
  auto tiled =
      std::make_shared<DeviceMemory>(static_cast<size_t>(kernels::int4_tiles_bytes(w.n_out, w.k, w.group)));
  check_status(
      kc::int4_tiles_from_groups(base, reinterpret_cast<const uint16_t*>(base + w.scales_offset),
                                 base + w.zeros_offset, w.n_out, w.k, w.group, tiled->as<uint8_t>(), stream),
      "int4_tiles_from_groups");
  return tiled;
}

std::shared_ptr<DeviceMemory> int4_cutlass_copy_of(const DeviceMatrix& w, kc::Int4CutlassWeights& weights,
                                                   cudaStream_t stream) {
  const uint8_t* base = w.mem->as<uint8_t>();
  auto copy = std::make_shared<DeviceMemory>(kc::int4_cutlass_bytes(w.n_out, w.k, w.group));
  check_status(kc::int4_cutlass_from_groups(base, reinterpret_cast<const uint16_t*>(base + w.scales_offset),
                                            base + w.zeros_offset, w.n_out, w.k, w.group, copy->as<uint8_t>(),
                                            &weights, stream),
               "int4_cutlass_from_groups");
  return copy;
}

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
  check_status(kc::int4_groups_from_q4_0(q4.mem->as<uint8_t>(), d.n_out, d.k, d.group, base,
                                         reinterpret_cast<uint16_t*>(base + d.scales_offset),
                                         base + d.zeros_offset, mismatch.as<int32_t>(), stream),
               "int4_groups_from_q4_0");
  int32_t host = 0;
  cuda_check(cudaMemcpyAsync(&host, mismatch.as<int32_t>(), sizeof host, cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync");
  cuda_check(cudaStreamSynchronize(stream), "int4_groups_from_q4_0");  // before q4 and mismatch are freed
  if (host != 0) throw std::logic_error("Q4_0 to INT4 groups: a group holds more than one scale");
  return d;
}

DeviceMatrix upload_matrix(std::initializer_list<const model::WeightMatrix*> parts, int64_t q4_0_min_group,
                           bool lookup) {
  DeviceMatrix d;
  const model::WeightMatrix& first = **parts.begin();
  d.kind = device_kind(first, q4_0_min_group, lookup);
  if (d.kind == DeviceKind::gguf_blocks) d.gguf_type = first.type;
  d.k = first.k;
  for (const model::WeightMatrix* w : parts) {
    if (w->data == nullptr) throw std::invalid_argument("a weight matrix has no data to upload");
    if (w->k != d.k || device_kind(*w, q4_0_min_group, lookup) != d.kind ||
        (d.kind == DeviceKind::gguf_blocks && w->type != d.gguf_type))
      throw std::logic_error("upload_matrix: parts disagree");
    d.n_out += w->n_out;
  }
  std::vector<uint8_t> host;
  if (d.kind == DeviceKind::q4_0 || d.kind == DeviceKind::q4_k || d.kind == DeviceKind::q6_k ||
      d.kind == DeviceKind::q8_0 || d.kind == DeviceKind::gguf_blocks) {
    if (d.kind == DeviceKind::q6_k) {  // each part's blocks into its rows of the planes the kernels read
      host.resize(static_cast<size_t>(kernels::q6_k_planes_layout(d.n_out, d.k).bytes));
      int64_t row = 0;
      for (const model::WeightMatrix* w : parts) {
        check_status(kernels::q6_k_planes_rows_from_blocks(w->data, w->n_out, d.k, d.n_out, row, host.data()),
                     "q6_k_planes_rows_from_blocks (weight upload)");
        row += w->n_out;
      }
    } else {
      for (const model::WeightMatrix* w : parts)
        host.insert(host.end(), w->data, w->data + w->n_out * w->row_bytes());
    }
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
      check_status(kernels::int4_groups_from_blocks(
                       w->type, w->data, w->n_out, w->k, d.group, host.data() + row * d.k / 2,
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
        check_status(kernels::dequantize_row(w->type, src, row.data(), d.k),
                     "dequantize_row (weight upload)");
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

Projection upload_projection(std::initializer_list<const model::WeightMatrix*> parts,
                             int64_t q4_0_min_group) {
  Projection p;
  bool same = true;
  for (const model::WeightMatrix* w : parts)
    same = same && same_device_storage(*w, **parts.begin(), q4_0_min_group);
  if (same) {
    p.parts.push_back(upload_matrix(parts, q4_0_min_group));
  } else {
    for (const model::WeightMatrix* w : parts) p.parts.push_back(upload_matrix({w}, q4_0_min_group));
  }
  return p;
}

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
      check_status(kc::fill_random_q4_0(dst, part.n_out, k, part.seed, stream),
                   "fill_random_q4_0 (dummy weights)");
    } else {
      DeviceMemory whole(static_cast<size_t>(part.n_out * whole_row_bytes));
      check_status(kc::fill_random_q4_0(whole.as<uint8_t>(), part.n_out, k, part.seed, stream),
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

DeviceMatrix to_int4_groups(const DeviceMatrix& q4, cudaStream_t stream) {
  return q4_0_to_int4_groups(q4, q4.k % 128 == 0 ? 128 : q4.k % 64 == 0 ? 64 : 32, stream);
}

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

}  // namespace nibble::worker
