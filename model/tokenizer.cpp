// Loading a tokenizer from GGUF metadata, the kind-independent parts of Tokenizer, and the
// streaming decoder. The two algorithms live in tokenizer_spm.cpp and tokenizer_bpe.cpp.
#include "model/tokenizer.hpp"

#include <algorithm>
#include <array>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>

#include "model/tokenizer_vocab.hpp"
#include "model/unicode_utf8.hpp"

namespace nibble::model {

namespace {

bool is_integer_type(GgufValueType t) {
  switch (t) {
    case GgufValueType::UINT8:
    case GgufValueType::INT8:
    case GgufValueType::UINT16:
    case GgufValueType::INT16:
    case GgufValueType::UINT32:
    case GgufValueType::INT32:
    case GgufValueType::UINT64:
    case GgufValueType::INT64:
      return true;
    default:
      return false;
  }
}

bool is_signed_type(GgufValueType t) {
  return t == GgufValueType::INT8 || t == GgufValueType::INT16 || t == GgufValueType::INT32 ||
         t == GgufValueType::INT64;
}

int64_t integer_of(const GgufValue& v) { return is_signed_type(v.type) ? v.i : static_cast<int64_t>(v.u); }

// Reads tokenizer.ggml.* into a Vocab, reporting every problem as a GgufError naming the source.
class VocabLoader {
 public:
  VocabLoader(const std::map<std::string, GgufValue>& metadata, const std::string& source)
      : metadata_(metadata), source_(source) {}

  [[noreturn]] void fail(const std::string& what) const { throw GgufError(source_ + ": " + what); }

  const GgufValue& require_array(const std::string& key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) fail("missing " + key + " (not a model with a tokenizer?)");
    if (v->type != GgufValueType::ARRAY)
      fail(key + " is " + gguf_value_type_name(v->type) + ", expected an array");
    return *v;
  }

  std::string model() const {
    const GgufValue* v = find("tokenizer.ggml.model");
    if (v == nullptr) fail("missing tokenizer.ggml.model");
    if (v->type != GgufValueType::STRING) fail("tokenizer.ggml.model is not a string");
    return v->s;
  }

  std::string pre() const {
    const GgufValue* v = find("tokenizer.ggml.pre");
    if (v == nullptr) return "";
    if (v->type != GgufValueType::STRING) fail("tokenizer.ggml.pre is not a string");
    return v->s;
  }

  std::vector<std::string> string_array(const std::string& key) const {
    const GgufValue& v = require_array(key);
    if (v.array_type != GgufValueType::STRING) fail(key + " must be an array of strings");
    std::vector<std::string> out;
    out.reserve(v.array.size());
    for (const GgufValue& item : v.array) out.push_back(item.s);
    return out;
  }

  std::optional<bool> flag(const std::string& key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    if (v->type == GgufValueType::BOOL) return v->u != 0;
    if (is_integer_type(v->type)) return integer_of(*v) != 0;
    fail(key + " is " + gguf_value_type_name(v->type) + ", expected a bool");
  }

  // A token id key: nullopt when absent or negative (meaning "none"); GgufError when out of range.
  std::optional<int32_t> token_id(const std::string& key, int32_t n_vocab) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    if (!is_integer_type(v->type))
      fail(key + " is " + gguf_value_type_name(v->type) + ", expected an integer");
    const int64_t id = integer_of(*v);
    if (id < 0) return std::nullopt;
    if (id >= n_vocab) {
      fail(key + " = " + std::to_string(id) + " is out of range (vocabulary has " + std::to_string(n_vocab) +
           " tokens)");
    }
    return static_cast<int32_t>(id);
  }

