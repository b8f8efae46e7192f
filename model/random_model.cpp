#include "model/random_model.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <stdexcept>
#include <unordered_set>

#include "kernels/quantize.hpp"
#include "model/gguf.hpp"
#include "model/llama_config.hpp"
#include "model/tokenizer.hpp"

namespace nibble::model {

namespace {

constexpr int32_t kTypeNormal = 1;
constexpr int32_t kTypeUnknown = 2;
constexpr int32_t kTypeControl = 3;
constexpr int32_t kTypeByte = 6;

const char* const kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's word-boundary marker

// Letters from most to least frequent in English, so common pieces get the better scores.
const char* const kLetterOrder = "etaoinshrdlcumwfgypbvkjxqz";

// Common English words (and the words of the fixture prompt), each becomes "▁word" pieces.
const char* const kWords[] = {
    "the",     "of",      "and",       "to",        "in",       "is",      "you",       "that",    "it",
    "he",      "was",     "for",       "on",        "are",      "as",      "with",      "his",     "they",
    "at",      "be",      "this",      "have",      "from",     "or",      "one",       "had",     "by",
    "word",    "but",     "not",       "what",      "all",      "were",    "we",        "when",    "your",
    "can",     "said",    "there",     "use",       "an",       "each",    "which",     "she",     "do",
    "how",     "their",   "if",        "will",      "up",       "other",   "about",     "out",     "many",
    "then",    "them",    "these",     "so",        "some",     "her",     "would",     "make",    "like",
    "him",     "into",    "time",      "has",       "look",     "two",     "more",      "write",   "go",
    "see",     "number",  "no",        "way",       "could",    "people",  "my",        "than",    "first",
    "water",   "been",    "call",      "who",       "oil",      "its",     "now",       "find",    "long",
    "down",    "day",     "did",       "get",       "come",     "made",    "may",       "part",    "over",
    "new",     "sound",   "take",      "only",      "little",   "work",    "know",      "place",   "year",
    "live",    "me",      "back",      "give",      "most",     "very",    "after",     "thing",   "our",
    "just",    "name",    "good",      "man",       "think",    "say",     "great",     "where",   "help",
    "through", "much",    "before",    "line",      "right",    "too",     "mean",      "old",     "any",
    "same",    "tell",    "boy",       "follow",    "came",     "want",    "show",      "also",    "around",
    "form",    "three",   "small",     "set",       "put",      "end",     "does",      "another", "well",
    "large",   "must",    "big",       "even",      "such",     "because", "turn",      "here",    "why",
    "ask",     "went",    "men",       "read",      "need",     "land",    "different", "home",    "us",
    "move",    "try",     "kind",      "hand",      "picture",  "again",   "change",    "off",     "play",
    "spell",   "air",     "away",      "animal",    "house",    "point",   "page",      "letter",  "mother",
    "answer",  "found",   "study",     "still",     "learn",    "should",  "world",     "high",    "every",
    "near",    "add",     "food",      "between",   "own",      "below",   "country",   "plant",   "last",
    "school",  "father",  "keep",      "tree",      "never",    "start",   "city",      "earth",   "eye",
    "light",   "thought", "head",      "under",     "story",    "saw",     "left",      "few",     "while",
    "along",   "might",   "close",     "something", "seem",     "next",    "hard",      "open",    "example",
    "begin",   "life",    "always",    "those",     "both",     "paper",   "together",  "got",     "group",
    "often",   "run",     "important", "until",     "children", "side",    "feet",      "car",     "mile",
    "night",   "walk",    "white",     "sea",       "began",    "grow",    "took",      "river",   "four",
    "carry",   "state",   "once",      "book",      "hear",     "stop",    "without",   "second",  "later",
    "miss",    "idea",    "enough",    "eat",       "face",     "watch",   "far",       "really",  "almost",
    "let",     "above",   "girl",      "sometimes", "mountain", "cut",     "young",     "talk",    "soon",
    "list",    "song",    "being",     "leave",     "family",   "quick",   "brown",     "fox",     "jumps",
    "lazy",    "dog",     "upon",      "The",       "Once",     "It",      "In",        "He",      "She",
    "They",    "We",      "I",         "A",         "There",    "This",    "What",      "When",    "And",
    "But",     "hello",   "Hello",
};

// Builds the piece list, refusing duplicates and stopping at the vocabulary size.
class PieceList {
 public:
  explicit PieceList(size_t capacity) : capacity_(capacity) {}
  bool full() const { return pieces_.size() >= capacity_; }
  // Adds `piece` unless present or the list is full. Callers only add multi-character pieces that
  // are the concatenation of two listed pieces, so a BPE tokenizer can reach each by one merge.
  void add(const std::string& piece) {
    if (full() || !seen_.insert(piece).second) return;
    pieces_.push_back(piece);
  }
  bool has(const std::string& piece) const { return seen_.count(piece) != 0; }
  const std::vector<std::string>& pieces() const { return pieces_; }

