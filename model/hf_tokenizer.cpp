#include "model/hf_tokenizer.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <vector>

#include "model/hf_checkpoint.hpp"
#include "model/tokenizer_vocab.hpp"

namespace nibble::model {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space

// Llama 3's pre-tokenizer regex as tokenizer.json spells it.
constexpr const char* kLlama3SplitRegex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

std::optional<json> read_json(const fs::path& path) {
  if (!fs::exists(path)) return std::nullopt;
  std::ifstream in(path, std::ios::binary);
  if (!in) throw HfCheckpointError(path.string() + ": cannot open");
  std::ostringstream text;
  text << in.rdbuf();
  try {
    return json::parse(text.str());
  } catch (const json::exception& e) {
    throw HfCheckpointError(path.string() + ": not valid JSON: " + e.what());
  }
}

// The node's "type", or "" when it is null.
std::string type_of(const json& node) {
  if (node.is_null()) return "";
  if (!node.is_object() || !node.contains("type") || !node["type"].is_string()) return "?";
  return node["type"].get<std::string>();
}

// A token given as "text" or {"content": "text", ...} in tokenizer_config.json.
std::optional<std::string> token_content(const json& config, const char* key) {
  if (!config.is_object() || !config.contains(key)) return std::nullopt;
  const json& v = config[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return std::nullopt;
}

// What tokenizer.json says, in the form GGUF stores a vocabulary.
struct HfVocabulary {
  Vocab vocab;
  std::vector<std::string> merges;  // rank order
  std::string pre;                  // byte-level BPE's pre-tokenizer ("gpt-2", "llama-bpe"); "" for spm
  bool spm = false;                 // SentencePiece-style (byte fallback) rather than byte-level BPE
};

class TokenizerJson {
 public:
  TokenizerJson(const fs::path& dir, int64_t n_vocab)
      : dir_(dir), where_((dir / "tokenizer.json").string()), n_vocab_(n_vocab) {}

  [[noreturn]] void fail(const std::string& what) const { throw HfCheckpointError(where_ + ": " + what); }

  HfVocabulary parse() {
    const json root = *read_json(dir_ / "tokenizer.json");
    const json config = read_json(dir_ / "tokenizer_config.json").value_or(json::object());
    const json model_config = read_json(dir_ / "config.json").value_or(json::object());
    if (!root.is_object() || !root.contains("model") || !root["model"].is_object())
      fail("'model' is missing or not an object");
    const json& model = root["model"];
    const std::string model_type = type_of(model);
    if (model_type != "BPE" && !(model_type == "?" && model.contains("merges")))
      fail("model type '" + model_type + "' is not supported (only BPE tokenizers are read)");
    if (!model.contains("vocab") || !model["vocab"].is_object())
      fail("model.vocab is missing or not an object");

    const bool byte_fallback = model.value("byte_fallback", false);
    const json normalizer = root.value("normalizer", json());
    const json pre_tokenizer = root.value("pre_tokenizer", json());
    const bool spm = byte_fallback || has_type(normalizer, "Replace") || has_type(pre_tokenizer, "Metaspace");
    const bool byte_level = has_type(pre_tokenizer, "ByteLevel");
    if (spm && byte_level)
      fail("both byte fallback / Metaspace and a ByteLevel pre-tokenizer: not supported");
    if (!spm && !byte_level) {
      fail(
          "neither byte_fallback (Llama 2 style) nor a ByteLevel pre-tokenizer (GPT-2 / Llama 3 style): "
          "pre_tokenizer '" +
          type_of(pre_tokenizer) + "' is not supported");
    }

    Vocab vocab = read_vocab(root, model);
    const std::vector<std::string> merges = read_merges(model);
    const int32_t n = vocab.size();

    std::string pre;
    bool space_prefix = false;
    if (spm) {
      check_spm_normalizer(normalizer, space_prefix);
      if (type_of(pre_tokenizer) == "Metaspace") {
        space_prefix = pre_tokenizer.value("prepend_scheme", std::string("always")) != "never" &&
                       pre_tokenizer.value("add_prefix_space", true);
      } else if (!pre_tokenizer.is_null()) {
        fail("pre_tokenizer '" + type_of(pre_tokenizer) + "' is not supported with byte fallback");
      }
      // Scores: minus the rank of the first merge that makes the token, so that merging the
      // best-scored pair first is merging the best-ranked pair first.
      std::vector<float> score(n, -1e9f);
      for (int32_t i = 0; i < n; ++i) {
        if (vocab.text[i].size() <= 4 && utf8_length(vocab.text[i]) == 1)
          score[i] = 0.0f;  // single characters
      }
      for (size_t rank = 0; rank < merges.size(); ++rank) {
        const std::string& m = merges[rank];
        const size_t space = m.find(' ');
        const int32_t id = vocab.find(m.substr(0, space) + m.substr(space + 1));
        if (id >= 0 && score[id] == -1e9f) score[id] = -static_cast<float>(rank);
      }
      vocab.score = std::move(score);
    } else {
      check_byte_level(normalizer, pre_tokenizer, pre);
      vocab.score.assign(n, 0.0f);
    }

    // Special tokens: tokenizer_config.json names them by text, config.json by id; SentencePiece
    // defaults (<unk> <s> </s>) otherwise.
    const auto id_of_config = [&](const char* text_key, const char* id_key, const char* fallback) -> int32_t {
      if (auto text = token_content(config, text_key)) {
        const int32_t id = vocab.find(*text);
        if (id < 0) fail(std::string(text_key) + " '" + *text + "' of tokenizer_config.json is not a token");
        return id;
      }
      if (model_config.is_object() && model_config.contains(id_key) &&
          model_config[id_key].is_number_integer()) {
        const int64_t id = model_config[id_key].get<int64_t>();
        if (id >= 0 && id < n) return static_cast<int32_t>(id);
      }
      return fallback != nullptr ? vocab.find(fallback) : -1;
    };
    vocab.bos = id_of_config("bos_token", "bos_token_id", spm ? "<s>" : nullptr);
    vocab.eos = id_of_config("eos_token", "eos_token_id", spm ? "</s>" : nullptr);
    vocab.unk = model.contains("unk_token") && model["unk_token"].is_string()
                    ? vocab.find(model["unk_token"].get<std::string>())
                    : -1;
    if (vocab.unk >= 0) vocab.type[vocab.unk] = TokenType::unknown;
    vocab.add_bos = spm || bpe_pre_is_llama3(pre);
    if (config.is_object() && config.contains("add_bos_token") && config["add_bos_token"].is_boolean())
      vocab.add_bos = config["add_bos_token"].get<bool>();
    if (vocab.add_bos && vocab.bos < 0) vocab.add_bos = false;
    vocab.add_space_prefix = space_prefix;
    finish_special_tokens(vocab);
    return HfVocabulary{std::move(vocab), merges, pre, spm};
  }

  std::shared_ptr<const Tokenizer> load() {
    HfVocabulary v = parse();
    if (v.spm) return make_spm_tokenizer(std::move(v.vocab));
    try {
      return make_bpe_tokenizer(std::move(v.vocab), v.merges, v.pre);
    } catch (const std::exception& e) {
      fail(e.what());
    }
  }

 private:
  static size_t utf8_length(const std::string& s) {
    size_t n = 0;
    for (const char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
    return n;
  }

  // True when `node` or one member of its Sequence has type `type`.
  static bool has_type(const json& node, const std::string& type) {
    if (type_of(node) == type) return true;
    if (type_of(node) != "Sequence") return false;
    for (const char* key : {"normalizers", "pretokenizers"}) {
      if (!node.contains(key) || !node[key].is_array()) continue;
      for (const json& member : node[key]) {
        if (type_of(member) == type) return true;
      }
    }
    return false;
  }

  // Llama 2's normalizer: Prepend("▁") and Replace(" " -> "▁"), alone or in a Sequence.
  void check_spm_normalizer(const json& normalizer, bool& space_prefix) const {
    if (normalizer.is_null()) return;
    std::vector<json> members;
    if (type_of(normalizer) == "Sequence" && normalizer.contains("normalizers") &&
        normalizer["normalizers"].is_array()) {
      for (const json& m : normalizer["normalizers"]) members.push_back(m);
    } else {
      members.push_back(normalizer);
    }
    for (const json& m : members) {
      const std::string type = type_of(m);
      if (type == "Prepend" && m.value("prepend", std::string()) == kSpace) {
        space_prefix = true;
      } else if (type == "Replace" && m.contains("pattern") && m["pattern"].is_object() &&
                 m["pattern"].value("String", std::string()) == " " &&
                 m.value("content", std::string()) == kSpace) {
      } else {
        fail("normalizer '" + type +
             "' is not supported (only Prepend \"\xE2\x96\x81\" and Replace \" \" -> "
             "\"\xE2\x96\x81\")");
      }
    }
  }

  // GPT-2: ByteLevel with its own regex. Llama 3: Split(Llama 3 regex) then ByteLevel without regex.
  void check_byte_level(const json& normalizer, const json& pre_tokenizer, std::string& pre) const {
    if (!normalizer.is_null())
      fail("normalizer '" + type_of(normalizer) + "' is not supported with ByteLevel");
    if (type_of(pre_tokenizer) == "ByteLevel") {
      if (!pre_tokenizer.value("use_regex", true))
        fail("a ByteLevel pre-tokenizer without its regex (use_regex false) is not supported");
      if (pre_tokenizer.value("add_prefix_space", false))
        fail("ByteLevel add_prefix_space true is not supported");
      pre = "gpt-2";
      return;
    }
    const json& members = pre_tokenizer["pretokenizers"];
    if (!members.is_array() || members.size() != 2 || type_of(members[0]) != "Split" ||
        type_of(members[1]) != "ByteLevel") {
      fail("pre_tokenizer Sequence is not supported (only Split then ByteLevel, as in Llama 3)");
    }
    const json& pattern = members[0].value("pattern", json());
    const std::string regex = pattern.is_object() ? pattern.value("Regex", std::string()) : std::string();
    if (regex != kLlama3SplitRegex)
      fail("pre_tokenizer Split regex '" + regex + "' is not supported (only Llama 3's)");
    pre = "llama-bpe";
  }

  Vocab read_vocab(const json& root, const json& model) const {
    // Ids: model.vocab, then added_tokens (which may add ids past the model's vocabulary).
    std::vector<std::optional<std::string>> text;
    std::vector<TokenType> type;
    const auto put = [&](int64_t id, const std::string& t, TokenType ty, const std::string& from) {
      if (id < 0 || id > std::numeric_limits<int32_t>::max() / 2)
        fail(from + ": id " + std::to_string(id) + " is out of range");
      if (static_cast<size_t>(id) >= text.size()) {
        text.resize(id + 1);
        type.resize(id + 1, TokenType::unused);
      }
      if (text[id] && *text[id] != t && from == "model.vocab")
        fail("model.vocab gives id " + std::to_string(id) + " to both '" + *text[id] + "' and '" + t + "'");
      text[id] = t;
      type[id] = ty;
    };
    for (const auto& [t, id] : model["vocab"].items()) {
      if (!id.is_number_integer()) fail("model.vocab entry '" + t + "' is not an integer id");
      const bool is_byte = t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>';
      put(id.get<int64_t>(), t, is_byte ? TokenType::byte : TokenType::normal, "model.vocab");
    }
    if (root.contains("added_tokens")) {
      if (!root["added_tokens"].is_array()) fail("added_tokens is not an array");
      for (const json& a : root["added_tokens"]) {
        if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") ||
            !a["content"].is_string()) {
          fail("added_tokens entry without an integer 'id' and a string 'content'");
        }
        put(a["id"].get<int64_t>(), a["content"].get<std::string>(),
            a.value("special", false) ? TokenType::control : TokenType::user_defined, "added_tokens");
      }
    }
    if (text.empty()) fail("model.vocab is empty");
    if (n_vocab_ > 0 && static_cast<size_t>(n_vocab_) > text.size()) {
      text.resize(n_vocab_);
      type.resize(n_vocab_, TokenType::unused);
    }
    Vocab vocab;
    vocab.text.resize(text.size());
    vocab.type = std::move(type);
    for (size_t i = 0; i < text.size(); ++i) {
      // Holes in the ids become unused padding tokens, as convert_hf_to_gguf.py writes them.
      vocab.text[i] = text[i] ? *text[i] : "[PAD" + std::to_string(i) + "]";
      if (vocab.text[i].empty()) vocab.text[i] = "[EMPTY_" + std::to_string(i) + "]";
      const auto [it, inserted] = vocab.id_of.emplace(vocab.text[i], static_cast<int32_t>(i));
      if (!inserted) {
        fail("duplicate token '" + vocab.text[i] + "' (ids " + std::to_string(it->second) + " and " +
             std::to_string(i) + ")");
      }
    }
    return vocab;
  }

  // model.merges as "left right" strings, in rank order (either spelling tokenizer.json uses).
  std::vector<std::string> read_merges(const json& model) const {
    std::vector<std::string> merges;
    if (!model.contains("merges")) return merges;
    if (!model["merges"].is_array()) fail("model.merges is not an array");
    merges.reserve(model["merges"].size());
    for (const json& m : model["merges"]) {
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        if (s.find(' ') == std::string::npos || s.find(' ') == 0)
          fail("merge '" + s + "' is not \"left right\"");
        merges.push_back(s);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
      } else {
        fail("model.merges entry " + m.dump() + " is neither \"left right\" nor [left, right]");
      }
    }
    return merges;
  }

  fs::path dir_;
  std::string where_;
  int64_t n_vocab_;
};

}  // namespace