  // spm: SentencePiece defaults (BOS/EOS/UNK ids, add BOS, space prefix); otherwise BPE's, where
  // BOS is added by default only when bpe_adds_bos.
  Vocab load(bool spm, bool bpe_adds_bos = false) const {
    Vocab vocab;
    vocab.text = string_array("tokenizer.ggml.tokens");
    const auto n = static_cast<int32_t>(vocab.text.size());
    if (n == 0) fail("tokenizer.ggml.tokens is empty");

    vocab.score.assign(n, 0.0f);
    if (const GgufValue* scores = find("tokenizer.ggml.scores")) {
      if (scores->type != GgufValueType::ARRAY ||
          (scores->array_type != GgufValueType::FLOAT32 && scores->array_type != GgufValueType::INT32)) {
        fail("tokenizer.ggml.scores must be an array of FLOAT32 or INT32");
      }
      if (scores->array.size() != vocab.text.size()) {
        fail("tokenizer.ggml.scores has " + std::to_string(scores->array.size()) + " entries but there are " +
             std::to_string(n) + " tokens");
      }
      for (int32_t i = 0; i < n; ++i) {
        const GgufValue& s = scores->array[i];
        vocab.score[i] =
            scores->array_type == GgufValueType::FLOAT32 ? static_cast<float>(s.f) : static_cast<float>(s.i);
      }
    }

    vocab.type.assign(n, TokenType::normal);
    if (const GgufValue* types = find("tokenizer.ggml.token_type")) {
      if (types->type != GgufValueType::ARRAY || !is_integer_type(types->array_type)) {
        fail("tokenizer.ggml.token_type must be an array of integers");
      }
      if (types->array.size() != vocab.text.size()) {
        fail("tokenizer.ggml.token_type has " + std::to_string(types->array.size()) +
             " entries but there are " + std::to_string(n) + " tokens");
      }
      for (int32_t i = 0; i < n; ++i) {
        const int64_t t = integer_of(types->array[i]);
        vocab.type[i] = (t >= 1 && t <= 6) ? static_cast<TokenType>(t) : TokenType::undefined;
      }
    }

    vocab.id_of.reserve(vocab.text.size());
    for (int32_t i = 0; i < n; ++i) {
      // llama.cpp renames empty tokens so that they cannot match anything.
      if (vocab.text[i].empty()) vocab.text[i] = "[EMPTY_" + std::to_string(i) + "]";
      const auto [it, inserted] = vocab.id_of.emplace(vocab.text[i], i);
      if (!inserted) {
        fail("duplicate token '" + vocab.text[i] + "' (ids " + std::to_string(it->second) + " and " +
             std::to_string(i) + ")");
      }
    }

    // Defaults as in llama.cpp: SentencePiece has <unk>=0, <s>=1, </s>=2 and adds BOS and a space
    // prefix; byte-level BPE has neither unless the metadata says so.
    const auto default_id = [n](int32_t id) { return id < n ? id : -1; };
    vocab.bos = token_id("tokenizer.ggml.bos_token_id", n).value_or(spm ? default_id(1) : -1);
    vocab.eos = token_id("tokenizer.ggml.eos_token_id", n).value_or(spm ? default_id(2) : -1);
    vocab.unk = token_id("tokenizer.ggml.unknown_token_id", n).value_or(spm ? default_id(0) : -1);
    vocab.add_bos = spm || bpe_adds_bos;
    vocab.add_space_prefix = spm;
    if (auto add_bos = flag("tokenizer.ggml.add_bos_token")) vocab.add_bos = *add_bos;
    if (auto prefix = flag("tokenizer.ggml.add_space_prefix")) vocab.add_space_prefix = *prefix;
    if (vocab.add_bos && vocab.bos < 0)
      fail("tokenizer.ggml.add_bos_token is true but there is no BOS token");

    // End of generation: EOS, EOT/EOM when given, and the usual end-of-turn token texts.
    vocab.end_of_generation.assign(n, false);
    for (const char* key : {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"}) {
      if (auto id = token_id(key, n)) vocab.end_of_generation[*id] = true;
    }
    finish_special_tokens(vocab);
    return vocab;
  }

 private:
  const GgufValue* find(const std::string& key) const {
    const auto it = metadata_.find(key);
    return it == metadata_.end() ? nullptr : &it->second;
  }

  const std::map<std::string, GgufValue>& metadata_;
  const std::string& source_;
};

}  // namespace

std::shared_ptr<const Tokenizer> Tokenizer::from_gguf(const GgufFile& file) {
  return from_metadata(file.metadata(), file.path());
}

std::shared_ptr<const Tokenizer> Tokenizer::from_metadata(const std::map<std::string, GgufValue>& metadata,
                                                          const std::string& source) {
  const VocabLoader loader(metadata, source);
  const std::string model = loader.model();
  if (model == "llama") return make_spm_tokenizer(loader.load(/*spm=*/true));
  if (model == "gpt2") {
    const std::string pre = loader.pre();
    Vocab vocab = loader.load(/*spm=*/false, /*bpe_adds_bos=*/bpe_pre_is_llama3(pre));
    const std::vector<std::string> merges = loader.string_array("tokenizer.ggml.merges");
    try {
      return make_bpe_tokenizer(std::move(vocab), merges, pre);
    } catch (const GgufError& e) {
      loader.fail(e.what());
    }
  }
  loader.fail("unknown tokenizer model '" + model + "' in tokenizer.ggml.model (supported: llama, gpt2)");
}

