#include "worker/gbnf_grammar.hpp"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <stdexcept>

namespace nibble::worker {

bool GrammarElement::matches(uint32_t code_point) const {
  bool in = false;
  for (const auto& [low, high] : ranges) in = in || (code_point >= low && code_point <= high);
  return in != negated;
}

bool GrammarElement::matches_any(uint32_t low, uint32_t high) const {
  if (!negated) {
    for (const auto& [a, b] : ranges)
      if (a <= high && b >= low) return true;
    return false;
  }
  // Some code point of [low, high] outside every range (ranges are sorted by their start).
  uint64_t next = low;
  for (const auto& [a, b] : ranges) {
    if (b < next) continue;
    if (a > next) return next <= high;
    next = uint64_t{b} + 1;
    if (next > high) return false;
  }
  return next <= high;
}

namespace {

constexpr uint32_t kMaxCodePoint = 0x10FFFF;

bool is_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// `digits` hex digits of `text` at `at`; -1 when they are not there.
int64_t read_hex(std::string_view text, size_t at, int digits) {
  int64_t value = 0;
  for (int i = 0; i < digits; ++i) {
    const int v =
        at + static_cast<size_t>(i) < text.size() ? hex_value(text[at + static_cast<size_t>(i)]) : -1;
    if (v < 0) return -1;
    value = value * 16 + v;
  }
  return value;
}

// The code point strict UTF-8 encodes at `at` of `text` (no overlong form, no surrogate, nothing past
// U+10FFFF) and its length in bytes; length 0 when the bytes there are not UTF-8.
std::pair<uint32_t, size_t> decode_utf8(std::string_view text, size_t at) {
  const auto c = static_cast<unsigned char>(text[at]);
  const size_t length = c < 0x80             ? 1
                        : (c & 0xE0) == 0xC0 ? 2
                        : (c & 0xF0) == 0xE0 ? 3
                        : (c & 0xF8) == 0xF0 ? 4
                                             : 0;
  if (length == 0 || at + length > text.size()) return {0, 0};
  uint32_t value = length == 1 ? c : c & (0x3Fu >> (length - 1));
  for (size_t i = 1; i < length; ++i) {
    const auto next = static_cast<unsigned char>(text[at + i]);
    if ((next & 0xC0) != 0x80) return {0, 0};
    value = (value << 6) | (next & 0x3Fu);
  }
  static constexpr uint32_t kLowest[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (value < kLowest[length] || value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF)) return {0, 0};
  return {value, length};
}

}  // namespace

struct GrammarParser {
  std::string_view text;
  Grammar& grammar;
  size_t pos = 0;
  std::map<std::string, uint32_t, std::less<>> ids{};
  std::vector<size_t> first_use{};  // per rule: where it is first referred to (npos: defined first)
  std::vector<bool> defined{};
  std::map<std::string, int> generated{};  // per rule name: rules generated for its groups and repetitions

  [[noreturn]] void fail(size_t at, const std::string& what) const {
    size_t line = 1, column = 1;
    for (size_t i = 0; i < at && i < text.size(); ++i) {
      if (text[i] == '\n') {
        ++line;
        column = 1;
      } else {
        ++column;
      }
    }
    throw std::invalid_argument("grammar: line " + std::to_string(line) + ", column " +
                                std::to_string(column) + ": " + what);
  }

  uint32_t add_rule(std::string name) {
    if (grammar.rules_.size() >= Grammar::kMaxRules)
      fail(pos, "more than " + std::to_string(Grammar::kMaxRules) +
                    " rules (with those groups and repetitions make)");
    grammar.rules_.push_back({std::move(name), {}});
    first_use.push_back(std::string::npos);
    defined.push_back(false);
    return static_cast<uint32_t>(grammar.rules_.size() - 1);
  }
  uint32_t rule_id(const std::string& name, size_t at) {
    const auto it = ids.find(name);
    if (it != ids.end()) return it->second;
    const uint32_t id = add_rule(name);
    ids.emplace(name, id);
    first_use[id] = at;
    return id;
  }
  uint32_t generated_rule(const std::string& base) {
    const uint32_t id = add_rule(base + "-" + std::to_string(++generated[base]));
    defined[id] = true;
    return id;
  }

  bool at_end() const { return pos >= text.size(); }
  char peek(size_t ahead = 0) const { return pos + ahead < text.size() ? text[pos + ahead] : '\0'; }

  // Spaces, tabs and comments; newlines too where a rule goes on over them.
  void skip_space(bool newlines) {
    while (!at_end()) {
      const char c = text[pos];
      if (c == ' ' || c == '\t') {
        ++pos;
      } else if (c == '#') {
        while (!at_end() && text[pos] != '\n') ++pos;
      } else if (newlines && (c == '\n' || c == '\r')) {
        ++pos;
      } else {
        break;
      }
    }
  }

