// Repacking of weight matrices for the CPU matmul (layout in packed_weights.hpp). matmul_packed
// itself lives in matmul.cpp next to matmul(), whose activation handling it shares.
#include "kernels/packed_weights.hpp"

#include <cstdlib>
#include <cstring>

#include "kernels/quant_internal.hpp"

namespace nibble::kernels {

void PackedMatrix::FreeDeleter::operator()(uint8_t* p) const { std::free(p); }

namespace {

void pack_q4_0_panel(const BlockQ4_0* rows, int64_t n_out, int64_t n_blocks, int64_t p, uint8_t* out) {
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

void pack_q8_0_panel(const BlockQ8_0* rows, int64_t n_out, int64_t n_blocks, int64_t p, uint8_t* out) {
  for (int64_t b = 0; b < n_blocks; ++b, out += kQ8_0PanelBlockBytes) {
    for (int64_t j = 0; j < kPanelRows; ++j) {
      const int64_t row = p * kPanelRows + j;
      BlockQ8_0 block{};  // padding rows: scale 0, quants 0
      if (row < n_out) block = rows[row * n_blocks + b];
      std::memcpy(out + 2 * j, &block.d, sizeof block.d);
      for (int c = 0; c < 8; ++c) std::memcpy(out + 16 + 32 * c + 4 * j, block.qs + 4 * c, 4);
    }
  }
}

void pack_q4_k_panel(const BlockQ4_K* rows, int64_t n_out, int64_t n_blocks, int64_t p, uint8_t* out) {
  for (int64_t b = 0; b < n_blocks; ++b, out += kQ4_KPanelBlockBytes) {
    for (int64_t j = 0; j < kPanelRows; ++j) {
      const int64_t row = p * kPanelRows + j;
      BlockQ4_K block{};  // padding rows: every scale, min and nibble 0
      if (row < n_out) block = rows[row * n_blocks + b];
      std::memcpy(out + 2 * j, &block.d, sizeof block.d);
      std::memcpy(out + 16 + 2 * j, &block.dmin, sizeof block.dmin);
      for (int sub = 0; sub < 8; ++sub)
        detail::q4_k_scale_min(sub, block.scales, out + 32 + 8 * sub + j, out + 96 + 8 * sub + j);
      for (int chunk = 0; chunk < 32; ++chunk)
        std::memcpy(out + 160 + 32 * chunk + 4 * j, block.qs + 4 * chunk, 4);
    }
  }
}

void pack_q6_k_panel(const BlockQ6_K* rows, int64_t n_out, int64_t n_blocks, int64_t p, uint8_t* out) {
  for (int64_t b = 0; b < n_blocks; ++b, out += kQ6_KPanelBlockBytes) {
    for (int64_t j = 0; j < kPanelRows; ++j) {
      const int64_t row = p * kPanelRows + j;
      BlockQ6_K block{};  // padding rows: d 0, every scale and quant 0
      if (row < n_out) block = rows[row * n_blocks + b];
      std::memcpy(out + 2 * j, &block.d, sizeof block.d);
      for (int group = 0; group < 16; ++group) std::memcpy(out + 16 + 8 * group + j, &block.scales[group], 1);
      for (int chunk = 0; chunk < 32; ++chunk)
        std::memcpy(out + 144 + 32 * chunk + 4 * j, block.ql + 4 * chunk, 4);
      for (int chunk = 0; chunk < 16; ++chunk)
        std::memcpy(out + 1168 + 32 * chunk + 4 * j, block.qh + 4 * chunk, 4);
    }
  }
}

}  // namespace

bool can_pack_for_matmul(DType w_type) {
  return w_type == DType::Q4_0 || w_type == DType::Q8_0 || w_type == DType::Q4_K || w_type == DType::Q6_K;
}

PackedMatrix pack_for_matmul(DType w_type, const void* w, int64_t n_out, int64_t k) {
  PackedMatrix packed;
  if (!can_pack_for_matmul(w_type) || w == nullptr || n_out <= 0 || k <= 0) return packed;
  if (k % type_info(w_type).block_elems != 0) return packed;
  packed.type_ = w_type;
  packed.n_out_ = n_out;
  packed.k_ = k;
  const size_t size = packed.size_bytes();
  // 64-byte aligned so that panels start on cache lines when panel_bytes() allows it.
  packed.data_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, (size + 63) / 64 * 64)));
  if (!packed.data_) return PackedMatrix{};

  const int64_t n_blocks = k / type_info(w_type).block_elems;
  for (int64_t p = 0; p < packed.n_panels(); ++p) {
    uint8_t* out = packed.data_.get() + p * packed.panel_bytes();
    if (w_type == DType::Q4_0) {
      pack_q4_0_panel(static_cast<const BlockQ4_0*>(w), n_out, n_blocks, p, out);
    } else if (w_type == DType::Q8_0) {
      pack_q8_0_panel(static_cast<const BlockQ8_0*>(w), n_out, n_blocks, p, out);
    } else if (w_type == DType::Q4_K) {
      pack_q4_k_panel(static_cast<const BlockQ4_K*>(w), n_out, n_blocks, p, out);
    } else {
      pack_q6_k_panel(static_cast<const BlockQ6_K*>(w), n_out, n_blocks, p, out);
    }
  }
  return packed;
}

}  // namespace nibble::kernels
