#pragma once
// Internal to nibble_model: the vocabulary both tokenizer kinds share, and the pieces of Tokenizer
// that do not depend on the kind.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "model/tokenizer.hpp"

namespace nibble::model {

// tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
enum class TokenType : int32_t {
  undefined = 0,
  normal = 1,
  unknown = 2,
  control = 3,
  user_defined = 4,
  unused = 5,
  byte = 6,
};

// Hash map keyed by std::string that can be probed with a string_view without allocating.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <typename V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

struct Vocab {
  std::vector<std::string> text;
  std::vector<float> score;
  std::vector<TokenType> type;
  StringMap<int32_t> id_of;  // token text -> id
  int32_t bos = -1;
  int32_t eos = -1;
  int32_t unk = -1;
  std::vector<bool> end_of_generation;  // by id
  bool add_bos = false;
  bool add_space_prefix = false;
  // User-defined tokens, longest first: they are cut out of the text before the tokenizer proper
  // runs, even though special-token parsing is off (llama.cpp's tokenizer_st_partition).
  std::vector<int32_t> user_defined_longest_first;
  // With parse_special, control, unknown and user-defined tokens, longest first (llama.cpp's
  // cache_special_tokens).
  std::vector<int32_t> special_longest_first;

  int32_t size() const { return static_cast<int32_t>(text.size()); }
  // Id of a piece of text, or -1.
  int32_t find(std::string_view piece) const {
    const auto it = id_of.find(piece);
    return it == id_of.end() ? -1 : it->second;
  }
  // Control and unknown tokens decode to nothing; so do unused/undefined ones (as in llama.cpp).
  bool decodes_to_nothing(int32_t id) const {
    const TokenType t = type[id];
    return t == TokenType::control || t == TokenType::unknown || t == TokenType::unused ||
           t == TokenType::undefined;
  }
};

// Marks end-of-generation tokens (EOS, entries already set, the usual end-of-turn texts, which
// become control tokens) and lists the user-defined tokens. `id_of`, `type` and `eos` must be set.
void finish_special_tokens(Vocab& vocab);

// A stretch of the input: either raw text still to be tokenized, or a special token found in it.
struct Fragment {
  std::string_view text;
  int32_t token = -1;  // >= 0: this fragment is that token
};
// llama.cpp's tokenizer_st_partition: the user-defined tokens (and with parse_special the control and
// unknown ones) cut out of `text`.
std::vector<Fragment> split_special_tokens(const Vocab& vocab, std::string_view text, bool parse_special);

// The parts of Tokenizer common to both kinds.
class VocabTokenizer : public Tokenizer {
 public:
  explicit VocabTokenizer(Vocab vocab) : vocab_(std::move(vocab)) {}

  std::string decode(const std::vector<int32_t>& ids) const override;
  int32_t n_vocab() const override { return vocab_.size(); }
  int32_t bos_id() const override { return vocab_.bos; }
  int32_t eos_id() const override { return vocab_.eos; }
  bool add_bos_default() const override { return vocab_.add_bos; }
  bool add_space_prefix() const override { return vocab_.add_space_prefix; }
  bool is_end_of_generation(int32_t id) const override;
  const std::string& token_text(int32_t id) const override;

 protected:
  // Throws std::out_of_range for an id outside the vocabulary.
  void check_id(int32_t id) const;
  Vocab vocab_;
};

// Byte value of a byte token "<0xAB>" (the two hex digits at positions 3 and 4, as llama.cpp
// reads them; malformed digits give 0 like strtol there).
inline uint8_t parse_byte_token(const std::string& text) {
  const auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  if (text.size() < 5) return 0;
  const int hi = digit(text[3]);
  const int lo = digit(text[4]);
  if (hi < 0) return 0;
  return static_cast<uint8_t>(lo < 0 ? hi : hi * 16 + lo);
}

std::shared_ptr<const Tokenizer> make_spm_tokenizer(Vocab vocab);

// tokenizer.ggml.pre names of the pre-tokenizer families supported besides llama.cpp's "default".
bool bpe_pre_is_gpt2(const std::string& pre);
bool bpe_pre_is_llama3(const std::string& pre);  // Llama 3's regex; such models add BOS by default
// `merges`: tokenizer.ggml.merges in rank order; `pre`: tokenizer.ggml.pre ("" when absent).
// Throws GgufError for a pre-tokenizer it does not know.
std::shared_ptr<const Tokenizer> make_bpe_tokenizer(Vocab vocab, const std::vector<std::string>& merges,
                                                    const std::string& pre);

}  // namespace nibble::model