std::shared_ptr<const Tokenizer> load_hf_tokenizer(const std::string& dir, int64_t n_vocab) {
  if (!fs::exists(fs::path(dir) / "tokenizer.json")) return nullptr;
  return TokenizerJson(dir, n_vocab).load();
}

std::vector<std::pair<std::string, GgufValue>> hf_tokenizer_gguf_metadata(const std::string& dir,
                                                                          int64_t n_vocab) {
  if (!fs::exists(fs::path(dir) / "tokenizer.json")) return {};
  const HfVocabulary v = TokenizerJson(dir, n_vocab).parse();
  const int32_t n = v.vocab.size();
  std::vector<GgufValue> tokens, scores, types;
  tokens.reserve(static_cast<size_t>(n));
  scores.reserve(static_cast<size_t>(n));
  types.reserve(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) {
    tokens.push_back(GgufValue::make_string(v.vocab.text[static_cast<size_t>(i)]));
    scores.push_back(GgufValue::make_float(GgufValueType::FLOAT32, v.vocab.score[static_cast<size_t>(i)]));
    types.push_back(GgufValue::make_int(GgufValueType::INT32,
                                        static_cast<int32_t>(v.vocab.type[static_cast<size_t>(i)])));
  }
  std::vector<std::pair<std::string, GgufValue>> m;
  m.emplace_back("tokenizer.ggml.model", GgufValue::make_string(v.spm ? "llama" : "gpt2"));
  if (!v.spm) m.emplace_back("tokenizer.ggml.pre", GgufValue::make_string(v.pre));
  m.emplace_back("tokenizer.ggml.tokens", GgufValue::make_array(GgufValueType::STRING, std::move(tokens)));
  m.emplace_back("tokenizer.ggml.scores", GgufValue::make_array(GgufValueType::FLOAT32, std::move(scores)));
  m.emplace_back("tokenizer.ggml.token_type", GgufValue::make_array(GgufValueType::INT32, std::move(types)));
  if (!v.spm) {
    std::vector<GgufValue> merges;
    merges.reserve(v.merges.size());
    for (const std::string& merge : v.merges) merges.push_back(GgufValue::make_string(merge));
    m.emplace_back("tokenizer.ggml.merges", GgufValue::make_array(GgufValueType::STRING, std::move(merges)));
  }
  // Absent ids are left out, as llama.cpp's converter does (GGUF stores them unsigned).
  const std::pair<const char*, int32_t> ids[] = {{"tokenizer.ggml.bos_token_id", v.vocab.bos},
                                                 {"tokenizer.ggml.eos_token_id", v.vocab.eos},
                                                 {"tokenizer.ggml.unknown_token_id", v.vocab.unk}};
  for (const auto& [key, id] : ids) {
    if (id >= 0) m.emplace_back(key, GgufValue::make_uint(GgufValueType::UINT32, static_cast<uint32_t>(id)));
  }
  m.emplace_back("tokenizer.ggml.add_bos_token", GgufValue::make_bool(v.vocab.add_bos));
  m.emplace_back("tokenizer.ggml.add_space_prefix", GgufValue::make_bool(v.vocab.add_space_prefix));
  return m;
}

std::optional<std::string> hf_chat_template(const std::string& dir) {
  const std::optional<json> config = read_json(fs::path(dir) / "tokenizer_config.json");
  if (!config || !config->is_object() || !config->contains("chat_template")) return std::nullopt;
  const json& t = (*config)["chat_template"];
  if (t.is_string()) return t.get<std::string>();
  if (t.is_array()) {
    for (const json& named : t) {
      if (named.is_object() && named.value("name", "") == "default" && named.contains("template") &&
          named["template"].is_string())
        return named["template"].get<std::string>();
    }
  }
  return std::nullopt;
}

}  // namespace nibble::model
