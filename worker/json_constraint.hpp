#pragma once
// Output constrained to JSON (OpenAI's response_format {"type": "json_object"}, llama.cpp's and vLLM's
// JSON mode), or to a JSON schema (response_format json_schema; worker/json_schema): before each sampling
// step every token whose bytes cannot continue the text so far into such an object is masked out, and once
// the object is complete only an end-of-generation token is left. The check is a byte-level recognizer of
// JSON prefixes (RFC 8259, strict UTF-8 in strings) that walks the schema's nodes as it reads, run on each
// token's bytes from the current state: a copy of a few hundred bytes, no allocation.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "model/tokenizer.hpp"
#include "worker/json_schema.hpp"

namespace nibble::worker {

// Whether a byte string is a prefix of a JSON text whose value is an object (one the schema describes,
// when there is one); fed one byte at a time.
class JsonPrefix {
 public:
  JsonPrefix() = default;
  // Following `schema` (not owned: it outlives every copy of this state); null: any JSON object.
  explicit JsonPrefix(const JsonSchema* schema);

  static constexpr int kMaxDepth = JsonSchema::kMaxDepth;  // deeper nesting is refused (a fixed stack)
  // Whitespace between tokens as llama.cpp's JSON grammar allows it (so output never idles on padding):
  // none, one space, or a newline and up to kMaxIndent spaces or tabs; before the object one space at most.
  // Following a schema, compact: none or one space (as outlines' default), so a weak model does not spend
  // its tokens on indentation.
  static constexpr int kMaxIndent = 20;
  static constexpr int kMaxDigits = 18;  // following a schema, digits in a row in a number

  // Appends one byte; false (and the state unchanged) when the text would no longer be a JSON prefix.
  bool feed(unsigned char c);
  // All bytes, or false at the first that does not fit (the state then holds the bytes before it).
  bool feed(std::string_view bytes);
  // The top-level object is closed (only whitespace may follow).
  bool complete() const { return state_ == State::done; }
  // Inside a string, between characters: any text without '"', '\\', control bytes or broken UTF-8 fits.
  bool in_string_text() const { return state_ == State::string && utf8_left_ == 0; }

 private:
  enum class State : uint8_t {
    start,           // before the top-level object
    value,           // a value (after ':' or ',' in an array)
    value_or_close,  // a value or ']' (after '[')
    key_or_close,    // a key or '}' (after '{')
    key,             // a key (after ',' in an object)
    colon,           // ':' after a key
    comma_or_close,  // ',' or the innermost container's closing bracket
    string,          // inside a string (key_ says whether it is a key)
    key_match,       // inside a key of an object with properties: candidates_ still match
    enum_match,      // inside a string of an enum: candidates_ still match
    escape,          // after '\' in a string
    hex,             // in a \u escape (hex_left digits to go)
    low_backslash,   // after a \u escape of a high surrogate: the '\' of its low one
    low_u,           // ... and its 'u'
    number,          // in a number (number_ says where)
    literal,         // in true / false / null (literal_, literal_pos_)
    done,            // the top-level object closed
  };
  enum class Number : uint8_t {
    minus,
    zero,
    integer,
    dot,
    fraction,
    exponent,
    exponent_sign,
    exponent_digits
  };

  JsonSchemaNode::Kind kind_of(uint16_t node) const {
    return schema_ == nullptr ? JsonSchemaNode::Kind::any : schema_->node(node).kind;
  }
  uint16_t any_node() const { return schema_ == nullptr ? 0 : schema_->any(); }
  // The innermost container is an object whose keys are its schema's properties.
  bool typed_object() const {
    return schema_ != nullptr && stack_[depth_ - 1] == '{' && !schema_->node(nodes_[depth_ - 1]).free_keys &&
           kind_of(nodes_[depth_ - 1]) == JsonSchemaNode::Kind::object;
  }
  uint64_t all_properties() const;  // of the innermost typed object, a bit each
  bool open(unsigned char bracket, uint16_t node);
  bool close(unsigned char bracket);
  bool start_value(unsigned char c);
  void end_value();
  bool whitespace(unsigned char c);

  State state_ = State::start;
  bool key_ = false;  // the string being read is an object's key
  Number number_ = Number::minus;
  uint8_t literal_ = 0;      // index into the literals true, false, null
  uint8_t literal_pos_ = 0;  // bytes of it matched
  uint8_t hex_left_ = 0;
  char hex_first_ = 0;                          // the \u escape's first digit
  bool high_ = false;                           // it is a high surrogate's (D800-DBFF): a low one must follow
  bool low_due_ = false;                        // it is the low surrogate after a high one (DC00-DFFF)
  uint8_t utf8_left_ = 0;                       // continuation bytes still due in a string
  uint8_t utf8_low_ = 0x80, utf8_high_ = 0xBF;  // the next continuation byte's range (strict UTF-8)
  uint8_t whitespace_ = 0;  // this run of whitespace: 0 none yet, 1 a space, 2 + n a newline and n indents
  bool integer_ = false;    // the number being read is an integer's (no fraction or exponent)
  uint8_t digits_ = 0;      // digits in a row in the number being read
  uint8_t depth_ = 0;
  uint8_t match_pos_ = 0;    // key_match, enum_match: bytes of the candidates matched
  uint16_t value_node_ = 0;  // the schema node of the value to come
  uint64_t candidates_ = 0;  // key_match: properties, enum_match: values, still matching (a bit each)
  const JsonSchema* schema_ = nullptr;
  char stack_[kMaxDepth] = {};      // '{' or '[' per open container
  uint16_t nodes_[kMaxDepth] = {};  // ... its schema node
  uint64_t seen_[kMaxDepth] = {};   // ... an object's properties written so far (a bit each)
};

// The constraint over a vocabulary: each token's bytes (empty for control tokens) and which tokens end
// a generation.
class JsonConstraint {
 public:
  // token_bytes: per token id the bytes it stands for; end_of_generation: ids that end a generation.
  JsonConstraint(std::vector<std::string> token_bytes, std::vector<int32_t> end_of_generation);
  // A model's: each token's bytes (Tokenizer::token_bytes) and its end-of-generation tokens.
  explicit JsonConstraint(const model::Tokenizer& tokenizer);
  int64_t n_vocab() const { return static_cast<int64_t>(token_bytes_.size()); }
  const std::string& token_bytes(int32_t token) const { return token_bytes_.at(static_cast<size_t>(token)); }
  const std::vector<int32_t>& end_of_generation() const { return end_of_generation_; }

  // logits: [n_vocab] (n_vocab <= token_bytes.size()); every token that cannot continue `state` gets
  // -infinity; an end-of-generation token is kept only when the object is complete, and then alone (or
  // when no token of the vocabulary continues the output: the generation ends rather than sampling none).
  void mask(const JsonPrefix& state, float* logits, int64_t n_vocab) const;
  // Whether `token` may follow `state` (what mask keeps).
  bool allows(const JsonPrefix& state, int32_t token) const;

 private:
  void classify();

  std::vector<std::string> token_bytes_;
  std::vector<int32_t> end_of_generation_;
  // Per token: kEnd for an end of generation, kStringText when its bytes are plain string text (fit
  // anywhere in_string_text() holds, and leave it holding: most tokens inside a string need no run of
  // the recognizer), else 0.
  static constexpr uint8_t kEnd = 1, kStringText = 2;
  std::vector<uint8_t> class_;
};

}  // namespace nibble::worker