 private:
  size_t capacity_;
  std::vector<std::string> pieces_;
  std::unordered_set<std::string> seen_;
};

// Weights ~ N(0, std^2), approximated by the Irwin-Hall sum of four 16-bit uniforms from one
// 64-bit draw: 4x cheaper than std::normal_distribution, which matters for 1.1B weights.
class WeightRng {
 public:
  explicit WeightRng(uint64_t seed) : engine_(seed) {}
  float normal(float stddev) {
    const uint64_t r = engine_();
    const uint32_t sum = static_cast<uint32_t>(r & 0xffff) + static_cast<uint32_t>((r >> 16) & 0xffff) +
                         static_cast<uint32_t>((r >> 32) & 0xffff) + static_cast<uint32_t>(r >> 48);
    // Sum of 4 U(0,1): mean 2, variance 1/3.
    const float standard = (static_cast<float>(sum) * (1.0f / 65536.0f) - 2.0f) * 1.7320508f;
    return standard * stddev;
  }
  float uniform(float lo, float hi) {
    return lo + (hi - lo) * static_cast<float>(engine_() >> 40) * (1.0f / 16777216.0f);
  }

 private:
  std::mt19937_64 engine_;
};

std::vector<uint8_t> random_matrix(int64_t row_length, int64_t rows, kernels::DType type, uint64_t seed) {
  WeightRng rng(seed);
  const float stddev = 1.0f / std::sqrt(static_cast<float>(row_length));
  const int64_t row_size = kernels::row_bytes(type, row_length);
  std::vector<uint8_t> data(static_cast<size_t>(row_size * rows));
  std::vector<float> row(static_cast<size_t>(row_length));
  for (int64_t r = 0; r < rows; ++r) {
    for (float& v : row) v = rng.normal(stddev);
    if (kernels::quantize_row(type, row.data(), data.data() + r * row_size, row_length) !=
        kernels::Status::ok) {
      throw std::invalid_argument(std::string("cannot store random weights as ") + kernels::type_name(type));
    }
  }
  return data;
}

std::vector<uint8_t> random_norm(int64_t n, uint64_t seed) {
  WeightRng rng(seed);
  std::vector<uint8_t> data(static_cast<size_t>(n) * sizeof(float));
  for (int64_t i = 0; i < n; ++i) {
    const float v = rng.uniform(0.8f, 1.2f);
    std::memcpy(data.data() + i * sizeof(float), &v, sizeof v);
  }
  return data;
}

}  // namespace

int64_t LlamaShape::n_params() const {
  const int64_t q_dim = n_head * head_size();
  const int64_t kv_dim = n_head_kv * head_size();
  const int64_t per_layer =
      2 * n_embd + n_embd * q_dim * 2 + n_embd * kv_dim * 2 + 3 * n_embd * n_ff;  // norms, q/o, k/v, ffn
  return 2 * n_vocab * n_embd + n_embd + n_layer * per_layer;
}

const char* const kShapeNames = "tiny, tiny-h64, small, llama-1b, llama-8b or llama-70b";

LlamaShape llama_shape_by_name(const std::string& name) {
  LlamaShape s;
  if (name == "tiny") {
    s.n_embd = 128;
    s.n_layer = 2;
    s.n_head = 4;
    s.n_head_kv = 2;
    s.n_ff = 256;
    s.n_vocab = 4096;
    s.n_ctx = 2048;
  } else if (name == "tiny-h64") {
    // tiny's size with heads of 64 values, where llama.cpp rotates a quantized KV cache.
    s.n_embd = 128;
    s.n_layer = 2;
    s.n_head = 2;
    s.n_head_kv = 1;
    s.n_ff = 256;
    s.n_vocab = 4096;
    s.n_ctx = 2048;
  } else if (name == "small") {
    // The dims of the fixture small-llama-q4_k_m.gguf; every row a multiple of 256, as K-quants need.
    s.n_embd = 256;
    s.n_layer = 2;
    s.n_head = 4;
    s.n_head_kv = 1;
    s.n_ff = 768;
    s.n_vocab = 4096;
    s.n_ctx = 2048;
  } else if (name == "llama-1b" || name == "llama-8b" || name == "llama-70b") {
    // Llama 3 (3.2-1B, 3.1-8B, 3.1-70B): one vocabulary, 8 KV heads, rope base 500000.
    s.n_head_kv = 8;
    s.n_vocab = 128256;
    s.n_ctx = 8192;
    s.rope_base = 500000.0f;
    if (name == "llama-1b") {
      s.n_embd = 2048;
      s.n_layer = 16;
      s.n_head = 32;
      s.n_ff = 8192;
    } else if (name == "llama-8b") {
      s.n_embd = 4096;
      s.n_layer = 32;
      s.n_head = 32;
      s.n_ff = 14336;
    } else {
      s.n_embd = 8192;
      s.n_layer = 80;
      s.n_head = 64;
      s.n_ff = 28672;
    }
  } else {
    throw std::invalid_argument("unknown model shape '" + name + "' (expected " + kShapeNames + ")");
  }
  return s;
}

uint32_t llama_file_type(kernels::DType matrix_type) {
  switch (matrix_type) {
    case kernels::DType::F32:
      return 0;  // LLAMA_FTYPE_ALL_F32
    case kernels::DType::F16:
      return 1;  // LLAMA_FTYPE_MOSTLY_F16
    case kernels::DType::Q4_0:
      return 2;  // LLAMA_FTYPE_MOSTLY_Q4_0
    case kernels::DType::Q4_1:
      return 3;  // LLAMA_FTYPE_MOSTLY_Q4_1
    case kernels::DType::Q5_0:
      return 8;  // LLAMA_FTYPE_MOSTLY_Q5_0
    case kernels::DType::Q5_1:
      return 9;  // LLAMA_FTYPE_MOSTLY_Q5_1
    case kernels::DType::Q8_0:
      return 7;  // LLAMA_FTYPE_MOSTLY_Q8_0
    case kernels::DType::Q2_K:
      return 10;  // LLAMA_FTYPE_MOSTLY_Q2_K
    case kernels::DType::Q3_K:
      return 12;  // LLAMA_FTYPE_MOSTLY_Q3_K_M
    case kernels::DType::Q4_K:
      return 15;  // LLAMA_FTYPE_MOSTLY_Q4_K_M
    case kernels::DType::Q5_K:
      return 17;  // LLAMA_FTYPE_MOSTLY_Q5_K_M
    case kernels::DType::Q6_K:
      return 18;  // LLAMA_FTYPE_MOSTLY_Q6_K
    case kernels::DType::BF16:
      return 32;  // LLAMA_FTYPE_MOSTLY_BF16
    case kernels::DType::IQ4_NL:
      return 25;  // LLAMA_FTYPE_MOSTLY_IQ4_NL
    case kernels::DType::IQ4_XS:
      return 30;  // LLAMA_FTYPE_MOSTLY_IQ4_XS
    case kernels::DType::Q8_1:
    case kernels::DType::Q8_K:
    case kernels::DType::IQ2_XXS:  // the types Nibble reads but does not write
    case kernels::DType::IQ2_XS:
    case kernels::DType::IQ2_S:
    case kernels::DType::IQ3_XXS:
    case kernels::DType::IQ3_S:
    case kernels::DType::IQ1_S:
    case kernels::DType::IQ1_M:
    case kernels::DType::TQ1_0:
    case kernels::DType::TQ2_0:
    case kernels::DType::MXFP4:
      break;
  }
  throw std::invalid_argument(std::string("no llama.cpp file type for ") + kernels::type_name(matrix_type));
}

SyntheticVocab make_synthetic_vocab(int64_t n_vocab) {
  constexpr int64_t kMinVocab = 3 + 256 + 94 + 1;  // specials, bytes, printable ASCII, "▁"
  if (n_vocab < kMinVocab) {
    throw std::invalid_argument("vocabulary size " + std::to_string(n_vocab) + " is below the minimum " +
                                std::to_string(kMinVocab));
  }
  SyntheticVocab v;
  auto add_special = [&](std::string text, int32_t type) {
    v.tokens.push_back(std::move(text));
    v.scores.push_back(0.0f);
    v.token_types.push_back(type);
  };
  add_special("<unk>", kTypeUnknown);
  add_special("<s>", kTypeControl);
  add_special("</s>", kTypeControl);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    add_special(name, kTypeByte);
  }