  std::string parse_name() {
    const size_t start = pos;
    while (!at_end() && is_name_char(text[pos])) ++pos;
    if (pos == start) fail(pos, "expected a rule name");
    return std::string(text.substr(start, pos - start));
  }

  uint32_t parse_hex(int digits) {
    const int64_t value = read_hex(text, pos, digits);
    if (value < 0) fail(pos, "expected " + std::to_string(digits) + " hex digits");
    pos += static_cast<size_t>(digits);
    if (value > kMaxCodePoint) fail(pos, "a code point beyond U+10FFFF");
    return static_cast<uint32_t>(value);
  }

  // One character of a literal or a class: an escape, or a UTF-8 encoded code point.
  uint32_t parse_char() {
    if (at_end()) fail(pos, "unexpected end of the grammar");
    const auto c = static_cast<unsigned char>(text[pos]);
    if (c == '\\') {
      ++pos;
      const char e = peek();
      ++pos;
      switch (e) {
        case 'n':
          return '\n';
        case 't':
          return '\t';
        case 'r':
          return '\r';
        case '\\':
        case '"':
        case '[':
        case ']':
        case '-':
        case '^':
        case '/':
          return static_cast<uint32_t>(e);
        case 'x':
          return parse_hex(2);
        case 'u':
          return parse_hex(4);
        case 'U':
          return parse_hex(8);
        default:
          fail(pos - 1, std::string("unknown escape '\\") + e + "'");
      }
    }
    const auto [value, length] = decode_utf8(text, pos);
    if (length == 0) fail(pos, "not UTF-8");
    pos += length;
    return value;
  }

  static GrammarElement chars(uint32_t low, uint32_t high) {
    GrammarElement e;
    e.ranges.emplace_back(low, high);
    return e;
  }
  static GrammarElement ref(uint32_t rule) {
    GrammarElement e;
    e.kind = GrammarElement::Kind::rule;
    e.rule = rule;
    return e;
  }

  size_t parse_count() {
    const size_t start = pos;
    size_t value = 0;
    while (peek() >= '0' && peek() <= '9') {
      value = value * 10 + static_cast<size_t>(peek() - '0');
      if (value > Grammar::kMaxRepetition)
        fail(start, "a repetition count above " + std::to_string(Grammar::kMaxRepetition));
      ++pos;
    }
    if (pos == start) fail(pos, "expected a number");
    return value;
  }

  // The elements from `from` on, repeated min to max times (max npos: unbounded), as llama.cpp expands
  // them: min copies, then a rule that takes one more or nothing, nested (max - min) deep or recursive.
  void repeat(const std::string& rule_name, std::vector<GrammarElement>& sequence, size_t from, size_t min,
              size_t max) {
    std::vector<GrammarElement> atom(sequence.begin() + static_cast<std::ptrdiff_t>(from), sequence.end());
    sequence.resize(from);
    if (atom.size() > 1) {  // one element to copy
      const uint32_t group = generated_rule(rule_name);
      grammar.rules_[group].alternatives.push_back(std::move(atom));
      atom = {ref(group)};
    }
    for (size_t i = 0; i < min; ++i) sequence.push_back(atom[0]);
    if (max == std::string::npos) {
      const uint32_t loop = generated_rule(rule_name);
      grammar.rules_[loop].alternatives = {{atom[0], ref(loop)}, {}};
      sequence.push_back(ref(loop));
      return;
    }
    std::optional<uint32_t> inner;
    for (size_t i = min; i < max; ++i) {
      const uint32_t optional = generated_rule(rule_name);
      std::vector<GrammarElement> some = {atom[0]};
      if (inner) some.push_back(ref(*inner));
      grammar.rules_[optional].alternatives = {std::move(some), {}};
      inner = optional;
    }
    if (inner) sequence.push_back(ref(*inner));
  }

