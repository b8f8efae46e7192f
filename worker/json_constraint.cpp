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

bool JsonPrefix::open(unsigned char bracket) {
  if (depth_ >= kMaxDepth) return false;
  stack_[depth_++] = static_cast<char>(bracket);
  state_ = bracket == '{' ? State::key_or_close : State::value_or_close;
  return true;
}

bool JsonPrefix::close(unsigned char bracket) {
  if (depth_ == 0 || stack_[depth_ - 1] != (bracket == '}' ? '{' : '[')) return false;
  --depth_;
  end_value();
  return true;
}

void JsonPrefix::end_value() { state_ = depth_ == 0 ? State::done : State::comma_or_close; }

bool JsonPrefix::start_value(unsigned char c) {
  if (c == '{' || c == '[') return open(c);
  if (c == '"') {
    state_ = State::string;
    key_ = false;
    return true;
  }
  if (c == '-' || is_digit(c)) {
    state_ = State::number;
    number_ = c == '-' ? Number::minus : c == '0' ? Number::zero : Number::integer;
    return true;
  }
  for (uint8_t i = 0; i < 3; ++i) {
    if (c == static_cast<unsigned char>(kLiterals[i][0])) {
      state_ = State::literal;
      literal_ = i;
      literal_pos_ = 1;
      return true;
    }
  }
  return false;
}

bool JsonPrefix::feed(unsigned char c) {
  const JsonPrefix before = *this;
  const bool is_space = c == ' ' || c == '\t' || c == '\n' || c == '\r';
  if (!is_space) whitespace_ = 0;
  bool ok = false;
  switch (state_) {
    case State::start:  // one space at most (a SentencePiece word's), so output never idles before '{'
      ok = (whitespace_ == 0 && c == ' ' && whitespace(c)) || (c == '{' && open(c));
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
        state_ = stack_[depth_ - 1] == '{' ? State::key : State::value;
        ok = true;
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
    case State::escape:
      ok = c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' || c == 'r' || c == 't' ||
           c == 'u';
      state_ = c == 'u' ? State::hex : State::string;
      hex_left_ = 4;
      break;
    case State::hex:
      ok = is_hex(c);
      if (--hex_left_ == 0) state_ = State::string;
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
          ok = (c == '.' && next(Number::dot)) || ((c == 'e' || c == 'E') && next(Number::exponent));
          break;
        case Number::integer:
          ok = is_digit(c) || (c == '.' && next(Number::dot)) ||
               ((c == 'e' || c == 'E') && next(Number::exponent));
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
  for (int64_t t = 0; t < n; ++t) {
    const std::string& bytes = token_bytes_[static_cast<size_t>(t)];
    const uint8_t kind = class_[static_cast<size_t>(t)];
    const bool allowed = kind == kEnd || bytes.empty() ? allows(state, static_cast<int32_t>(t))
                         : !first_byte[static_cast<unsigned char>(bytes[0])]
                             ? false
                             : (in_text && kind == kStringText) || allows(state, static_cast<int32_t>(t));
    if (!allowed) logits[t] = -std::numeric_limits<float>::infinity();
  }
  for (int64_t t = n; t < n_vocab; ++t) logits[t] = -std::numeric_limits<float>::infinity();
}

}  // namespace nibble::worker
