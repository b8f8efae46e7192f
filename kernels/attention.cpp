#include "kernels/attention.hpp"

#include <algorithm>
#include <cmath>
#include <optional>
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

namespace {

// How a cache type's rows meet the query: its matmul kernel (unpacked rows) and the activation blocks
// that kernel takes; and how its V rows meet the softmax weights.
struct CacheTypeKernels {
  detail::MatmulRangeFn dot = nullptr;
  detail::QuantizeActivationFn quantize_query = nullptr;
  DType query_type = DType::Q8_0;
  decltype(detail::IsaKernels::q8_0_axpy_rows) axpy = nullptr;
};

std::optional<CacheTypeKernels> cache_type_kernels(const detail::IsaKernels& isa, DType type) {
  switch (type) {
    case DType::Q8_0:
      return CacheTypeKernels{isa.q8_0, isa.quantize_q8_0, DType::Q8_0, isa.q8_0_axpy_rows};
    case DType::Q4_0:
      return CacheTypeKernels{isa.q4_0, isa.quantize_q8_0, DType::Q8_0, isa.q4_0_axpy_rows};
    case DType::Q5_0:
      return CacheTypeKernels{isa.q5_0, isa.quantize_q8_0, DType::Q8_0, isa.q5_0_axpy_rows};
    case DType::IQ4_NL:
      return CacheTypeKernels{isa.iq4_nl, isa.quantize_q8_0, DType::Q8_0, isa.iq4_nl_axpy_rows};
    case DType::Q4_1:
      return CacheTypeKernels{isa.q4_1, isa.quantize_q8_1, DType::Q8_1, isa.q4_1_axpy_rows};
    case DType::Q5_1:
      return CacheTypeKernels{isa.q5_1, isa.quantize_q8_1, DType::Q8_1, isa.q5_1_axpy_rows};
    default:
      return std::nullopt;
  }
}

}  // namespace

bool paged_attention_quantized_takes(DType type) {
  return cache_type_kernels(detail::scalar_kernels(), type).has_value();
}

namespace {

// Checks a mixed call's types and shape; on success fills the quantized sides' kernels.
Status check_cache_types(const detail::IsaKernels& isa, DType k_type, DType v_type, int64_t head_dim,
                         std::optional<CacheTypeKernels>* k_kernels,
                         std::optional<CacheTypeKernels>* v_kernels) {
  if (k_type != DType::F16) *k_kernels = cache_type_kernels(isa, k_type);
  if (v_type != DType::F16) *v_kernels = cache_type_kernels(isa, v_type);
  if ((k_type != DType::F16 && !*k_kernels) || (v_type != DType::F16 && !*v_kernels))
    return Status::unsupported_type;
  if (head_dim % 32 != 0) return Status::invalid_argument;
  return Status::ok;
}

}  // namespace

Status paged_attention_quantized(const PagedAttentionShape& shape, DType k_type, DType v_type, const float* q,
                                 const uint8_t* k_cache, const uint8_t* v_cache, const int32_t* block_tables,
                                 const int32_t* token_seq, const int32_t* token_pos, float scale, float* out,
                                 ThreadPool& pool) {
  const auto& s = shape;
  const detail::IsaKernels& isa = detail::active_kernels();
  std::optional<CacheTypeKernels> k_kernels, v_kernels;
  if (const Status st = check_cache_types(isa, k_type, v_type, s.head_dim, &k_kernels, &v_kernels);
      st != Status::ok)
    return st;
  if (!valid_call(s, q, k_cache, v_cache, block_tables, token_seq, token_pos, out))
    return Status::invalid_argument;
  const int64_t group = s.n_head / s.n_head_kv;
  const int64_t k_head_bytes = row_bytes(k_type, s.head_dim), v_head_bytes = row_bytes(v_type, s.head_dim);
  const int64_t k_row_bytes = s.n_head_kv * k_head_bytes;  // bytes per cached position
  const int64_t v_row_bytes = s.n_head_kv * v_head_bytes;
  const int64_t query_bytes = k_kernels ? row_bytes(k_kernels->query_type, s.head_dim) : 0;

  pool.parallel_for(s.tokens * s.n_head, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, q_f16;
    std::vector<uint8_t> query(static_cast<size_t>(query_bytes));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / s.n_head;
      const int64_t h = item % s.n_head;
      const int32_t* table = block_tables + static_cast<int64_t>(token_seq[t]) * s.max_blocks_per_seq;
      const int64_t n_pos = static_cast<int64_t>(token_pos[t]) + 1;
      const float* q_row = q + (t * s.n_head + h) * s.head_dim;
      // Positions come a block at a time; visit(first, count, offset of the first row's head in bytes).
      auto for_each_block = [&](int64_t row_bytes_all, int64_t head_bytes, auto&& visit) {
        for (int64_t first = 0; first < n_pos; first += s.block_size) {
          const int64_t block = table[first / s.block_size];
          visit(first, std::min(s.block_size, n_pos - first),
                block * s.block_size * row_bytes_all + (h / group) * head_bytes);
        }
      };
      scores.resize(n_pos);
      if (k_kernels) {
        // The scores are a matmul: the block's rows of this head as the weights, the query the one
        // activation row.
        k_kernels->quantize_query(q_row, query.data(), s.head_dim);
        for_each_block(k_row_bytes, k_head_bytes, [&](int64_t first, int64_t count, int64_t offset) {
          detail::MatmulOperands op;
          op.w = k_cache + offset;
          op.w_stride = k_row_bytes;
          op.x = query.data();
          op.x_stride = query_bytes;
          op.y = scores.data() + first;
          op.y_stride = count;
          op.m = 1;
          op.k = s.head_dim;
          k_kernels->dot(op, 0, count);
        });
        for (float& score : scores) score *= scale;
      } else {  // fp16 K: the query rounded to fp16, as paged_attention
        q_f16.assign(q_row, q_row + s.head_dim);
        isa.round_to_f16(q_f16.data(), s.head_dim);
        for_each_block(k_row_bytes, k_head_bytes, [&](int64_t first, int64_t count, int64_t offset) {
          isa.f16_dot_rows(q_f16.data(), reinterpret_cast<const uint16_t*>(k_cache + offset), k_row_bytes / 2,
                           count, s.head_dim, scale, scores.data() + first);
        });
      }
      float* o = out + (t * s.n_head + h) * s.head_dim;
      std::fill(o, o + s.head_dim, 0.0f);
      if (v_kernels) {
        isa.softmax(scores.data(), n_pos);
        for_each_block(v_row_bytes, v_head_bytes, [&](int64_t first, int64_t count, int64_t offset) {
          v_kernels->axpy(scores.data() + first, v_cache + offset, v_row_bytes, count, s.head_dim, o);
        });
      } else {  // fp16 V: the weights rounded to fp16, as paged_attention (llama.cpp without flash attention)
        isa.softmax_to_f16(scores.data(), n_pos);
        for_each_block(v_row_bytes, v_head_bytes, [&](int64_t first, int64_t count, int64_t offset) {
          isa.f16_axpy_rows(scores.data() + first, reinterpret_cast<const uint16_t*>(v_cache + offset),
                            v_row_bytes / 2, count, s.head_dim, o);
        });
      }
    }
  });
  return Status::ok;
}