  std::vector<GrammarElement> parse_sequence(const std::string& rule_name, bool nested) {
    std::vector<GrammarElement> sequence;
    size_t last_start = std::string::npos;  // where the last item's elements begin
    for (;;) {
      const char c = peek();
      if (c == '"') {
        ++pos;
        last_start = sequence.size();
        while (peek() != '"') {
          if (at_end() || peek() == '\n') fail(pos, "unterminated literal");
          const uint32_t ch = parse_char();
          sequence.push_back(chars(ch, ch));
        }
        ++pos;
      } else if (c == '[') {
        ++pos;
        last_start = sequence.size();
        GrammarElement set;
        if (peek() == '^') {
          set.negated = true;
          ++pos;
        }
        while (peek() != ']') {
          if (at_end() || peek() == '\n') fail(pos, "unterminated character class");
          const uint32_t low = parse_char();
          uint32_t high = low;
          if (peek() == '-' && peek(1) != ']' && peek(1) != '\n' && pos + 1 < text.size()) {
            ++pos;
            high = parse_char();
            if (high < low) fail(pos, "a range whose end is below its start");
          }
          set.ranges.emplace_back(low, high);
        }
        ++pos;
        std::sort(set.ranges.begin(), set.ranges.end());
        sequence.push_back(std::move(set));
      } else if (c == '.') {
        ++pos;
        last_start = sequence.size();
        GrammarElement any;
        any.negated = true;  // outside no range: any code point
        sequence.push_back(std::move(any));
      } else if (is_name_char(c)) {
        const size_t at = pos;
        const std::string name = parse_name();
        last_start = sequence.size();
        sequence.push_back(ref(rule_id(name, at)));
      } else if (c == '(') {
        ++pos;
        skip_space(true);
        last_start = sequence.size();
        const uint32_t group = generated_rule(rule_name);
        auto alternatives = parse_alternatives(rule_name, /*nested=*/true);
        grammar.rules_[group].alternatives = std::move(alternatives);
        if (peek() != ')') fail(pos, "expected ')'");
        ++pos;
        sequence.push_back(ref(group));
      } else if (c == '*' || c == '+' || c == '?' || c == '{') {
        if (last_start == std::string::npos || last_start >= sequence.size())
          fail(pos, std::string("'") + c + "' follows nothing it could repeat");
        ++pos;
        size_t min = c == '+' ? 1 : 0, max = c == '?' ? 1 : std::string::npos;
        if (c == '{') {
          skip_space(false);
          min = parse_count();
          max = min;
          skip_space(false);
          if (peek() == ',') {
            ++pos;
            skip_space(false);
            max = peek() == '}' ? std::string::npos : parse_count();
            skip_space(false);
          }
          if (peek() != '}') fail(pos, "expected '}'");
          ++pos;
          if (max < min) fail(pos, "a repetition whose maximum is below its minimum");
        }
        repeat(rule_name, sequence, last_start, min, max);
        last_start = std::string::npos;  // a repetition is not repeated again
      } else {
        break;
      }
      skip_space(nested);
    }
    return sequence;
  }

  std::vector<std::vector<GrammarElement>> parse_alternatives(const std::string& rule_name, bool nested) {
    std::vector<std::vector<GrammarElement>> alternatives;
    alternatives.push_back(parse_sequence(rule_name, nested));
    while (peek() == '|') {
      ++pos;
      skip_space(true);
      alternatives.push_back(parse_sequence(rule_name, nested));
    }
    return alternatives;
  }

  void parse() {
    skip_space(true);
    while (!at_end()) {
      const size_t at = pos;
      const std::string name = parse_name();
      const uint32_t id = rule_id(name, at);
      if (defined[id]) fail(at, "rule '" + name + "' is defined twice");
      defined[id] = true;
      skip_space(false);
      if (text.substr(pos, 3) != "::=") fail(pos, "expected '::='");
      pos += 3;
      skip_space(true);
      grammar.rules_[id].alternatives = parse_alternatives(name, /*nested=*/false);
      if (peek() == '\r') ++pos;
      if (!at_end() && peek() != '\n') fail(pos, "expected the end of the rule (a newline)");
      skip_space(true);
    }
    for (size_t id = 0; id < grammar.rules_.size(); ++id) {
      if (!defined[id]) fail(first_use[id], "undefined rule '" + grammar.rules_[id].name + "'");
      for (const auto& alternative : grammar.rules_[id].alternatives)
        if (alternative.size() > 0xFFFF) fail(pos, "a sequence of more than 65535 elements");
      if (grammar.rules_[id].alternatives.size() > 0xFFFF)
        fail(pos, "a rule of more than 65535 alternatives");
    }
    const auto root = ids.find("root");
    if (root == ids.end()) throw std::invalid_argument("grammar: no rule 'root'");
    grammar.root_ = root->second;
    check_left_recursion();
  }