  PieceList list(static_cast<size_t>(n_vocab) - v.tokens.size());
  const std::string space = kSpace;
  const std::string letters = kLetterOrder;
  std::string upper = letters;
  for (char& c : upper) c = static_cast<char>(c - 'a' + 'A');
  // Single characters: merges start from these (anything else falls back to byte tokens).
  list.add(space);
  for (char c : letters) list.add(std::string(1, c));
  for (char c : upper) list.add(std::string(1, c));
  for (int c = 0x21; c < 0x7f; ++c) list.add(std::string(1, static_cast<char>(c)));
  // Word starts, then whole words built one character at a time, so each is a merge of two pieces.
  for (char c : letters + upper) list.add(space + c);
  for (const char* word : kWords) {
    const std::string w = word;
    for (size_t len = 2; len <= w.size(); ++len) list.add(space + w.substr(0, len));
  }
  for (char a : letters) {
    for (char b : letters) list.add(std::string{a, b});
  }
  // Fill the rest breadth-first: extend every multi-character piece (in score order) by a letter.
  for (size_t i = 0; !list.full() && i < list.pieces().size(); ++i) {
    const std::string base = list.pieces()[i];
    const bool single = base.size() == 1 || base == space;
    if (single) continue;
    for (char c : letters) list.add(base + c);
  }

