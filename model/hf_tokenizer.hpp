#pragma once
// A Tokenizer built from a Hugging Face tokenizer.json (and tokenizer_config.json / config.json for
// BOS, EOS and add_bos_token), mapped the way llama.cpp's convert_hf_to_gguf.py maps it:
//   - BPE with byte_fallback (Llama 2: "▁" for spaces, <0xNN> byte tokens) -> the SentencePiece-style
//     tokenizer, each token scored by minus the rank of the first merge that makes it;
//   - byte-level BPE (ByteLevel pre-tokenizer: GPT-2, Llama 3) -> the byte-level BPE tokenizer.
// Added tokens marked special become control tokens, the others user-defined ones.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "model/gguf.hpp"
#include "model/tokenizer.hpp"

namespace nibble::model {

// Reads `dir`/tokenizer.json. Null when the directory has none; HfCheckpointError naming the file
// and what is wrong or unsupported otherwise. n_vocab > 0: the model's vocabulary size; ids past
// the tokenizer's become unused "[PADn]" tokens, as convert_hf_to_gguf.py pads them.
std::shared_ptr<const Tokenizer> load_hf_tokenizer(const std::string& dir, int64_t n_vocab = -1);

// The same tokenizer as GGUF tokenizer.ggml.* metadata (model "llama" or "gpt2", tokens, scores,
// token types, merges and pre-tokenizer for "gpt2", BOS/EOS/UNK ids, add_bos_token,
// add_space_prefix), so that Tokenizer::from_gguf on a file holding it encodes as load_hf_tokenizer
// does. Empty when the directory has no tokenizer.json; throws like load_hf_tokenizer.
std::vector<std::pair<std::string, GgufValue>> hf_tokenizer_gguf_metadata(const std::string& dir,
                                                                          int64_t n_vocab = -1);

// `dir`/tokenizer_config.json's chat_template: the string, or of a list of named templates the one
// named "default" (as transformers picks it); nullopt when there is none. HfCheckpointError for a file
// that is not JSON.
std::optional<std::string> hf_chat_template(const std::string& dir);

}  // namespace nibble::model