  // A rule that can begin with itself (through rules that may match nothing) is refused.
  void check_left_recursion() const {
    const auto& rules = grammar.rules_;
    std::vector<bool> nullable(rules.size(), false);
    for (bool changed = true; changed;) {
      changed = false;
      for (size_t r = 0; r < rules.size(); ++r) {
        if (nullable[r]) continue;
        for (const auto& alternative : rules[r].alternatives) {
          const bool empty =
              std::all_of(alternative.begin(), alternative.end(), [&](const GrammarElement& e) {
                return e.kind == GrammarElement::Kind::rule && nullable[e.rule];
              });
          if (empty) {
            nullable[r] = changed = true;
            break;
          }
        }
      }
    }
    std::vector<uint8_t> color(rules.size(), 0);  // 0 new, 1 on the path, 2 done
    std::function<void(uint32_t)> visit = [&](uint32_t r) {
      color[r] = 1;
      for (const auto& alternative : rules[r].alternatives) {
        for (const GrammarElement& e : alternative) {
          if (e.kind != GrammarElement::Kind::rule) break;
          if (color[e.rule] == 1) {
            const std::string& name = rules[e.rule].name;
            // A generated rule (a group or repetition inside rule "x" is "x-N"): most often a loop over
            // something that may match nothing.
            const size_t dash = name.rfind('-');
            const bool made = dash != std::string::npos && dash + 1 < name.size() &&
                              name.find_first_not_of("0123456789", dash + 1) == std::string::npos &&
                              ids.find(name) == ids.end();
            throw std::invalid_argument(
                "grammar: rule '" + name + "' is left-recursive" +
                (made ? " (a group or repetition in rule '" + name.substr(0, dash) +
                            "': a repetition of something that may match nothing, such as (\"a\"?)*, "
                            "never ends)"
                      : ""));
          }
          if (color[e.rule] == 0) visit(e.rule);
          if (!nullable[e.rule]) break;
        }
      }
      color[r] = 2;
    };
    for (uint32_t r = 0; r < rules.size(); ++r)
      if (color[r] == 0) visit(r);
  }
};

std::shared_ptr<const Grammar> Grammar::compile(std::string_view text) {
  auto grammar = std::make_shared<Grammar>();
  GrammarParser parser{text, *grammar};
  parser.parse();
  return grammar;
}

std::string Grammar::choice_text(const std::vector<std::string>& strings) {
  if (strings.empty()) throw std::invalid_argument("guided_choice: no strings to choose from");
  // root ::= "a" | "b" ..., each string's characters as literal code points (no escapes needed).
  std::string text = "root ::= ";
  for (size_t i = 0; i < strings.size(); ++i) {
    text += i == 0 ? "\"" : " | \"";
    for (const char c : strings[i]) {
      if (c == '"' || c == '\\') {
        text += '\\';
        text += c;
      } else if (c == '\n') {
        text += "\\n";
      } else if (c == '\r') {
        text += "\\r";
      } else {
        text += c;
      }
    }
    text += '"';
  }
  return text + "\n";
}

namespace {

// A regular expression read into GBNF text, construct by construct (GBNF has each of them).
struct RegexToGbnf {
  std::string_view re;
  // Inside a JSON string: every character is written raw, so none that JSON must escape (a quote, a
  // backslash, a control character) may be matched.
  bool json_string = false;
  size_t pos = 0;

  // What a negated class or '.' must also leave out.
  std::string excluded() const { return json_string ? "\"\\\\\\x00-\\x1F" : "\\n"; }
  void check_json_safe(uint32_t low, uint32_t high) {
    if (json_string && (low <= 0x1F || (low <= '"' && high >= '"') || (low <= '\\' && high >= '\\')))
      fail("a quote, backslash or control character, which a JSON string would escape");
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument("regex: at offset " + std::to_string(pos) + ": " + what);
  }
  bool at_end() const { return pos >= re.size(); }
  char peek() const { return at_end() ? '\0' : re[pos]; }

  // One code point as GBNF writes it inside a literal or a class (escaped where GBNF reads it specially).
  static std::string escaped(uint32_t c, bool in_class) {
    if (c == '"' || c == '\\' || (in_class && (c == ']' || c == '-' || c == '^' || c == '['))) {
      return std::string("\\") + static_cast<char>(c);
    }
    if (c == '\n') return "\\n";
    if (c == '\t') return "\\t";
    if (c == '\r') return "\\r";
    char buffer[16];
    if (c < 0x20 || c == 0x7F) {
      std::snprintf(buffer, sizeof buffer, "\\x%02X", c);
      return buffer;
    }
    if (c < 0x80) return std::string(1, static_cast<char>(c));
    std::snprintf(buffer, sizeof buffer, "\\U%08X", c);
    return buffer;
  }

  // A UTF-8 encoded code point of the regex.
  uint32_t code_point() {
    const auto [value, length] = decode_utf8(re, pos);
    if (length == 0) fail("not UTF-8");
    pos += length;
    return value;
  }

  uint32_t hex(int digits) {
    const int64_t value = read_hex(re, pos, digits);
    if (value < 0) fail("expected " + std::to_string(digits) + " hex digits");
    pos += static_cast<size_t>(digits);
    return static_cast<uint32_t>(value);
  }

  // After '\': a class's ranges for \d \w \s (negated: \D \W \S), else the one code point it stands for.
  struct Escape {
    std::string ranges;  // GBNF class body; empty: a single code point
    bool negated = false;
    uint32_t code_point = 0;
  };
  Escape escape() {
    if (at_end()) fail("a '\\' at the end");
    const char e = re[pos++];
    switch (e) {
      case 'd':
      case 'D':
        return {"0-9", e == 'D', 0};
      case 'w':
      case 'W':
        return {"a-zA-Z0-9_", e == 'W', 0};
      case 's':
      case 'S':
        return {" \\t\\n\\r\\x0B\\x0C", e == 'S', 0};
      case 'n':
        return {"", false, '\n'};
      case 't':
        return {"", false, '\t'};
      case 'r':
        return {"", false, '\r'};
      case 'f':
        return {"", false, '\f'};
      case 'v':
        return {"", false, '\v'};
      case '0':
        return {"", false, 0};
      case 'x':
        return {"", false, hex(2)};
      case 'u':
        return {"", false, hex(4)};
      case 'b':
      case 'B':
        fail("word boundaries (\\b, \\B) have no grammar counterpart");
      default:
        if (e >= '1' && e <= '9') fail("backreferences have no grammar counterpart");
        if ((e >= 'a' && e <= 'z') || (e >= 'A' && e <= 'Z'))
          fail(std::string("unknown escape '\\") + e + "'");
        --pos;
        return {"", false, code_point()};
    }
  }

