// Byte-level BPE tokenizer (tokenizer.ggml.model = "gpt2"), as llama.cpp's llm_tokenizer_bpe:
// the text is cut into words by a pre-tokenizer regex, each word's bytes are written with GPT-2's
// byte-to-unicode mapping, and adjacent pieces are merged lowest merge rank first.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <memory>
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

// Whitespace as llama.cpp's tables have it (Unicode White_Space): PCRE2's \s leaves out U+0085.
#define NIBBLE_WS "\\t\\n\\x0B\\f\\r\\x{85}\\p{Z}"

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
constexpr const char* kGpt2Regex = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" NIBBLE_WS
                                   "\\p{L}\\p{N}]+|[" NIBBLE_WS "]+(?![^" NIBBLE_WS "])|[" NIBBLE_WS "]+";

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|
// \s+(?!\S)|\s+ -- with the case-insensitive group spelled out, as llama.cpp does, so that only
// ASCII letters match (no Kelvin sign for 'k' and the like).
constexpr const char* kLlama3Regex =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^" NIBBLE_WS "\\p{L}\\p{N}]+[\\r\\n]*|[" NIBBLE_WS "]*[\\r\\n]+|[" NIBBLE_WS "]+(?![^" NIBBLE_WS
    "])|[" NIBBLE_WS "]+";

// llama.cpp's "default" pre-tokenizer (tokenizer.ggml.pre absent or "default"): four regexes
// applied in turn, each splitting the pieces the previous one produced.
constexpr const char* kDefaultPunctuationRegex = "[\\p{P}\\$\\+<=>\\^~\\|]+";
constexpr const char* kDefaultNumbersRegex = "\\p{N}+";
constexpr const char* kDefaultTriplesRegex = "[0-9][0-9][0-9]";

#undef NIBBLE_WS

struct CodeDeleter {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};

class Regex {
 public:
  explicit Regex(const char* pattern) {
    int error = 0;
    PCRE2_SIZE error_offset = 0;
    code_.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
                              PCRE2_UTF | PCRE2_UCP, &error, &error_offset, nullptr));
    if (!code_) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      throw GgufError(std::string("internal error compiling pre-tokenizer regex at ") +
                      std::to_string(error_offset) + ": " + reinterpret_cast<const char*>(message));
    }
    pcre2_jit_compile(code_.get(), PCRE2_JIT_COMPLETE);  // a speed-up only; matching works without it
  }

  // Splits [begin, end) of `subject` (valid UTF-8) into matches and the gaps between them, appending
  // the boundaries (end offsets) to `ends`: unmatched text is kept as pieces of its own, as llama.cpp does.
  void split(std::string_view subject, size_t begin, size_t end, pcre2_match_data* match,
             std::vector<size_t>& ends) const {
    const auto* data = reinterpret_cast<PCRE2_SPTR>(subject.data() + begin);
    const size_t length = end - begin;
    size_t position = 0;
    size_t piece_start = 0;
    while (position < length) {
      const int rc = pcre2_match(code_.get(), data, length, position, PCRE2_NO_UTF_CHECK, match, nullptr);
      if (rc < 0) break;  // PCRE2_ERROR_NOMATCH (or a resource limit): the rest is one piece
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match);
      const size_t match_begin = ovector[0];
      const size_t match_end = ovector[1];
      if (match_end == match_begin) {  // cannot happen with these patterns; step past one character
        position = match_end + utf8::sequence_length(static_cast<unsigned char>(subject[begin + match_end]));
        continue;
      }
      if (match_begin > piece_start) ends.push_back(begin + match_begin);
      ends.push_back(begin + match_end);
      piece_start = position = match_end;
    }
    if (piece_start < length) ends.push_back(end);
  }

  pcre2_match_data* new_match_data() const {
    return pcre2_match_data_create_from_pattern(code_.get(), nullptr);
  }

 private:
  std::unique_ptr<pcre2_code, CodeDeleter> code_;
};

