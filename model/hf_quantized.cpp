// GPTQ / AWQ checkpoints: quantization_config, unpacking with every shape and index checked, and the
// conversion to a matmul type (see the header for the layouts and the choice of type).
#include "model/hf_quantized.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace nibble::model {

namespace {

using nlohmann::json;

// AWQ's "gemm" packing: nibble i of an int32 holds output 8c + kAwqOrder[i].
constexpr int kAwqOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// A tensor of the linear layer, its dtype and shape checked. `layout` explains the expected shape.
const HfCheckpoint::Tensor& require(const HfCheckpoint& ckpt, const std::string& name,
                                    std::initializer_list<SafetensorsDType> dtypes,
                                    const std::vector<int64_t>& shape, const std::string& layout) {
  const HfCheckpoint::Tensor* t = ckpt.find_tensor(name);
  if (t == nullptr) throw HfCheckpointError(ckpt.dir() + ": tensor '" + name + "' is missing");
  const std::string where = t->file->path() + ": tensor '" + name + "'";
  if (std::find(dtypes.begin(), dtypes.end(), t->info->dtype) == dtypes.end()) {
    std::string allowed;
    for (SafetensorsDType d : dtypes)
      allowed += std::string(allowed.empty() ? "" : " or ") + safetensors_dtype_name(d);
    throw HfCheckpointError(where + " has dtype " + safetensors_dtype_name(t->info->dtype) + ", expected " +
                            allowed);
  }
  if (t->info->shape != shape) {
    throw HfCheckpointError(where + " has shape " + shape_string(t->info->shape) + ", expected " +
                            shape_string(shape) + " (" + layout + ")");
  }
  return *t;
}

// The tensor's int32 values (the mapping need not align them).
std::vector<uint32_t> read_u32(const HfCheckpoint::Tensor& t) {
  std::vector<uint32_t> out(static_cast<size_t>(t.info->n_elements));
  std::memcpy(out.data(), t.data(), t.info->size_bytes);
  return out;
}

std::vector<float> read_floats(const HfCheckpoint::Tensor& t) {
  const auto n = static_cast<size_t>(t.info->n_elements);
  std::vector<float> out(n);
  if (t.info->dtype == SafetensorsDType::F32) {
    std::memcpy(out.data(), t.data(), t.info->size_bytes);
    return out;
  }
  std::vector<uint16_t> half(n);
  std::memcpy(half.data(), t.data(), t.info->size_bytes);
  for (size_t i = 0; i < n; ++i)
    out[i] = t.info->dtype == SafetensorsDType::F16 ? kernels::fp16_to_fp32(half[i])
                                                    : kernels::bf16_to_fp32(half[i]);
  return out;
}

}  // namespace

int64_t HfQuantization::groups(int64_t k) const {
  return group_size < 0 ? 1 : (k + group_size - 1) / group_size;
}

