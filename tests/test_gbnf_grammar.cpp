// GBNF grammars (worker/gbnf_grammar): refusals by line and column; the recognizer against std::regex on
// random texts for grammars that are regular (every repetition form, classes, negation, '.', UTF-8);
// a recursive grammar; texts cut anywhere (inside a code point too) read as whole ones; the vocabulary
// mask equal to allows() token by token, and random walks through it ending in sentences of the grammar.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "model/gguf.hpp"
#include "model/random_model.hpp"
#include "model/tokenizer.hpp"
#include "tests/support/test_support.hpp"
#include "worker/gbnf_grammar.hpp"

namespace nibble::worker {
namespace {

// Whether the recognizer takes all of `text` and calls it complete.
bool matches(const Grammar& grammar, std::string_view text) {
  GrammarPrefix p(&grammar);
  return p.feed(text) && p.complete();
}

TEST(GbnfGrammar, RefusalsNameTheLineColumnAndProblem) {
  const std::vector<std::pair<std::string, std::string>> refused = {
      {"root ::= digit\n", "line 1, column 10: undefined rule 'digit'"},
      {"item ::= \"x\"\n", "no rule 'root'"},
      {"root ::= \"a\"\nroot ::= \"b\"\n", "line 2, column 1: rule 'root' is defined twice"},
      {"root ::= expr\nexpr ::= expr \"+\" \"1\" | \"1\"\n", "rule 'expr' is left-recursive"},
      {"root ::= a\na ::= b \"x\"\nb ::= \"\" | a\n", "is left-recursive"},
      {"root ::= (\"a\"?)*\n",
       "rule 'root-3' is left-recursive (a group or repetition in rule 'root': a repetition"},
      {"root ::= \"a\n", "line 1, column 12: unterminated literal"},
      {"root ::= [a-\n", "unterminated character class"},
      {"root ::= [z-a]\n", "a range whose end is below its start"},
      {"root ::= \"\\q\"\n", "unknown escape '\\q'"},
      {"root ::= * \"a\"\n", "'*' follows nothing it could repeat"},
      {"root ::= \"a\"{3,2}\n", "maximum is below its minimum"},
      {"root ::= \"a\"{1000}\n", "a repetition count above 256"},
      {"root ::= (\"a\" \n", "expected ')'"},
      {"root \"a\"\n", "line 1, column 6: expected '::='"},
      {"root ::= \"a\" )\n", "expected the end of the rule"},
  };
  for (const auto& [text, message] : refused) {
    try {
      Grammar::compile(text);
      ADD_FAILURE() << "compiled " << text;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << text << " -> " << e.what();
    }
  }
}

// Regular grammars and the same languages as ECMAScript regexes: on random texts over their alphabets the
// recognizer and std::regex_match agree, and a text the recognizer refuses part-way has no completion
// by the regex's reading either (checked for the prefix it took: some completion of it matches).
TEST(GbnfGrammar, RegularGrammarsAgreeWithStdRegex) {
  struct Case {
    std::string grammar, regex, alphabet;
  };
  const std::vector<Case> cases = {
      {"root ::= [a-c]{2,4} (\"x\" | \"yz\")*\n", "[a-c]{2,4}(x|yz)*", "abcxyzd"},
      {"root ::= \"k\"? num (\",\" num)*\nnum ::= \"-\"? [0-9]+ (\".\" [0-9]{1,2})?\n",
       "k?-?[0-9]+(\\.[0-9]{1,2})?(,-?[0-9]+(\\.[0-9]{1,2})?)*", "k-0123.,9x"},
      {"# a comment\nroot ::= ( [^ab] | \"ab\" ){3,}  # trailing\n", "([^ab]|ab){3,}", "abcd"},
      {"root ::= \"q\" . \"q\" [x-z]{0,2}\n", "q[\\s\\S]q[x-z]{0,2}", "qxyz\n"},
      {"root ::= (\n  \"a\" |\n  \"b\" \"c\"\n)+ \"\\n\"\n", "(a|bc)+\\n", "abc\n"},
  };
  std::mt19937 rng(3);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.grammar);
    const auto grammar = Grammar::compile(c.grammar);
    const std::regex regex(c.regex);
    int matched = 0;
    for (int i = 0; i < 4000; ++i) {
      std::string text;
      const size_t length = rng() % 9;
      for (size_t j = 0; j < length; ++j) text += c.alphabet[rng() % c.alphabet.size()];
      const bool expected = std::regex_match(text, regex);
      EXPECT_EQ(matches(*grammar, text), expected) << "'" << text << "'";
      matched += expected ? 1 : 0;
    }
    EXPECT_GT(matched, 20);
  }
}

