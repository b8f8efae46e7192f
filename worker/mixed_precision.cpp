#include "worker/mixed_precision.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "kernels/quantize.hpp"
#include "kernels/thread_pool.hpp"
#include "model/calibration.hpp"
#include "model/gptq.hpp"
#include "model/llama_config.hpp"
#include "model/llama_weights.hpp"
#include "model/quant_grid.hpp"
#include "model/random_model.hpp"
#include "model/requantize.hpp"
#include "model/tokenizer.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"

namespace nibble::worker {

namespace {

using kernels::DType;
using model::LayerMatrix;

bool fits(DType type, int64_t k) { return k > 0 && k % kernels::type_info(type).block_elems == 0; }

int64_t tensor_bytes(const model::GgufTensorInfo& t, DType type) {
  return kernels::row_bytes(type, t.row_elements()) * t.rows();
}

std::vector<float> read_floats(const model::GgufFile& file, const model::GgufTensorInfo& t) {
  const int64_t n = t.row_elements();
  std::vector<float> out(static_cast<size_t>(n * t.rows()));
  const int64_t bytes = kernels::row_bytes(t.type, n);
  for (int64_t r = 0; r < t.rows(); ++r) {
    if (kernels::dequantize_row(t.type, file.tensor_data(t) + r * bytes, out.data() + r * n, n) !=
        kernels::Status::ok) {
      throw model::GgufError(file.path() + ": cannot read tensor '" + t.name + "' as floats");
    }
  }
  return out;
}

// GGML's round-to-nearest at `type`, decoded again: what the matrix becomes at that type.
std::vector<float> rounded(const std::vector<float>& w, int64_t k, DType type) {
  const int64_t rows = static_cast<int64_t>(w.size()) / k;
  std::vector<uint8_t> blocks(static_cast<size_t>(kernels::row_bytes(type, k)));
  std::vector<float> out(w.size());
  for (int64_t r = 0; r < rows; ++r) {
    if (kernels::quantize_row(type, w.data() + r * k, blocks.data(), k) != kernels::Status::ok ||
        kernels::dequantize_row(type, blocks.data(), out.data() + r * k, k) != kernels::Status::ok) {
      throw std::invalid_argument(std::string("cannot round a matrix to ") + kernels::type_name(type));
    }
  }
  return out;
}

// tr(ΔW H ΔWᵀ): the calibration output error of replacing w by w_hat (H = 2/n XᵀX).
double output_error(const std::vector<float>& w, const std::vector<float>& w_hat, int64_t k,
                    const std::vector<double>& h) {
  const int64_t rows = static_cast<int64_t>(w.size()) / k;
  std::vector<double> d(static_cast<size_t>(k));
  double sum = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < k; ++j)
      d[static_cast<size_t>(j)] =
          static_cast<double>(w[static_cast<size_t>(r * k + j)]) - w_hat[static_cast<size_t>(r * k + j)];
    for (int64_t i = 0; i < k; ++i) {
      if (d[static_cast<size_t>(i)] == 0.0) continue;
      const double* hi = h.data() + i * k;
      double acc = 0.0;
      for (int64_t j = 0; j < k; ++j) acc += hi[j] * d[static_cast<size_t>(j)];
      sum += d[static_cast<size_t>(i)] * acc;
    }
  }
  return sum;
}

MatrixInput input_of(LayerMatrix m) {
  switch (m) {
    case LayerMatrix::attn_q:
    case LayerMatrix::attn_k:
    case LayerMatrix::attn_v:
      return MatrixInput::attn_qkv;
    case LayerMatrix::attn_output:
      return MatrixInput::attn_output;
    case LayerMatrix::ffn_gate:
    case LayerMatrix::ffn_up:
      return MatrixInput::ffn_gate_up;
    case LayerMatrix::ffn_down:
      return MatrixInput::ffn_down;
  }
  return MatrixInput::attn_qkv;
}

// Mean KL(float model || model) over the second half of every window (as `nibble eval` scores),
// against reference log-probabilities kept from the float model.
class KlMeter {
 public:
  KlMeter(std::vector<std::vector<int32_t>> windows, kernels::ThreadPool& pool)
      : windows_(std::move(windows)), pool_(pool) {}

  void set_reference(LlamaModel& model) {
    n_vocab_ = model.config().n_vocab;
    reference_.clear();
    std::vector<double> logp;
    for_each_scored(model, [&](const float* row) {
      log_softmax(row, logp);
      for (double v : logp) reference_.push_back(static_cast<float>(v));
    });
  }

