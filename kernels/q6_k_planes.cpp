#include "kernels/q6_k_planes.hpp"

#include <cstddef>
#include <cstring>

#include "kernels/quant_types.hpp"

namespace nibble::kernels {

namespace {
constexpr int64_t kPieceWeights = 64;  // a piece: the 16 weights of each quarter of one half's run of 32
constexpr int64_t kPiecesPerBlock = kQK_K / kPieceWeights;

bool valid(const void* a, const void* b, int64_t n_out, int64_t k) {
  return a != nullptr && b != nullptr && n_out >= 0 && k > 0 && k % kQK_K == 0;
}

// Where piece j (0..3) of a super-block keeps its bytes, in the block and, for global piece p, in the
// planes: {plane offset, block offset, bytes} for ql_lo, ql_hi and qh; the scales one byte at a time.
struct PieceRun {
  int64_t plane, block, bytes;
};
void piece_runs(const Q6KPlanesLayout& layout, int64_t j, int64_t p, PieceRun (&runs)[7]) {
  const int64_t h = j / 2, s = j % 2;
  const int64_t ql = static_cast<int64_t>(offsetof(BlockQ6_K, ql)),
                qh = static_cast<int64_t>(offsetof(BlockQ6_K, qh));
  const int64_t scales = static_cast<int64_t>(offsetof(BlockQ6_K, scales));
  runs[0] = {layout.ql_lo + 16 * p, ql + 64 * h + 16 * s, 16};
  runs[1] = {layout.ql_hi + 16 * p, ql + 64 * h + 32 + 16 * s, 16};
  runs[2] = {layout.qh + 16 * p, qh + 32 * h + 16 * s, 16};
  for (int64_t q = 0; q < 4; ++q) runs[3 + q] = {layout.scales + 4 * p + q, scales + 8 * h + s + 2 * q, 1};
}
}  // namespace

Q6KPlanesLayout q6_k_planes_layout(int64_t n_out, int64_t k) {
  Q6KPlanesLayout l;
  const int64_t pieces = n_out * (k / kPieceWeights);
  l.ql_lo = 0;
  l.ql_hi = 16 * pieces;
  l.qh = 32 * pieces;
  l.scales = 48 * pieces;
  l.d = 52 * pieces;
  l.bytes = l.d + 2 * n_out * (k / kQK_K);
  return l;
}

Status q6_k_planes_from_blocks(const void* blocks, int64_t n_out, int64_t k, uint8_t* out) {
  return q6_k_planes_rows_from_blocks(blocks, n_out, k, n_out, 0, out);
}

Status q6_k_planes_rows_from_blocks(const void* blocks, int64_t rows, int64_t k, int64_t n_out, int64_t row0,
                                    uint8_t* out) {
  if (!valid(blocks, out, rows, k) || row0 < 0 || row0 + rows > n_out) return Status::invalid_argument;
  const Q6KPlanesLayout layout = q6_k_planes_layout(n_out, k);
  const int64_t n = rows * (k / kQK_K), b0 = row0 * (k / kQK_K);  // blocks, and the first one's index
  for (int64_t b = 0; b < n; ++b) {
    const uint8_t* block = static_cast<const uint8_t*>(blocks) + b * static_cast<int64_t>(sizeof(BlockQ6_K));
    for (int64_t j = 0; j < kPiecesPerBlock; ++j) {
      PieceRun runs[7];
      piece_runs(layout, j, (b0 + b) * kPiecesPerBlock + j, runs);
      for (const PieceRun& r : runs)
        std::memcpy(out + r.plane, block + r.block, static_cast<size_t>(r.bytes));
    }
    std::memcpy(out + layout.d + 2 * (b0 + b), block + offsetof(BlockQ6_K, d), 2);
  }
  return Status::ok;
}

Status q6_k_blocks_from_planes(const uint8_t* planes, int64_t n_out, int64_t k, void* blocks) {
  if (!valid(planes, blocks, n_out, k)) return Status::invalid_argument;
  const Q6KPlanesLayout layout = q6_k_planes_layout(n_out, k);
  const int64_t n = n_out * (k / kQK_K);
  for (int64_t b = 0; b < n; ++b) {
    uint8_t* block = static_cast<uint8_t*>(blocks) + b * static_cast<int64_t>(sizeof(BlockQ6_K));
    for (int64_t j = 0; j < kPiecesPerBlock; ++j) {
      PieceRun runs[7];
      piece_runs(layout, j, b * kPiecesPerBlock + j, runs);
      for (const PieceRun& r : runs)
        std::memcpy(block + r.block, planes + r.plane, static_cast<size_t>(r.bytes));
    }
    std::memcpy(block + offsetof(BlockQ6_K, d), planes + layout.d + 2 * b, 2);
  }
  return Status::ok;
}

}  // namespace nibble::kernels
