#include "worker/cuda_llama_model.hpp"

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
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
#include "kernels/cuda/kv_cache_quant.cuh"
#include "kernels/cuda/lora.cuh"
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
#include "worker/cuda_device_weights.hpp"
#include "worker/cuda_llama_model_impl.hpp"
#include "worker/forward_model.hpp"
#include "worker/lora_weights.hpp"
#include "worker/weight_shard.hpp"

namespace nibble::worker {

namespace {

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

}  // namespace

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

namespace {

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

namespace {

// Why a GPU cache of these types cannot serve this model's (shard's) heads, "" when it can: the CPU's
// refusals (KvCache::unsupported) and the device kernels' row limit. Checked when a model is given the
// types (before a job sizes its blocks) and again when a cache is made.
std::string cuda_kv_cache_unsupported(const model::LlamaConfig& config, const KvCacheTypes& types) {
  if (std::string why = KvCache::unsupported(config, types); !why.empty())
    return "this model cannot have " + why;
  if (types.quantized() && config.kv_dim() > kc::kKvCacheQuantMaxKvDim) {
    return "a quantized KV cache on the GPU takes at most " + std::to_string(kc::kKvCacheQuantMaxKvDim) +
           " K values a position, this model " + std::to_string(config.kv_dim());
  }
  return "";
}

}  // namespace

CudaKvCache::CudaKvCache(const model::LlamaConfig& config, int64_t n_blocks, int64_t block_size, int device,
                         KvCacheTypes types)
    : n_blocks_(n_blocks),
      block_size_(block_size),
      kv_dim_(config.kv_dim()),
      n_layer_(config.n_layer),
      k_row_bytes_(0),
      v_row_bytes_(0),
      types_(types) {
  if (n_blocks < 1 || block_size < 1) throw std::invalid_argument("a KV cache needs at least one block");
  if (const std::string why = cuda_kv_cache_unsupported(config, types); !why.empty())
    throw std::invalid_argument(why);
  require_device(device);
  k_row_bytes_ = kernels::row_bytes(types.k, kv_dim_);
  v_row_bytes_ = kernels::row_bytes(types.v, kv_dim_);
  // Each layer's K then V, each side's start 256-byte aligned (the readers load up to 16 bytes at once).
  auto aligned = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  const int64_t slots = n_blocks_ * block_size_;
  v_offset_ = aligned(slots * k_row_bytes_);
  layer_stride_ = v_offset_ + aligned(slots * v_row_bytes_);
  const int64_t work_bytes = aligned(slots * kv_dim_ * static_cast<int64_t>(sizeof(uint16_t)));
  const int64_t work_sides =
      (types.k != kernels::DType::F16 ? 1 : 0) + (types.v != kernels::DType::F16 ? 1 : 0);
  const auto bytes = static_cast<size_t>(n_layer_ * layer_stride_ + work_sides * work_bytes);
  cuda_check(cudaMalloc(reinterpret_cast<void**>(&base_), bytes), "cudaMalloc (KV cache)");
  uint8_t* work = base_ + n_layer_ * layer_stride_;
  if (types.k != kernels::DType::F16) {
    k_work_ = reinterpret_cast<uint16_t*>(work);
    work += work_bytes;
  }
  if (types.v != kernels::DType::F16) v_work_ = reinterpret_cast<uint16_t*>(work);
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
  if ((values ? types_.v : types_.k) != kernels::DType::F16)
    throw std::logic_error("CudaKvCache::layer_to_host: that side is quantized (layer_bytes_to_host)");
  const std::vector<uint8_t> bytes = layer_bytes_to_host(layer, values);
  std::vector<uint16_t> host(bytes.size() / sizeof(uint16_t));
  std::memcpy(host.data(), bytes.data(), host.size() * sizeof(uint16_t));
  return host;
}

std::vector<uint8_t> CudaKvCache::layer_bytes_to_host(int64_t layer, bool values) const {
  std::vector<uint8_t> host(
      static_cast<size_t>(n_blocks_ * block_size_ * (values ? v_row_bytes_ : k_row_bytes_)));
  cuda_check(
      cudaMemcpy(host.data(), values ? v_data(layer) : k_data(layer), host.size(), cudaMemcpyDeviceToHost),
      "cudaMemcpy (KV cache to host)");
  return host;
}

// ---------------------------------------------------------------------------------------------
// CudaLlamaModel

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

void CudaLlamaModel::Impl::reduce_sum(float* data, size_t count) {
  if (reducer == nullptr) return;
  if (reducer->device_pointers()) {
    // NCCL on this stream, behind the product that made data: no host round trip (160 a llama-70b step).
    if (reducer->sum_on_stream(data, count, stream)) return;
    cuda_check(cudaStreamSynchronize(stream), "before an all-reduce");  // one on its own stream
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
  if (reducer->device_pointers()) {
    // NCCL on this stream (scratch reserved by grow_buffers): no host wait, and a graph can hold it.
    if (reducer->gather_columns_on_stream(local_logits.as<float>(), n_out, split.vocab_counts,
                                          logits.as<float>(), stream)) {
      return;
    }
    cuda_check(cudaStreamSynchronize(stream), "before the logits gather");
    reducer->gather_columns(local_logits.as<float>(), n_out, split.vocab_counts, logits.as<float>());
    return;
  }
  cuda_check(cudaStreamSynchronize(stream), "before the logits gather");
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
  if (std::any_of(batch.seq_adapters.begin(), batch.seq_adapters.end(), [](int32_t a) { return a != 0; })) {
    if (static_cast<int64_t>(batch.seq_adapters.size()) != n_seqs) {
      throw std::invalid_argument("forward batch: seq_adapters has " +
                                  std::to_string(batch.seq_adapters.size()) + " rows for " +
                                  std::to_string(n_seqs) + " sequences");
    }
    for (const int32_t a : batch.seq_adapters) {
      if (a != 0 &&
          (a < 1 || a > static_cast<int32_t>(loras.size()) || loras[static_cast<size_t>(a - 1)] == nullptr))
        throw std::invalid_argument("LoRA adapter " + std::to_string(a) + " is not loaded on this GPU model");
    }
  }
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
  // The runs attention_decode takes (decode and verification: few queries a run), dshape.n_seqs of them:
  // every run when use_decode (a decode step), else those of a batch that also holds prompt chunks
  // (whose runs take the prefill kernel's tiles), so that a decode row's attention is the same kernel
  // whatever else is in its batch; 0 where attention_decode does not take the heads.
  bool use_decode = false;
  int64_t n_decode_runs = 0;
  int64_t n_tiles = 0;     // > 0: prompt-chunk attention on prefill_attention_f16's tiles (else paged)
  bool mma_tiles = false;  // the tiles are prefill_attention_mma_f16's
  int64_t off_tokens = 0, off_pos = 0, off_seq = 0, off_tables = 0, off_rows = 0;
  int64_t off_seq_lens = 0, off_query_start = 0, off_query_end = 0, off_run_tables = 0, off_tiles = 0;
  kc::DecodeAttentionShape dshape;
  const CudaKvCache* cache = nullptr;
  size_t meta_count = 0;
  // A quantized cache (kernels/cuda/kv_cache_quant.cuh): its shape, the table rows whose blocks each
  // layer dequantizes (their last blocks at off_last_block) and the rotation's blocks (0: none).
  bool kv_quantized = false;
  bool kv_as_stored = false;  // the decode runs read it as stored (attention_decode_quantized)
  kc::KvCacheQuantShape qshape;
  int64_t n_rows = 0, off_last_block = 0, k_rotation = 0, v_rotation = 0;
  // Rows that name a LoRA adapter: each token's and each logit row's adapter (0: none) at these offsets,
  // and the adapters' generation (CudaLlamaModel::set_lora) the launches were planned for.
  bool lora = false;
  int64_t off_row_adapters = 0, off_logit_adapters = 0, lora_generation = 0;
  uint64_t lora_slots = 0;  // bit a - 1: adapter a has rows in this batch (all bits: a slot above 64 does)

  auto key() const {
    // The cache's geometry and types as well as its addresses: a new cache may reuse a freed one's memory.
    return std::make_tuple(n, n_out, n_runs, mbps, use_decode, n_decode_runs, kv_as_stored, dshape.max_q_len,
                           meta_count, static_cast<const void*>(cache), cache->k(0), n_tiles, mma_tiles,
                           cache->block_size() * (int64_t{1} << 32) + cache->n_blocks(),
                           static_cast<int>(qshape.k_type) * 256 + static_cast<int>(qshape.v_type), n_rows,
                           k_rotation * 4096 + v_rotation, lora ? lora_generation + 1 : 0, lora_slots);
  }
};

CudaLlamaModel::Impl::Plan CudaLlamaModel::Impl::plan_batch(const ForwardBatch& batch,
                                                            const CudaKvCache& cache,
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
  // A run attention_decode takes: its queries times the group fit a KV head's block. A batch of only such
  // runs is a decode step; in a batch with prompt chunks they still take it, where the prefill kernel has
  // tiles for the rest (else the general kernel takes every token).
  bool mma_probe = false;
  const bool decode_heads = options.decode_attention && (c.head_dim == 64 || c.head_dim == 128);
  const auto short_run = [&](int64_t r) { return run_len[r] * group <= kc::kAttentionMaxRowsPerKvHead; };
  std::vector<int64_t> decode_runs;
  for (int64_t r = 0; decode_heads && r < p.n_runs; ++r)
    if (short_run(r)) decode_runs.push_back(r);
  p.use_decode = decode_heads && static_cast<int64_t>(decode_runs.size()) == p.n_runs;
  if ((!p.use_decode && prefill_tile_tokens(mma_probe) == 0) || decode_runs.size() > 65535) {
    decode_runs.clear();  // the general kernel (or the tiles) for every run
    p.use_decode = false;
  }
  p.n_decode_runs = static_cast<int64_t>(decode_runs.size());
  std::vector<bool> is_decode_run(static_cast<size_t>(p.n_runs), false);
  for (const int64_t r : decode_runs) is_decode_run[static_cast<size_t>(r)] = true;

  // int32 metadata, one copy: tokens, positions, seq_index, block tables, logit rows, then for
  // attention_decode its runs' lengths, query starts and ends and table rows.
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
  {
    // Each token's adapter (the sequence's, or the default for a batch that names none).
    std::vector<int32_t> row_adapters(static_cast<size_t>(p.n), 0);
    if (!batch.seq_adapters.empty()) {
      for (int64_t t = 0; t < p.n; ++t)
        if (const auto seq = static_cast<size_t>(batch.seq_index[t]); seq < batch.seq_adapters.size())
          row_adapters[static_cast<size_t>(t)] = batch.seq_adapters[seq];
    } else if (default_lora != 0) {
      std::fill(row_adapters.begin(), row_adapters.end(), default_lora);
    }
    p.lora = std::any_of(row_adapters.begin(), row_adapters.end(), [](int32_t a) { return a != 0; });
    if (p.lora) {
      std::vector<int32_t> logit_adapters;
      for (const int32_t row : batch.logit_rows)
        logit_adapters.push_back(row_adapters[static_cast<size_t>(row)]);
      p.off_row_adapters = append(row_adapters);
      p.off_logit_adapters = append(logit_adapters);
      p.lora_generation = lora_generation;
      for (const int32_t a : row_adapters)
        if (a != 0) p.lora_slots |= a <= 64 ? uint64_t{1} << (a - 1) : ~uint64_t{0};
    }
  }
  if (cache.types().quantized()) {
    p.kv_quantized = true;
    p.kv_as_stored = p.n_decode_runs > 0 && options.kv_cache_decode_as_stored;
    // Each table row's last block that a token of the row writes or attends over, for the working copy:
    // the rows of the runs that do not read the cache as stored.
    p.n_rows = batch_mbps > 0 ? static_cast<int64_t>(batch.block_tables.size()) / batch_mbps : 0;
    std::vector<int32_t> last_block(static_cast<size_t>(p.n_rows), -1);
    for (int64_t r = 0; r < p.n_runs; ++r) {
      if (p.kv_as_stored && is_decode_run[static_cast<size_t>(r)]) continue;
      const int64_t t = run_start[r] + run_len[r] - 1;  // the run's last position: its highest block
      auto& last = last_block[static_cast<size_t>(batch.seq_index[t])];
      last = std::max(last, static_cast<int32_t>(batch.positions[t] / cache.block_size()));
    }
    p.off_last_block = append(last_block);
    p.qshape.n_head_kv = shard_config.n_head_kv;
    p.qshape.head_dim = c.head_dim;
    p.qshape.block_size = cache.block_size();
    p.qshape.num_blocks = cache.n_blocks();
    p.qshape.max_blocks_per_seq = p.mbps;
    p.qshape.k_type = cache.types().k;
    p.qshape.v_type = cache.types().v;
    if (options.kv_cache_rotation) {
      const KvRotation rotation = KvCache::rotation(shard_config, cache.types());
      p.k_rotation = rotation.k_block;
      p.v_rotation = rotation.v_block;
    }
  }
  if (p.n_decode_runs > 0) {
    std::vector<int32_t> seq_lens, query_start, query_end, run_tables;
    int64_t max_run = 0;
    for (const int64_t r : decode_runs) {
      const int64_t last = run_start[r] + run_len[r] - 1;
      seq_lens.push_back(batch.positions[last] + 1);
      query_start.push_back(run_start[r]);
      query_end.push_back(static_cast<int32_t>(last + 1));
      max_run = std::max<int64_t>(max_run, run_len[r]);
      const auto row = tables.begin() + batch.seq_index[run_start[r]] * p.mbps;
      run_tables.insert(run_tables.end(), row, row + p.mbps);
    }
    p.off_seq_lens = append(seq_lens);
    p.off_query_start = append(query_start);
    p.off_query_end = append(query_end);
    p.off_run_tables = append(run_tables);
    p.dshape.n_seqs = p.n_decode_runs;
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
    p.dshape.split_tokens = options.decode_split_tokens;
  }
  if (const int64_t tile_tokens = p.use_decode ? 0 : prefill_tile_tokens(p.mma_tiles); tile_tokens > 0) {
    // Prompt chunks: their runs cut into the prefill kernel's tiles (the decode runs are attention_decode's).
    std::vector<int32_t> tiles;
    for (int64_t r = 0; r < p.n_runs; ++r) {
      if (is_decode_run[static_cast<size_t>(r)]) continue;
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

int64_t CudaLlamaModel::Impl::prefill_tile_tokens(bool& mma) const {
  const auto& c = shard_config;
  mma = false;
  if (c.head_dim != 64 && c.head_dim != 128) return 0;
  if (options.mma_prefill_attention) {
    if (const int64_t tokens = kc::prefill_attention_mma_tile_tokens(c.n_head, c.n_head_kv); tokens > 0) {
      mma = true;
      return tokens;
    }
  }
  return kc::prefill_attention_tile_tokens(c.n_head, c.n_head_kv);
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
  if (reducer != nullptr && last_stage()) {
    moved |= local_logits.reserve(static_cast<size_t>(rows_out * head.n_out) * sizeof(float));
    if (reducer->device_pointers()) moved |= reducer->reserve_gather(rows_out, split.vocab_counts);
  }
  moved |= ids.reserve(static_cast<size_t>(rows_out) * sizeof(int32_t));
  if (p.lora) {
    // A group of q, k and v (or gate and up) reads the n_embd inputs; one product alone up to lora_max_k.
    const int64_t rows = std::max(n, rows_out);
    moved |= lora_work.reserve(std::max(kc::lora_workspace_bytes(rows, lora_max_k, lora_max_rank, 1),
                                        kc::lora_workspace_bytes(rows, c.n_embd, lora_max_rank, 3)));
  }
  moved |= flag.reserve(sizeof(int32_t));
  if (norm_counter.reserve(sizeof(uint32_t))) {  // once
    moved = true;
    cuda_check(cudaMemsetAsync(norm_counter.as<void>(), 0, norm_counter.bytes(), stream),
               "cudaMemsetAsync (norm counter)");
  }
  if (p.n_decode_runs > 0) {
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
    check_status(
        kc::embedding_lookup_f16(embedding.mem->as<void>(),
                                 embedding.kind == DeviceKind::q4_0   ? kernels::DType::Q4_0
                                 : embedding.kind == DeviceKind::q8_0 ? kernels::DType::Q8_0
                                                                      : kernels::DType::F16,
                                 embedding.n_out, c.n_embd, 0, md + p.off_tokens, n, h, flag_d, stream),
        "embedding lookup");
    check_status(kc::f16_to_f32(h, x, n * c.n_embd, stream), "f16_to_f32");
  }
  const auto hidden_count = static_cast<size_t>(n * c.n_embd);

  kc::RopeKvWriteShape rshape;
  rshape.tokens = n;
  rshape.n_head = c.n_head;
  rshape.n_head_kv = c.n_head_kv;
  rshape.head_dim = c.head_dim;
  rshape.rot_dims = c.rope_dims;
  rshape.rope_base = c.rope_base;
  rshape.rope_scaling = c.rope_scaling();
  rshape.rope_scaling.freq_factors = rope_freq_factors ? rope_freq_factors->as<float>() : nullptr;
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

  // The LoRA adapters' updates of products that read the same input `in` (row stride ldx): each
  // update's output y, row stride ldy, += scale * B (A x) (layer -1: the head, over the logit rows). One
  // call (two launches) for every adapter of the batch and every product of the group (a layer's q, k
  // and v; its gate and up), leaving out the products no adapter of the batch adapts (kernels/cuda/lora).
  struct LoraUpdate {
    model::LayerMatrix which;
    float* y;
    int64_t ldy;
  };
  const auto add_lora = [&](int64_t layer, const __half* in, int64_t ldx,
                            std::initializer_list<LoraUpdate> updates) {
    if (!p.lora) return;
    kc::LoraGroup group;
    int64_t k = 0;
    for (const LoraUpdate& u : updates) {
      const size_t site =
          layer < 0 ? lora_sites.size() - 1 : static_cast<size_t>(layer) * 7 + static_cast<size_t>(u.which);
      const LoraSite& st = lora_sites[site];
      if (st.max_rank == 0 || (st.adapters & p.lora_slots) == 0) continue;
      if (k != 0 && st.k != k) throw std::logic_error("LoRA products of one input with different widths");
      k = st.k;
      group.targets[group.count++] = kc::LoraTarget{lora_slots(site), st.n_out, u.y, u.ldy};
    }
    if (group.count == 0) return;
    const int64_t rows = layer < 0 ? n_out : n;
    const int32_t* adapters = md + (layer < 0 ? p.off_logit_adapters : p.off_row_adapters);
    check_status(
        kc::lora_add_f16(group, k, in, ldx, adapters, rows, lora_work.as<void>(), lora_work.bytes(), stream),
        "lora_add_f16");
  };
  using model::LayerMatrix;

  // One token, unsharded: a product on the half2 GEMV followed by a residual add + RMSNorm does the
  // norm in its last block (matmul_add_norm); `normed` then says the next norm is done. With a LoRA row
  // the attention output's and down projection's updates go onto the residual before that kernel (the
  // same sum, in another order). The other fused epilogues need the updated outputs (RoPE, SwiGLU): none
  // in a step with LoRA rows.
  const bool norm_in_products = n == 1 && reducer == nullptr && options.fused_norms;
  const bool fuse_one_row = n == 1 && !p.lora;
  bool normed = false;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const Layer& w = layers[static_cast<size_t>(l)];
    // The previous layer's w_down output joins the residual here (the first layer has none).
    if (!normed) {
      const Timed timed(*this, Section::norms);
      check_status(kc::add_rms_norm_f32(x, l == 0 ? nullptr : dl, w.attn_norm->as<float>(), h, n, c.n_embd,
                                        c.rms_eps, stream, pdl),
                   "add_rms_norm_f32");
    }
    auto* kc_l = reinterpret_cast<__half*>(cache.k(l));  // a quantized side's working copy
    auto* vc_l = reinterpret_cast<__half*>(cache.v(l));
    // The blocks the prompt runs attend over (every run's, unless the decode runs read them as stored),
    // into the working copies; a decode step that reads them as stored fills none.
    if (p.kv_quantized && !(p.kv_as_stored && p.use_decode)) {
      const Timed timed(*this, Section::rope_kv);
      check_status(
          kc::kv_cache_dequantize_blocks(p.qshape, p.n_rows, md + p.off_tables, md + p.off_last_block,
                                         cache.k_data(l), cache.v_data(l), kc_l, vc_l, flag_d, stream),
          "kv_cache_dequantize_blocks");
    }
    if (fuse_one_row && fuses_one_row(w.qkv)) {
      const Timed timed(*this, Section::qkv);  // RoPE and the KV write in the product's epilogue
      check_status(project_rope_kv(w.qkv.parts.front(), h, rshape, md + p.off_pos, md + p.off_seq,
                                   md + p.off_tables, q16.as<__half>(), kc_l, vc_l, flag_d),
                   "half2 GEMV with RoPE and the KV write (q / k / v)");
    } else {
      auto* qkv_f = qkv.as<float>();
      float *qp = qkv_f, *kp = nullptr, *vp = nullptr;
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
      {
        const Timed timed(*this, Section::qkv);
        project(w.qkv, h, n, qkv_f);
        add_lora(l, h, c.n_embd,
                 {{LayerMatrix::attn_q, qkv_f, rshape.q_stride},
                  {LayerMatrix::attn_k, kp, rshape.kv_stride},
                  {LayerMatrix::attn_v, vp, rshape.kv_stride}});
      }
      const Timed timed(*this, Section::rope_kv);
      check_status(kc::rope_kv_write(rshape, qp, kp, vp, md + p.off_pos, md + p.off_seq, md + p.off_tables,
                                     q16.as<__half>(), kc_l, vc_l, flag_d, stream, pdl),
                   "rope_kv_write");
    }
    if (p.kv_quantized) {  // the new rows into the cache, and read back as it holds them
      const Timed timed(*this, Section::rope_kv);
      check_status(kc::kv_cache_store_positions(p.qshape, n, p.k_rotation, p.v_rotation, md + p.off_pos,
                                                md + p.off_seq, md + p.off_tables, kc_l, vc_l,
                                                cache.k_data(l), cache.v_data(l), flag_d, stream),
                   "kv_cache_store_positions");
      if (p.k_rotation > 0)  // the queries as the keys (llama.cpp's rotation)
        check_status(kc::hadamard_rotate_f16(q16.as<__half>(), n, q_dim, p.k_rotation, stream),
                     "hadamard_rotate_f16 (queries)");
    }
    std::optional<Timed> attention_span(std::in_place, *this, Section::attention);
    if (p.n_decode_runs > 0) {  // the decode runs; a quantized side as stored, or the working copy
      const bool stored = p.kv_as_stored;
      check_status(
          kc::attention_decode_quantized(
              p.dshape, q16.as<__half>(), stored ? static_cast<const void*>(cache.k_data(l)) : kc_l,
              stored ? p.qshape.k_type : kernels::DType::F16,
              stored ? static_cast<const void*>(cache.v_data(l)) : vc_l,
              stored ? p.qshape.v_type : kernels::DType::F16, md + p.off_run_tables, md + p.off_seq_lens,
              md + p.off_query_start, scale, att16.as<__half>(), workspace.as<void>(), workspace.bytes(),
              flag_d, stream, pdl, attention_counters.as<unsigned>(), md + p.off_query_end),
          "attention_decode");
    }
    if (p.n_tiles > 0 && p.mma_tiles) {  // prompt chunks
      check_status(kc::prefill_attention_mma_f16(pshape, q16.as<__half>(), kc_l, vc_l, md + p.off_tables,
                                                 md + p.off_seq, md + p.off_pos, md + p.off_tiles, p.n_tiles,
                                                 scale, att16.as<__half>(), flag_d, stream),
                   "prefill_attention_mma_f16");
    } else if (p.n_tiles > 0) {
      check_status(kc::prefill_attention_f16(pshape, q16.as<__half>(), kc_l, vc_l, md + p.off_tables,
                                             md + p.off_seq, md + p.off_pos, md + p.off_tiles, p.n_tiles,
                                             scale, att16.as<__half>(), flag_d, stream),
                   "prefill_attention_f16");
    } else if (p.n_decode_runs == 0) {  // heads no tiled kernel takes: every token
      check_status(
          kc::paged_attention_f16(pshape, q16.as<__half>(), kc_l, vc_l, md + p.off_tables, md + p.off_seq,
                                  md + p.off_pos, scale, att16.as<__half>(), flag_d, stream),
          "paged_attention_f16");
    }
    if (p.v_rotation > 0)  // back from V's rotation (H · H = I)
      check_status(kc::hadamard_rotate_f16(att16.as<__half>(), n, q_dim, p.v_rotation, stream),
                   "hadamard_rotate_f16 (attention output)");
    attention_span.reset();
    if (norm_in_products && fuses_one_row(w.wo)) {
      const Timed timed(*this, Section::attn_out);  // the residual add and ffn norm in its last block
      add_lora(l, att16.as<__half>(), q_dim, {{LayerMatrix::attn_output, x, c.n_embd}});
      check_status(matmul_add_norm(w.wo, att16.as<__half>(), w.ffn_norm->as<float>(), dl, x, h,
                                   norm_counter.as<unsigned>()),
                   "half2 GEMV with the residual add and RMSNorm");
    } else {
      {
        const Timed timed(*this, Section::attn_out);
        matmul(w.wo, att16.as<__half>(), n, dl);  // partial over the shard's heads
        add_lora(l, att16.as<__half>(), q_dim, {{LayerMatrix::attn_output, dl, c.n_embd}});
      }
      reduce_sum(dl, hidden_count);
      const Timed timed(*this, Section::norms);
      check_status(
          kc::add_rms_norm_f32(x, dl, w.ffn_norm->as<float>(), h, n, c.n_embd, c.rms_eps, stream, pdl),
          "add_rms_norm_f32");
    }
    if (fuse_one_row && fuses_one_row(w.gate_up)) {
      const Timed timed(*this, Section::gate_up);  // SwiGLU in the product's epilogue
      check_status(project_swiglu(w.gate_up.parts.front(), h, act16.as<__half>()),
                   "half2 GEMV with SwiGLU (gate / up)");
    } else {
      auto* gu = gate_up.as<float>();
      const bool stacked = w.gate_up.parts.size() == 1;
      {
        const Timed timed(*this, Section::gate_up);
        project(w.gate_up, h, n, gu);
        const int64_t ld = stacked ? 2 * c.n_ff : c.n_ff;
        add_lora(l, h, c.n_embd,
                 {{LayerMatrix::ffn_gate, gu, ld},
                  {LayerMatrix::ffn_up, stacked ? gu + c.n_ff : gu + n * c.n_ff, ld}});
      }
      const Timed timed(*this, Section::swiglu);
      check_status(
          kc::swiglu_f32_to_f16(gu, stacked ? gu + c.n_ff : gu + n * c.n_ff, stacked ? 2 * c.n_ff : c.n_ff,
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
      add_lora(l, act16.as<__half>(), c.n_ff, {{LayerMatrix::ffn_down, x, c.n_embd}});
      check_status(matmul_add_norm(w.down, act16.as<__half>(), next_norm->as<float>(), dl, x, h,
                                   norm_counter.as<unsigned>()),
                   "half2 GEMV with the residual add and RMSNorm");
    } else {
      {
        const Timed timed(*this, Section::down);
        matmul(w.down, act16.as<__half>(), n, dl);  // partial over the shard's ffn rows
        add_lora(l, act16.as<__half>(), c.n_ff, {{LayerMatrix::ffn_down, dl, c.n_embd}});
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
    check_status(
        kc::add_rms_norm_f32(x, dl, output_norm->as<float>(), h, n, c.n_embd, c.rms_eps, stream, pdl),
        "add_rms_norm_f32");
  }
  if (n_out > 0) {
    check_status(
        kc::gather_rows_f16(h, n, c.n_embd, md + p.off_rows, n_out, picked16.as<__half>(), flag_d, stream),
        "gather_rows_f16");
    if (reducer == nullptr) {
      matmul(head, picked16.as<__half>(), n_out, logits.as<float>());
      add_lora(-1, picked16.as<__half>(), c.n_embd, {{LayerMatrix::attn_q, logits.as<float>(), c.n_vocab}});
    } else {  // the shard's vocabulary columns, gathered into full rows
      matmul(head, picked16.as<__half>(), n_out, local_logits.as<float>());
      add_lora(-1, picked16.as<__half>(), c.n_embd,
               {{LayerMatrix::attn_q, local_logits.as<float>(), head.n_out}});
      gather_logits(n_out);
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
      cudaGetLastError();  // the invalidated capture's error, not the next pass's
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
  const Plan p = plan_batch(batch, cache, meta_host);
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
    check_status(kc::device_delay(kProfileHeadStartNs, stream), "device_delay (profile)");
    enqueue(p);
  } else if (use_graphs(n)) {
    launch_graph(p);
  } else {
    enqueue(p);
  }
  // The argmax after the pass, outside its graph: a pass's graph is then the same whatever its ids are
  // wanted as, so that tensor ranks replay the same graphs (a sampling rank wants sampled ids or logits
  // where its peers want the argmax) and a greedy step shares the sampled steps' graph.
  if (ids_out != nullptr && !sample && n_out > 0) {
    check_status(kc::argmax_rows(logits.as<float>(), n_out, c.n_vocab, ids.as<int32_t>(), stream),
                 "argmax_rows");
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
    if (sampling.adjustments != nullptr && !sampling.adjustments->empty()) {
      // [offsets (rows + 1), padded to 16 bytes][adjustments], one copy.
      static_assert(sizeof(LogitAdjustment) == sizeof(kc::LogitAdjustment) &&
                    offsetof(LogitAdjustment, bias) == offsetof(kc::LogitAdjustment, bias) &&
                    offsetof(LogitAdjustment, penalty) == offsetof(kc::LogitAdjustment, penalty) &&
                    offsetof(LogitAdjustment, subtract) == offsetof(kc::LogitAdjustment, subtract));
      const size_t offsets_bytes = (static_cast<size_t>(n_out + 1) * sizeof(int32_t) + 15) / 16 * 16;
      const size_t bytes = offsets_bytes + sampling.adjustments->size() * sizeof(LogitAdjustment);
      adjustment_buffer.reserve(bytes);
      std::vector<uint8_t> packed(bytes);
      std::memcpy(packed.data(), sampling.adjustment_offsets->data(),
                  static_cast<size_t>(n_out + 1) * sizeof(int32_t));
      std::memcpy(packed.data() + offsets_bytes, sampling.adjustments->data(),
                  sampling.adjustments->size() * sizeof(LogitAdjustment));
      // Pageable source: the copy has read it when the call returns.
      cuda_check(cudaMemcpyAsync(adjustment_buffer.as<uint8_t>(), packed.data(), bytes,
                                 cudaMemcpyHostToDevice, stream),
                 "cudaMemcpyAsync (logit adjustments)");
      const uint8_t* d = adjustment_buffer.as<uint8_t>();
      check_status(
          kc::apply_logit_adjustments(logits.as<float>(), n_out, c.n_vocab,
                                      reinterpret_cast<const kc::LogitAdjustment*>(d + offsets_bytes),
                                      reinterpret_cast<const int32_t*>(d), stream),
          "apply_logit_adjustments");
    }
    check_status(kc::sample_rows(logits.as<float>(), sample_params.as<kc::SamplingRowParams>(),
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
  if (reducer != nullptr) reducer->check_async_errors();  // stream-ordered all-reduces (sum_on_stream)
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
  if (shard.size > 1 && reducer == nullptr)
    throw std::invalid_argument("a sharded model needs a ShardReducer");
  if (options.decode_split_tokens < 32 || options.decode_split_tokens % 32 != 0) {
    throw std::invalid_argument(
        "decode_split_tokens " + std::to_string(options.decode_split_tokens) +
        " is not a positive multiple of 32 (positions a decode attention block takes)");
  }
  m.reducer = reducer;  // at size 1 too: a group of one (see the constructor's comment)
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
    const char* off = std::getenv("NIBBLE_DISABLE_CUTLASS");
    const bool switched_off = off != nullptr && *off != '\0' && std::strcmp(off, "0") != 0;
    throw std::invalid_argument(
        std::string(cutlass_what) +
        (!kc::w4a16_cutlass_built() ? ": this build has no CUTLASS GEMM (CUTLASS was not found at configure "
                                      "time: tools/fetch-cutlass.sh)"
         : switched_off
             ? ": the CUTLASS GEMM is switched off (NIBBLE_DISABLE_CUTLASS is set)"
             : ": the CUTLASS GEMM needs a compute capability 9.0 GPU (H100 / H200); this one is not"));
  }
  cuda_check(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  cublas_check(cublasCreate(&m.cublas), "cublasCreate");
  cublas_check(cublasSetStream(m.cublas, m.stream), "cublasSetStream");
  m.cublas_workspace.reserve(kCublasWorkspaceBytes);
  cublas_check(cublasSetWorkspace(m.cublas, m.cublas_workspace.as<void>(), kCublasWorkspaceBytes),
               "cublasSetWorkspace");

  if (!c.rope_freq_factors.empty()) m.rope_freq_factors = upload_floats(c.rope_freq_factors);
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

// Each setter drops the captured graphs (they hold the other launches or kernels) and the shapes seen
// once, so that every shape runs directly once more before a capture: a kernel's first launch (module
// loading, its attribute queries) is not made inside one.
void CudaLlamaModel::set_programmatic_launch(bool on) {
  if (impl_->options.programmatic_launch == on) return;
  impl_->options.programmatic_launch = on;
  impl_->clear_graphs();
  impl_->seen_once.clear();
}

bool CudaLlamaModel::mma_prefill_attention_applies() const {
  const auto& c = impl_->shard_config;
  return (c.head_dim == 64 || c.head_dim == 128) &&
         kc::prefill_attention_mma_tile_tokens(c.n_head, c.n_head_kv) > 0;
}

void CudaLlamaModel::set_mma_prefill_attention(bool on) {
  // The plan (and a graph's key) carries the choice: nothing captured needs dropping.
  impl_->options.mma_prefill_attention = on;
}

void CudaLlamaModel::set_kv_cache_types(const KvCacheTypes& types) {
  if (const std::string why = cuda_kv_cache_unsupported(impl_->shard_config, types); !why.empty())
    throw std::invalid_argument(why);
  impl_->kv_cache_types = types;
}

const KvCacheTypes& CudaLlamaModel::kv_cache_types() const { return impl_->kv_cache_types; }

void CudaLlamaModel::set_kv_cache_rotation(bool on) {
  // The plan (and a graph's key) carries the rotation: nothing captured needs dropping.
  impl_->options.kv_cache_rotation = on;
}

void CudaLlamaModel::set_lora(int32_t slot, const model::LoraAdapter& adapter, float user_scale) {
  Impl& m = *impl_;
  if (slot < 1) throw std::invalid_argument("LoRA slot " + std::to_string(slot) + ": slots start at 1");
  check_lora_fits(adapter, m.config);  // the whole model's shapes: a shard holds slices
  // A layer's q / k / v (and its gate / up) go to the kernels as one group, their outputs' 256-output
  // blocks together within the kernels' limit (a shard's are fewer).
  const auto padded = [](int64_t n_out) { return (n_out + 255) / 256 * 256; };
  if (padded(m.config.q_dim()) + 2 * padded(m.config.kv_dim()) > kc::kLoraMaxOutputs ||
      2 * padded(m.config.n_ff) > kc::kLoraMaxOutputs)
    throw std::invalid_argument(
        "LoRA on this model: its q / k / v or gate / up outputs together are past "
        "the GPU LoRA kernels' " +
        std::to_string(kc::kLoraMaxOutputs));
  cuda_check(cudaSetDevice(m.options.device), "cudaSetDevice");
  // A tensor shard keeps its cut of the factors (worker/lora_weights.hpp): the row-parallel products'
  // updates are partial sums that the all-reduce after them adds up, as it adds the products.
  const ShardLora lora = shard_lora(adapter, user_scale, m.shard.size > 1 ? &m.split : nullptr,
                                    m.config.head_dim, m.layer_begin, m.layer_end, m.last_stage());
  auto upload = [](const std::optional<LoraProduct>& from) -> std::unique_ptr<Impl::DeviceLoraProduct> {
    if (!from) return nullptr;
    auto to = std::make_unique<Impl::DeviceLoraProduct>();
    to->rank = from->rank;
    to->k = from->k;
    to->n_out = from->n_out;
    to->scale = from->scale;
    if (to->rank > kc::kLoraMaxRank || to->n_out > kc::kLoraMaxOutputs || to->k > kc::kLoraMaxInputs) {
      throw std::invalid_argument(
          "a LoRA adapter of rank " + std::to_string(to->rank) + " from " + std::to_string(to->k) +
          " inputs to " + std::to_string(to->n_out) + " outputs (the GPU's kernels take ranks up to " +
          std::to_string(kc::kLoraMaxRank) + ", " + std::to_string(kc::kLoraMaxInputs) + " inputs and " +
          std::to_string(kc::kLoraMaxOutputs) + " outputs)");
    }
    for (auto [memory, bits] : {std::pair{&to->a_t, &from->a_t}, std::pair{&to->b_t, &from->b_t}}) {
      memory->reserve(bits->size() * sizeof(kernels::f16_bits));
      cuda_check(cudaMemcpy(memory->as<void>(), bits->data(), bits->size() * sizeof(kernels::f16_bits),
                            cudaMemcpyHostToDevice),
                 "cudaMemcpy (LoRA factors)");
    }
    return to;
  };
  auto device = std::make_unique<Impl::DeviceLora>();
  device->layers.resize(lora.layers.size());
  for (size_t l = 0; l < lora.layers.size(); ++l)
    for (size_t which = 0; which < lora.layers[l].size(); ++which)
      device->layers[l][which] = upload(lora.layers[l][which]);
  device->output = upload(lora.output);
  // The uploads (pageable memory: on the legacy stream, which the model's stream does not wait for) have
  // landed, and no pass reads the old factors.
  cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  // The kernels' tables with the new adapter in its slot, built before anything changes.
  std::vector<const Impl::DeviceLora*> adapters;
  for (const auto& a : m.loras) adapters.push_back(a.get());
  if (adapters.size() < static_cast<size_t>(slot)) adapters.resize(static_cast<size_t>(slot), nullptr);
  adapters[static_cast<size_t>(slot - 1)] = device.get();
  std::vector<Impl::LoraSite> sites;
  std::unique_ptr<DeviceMemory> table;
  m.build_lora_tables(adapters, sites, table);
  if (m.loras.size() < static_cast<size_t>(slot)) m.loras.resize(static_cast<size_t>(slot));
  m.loras[static_cast<size_t>(slot - 1)] = std::move(device);
  m.lora_sites = std::move(sites);
  m.lora_tables = std::move(table);
  m.lora_table_slots = adapters.size();
  m.lora_max_rank = m.lora_max_k = 0;  // what the shrinks' buffers are sized for
  const auto widen = [&m](const Impl::DeviceLoraProduct* p) {
    if (p == nullptr) return;
    m.lora_max_rank = std::max(m.lora_max_rank, p->rank);
    m.lora_max_k = std::max(m.lora_max_k, p->k);
  };
  for (const auto& a : m.loras) {
    if (a == nullptr) continue;
    for (const auto& layer : a->layers)
      for (const auto& p : layer) widen(p.get());
    widen(a->output.get());
  }
  ++m.lora_generation;
  m.clear_graphs();  // they hold the old table's and factors' addresses
}

void CudaLlamaModel::Impl::build_lora_tables(const std::vector<const DeviceLora*>& adapters,
                                             std::vector<LoraSite>& sites,
                                             std::unique_ptr<DeviceMemory>& table) const {
  const size_t n_slots = adapters.size();
  const size_t n_sites = static_cast<size_t>(layer_end - layer_begin) * 7 + 1;  // the head last
  sites.assign(n_sites, LoraSite{});
  table.reset();
  if (n_slots == 0) return;
  std::vector<const void*> a_ptrs(n_sites * n_slots, nullptr), b_ptrs(n_sites * n_slots, nullptr);
  std::vector<int32_t> ranks(n_sites * n_slots, 0);
  std::vector<float> scales(n_sites * n_slots, 0.0f);
  for (size_t a = 0; a < n_slots; ++a) {
    if (adapters[a] == nullptr) continue;
    for (size_t site = 0; site < n_sites; ++site) {
      const DeviceLoraProduct* lp =
          site + 1 == n_sites ? adapters[a]->output.get() : adapters[a]->layers[site / 7][site % 7].get();
      if (lp == nullptr) continue;
      LoraSite& st = sites[site];
      st.k = lp->k;  // every adapter's the same: check_lora_fits, then the same cut
      st.n_out = lp->n_out;
      st.max_rank = std::max(st.max_rank, lp->rank);
      st.adapters |= a < 64 ? uint64_t{1} << a : ~uint64_t{0};
      const size_t i = site * n_slots + a;
      a_ptrs[i] = lp->a_t.as<void>();
      b_ptrs[i] = lp->b_t.as<void>();
      ranks[i] = static_cast<int32_t>(lp->rank);
      scales[i] = lp->scale;
    }
  }
  const size_t entries = n_sites * n_slots;
  table = std::make_unique<DeviceMemory>(entries * (2 * sizeof(void*) + sizeof(int32_t) + sizeof(float)));
  auto* base = table->as<char>();
  const auto put = [&base](const void* from, size_t bytes) {
    cuda_check(cudaMemcpy(base, from, bytes, cudaMemcpyHostToDevice), "cudaMemcpy (LoRA tables)");
    base += bytes;
  };
  put(a_ptrs.data(), entries * sizeof(void*));
  put(b_ptrs.data(), entries * sizeof(void*));
  put(ranks.data(), entries * sizeof(int32_t));
  put(scales.data(), entries * sizeof(float));
  // Landed before any pass reads them (pageable copies on the legacy stream).
  cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

kc::LoraSlots CudaLlamaModel::Impl::lora_slots(size_t site) const {
  const size_t n_slots = lora_table_slots, entries = lora_sites.size() * n_slots;
  const auto* a_ptrs = lora_tables->as<const __half* const>();
  const auto* b_ptrs = a_ptrs + entries;
  const auto* ranks = reinterpret_cast<const int32_t*>(b_ptrs + entries);
  const auto* scales = reinterpret_cast<const float*>(ranks + entries);
  kc::LoraSlots t;
  t.a_t = a_ptrs + site * n_slots;
  t.b_t = b_ptrs + site * n_slots;
  t.rank = ranks + site * n_slots;
  t.scale = scales + site * n_slots;
  t.slots = static_cast<int32_t>(n_slots);
  t.max_rank = lora_sites[site].max_rank;
  return t;
}

void CudaLlamaModel::remove_lora(int32_t slot) {
  Impl& m = *impl_;
  if (!has_lora(slot)) return;
  cuda_check(cudaSetDevice(m.options.device), "cudaSetDevice");
  cuda_check(cudaStreamSynchronize(m.stream), "cudaStreamSynchronize");
  std::vector<const Impl::DeviceLora*> adapters;
  for (const auto& a : m.loras) adapters.push_back(a.get());
  adapters[static_cast<size_t>(slot - 1)] = nullptr;
  std::vector<Impl::LoraSite> sites;
  std::unique_ptr<DeviceMemory> table;
  m.build_lora_tables(adapters, sites, table);  // before anything changes
  m.lora_sites = std::move(sites);
  m.lora_tables = std::move(table);
  m.lora_table_slots = adapters.size();
  m.loras[static_cast<size_t>(slot - 1)].reset();
  if (m.default_lora == slot) m.default_lora = 0;
  ++m.lora_generation;
  m.clear_graphs();
}

void CudaLlamaModel::set_default_lora(int32_t slot) {
  if (slot != 0 && !has_lora(slot))
    throw std::invalid_argument("LoRA adapter " + std::to_string(slot) + " is not loaded on this GPU model");
  impl_->default_lora = slot;
}

bool CudaLlamaModel::has_lora(int32_t slot) const {
  return slot >= 1 && static_cast<size_t>(slot) <= impl_->loras.size() &&
         impl_->loras[static_cast<size_t>(slot - 1)] != nullptr;
}

void CudaLlamaModel::set_fused_epilogues(bool on) {
  if (impl_->options.fused_epilogues == on) return;
  impl_->options.fused_epilogues = on;
  impl_->clear_graphs();
  impl_->seen_once.clear();
}

void CudaLlamaModel::set_fused_norms(bool on) {
  if (impl_->options.fused_norms == on) return;
  impl_->options.fused_norms = on;
  impl_->clear_graphs();
  impl_->seen_once.clear();
}

const CudaModelOptions& CudaLlamaModel::options() const { return impl_->options; }

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
    if (seq.params.temperature <= 0.0f || adjusts_logits(seq.params))
      throw std::invalid_argument(where + "needs temperature > 0 and no logit bias or penalty");
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
  check_status(kc::distribution_rows(m.logits.as<float>(), m.sample_params.as<kc::SamplingRowParams>(),
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
  check_status(
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
    if (adjusts_logits(params[r])) throw std::invalid_argument(where + "a logit bias or penalty");
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
  check_status(kc::distribution_rows(m.logits.as<float>(), m.sample_params.as<kc::SamplingRowParams>(),
                                     static_cast<int64_t>(rows), n_vocab, q, m.sample_workspace.as<void>(),
                                     m.sample_workspace.bytes(), stream),
               "distribution_rows");
  check_status(kc::sample_dense_rows(q, m.sample_uniforms.as<double>(), static_cast<int64_t>(rows), n_vocab,
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
  // The rows' logit adjustments (worker::logit_adjustments, as the host sampler finds them).
  std::vector<LogitAdjustment> adjustments;
  std::vector<int32_t> adjustment_offsets{0};
  if (std::any_of(params.begin(), params.end(),
                  [](const SamplingParams& sp) { return adjusts_logits(sp); })) {
    for (size_t r = 0; r < params.size(); ++r) {
      const std::vector<LogitAdjustment> row = logit_adjustments(params[r], histories[r], config().n_vocab);
      adjustments.insert(adjustments.end(), row.begin(), row.end());
      adjustment_offsets.push_back(static_cast<int32_t>(adjustments.size()));
    }
    sampling.adjustments = &adjustments;
    sampling.adjustment_offsets = &adjustment_offsets;
  }
  impl_->forward_impl(batch, cache, nullptr, nullptr, &ids, sampling);
}

void CudaLlamaModel::forward_stage(const ForwardBatch& batch, CudaKvCache& cache, const float* hidden_in,
                                   std::vector<float>& out) {
  impl_->forward_impl(batch, cache, hidden_in, &out, nullptr, Impl::RowSampling{});
}

}  // namespace nibble::worker
