#include "kernels/attention.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/matmul_internal.hpp"
#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"

namespace nibble::kernels {

namespace {

bool valid_call(const PagedAttentionShape& s, const void* q, const void* k_cache, const void* v_cache,
                const int32_t* block_tables, const int32_t* token_seq, const int32_t* token_pos,
                const float* out) {
  if (q == nullptr || k_cache == nullptr || v_cache == nullptr || block_tables == nullptr ||
      token_seq == nullptr || token_pos == nullptr || out == nullptr || s.tokens < 0 || s.n_head <= 0 ||
      s.n_head_kv <= 0 || s.n_head % s.n_head_kv != 0 || s.head_dim <= 0 || s.block_size <= 0 ||
      s.max_blocks_per_seq <= 0) {
    return false;
  }
  for (int64_t t = 0; t < s.tokens; ++t) {
    if (token_pos[t] < 0 || token_pos[t] >= s.block_size * s.max_blocks_per_seq || token_seq[t] < 0)
      return false;
  }
  return true;
}

}  // namespace

Status paged_attention(const PagedAttentionShape& shape, const float* q, const uint16_t* k_cache,
                       const uint16_t* v_cache, const int32_t* block_tables, const int32_t* token_seq,
                       const int32_t* token_pos, float scale, float* out, ThreadPool& pool) {
  const auto& s = shape;
  if (!valid_call(s, q, k_cache, v_cache, block_tables, token_seq, token_pos, out))
    return Status::invalid_argument;
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

Status paged_attention_q8_0(const PagedAttentionShape& shape, const float* q, const uint8_t* k_cache,
                            const uint8_t* v_cache, const int32_t* block_tables, const int32_t* token_seq,
                            const int32_t* token_pos, float scale, float* out, ThreadPool& pool) {
  const auto& s = shape;
  if (!valid_call(s, q, k_cache, v_cache, block_tables, token_seq, token_pos, out) ||
      s.head_dim % kQK8_0 != 0)
    return Status::invalid_argument;
  const int64_t group = s.n_head / s.n_head_kv;
  const int64_t head_bytes = s.head_dim / kQK8_0 * static_cast<int64_t>(sizeof(BlockQ8_0));
  const int64_t row_bytes = s.n_head_kv * head_bytes;  // bytes per cached position

  const detail::IsaKernels& isa = detail::active_kernels();
  pool.parallel_for(s.tokens * s.n_head, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<BlockQ8_0> q_q8(static_cast<size_t>(s.head_dim / kQK8_0));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / s.n_head;
      const int64_t h = item % s.n_head;
      const int32_t* table = block_tables + static_cast<int64_t>(token_seq[t]) * s.max_blocks_per_seq;
      const int64_t n_pos = static_cast<int64_t>(token_pos[t]) + 1;
      isa.quantize_q8_0(q + (t * s.n_head + h) * s.head_dim, q_q8.data(), s.head_dim);
      auto for_each_block = [&](auto&& visit) {
        for (int64_t first = 0; first < n_pos; first += s.block_size) {
          const int64_t block = table[first / s.block_size];
          visit(first, std::min(s.block_size, n_pos - first),
                block * s.block_size * row_bytes + (h / group) * head_bytes);
        }
      };
      scores.resize(n_pos);
      // The scores are a Q8_0 matmul: the block's rows of this head as the weights, the query the one
      // activation row.
      for_each_block([&](int64_t first, int64_t count, int64_t offset) {
        detail::MatmulOperands op;
        op.w = k_cache + offset;
        op.w_stride = row_bytes;
        op.x = reinterpret_cast<const uint8_t*>(q_q8.data());
        op.x_stride = head_bytes;
        op.y = scores.data() + first;
        op.y_stride = count;
        op.m = 1;
        op.k = s.head_dim;
        isa.q8_0(op, 0, count);
      });
      for (float& score : scores) score *= scale;
      isa.softmax(scores.data(), n_pos);
      float* o = out + (t * s.n_head + h) * s.head_dim;
      std::fill(o, o + s.head_dim, 0.0f);
      for_each_block([&](int64_t first, int64_t count, int64_t offset) {
        isa.q8_0_axpy_rows(scores.data() + first, v_cache + offset, row_bytes, count, s.head_dim, o);
      });
    }
  });
  return Status::ok;
}

Status paged_attention_q8_0_reference(const PagedAttentionShape& shape, const float* q,
                                      const uint8_t* k_cache, const uint8_t* v_cache,
                                      const int32_t* block_tables, const int32_t* token_seq,
                                      const int32_t* token_pos, float scale, float* out) {
  const auto& s = shape;
  if (!valid_call(s, q, k_cache, v_cache, block_tables, token_seq, token_pos, out) ||
      s.head_dim % kQK8_0 != 0)
    return Status::invalid_argument;
  const int64_t group = s.n_head / s.n_head_kv;
  const int64_t blocks_per_head = s.head_dim / kQK8_0;
  const int64_t row_blocks = s.n_head_kv * blocks_per_head;
  const auto* k_blocks = reinterpret_cast<const BlockQ8_0*>(k_cache);
  const auto* v_blocks = reinterpret_cast<const BlockQ8_0*>(v_cache);
  std::vector<float> q_values(static_cast<size_t>(s.head_dim)), scores;
  for (int64_t t = 0; t < s.tokens; ++t) {
    for (int64_t h = 0; h < s.n_head; ++h) {
      const int32_t* table = block_tables + static_cast<int64_t>(token_seq[t]) * s.max_blocks_per_seq;
      const int64_t n_pos = static_cast<int64_t>(token_pos[t]) + 1;
      // The query as its Q8_0 blocks hold it (llama.cpp's rounding: quantize_row's bytes).
      std::vector<BlockQ8_0> q_q8(static_cast<size_t>(blocks_per_head));
      if (quantize_row(DType::Q8_0, q + (t * s.n_head + h) * s.head_dim, q_q8.data(), s.head_dim) !=
          Status::ok)
        return Status::invalid_argument;
      const auto row = [&](const BlockQ8_0* cache, int64_t p) {
        const int64_t slot = static_cast<int64_t>(table[p / s.block_size]) * s.block_size + p % s.block_size;
        return cache + slot * row_blocks + (h / group) * blocks_per_head;
      };
      scores.assign(static_cast<size_t>(n_pos), 0.0f);
      float top = -INFINITY;
      for (int64_t p = 0; p < n_pos; ++p) {
        const BlockQ8_0* k = row(k_blocks, p);
        float sum = 0.0f;
        for (int64_t b = 0; b < blocks_per_head; ++b) {
          int32_t dot = 0;
          for (int64_t i = 0; i < kQK8_0; ++i) dot += q_q8[b].qs[i] * k[b].qs[i];
          sum += fp16_to_fp32(q_q8[b].d) * fp16_to_fp32(k[b].d) * static_cast<float>(dot);
        }
        scores[p] = sum * scale;
        top = std::max(top, scores[p]);
      }
      double total = 0;
      for (float& score : scores) total += (score = std::exp(score - top));
      float* o = out + (t * s.n_head + h) * s.head_dim;
      std::fill(o, o + s.head_dim, 0.0f);
      for (int64_t p = 0; p < n_pos; ++p) {
        const float w = static_cast<float>(scores[p] / total);
        const BlockQ8_0* v = row(v_blocks, p);
        for (int64_t d = 0; d < s.head_dim; ++d)
          o[d] += w * fp16_to_fp32(v[d / kQK8_0].d) * static_cast<float>(v[d / kQK8_0].qs[d % kQK8_0]);
      }
    }
  }
  return Status::ok;
}

}  // namespace nibble::kernels