class BpeTokenizer final : public VocabTokenizer {
 public:
  BpeTokenizer(Vocab vocab, const std::vector<std::string>& merges, const std::string& pre)
      : VocabTokenizer(std::move(vocab)) {
    if (pre.empty() || pre == "default") {
      for (const char* p :
           {kDefaultPunctuationRegex, kGpt2Regex, kDefaultNumbersRegex, kDefaultTriplesRegex}) {
        regexes_.emplace_back(p);
      }
    } else if (bpe_pre_is_gpt2(pre)) {
      regexes_.emplace_back(kGpt2Regex);
    } else if (bpe_pre_is_llama3(pre)) {
      regexes_.emplace_back(kLlama3Regex);
      ignore_merges_ = true;  // a whole word that is a token is taken as is
    } else {
      throw GgufError("unknown pre-tokenizer '" + pre +
                      "' in tokenizer.ggml.pre (supported: default, gpt-2, llama3, llama-bpe)");
    }

    // "first second" -> rank. llama.cpp splits at the first space after the first character.
    ranks_.reserve(merges.size());
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const std::string& merge = merges[rank];
      const size_t space = merge.find(' ', 1);
      if (space == std::string::npos) continue;  // malformed: can never match
      ranks_.emplace(merge, static_cast<int>(rank));
    }
  }

  TokenizerKind kind() const override { return TokenizerKind::byte_bpe; }

  std::vector<int32_t> encode_text(std::string_view text, bool add_bos, bool parse_special) const override {
    std::vector<int32_t> ids;
    if (add_bos && vocab_.bos >= 0) ids.push_back(vocab_.bos);
    for (const Fragment& fragment : split_special_tokens(vocab_, text, parse_special)) {
      if (fragment.token >= 0) {
        ids.push_back(fragment.token);
      } else {
        tokenize_text(fragment.text, ids);
      }
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
        for (const uint32_t cpt : utf8::decode_lenient(text)) {
          const int byte = utf8::unicode_to_byte(cpt);
          if (byte >= 0) {
            out += static_cast<char>(byte);
          } else {
            utf8::append(out, cpt);  // not a byte-level character: keep it as text
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
  void tokenize_text(std::string_view text, std::vector<int32_t>& ids) const {
    // Decode leniently (invalid bytes become U+FFFD, as in llama.cpp) and re-encode. The regexes
    // run on a copy where surrogates, which PCRE2 rejects, are U+FFFD too: both are 3 bytes, so
    // byte offsets agree between the two strings.
    std::string clean;
    std::string subject;
    clean.reserve(text.size());
    bool has_surrogate = false;
    for (const uint32_t cpt : utf8::decode_lenient(text)) {
      utf8::append(clean, cpt);
      has_surrogate |= (cpt >= 0xD800 && cpt <= 0xDFFF);
    }
    if (has_surrogate) {
      for (uint32_t cpt : utf8::decode_lenient(clean)) {
        if (cpt >= 0xD800 && cpt <= 0xDFFF) cpt = utf8::kReplacementChar;
        utf8::append(subject, cpt);
      }
    }
    const std::string_view regex_subject = has_surrogate ? subject : clean;

    std::vector<size_t> ends = {clean.size()};
    for (const Regex& regex : regexes_) {
      std::unique_ptr<pcre2_match_data, MatchDataDeleter> match(regex.new_match_data());
      std::vector<size_t> refined;
      refined.reserve(ends.size() * 2);
      size_t begin = 0;
      for (const size_t end : ends) {
        regex.split(regex_subject, begin, end, match.get(), refined);
        begin = end;
      }
      ends = std::move(refined);
    }

    std::string word;
    size_t begin = 0;
    for (const size_t end : ends) {
      word.clear();
      for (size_t i = begin; i < end; ++i) word += utf8::byte_to_unicode(static_cast<uint8_t>(clean[i]));
      begin = end;
      tokenize_word(word, ids);
    }
  }

  void tokenize_word(const std::string& word, std::vector<int32_t>& ids) const {
    if (ignore_merges_) {
      const int32_t id = vocab_.find(word);
      if (id >= 0) {
        ids.push_back(id);
        return;
      }
    }
    std::vector<Symbol> symbols = split_utf8_symbols(word);
    if (symbols.empty()) return;
    std::string key;
    merge_bigrams(symbols, [&](const Symbol& left, const Symbol& right) -> std::optional<double> {
      key.assign(word, left.offset, left.length);
      key += ' ';
      key.append(word, right.offset, right.length);
      const auto it = ranks_.find(key);
      if (it == ranks_.end()) return std::nullopt;
      return -static_cast<double>(it->second);  // lower rank merges first
    });

    for (int i = 0; i != -1; i = symbols[i].next) {
      const std::string_view piece = std::string_view(word).substr(symbols[i].offset, symbols[i].length);
      const int32_t id = vocab_.find(piece);
      if (id >= 0) {
        ids.push_back(id);
        continue;
      }
      // Not a token: llama.cpp looks each byte of the piece up as a one-byte token and drops the
      // bytes that are not (a complete byte-level vocabulary never gets here).
      for (const char c : piece) {
        const int32_t byte_id = vocab_.find(std::string_view(&c, 1));
        if (byte_id >= 0) ids.push_back(byte_id);
      }
    }
  }

  std::vector<Regex> regexes_;
  bool ignore_merges_ = false;
  StringMap<int> ranks_;
};

}  // namespace

bool bpe_pre_is_gpt2(const std::string& pre) {
  return pre == "gpt-2" || pre == "gpt2" || pre == "phi-2" || pre == "mpt" || pre == "olmo" || pre == "jais";
}

bool bpe_pre_is_llama3(const std::string& pre) {
  return pre == "llama3" || pre == "llama-v3" || pre == "llama-bpe" || pre == "smaug-bpe" || pre == "dbrx";
}

std::shared_ptr<const Tokenizer> make_bpe_tokenizer(Vocab vocab, const std::vector<std::string>& merges,
                                                    const std::string& pre) {
  return std::make_shared<BpeTokenizer>(std::move(vocab), merges, pre);
}

}  // namespace nibble::model
