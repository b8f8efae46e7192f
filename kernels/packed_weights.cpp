// Repacking of weight matrices for the CPU matmul (layout in packed_weights.hpp). matmul_packed
// itself lives in matmul.cpp next to matmul(), whose activation handling it shares.
#include "kernels/packed_weights.hpp"

#include <cstdlib>
#include <cstring>

namespace nibble::kernels {

void PackedMatrix::FreeDeleter::operator()(uint8_t* p) const { std::free(p); }

bool can_pack_for_matmul(DType w_type) { return w_type == DType::Q4_0; }

PackedMatrix pack_for_matmul(DType w_type, const void* w, int64_t n_out, int64_t k) {
  PackedMatrix packed;
  if (!can_pack_for_matmul(w_type) || w == nullptr || n_out <= 0 || k <= 0 || k % kQK4_0 != 0) return packed;
  packed.type_ = w_type;
  packed.n_out_ = n_out;
  packed.k_ = k;
  const size_t size = packed.size_bytes();
  // 64-byte aligned so that panels start on cache lines when panel_bytes() allows it.
  packed.data_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, (size + 63) / 64 * 64)));
  if (!packed.data_) return PackedMatrix{};

  const auto* rows = static_cast<const BlockQ4_0*>(w);
  const int64_t n_blocks = k / kQK4_0;
  for (int64_t p = 0; p < packed.n_panels(); ++p) {
    uint8_t* out = packed.data_.get() + p * packed.panel_bytes();
    for (int64_t b = 0; b < n_blocks; ++b, out += kQ4_0PanelBlockBytes) {
      for (int64_t j = 0; j < kPanelRows; ++j) {
        const int64_t row = p * kPanelRows + j;
        f16_bits d = 0;
        uint8_t qs[kQK4_0 / 2] = {};  // padding rows: scale 0, nibbles 0
        if (row < n_out) {
          const BlockQ4_0& block = rows[row * n_blocks + b];
          d = block.d;
          std::memcpy(qs, block.qs, sizeof qs);
        }
        std::memcpy(out + 2 * j, &d, sizeof d);
        for (int c = 0; c < 4; ++c) std::memcpy(out + 16 + 32 * c + 4 * j, qs + 4 * c, 4);
      }
    }
  }
  return packed;
}

}  // namespace nibble::kernels
