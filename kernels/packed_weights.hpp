#pragma once
// Weight matrices repacked once at load into a layout the CPU matmul reads faster. The weights stay
// quantized (about the same bytes per block); only their order changes. Q4_0, Q8_0, Q2_K ... Q6_K (the
// K-quant mixes: Q4_K_M uses Q4_K and Q6_K, Q4_K_S Q4_K and Q5_K, Q5_K_M Q5_K and Q6_K, Q3_K_M Q3_K to
// Q6_K, Q2_K Q2_K to Q4_K and Q6_K) are packed, and IQ4_NL, IQ4_XS, Q4_1, Q5_0 and Q5_1.
//
// Every layout groups output rows in panels of 8 (the last panel padded with zero rows) and stores a
// panel's blocks one after the other, all 8 rows of a block together, so that a 256-bit load gives
// each of the 8 rows its own 32-bit lane: the kernel's products land one output per lane, with no
// horizontal sums (llama.cpp's 8x8 repacking of Q4_0 / Q4_K for AVX follows the same idea).
//
// Q4_0: panel p holds rows 8p..8p+7 as k/32 consecutive 144-byte groups, one per 32-element block:
//   bytes [0, 16):   the 8 rows' fp16 block scales, row 0 first
//   bytes [16, 144): 4 chunks of 32 bytes; chunk c is qs[4c..4c+3] of row 0, of row 1, ... of row 7
// where qs are the rows' Q4_0 nibble bytes (byte t holds element t in its low nibble and t+16 in
// its high one).
//
// IQ4_NL: Q4_0's layout (its blocks are Q4_0's, the nibbles indexing llama.cpp's table).
//
// Q4_1: as Q4_0, in 160-byte groups: the 8 fp16 scales d, the 8 fp16 minimums m, then Q4_0's 4 chunks
// of nibble bytes (bytes [32, 160)).
//
// Q5_0: Q4_0's 144 bytes followed by the fifth bits, bytes [144, 176): row j's 32 bits in bytes
// 4j..4j+3, reordered for the chunks: byte c holds the fifth bits of elements 4c..4c+3 (the low
// nibbles of chunk c) in its low 4 bits and of elements 16+4c..16+4c+3 (the high nibbles) in its high
// 4 bits.
//
// Q5_1: Q4_1's 160 bytes followed by the fifth bits as in Q5_0, bytes [160, 192).
//
// Q8_0: as Q4_0, in 272-byte groups: the 8 fp16 scales, then 8 chunks of 32 bytes; chunk c is
// qs[4c..4c+3] of row 0, of row 1, ... of row 7 (the rows' signed 8-bit quants in element order).
//
// Q2_K: panel p holds rows 8p..8p+7 as k/256 consecutive 672-byte groups (the file's 84 bytes a row and
// super-block), one per super-block:
//   bytes [0, 16):    the 8 rows' fp16 d
//   bytes [16, 32):   the 8 rows' fp16 dmin
//   bytes [32, 160):  the scale bytes (scale | min << 4) of the 16-element groups, [group 0..15][row 0..7]
//   bytes [160, 672): 16 chunks of 32 bytes; chunk n is qs[4n..4n+3] of row 0, ... of row 7
// where qs are the rows' 2-bit level bytes (qs[32h + l] holds element 128h + 32j + l in bits 2j, 2j + 1).
//
// Q3_K: panel p holds rows 8p..8p+7 as k/256 consecutive 912-byte groups, one per super-block:
//   bytes [0, 16):    the 8 rows' fp16 d
//   bytes [16, 144):  the 6-bit group scales (-32..31) as int8, [group 0..15][row 0..7]
//   bytes [144, 656): 16 chunks of 32 bytes; chunk n is qs[4n..4n+3] of row 0, ... of row 7 (as Q2_K's)
//   bytes [656, 912): 8 chunks of 32 bytes; chunk c is hmask[4c..4c+3] of row 0, ... of row 7
// where hmask holds each level's third bit (bit r of hmask[l]: element 32r + l). 114 bytes a row and
// super-block against the file's 110: the scales as bytes.
//
// Q4_K: panel p holds rows 8p..8p+7 as k/256 consecutive 1184-byte groups, one per super-block:
//   bytes [0, 16):     the 8 rows' fp16 d, row 0 first
//   bytes [16, 32):    the 8 rows' fp16 dmin
//   bytes [32, 96):    the 6-bit sub-block scales as bytes, [sub-block 0..7][row 0..7]
//   bytes [96, 160):   the 6-bit sub-block mins as bytes, [sub-block][row]
//   bytes [160, 1184): 32 chunks of 32 bytes; chunk 8r + c is qs[32r + 4c .. 32r + 4c + 3] of row 0,
//                      of row 1, ... of row 7
// where qs are the rows' Q4_K nibble bytes (the 32 bytes of run r hold sub-block 2r in their low
// nibbles and sub-block 2r + 1 in their high ones). 148 bytes a row and super-block against the
// file's 144: the scales are unpacked from 12 bytes to 16 so that the kernel needs no bit fiddling.
//
// Q5_K: Q4_K's 1184 bytes (the low 4 bits of each value in the nibble chunks) followed by
//   bytes [1184, 1440): 8 chunks of 32 bytes; chunk c is qh[4c..4c+3] of row 0, ... of row 7
// where qh are the rows' Q5_K fifth bits (bit s of qh[l]: element l of sub-block s). 180 bytes a row
// and super-block against the file's 176.
//
// Q6_K: panel p holds rows 8p..8p+7 as k/256 consecutive 1680-byte groups (the file's 210 bytes a
// row and super-block), one per super-block:
//   bytes [0, 16):      the 8 rows' fp16 d
//   bytes [16, 144):    the signed 8-bit scales of the 16-element groups, [group 0..15][row 0..7]
//   bytes [144, 1168):  32 chunks of 32 bytes; chunk n is ql[4n..4n+3] of row 0, ... of row 7
//   bytes [1168, 1680): 16 chunks of 32 bytes; chunk n is qh[4n..4n+3] of row 0, ... of row 7
// where ql and qh are the rows' Q6_K low-nibble and high-2-bit bytes.
//
// IQ4_XS: panel p holds rows 8p..8p+7 as k/256 consecutive 1104-byte groups, one per super-block:
//   bytes [0, 16):     the 8 rows' fp16 d
//   bytes [16, 80):    the sub-block scales (-32..31) as int8, [sub-block 0..7][row 0..7]
//   bytes [80, 1104):  32 chunks of 32 bytes; chunk n is qs[4n..4n+3] of row 0, ... of row 7
// where qs are the rows' index bytes (sub-block s: qs[16s + j] holds element j in its low nibble and
// j + 16 in its high one). 138 bytes a row and super-block against the file's 136.
#include <cstddef>
#include <cstdint>
#include <memory>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"
#include "kernels/thread_pool.hpp"