  double mean_kl(LlamaModel& model) {
    std::vector<double> logp;
    double sum = 0.0;
    size_t pos = 0;
    for_each_scored(model, [&](const float* row) {
      log_softmax(row, logp);
      const float* ref = reference_.data() + pos * static_cast<size_t>(n_vocab_);
      double kl = 0.0;
      for (int64_t v = 0; v < n_vocab_; ++v)
        kl += std::exp(static_cast<double>(ref[v])) * (ref[v] - logp[static_cast<size_t>(v)]);
      sum += std::max(kl, 0.0);
      ++pos;
    });
    return pos > 0 ? sum / static_cast<double>(pos) : 0.0;
  }

 private:
  template <typename F>
  void for_each_scored(LlamaModel& model, F&& f) {
    std::vector<float> logits;
    for (const auto& w : windows_) {
      const int64_t ctx = static_cast<int64_t>(w.size());
      const int64_t blocks = (ctx + 15) / 16;
      KvCache cache(model.shard_config(), blocks, 16);
      std::vector<int32_t> table(static_cast<size_t>(blocks));
      for (int64_t b = 0; b < blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(b);
      model.forward(ForwardBatch::single(w, 0, table, true), cache, pool_, logits);
      for (int64_t p = ctx / 2; p < ctx; ++p) f(logits.data() + p * n_vocab_);
    }
  }
  void log_softmax(const float* row, std::vector<double>& out) const {
    out.resize(static_cast<size_t>(n_vocab_));
    const double max = *std::max_element(row, row + n_vocab_);
    double sum = 0.0;
    for (int64_t i = 0; i < n_vocab_; ++i) sum += std::exp(static_cast<double>(row[i]) - max);
    const double log_sum = max + std::log(sum);
    for (int64_t i = 0; i < n_vocab_; ++i)
      out[static_cast<size_t>(i)] = static_cast<double>(row[i]) - log_sum;
  }

  std::vector<std::vector<int32_t>> windows_;
  kernels::ThreadPool& pool_;
  int64_t n_vocab_ = 0;
  std::vector<float> reference_;  // [scored positions, n_vocab] log-probabilities
};

// A copy of `in` with one tensor converted to `type` (the rest as they are).
void write_with_tensor(const model::GgufFile& in, const std::string& name, DType type,
                       const std::string& path) {
  model::GgufWriter out;
  for (const auto& [key, value] : in.metadata()) out.set(key, value);
  for (const model::GgufTensorInfo& t : in.tensors()) {
    const DType target = t.name == name ? type : t.type;
    out.add_tensor_made(t.name, t.dims, target,
                        [&in, &t, target] { return model::convert_tensor(in, t, target); });
  }
  out.write(path);
}

bool is_head(const std::string& name) { return name == "token_embd.weight" || name == "output.weight"; }

// Bytes the output's header (metadata, tensor infos) and the tensors' alignment padding can take:
// the input's header, the added keys (at most every candidate's name and type) and a spare KiB.
int64_t header_allowance(const model::GgufFile& in, const std::vector<TensorSensitivity>& candidates) {
  int64_t extra = 1024;
  for (const TensorSensitivity& c : candidates) extra += 2 * 8 + static_cast<int64_t>(c.name.size()) + 8;
  return static_cast<int64_t>(in.data_offset()) + extra +
         static_cast<int64_t>(in.alignment()) * static_cast<int64_t>(in.tensors().size());
}

// Multiple-choice knapsack by dynamic programming over the extra bytes above all-4-bit, counted in
// units small enough for 100000 steps (each option's bytes rounded up, so the plan never exceeds
// the budget). Greedy by cost per byte is not enough: it spends the budget on many small cheap
// upgrades and then cannot afford one large one worth more (the tied embedding of a small model).
void choose(MixedPrecisionPlan& plan, int64_t tensor_budget) {
  int64_t total = 0;
  for (const TensorSensitivity& t : plan.tensors) total += t.options[0].bytes;
  if (total > tensor_budget) {
    throw std::invalid_argument("the size budget leaves " + std::to_string(tensor_budget) +
                                " bytes for the quantized tensors, but they take " + std::to_string(total) +
                                " bytes with every one at 4 bits");
  }
  const int64_t spare = tensor_budget - total;
  const int64_t unit = std::max<int64_t>(1, (spare + 99999) / 100000);
  const auto units = static_cast<size_t>(spare / unit);
  const double inf = std::numeric_limits<double>::infinity();
  // best[b]: the least summed cost of the tensors so far using at most b units; pick[i][b] their choice.
  std::vector<double> best(units + 1, 0.0), next(units + 1);
  std::vector<std::vector<uint8_t>> pick(plan.tensors.size(), std::vector<uint8_t>(units + 1, 0));
  for (size_t i = 0; i < plan.tensors.size(); ++i) {
    const TensorSensitivity& t = plan.tensors[i];
    for (size_t b = 0; b <= units; ++b) {
      next[b] = inf;
      for (size_t o = 0; o < t.options.size(); ++o) {
        const auto need = static_cast<size_t>((t.options[o].bytes - t.options[0].bytes + unit - 1) / unit);
        if (need > b || best[b - need] == inf) continue;
        const double c = best[b - need] + t.options[o].cost;
        if (c < next[b]) {
          next[b] = c;
          pick[i][b] = static_cast<uint8_t>(o);
        }
      }
    }
    best.swap(next);
  }
  size_t b = units;
  for (size_t i = plan.tensors.size(); i-- > 0;) {
    TensorSensitivity& t = plan.tensors[i];
    t.chosen = pick[i][b];
    b -= static_cast<size_t>((t.options[t.chosen].bytes - t.options[0].bytes + unit - 1) / unit);
  }
  plan.types.clear();
  plan.planned_cost = plan.pure_cost = 0.0;
  for (const TensorSensitivity& t : plan.tensors) {
    if (t.chosen != 0) plan.types[t.name] = t.options[t.chosen].type;
    plan.planned_cost += t.options[t.chosen].cost;
    plan.pure_cost += t.options[0].cost;
  }
}

std::string format_mb(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f MB", static_cast<double>(bytes) / 1e6);
  return buf;
}

}  // namespace

