#pragma once
// Turns sampled tokens into what a client sees: the generated ids, text streamed in UTF-8-safe
// deltas, and the end of the completion (EOS, a stop string — text cut before it and held back while
// a match may still be forming — or the token limit). Shared by the single-process generator and the
// batched service.
#include <cstdint>
#include <string>
#include <vector>

#include "model/tokenizer.hpp"

namespace nibble::worker {

enum class FinishReason { length, eos, stop };
const char* finish_reason_name(FinishReason reason);

struct CompletionLimits {
  int32_t max_tokens = 128;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  // vLLM's stop_token_ids: a sampled one ends the completion ("stop"), kept in its tokens and text.
  std::vector<int32_t> stop_token_ids{};
};

class Completion {
 public:
  Completion(const model::Tokenizer& tokenizer, CompletionLimits limits);

  // Adds a sampled token and returns the text that became final with it. Once finished() is true
  // the completion takes no more tokens.
  std::string add(int32_t token);
  bool finished() const { return finished_; }
  FinishReason finish_reason() const { return finish_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }  // EOS excluded
  const std::string& text() const { return text_; }

 private:
  std::string end(FinishReason reason);

  const model::Tokenizer& tokenizer_;
  CompletionLimits limits_;
  model::StreamingDecoder decoder_;
  std::vector<int32_t> tokens_;
  std::string text_;     // emitted so far
  std::string pending_;  // decoded but held back (may be the start of a stop string)
  bool finished_ = false;
  FinishReason finish_ = FinishReason::length;
};

}  // namespace nibble::worker
