#pragma once
// Speculative decoding feeds the draft's token ids to the target and back, so both models must
// give every id the same meaning: same tokenizer kind, vocabulary size, BOS/EOS ids and token
// texts. check_vocab_match refuses a pair that differs, naming the first difference.
#include <stdexcept>
#include <string>

#include "model/tokenizer.hpp"

namespace nibble::speculative {

// A draft whose vocabulary is not the target's. An invalid_argument, so callers that validate
// configuration can catch both alike.
class VocabMismatch : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Throws VocabMismatch naming draft_name and the first difference, checked in this order:
// tokenizer kind, vocabulary size, BOS id, EOS id, then token texts by increasing id, e.g.
// "draft.gguf: token 1234 is 'foo' but the target's is 'bar'". Control bytes in token texts are
// written as \xNN.
// `needed_for` names what needs the match in the message.
void check_vocab_match(const model::Tokenizer& target, const model::Tokenizer& draft,
                       const std::string& draft_name, const std::string& needed_for = "speculative decoding");

}  // namespace nibble::speculative
