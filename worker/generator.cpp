#include "worker/generator.hpp"

#include <algorithm>
#include <chrono>
#include <stdexcept>

namespace nibble::worker {

namespace {

constexpr int64_t kBlockSize = 16;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Length of the longest suffix of `text` that is a proper prefix of some stop string: that much
// must be held back because the next token may complete a match.
size_t held_back_for_stops(const std::string& text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const std::string& stop : stops) {
    for (size_t len = std::min(stop.size() - 1, text.size()); len > hold; --len) {
      if (text.compare(text.size() - len, len, stop, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  return hold;
}

}  // namespace

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::length:
      return "length";
    case FinishReason::eos:
      return "eos";
    case FinishReason::stop:
      return "stop";
  }
  return "unknown";
}

Generator::Generator(LlamaModel& model, const model::Tokenizer& tokenizer, kernels::ThreadPool& pool,
                     int64_t context)
    : model_(model),
      tokenizer_(tokenizer),
      pool_(pool),
      context_(context),
      cache_(model.config(), (context + kBlockSize - 1) / kBlockSize, kBlockSize) {}

GenerateResult Generator::generate(const std::vector<int32_t>& prompt_tokens, const GenerateOptions& options,
                                   const TokenCallback& on_token) {
  validate(options.sampling);
  if (prompt_tokens.empty()) throw std::invalid_argument("the prompt is empty");
  if (options.max_tokens < 0) throw std::invalid_argument("max_tokens must be >= 0");
  for (const std::string& stop : options.stop) {
    if (stop.empty()) throw std::invalid_argument("stop strings must not be empty");
  }
  const int64_t n_vocab = model_.config().n_vocab;
  for (int32_t id : prompt_tokens) {
    if (id < 0 || id >= n_vocab)
      throw std::invalid_argument("prompt token " + std::to_string(id) + " is outside the vocabulary");
  }
  const auto n_prompt = static_cast<int64_t>(prompt_tokens.size());
  if (n_prompt + options.max_tokens > context_) {
    throw std::invalid_argument("prompt (" + std::to_string(n_prompt) + " tokens) plus max_tokens (" +
                                std::to_string(options.max_tokens) + ") exceeds the context of " +
                                std::to_string(context_) + " tokens");
  }

  GenerateResult result;
  result.prompt_tokens = prompt_tokens;
  Sampler sampler(options.sampling);
  BlockAllocator allocator(cache_.n_blocks());
  std::vector<int32_t> table;
  allocator.reserve(table, n_prompt + options.max_tokens, kBlockSize);
  std::vector<int32_t> history = prompt_tokens;
  std::vector<float> logits;
  model::StreamingDecoder decoder(tokenizer_);
  std::string pending;  // decoded but not yet emitted (may be the start of a stop string)

  const auto start = std::chrono::steady_clock::now();
  if (options.max_tokens == 0) return result;
  for (int64_t begin = 0; begin < n_prompt; begin += options.prefill_chunk) {
    const int64_t end = std::min(n_prompt, begin + options.prefill_chunk);
    std::vector<int32_t> chunk(prompt_tokens.begin() + begin, prompt_tokens.begin() + end);
    model_.forward(ForwardBatch::single(chunk, static_cast<int32_t>(begin), table, false), cache_, pool_,
                   logits);
  }

  auto decode_start = start;
  for (int32_t step = 0; step < options.max_tokens; ++step) {
    const int32_t token = sampler.sample(logits.data(), n_vocab, history);
    if (step == 0) {
      result.prompt_seconds = seconds_since(start);
      decode_start = std::chrono::steady_clock::now();
    }
    if (!options.ignore_eos && tokenizer_.is_end_of_generation(token)) {
      result.finish = FinishReason::eos;
      break;
    }
    result.tokens.push_back(token);
    history.push_back(token);
    pending += decoder.push(token);

    // A stop string ends generation and is not part of the text.
    size_t stop_at = std::string::npos;
    for (const std::string& stop : options.stop) {
      const size_t at = (result.text + pending).find(stop);
      if (at != std::string::npos) stop_at = std::min(stop_at, at);
    }
    if (stop_at != std::string::npos) {
      const std::string final_delta =
          (result.text + pending).substr(result.text.size(), stop_at - result.text.size());
      result.text += final_delta;
      if (on_token) on_token(final_delta, token);
      result.finish = FinishReason::stop;
      pending.clear();
      break;
    }
    const size_t hold = held_back_for_stops(result.text + pending, options.stop);
    const std::string delta = pending.substr(0, pending.size() - std::min(hold, pending.size()));
    pending.erase(0, delta.size());
    result.text += delta;
    if (on_token) on_token(delta, token);

    if (step + 1 == options.max_tokens) break;
    const int32_t pos = static_cast<int32_t>(n_prompt + step);
    model_.forward(ForwardBatch::single({token}, pos, table, false), cache_, pool_, logits);
  }
  if (result.finish != FinishReason::stop) {
    pending += decoder.flush();
    result.text += pending;
    if (on_token && !pending.empty()) on_token(pending, -1);
  }
  result.generate_seconds = seconds_since(decode_start);
  allocator.release(table);
  return result;
}

}  // namespace nibble::worker