TEST(GbnfGrammar, RecursiveGrammarsNestAndCountBrackets) {
  const auto grammar =
      Grammar::compile("root ::= expr\nexpr ::= term (\"+\" term)*\nterm ::= [0-9]+ | \"(\" expr \")\"\n");
  for (const char* good : {"1", "12+3", "(1)", "((1+2)+3)+(4)", "((((7))))"})
    EXPECT_TRUE(matches(*grammar, good)) << good;
  for (const char* bad : {"", "+", "(1", "1+", "(1))", "()", "1++2"})
    EXPECT_FALSE(matches(*grammar, bad)) << bad;
  GrammarPrefix p(grammar.get());
  EXPECT_TRUE(p.feed("((1+"));
  EXPECT_FALSE(p.complete());
  EXPECT_FALSE(p.feed(")"));  // refused: the state stays where it was
  EXPECT_TRUE(p.feed("2))"));
  EXPECT_TRUE(p.complete());
  EXPECT_FALSE(p.finished());  // "+..." may still follow
}

TEST(GbnfGrammar, CodePointsAcrossTokenBoundariesAndStrictUtf8) {
  const auto grammar = Grammar::compile("root ::= [à-ÿ]+ \"€\" [^\\x00-\\x7F]\n");
  const std::string good = "\xc3\xa9\xc3\xbf\xe2\x82\xac\xf0\x9f\x98\x80";  // é ÿ € 😀
  EXPECT_TRUE(matches(*grammar, good));
  // Cut anywhere, byte by byte: the same.
  GrammarPrefix p(grammar.get());
  for (const char c : good) ASSERT_TRUE(p.feed(static_cast<unsigned char>(c)));
  EXPECT_TRUE(p.complete());
  GrammarPrefix q(grammar.get());
  EXPECT_FALSE(q.feed("a"));                               // outside [à-ÿ]
  EXPECT_FALSE(q.feed(static_cast<unsigned char>(0xE2)));  // no [à-ÿ] code point begins E2
  EXPECT_TRUE(q.feed(static_cast<unsigned char>(0xC3)));   // U+00C0..U+00FF begin C3
  EXPECT_FALSE(q.feed(static_cast<unsigned char>(0x9F)));  // C3 9F is U+00DF, below à (U+00E0)
  EXPECT_TRUE(q.feed(static_cast<unsigned char>(0xA0)));   // à
  EXPECT_FALSE(q.feed("\xc0\xaf"));                        // an overlong '/'
  EXPECT_FALSE(q.feed("\xed\xa0\x80"));                    // a surrogate
  EXPECT_FALSE(
      q.feed("\xe2\x82\xac"
             "a"));  // € then ASCII
  // A lead byte is taken only if a code point it can begin fits: none of E0's (U+0800..U+0FFF) is ASCII.
  const auto ascii = Grammar::compile("root ::= [\\x00-\\x7F]\n");
  GrammarPrefix r(ascii.get());
  EXPECT_FALSE(r.feed(static_cast<unsigned char>(0xE0)));
  EXPECT_FALSE(r.feed(static_cast<unsigned char>(0xC2)));
  EXPECT_TRUE(r.feed("\x7f"));
}