void finish_special_tokens(Vocab& vocab) {
  const int32_t n = vocab.size();
  if (vocab.end_of_generation.size() != static_cast<size_t>(n)) vocab.end_of_generation.assign(n, false);
  if (vocab.eos >= 0) vocab.end_of_generation[vocab.eos] = true;
  static constexpr std::array<std::string_view, 9> kEndOfTurnTexts = {
      "<|eot_id|>", "<|im_end|>", "<|end|>",         "<end_of_turn>", "<|endoftext|>",
      "<|eom_id|>", "<EOT>",      "<|end_of_text|>", "<|return|>"};
  for (std::string_view text : kEndOfTurnTexts) {
    const int32_t id = vocab.find(text);
    if (id < 0) continue;
    vocab.end_of_generation[id] = true;
    // llama.cpp treats these as control tokens even when the file forgot to mark them.
    if (vocab.type[id] == TokenType::normal) vocab.type[id] = TokenType::control;
  }
  vocab.user_defined_longest_first.clear();
  for (int32_t i = 0; i < n; ++i) {
    if (vocab.type[i] == TokenType::user_defined) vocab.user_defined_longest_first.push_back(i);
  }
  std::stable_sort(vocab.user_defined_longest_first.begin(), vocab.user_defined_longest_first.end(),
                   [&](int32_t a, int32_t b) { return vocab.text[a].size() > vocab.text[b].size(); });
  vocab.special_longest_first.clear();
  for (int32_t i = 0; i < n; ++i) {
    const TokenType t = vocab.type[i];
    if ((t == TokenType::control || t == TokenType::unknown || t == TokenType::user_defined) &&
        !vocab.text[i].empty())
      vocab.special_longest_first.push_back(i);
  }
  std::stable_sort(vocab.special_longest_first.begin(), vocab.special_longest_first.end(),
                   [&](int32_t a, int32_t b) { return vocab.text[a].size() > vocab.text[b].size(); });
}

// llama.cpp's tokenizer_st_partition: each token, longest first, splits every remaining text fragment
// at all its occurrences; without parse_special only user-defined tokens are cut out.
std::vector<Fragment> split_special_tokens(const Vocab& vocab, std::string_view text, bool parse_special) {
  std::vector<Fragment> fragments;
  if (text.empty()) return fragments;
  fragments.push_back({text, -1});
  for (const int32_t id : parse_special ? vocab.special_longest_first : vocab.user_defined_longest_first) {
    const std::string& needle = vocab.text[id];
    std::vector<Fragment> next;
    next.reserve(fragments.size());
    for (const Fragment& fragment : fragments) {
      if (fragment.token >= 0) {
        next.push_back(fragment);
        continue;
      }
      std::string_view rest = fragment.text;
      for (size_t at = rest.find(needle); at != std::string_view::npos; at = rest.find(needle)) {
        if (at > 0) next.push_back({rest.substr(0, at), -1});
        next.push_back({{}, id});
        rest.remove_prefix(at + needle.size());
      }
      if (!rest.empty()) next.push_back({rest, -1});
    }
    fragments = std::move(next);
  }
  return fragments;
}

void VocabTokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= vocab_.size()) {
    throw std::out_of_range("token id " + std::to_string(id) + " is outside the vocabulary (" +
                            std::to_string(vocab_.size()) + " tokens)");
  }
}

bool VocabTokenizer::is_end_of_generation(int32_t id) const {
  return id >= 0 && id < vocab_.size() && vocab_.end_of_generation[id];
}

const std::string& VocabTokenizer::token_text(int32_t id) const {
  check_id(id);
  return vocab_.text[id];
}

std::string VocabTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string text;
  // With a space prefix, the first piece that produces text starts with the space encode() added;
  // leading BOS/control tokens produce nothing and do not count.
  bool strip_space = vocab_.add_space_prefix;
  for (const int32_t id : ids) {
    std::string piece = token_bytes(id);
    if (piece.empty()) continue;
    if (strip_space && piece.front() == ' ') piece.erase(0, 1);
    strip_space = false;
    text += piece;
  }
  return text;
}

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer, bool strip_leading_space)
    : tokenizer_(tokenizer), strip_leading_space_(strip_leading_space && tokenizer.add_space_prefix()) {}

std::string StreamingDecoder::push(int32_t id) {
  std::string piece = tokenizer_.token_bytes(id);
  if (piece.empty()) return {};
  if (at_start_) {
    if (strip_leading_space_ && piece.front() == ' ') piece.erase(0, 1);
    at_start_ = false;
  }
  pending_ += piece;
  // Emit everything up to the last complete character; keep a cut-off tail for the next token.
  const size_t complete = utf8::complete_prefix_length(pending_);
  std::string ready = utf8::replace_invalid(std::string_view(pending_).substr(0, complete));
  pending_.erase(0, complete);
  return ready;
}

std::string StreamingDecoder::flush() {
  std::string rest = utf8::replace_invalid(pending_);
  pending_.clear();
  return rest;
}

}  // namespace nibble::model
