#include "worker/json_constraint.hpp"

#include <algorithm>
#include <limits>

namespace nibble::worker {

namespace {

constexpr std::string_view kLiterals[] = {"true", "false", "null"};

bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
bool is_hex(unsigned char c) { return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

}  // namespace

bool JsonPrefix::whitespace(unsigned char c) {
  // Following a schema, compact: one space at most (a model fond of indentation spends no tokens on it).
  if (schema_ != nullptr && c == '\n') return false;
  if (whitespace_ == 0 && (c == ' ' || c == '\n')) {
    whitespace_ = c == ' ' ? 1 : 2;
    return true;
  }
  if (whitespace_ >= 2 && whitespace_ - 2 < kMaxIndent && (c == ' ' || c == '\t')) {
    ++whitespace_;
    return true;
  }
  return false;
}

JsonPrefix::JsonPrefix(const JsonSchema* schema) : schema_(schema) {
  if (schema_ != nullptr) value_node_ = schema_->root();
}

uint64_t JsonPrefix::all_properties() const {
  const size_t n = schema_->node(nodes_[depth_ - 1]).properties.size();
  return n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
}

bool JsonPrefix::open(unsigned char bracket, uint16_t node) {
  if (depth_ >= kMaxDepth) return false;
  stack_[depth_] = static_cast<char>(bracket);
  nodes_[depth_] = node;
  seen_[depth_] = 0;
  ++depth_;
  state_ = bracket == '{' ? State::key_or_close : State::value_or_close;
  if (bracket == '[')
    value_node_ = kind_of(node) == JsonSchemaNode::Kind::array ? schema_->node(node).items : any_node();
  return true;
}

bool JsonPrefix::close(unsigned char bracket) {
  if (depth_ == 0 || stack_[depth_ - 1] != (bracket == '}' ? '{' : '[')) return false;
  // An object closes only with every required property written.
  if (bracket == '}' && typed_object() &&
      (schema_->node(nodes_[depth_ - 1]).required & ~seen_[depth_ - 1]) != 0)
    return false;
  --depth_;
  end_value();
  return true;
}

void JsonPrefix::end_value() { state_ = depth_ == 0 ? State::done : State::comma_or_close; }

bool JsonPrefix::start_value(unsigned char c) {
  using Kind = JsonSchemaNode::Kind;
  if (kind_of(value_node_) == Kind::any_of) {  // the alternative this first byte begins
    const char wanted = begins_with(c);
    for (const uint16_t alternative : schema_->node(value_node_).alternatives) {
      const char begins = begins_with(kind_of(alternative));
      if (wanted != 0 && begins == wanted) {
        value_node_ = alternative;
        return start_value(c);
      }
    }
    return false;
  }
  const Kind kind = kind_of(value_node_);
  if (c == '{' && (kind == Kind::any || kind == Kind::object))
    return open(c, kind == Kind::any ? any_node() : value_node_);
  if (c == '[' && (kind == Kind::any || kind == Kind::array))
    return open(c, kind == Kind::any ? any_node() : value_node_);
  if (c == '"' && (kind == Kind::any || kind == Kind::string)) {
    state_ = State::string;
    key_ = false;
    return true;
  }
  if (c == '"' && kind == Kind::string_enum) {
    const size_t n = schema_->node(value_node_).literals.size();
    state_ = State::enum_match;
    candidates_ = n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
    match_pos_ = 0;
    return true;
  }
  if ((c == '-' || is_digit(c)) && (kind == Kind::any || kind == Kind::number || kind == Kind::integer)) {
    state_ = State::number;
    number_ = c == '-' ? Number::minus : c == '0' ? Number::zero : Number::integer;
    integer_ = kind == Kind::integer;
    digits_ = c == '-' ? 0 : 1;
    return true;
  }
  for (uint8_t i = 0; i < 3; ++i) {
    const bool fits = kind == Kind::any || (kind == Kind::boolean && i < 2) || (kind == Kind::null && i == 2);
    if (fits && c == static_cast<unsigned char>(kLiterals[i][0])) {
      state_ = State::literal;
      literal_ = i;
      literal_pos_ = 1;
      return true;
    }
  }
  return false;
}

namespace {

using Names = std::vector<std::pair<std::string, uint16_t>>;

// The i-th of a node's properties (names) or enum values (values).
const std::string& name_at(const std::vector<std::string>* values, const Names* names, size_t i) {
  return values != nullptr ? (*values)[i] : (*names)[i].first;
}

// Those among `candidates` that continue with byte c at `pos`.
uint64_t matching(const std::vector<std::string>* values, const Names* names, uint64_t candidates,
                  uint8_t pos, unsigned char c) {
  uint64_t out = 0;
  const size_t n = values != nullptr ? values->size() : names->size();
  for (size_t i = 0; i < n && i < 64; ++i) {
    const std::string& name = name_at(values, names, i);
    if ((candidates >> i & 1) && name.size() > pos && static_cast<unsigned char>(name[pos]) == c)
      out |= uint64_t{1} << i;
  }
  return out;
}

// The one among `candidates` that ends at `pos`, or -1.
int ending(const std::vector<std::string>* values, const Names* names, uint64_t candidates, uint8_t pos) {
  const size_t n = values != nullptr ? values->size() : names->size();
  for (size_t i = 0; i < n && i < 64; ++i) {
    if ((candidates >> i & 1) && name_at(values, names, i).size() == pos) return static_cast<int>(i);
  }
  return -1;
}

}  // namespace

bool JsonPrefix::feed(unsigned char c) {
  const JsonPrefix before = *this;
  const bool is_space = c == ' ' || c == '\t' || c == '\n' || c == '\r';
  if (!is_space) whitespace_ = 0;
  bool ok = false;
  switch (state_) {
    case State::start:  // one space at most (a SentencePiece word's), so output never idles before '{'
      ok = (whitespace_ == 0 && c == ' ' && whitespace(c)) || (c == '{' && open(c, value_node_));
      break;
    case State::value:
      ok = whitespace(c) || start_value(c);
      break;
    case State::value_or_close:
      ok = whitespace(c) || (c == ']' ? close(c) : start_value(c));
      break;
    case State::key_or_close:
    case State::key:
      if (whitespace(c)) {
        ok = true;
      } else if (c == '"' && typed_object()) {  // one of its properties not written yet
        candidates_ = all_properties() & ~seen_[depth_ - 1];
        match_pos_ = 0;
        state_ = State::key_match;
        ok = candidates_ != 0;
      } else if (c == '"') {
        state_ = State::string;
        key_ = true;
        ok = true;
      } else {
        ok = state_ == State::key_or_close && c == '}' && close(c);
      }
      break;
    case State::colon:
      ok = whitespace(c) || c == ':';
      if (c == ':') state_ = State::value;
      break;
    case State::comma_or_close:
      if (whitespace(c)) {
        ok = true;
      } else if (c == ',') {
        // An object with properties takes another key only while one is left.
        ok = !typed_object() || (all_properties() & ~seen_[depth_ - 1]) != 0;
        state_ = stack_[depth_ - 1] == '{' ? State::key : State::value;
        if (stack_[depth_ - 1] == '[') {
          const uint16_t node = nodes_[depth_ - 1];
          value_node_ = kind_of(node) == JsonSchemaNode::Kind::array ? schema_->node(node).items : any_node();
        }
      } else {
        ok = (c == '}' || c == ']') && close(c);
      }
      break;
    case State::string:
      if (utf8_left_ > 0) {
        ok = c >= utf8_low_ && c <= utf8_high_;
        --utf8_left_;
        utf8_low_ = 0x80;
        utf8_high_ = 0xBF;
      } else if (c == '"') {
        ok = true;
        if (key_) {
          state_ = State::colon;
          value_node_ = any_node();  // a key of an object without properties: any value
        } else {
          end_value();
        }
      } else if (c == '\\') {
        ok = true;
        state_ = State::escape;
      } else if (c < 0x20) {
        ok = false;
      } else if (c < 0x80) {
        ok = true;
      } else if (c >= 0xC2 && c <= 0xDF) {
        ok = true;
        utf8_left_ = 1;
      } else if (c >= 0xE0 && c <= 0xEF) {
        ok = true;
        utf8_left_ = 2;
        if (c == 0xE0) utf8_low_ = 0xA0;   // no overlong forms
        if (c == 0xED) utf8_high_ = 0x9F;  // no surrogates
      } else if (c >= 0xF0 && c <= 0xF4) {
        ok = true;
        utf8_left_ = 3;
        if (c == 0xF0) utf8_low_ = 0x90;
        if (c == 0xF4) utf8_high_ = 0x8F;  // nothing beyond U+10FFFF
      }
      break;
    case State::key_match:
    case State::enum_match: {
      const JsonSchemaNode& node =
          schema_->node(state_ == State::key_match ? nodes_[depth_ - 1] : value_node_);
      const auto* values = state_ == State::enum_match ? &node.literals : nullptr;
      const auto* names = state_ == State::key_match ? &node.properties : nullptr;
      if (c == '"') {
        const int i = ending(values, names, candidates_, match_pos_);
        ok = i >= 0;
        if (ok && state_ == State::key_match) {
          seen_[depth_ - 1] |= uint64_t{1} << i;
          value_node_ = node.properties[static_cast<size_t>(i)].second;
          state_ = State::colon;
        } else if (ok) {
          end_value();
        }
      } else {
        candidates_ = matching(values, names, candidates_, match_pos_, c);
        ok = candidates_ != 0 && match_pos_ < JsonSchema::kMaxNameBytes;
        ++match_pos_;
      }
      break;
    }
    case State::escape:
      ok = c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' || c == 'r' || c == 't' ||
           c == 'u';
      state_ = c == 'u' ? State::hex : State::string;
      hex_left_ = 4;
      break;
    case State::hex: {
      // Surrogates as JSON parsers take them: a high one (D800-DBFF) only with a low one (DC00-DFFF)
      // right after it as another \u escape, and a low one only there; decided digit by digit, so that
      // every prefix taken can still be completed.
      const int digit = 4 - hex_left_;
      const bool d = c == 'd' || c == 'D';
      const bool low_second = (c >= 'c' && c <= 'f') || (c >= 'C' && c <= 'F');
      const bool high_second = (c >= '8' && c <= '9') || c == 'a' || c == 'b' || c == 'A' || c == 'B';
      ok = is_hex(c);
      if (low_due_ && digit == 0) ok = ok && d;
      if (low_due_ && digit == 1) ok = ok && low_second;
      if (!low_due_ && digit == 1 && (hex_first_ == 'd' || hex_first_ == 'D')) {
        ok = ok && !low_second;
        high_ = high_second;
      }
      if (digit == 0) hex_first_ = static_cast<char>(c);
      if (--hex_left_ == 0) {
        state_ = high_ && !low_due_ ? State::low_backslash : State::string;
        high_ = false;
        low_due_ = false;
      }
      break;
    }
    case State::low_backslash:
      ok = c == '\\';
      state_ = State::low_u;
      break;
    case State::low_u:
      ok = c == 'u';
      state_ = State::hex;
      hex_left_ = 4;
      low_due_ = true;
      break;
    case State::number: {
      // A byte that cannot continue the number ends it where it may end, and is read after it.
      const auto next = [&](Number n) {
        number_ = n;
        return true;
      };
      switch (number_) {
        case Number::minus:
          ok = is_digit(c) && next(c == '0' ? Number::zero : Number::integer);
          break;
        case Number::zero:
          ok = !integer_ &&
               ((c == '.' && next(Number::dot)) || ((c == 'e' || c == 'E') && next(Number::exponent)));
          break;
        case Number::integer:
          ok = is_digit(c) || (!integer_ && ((c == '.' && next(Number::dot)) ||
                                             ((c == 'e' || c == 'E') && next(Number::exponent))));
          break;
        case Number::dot:
          ok = is_digit(c) && next(Number::fraction);
          break;
        case Number::fraction:
          ok = is_digit(c) || ((c == 'e' || c == 'E') && next(Number::exponent));
          break;
        case Number::exponent:
          ok = (c == '+' || c == '-') ? next(Number::exponent_sign)
                                      : is_digit(c) && next(Number::exponent_digits);
          break;
        case Number::exponent_sign:
          ok = is_digit(c) && next(Number::exponent_digits);
          break;
        case Number::exponent_digits:
          ok = is_digit(c);
          break;
      }
      // Following a schema, at most kMaxDigits digits in a row (an integer part, a fraction, an exponent):
      // what an int64 or a double holds, and no endless digits from a weak model.
      if (ok && is_digit(c)) {
        digits_ = number_ == before.number_ ? static_cast<uint8_t>(digits_ + 1) : 1;
        ok = schema_ == nullptr || digits_ <= kMaxDigits;
        if (!ok) number_ = before.number_;
      }
      const bool may_end = number_ == Number::zero || number_ == Number::integer ||
                           number_ == Number::fraction || number_ == Number::exponent_digits;
      if (!ok && may_end) {
        *this = before;
        if (!is_space) whitespace_ = 0;
        end_value();
        ok = feed(c);
        if (!ok) *this = before;
        return ok;
      }
      break;
    }
    case State::literal:
      ok = c == static_cast<unsigned char>(kLiterals[literal_][literal_pos_]);
      if (ok && ++literal_pos_ == kLiterals[literal_].size()) end_value();
      break;
    case State::done:
      ok = whitespace(c);
      break;
  }
  if (!ok) *this = before;
  return ok;
}

bool JsonPrefix::feed(std::string_view bytes) {
  for (const char c : bytes) {
    if (!feed(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

JsonConstraint::JsonConstraint(std::vector<std::string> token_bytes, std::vector<int32_t> end_of_generation)
    : token_bytes_(std::move(token_bytes)), end_of_generation_(std::move(end_of_generation)) {
  classify();
}

void JsonConstraint::classify() {
  std::sort(end_of_generation_.begin(), end_of_generation_.end());
  JsonPrefix in_string;
  in_string.feed("{\"");
  class_.assign(token_bytes_.size(), 0);
  for (size_t t = 0; t < token_bytes_.size(); ++t) {
    JsonPrefix p = in_string;
    if (!token_bytes_[t].empty() && p.feed(token_bytes_[t]) && p.in_string_text()) class_[t] = kStringText;
  }
  for (const int32_t t : end_of_generation_) {
    if (t >= 0 && static_cast<size_t>(t) < class_.size()) class_[static_cast<size_t>(t)] = kEnd;
  }
}

JsonConstraint::JsonConstraint(const model::Tokenizer& tokenizer) {
  for (int32_t t = 0; t < tokenizer.n_vocab(); ++t) {
    token_bytes_.push_back(tokenizer.token_bytes(t));
    if (tokenizer.is_end_of_generation(t)) end_of_generation_.push_back(t);
  }
  classify();
}

bool JsonConstraint::allows(const JsonPrefix& state, int32_t token) const {
  if (token < 0 || token >= n_vocab()) return false;
  if (std::binary_search(end_of_generation_.begin(), end_of_generation_.end(), token))
    return state.complete();
  const std::string& bytes = token_bytes_[static_cast<size_t>(token)];
  if (bytes.empty() || state.complete()) return false;  // control tokens; after the object, only its end
  JsonPrefix next = state;
  return next.feed(bytes);
}

void JsonConstraint::mask(const JsonPrefix& state, float* logits, int64_t n_vocab) const {
  const int64_t n = std::min(n_vocab, this->n_vocab());
  // What allows() says, faster: a token whose first byte the state refuses is refused; plain string
  // text inside a string fits; only the rest are run through the recognizer.
  bool first_byte[256];
  for (int c = 0; c < 256; ++c) {
    JsonPrefix next = state;
    first_byte[c] = !state.complete() && next.feed(static_cast<unsigned char>(c));
  }
  const bool in_text = state.in_string_text();
  int64_t kept = 0;
  for (int64_t t = 0; t < n; ++t) {
    const std::string& bytes = token_bytes_[static_cast<size_t>(t)];
    const uint8_t kind = class_[static_cast<size_t>(t)];
    const bool allowed = kind == kEnd || bytes.empty() ? allows(state, static_cast<int32_t>(t))
                         : !first_byte[static_cast<unsigned char>(bytes[0])]
                             ? false
                             : (in_text && kind == kStringText) || allows(state, static_cast<int32_t>(t));
    if (!allowed) logits[t] = -std::numeric_limits<float>::infinity();
    kept += allowed ? 1 : 0;
  }
  // A vocabulary with no token that continues the output (none should be: every prefix taken can be
  // completed, but a vocabulary may lack the bytes): its end, rather than a row with nothing to sample.
  if (kept == 0) {
    for (const int32_t t : end_of_generation_)
      if (t < n) logits[t] = 0.0f;
  }
  for (int64_t t = n; t < n_vocab; ++t) logits[t] = -std::numeric_limits<float>::infinity();
}

}  // namespace nibble::worker
