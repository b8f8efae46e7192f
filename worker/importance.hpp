#pragma once
// llama-imatrix's statistics, computed by Nibble's forward pass: for every layer matrix, the sum over
// calibration tokens of the square of each of its inputs, and the tokens summed. `nibble eval imatrix`
// writes them in llama.cpp's imatrix format; `nibble quantize --imatrix` (and llama-quantize) weigh
// each column's rounding error by them.
#include <cstdint>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "model/imatrix.hpp"
#include "worker/evaluation.hpp"
#include "worker/llama_model.hpp"

namespace nibble::worker {

// Runs `model` over the windows (each one forward pass from an empty cache, as llama-imatrix's chunks)
// and collects the statistics of every blk.* matrix (q, k and v share one input, as gate and up do:
// their entries are equal). Windows shorter than 16 tokens are skipped, as llama-imatrix skips
// products of fewer than 16 rows. chunk_count / chunk_size record the windows used; datasets is left
// to the caller.
model::ImportanceMatrix collect_importance(LlamaModel& model, kernels::ThreadPool& pool,
                                           const std::vector<std::vector<int32_t>>& windows,
                                           const EvaluationProgress& progress = {});

}  // namespace nibble::worker
