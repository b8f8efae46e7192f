#include "kernels/attention.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/matmul_internal.hpp"
#include "kernels/quant_types.hpp"

namespace nibble::kernels {

Status paged_attention(const PagedAttentionShape& shape, const float* q, const uint16_t* k_cache,
                       const uint16_t* v_cache, const int32_t* block_tables, const int32_t* token_seq,
                       const int32_t* token_pos, float scale, float* out, ThreadPool& pool) {
  const auto& s = shape;
  if (q == nullptr || k_cache == nullptr || v_cache == nullptr || block_tables == nullptr ||
      token_seq == nullptr || token_pos == nullptr || out == nullptr || s.tokens < 0 || s.n_head <= 0 ||
      s.n_head_kv <= 0 || s.n_head % s.n_head_kv != 0 || s.head_dim <= 0 || s.block_size <= 0 ||
      s.max_blocks_per_seq <= 0) {
    return Status::invalid_argument;
  }
  for (int64_t t = 0; t < s.tokens; ++t) {
    if (token_pos[t] < 0 || token_pos[t] >= s.block_size * s.max_blocks_per_seq || token_seq[t] < 0) {
      return Status::invalid_argument;
    }
  }
  const int64_t group = s.n_head / s.n_head_kv;
  const int64_t kv_row = s.n_head_kv * s.head_dim;  // floats per cached position

  const detail::IsaKernels& isa = detail::active_kernels();
  pool.parallel_for(s.tokens * s.n_head, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, q_f16;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / s.n_head;
      const int64_t h = item % s.n_head;
      const int64_t kv_head = h / group;
      const int32_t* table = block_tables + static_cast<int64_t>(token_seq[t]) * s.max_blocks_per_seq;
      const int64_t n_pos = static_cast<int64_t>(token_pos[t]) + 1;
      const float* q_row = q + (t * s.n_head + h) * s.head_dim;
      q_f16.assign(q_row, q_row + s.head_dim);
      isa.round_to_f16(q_f16.data(), s.head_dim);
      // Positions come a block at a time: consecutive slots of a block are kv_row apart.
      auto for_each_block = [&](auto&& visit) {
        for (int64_t first = 0; first < n_pos; first += s.block_size) {
          const int64_t block = table[first / s.block_size];
          visit(first, std::min(s.block_size, n_pos - first),
                block * s.block_size * kv_row + kv_head * s.head_dim);
        }
      };

      scores.resize(n_pos);
      for_each_block([&](int64_t first, int64_t count, int64_t offset) {
        isa.f16_dot_rows(q_f16.data(), k_cache + offset, kv_row, count, s.head_dim, scale,
                         scores.data() + first);
      });
      isa.softmax_to_f16(scores.data(), n_pos);
      float* o = out + (t * s.n_head + h) * s.head_dim;
      std::fill(o, o + s.head_dim, 0.0f);
      for_each_block([&](int64_t first, int64_t count, int64_t offset) {
        isa.f16_axpy_rows(scores.data() + first, v_cache + offset, kv_row, count, s.head_dim, o);
      });
    }
  });
  return Status::ok;
}

}  // namespace nibble::kernels