int64_t parse_size(const std::string& text) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  std::string unit = text.substr(used);
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::tolower(c); });
  const std::map<std::string, double> units = {
      {"", 1},     {"b", 1},        {"kb", 1e3},        {"mb", 1e6},
      {"gb", 1e9}, {"kib", 1024.0}, {"mib", 1048576.0}, {"gib", 1073741824.0}};
  const auto it = units.find(unit);
  if (used == 0 || it == units.end() || !(value > 0) || !std::isfinite(value)) {
    throw std::invalid_argument("cannot read the size '" + text +
                                "' (expected a number with B, KB, MB, GB, KiB, MiB or GiB, e.g. 10.2MB)");
  }
  // (int64's limit is ~9.2e18: the conversion must not pass it)
  if (value * it->second >= 9e18) throw std::invalid_argument("the size '" + text + "' is too large");
  return static_cast<int64_t>(std::floor(value * it->second));
}

MixedPrecisionPlan plan_mixed_precision(const std::shared_ptr<const model::GgufFile>& in,
                                        std::string_view calibration_text, const std::string& scratch_prefix,
                                        const CalibratedQuantizeOptions& options,
                                        const MixedPrecisionOptions& mixed) {
  if (options.method == QuantMethod::awq) {
    throw std::invalid_argument("a size budget (mixed precision) works with --method rtn or gptq, not awq");
  }
  if (options.type != DType::Q4_0 && options.type != DType::Q4_K) {
    throw std::invalid_argument(std::string("a size budget needs a 4-bit --type (q4_0 or q4_k), not ") +
                                kernels::type_name(options.type));
  }
  if ((mixed.budget.file_bytes > 0) == (mixed.budget.bits_per_weight > 0)) {
    throw std::invalid_argument("give exactly one of a file size budget and a bits-per-weight budget");
  }
  const model::GgufFile& file = *in;
  const model::LlamaConfig config = model::LlamaConfig::from_gguf(file);
  const model::QuantGrid grid =
      options.type == DType::Q4_0 ? model::QuantGrid::q4_0() : model::QuantGrid::q4_k();
  const auto tokenizer = model::Tokenizer::from_gguf(file);
  auto windows = calibration_windows(*tokenizer, calibration_text, options);
  if (mixed.sensitivity_samples > 0 && static_cast<int64_t>(windows.size()) > mixed.sensitivity_samples)
    windows.resize(static_cast<size_t>(mixed.sensitivity_samples));
  kernels::ThreadPool pool(options.threads);
  KlMeter meter(windows, pool);
  auto progress = [&](const std::string& line) {
    if (options.progress) options.progress(line);
  };

  // The float model's predictions, and every layer matrix's input Hessian on the same windows.
  LlamaModel model(in);
  std::map<std::pair<int64_t, MatrixInput>, std::unique_ptr<model::HessianAccumulator>> hessians;
  model.set_input_observer([&](int64_t layer, MatrixInput input, const float* x, int64_t rows, int64_t k) {
    auto& acc = hessians[{layer, input}];
    if (acc == nullptr) acc = std::make_unique<model::HessianAccumulator>(k);
    acc->add(x, rows);
  });
  meter.set_reference(model);
  model.set_input_observer({});

  MixedPrecisionPlan plan;
  // Candidates in file order: the embedding / head and every layer matrix; everything else (norms)
  // is stored as F32 whatever the plan.
  int64_t fixed_bytes = 0, n_params = 0;
  for (const model::GgufTensorInfo& t : file.tensors()) {
    n_params += t.n_elements;
    const bool candidate = t.dims.size() == 2 && (is_head(t.name) || t.name.rfind("blk.", 0) == 0);
    if (!candidate) {
      fixed_bytes += tensor_bytes(t, model::requantized_type(t, options.type, true));
      continue;
    }
    if (!fits(options.type, t.row_elements())) {
      throw std::invalid_argument(file.path() + ": tensor '" + t.name + "' has rows of " +
                                  std::to_string(t.row_elements()) + ", which " +
                                  kernels::type_name(options.type) + " cannot hold");
    }
    TensorSensitivity s;
    s.name = t.name;
    s.options.push_back({options.type, tensor_bytes(t, options.type), 0.0, false});
    for (DType type : mixed.high_types) {
      if (fits(type, t.row_elements()) && tensor_bytes(t, type) > s.options[0].bytes)
        s.options.push_back({type, tensor_bytes(t, type), 0.0, false});
    }
    std::sort(s.options.begin() + 1, s.options.end(),
              [](const TensorOption& a, const TensorOption& b) { return a.bytes < b.bytes; });
    plan.tensors.push_back(std::move(s));
  }

  // The embedding and head: every type measured on a scratch copy of the model.
  const std::string scratch = scratch_prefix + ".sensitivity.gguf";
  for (TensorSensitivity& s : plan.tensors) {
    if (!is_head(s.name)) continue;
    for (TensorOption& o : s.options) {
      const auto start = std::chrono::steady_clock::now();
      write_with_tensor(file, s.name, o.type, scratch);
      auto scratch_model = LlamaModel::load(scratch);
      o.cost = meter.mean_kl(*scratch_model);
      o.measured = true;
      std::ostringstream line;
      line << "mixed: " << s.name << " at " << kernels::type_name(o.type) << ": KL " << o.cost << " ("
           << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() << " s)";
      progress(line.str());
    }
  }
  std::filesystem::remove(scratch);

  // Layer matrices: measured at 4 bits, the higher types scaled by their output error.
  std::map<std::string, TensorSensitivity*> by_name;
  for (TensorSensitivity& s : plan.tensors) by_name[s.name] = &s;
  for (int64_t l = 0; l < config.n_layer; ++l) {
    const auto start = std::chrono::steady_clock::now();
    for (LayerMatrix m : model::kLayerMatrices) {
      const std::string name = model::layer_tensor_name(l, m);
      TensorSensitivity* s = by_name.at(name);
      const model::GgufTensorInfo& t = *file.find_tensor(name);
      const std::vector<float> w = read_floats(file, t);
      const int64_t k = t.row_elements();
      const auto& acc = hessians.at({l, input_of(m)});
      const std::vector<double> h = acc->hessian();
      const std::vector<float> base =
          options.method == QuantMethod::gptq
              ? model::gptq_quantize(w.data(), t.rows(), k, h, grid, options.gptq).dequantized
              : rounded(w, k, options.type);
      model.set_layer_matrix(l, m, base);
      s->options[0].cost = meter.mean_kl(model);
      s->options[0].measured = true;
      model.set_layer_matrix(l, m, w);
      const double base_error = output_error(w, base, k, h);
      for (size_t o = 1; o < s->options.size(); ++o) {
        const double e = output_error(w, rounded(w, k, s->options[o].type), k, h);
        s->options[o].cost = base_error > 0 ? s->options[0].cost * e / base_error : 0.0;
      }
    }
    std::ostringstream line;
    line << "mixed: " << progress_bar(l + 1, config.n_layer) << " layer " << l + 1 << "/" << config.n_layer
         << " measured in " << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()
         << " s";
    progress(line.str());
  }

  const int64_t header = header_allowance(file, plan.tensors);
  int64_t tensor_budget = 0;
  if (mixed.budget.file_bytes > 0) {
    plan.budget_bytes = mixed.budget.file_bytes;
    tensor_budget = mixed.budget.file_bytes - header - fixed_bytes;
  } else {
    const auto data_budget =
        static_cast<int64_t>(mixed.budget.bits_per_weight * static_cast<double>(n_params) / 8.0);
    tensor_budget = data_budget - fixed_bytes;
    plan.budget_bytes = data_budget + header;
  }
  choose(plan, tensor_budget);
  plan.pure_bytes = header + fixed_bytes;
  plan.planned_bytes = header + fixed_bytes;
  for (const TensorSensitivity& t : plan.tensors) {
    plan.pure_bytes += t.options[0].bytes;
    plan.planned_bytes += t.options[t.chosen].bytes;
  }
  return plan;
}

