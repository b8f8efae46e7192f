// Repacking of weight matrices for the CPU matmul (layout in packed_weights.hpp). matmul_packed
// itself lives in matmul.cpp next to matmul(), whose activation handling it shares.
#include "kernels/packed_weights.hpp"

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "kernels/quant_internal.hpp"

namespace nibble::kernels {

void PackedMatrix::FreeDeleter::operator()(uint8_t* p) const { std::free(p); }

namespace {

static_assert(offsetof(BlockQ5_K, d) == offsetof(BlockQ4_K, d) &&
              offsetof(BlockQ5_K, dmin) == offsetof(BlockQ4_K, dmin) &&
              offsetof(BlockQ5_K, scales) == offsetof(BlockQ4_K, scales));
static_assert(kQ5_KPanelBlockBytes == kQ4_KPanelBlockBytes + kPanelRows * (kQK_K / 8));

// Copies between one row's block in the file's layout and that row's lane of a packed group (the
// layouts in packed_weights.hpp), in either direction, so that packing and reading back share one
// description of where each byte goes.
template <bool kToGroup>
struct LaneCopy {
  uint8_t* block;
  uint8_t* group;
  void operator()(size_t block_offset, size_t group_offset, size_t bytes) const {
    if constexpr (kToGroup) {
      std::memcpy(group + group_offset, block + block_offset, bytes);
    } else {
      std::memcpy(block + block_offset, group + group_offset, bytes);
    }
  }
};

// A Q5_0 / Q5_1 block's fifth bits (bit e: element e) in the packed order: byte c holds those of
// elements 4c..4c+3 in bits 0-3 and of elements 16+4c..16+4c+3 in bits 4-7.
uint32_t fifth_bits_by_chunk(uint32_t bits) {
  uint32_t out = 0;
  for (uint32_t c = 0; c < 4; ++c) {
    out |= ((bits >> (4 * c)) & 0xFu) << (8 * c);
    out |= ((bits >> (16 + 4 * c)) & 0xFu) << (8 * c + 4);
  }
  return out;
}

uint32_t fifth_bits_by_element(uint32_t by_chunk) {
  uint32_t out = 0;
  for (uint32_t c = 0; c < 4; ++c) {
    out |= ((by_chunk >> (8 * c)) & 0xFu) << (4 * c);
    out |= ((by_chunk >> (8 * c + 4)) & 0xFu) << (16 + 4 * c);
  }
  return out;
}

// Q4_1, Q5_0 and Q5_1: Q4_0's chunks after the scales (and minimums), then the fifth bits.
template <typename Block, bool kToGroup>
void copy_q4_1_or_q5_lane(const LaneCopy<kToGroup>& copy, size_t j) {
  constexpr bool kHasMin = !std::is_same_v<Block, BlockQ5_0>;
  constexpr size_t kChunks = kHasMin ? 32 : 16;
  copy(offsetof(Block, d), 2 * j, 2);
  if constexpr (kHasMin) copy(offsetof(Block, m), 16 + 2 * j, 2);
  for (size_t c = 0; c < 4; ++c) copy(offsetof(Block, qs) + 4 * c, kChunks + 32 * c + 4 * j, 4);
  if constexpr (!std::is_same_v<Block, BlockQ4_1>) {
    uint8_t* block_bits = copy.block + offsetof(Block, qh);
    uint8_t* group_bits = copy.group + kChunks + 128 + 4 * j;
    uint32_t bits;
    std::memcpy(&bits, kToGroup ? block_bits : group_bits, 4);  // little-endian, as GGUF stores qh
    bits = kToGroup ? fifth_bits_by_chunk(bits) : fifth_bits_by_element(bits);
    std::memcpy(kToGroup ? group_bits : block_bits, &bits, 4);
  }
}

// Row `lane`'s share of one packed group.
template <bool kToGroup>
void copy_lane(DType type, const LaneCopy<kToGroup>& copy, int lane) {
  const size_t j = static_cast<size_t>(lane);
  switch (type) {
    case DType::Q4_0:
    case DType::IQ4_NL:  // the same block layout
      static_assert(sizeof(BlockIQ4_NL) == sizeof(BlockQ4_0) &&
                    offsetof(BlockIQ4_NL, qs) == offsetof(BlockQ4_0, qs));
      copy(offsetof(BlockQ4_0, d), 2 * j, 2);
      for (size_t c = 0; c < 4; ++c) copy(offsetof(BlockQ4_0, qs) + 4 * c, 16 + 32 * c + 4 * j, 4);
      break;
    case DType::Q4_1:
      copy_q4_1_or_q5_lane<BlockQ4_1>(copy, j);
      break;
    case DType::Q5_0:
      copy_q4_1_or_q5_lane<BlockQ5_0>(copy, j);
      break;
    case DType::Q5_1:
      copy_q4_1_or_q5_lane<BlockQ5_1>(copy, j);
      break;
    case DType::Q8_0:
      copy(offsetof(BlockQ8_0, d), 2 * j, 2);
      for (size_t c = 0; c < 8; ++c) copy(offsetof(BlockQ8_0, qs) + 4 * c, 16 + 32 * c + 4 * j, 4);
      break;
    case DType::Q2_K:
      copy(offsetof(BlockQ2_K, d), 2 * j, 2);
      copy(offsetof(BlockQ2_K, dmin), 16 + 2 * j, 2);
      for (size_t g = 0; g < 16; ++g) copy(offsetof(BlockQ2_K, scales) + g, 32 + 8 * g + j, 1);
      for (size_t chunk = 0; chunk < 16; ++chunk)
        copy(offsetof(BlockQ2_K, qs) + 4 * chunk, 160 + 32 * chunk + 4 * j, 4);
      break;
    case DType::Q3_K: {
      copy(offsetof(BlockQ3_K, d), 2 * j, 2);
      for (size_t chunk = 0; chunk < 16; ++chunk)
        copy(offsetof(BlockQ3_K, qs) + 4 * chunk, 144 + 32 * chunk + 4 * j, 4);
      for (size_t chunk = 0; chunk < 8; ++chunk)
        copy(offsetof(BlockQ3_K, hmask) + 4 * chunk, 656 + 32 * chunk + 4 * j, 4);
      // The 6-bit scales, minus 32, one signed byte each in the group.
      auto* block = reinterpret_cast<BlockQ3_K*>(copy.block);
      if constexpr (!kToGroup) std::memset(block->scales, 0, sizeof block->scales);
      for (int g = 0; g < 16; ++g) {
        auto* group_scale = reinterpret_cast<int8_t*>(copy.group + 16 + 8 * g + j);
        if constexpr (kToGroup) {
          *group_scale = static_cast<int8_t>(q3_k_scale(*block, g));
        } else {
          const int stored = *group_scale + 32;
          block->scales[g % 8] =
              static_cast<uint8_t>(block->scales[g % 8] | ((stored & 0xF) << (4 * (g / 8))));
          block->scales[8 + g % 4] =
              static_cast<uint8_t>(block->scales[8 + g % 4] | ((stored >> 4) << (2 * (g / 4))));
        }
      }
      break;
    }
    case DType::Q4_K:
    case DType::Q5_K: {
      // Q5_K is Q4_K's group with the qh bytes after it (offsetof is the same for d, dmin and scales).
      const bool q5 = type == DType::Q5_K;
      const size_t qs = q5 ? offsetof(BlockQ5_K, qs) : offsetof(BlockQ4_K, qs);
      copy(offsetof(BlockQ4_K, d), 2 * j, 2);
      copy(offsetof(BlockQ4_K, dmin), 16 + 2 * j, 2);
      for (size_t chunk = 0; chunk < 32; ++chunk) copy(qs + 4 * chunk, 160 + 32 * chunk + 4 * j, 4);
      if (q5) {
        for (size_t chunk = 0; chunk < 8; ++chunk)
          copy(offsetof(BlockQ5_K, qh) + 4 * chunk, kQ4_KPanelBlockBytes + 32 * chunk + 4 * j, 4);
      }
      // The 6-bit scales and mins, one byte each in the group.
      uint8_t* scales = copy.block + offsetof(BlockQ4_K, scales);
      uint8_t scale[8], min[8];
      for (size_t sub = 0; sub < 8; ++sub) {
        uint8_t* group_scale = copy.group + 32 + 8 * sub + j;
        uint8_t* group_min = copy.group + 96 + 8 * sub + j;
        if constexpr (kToGroup) {
          detail::q4_k_scale_min(static_cast<int>(sub), scales, group_scale, group_min);
        } else {
          scale[sub] = *group_scale;
          min[sub] = *group_min;
        }
      }
      if constexpr (!kToGroup) detail::q4_k_pack_scale_min(scale, min, scales);
      break;
    }
    case DType::Q6_K:
      copy(offsetof(BlockQ6_K, d), 2 * j, 2);
      for (size_t g = 0; g < 16; ++g) copy(offsetof(BlockQ6_K, scales) + g, 16 + 8 * g + j, 1);
      for (size_t chunk = 0; chunk < 32; ++chunk)
        copy(offsetof(BlockQ6_K, ql) + 4 * chunk, 144 + 32 * chunk + 4 * j, 4);
      for (size_t chunk = 0; chunk < 16; ++chunk)
        copy(offsetof(BlockQ6_K, qh) + 4 * chunk, 1168 + 32 * chunk + 4 * j, 4);
      break;
    case DType::IQ4_XS: {
      copy(offsetof(BlockIQ4_XS, d), 2 * j, 2);
      for (size_t chunk = 0; chunk < 32; ++chunk)
        copy(offsetof(BlockIQ4_XS, qs) + 4 * chunk, 80 + 32 * chunk + 4 * j, 4);
      // The 6-bit scales, minus 32, one signed byte each in the group.
      auto* block = reinterpret_cast<BlockIQ4_XS*>(copy.block);
      if constexpr (!kToGroup) {
        block->scales_h = 0;
        std::memset(block->scales_l, 0, sizeof block->scales_l);
      }
      for (int sub = 0; sub < 8; ++sub) {
        auto* group_scale = reinterpret_cast<int8_t*>(copy.group + 16 + 8 * sub + j);
        if constexpr (kToGroup) {
          *group_scale = static_cast<int8_t>(iq4_xs_scale(*block, sub));
        } else {
          const int stored = *group_scale + 32;
          block->scales_l[sub / 2] =
              static_cast<uint8_t>(block->scales_l[sub / 2] | ((stored & 0xF) << (4 * (sub % 2))));
          block->scales_h = static_cast<uint16_t>(block->scales_h | ((stored >> 4) << (2 * sub)));
        }
      }
      break;
    }
    default:
      break;
  }
}

}  // namespace

bool can_pack_for_matmul(DType w_type) { return packed_group_bytes(w_type) != 0; }

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

  const TypeInfo& info = type_info(w_type);
  const int64_t n_blocks = k / info.block_elems;
  const int64_t group_bytes = packed_group_bytes(w_type);
  const auto* rows = static_cast<const uint8_t*>(w);
  uint8_t padding[kMaxBlockBytes] = {};  // rows past n_out: every scale and quant 0
  for (int64_t p = 0; p < packed.n_panels(); ++p) {
    for (int64_t b = 0; b < n_blocks; ++b) {
      uint8_t* group = packed.data_.get() + p * packed.panel_bytes() + b * group_bytes;
      for (int lane = 0; lane < kPanelRows; ++lane) {
        const int64_t row = p * kPanelRows + lane;
        const uint8_t* block = row < n_out ? rows + (row * n_blocks + b) * info.block_bytes : padding;
        copy_lane(w_type, LaneCopy<true>{const_cast<uint8_t*>(block), group}, lane);
      }
    }
  }
  return packed;
}

void unpack_panel_lane(DType type, const uint8_t* group, int lane, void* block) {
  copy_lane(type, LaneCopy<false>{static_cast<uint8_t*>(block), const_cast<uint8_t*>(group)}, lane);
}

}  // namespace nibble::kernels
