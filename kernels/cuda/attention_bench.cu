// The decode attention benchmark (attention_bench.cuh).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cuda/attention_bench.cuh"
#include "kernels/cuda/attention_decode.cuh"
#include "kernels/cuda/bench_support.cuh"
#include "kernels/cuda/event_timer.cuh"
#include "kernels/cuda/kv_cache_quant.cuh"
#include "kernels/cuda/prefill_attention.cuh"
#include "kernels/cuda/random_weights.cuh"
#include "kernels/quant_types.hpp"

namespace nibble::kernels::cuda {
namespace {

using bench::BenchFailure;
using bench::check;
using bench::DeviceMemory;
using bench::failure_reason;

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

// On `stream`, ordered before the calls (from pageable memory the copy has left `from` on return).
template <typename T>
void upload(const DeviceMemory& to, const std::vector<T>& from, cudaStream_t stream) {
  check(cudaMemcpyAsync(to.ptr, from.data(), from.size() * sizeof(T), cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync");
}

// Random K, V (cache_halves each) and q (q_halves) on `stream`: the softmax then weighs real scores.
void fill_operands(const DeviceMemory& k_cache, const DeviceMemory& v_cache, size_t cache_halves,
                   const DeviceMemory& q, size_t q_halves, cudaStream_t stream) {
  if (fill_random_halves(k_cache.as<__half>(), static_cast<int64_t>(cache_halves), 1.0f, 11, stream) !=
          Status::ok ||
      fill_random_halves(v_cache.as<__half>(), static_cast<int64_t>(cache_halves), 1.0f, 12, stream) !=
          Status::ok ||
      fill_random_halves(q.as<__half>(), static_cast<int64_t>(q_halves), 1.0f, 13, stream) != Status::ok) {
    throw BenchFailure("filling the cache and queries failed");
  }
}

// One (batch, context, queries) case at every split: the cache (every copy's blocks in one pool), the
// metadata and the timing.
void bench_case(const AttentionBenchHeads& h, int64_t batch, int64_t context, int64_t queries,
                const std::vector<int64_t>& splits, int iterations, int repetitions, int l2_bytes,
                cudaStream_t stream, std::vector<AttentionBenchRow>& rows,
                const std::function<void(const AttentionBenchRow&)>& measured) {
  const int64_t blocks_per_seq = (context + h.block_size - 1) / h.block_size;
  // The tables padded to a power of two, as the model pads them (CudaLlamaModel's plans).
  int64_t mbps = 1;
  while (mbps < blocks_per_seq) mbps *= 2;
  const int64_t row_halves = h.n_head_kv * h.head_dim;  // one position's K (or V) in one block slot
  const size_t copy_bytes = static_cast<size_t>(batch * blocks_per_seq * h.block_size * row_halves) * 2 * 2;
  // Enough copies that a sweep over them is 4x the L2 (at most 4096: ~4x a 60 MB L2 at 64 KB a copy).
  const size_t want = 4 * static_cast<size_t>(std::max(l2_bytes, 1 << 20));
  const int64_t copies =
      static_cast<int64_t>(std::clamp<size_t>((want + copy_bytes - 1) / copy_bytes, 1, 4096));
  const int64_t num_blocks = copies * batch * blocks_per_seq;
  const size_t cache_halves = static_cast<size_t>(num_blocks * h.block_size * row_halves);

  DeviceMemory k_cache(cache_halves * 2), v_cache(cache_halves * 2);
  const int64_t tokens = batch * queries;
  const size_t q_halves = static_cast<size_t>(tokens * h.n_head * h.head_dim);
  DeviceMemory q(q_halves * 2), out(q_halves * 2);
  fill_operands(k_cache, v_cache, cache_halves, q, q_halves, stream);
  // Copy c's sequence s owns blocks (c batch + s) blocks_per_seq .. + blocks_per_seq - 1; the padding
  // past them is never read (positions beyond the context).
  std::vector<int32_t> tables(static_cast<size_t>(copies * batch * mbps), 0);
  for (int64_t c = 0; c < copies; ++c)
    for (int64_t s = 0; s < batch; ++s)
      for (int64_t b = 0; b < blocks_per_seq; ++b)
        tables[static_cast<size_t>((c * batch + s) * mbps + b)] =
            static_cast<int32_t>((c * batch + s) * blocks_per_seq + b);
  std::vector<int32_t> seq_lens(static_cast<size_t>(batch), static_cast<int32_t>(context));
  std::vector<int32_t> query_start(static_cast<size_t>(batch + 1));
  for (int64_t s = 0; s <= batch; ++s)
    query_start[static_cast<size_t>(s)] = static_cast<int32_t>(s * queries);
  DeviceMemory tables_d(tables.size() * 4), seq_lens_d(seq_lens.size() * 4),
      query_start_d(query_start.size() * 4);
  upload(tables_d, tables, stream);
  upload(seq_lens_d, seq_lens, stream);
  upload(query_start_d, query_start, stream);
  DeviceMemory counters(static_cast<size_t>(batch * h.n_head_kv) * 4), flag(4);
  // On the stream the calls run on (a plain cudaMemset would be on the legacy stream, unordered with it).
  check(cudaMemsetAsync(counters.ptr, 0, static_cast<size_t>(batch * h.n_head_kv) * 4, stream),
        "cudaMemsetAsync");
  check(cudaMemsetAsync(flag.ptr, 0, 4, stream), "cudaMemsetAsync");

  // A Q8_0 cache of the same blocks (zeros: the kernels' work does not depend on the values), read
  // straight by attention_decode_quantized at each split, and dequantized into the fp16 cache above (the
  // working copy) after the splits.
  const int64_t q8_0_row_bytes = row_halves / 32 * static_cast<int64_t>(sizeof(BlockQ8_0));
  // (+ 256: a block is fetched as the aligned words that cover it, up to 2 bytes past its end; a safeguard
  // here, where rows hold an even number of blocks, as CudaKvCache's sides are rounded up to 256 bytes)
  const auto q8_0_bytes = static_cast<size_t>(num_blocks * h.block_size * q8_0_row_bytes + 256);
  DeviceMemory k_q8(q8_0_bytes), v_q8(q8_0_bytes);
  check(cudaMemsetAsync(k_q8.ptr, 0, q8_0_bytes, stream), "cudaMemsetAsync");
  check(cudaMemsetAsync(v_q8.ptr, 0, q8_0_bytes, stream), "cudaMemsetAsync");
  for (const int64_t split : splits) {
    DecodeAttentionShape shape;
    shape.n_seqs = batch;
    shape.tokens = tokens;
    shape.max_q_len = queries;
    shape.n_head = h.n_head;
    shape.n_head_kv = h.n_head_kv;
    shape.head_dim = h.head_dim;
    shape.block_size = h.block_size;
    shape.num_blocks = num_blocks;
    shape.max_blocks_per_seq = mbps;
    shape.max_seq_len = mbps * h.block_size;
    shape.split_tokens = split;
    const size_t workspace_bytes = attention_decode_workspace_bytes(shape);
    DeviceMemory workspace(workspace_bytes);
    const float scale = 1.0f / std::sqrt(static_cast<float>(h.head_dim));
    Status launched = Status::ok;
    // A running count, not the loop's index (which restarts every timed loop): each call takes the next
    // copy, so a loop of few calls does not find the last loop's copies in L2.
    int64_t next_copy = 0;
    const auto call = [&](int) {
      const int32_t* table =
          tables_d.as<int32_t>() + static_cast<size_t>((next_copy++ % copies) * batch * mbps);
      launched = attention_decode(shape, q.as<__half>(), k_cache.as<__half>(), v_cache.as<__half>(), table,
                                  seq_lens_d.as<int32_t>(), query_start_d.as<int32_t>(), scale,
                                  out.as<__half>(), workspace.ptr, workspace_bytes, flag.as<int32_t>(),
                                  stream, false, counters.as<unsigned>());
      return launched == Status::ok;
    };
    AttentionBenchRow row;
    row.batch = batch;
    row.context = context;
    row.queries = queries;
    row.split_tokens = split;
    row.kv_bytes = static_cast<double>(batch * context * row_halves) * 2.0 * 2.0;
    cudaError_t err = cudaSuccess;
    if (!median_call_us(stream, iterations, repetitions, call, row.us, err)) {
      if (err != cudaSuccess) check(err, "timing attention_decode");
      throw BenchFailure("attention_decode: " + failure_reason(launched));
    }
    int32_t raised = 0;
    check(cudaMemcpyAsync(&raised, flag.ptr, 4, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    if (raised != 0) throw BenchFailure("attention_decode raised its error flag on valid metadata");
    // The same call with K in Q8_0 as stored and V in Q8_0 too, or in fp16 (K-only quantization: the
    // mixed-sides kernel). A failure to launch costs only its column.
    const auto time_as_stored = [&](const void* v, DType v_type, double& us, const char* what) {
      const auto as_stored_call = [&](int) {
        const int32_t* table =
            tables_d.as<int32_t>() + static_cast<size_t>((next_copy++ % copies) * batch * mbps);
        return attention_decode_quantized(
                   shape, q.as<__half>(), k_q8.ptr, DType::Q8_0, v, v_type, table, seq_lens_d.as<int32_t>(),
                   query_start_d.as<int32_t>(), scale, out.as<__half>(), workspace.ptr, workspace_bytes,
                   flag.as<int32_t>(), stream, false, counters.as<unsigned>()) == Status::ok;
      };
      if (!median_call_us(stream, iterations, repetitions, as_stored_call, us, err)) {
        if (err != cudaSuccess) check(err, what);
        us = -1.0;
      }
    };
    time_as_stored(v_q8.ptr, DType::Q8_0, row.q8_0_us, "timing attention_decode_quantized");
    time_as_stored(v_cache.ptr, DType::F16, row.k_q8_0_us, "timing attention_decode_quantized (K only)");
    rows.push_back(row);
  }
  // The working copy's cost: the Q8_0 blocks of the case into the fp16 cache, through the same rotating
  // tables. Its failure to launch costs only its column.
  const std::vector<int32_t> last_block(static_cast<size_t>(batch), static_cast<int32_t>(blocks_per_seq - 1));
  DeviceMemory last_block_d(last_block.size() * 4);
  upload(last_block_d, last_block, stream);
  KvCacheQuantShape qshape;
  qshape.n_head_kv = h.n_head_kv;
  qshape.head_dim = h.head_dim;
  qshape.block_size = h.block_size;
  qshape.num_blocks = num_blocks;
  qshape.max_blocks_per_seq = mbps;
  qshape.k_type = qshape.v_type = DType::Q8_0;
  int64_t next_copy = 0;
  const auto dequantize = [&](int) {
    const int32_t* table =
        tables_d.as<int32_t>() + static_cast<size_t>((next_copy++ % copies) * batch * mbps);
    return kv_cache_dequantize_blocks(qshape, batch, table, last_block_d.as<int32_t>(), k_q8.as<uint8_t>(),
                                      v_q8.as<uint8_t>(), k_cache.as<__half>(), v_cache.as<__half>(),
                                      flag.as<int32_t>(), stream) == Status::ok;
  };
  double q8_0_us = -1.0;
  cudaError_t err = cudaSuccess;
  if (!median_call_us(stream, iterations, repetitions, dequantize, q8_0_us, err)) {
    if (err != cudaSuccess) check(err, "timing kv_cache_dequantize_blocks");
    q8_0_us = -1.0;
  }
  for (size_t i = rows.size() - splits.size(); i < rows.size(); ++i) {
    rows[i].q8_0_copy_us = q8_0_us;
    if (measured) measured(rows[i]);
  }
}

// One prompt of `tokens` tokens on both prefill attention kernels.
PrefillAttentionBenchRow bench_prefill(const AttentionBenchHeads& h, int64_t tokens, int iterations,
                                       int repetitions, cudaStream_t stream) {
  const int64_t blocks = (tokens + h.block_size - 1) / h.block_size;
  const int64_t row_halves = h.n_head_kv * h.head_dim;
  const size_t cache_halves = static_cast<size_t>(blocks * h.block_size * row_halves);
  const size_t q_halves = static_cast<size_t>(tokens * h.n_head * h.head_dim);
  DeviceMemory k_cache(cache_halves * 2), v_cache(cache_halves * 2), q(q_halves * 2), out(q_halves * 2);
  fill_operands(k_cache, v_cache, cache_halves, q, q_halves, stream);
  std::vector<int32_t> table(static_cast<size_t>(blocks)), seq(static_cast<size_t>(tokens), 0),
      pos(static_cast<size_t>(tokens));
  for (int64_t b = 0; b < blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(b);
  for (int64_t t = 0; t < tokens; ++t) pos[static_cast<size_t>(t)] = static_cast<int32_t>(t);
  // Each kernel's tiles: the prompt cut into runs of its tile's tokens, as the model cuts a chunk.
  const auto tiles_of = [tokens](int64_t tile_tokens) {
    std::vector<int32_t> tiles;
    for (int64_t t = 0; t < tokens; t += tile_tokens) {
      tiles.push_back(static_cast<int32_t>(t));
      tiles.push_back(static_cast<int32_t>(std::min(tile_tokens, tokens - t)));
    }
    return tiles;
  };
  const int64_t cc_tile = prefill_attention_tile_tokens(h.n_head, h.n_head_kv);
  const int64_t tc_tile = prefill_attention_mma_tile_tokens(h.n_head, h.n_head_kv);
  const std::vector<int32_t> cc_tiles = tiles_of(cc_tile);
  const std::vector<int32_t> tc_tiles = tc_tile > 0 ? tiles_of(tc_tile) : std::vector<int32_t>{};
  DeviceMemory table_d(table.size() * 4), seq_d(seq.size() * 4), pos_d(pos.size() * 4),
      cc_tiles_d(cc_tiles.size() * 4), tc_tiles_d(std::max<size_t>(tc_tiles.size(), 1) * 4), flag(4);
  upload(table_d, table, stream);
  upload(seq_d, seq, stream);
  upload(pos_d, pos, stream);
  upload(cc_tiles_d, cc_tiles, stream);
  if (!tc_tiles.empty()) upload(tc_tiles_d, tc_tiles, stream);
  check(cudaMemsetAsync(flag.ptr, 0, 4, stream), "cudaMemsetAsync");

  PagedAttentionShape shape;
  shape.tokens = tokens;
  shape.n_head = h.n_head;
  shape.n_head_kv = h.n_head_kv;
  shape.head_dim = h.head_dim;
  shape.block_size = h.block_size;
  shape.num_blocks = blocks;
  shape.max_blocks_per_seq = blocks;
  const float scale = 1.0f / std::sqrt(static_cast<float>(h.head_dim));
  PrefillAttentionBenchRow row;
  row.tokens = tokens;
  row.flops = 2.0 * static_cast<double>(h.n_head * h.head_dim) * static_cast<double>(tokens) *
              static_cast<double>(tokens + 1);
  Status launched = Status::ok;
  cudaError_t err = cudaSuccess;
  const auto cuda_cores = [&](int) {
    launched = prefill_attention_f16(shape, q.as<__half>(), k_cache.as<__half>(), v_cache.as<__half>(),
                                     table_d.as<int32_t>(), seq_d.as<int32_t>(), pos_d.as<int32_t>(),
                                     cc_tiles_d.as<int32_t>(), static_cast<int64_t>(cc_tiles.size() / 2),
                                     scale, out.as<__half>(), flag.as<int32_t>(), stream);
    return launched == Status::ok;
  };
  if (!median_call_us(stream, iterations, repetitions, cuda_cores, row.cuda_core_us, err)) {
    if (err != cudaSuccess) check(err, "timing prefill_attention_f16");
    throw BenchFailure("prefill_attention_f16: " + failure_reason(launched));
  }
  if (!tc_tiles.empty()) {
    const auto tensor_cores = [&](int) {
      launched = prefill_attention_mma_f16(
          shape, q.as<__half>(), k_cache.as<__half>(), v_cache.as<__half>(), table_d.as<int32_t>(),
          seq_d.as<int32_t>(), pos_d.as<int32_t>(), tc_tiles_d.as<int32_t>(),
          static_cast<int64_t>(tc_tiles.size() / 2), scale, out.as<__half>(), flag.as<int32_t>(), stream);
      return launched == Status::ok;
    };
    if (!median_call_us(stream, iterations, repetitions, tensor_cores, row.tensor_core_us, err)) {
      if (err != cudaSuccess) check(err, "timing prefill_attention_mma_f16");
      if (launched != Status::invalid_argument)  // refused (the device's shared memory): left at 0
        throw BenchFailure("prefill_attention_mma_f16: " + failure_reason(launched));
      row.tensor_core_us = 0.0;
    }
  }
  int32_t raised = 0;
  check(cudaMemcpyAsync(&raised, flag.ptr, 4, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  if (raised != 0) throw BenchFailure("a prefill attention kernel raised its error flag on valid metadata");
  return row;
}

}  // namespace

Status run_prefill_attention_bench(const AttentionBenchHeads& heads,
                                   const std::vector<int64_t>& prompt_tokens, int iterations, int repetitions,
                                   std::vector<PrefillAttentionBenchRow>& rows, std::string& error,
                                   const std::function<void(const PrefillAttentionBenchRow&)>& measured) {
  if ((heads.head_dim != 64 && heads.head_dim != 128) || heads.block_size < 1 ||
      prefill_attention_tile_tokens(heads.n_head, heads.n_head_kv) < 1 || prompt_tokens.empty() ||
      std::any_of(prompt_tokens.begin(), prompt_tokens.end(),
                  [](int64_t t) { return t < 1 || t > INT32_MAX; }) ||
      iterations < 1 || repetitions < 1) {
    return Status::invalid_argument;
  }
  try {
    const Stream stream;
    for (const int64_t tokens : prompt_tokens) {
      rows.push_back(bench_prefill(heads, tokens, iterations, repetitions, stream.s));
      if (measured) measured(rows.back());
    }
  } catch (const BenchFailure& e) {
    error = e.what();
    return Status::device_error;
  }
  return Status::ok;
}

Status run_attention_decode_bench(const AttentionBenchHeads& heads, const std::vector<int64_t>& batches,
                                  const std::vector<int64_t>& contexts, const std::vector<int64_t>& queries,
                                  const std::vector<int64_t>& splits, int iterations, int repetitions,
                                  std::vector<AttentionBenchRow>& rows, std::string& error,
                                  const std::function<void(const AttentionBenchRow&)>& measured) {
  const auto positive = [](const std::vector<int64_t>& v) {
    return !v.empty() && std::all_of(v.begin(), v.end(), [](int64_t x) { return x > 0; });
  };
  if (heads.n_head < 1 || heads.n_head_kv < 1 || heads.n_head % heads.n_head_kv != 0 ||
      (heads.head_dim != 64 && heads.head_dim != 128) || heads.block_size < 1 || !positive(batches) ||
      !positive(contexts) || !positive(queries) || !positive(splits) || iterations < 1 || repetitions < 1) {
    return Status::invalid_argument;
  }
  for (const int64_t s : splits)
    if (s % 32 != 0) return Status::invalid_argument;
  for (const int64_t b : batches)
    if (b > kAttentionBenchMaxBatch) return Status::invalid_argument;
  for (const int64_t c : contexts)
    for (const int64_t q : queries)
      if (c < q) return Status::invalid_argument;
  try {
    int device = 0, l2_bytes = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device), "cudaDeviceGetAttribute");
    const Stream stream;
    for (const int64_t q : queries) {
      // Past the kernel's rows a KV head: left out (the model verifies fewer tokens at once there).
      if (q * (heads.n_head / heads.n_head_kv) > kAttentionMaxRowsPerKvHead) continue;
      for (const int64_t b : batches)
        for (const int64_t c : contexts)
          bench_case(heads, b, c, q, splits, iterations, repetitions, l2_bytes, stream.s, rows, measured);
    }
    check(cudaStreamSynchronize(stream.s), "cudaStreamSynchronize");
  } catch (const BenchFailure& e) {
    error = e.what();
    return Status::device_error;
  }
  return Status::ok;
}

}  // namespace nibble::kernels::cuda
