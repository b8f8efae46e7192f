#include "worker/completion.hpp"

#include <algorithm>

namespace nibble::worker {

namespace {

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

Completion::Completion(const model::Tokenizer& tokenizer, CompletionLimits limits)
    : tokenizer_(tokenizer), limits_(std::move(limits)), decoder_(tokenizer) {
  if (limits_.max_tokens <= 0) finished_ = true;
}

std::string Completion::end(FinishReason reason) {
  finished_ = true;
  finish_ = reason;
  // Nothing matched a stop string, so what was held back is final.
  std::string rest = pending_ + decoder_.flush();
  pending_.clear();
  text_ += rest;
  return rest;
}

std::string Completion::add(int32_t token) {
  if (finished_) return {};
  if (!limits_.ignore_eos && tokenizer_.is_end_of_generation(token)) return end(FinishReason::eos);
  tokens_.push_back(token);
  pending_ += decoder_.push(token);

  // A stop string ends generation and is not part of the text.
  const std::string candidate = text_ + pending_;
  size_t stop_at = std::string::npos;
  for (const std::string& stop : limits_.stop) stop_at = std::min(stop_at, candidate.find(stop));
  if (stop_at != std::string::npos) {
    std::string delta = candidate.substr(text_.size(), stop_at - text_.size());
    text_ += delta;
    pending_.clear();
    finished_ = true;
    finish_ = FinishReason::stop;
    return delta;
  }
  if (std::find(limits_.stop_token_ids.begin(), limits_.stop_token_ids.end(), token) !=
      limits_.stop_token_ids.end()) {
    std::string delta = end(FinishReason::stop);
    return delta;
  }
  const size_t hold = std::min(held_back_for_stops(candidate, limits_.stop), pending_.size());
  std::string delta = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, delta.size());
  text_ += delta;
  if (static_cast<int32_t>(tokens_.size()) >= limits_.max_tokens) delta += end(FinishReason::length);
  return delta;
}

}  // namespace nibble::worker