std::optional<HfQuantization> read_hf_quantization(const HfCheckpoint& checkpoint) {
  const std::string& path = checkpoint.config_path();
  json j;
  try {
    j = json::parse(checkpoint.config_text());
  } catch (const json::exception& e) {
    throw HfCheckpointError(path + ": not valid JSON: " + e.what());
  }
  if (!j.is_object() || !j.contains("quantization_config") || j["quantization_config"].is_null())
    return std::nullopt;
  const json& q = j["quantization_config"];
  auto fail = [&](const std::string& key, const std::string& problem) {
    return HfCheckpointError(path + ": quantization_config." + key + " " + problem);
  };
  if (!q.is_object())
    throw HfCheckpointError(path + ": quantization_config must be an object, not " + q.dump());
  auto string_of = [&](const char* key) -> std::optional<std::string> {
    if (!q.contains(key) || q[key].is_null()) return std::nullopt;
    if (!q[key].is_string()) throw fail(key, "must be a string, not " + q[key].dump());
    return q[key].get<std::string>();
  };
  auto integer_of =
      [&](std::initializer_list<const char*> keys) -> std::optional<std::pair<std::string, int64_t>> {
    for (const char* key : keys) {
      if (!q.contains(key) || q[key].is_null()) continue;
      if (!q[key].is_number_integer()) throw fail(key, "must be an integer, not " + q[key].dump());
      return std::make_pair(std::string(key), q[key].get<int64_t>());
    }
    return std::nullopt;
  };
  auto flag_of = [&](const char* key, bool fallback) -> bool {
    if (!q.contains(key) || q[key].is_null()) return fallback;
    if (!q[key].is_boolean()) throw fail(key, "must be true or false, not " + q[key].dump());
    return q[key].get<bool>();
  };

  HfQuantization h;
  const std::optional<std::string> method = string_of("quant_method");
  if (!method) throw fail("quant_method", "is missing");
  if (lower(*method) == "gptq") {
    h.method = HfQuantMethod::gptq;
  } else if (lower(*method) == "awq") {
    h.method = HfQuantMethod::awq;
  } else {
    throw fail("quant_method", "= \"" + *method + "\" is not supported (only \"gptq\" and \"awq\", 4-bit)");
  }
  // AutoAWQ's own quant_config spells them w_bit and q_group_size.
  const auto bits = integer_of({"bits", "w_bit"});
  if (!bits) throw fail("bits", "is missing");
  if (bits->second != 4)
    throw fail(bits->first,
               "= " + std::to_string(bits->second) + " is not supported (only 4-bit checkpoints)");
  h.bits = 4;
  const auto group = integer_of({"group_size", "q_group_size"});
  if (!group) throw fail("group_size", "is missing");
  if (group->second != -1 && group->second <= 0)
    throw fail(group->first, "= " + std::to_string(group->second) + " must be -1 (per-channel) or positive");
  h.group_size = group->second;

  if (h.method == HfQuantMethod::gptq) {
    h.desc_act = flag_of("desc_act", false);
    h.sym = flag_of("sym", true);
    // GPTQModel / optimum: checkpoint_format (older: format); absent means AutoGPTQ's v1.
    std::optional<std::string> format = string_of("checkpoint_format");
    const char* format_key = "checkpoint_format";
    if (!format) {
      format = string_of("format");
      format_key = "format";
    }
    const std::string f = format ? lower(*format) : "gptq";
    if (f == "gptq") {
      h.zeros_minus_one = true;
    } else if (f == "gptq_v2") {
      h.zeros_minus_one = false;
    } else {
      throw fail(format_key, "= \"" + *format + "\" is not supported (only \"gptq\" and \"gptq_v2\")");
    }
  } else {
    const std::string version = lower(string_of("version").value_or("gemm"));
    if (version != "gemm")
      throw fail("version", "= \"" + version + "\" is not supported (only AWQ's \"gemm\" layout)");
    if (!flag_of("zero_point", true))
      throw fail("zero_point", "= false is not supported (only AWQ with zero points)");
    h.sym = false;
    h.zeros_minus_one = false;
  }
  return h;
}