  std::string char_class() {
    ++pos;  // '['
    std::string out = "[";
    const bool negated = peek() == '^';
    if (negated) {
      out += '^';
      ++pos;
    }
    bool first = true;
    while (first || peek() != ']') {
      if (at_end()) fail("an unterminated character class");
      first = false;
      uint32_t low = 0;
      if (peek() == '\\') {
        ++pos;
        const Escape e = escape();
        if (!e.ranges.empty()) {
          if (e.negated) fail("a negated shorthand (\\D, \\W, \\S) inside a class");
          if (json_string && e.ranges.find("\\t") != std::string::npos) check_json_safe('\t', '\t');
          out += e.ranges;
          continue;
        }
        low = e.code_point;
      } else {
        low = code_point();
      }
      uint32_t high = low;
      if (peek() == '-' && pos + 1 < re.size() && re[pos + 1] != ']') {
        ++pos;
        if (peek() == '\\') {
          ++pos;
          const Escape e = escape();
          if (!e.ranges.empty()) fail("a range ending in a shorthand class");
          high = e.code_point;
        } else {
          high = code_point();
        }
        if (high < low) fail("a range whose end is below its start");
      }
      if (!negated) check_json_safe(low, high);
      out += escaped(low, true);
      if (high != low) {
        out += '-';
        out += escaped(high, true);
      }
    }
    ++pos;  // ']'
    if (negated && json_string) out += excluded();
    return out + "]";
  }

  std::string atom() {
    const char c = peek();
    if (c == '(') {
      ++pos;
      if (peek() == '?') {
        if (pos + 1 < re.size() && re[pos + 1] == ':') {
          pos += 2;
        } else {
          fail("lookarounds and other (?...) groups have no grammar counterpart");
        }
      }
      std::string inner = alternation();  // sets nullable_ for the group
      if (peek() != ')') fail("expected ')'");
      ++pos;
      return "(" + inner + ")";
    }
    nullable_ = false;  // every other atom is one character
    if (c == '[') return char_class();
    if (c == '.') {
      ++pos;
      return "[^" + excluded() + "]";
    }
    if (c == '*' || c == '+' || c == '?' || c == '{') fail(std::string("'") + c + "' repeats nothing");
    if (c == '\\') {
      ++pos;
      const Escape e = escape();
      if (!e.ranges.empty()) {
        if (!e.negated && json_string && e.ranges.find("\\t") != std::string::npos)
          check_json_safe('\t', '\t');
        return std::string("[") + (e.negated ? "^" : "") + e.ranges +
               (e.negated && json_string ? excluded() : "") + "]";
      }
      check_json_safe(e.code_point, e.code_point);
      return "\"" + escaped(e.code_point, false) + "\"";
    }
    const uint32_t literal = code_point();
    check_json_safe(literal, literal);
    return "\"" + escaped(literal, false) + "\"";
  }

  // After atom(): nullable_ is the atom's, and becomes the repetition's.
  std::string quantified(std::string atom_text) {
    const char c = peek();
    const size_t start = pos;
    bool unbounded = false, may_skip = false;
    if (c == '*' || c == '+' || c == '?') {
      ++pos;
      atom_text += c;
      unbounded = c != '?';
      may_skip = c != '+';
    } else if (c == '{') {
      const size_t close = re.find('}', pos);
      if (close == std::string_view::npos) fail("an unterminated {m,n}");
      const std::string_view body = re.substr(pos + 1, close - pos - 1);
      if (body.empty() || body.find_first_not_of("0123456789,") != std::string_view::npos ||
          body.find(',') != body.rfind(',') || body[0] == ',')
        fail("expected {m}, {m,} or {m,n}");
      std::vector<size_t> counts;  // the grammar's limits on counts, and m <= n
      for (size_t at = 0; at < body.size();) {
        const size_t end = std::min(body.find(',', at), body.size());
        if (end - at > 3 ||
            (end > at && std::stoul(std::string(body.substr(at, end - at))) > Grammar::kMaxRepetition))
          fail("a repetition count above " + std::to_string(Grammar::kMaxRepetition));
        if (end > at) counts.push_back(std::stoul(std::string(body.substr(at, end - at))));
        at = end + 1;
      }
      if (counts.size() == 2 && counts[1] < counts[0])
        fail("a repetition whose maximum is below its minimum");
      unbounded = body.back() == ',';
      may_skip = counts[0] == 0;
      atom_text += "{" + std::string(body) + "}";
      pos = close + 1;
    } else {
      return atom_text;
    }
    if (peek() == '?') ++pos;  // lazy: the same language
    if (peek() == '*' || peek() == '+' || peek() == '{') fail("a repetition repeated");
    // A loop over something that may match nothing would be a left-recursive rule: (a|)* is (a)*.
    if (unbounded && nullable_) {
      pos = start;
      fail("a repetition without bound of something that may be empty (write (a)* for (a|)*)");
    }
    nullable_ = nullable_ || may_skip;
    return atom_text;
  }