TEST(GbnfGrammar, ChoiceIsExactlyItsStrings) {
  const auto grammar = Grammar::compile(Grammar::choice_text({"yes", "no", "say \"hi\"\\", "n"}));
  for (const char* s : {"yes", "no", "n", "say \"hi\"\\"}) EXPECT_TRUE(matches(*grammar, s)) << s;
  for (const char* s : {"", "ye", "yess", "nn", "say \"hi\""}) EXPECT_FALSE(matches(*grammar, s)) << s;
  EXPECT_THROW(Grammar::choice_text({}), std::invalid_argument);
}

// Regular expressions as grammars (vLLM's guided_regex): on random texts the grammar matches exactly what
// std::regex matches whole; what a grammar cannot say is refused by offset.
TEST(GbnfGrammar, RegexesBecomeGrammarsOfTheSameLanguage) {
  struct Case {
    std::string regex, alphabet;
  };
  const std::vector<Case> cases = {
      {"^\\d{3}-\\d{2,4}$", "0123-a"},
      {"(?:ab|c)*d?", "abcdx"},
      {"[A-Fa-f0-9]+(\\.[^\\s.]{1,2})?", "aF9.g \tz"},
      {"\\w+(@\\w+)?(\\.(co|o))?", "ab@.co_!"},
      {"x(y|)z+?", "xyz"},
      {"(a|){2}(b?c)+", "abc"},  // bounded repetitions of what may be empty are fine
      {"[\\]\\-^a]{2}|\\[\\\\\\]", "]-^a[\\b"},
      {"\\S\\s\\D\\W", " a1!\n"},
      {"(a|b)+c{0,1}.", "abc\n."},
  };
  std::mt19937 rng(21);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.regex);
    const std::string text = Grammar::regex_text(c.regex);
    const auto grammar = Grammar::compile(text);
    const std::regex regex(c.regex);
    int matched = 0;
    for (int i = 0; i < 3000; ++i) {
      std::string sample;
      const size_t length = rng() % 8;
      for (size_t j = 0; j < length; ++j) sample += c.alphabet[rng() % c.alphabet.size()];
      const bool expected = std::regex_match(sample, regex);
      EXPECT_EQ(matches(*grammar, sample), expected) << "'" << sample << "' grammar " << text;
      matched += expected ? 1 : 0;
    }
    EXPECT_GT(matched, 10) << text;
  }
  for (const auto& [regex, message] : std::vector<std::pair<std::string, std::string>>{
           {"(a)\\1", "backreferences"},
           {"a(?=b)", "lookarounds"},
           {"\\bword", "word boundaries"},
           {"a**", "a repetition repeated"},
           {"*a", "'*' repeats nothing"},
           {"(ab", "expected ')'"},
           {"ab)", "an unmatched ')'"},
           {"[\\D]", "a negated shorthand"},
           {"a{2,x}", "expected {m}, {m,} or {m,n}"},
           {"a^b", "an anchor inside"},
           {"(a|)*", "a repetition without bound of something that may be empty"},     // fuzz-found: a
           {"x(b?c?)+", "a repetition without bound of something that may be empty"},  // left-recursive loop
           {"a{2,1}", "maximum is below its minimum"},  // found by the grammar fuzz target
           {"a{300}", "a repetition count above 256"},
           {"\xf5\x80\x80\x80", "not UTF-8"},  // beyond U+10FFFF: found so too
           {"\xc3(", "not UTF-8"}}) {
    try {
      Grammar::regex_text(regex);
      ADD_FAILURE() << "translated " << regex;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << regex << " -> " << e.what();
    }
  }
}