Int4Linear read_quantized_linear(const HfCheckpoint& ckpt, const HfQuantization& quant,
                                 const std::string& prefix, int64_t n_out, int64_t k) {
  const bool gptq = quant.method == HfQuantMethod::gptq;
  const std::string what = std::string(quant.method_name()) + " layer '" + prefix + "'";
  // Packed dimensions hold 8 values per int32.
  if (n_out % 8 != 0)
    throw HfCheckpointError(ckpt.dir() + ": " + what + " has " + std::to_string(n_out) +
                            " outputs, not a multiple of 8 (4-bit values are packed 8 to an int32)");
  if (gptq && k % 8 != 0)
    throw HfCheckpointError(ckpt.dir() + ": " + what + " has " + std::to_string(k) +
                            " inputs, not a multiple of 8 (GPTQ packs 8 inputs to an int32)");
  Int4Linear l;
  l.n_out = n_out;
  l.k = k;
  l.groups = quant.groups(k);
  const int64_t n = n_out, groups = l.groups;
  l.levels.resize(static_cast<size_t>(n * k));
  l.zeros.resize(static_cast<size_t>(n * groups));
  l.scales.resize(static_cast<size_t>(n * groups));
  l.group.resize(static_cast<size_t>(k));

  const std::string g_layout = std::to_string(groups) + " groups of " +
                               (quant.group_size < 0 ? "all" : std::to_string(quant.group_size)) +
                               " of the " + std::to_string(k) + " inputs";
  const auto& qweight = gptq ? require(ckpt, prefix + ".qweight", {SafetensorsDType::I32}, {k / 8, n},
                                       "GPTQ: [in_features / 8, out_features] = [" + std::to_string(k) +
                                           " / 8, " + std::to_string(n) + "]")
                             : require(ckpt, prefix + ".qweight", {SafetensorsDType::I32}, {k, n / 8},
                                       "AWQ: [in_features, out_features / 8] = [" + std::to_string(k) + ", " +
                                           std::to_string(n) + " / 8]");
  const auto& qzeros = require(ckpt, prefix + ".qzeros", {SafetensorsDType::I32}, {groups, n / 8},
                               "[groups, out_features / 8]: " + g_layout);
  const auto& scales = require(ckpt, prefix + ".scales",
                               {SafetensorsDType::F16, SafetensorsDType::BF16, SafetensorsDType::F32},
                               {groups, n}, "[groups, out_features]: " + g_layout);

  const std::vector<uint32_t> qw = read_u32(qweight);
  if (gptq) {
    for (int64_t row = 0; row < k / 8; ++row) {
      for (int64_t c = 0; c < n; ++c) {
        const uint32_t word = qw[static_cast<size_t>(row * n + c)];
        for (int i = 0; i < 8; ++i)
          l.levels[static_cast<size_t>(c * k + row * 8 + i)] = (word >> (4 * i)) & 0xF;
      }
    }
  } else {
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t cc = 0; cc < n / 8; ++cc) {
        const uint32_t word = qw[static_cast<size_t>(j * (n / 8) + cc)];
        for (int i = 0; i < 8; ++i)
          l.levels[static_cast<size_t>((cc * 8 + kAwqOrder[i]) * k + j)] = (word >> (4 * i)) & 0xF;
      }
    }
  }
  const std::vector<uint32_t> qz = read_u32(qzeros);
  const int zero_offset = quant.zeros_minus_one ? 1 : 0;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t cc = 0; cc < n / 8; ++cc) {
      const uint32_t word = qz[static_cast<size_t>(g * (n / 8) + cc)];
      for (int i = 0; i < 8; ++i) {
        const int64_t c = cc * 8 + (gptq ? i : kAwqOrder[i]);
        l.zeros[static_cast<size_t>(c * groups + g)] =
            static_cast<uint8_t>(((word >> (4 * i)) & 0xF) + zero_offset);
      }
    }
  }
  const std::vector<float> s = read_floats(scales);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = 0; c < n; ++c)
      l.scales[static_cast<size_t>(c * groups + g)] = s[static_cast<size_t>(g * n + c)];

  const HfCheckpoint::Tensor* g_idx = gptq ? ckpt.find_tensor(prefix + ".g_idx") : nullptr;
  if (g_idx != nullptr) {
    require(ckpt, prefix + ".g_idx", {SafetensorsDType::I32}, {k}, "[in_features]: the group of each input");
    std::vector<int32_t> idx(static_cast<size_t>(k));
    std::memcpy(idx.data(), g_idx->data(), g_idx->info->size_bytes);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t v = idx[static_cast<size_t>(j)];
      if (v < 0 || v >= groups) {
        throw HfCheckpointError(g_idx->file->path() + ": tensor '" + prefix + ".g_idx': entry " +
                                std::to_string(j) + " is " + std::to_string(v) + ", outside the " +
                                std::to_string(groups) + " groups of qzeros and scales");
      }
      l.group[static_cast<size_t>(j)] = v;
    }
  } else {
    for (int64_t j = 0; j < k; ++j)
      l.group[static_cast<size_t>(j)] = quant.group_size < 0 ? 0 : static_cast<int32_t>(j / quant.group_size);
  }
  return l;
}

namespace {

// Whether every aligned run of 32 columns lies in one group.
bool groups_are_block_runs(const std::vector<int32_t>& group, int64_t k) {
  constexpr int64_t kBlock = kernels::kQK4_0;
  if (k % kBlock != 0) return false;
  for (int64_t j = 0; j < k; ++j)
    if (group[static_cast<size_t>(j)] != group[static_cast<size_t>(j - j % kBlock)]) return false;
  return true;
}

}  // namespace