namespace nibble::kernels {

inline constexpr int64_t kPanelRows = 8;
inline constexpr int64_t kQ4_0PanelBlockBytes = 144;  // 8 scales + 8 rows × 16 nibble bytes
inline constexpr int64_t kQ8_0PanelBlockBytes = 272;  // 8 scales + 8 rows × 32 quant bytes
inline constexpr int64_t kQ4_1PanelBlockBytes = 160;  // Q4_0's + 8 minimums
inline constexpr int64_t kQ5_0PanelBlockBytes = 176;  // Q4_0's + 8 rows × 4 fifth-bit bytes
inline constexpr int64_t kQ5_1PanelBlockBytes = 192;  // Q4_1's + 8 rows × 4 fifth-bit bytes
// Bytes of one block of 8 rows: Q4_K 8 × (d, dmin, 8 scales, 8 mins, 128 nibble bytes), Q6_K
// 8 × (d, 16 scales, 128 ql bytes, 64 qh bytes).
inline constexpr int64_t kQ2_KPanelBlockBytes = 672;  // 8 × (d, dmin, 16 scale bytes, 64 level bytes)
inline constexpr int64_t kQ3_KPanelBlockBytes = 912;  // 8 × (d, 16 scales, 64 level bytes, 32 hmask bytes)
inline constexpr int64_t kQ4_KPanelBlockBytes = 1184;
inline constexpr int64_t kQ5_KPanelBlockBytes = 1440;  // Q4_K's group + 8 rows × 32 qh bytes
inline constexpr int64_t kQ6_KPanelBlockBytes = 1680;
inline constexpr int64_t kIQ4_XSPanelBlockBytes = 1104;  // 8 × (d, 8 scales, 128 index bytes)
inline constexpr int64_t kMaxBlockBytes = 210;           // the largest packable block (Q6_K)

// Bytes of one packed group (a block of all 8 rows of a panel) of a packable type.
constexpr int64_t packed_group_bytes(DType type) {
  switch (type) {
    case DType::Q4_0:
    case DType::IQ4_NL:
      return kQ4_0PanelBlockBytes;
    case DType::Q8_0:
      return kQ8_0PanelBlockBytes;
    case DType::Q4_1:
      return kQ4_1PanelBlockBytes;
    case DType::Q5_0:
      return kQ5_0PanelBlockBytes;
    case DType::Q5_1:
      return kQ5_1PanelBlockBytes;
    case DType::Q2_K:
      return kQ2_KPanelBlockBytes;
    case DType::Q3_K:
      return kQ3_KPanelBlockBytes;
    case DType::Q4_K:
      return kQ4_KPanelBlockBytes;
    case DType::Q5_K:
      return kQ5_KPanelBlockBytes;
    case DType::Q6_K:
      return kQ6_KPanelBlockBytes;
    case DType::IQ4_XS:
      return kIQ4_XSPanelBlockBytes;
    default:
      return 0;
  }
}

class PackedMatrix {
 public:
  PackedMatrix() = default;