  std::string sequence() {
    std::string out;
    bool nullable = true;
    while (!at_end() && peek() != '|' && peek() != ')') {
      // ^ and $ match the ends of the whole output, which the grammar matches whole anyway.
      if ((peek() == '^' && pos == 0) || (peek() == '$' && pos + 1 == re.size())) {
        ++pos;
        continue;
      }
      if (peek() == '^' || peek() == '$') fail("an anchor inside the expression");
      if (!out.empty()) out += ' ';
      out += quantified(atom());
      nullable = nullable && nullable_;
    }
    nullable_ = nullable;
    return out.empty() ? "\"\"" : out;
  }

  std::string alternation() {
    std::string out = sequence();
    bool nullable = nullable_;
    while (peek() == '|') {
      ++pos;
      out += " | " + sequence();
      nullable = nullable || nullable_;
    }
    nullable_ = nullable;
    return out;
  }

  bool nullable_ = false;  // the last atom, repetition, sequence or alternation read may match nothing
};

}  // namespace

std::string Grammar::regex_expression(std::string_view regex, bool json_string) {
  RegexToGbnf reader{regex, json_string};
  const std::string body = reader.alternation();
  if (!reader.at_end()) reader.fail("an unmatched ')'");
  return body;
}

std::string Grammar::regex_text(std::string_view regex) {
  return "root ::= " + regex_expression(regex) + "\n";
}

// ---------------------------------------------------------------- recognizer

namespace {

using Frame = uint64_t;
Frame pack(uint32_t rule, uint32_t alternative, uint32_t position) {
  return (Frame{rule} << 32) | (Frame{alternative} << 16) | position;
}
uint32_t rule_of(Frame f) { return static_cast<uint32_t>(f >> 32); }
uint32_t alternative_of(Frame f) { return static_cast<uint32_t>((f >> 16) & 0xFFFF); }
uint32_t position_of(Frame f) { return static_cast<uint32_t>(f & 0xFFFF); }

}  // namespace

GrammarPrefix::GrammarPrefix(const Grammar* grammar) : grammar_(grammar) {
  std::vector<std::vector<Frame>> stacks;
  const GrammarRule& root = grammar_->rules()[grammar_->root()];
  for (uint32_t b = 0; b < root.alternatives.size(); ++b) {
    std::vector<Frame> stack = {pack(grammar_->root(), b, 0)};
    expand(stack, stacks);
  }
  set_stacks(std::move(stacks));
}

void GrammarPrefix::expand(std::vector<Frame>& stack, std::vector<std::vector<Frame>>& out) const {
  const auto& rules = grammar_->rules();
  while (!stack.empty()) {
    const Frame f = stack.back();
    const auto& sequence = rules[rule_of(f)].alternatives[alternative_of(f)];
    const uint32_t p = position_of(f);
    if (p == sequence.size()) {
      stack.pop_back();
      continue;
    }
    const GrammarElement& e = sequence[p];
    if (e.kind == GrammarElement::Kind::chars) break;
    // A rule reference: past it on return (the frame dropped if that ends its sequence), then each of
    // the rule's alternatives on top.
    if (p + 1 == sequence.size()) {
      stack.pop_back();
    } else {
      stack.back() = pack(rule_of(f), alternative_of(f), p + 1);
    }
    const auto& alternatives = rules[e.rule].alternatives;
    for (uint32_t b = 0; b < alternatives.size(); ++b) {
      std::vector<Frame> next = stack;
      next.push_back(pack(e.rule, b, 0));
      expand(next, out);
    }
    return;
  }
  out.push_back(stack);
}

void GrammarPrefix::set_stacks(std::vector<std::vector<Frame>> stacks) {
  std::sort(stacks.begin(), stacks.end());
  stacks.erase(std::unique(stacks.begin(), stacks.end()), stacks.end());
  // An ambiguous grammar's parses can multiply with every byte: past kMaxStacks the first ones are kept
  // (each a real parse, so what is written still matches; some continuations are no longer offered).
  if (stacks.size() > kMaxStacks) stacks.resize(kMaxStacks);
  frames_.clear();
  stacks_.assign(1, 0);
  for (const auto& s : stacks) {
    frames_.insert(frames_.end(), s.begin(), s.end());
    stacks_.push_back(static_cast<uint32_t>(frames_.size()));
  }
}

bool GrammarPrefix::advance(uint32_t code_point) {
  const auto& rules = grammar_->rules();
  std::vector<std::vector<Frame>> next;
  for (size_t i = 0; i + 1 < stacks_.size(); ++i) {
    if (stacks_[i] == stacks_[i + 1]) continue;  // ended: takes nothing more
    const Frame top = frames_[stacks_[i + 1] - 1];
    const GrammarElement& e = rules[rule_of(top)].alternatives[alternative_of(top)][position_of(top)];
    if (!e.matches(code_point)) continue;
    std::vector<Frame> stack(frames_.begin() + stacks_[i], frames_.begin() + stacks_[i + 1]);
    stack.back() = pack(rule_of(top), alternative_of(top), position_of(top) + 1);
    expand(stack, next);
  }
  if (next.empty()) return false;
  set_stacks(std::move(next));
  return true;
}

bool GrammarPrefix::partial_fits() const {
  // The code points the pending bytes may still become: the rest all 0x80 (lowest) or all 0xBF (highest).
  uint32_t low = pending_[0] & (0x3Fu >> pending_need_), high = low;
  for (int i = 1; i <= pending_need_; ++i) {
    low = (low << 6) | (i < pending_size_ ? pending_[i] & 0x3Fu : 0x00u);
    high = (high << 6) | (i < pending_size_ ? pending_[i] & 0x3Fu : 0x3Fu);
  }
  // What strict UTF-8 lets these bytes become: no overlong form (E0 and F0 begin at U+0800 and
  // U+10000), no surrogate (ED ends at U+D7FF), nothing past U+10FFFF.
  static constexpr uint32_t kLowest[4] = {0, 0x80, 0x800, 0x10000};
  low = std::max(low, kLowest[pending_need_]);
  if (pending_size_ == 1 && pending_[0] == 0xED) high = std::min<uint32_t>(high, 0xD7FF);
  high = std::min<uint32_t>(high, kMaxCodePoint);
  const auto& rules = grammar_->rules();
  for (size_t i = 0; i + 1 < stacks_.size(); ++i) {
    if (stacks_[i] == stacks_[i + 1]) continue;
    const Frame top = frames_[stacks_[i + 1] - 1];
    if (rules[rule_of(top)].alternatives[alternative_of(top)][position_of(top)].matches_any(low, high))
      return true;
  }
  return false;
}

bool GrammarPrefix::feed(unsigned char c) {
  if (pending_need_ == 0) {
    if (c < 0x80) return advance(c);
    const uint8_t need = c >= 0xC2 && c <= 0xDF   ? 1
                         : c >= 0xE0 && c <= 0xEF ? 2
                         : c >= 0xF0 && c <= 0xF4 ? 3
                                                  : 0;
    if (need == 0) return false;
    pending_[0] = c;
    pending_size_ = 1;
    pending_need_ = need;
    if (!partial_fits()) {
      pending_size_ = pending_need_ = 0;
      return false;
    }
    return true;
  }
  // Strict UTF-8: no overlong forms, no surrogates, nothing past U+10FFFF.
  uint8_t low = 0x80, high = 0xBF;
  if (pending_size_ == 1) {
    if (pending_[0] == 0xE0) low = 0xA0;
    if (pending_[0] == 0xED) high = 0x9F;
    if (pending_[0] == 0xF0) low = 0x90;
    if (pending_[0] == 0xF4) high = 0x8F;
  }
  if (c < low || c > high) return false;
  pending_[pending_size_++] = c;
  if (pending_size_ == pending_need_ + 1) {
    uint32_t code_point = pending_[0] & (0x3Fu >> pending_need_);
    for (int i = 1; i < pending_size_; ++i) code_point = (code_point << 6) | (pending_[i] & 0x3Fu);
    const uint8_t size = pending_size_, need = pending_need_;
    pending_size_ = pending_need_ = 0;
    if (advance(code_point)) return true;
    pending_size_ = size - 1;  // back to the bytes before this one
    pending_need_ = need;
    return false;
  }
  if (partial_fits()) return true;
  --pending_size_;
  return false;
}

bool GrammarPrefix::feed(std::string_view bytes) {
  for (const char c : bytes)
    if (!feed(static_cast<unsigned char>(c))) return false;
  return true;
}

bool GrammarPrefix::complete() const {
  if (pending_need_ != 0) return false;
  for (size_t i = 0; i + 1 < stacks_.size(); ++i)
    if (stacks_[i] == stacks_[i + 1]) return true;
  return false;
}

std::string GrammarPrefix::key() const {
  std::string out;
  out.reserve(frames_.size() * sizeof(Frame) + stacks_.size() * sizeof(uint32_t) + 6);
  out.append(reinterpret_cast<const char*>(frames_.data()), frames_.size() * sizeof(Frame));
  out.append(reinterpret_cast<const char*>(stacks_.data()), stacks_.size() * sizeof(uint32_t));
  out.append(reinterpret_cast<const char*>(pending_), pending_size_);
  out += static_cast<char>(pending_size_);
  out += static_cast<char>(pending_need_);
  return out;
}

bool GrammarPrefix::finished() const {
  if (pending_need_ != 0) return false;
  for (size_t i = 0; i + 1 < stacks_.size(); ++i)
    if (stacks_[i] != stacks_[i + 1]) return false;
  return true;
}

// ---------------------------------------------------------------- over a vocabulary

GrammarConstraint::GrammarConstraint(std::vector<std::string> token_bytes,
                                     std::vector<int32_t> end_of_generation)
    : token_bytes_(std::move(token_bytes)), end_of_generation_(std::move(end_of_generation)) {
  std::sort(end_of_generation_.begin(), end_of_generation_.end());
}

const std::vector<GrammarConstraint::TrieNode>& GrammarConstraint::trie() const {
  std::call_once(trie_built_, [this] {
    trie_.emplace_back();
    for (size_t t = 0; t < token_bytes_.size(); ++t) {
      if (token_bytes_[t].empty()) continue;
      uint32_t node = 0;
      for (const char ch : token_bytes_[t]) {
        const auto c = static_cast<uint8_t>(ch);
        uint32_t child = 0;
        for (const auto& [byte, index] : trie_[node].children)
          if (byte == c) child = index;
        if (child == 0) {
          child = static_cast<uint32_t>(trie_.size());
          trie_[node].children.emplace_back(c, child);
          trie_.emplace_back();
        }
        node = child;
      }
      trie_[node].tokens.push_back(static_cast<int32_t>(t));
    }
  });
  return trie_;
}

GrammarConstraint::GrammarConstraint(const model::Tokenizer& tokenizer)
    : GrammarConstraint(
          [&] {
            std::vector<std::string> bytes;
            for (int32_t t = 0; t < tokenizer.n_vocab(); ++t) bytes.push_back(tokenizer.token_bytes(t));
            return bytes;
          }(),
          [&] {
            std::vector<int32_t> ends;
            for (int32_t t = 0; t < tokenizer.n_vocab(); ++t)
              if (tokenizer.is_end_of_generation(t)) ends.push_back(t);
            return ends;
          }()) {}

bool GrammarConstraint::allows(const GrammarPrefix& state, int32_t token) const {
  if (token < 0 || static_cast<size_t>(token) >= token_bytes_.size()) return false;
  if (std::binary_search(end_of_generation_.begin(), end_of_generation_.end(), token))
    return state.complete();
  const std::string& bytes = token_bytes_[static_cast<size_t>(token)];
  if (bytes.empty()) return false;  // control tokens
  GrammarPrefix next = state;
  return next.feed(bytes);
}

int32_t GrammarConstraint::Walk::intern(const GrammarPrefix& state) {
  const auto [it, added] = ids.emplace(state.key(), static_cast<int32_t>(states.size()));
  if (added) {
    states.push_back(state);
    next.emplace_back();
    next.back().fill(-2);
  }
  return it->second;
}

int32_t GrammarConstraint::Walk::step(int32_t id, uint8_t byte) {
  int32_t& known = next[static_cast<size_t>(id)][byte];
  if (known != -2) return known;
  GrammarPrefix after = states[static_cast<size_t>(id)];
  const int32_t result = after.feed(byte) ? intern(after) : -1;
  next[static_cast<size_t>(id)][byte] = result;  // `known` may dangle: intern() can grow `next`
  return result;
}

void GrammarConstraint::walk(uint32_t node, int32_t state, Walk& w, std::vector<uint8_t>& allowed) const {
  const std::vector<TrieNode>& nodes = trie();
  for (const auto& [byte, child] : nodes[node].children) {
    const int32_t after = w.step(state, byte);
    if (after < 0) continue;
    for (const int32_t t : nodes[child].tokens) allowed[static_cast<size_t>(t)] = 1;
    walk(child, after, w, allowed);
  }
}

void GrammarConstraint::mask(const GrammarPrefix& state, float* logits, int64_t n_vocab) const {
  std::vector<uint8_t> allowed(token_bytes_.size(), 0);
  Walk w;
  walk(0, w.intern(state), w, allowed);
  if (state.complete())
    for (const int32_t t : end_of_generation_)
      if (static_cast<size_t>(t) < allowed.size()) allowed[static_cast<size_t>(t)] = 1;
  bool any = false;
  for (int64_t t = 0; t < n_vocab; ++t) {
    const bool keep = static_cast<size_t>(t) < allowed.size() && allowed[static_cast<size_t>(t)] != 0;
    any = any || keep;
    if (!keep) logits[t] = -std::numeric_limits<float>::infinity();
  }
  if (!any)
    for (const int32_t t : end_of_generation_)
      if (t < n_vocab) logits[t] = 0.0f;
}

}  // namespace nibble::worker
