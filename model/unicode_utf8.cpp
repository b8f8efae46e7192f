#include "model/unicode_utf8.hpp"

#include <array>

namespace nibble::model::utf8 {

size_t sequence_length(unsigned char lead) {
  static constexpr std::array<uint8_t, 16> kByHighNibble = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kByHighNibble[lead >> 4];
}

namespace {

bool is_continuation(unsigned char c) { return (c & 0xC0) == 0x80; }

// Decodes one code point at `offset`, advancing it; false when the bytes there do not form a
// structurally complete sequence (llama.cpp's unicode_cpt_from_utf8, which accepts overlong forms
// and surrogates).
bool decode_one(std::string_view text, size_t& offset, uint32_t& cpt) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[offset + i]); };
  const unsigned char b0 = byte(0);
  size_t length = 0;
  if ((b0 & 0x80) == 0) {
    cpt = b0;
    offset += 1;
    return true;
  }
  if ((b0 & 0x40) == 0) return false;  // a continuation byte cannot start a character
  if ((b0 & 0x20) == 0) {
    length = 2;
    cpt = b0 & 0x1F;
  } else if ((b0 & 0x10) == 0) {
    length = 3;
    cpt = b0 & 0x0F;
  } else if ((b0 & 0x08) == 0) {
    length = 4;
    cpt = b0 & 0x07;
  } else {
    return false;
  }
  if (offset + length > text.size()) return false;
  for (size_t i = 1; i < length; ++i) {
    if (!is_continuation(byte(i))) return false;
    cpt = (cpt << 6) | (byte(i) & 0x3F);
  }
  offset += length;
  return true;
}

struct ByteLevelTables {
  std::array<std::string, 256> to_unicode;
  std::array<int16_t, 512> from_unicode;  // GPT-2's mapping only uses code points below 324

  ByteLevelTables() {
    from_unicode.fill(-1);
    // Printable Latin-1 bytes stand for themselves; the others are shifted to 256, 257, ...
    const auto printable = [](int b) {
      return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    };
    int next_shifted = 256;
    for (int b = 0; b < 256; ++b) {
      const uint32_t cpt = printable(b) ? static_cast<uint32_t>(b) : static_cast<uint32_t>(next_shifted++);
      append(to_unicode[b], cpt);
      from_unicode[cpt] = static_cast<int16_t>(b);
    }
  }
};

const ByteLevelTables& byte_level_tables() {
  static const ByteLevelTables tables;
  return tables;
}

}  // namespace

std::vector<uint32_t> decode_lenient(std::string_view text) {
  std::vector<uint32_t> cpts;
  cpts.reserve(text.size());
  size_t offset = 0;
  while (offset < text.size()) {
    uint32_t cpt = 0;
    if (decode_one(text, offset, cpt)) {
      cpts.push_back(cpt);
    } else {
      cpts.push_back(kReplacementChar);
      offset += 1;
    }
  }
  return cpts;
}

std::string replace_invalid(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (uint32_t cpt : decode_lenient(text)) append(out, cpt);
  return out;
}

void append(std::string& out, uint32_t cpt) {
  if (cpt <= 0x7F) {
    out.push_back(static_cast<char>(cpt));
  } else if (cpt <= 0x7FF) {
    out.push_back(static_cast<char>(0xC0 | (cpt >> 6)));
    out.push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  } else if (cpt <= 0xFFFF) {
    out.push_back(static_cast<char>(0xE0 | (cpt >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cpt >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  } else if (cpt <= 0x10FFFF) {
    out.push_back(static_cast<char>(0xF0 | (cpt >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cpt >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cpt >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  } else {
    append(out, kReplacementChar);
  }
}

size_t complete_prefix_length(std::string_view bytes) {
  const size_t n = bytes.size();
  // Only the last 4 bytes can belong to an unfinished character: find the last non-continuation
  // byte among them and check whether its sequence is cut short.
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const auto c = static_cast<unsigned char>(bytes[n - back]);
    if (is_continuation(c)) continue;
    size_t needed = 1;
    if (c >= 0xC0 && c < 0xE0) {
      needed = 2;
    } else if (c >= 0xE0 && c < 0xF0) {
      needed = 3;
    } else if (c >= 0xF0 && c < 0xF8) {
      needed = 4;
    }
    return needed > back ? n - back : n;
  }
  return n;
}

const std::string& byte_to_unicode(uint8_t byte) { return byte_level_tables().to_unicode[byte]; }

int unicode_to_byte(uint32_t cpt) {
  const auto& table = byte_level_tables().from_unicode;
  return cpt < table.size() ? table[cpt] : -1;
}

}  // namespace nibble::model::utf8
