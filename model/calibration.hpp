#pragma once
// Calibration data for calibrated quantization (GPTQ, AWQ): token windows cut from a text.
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "model/tokenizer.hpp"

namespace nibble::model {

// n windows of `length` tokens from `text` tokenized with the model's tokenizer, reproducible from
// `seed` (a std::mt19937_64 draw per window, no distribution whose algorithm varies by library).
// Each window starts at a random offset of the token stream; when the tokenizer adds BOS by default
// the window is BOS followed by length - 1 text tokens, as the model sees text when serving.
// Windows may overlap when the text is short. Throws std::invalid_argument when n or length is
// not positive or the text has fewer tokens than a window needs.
std::vector<std::vector<int32_t>> calibration_windows(const Tokenizer& tokenizer, std::string_view text,
                                                      int64_t n, int64_t length, uint64_t seed);
// The same from a token stream that is already tokenized (a token file): BOS is added the same way.
// Throws std::invalid_argument as above, and for an id outside the tokenizer's vocabulary (naming
// its position in the stream).
std::vector<std::vector<int32_t>> calibration_windows(const Tokenizer& tokenizer,
                                                      std::span<const int32_t> tokens, int64_t n,
                                                      int64_t length, uint64_t seed);

}  // namespace nibble::model
