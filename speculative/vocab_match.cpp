#include "speculative/vocab_match.hpp"

#include <cstdio>

namespace nibble::speculative {

namespace {

const char* kind_name(model::TokenizerKind kind) {
  switch (kind) {
    case model::TokenizerKind::sentencepiece:
      return "SentencePiece";
    case model::TokenizerKind::byte_bpe:
      return "byte-level BPE";
  }
  return "unknown";
}

// Token text for a message: quoted, with control bytes, quotes and backslashes escaped so that a
// newline or byte token cannot garble it. Bytes >= 0x80 stay (UTF-8 pieces such as "▁the").
std::string quoted(const std::string& text) {
  std::string out = "'";
  for (const char c : text) {
    const auto b = static_cast<unsigned char>(c);
    if (b < 0x20 || b == 0x7f || c == '\'' || c == '\\') {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", b);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "'";
}

std::string id_text(int32_t id) { return id < 0 ? std::string("none") : std::to_string(id); }

}  // namespace

void check_vocab_match(const model::Tokenizer& target, const model::Tokenizer& draft,
                       const std::string& draft_name, const std::string& needed_for) {
  auto fail = [&](const std::string& what) {
    throw VocabMismatch(draft_name + ": " + what + " (" + needed_for + " needs the target's vocabulary)");
  };
  if (draft.kind() != target.kind()) {
    fail(std::string("tokenizer is ") + kind_name(draft.kind()) + " but the target's is " +
         kind_name(target.kind()));
  }
  if (draft.n_vocab() != target.n_vocab()) {
    fail("vocabulary has " + std::to_string(draft.n_vocab()) + " tokens but the target's has " +
         std::to_string(target.n_vocab()));
  }
  if (draft.bos_id() != target.bos_id()) {
    fail("BOS id is " + id_text(draft.bos_id()) + " but the target's is " + id_text(target.bos_id()));
  }
  if (draft.eos_id() != target.eos_id()) {
    fail("EOS id is " + id_text(draft.eos_id()) + " but the target's is " + id_text(target.eos_id()));
  }
  for (int32_t id = 0; id < target.n_vocab(); ++id) {
    const std::string& d = draft.token_text(id);
    const std::string& t = target.token_text(id);
    if (d != t)
      fail("token " + std::to_string(id) + " is " + quoted(d) + " but the target's is " + quoted(t));
  }
}

}  // namespace nibble::speculative