TEST(GbnfGrammar, MaskKeepsExactlyWhatAllowsAndWalksEndInSentences) {
  const auto grammar = Grammar::compile("root ::= \"(\" [ab]* \")\" | \"é\" [0-9]{1,3}\n");
  // A vocabulary with multi-byte tokens, a token that splits 'é', a control token and an end token.
  const std::vector<std::string> vocab = {"(",        ")", "a",  "b",   "ab", "ba)", "(a", "\xc3", "\xa9",
                                          "\xc3\xa9", "1", "23", "456", "",   "x",   ")(", "b)"};
  const int32_t eos = 13;
  GrammarConstraint constraint(vocab, {eos});
  std::mt19937 rng(9);
  int sentences = 0;
  for (int walk = 0; walk < 300; ++walk) {
    GrammarPrefix state(grammar.get());
    std::string text;
    for (int step = 0; step < 12; ++step) {
      std::vector<float> logits(vocab.size(), 0.0f);
      constraint.mask(state, logits.data(), static_cast<int64_t>(logits.size()));
      std::vector<int32_t> kept;
      for (int32_t t = 0; t < static_cast<int32_t>(vocab.size()); ++t) {
        EXPECT_EQ(std::isfinite(logits[static_cast<size_t>(t)]), constraint.allows(state, t))
            << text << " + " << t;
        if (std::isfinite(logits[static_cast<size_t>(t)])) kept.push_back(t);
      }
      ASSERT_FALSE(kept.empty()) << text;
      const int32_t t = kept[rng() % kept.size()];
      if (t == eos) {
        EXPECT_TRUE(state.complete()) << text;
        break;
      }
      ASSERT_TRUE(state.feed(vocab[static_cast<size_t>(t)]));
      text += vocab[static_cast<size_t>(t)];
    }
    if (state.complete()) {
      ++sentences;
      EXPECT_TRUE(std::regex_match(text, std::regex("\\([ab]*\\)|\xc3\xa9[0-9]{1,3}"))) << text;
    }
  }
  EXPECT_GT(sentences, 100);
}

// With a real vocabulary (a random model's SentencePiece one: byte tokens, merged pieces, "▁" spaces),
// random walks through the mask never reach a state where nothing but the end is left before the output
// is a sentence.
TEST(GbnfGrammar, WalksThroughARealVocabularyReachSentences) {
  test::TempDir dir;
  const std::string path = (dir.path() / "tiny.gguf").string();
  model::write_random_llama(path, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 5);
  const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(path));
  const GrammarConstraint constraint(*tokenizer);
  const auto grammar = Grammar::compile(
      "root ::= mood \": \" [0-9]{1,3} \"%\" (\" \" word){0,2} \".\"\nmood ::= \"happy\" | \"sad\" | "
      "\"lucky\"\n"
      "word ::= [a-z]{1,6}\n");
  std::mt19937 rng(4);
  int sentences = 0;
  for (int walk = 0; walk < 40; ++walk) {
    GrammarPrefix state(grammar.get());
    std::string text;
    for (int step = 0; step < 60 && !state.finished(); ++step) {
      std::vector<float> logits(static_cast<size_t>(tokenizer->n_vocab()), 0.0f);
      constraint.mask(state, logits.data(), tokenizer->n_vocab());
      std::vector<int32_t> kept;
      for (int32_t t = 0; t < tokenizer->n_vocab(); ++t)
        if (std::isfinite(logits[static_cast<size_t>(t)])) kept.push_back(t);
      ASSERT_FALSE(kept.empty());
      const int32_t t = kept[rng() % kept.size()];
      if (tokenizer->is_end_of_generation(t)) {
        ASSERT_TRUE(state.complete()) << "only the end is left after '" << text << "'";
        break;
      }
      ASSERT_TRUE(state.feed(tokenizer->token_bytes(t))) << text << " + " << tokenizer->token_bytes(t);
      text += tokenizer->token_bytes(t);
    }
    sentences += state.complete() ? 1 : 0;
  }
  EXPECT_GT(sentences, 10);
}

}  // namespace
}  // namespace nibble::worker
