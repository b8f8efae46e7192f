#pragma once
// The decode attention's part of `nibble bench-gpu`'s kernel table: attention_decode (one kernel, the
// combine in its last split, as the model runs it) on a paged fp16 KV cache for one model's heads, per
// batch, context, queries a sequence (1: decode; k + 1: speculative verification) and split size
// (positions a block takes), against the device's copy bandwidth (the K and V bytes a call must read).
// Why: the model cuts every sequence at one fixed split size (so that a row's bits do not depend on the
// batch), and which size is fastest depends on the batch, the context and the GPU: short contexts want
// small splits (more blocks at work), long ones large splits (fewer partials to combine). Also the
// prefill attention on the CUDA cores against the tensor cores per prompt length.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

struct AttentionBenchHeads {  // llama-70b's by default
  int64_t n_head = 64;
  int64_t n_head_kv = 8;
  int64_t head_dim = 128;   // 64 or 128
  int64_t block_size = 16;  // positions per KV cache block
};

// Sequences a call at most (attention_decode's grid holds 65535 along the sequences).
constexpr int64_t kAttentionBenchMaxBatch = 65535;

struct AttentionBenchRow {
  int64_t batch = 0;         // sequences
  int64_t context = 0;       // positions of each sequence in the cache, its queries' included
  int64_t queries = 0;       // query tokens a sequence
  int64_t split_tokens = 0;  // DecodeAttentionShape::split_tokens
  double us = 0.0;           // device time of one call
  double kv_bytes = 0.0;     // K and V bytes one call reads: batch x context x n_head_kv x head_dim x 4
  // What a Q8_0 cache adds before the call (the same for every split of a case): its K and V blocks of
  // the case dequantized into the fp16 working copy (kv_cache_dequantize_blocks, as CudaLlamaModel runs
  // it each layer); -1 where that failed to launch.
  double q8_0_copy_us = 0.0;
  // The same call on a Q8_0 cache read as stored (attention_decode_quantized, what the model runs in a
  // decode step on a quantized cache: no working copy); -1 where it failed to launch.
  double q8_0_us = 0.0;
  // K as stored in Q8_0, V in fp16 (llama.cpp's K-only quantization, -ctk q8_0: the kernel's mixed-sides
  // instantiation); -1 where it failed to launch.
  double k_q8_0_us = 0.0;
};

// Times attention_decode at every (batch, context, queries, split), the same on a Q8_0 cache read as
// stored, and per case a Q8_0 cache's dequantization into the working copy (median of `repetitions` loops of
// `iterations` calls, after a warm-up; the block tables rotate among copies of the cache that together
// are 4x the L2, so that every call reads its K and V from device memory, as a decode step does a layer
// after the last). Combinations whose query rows a KV head exceed the kernel's limit
// (kAttentionMaxRowsPerKvHead) are left out. Returns invalid_argument (nothing run) for heads the kernel
// does not take, an empty list, a batch over kAttentionBenchMaxBatch, a context below the queries or a
// split not a positive multiple of 32;
// device_error (with `error` set, and `rows` holding the rows finished before) when a CUDA call fails or
// the kernel raises its error flag.
// measured (optional): called with each row as soon as its case is timed.
Status run_attention_decode_bench(const AttentionBenchHeads& heads, const std::vector<int64_t>& batches,
                                  const std::vector<int64_t>& contexts, const std::vector<int64_t>& queries,
                                  const std::vector<int64_t>& splits, int iterations, int repetitions,
                                  std::vector<AttentionBenchRow>& rows, std::string& error,
                                  const std::function<void(const AttentionBenchRow&)>& measured = {});

struct PrefillAttentionBenchRow {
  int64_t tokens = 0;           // one prompt's, at positions 0 .. tokens - 1, in one chunk
  double cuda_core_us = 0.0;    // prefill_attention_f16
  double tensor_core_us = 0.0;  // prefill_attention_mma_f16; 0 where it refuses the heads or the device
  double flops = 0.0;           // causal attention's multiply-adds x 2: 2 n_head head_dim tokens (tokens + 1)
};

// The prompt side: each prompt length's causal attention over its own keys (one sequence, the whole
// prompt one chunk, its K and V already in the cache) on the CUDA cores and on the tensor cores, in the
// same run: the decision behind CudaModelOptions::mma_prefill_attention, per prompt length (bench-gpu
// --model times one 2048-token prompt end to end). Compute-bound: the cache is not rotated. Returns
// invalid_argument for heads the kernels do not take or a length below 1, device_error (with `error`
// set, `rows` holding the lengths finished) when a CUDA call fails or a kernel raises its error flag.
Status run_prefill_attention_bench(const AttentionBenchHeads& heads,
                                   const std::vector<int64_t>& prompt_tokens, int iterations, int repetitions,
                                   std::vector<PrefillAttentionBenchRow>& rows, std::string& error,
                                   const std::function<void(const PrefillAttentionBenchRow&)>& measured = {});

}  // namespace nibble::kernels::cuda
