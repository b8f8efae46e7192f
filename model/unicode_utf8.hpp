#pragma once
// UTF-8 helpers shared by the tokenizers and the streaming decoder (internal to nibble_model).
// Decoding follows llama.cpp's lenient rules so that tokenization of odd input matches it: each
// byte that does not start a structurally complete sequence becomes U+FFFD.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace nibble::model::utf8 {

inline constexpr uint32_t kReplacementChar = 0xFFFD;

// Length of the sequence a byte starts, judged by its high bits alone (llama.cpp's
// unicode_len_utf8): 1 for ASCII and for stray continuation bytes, else 2, 3 or 4.
size_t sequence_length(unsigned char lead);

// Code points of `text`; a byte that does not begin a complete sequence gives one U+FFFD.
std::vector<uint32_t> decode_lenient(std::string_view text);

// `text` with every byte that does not begin a complete sequence replaced by U+FFFD (as
// decode_lenient reads it): always valid UTF-8, what clients and JSON encoders expect.
std::string replace_invalid(std::string_view text);

// Appends the UTF-8 form of `cpt` (surrogates are encoded like any other value; values above
// U+10FFFF become U+FFFD).
void append(std::string& out, uint32_t cpt);

// Length of the longest prefix of `bytes` that does not end inside an incomplete multi-byte
// character. Invalid bytes count as complete (they can never be completed, so holding them back
// would stall a stream forever).
size_t complete_prefix_length(std::string_view bytes);

// GPT-2's byte-level encoding: every byte maps to one printable code point ("Ġ" for ' ', ...).
const std::string& byte_to_unicode(uint8_t byte);
// Inverse of byte_to_unicode: the byte a code point stands for, or -1 when it stands for none.
int unicode_to_byte(uint32_t cpt);

}  // namespace nibble::model::utf8