MatmulMatrix to_matmul_type(const Int4Linear& l) {
  const int64_t n = l.n_out, k = l.k, groups = l.groups;
  constexpr int64_t kBlock = kernels::kQK4_0;
  static_assert(kernels::kQK4_0 == kernels::kQK8_0);
  // Act-order (GPTQ desc_act): a group's columns are scattered over the row. Sorted by group they
  // are runs of the group size, so the matrix is stored in that column order (exactly, in 4 or 8
  // bits) and the input is gathered in the same order before the matmul, as exllama does.
  if (k % kBlock == 0 && !groups_are_block_runs(l.group, k)) {
    std::vector<int32_t> order(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) order[static_cast<size_t>(j)] = static_cast<int32_t>(j);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return l.group[static_cast<size_t>(a)] < l.group[static_cast<size_t>(b)];
    });
    Int4Linear sorted = l;
    for (int64_t j = 0; j < k; ++j)
      sorted.group[static_cast<size_t>(j)] = l.group[static_cast<size_t>(order[j])];
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < k; ++j)
        sorted.levels[static_cast<size_t>(r * k + j)] = l.levels[static_cast<size_t>(r * k + order[j])];
    if (groups_are_block_runs(sorted.group, k)) {
      MatmulMatrix out = to_matmul_type(sorted);
      if (out.type != kernels::DType::F16) {
        out.input_order = std::move(order);
        return out;
      }
    }
  }
  // One group per aligned run of 32 inputs, scales that fp16 holds exactly: Q4_0 or Q8_0 blocks.
  bool blocks = groups_are_block_runs(l.group, k);
  bool zeros_are_8 = true;
  for (size_t i = 0; blocks && i < l.scales.size(); ++i) {
    blocks = kernels::fp16_to_fp32(kernels::fp32_to_fp16(l.scales[i])) == l.scales[i];
    zeros_are_8 = zeros_are_8 && l.zeros[i] == 8;
  }

  MatmulMatrix out;
  if (!blocks) {
    out.type = kernels::DType::F16;
    out.data.resize(static_cast<size_t>(n * k * 2));
    auto* w = reinterpret_cast<kernels::f16_bits*>(out.data.data());
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < k; ++j) w[r * k + j] = kernels::fp32_to_fp16(l.value(r, j));
    return out;
  }
  out.type = zeros_are_8 ? kernels::DType::Q4_0 : kernels::DType::Q8_0;
  const int64_t row_bytes = kernels::row_bytes(out.type, k);
  out.data.resize(static_cast<size_t>(n * row_bytes));
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* q = l.levels.data() + r * k;
    for (int64_t b = 0; b < k / kBlock; ++b) {
      const size_t g = static_cast<size_t>(r * groups + l.group[static_cast<size_t>(b * kBlock)]);
      const kernels::f16_bits d = kernels::fp32_to_fp16(l.scales[g]);
      if (out.type == kernels::DType::Q4_0) {
        auto* block = reinterpret_cast<kernels::BlockQ4_0*>(out.data.data() + r * row_bytes) + b;
        block->d = d;
        for (int64_t j = 0; j < kBlock / 2; ++j)
          block->qs[j] = static_cast<uint8_t>(q[b * kBlock + j] | q[b * kBlock + j + kBlock / 2] << 4);
      } else {
        auto* block = reinterpret_cast<kernels::BlockQ8_0*>(out.data.data() + r * row_bytes) + b;
        block->d = d;
        for (int64_t j = 0; j < kBlock; ++j)
          block->qs[j] = static_cast<int8_t>(q[b * kBlock + j] - l.zeros[g]);
      }
    }
  }
  return out;
}

std::vector<SafetensorsTensorData> pack_gptq(const Int4Linear& l, const std::string& prefix,
                                             bool zeros_minus_one) {
  const int64_t n = l.n_out, k = l.k, groups = l.groups;
  if (n % 8 != 0 || k % 8 != 0) {
    throw std::invalid_argument("GPTQ layer '" + prefix + "' [" + std::to_string(n) + ", " +
                                std::to_string(k) + "]: both dimensions must be multiples of 8");
  }
  std::vector<uint32_t> qweight(static_cast<size_t>(k / 8 * n), 0);
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t j = 0; j < k; ++j) {
      qweight[static_cast<size_t>(j / 8 * n + c)] |=
          static_cast<uint32_t>(l.levels[static_cast<size_t>(c * k + j)] & 0xF) << (4 * (j % 8));
    }
  }
  std::vector<uint32_t> qzeros(static_cast<size_t>(groups * (n / 8)), 0);
  std::vector<kernels::f16_bits> scales(static_cast<size_t>(groups * n));
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t g = 0; g < groups; ++g) {
      const int stored = l.zeros[static_cast<size_t>(c * groups + g)] - (zeros_minus_one ? 1 : 0);
      if (stored < 0 || stored > 15) {
        throw std::invalid_argument(
            "GPTQ layer '" + prefix + "': output " + std::to_string(c) + ", group " + std::to_string(g) +
            " has zero point " + std::to_string(l.zeros[static_cast<size_t>(c * groups + g)]) +
            ", which the " + (zeros_minus_one ? "v1 (zero - 1)" : "v2") + " layout cannot store");
      }
      qzeros[static_cast<size_t>(g * (n / 8) + c / 8)] |= static_cast<uint32_t>(stored) << (4 * (c % 8));
      scales[static_cast<size_t>(g * n + c)] =
          kernels::fp32_to_fp16(l.scales[static_cast<size_t>(c * groups + g)]);
    }
  }
  auto bytes_of = [](const auto& v) {
    std::vector<uint8_t> b(v.size() * sizeof(v[0]));
    std::memcpy(b.data(), v.data(), b.size());
    return b;
  };
  return {
      {prefix + ".qweight", SafetensorsDType::I32, {k / 8, n}, bytes_of(qweight)},
      {prefix + ".qzeros", SafetensorsDType::I32, {groups, n / 8}, bytes_of(qzeros)},
      {prefix + ".scales", SafetensorsDType::F16, {groups, n}, bytes_of(scales)},
      {prefix + ".g_idx", SafetensorsDType::I32, {k}, bytes_of(l.group)},
  };
}

}  // namespace nibble::model
