#pragma once
// The greedy pair-merging loop shared by the SentencePiece and BPE tokenizers: text starts as a
// linked list of UTF-8 characters, and the adjacent pair with the best priority (SentencePiece: the
// merged piece's score; BPE: the lowest merge rank) merges until no pair qualifies.
#include <algorithm>
#include <optional>
#include <queue>
#include <string_view>
#include <vector>

#include "model/unicode_utf8.hpp"

namespace nibble::model::detail {

struct Symbol {
  int prev;
  int next;
  size_t offset;
  size_t length;  // 0 once merged into its left neighbour
};

// One symbol per UTF-8 character of text (a truncated trailing sequence is one symbol).
inline std::vector<Symbol> split_utf8_symbols(std::string_view text) {
  std::vector<Symbol> symbols;
  symbols.reserve(text.size());
  for (size_t offset = 0; offset < text.size();) {
    const size_t length =
        std::min(utf8::sequence_length(static_cast<unsigned char>(text[offset])), text.size() - offset);
    const int index = static_cast<int>(symbols.size());
    symbols.push_back({index - 1, offset + length == text.size() ? -1 : index + 1, offset, length});
    offset += length;
  }
  return symbols;
}

// priority(left, right) -> std::optional<double>: higher merges first, nullopt never merges. Ties go
// to the leftmost pair, as in llama.cpp.
template <class Priority>
void merge_bigrams(std::vector<Symbol>& symbols, const Priority& priority) {
  struct Bigram {
    int left;
    int right;
    double priority;
    size_t length;  // of the merged text, to detect entries made stale by later merges
  };
  struct Order {
    bool operator()(const Bigram& a, const Bigram& b) const {
      return a.priority < b.priority || (a.priority == b.priority && a.left > b.left);
    }
  };
  std::priority_queue<Bigram, std::vector<Bigram>, Order> queue;
  const auto try_add = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    if (const std::optional<double> p = priority(symbols[left], symbols[right])) {
      queue.push({left, right, *p, symbols[left].length + symbols[right].length});
    }
  };
  for (int i = 1; i < static_cast<int>(symbols.size()); ++i) try_add(i - 1, i);

  while (!queue.empty()) {
    const Bigram bigram = queue.top();
    queue.pop();
    Symbol& left = symbols[bigram.left];
    Symbol& right = symbols[bigram.right];
    // Skip pairs where either side has since been merged into something else.
    if (left.length == 0 || right.length == 0 || left.length + right.length != bigram.length) continue;
    left.length += right.length;
    right.length = 0;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = bigram.left;
    try_add(left.prev, bigram.left);
    try_add(bigram.left, left.next);
  }
}

}  // namespace nibble::model::detail