Status paged_attention_quantized_reference(const PagedAttentionShape& shape, DType k_type, DType v_type,
                                           const float* q, const uint8_t* k_cache, const uint8_t* v_cache,
                                           const int32_t* block_tables, const int32_t* token_seq,
                                           const int32_t* token_pos, float scale, float* out) {
  const auto& s = shape;
  std::optional<CacheTypeKernels> k_kernels, v_kernels;
  if (const Status st =
          check_cache_types(detail::scalar_kernels(), k_type, v_type, s.head_dim, &k_kernels, &v_kernels);
      st != Status::ok)
    return st;
  if (!valid_call(s, q, k_cache, v_cache, block_tables, token_seq, token_pos, out))
    return Status::invalid_argument;
  const int64_t group = s.n_head / s.n_head_kv;
  const int64_t k_head_bytes = row_bytes(k_type, s.head_dim), v_head_bytes = row_bytes(v_type, s.head_dim);
  // The query as the K side meets it: its activation blocks (llama.cpp's rounding: quantize_activations'
  // bytes), or fp16.
  const DType query_type = k_kernels ? k_kernels->query_type : DType::F16;
  std::vector<uint8_t> query(static_cast<size_t>(row_bytes(query_type, s.head_dim)));
  std::vector<float> q_values(static_cast<size_t>(s.head_dim)), k_row(q_values.size()),
      v_row(q_values.size());
  std::vector<double> scores, o(q_values.size());
  for (int64_t t = 0; t < s.tokens; ++t) {
    for (int64_t h = 0; h < s.n_head; ++h) {
      const int32_t* table = block_tables + static_cast<int64_t>(token_seq[t]) * s.max_blocks_per_seq;
      const int64_t n_pos = static_cast<int64_t>(token_pos[t]) + 1;
      if (quantize_activations(query_type, q + (t * s.n_head + h) * s.head_dim, query.data(), s.head_dim) !=
              Status::ok ||
          dequantize_row(query_type, query.data(), q_values.data(), s.head_dim) != Status::ok)
        return Status::invalid_argument;
      const auto row = [&](const uint8_t* cache, int64_t head_bytes, int64_t p) {
        const int64_t slot = static_cast<int64_t>(table[p / s.block_size]) * s.block_size + p % s.block_size;
        return cache + slot * s.n_head_kv * head_bytes + (h / group) * head_bytes;
      };
      scores.assign(static_cast<size_t>(n_pos), 0.0);
      double top = -INFINITY;
      for (int64_t p = 0; p < n_pos; ++p) {
        dequantize_row(k_type, row(k_cache, k_head_bytes, p), k_row.data(), s.head_dim);
        double dot = 0;
        for (int64_t d = 0; d < s.head_dim; ++d)
          dot += static_cast<double>(q_values[static_cast<size_t>(d)]) * k_row[static_cast<size_t>(d)];
        scores[static_cast<size_t>(p)] = dot * scale;
        top = std::max(top, scores[static_cast<size_t>(p)]);
      }
      double total = 0;
      for (double& score : scores) total += (score = std::exp(score - top));
      for (double& score : scores) {
        score /= total;
        if (!v_kernels) score = fp16_to_fp32(fp32_to_fp16(static_cast<float>(score)));  // fp16 V's weights
      }
      std::fill(o.begin(), o.end(), 0.0);
      for (int64_t p = 0; p < n_pos; ++p) {
        dequantize_row(v_type, row(v_cache, v_head_bytes, p), v_row.data(), s.head_dim);
        for (int64_t d = 0; d < s.head_dim; ++d)
          o[static_cast<size_t>(d)] += scores[static_cast<size_t>(p)] * v_row[static_cast<size_t>(d)];
      }
      for (int64_t d = 0; d < s.head_dim; ++d)
        out[(t * s.n_head + h) * s.head_dim + d] = static_cast<float>(o[static_cast<size_t>(d)]);
    }
  }
  return Status::ok;
}

}  // namespace nibble::kernels
