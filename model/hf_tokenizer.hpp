#pragma once
// A Tokenizer built from a Hugging Face tokenizer.json (and tokenizer_config.json / config.json for
// BOS, EOS and add_bos_token), mapped the way llama.cpp's convert_hf_to_gguf.py maps it:
//   - BPE with byte_fallback (Llama 2: "▁" for spaces, <0xNN> byte tokens) -> the SentencePiece-style
//     tokenizer, each token scored by minus the rank of the first merge that makes it;
//   - byte-level BPE (ByteLevel pre-tokenizer: GPT-2, Llama 3) -> the byte-level BPE tokenizer.
// Added tokens marked special become control tokens, the others user-defined ones.
#include <cstdint>
#include <memory>
#include <string>

#include "model/tokenizer.hpp"

namespace nibble::model {

// Reads `dir`/tokenizer.json. Null when the directory has none; HfCheckpointError naming the file
// and what is wrong or unsupported otherwise. n_vocab > 0: the model's vocabulary size; ids past
// the tokenizer's become unused "[PADn]" tokens, as convert_hf_to_gguf.py pads them.
std::shared_ptr<const Tokenizer> load_hf_tokenizer(const std::string& dir, int64_t n_vocab = -1);

}  // namespace nibble::model
