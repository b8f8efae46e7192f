// SentencePiece-style tokenizer (tokenizer.ggml.model = "llama"), as llama.cpp's llm_tokenizer_spm:
// spaces become "▁", the text is split into UTF-8 characters, and adjacent pieces are merged
// greedily, always taking the pair whose merged text is the vocabulary entry with the highest
// score (leftmost on ties). Pieces that are not tokens fall back to <0xXX> byte tokens.
#include <algorithm>
#include <array>
#include <queue>
#include <string>
#include <vector>

#include "model/bigram_merge.hpp"
#include "model/tokenizer_vocab.hpp"
#include "model/unicode_utf8.hpp"

namespace nibble::model {

namespace {

using detail::merge_bigrams;
using detail::split_utf8_symbols;
using detail::Symbol;

constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";  // U+2581 "▁"

// A piece of the text being merged: a doubly linked list over the characters, so merging two
// neighbours is O(1). Pieces are contiguous in the text, so a piece is an (offset, length).
class SpmTokenizer final : public VocabTokenizer {
 public:
  explicit SpmTokenizer(Vocab vocab) : VocabTokenizer(std::move(vocab)) {
    for (int b = 0; b < 256; ++b) byte_token_[b] = find_byte_token(static_cast<uint8_t>(b));
  }

  TokenizerKind kind() const override { return TokenizerKind::sentencepiece; }

  std::vector<int32_t> encode_text(std::string_view text, bool add_bos, bool parse_special) const override {
    std::vector<int32_t> ids;
    if (add_bos && vocab_.bos >= 0) ids.push_back(vocab_.bos);
    // The space prefix goes before the text and before text following a user-defined token.
    bool after_special = true;
    for (const Fragment& fragment : split_special_tokens(vocab_, text, parse_special)) {
      if (fragment.token >= 0) {
        ids.push_back(fragment.token);
        after_special = true;
        continue;
      }
      std::string escaped;
      escaped.reserve(fragment.text.size() + 8);
      if (vocab_.add_space_prefix && after_special) escaped += kSpaceMarker;
      for (const char c : fragment.text) {
        if (c == ' ') {
          escaped += kSpaceMarker;
        } else {
          escaped += c;
        }
      }
      tokenize_escaped(escaped, ids);
      after_special = false;
    }
    return ids;
  }

  std::string token_bytes(int32_t id) const override {
    check_id(id);
    const std::string& text = vocab_.text[id];
    switch (vocab_.type[id]) {
      case TokenType::normal: {
        std::string out;
        out.reserve(text.size());
        for (size_t i = 0; i < text.size();) {
          if (text.compare(i, kSpaceMarker.size(), kSpaceMarker) == 0) {
            out += ' ';
            i += kSpaceMarker.size();
          } else {
            out += text[i++];
          }
        }
        return out;
      }
      case TokenType::byte:
        return std::string(1, static_cast<char>(parse_byte_token(text)));
      case TokenType::user_defined:
        return text;
      default:
        return {};  // control, unknown, unused
    }
  }

 private:
  int32_t find_byte_token(uint8_t byte) const {
    static constexpr char kHex[] = "0123456789ABCDEF";
    const std::string name = {'<', '0', 'x', kHex[byte >> 4], kHex[byte & 15], '>'};
    int32_t id = vocab_.find(name);
    if (id < 0) id = vocab_.find(std::string(1, static_cast<char>(byte)));  // some vocabs store raw bytes
    return id >= 0 ? id : vocab_.unk;
  }

  void tokenize_escaped(const std::string& text, std::vector<int32_t>& ids) const {
    std::vector<Symbol> symbols = split_utf8_symbols(text);
    if (symbols.empty()) return;
    merge_bigrams(symbols, [&](const Symbol& left, const Symbol& right) -> std::optional<double> {
      const int32_t id = vocab_.find(std::string_view(text).substr(left.offset, left.length + right.length));
      if (id < 0) return std::nullopt;
      return vocab_.score[id];
    });

    // Every merged piece is a token by construction; single characters may not be, and then go
    // out as their bytes. (llama.cpp's rev_merge re-splitting never triggers for the same reason.)
    for (int i = 0; i != -1; i = symbols[i].next) {
      const std::string_view piece = std::string_view(text).substr(symbols[i].offset, symbols[i].length);
      const int32_t id = vocab_.find(piece);
      if (id >= 0) {
        ids.push_back(id);
        continue;
      }
      for (const char c : piece) {
        const int32_t byte_id = byte_token_[static_cast<uint8_t>(c)];
        if (byte_id >= 0) ids.push_back(byte_id);
      }
    }
  }

  std::array<int32_t, 256> byte_token_{};  // id of the token standing for each byte
};

}  // namespace

std::shared_ptr<const Tokenizer> make_spm_tokenizer(Vocab vocab) {
  return std::make_shared<SpmTokenizer>(std::move(vocab));
}

}  // namespace nibble::model