  const auto& pieces = list.pieces();
  for (size_t i = 0; i < pieces.size(); ++i) {
    v.tokens.push_back(pieces[i]);
    v.scores.push_back(-static_cast<float>(i));  // earlier (shorter, more common) pieces merge first
    v.token_types.push_back(kTypeNormal);
  }
  return v;
}

std::vector<std::pair<std::string, GgufValue>> synthetic_tokenizer_metadata(int64_t n_vocab) {
  const SyntheticVocab vocab = make_synthetic_vocab(n_vocab);
  std::vector<GgufValue> tokens, scores, types;
  tokens.reserve(vocab.tokens.size());
  scores.reserve(vocab.tokens.size());
  types.reserve(vocab.tokens.size());
  for (const std::string& t : vocab.tokens) tokens.push_back(GgufValue::make_string(t));
  for (const float x : vocab.scores) scores.push_back(GgufValue::make_float(GgufValueType::FLOAT32, x));
  for (const int32_t t : vocab.token_types) types.push_back(GgufValue::make_int(GgufValueType::INT32, t));
  std::vector<std::pair<std::string, GgufValue>> m;
  m.emplace_back("tokenizer.ggml.model", GgufValue::make_string("llama"));
  m.emplace_back("tokenizer.ggml.tokens", GgufValue::make_array(GgufValueType::STRING, std::move(tokens)));
  m.emplace_back("tokenizer.ggml.scores", GgufValue::make_array(GgufValueType::FLOAT32, std::move(scores)));
  m.emplace_back("tokenizer.ggml.token_type", GgufValue::make_array(GgufValueType::INT32, std::move(types)));
  m.emplace_back("tokenizer.ggml.bos_token_id", GgufValue::make_uint(GgufValueType::UINT32, 1));
  m.emplace_back("tokenizer.ggml.eos_token_id", GgufValue::make_uint(GgufValueType::UINT32, 2));
  m.emplace_back("tokenizer.ggml.unknown_token_id", GgufValue::make_uint(GgufValueType::UINT32, 0));
  m.emplace_back("tokenizer.ggml.add_bos_token", GgufValue::make_bool(true));
  m.emplace_back("tokenizer.ggml.add_eos_token", GgufValue::make_bool(false));
  m.emplace_back("tokenizer.ggml.add_space_prefix", GgufValue::make_bool(true));
  return m;
}

