#pragma once
// Grammar-constrained output: llama.cpp's GBNF grammars (its `grammar` parameter; vLLM's guided_grammar
// and guided_choice), compiled to rules of character-set and rule-reference elements, and the recognizer
// of output prefixes that the sampling worker masks each step's vocabulary with (as it does for JSON,
// worker/json_constraint).
//
// GBNF as llama.cpp reads it (grammars/README.md there): `name ::= alternatives`, one rule a line (a
// rule goes on over newlines inside parentheses or after '|'); "literals" with \n \t \r \\ \" \xHH
// \uHHHH \UHHHHHHHH escapes; [character classes] with ranges and ^ negation; `.` any character; rule
// names; ( groups ); the repetitions * + ? {m} {m,} {m,n}; # comments. The output must match `root`.
// Left-recursive rules are refused (a recognizer that reads left to right could not finish them).
//
// The recognizer holds every way the output so far can continue (llama.cpp's stacks: each a path of
// rule positions, its top a character set), reads code points decoded from UTF-8 bytes (a token may
// end inside one: it checks the bytes so far could still begin one the grammar takes), and is complete
// when some path has reached the end of root.
#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "model/tokenizer.hpp"

namespace nibble::worker {

struct GrammarElement {
  enum class Kind : uint8_t { chars, rule };
  Kind kind = Kind::chars;
  bool negated = false;                               // chars: any code point outside the ranges
  std::vector<std::pair<uint32_t, uint32_t>> ranges;  // chars: inclusive code point ranges
  uint32_t rule = 0;                                  // rule: the rule referred to
  bool matches(uint32_t code_point) const;
  // Whether some code point in [low, high] matches (a partial UTF-8 sequence's possible completions).
  bool matches_any(uint32_t low, uint32_t high) const;
};

struct GrammarRule {
  std::string name;                                       // as written; generated rules: name + "-" + n
  std::vector<std::vector<GrammarElement>> alternatives;  // each a sequence; an empty one matches ""
};

class Grammar {
 public:
  static constexpr size_t kMaxRules = 4096;
  static constexpr size_t kMaxRepetition = 256;  // {m,n}: m and n at most this

  // The grammar in `text`. Throws std::invalid_argument naming the line and column and the problem,
  // e.g. "grammar: line 2, column 9: undefined rule 'digit'", "grammar: rule 'expr' is left-recursive".
  static std::shared_ptr<const Grammar> compile(std::string_view text);
  // The GBNF text of a grammar whose language is exactly these strings (vLLM's guided_choice).
  static std::string choice_text(const std::vector<std::string>& strings);
  // The GBNF text of a grammar whose language is what the regular expression matches whole (vLLM's
  // guided_regex): literals, escapes (\d \w \s and their negations, \n \t \xHH \uHHHH, escaped
  // punctuation), [classes], '.' (not a newline), groups and (?:...), |, * + ? {m} {m,} {m,n} (lazy
  // forms read as greedy: the language is the same), ^ and $ at its ends. Throws std::invalid_argument
  // naming the offset for what a grammar has no counterpart of: backreferences, lookarounds, \b.
  static std::string regex_text(std::string_view regex);
  // The same as a GBNF expression (no rule around it). json_string: the characters are a JSON string's,
  // written raw, so a regex that would match a quote, a backslash or a control character is refused
  // (negated classes and '.' leave them out).
  static std::string regex_expression(std::string_view regex, bool json_string = false);

  const std::vector<GrammarRule>& rules() const { return rules_; }
  uint32_t root() const { return root_; }

 private:
  std::vector<GrammarRule> rules_;
  uint32_t root_ = 0;
  friend struct GrammarParser;
};

// The output so far against a grammar (not owned: it outlives every copy of this state).
class GrammarPrefix {
 public:
  // The most ways the output may go on that are kept at once (an ambiguous grammar's parses multiply
  // with every byte: beyond this the first are kept, so a step's work stays bounded).
  static constexpr size_t kMaxStacks = 1024;

  explicit GrammarPrefix(const Grammar* grammar);

  // Appends one byte; false (and the state unchanged) when the output could no longer match.
  bool feed(unsigned char c);
  // All bytes, or false at the first that does not fit (the state then holds the bytes before it).
  bool feed(std::string_view bytes);
  // The output so far matches root (the generation may end here; it may also go on).
  bool complete() const;
  // No byte can follow (every way has ended): then only the end of generation fits.
  bool finished() const;
  // The state as bytes: equal keys, equal states (what the mask's walk interns states by).
  std::string key() const;

 private:
  // A position in a rule: (rule, alternative, element), packed; a stack is a path of them, its top last.
  using Frame = uint64_t;
  bool advance(uint32_t code_point);
  bool partial_fits() const;  // the pending UTF-8 bytes may begin a code point some stack takes
  // Adds `stack` (its top may be a rule reference or an ended sequence) to `out` in closure form.
  void expand(std::vector<Frame>& stack, std::vector<std::vector<Frame>>& out) const;
  void set_stacks(std::vector<std::vector<Frame>> stacks);

  const Grammar* grammar_;
  // The stacks, flat: stack i is frames_[stacks_[i] .. stacks_[i + 1]) (stacks_ has one more entry).
  std::vector<Frame> frames_;
  std::vector<uint32_t> stacks_;
  uint8_t pending_[4] = {};  // a code point's UTF-8 bytes read so far
  uint8_t pending_size_ = 0, pending_need_ = 0;
};

// The constraint over a vocabulary: which tokens may follow a grammar prefix (their bytes fit; an
// end-of-generation token only once the output matches), found by walking a trie of the tokens' bytes
// once per step (tokens that share a beginning share its work).
class GrammarConstraint {
 public:
  GrammarConstraint(std::vector<std::string> token_bytes, std::vector<int32_t> end_of_generation);
  explicit GrammarConstraint(const model::Tokenizer& tokenizer);

  // logits: [n_vocab]; every token that cannot continue `state` gets -infinity (when none can, the end
  // of generation is kept rather than a row with nothing to sample).
  void mask(const GrammarPrefix& state, float* logits, int64_t n_vocab) const;
  bool allows(const GrammarPrefix& state, int32_t token) const;
  const std::string& token_bytes(int32_t token) const { return token_bytes_.at(static_cast<size_t>(token)); }
  const std::vector<int32_t>& end_of_generation() const { return end_of_generation_; }

 private:
  struct TrieNode {
    std::vector<std::pair<uint8_t, uint32_t>> children;  // (byte, node)
    std::vector<int32_t> tokens;                         // tokens whose bytes end here
  };
  // One mask's states: each distinct one once, and its successor per byte (-1: refused, -2: not yet
  // known). Tokens that share a beginning share a trie path, and paths through the same states share
  // those states' transitions: most of a walk's edges are a table lookup.
  struct Walk {
    std::vector<GrammarPrefix> states;
    std::unordered_map<std::string, int32_t> ids;
    std::vector<std::array<int32_t, 256>> next;
    int32_t intern(const GrammarPrefix& state);
    int32_t step(int32_t id, uint8_t byte);
  };
  void walk(uint32_t node, int32_t state, Walk& w, std::vector<uint8_t>& allowed) const;

  const std::vector<TrieNode>& trie() const;  // built at the first mask (a 128k vocabulary's: tens of MB)

  std::vector<std::string> token_bytes_;
  std::vector<int32_t> end_of_generation_;
  mutable std::once_flag trie_built_;
  mutable std::vector<TrieNode> trie_;
};

}  // namespace nibble::worker