std::vector<std::string> describe_plan(const MixedPrecisionPlan& plan) {
  std::vector<std::string> lines;
  char buf[256];
  for (const TensorSensitivity& t : plan.tensors) {
    if (t.chosen == 0) continue;
    const TensorOption& base = t.options[0];
    const TensorOption& chosen = t.options[t.chosen];
    std::snprintf(buf, sizeof buf, "  %-24s %-5s (KL at %s %.3g -> %.3g%s, +%lld bytes)", t.name.c_str(),
                  kernels::type_name(chosen.type), kernels::type_name(base.type), base.cost, chosen.cost,
                  chosen.measured ? "" : " est.", static_cast<long long>(chosen.bytes - base.bytes));
    lines.emplace_back(buf);
  }
  std::snprintf(buf, sizeof buf,
                "mixed: %zu of %zu tensors above 4 bits; at most %s of a %s budget (all 4-bit: %s); "
                "summed KL %.4g (all 4-bit: %.4g)",
                plan.types.size(), plan.tensors.size(), format_mb(plan.planned_bytes).c_str(),
                format_mb(plan.budget_bytes).c_str(), format_mb(plan.pure_bytes).c_str(), plan.planned_cost,
                plan.pure_cost);
  lines.insert(lines.begin(), buf);
  return lines;
}

