#include "kernels/attention.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/quant_types.hpp"

namespace nibble::kernels {

namespace {

// fp16 → fp32 by table: the cache is read once per position per head, so conversion must be cheap
// on CPUs without F16C too.
const float* fp16_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t h = 0; h < 65536; ++h) t[h] = fp16_to_fp32(static_cast<uint16_t>(h));
    return t;
  }();
  return table.data();
}

float round_to_fp16(float x) { return fp16_to_fp32(fp32_to_fp16(x)); }

float dot(const float* a, const uint16_t* b, int64_t n, const float* table) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * table[b[i]];
  return sum;
}

}  // namespace

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

  const float* table_f16 = fp16_table();
  pool.parallel_for(s.tokens * s.n_head, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, q_f16;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / s.n_head;
      const int64_t h = item % s.n_head;
      const int64_t kv_head = h / group;
      const int32_t* table = block_tables + static_cast<int64_t>(token_seq[t]) * s.max_blocks_per_seq;
      const int64_t n_pos = static_cast<int64_t>(token_pos[t]) + 1;
      q_f16.resize(s.head_dim);
      for (int64_t d = 0; d < s.head_dim; ++d)
        q_f16[d] = round_to_fp16(q[(t * s.n_head + h) * s.head_dim + d]);
      auto cached = [&](const uint16_t* cache, int64_t p) {
        const int64_t block = table[p / s.block_size];
        return cache + (block * s.block_size + p % s.block_size) * kv_row + kv_head * s.head_dim;
      };

      scores.resize(n_pos);
      float max_score = -INFINITY;
      for (int64_t p = 0; p < n_pos; ++p) {
        scores[p] = dot(q_f16.data(), cached(k_cache, p), s.head_dim, table_f16) * scale;
        max_score = std::max(max_score, scores[p]);
      }
      float sum = 0.0f;
      for (int64_t p = 0; p < n_pos; ++p) {
        scores[p] = std::exp(scores[p] - max_score);
        sum += scores[p];
      }
      float* o = out + (t * s.n_head + h) * s.head_dim;
      std::fill(o, o + s.head_dim, 0.0f);
      for (int64_t p = 0; p < n_pos; ++p) {
        const float w = round_to_fp16(scores[p] / sum);
        const uint16_t* v = cached(v_cache, p);
        for (int64_t d = 0; d < s.head_dim; ++d) o[d] += w * table_f16[v[d]];
      }
    }
  });
  return Status::ok;
}

}  // namespace nibble::kernels
