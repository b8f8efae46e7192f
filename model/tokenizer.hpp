#pragma once
// Tokenizers built from a GGUF vocabulary: SentencePiece-style (tokenizer.ggml.model = "llama",
// score-driven merges with byte fallback) and byte-level BPE ("gpt2", ranked merges with GPT-2's
// pre-tokenizer regex). Behaviour matches llama.cpp's, checked against its test vectors.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "model/gguf.hpp"

namespace nibble::model {

enum class TokenizerKind { sentencepiece, byte_bpe };

class Tokenizer {
 public:
  // Reads tokenizer.ggml.* keys (model, tokens, scores, token_type, merges, bos/eos/unk/pad ids,
  // add_bos_token, add_space_prefix). Throws GgufError when they are missing or inconsistent.
  static std::shared_ptr<const Tokenizer> from_gguf(const GgufFile& file);
  // The same from GGUF metadata held in memory (e.g. the synthetic vocabulary of a dummy model);
  // `source` names it in errors.
  static std::shared_ptr<const Tokenizer> from_metadata(const std::map<std::string, GgufValue>& metadata,
                                                        const std::string& source);
  virtual ~Tokenizer() = default;

  virtual TokenizerKind kind() const = 0;
  // Token ids of `text`; BOS first when add_bos (the caller decides, normally add_bos_default()).
  // parse_special: the texts of control tokens in `text` ("</s>", "<|eot_id|>", "<|im_start|>", ...)
  // become those tokens, as llama.cpp's tokenize with parse_special (chat-formatted prompts write them
  // so); otherwise they are ordinary text (only user-defined tokens are cut out either way).
  std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special = false) const {
    return encode_text(text, add_bos, parse_special);
  }
  // The bytes one token stands for (byte-fallback tokens give their single byte; control tokens
  // such as BOS/EOS give ""). May be an incomplete UTF-8 sequence.
  virtual std::string token_bytes(int32_t id) const = 0;
  // Text of a whole sequence (drops BOS/EOS, removes SentencePiece's leading space after BOS).
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;

  virtual int32_t n_vocab() const = 0;
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  virtual bool add_bos_default() const = 0;
  // True for EOS and other end-of-generation tokens (e.g. <|eot_id|>).
  virtual bool is_end_of_generation(int32_t id) const = 0;
  // Token text as stored in the vocabulary (for vocab comparison and debugging).
  virtual const std::string& token_text(int32_t id) const = 0;
  // True when encode() puts a space before the text (SentencePiece's add_space_prefix), so the
  // first decoded piece starts with one space that decode() and StreamingDecoder remove.
  virtual bool add_space_prefix() const { return false; }

 protected:
  virtual std::vector<int32_t> encode_text(std::string_view text, bool add_bos, bool parse_special) const = 0;
};

// Turns a stream of token ids into text without ever emitting a partial UTF-8 character: bytes of
// an incomplete character are held back until the rest arrives, and bytes that can never form a
// character are emitted as U+FFFD, so the text is always valid UTF-8.
class StreamingDecoder {
 public:
  // first_token_after_bos: strip SentencePiece's leading space from the first piece, as decode() does.
  explicit StreamingDecoder(const Tokenizer& tokenizer, bool strip_leading_space = true);
  // Text that became complete with this token (possibly empty).
  std::string push(int32_t id);
  // Whatever is still held back (a truncated character at the very end), as U+FFFD.
  std::string flush();

 private:
  const Tokenizer& tokenizer_;
  bool strip_leading_space_;
  bool at_start_ = true;
  std::string pending_;
};

}  // namespace nibble::model