std::shared_ptr<const Tokenizer> make_synthetic_tokenizer(int64_t n_vocab) {
  auto entries = synthetic_tokenizer_metadata(n_vocab);
  std::map<std::string, GgufValue> metadata;
  for (auto& [key, value] : entries) metadata.emplace(key, std::move(value));
  return Tokenizer::from_metadata(metadata, "synthetic vocabulary of " + std::to_string(n_vocab) + " tokens");
}

void write_random_llama(const std::string& path, const LlamaShape& shape, kernels::DType matrix_type,
                        uint64_t seed) {
  const LlamaShape& s = shape;
  if (s.n_embd <= 0 || s.n_layer <= 0 || s.n_head <= 0 || s.n_head_kv <= 0 || s.n_ff <= 0 || s.n_ctx <= 0) {
    throw std::invalid_argument("model shape sizes must be positive");
  }
  if ((s.head_dim == 0 && s.n_embd % s.n_head != 0) || s.head_dim < 0 || s.n_head % s.n_head_kv != 0 ||
      s.head_size() % 2 != 0) {
    throw std::invalid_argument(
        "n_embd must be a multiple of n_head (or the head size given) with an even head size, and n_head of "
        "n_head_kv");
  }
  using kernels::DType;
  const bool quantized = matrix_type == DType::Q4_0 || matrix_type == DType::Q4_1 ||
                         matrix_type == DType::Q5_0 || matrix_type == DType::Q5_1 ||
                         matrix_type == DType::Q8_0 || matrix_type == DType::Q2_K ||
                         matrix_type == DType::Q3_K || matrix_type == DType::Q4_K ||
                         matrix_type == DType::Q5_K || matrix_type == DType::Q6_K;
  if (!quantized && matrix_type != DType::F32 && matrix_type != DType::F16 && matrix_type != DType::BF16) {
    throw std::invalid_argument(std::string("random models cannot be written as ") +
                                kernels::type_name(matrix_type));
  }
  const int64_t head_dim = s.head_size();
  const int64_t q_dim = s.n_head * head_dim;
  const int64_t kv_dim = s.n_head_kv * head_dim;
  const int64_t block = kernels::type_info(matrix_type).block_elems;
  if (s.n_embd % block != 0 || s.n_ff % block != 0 || q_dim % block != 0) {
    throw std::invalid_argument(std::string("n_embd, n_ff and n_head x head size must be multiples of the ") +
                                kernels::type_name(matrix_type) + " block size " + std::to_string(block));
  }
  if (!s.rope_freq_factors.empty() && static_cast<int64_t>(s.rope_freq_factors.size()) != head_dim / 2) {
    throw std::invalid_argument("rope frequency factors: " + std::to_string(s.rope_freq_factors.size()) +
                                " given, a head of " + std::to_string(head_dim) + " needs " +
                                std::to_string(head_dim / 2));
  }

  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_string("general.name", "nibble-random-llama");
  w.set_uint32("general.file_type", llama_file_type(matrix_type));
  if (quantized) w.set_uint32("general.quantization_version", 2);
  w.set_uint32("llama.context_length", static_cast<uint32_t>(s.n_ctx));
  w.set_uint32("llama.embedding_length", static_cast<uint32_t>(s.n_embd));
  w.set_uint32("llama.block_count", static_cast<uint32_t>(s.n_layer));
  w.set_uint32("llama.feed_forward_length", static_cast<uint32_t>(s.n_ff));
  w.set_uint32("llama.attention.head_count", static_cast<uint32_t>(s.n_head));
  w.set_uint32("llama.attention.head_count_kv", static_cast<uint32_t>(s.n_head_kv));
  w.set_float32("llama.rope.freq_base", s.rope_base);
  w.set_float32("llama.attention.layer_norm_rms_epsilon", s.rms_eps);
  w.set_uint32("llama.rope.dimension_count", static_cast<uint32_t>(head_dim));
  if (q_dim != s.n_embd) {
    w.set_uint32("llama.attention.key_length", static_cast<uint32_t>(head_dim));
    w.set_uint32("llama.attention.value_length", static_cast<uint32_t>(head_dim));
  }
  w.set_uint32("llama.vocab_size", static_cast<uint32_t>(s.n_vocab));
  set_gguf_rope_scaling(w, s.rope_linear_factor, s.rope_yarn_original_context);
  for (auto& [key, value] : synthetic_tokenizer_metadata(s.n_vocab)) w.set(key, std::move(value));
  if (!s.rope_freq_factors.empty()) {  // not drawn: the weights' seeds stay those of the plain shape
    const auto* bytes = reinterpret_cast<const uint8_t*>(s.rope_freq_factors.data());
    w.add_tensor("rope_freqs.weight", {head_dim / 2}, kernels::DType::F32,
                 std::vector<uint8_t>(bytes, bytes + s.rope_freq_factors.size() * sizeof(float)));
  }

  // Each tensor gets its own seed from one master stream, so tensors are independent of each
  // other's sizes and generation order.
  std::mt19937_64 master(seed);
  auto matrix = [&](const std::string& name, int64_t row_length, int64_t rows) {
    w.add_tensor(name, {row_length, rows}, matrix_type,
                 random_matrix(row_length, rows, matrix_type, master()));
  };
  auto norm = [&](const std::string& name) {
    w.add_tensor(name, {s.n_embd}, kernels::DType::F32, random_norm(s.n_embd, master()));
  };
  matrix("token_embd.weight", s.n_embd, s.n_vocab);
  for (int64_t layer = 0; layer < s.n_layer; ++layer) {
    const std::string p = "blk." + std::to_string(layer) + ".";
    norm(p + "attn_norm.weight");
    matrix(p + "attn_q.weight", s.n_embd, q_dim);
    matrix(p + "attn_k.weight", s.n_embd, kv_dim);
    matrix(p + "attn_v.weight", s.n_embd, kv_dim);
    matrix(p + "attn_output.weight", q_dim, s.n_embd);
    norm(p + "ffn_norm.weight");
    matrix(p + "ffn_gate.weight", s.n_embd, s.n_ff);
    matrix(p + "ffn_up.weight", s.n_embd, s.n_ff);
    matrix(p + "ffn_down.weight", s.n_ff, s.n_embd);
  }
  norm("output_norm.weight");
  matrix("output.weight", s.n_embd, s.n_vocab);
  w.write(path);
}

}  // namespace nibble::model
