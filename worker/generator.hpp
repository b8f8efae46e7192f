#pragma once
// Single-sequence text generation: prefill, then sample token by token until EOS, a stop string or
// the token limit. Used by `nibble generate` and `nibble bench`.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "model/tokenizer.hpp"
#include "worker/completion.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"
#include "worker/sampler.hpp"

namespace nibble::worker {

struct GenerateOptions {
  int32_t max_tokens = 128;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any of these
  bool ignore_eos = false;        // benchmarks generate a fixed count
  SamplingParams sampling;
  int64_t prefill_chunk = 512;  // prompt tokens per forward pass
};

struct GenerateResult {
  std::vector<int32_t> prompt_tokens;
  std::vector<int32_t> tokens;  // generated ids (a matched stop string's tokens included, EOS not)
  std::string text;             // generated text, cut before a matched stop string
  FinishReason finish = FinishReason::length;
  double prompt_seconds = 0.0;    // prefill, up to the first sampled token
  double generate_seconds = 0.0;  // everything after the first sampled token
};

// Called with text that is final (never retracted by a later stop-string match) and the token id
// that produced it.
using TokenCallback = std::function<void(const std::string& text_delta, int32_t token)>;

// The model a Generator drives when it is not a CPU LlamaModel (e.g. worker::CudaLlamaModel): the
// functions run one forward pass over a KV cache they own, which must hold
// blocks_for(context) blocks of Generator::kBlockSize positions.
struct GeneratorModel {
  int64_t n_vocab = 0;
  // logits: resized to [batch.logit_rows.size(), n_vocab]
  std::function<void(const ForwardBatch& batch, std::vector<float>& logits)> forward;
  // Optional: the argmax id of each logit row instead of the logits (ties to the lowest id, as the
  // sampler at temperature 0). Used for greedy requests without a repetition penalty, so that only
  // ids cross from a device.
  std::function<void(const ForwardBatch& batch, std::vector<int32_t>& ids)> greedy;
  // Optional: each logit row sampled with its settings, uniform and history (ForwardModel::
  // forward_sample's contract). Used for sampled requests, and for greedy ones with a repetition
  // penalty, so that only ids cross from a device there too.
  std::function<void(const ForwardBatch& batch, const std::vector<SamplingParams>& params,
                     const std::vector<double>& uniforms, const TokenHistories& histories,
                     std::vector<int32_t>& ids)>
      sample;
};

class Generator {
 public:
  static constexpr int64_t kBlockSize = 16;
  static int64_t blocks_for(int64_t context) { return (context + kBlockSize - 1) / kBlockSize; }

  // context: the longest prompt + generation this generator accepts.
  Generator(LlamaModel& model, const model::Tokenizer& tokenizer, kernels::ThreadPool& pool, int64_t context);
  Generator(GeneratorModel model, const model::Tokenizer& tokenizer, int64_t context);
  int64_t context() const { return context_; }

  // Throws std::invalid_argument when the prompt is empty, too long for the context, or holds
  // token ids outside the vocabulary, or the sampling parameters are impossible.
  GenerateResult generate(const std::vector<int32_t>& prompt_tokens, const GenerateOptions& options,
                          const TokenCallback& on_token = {});

 private:
  std::unique_ptr<KvCache> cache_;  // the CPU model's cache; null for a GeneratorModel
  GeneratorModel model_;
  const model::Tokenizer& tokenizer_;
  int64_t context_;
};

}  // namespace nibble::worker