  bool empty() const { return data_ == nullptr; }
  DType type() const { return type_; }
  int64_t n_out() const { return n_out_; }
  int64_t k() const { return k_; }
  // Bytes from one panel to the next.
  int64_t panel_bytes() const { return k_ / type_info(type_).block_elems * packed_group_bytes(type_); }
  int64_t n_panels() const { return (n_out_ + kPanelRows - 1) / kPanelRows; }
  size_t size_bytes() const { return static_cast<size_t>(n_panels() * panel_bytes()); }
  const uint8_t* data() const { return data_.get(); }

 private:
  friend PackedMatrix pack_for_matmul(DType w_type, const void* w, int64_t n_out, int64_t k);
  struct FreeDeleter {
    void operator()(uint8_t* p) const;
  };
  DType type_ = DType::F32;
  int64_t n_out_ = 0;
  int64_t k_ = 0;
  std::unique_ptr<uint8_t, FreeDeleter> data_;
};

// Whether pack_for_matmul supports w_type.
bool can_pack_for_matmul(DType w_type);

// Repacks w: [n_out, k] in w_type (rows row_bytes(w_type, k) apart) into an owned buffer of the
// same size (plus the padding of the last panel). Returns an empty matrix when w_type cannot be
// packed or the shape is invalid (k not a multiple of the block size, n_out or k not positive).
PackedMatrix pack_for_matmul(DType w_type, const void* w, int64_t n_out, int64_t k);

// Row `lane` (0..7) of one packed group of `type`, back in the file's block layout: block receives
// type_info(type).block_bytes bytes (the inverse of packing; the scalar kernels read packed
// matrices through it).
void unpack_panel_lane(DType type, const uint8_t* group, int lane, void* block);

// matmul() for a packed matrix: y[m, n_out] = x[m, k] · Wᵀ, the same integer block dot products
// and per-output float accumulation order as the scalar matmul of the unpacked matrix.
// x: [m, k], y: [m, n_out].
Status matmul_packed(const PackedMatrix& w, const float* x, int64_t m, float* y, ThreadPool& pool);

}  // namespace nibble::kernels
