#include "model/calibration.hpp"

#include <random>
#include <stdexcept>
#include <string>

namespace nibble::model {

std::vector<std::vector<int32_t>> calibration_windows(const Tokenizer& tokenizer, std::string_view text,
                                                      int64_t n, int64_t length, uint64_t seed) {
  return calibration_windows(tokenizer, tokenizer.encode(text, false), n, length, seed);
}

std::vector<std::vector<int32_t>> calibration_windows(const Tokenizer& tokenizer,
                                                      std::span<const int32_t> tokens, int64_t n,
                                                      int64_t length, uint64_t seed) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= tokenizer.n_vocab()) {
      throw std::invalid_argument("calibration token " + std::to_string(i) + " is " +
                                  std::to_string(tokens[i]) + ", outside the vocabulary of " +
                                  std::to_string(tokenizer.n_vocab()));
    }
  }
  if (n <= 0 || length <= 0) {
    throw std::invalid_argument("calibration needs a positive number of samples and sample length (got " +
                                std::to_string(n) + " x " + std::to_string(length) + ")");
  }
  const bool bos = tokenizer.add_bos_default();
  const int64_t body = bos ? length - 1 : length;
  const auto available = static_cast<int64_t>(tokens.size());
  if (available < body || (body == 0 && available == 0)) {
    throw std::invalid_argument("the calibration text has " + std::to_string(available) +
                                " tokens, fewer than one sample of " + std::to_string(length) +
                                " (use a longer text or a smaller --calib-len)");
  }
  std::mt19937_64 rng(seed);
  std::vector<std::vector<int32_t>> windows;
  for (int64_t i = 0; i < n; ++i) {
    const auto start = static_cast<int64_t>(rng() % static_cast<uint64_t>(available - body + 1));
    std::vector<int32_t> w;
    w.reserve(static_cast<size_t>(length));
    if (bos) w.push_back(tokenizer.bos_id());
    w.insert(w.end(), tokens.begin() + start, tokens.begin() + start + body);
    windows.push_back(std::move(w));
  }
  return windows;
}

}  // namespace nibble::model