void quantize_mixed_precision(const std::shared_ptr<const model::GgufFile>& in,
                              std::string_view calibration_text, const std::string& out_path,
                              const CalibratedQuantizeOptions& options, const MixedPrecisionOptions& mixed) {
  const MixedPrecisionPlan plan = plan_mixed_precision(in, calibration_text, out_path, options, mixed);
  if (options.progress) {
    for (const std::string& line : describe_plan(plan)) options.progress(line);
  }
  std::vector<model::GgufValue> names, types;
  for (const auto& [name, type] : plan.types) {
    names.push_back(model::GgufValue::make_string(name));
    types.push_back(model::GgufValue::make_string(kernels::type_name(type)));
  }
  std::vector<std::pair<std::string, model::GgufValue>> metadata = {
      {"nibble.quantization.high_precision_tensors",
       model::GgufValue::make_array(model::GgufValueType::STRING, names)},
      {"nibble.quantization.high_precision_types",
       model::GgufValue::make_array(model::GgufValueType::STRING, types)},
      {"nibble.quantization.size_budget",
       model::GgufValue::make_uint(model::GgufValueType::UINT64, static_cast<uint64_t>(plan.budget_bytes))},
      {"nibble.quantization.sensitivity_samples",
       model::GgufValue::make_uint(model::GgufValueType::UINT32,
                                   static_cast<uint64_t>(mixed.sensitivity_samples))},
  };
  if (mixed.budget.bits_per_weight > 0) {
    metadata.emplace_back(
        "nibble.quantization.bits_per_weight_budget",
        model::GgufValue::make_float(model::GgufValueType::FLOAT32, mixed.budget.bits_per_weight));
  }

  CalibratedQuantizeOptions o = options;
  o.pure = true;  // the plan decides the embedding and head
  o.tensor_types = plan.types;
  o.metadata = metadata;
  if (options.method == QuantMethod::gptq) {
    calibrated_quantize_gguf(in, calibration_text, out_path, o);
  } else {
    model::GgufWriter out;
    for (const auto& [key, value] : in->metadata()) out.set(key, value);
    set_calibration_metadata(out, o);  // (rtn here: no act_order key)
    for (const model::GgufTensorInfo& t : in->tensors()) {
      const auto it = plan.types.find(t.name);
      const DType target =
          it != plan.types.end() ? it->second : model::requantized_type(t, options.type, true);
      out.add_tensor_made(t.name, t.dims, target,
                          [&in, &t, target] { return model::convert_tensor(*in, t, target); });
    }
    out.write(out_path);
  }
  const auto written = static_cast<int64_t>(std::filesystem::file_size(out_path));
  if (written > plan.budget_bytes) {
    throw std::logic_error(out_path + " came out at " + std::to_string(written) +
                           " bytes, over the planned " + std::to_string(plan.budget_bytes));
  }
}

}  // namespace nibble::worker
