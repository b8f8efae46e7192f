// Model-file subcommands: tokenize, logits, make-model, quantize, gguf-split.
#include <climits>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cluster/cli/commands.hpp"
#include "cluster/cli/model_session.hpp"
#include "model/gguf.hpp"
#include "model/hf_checkpoint.hpp"
#include "model/hf_to_gguf.hpp"
#include "model/llama_config.hpp"
#include "model/lora_adapter.hpp"
#include "model/random_model.hpp"
#include "model/requantize.hpp"
#include "worker/calibrated_quantize.hpp"
#include "worker/cuda_llama_model.hpp"
#include "worker/gptq_export.hpp"
#include "worker/mixed_precision.hpp"

namespace nibble::cli {

namespace {

kernels::DType parse_matrix_type(const std::string& name) {
  if (name == "q4_0") return kernels::DType::Q4_0;
  if (name == "q4_1") return kernels::DType::Q4_1;
  if (name == "q5_0") return kernels::DType::Q5_0;
  if (name == "q5_1") return kernels::DType::Q5_1;
  if (name == "q2_k") return kernels::DType::Q2_K;
  if (name == "q3_k") return kernels::DType::Q3_K;
  if (name == "q4_k") return kernels::DType::Q4_K;
  if (name == "q5_k") return kernels::DType::Q5_K;
  if (name == "q8_0") return kernels::DType::Q8_0;
  if (name == "f16") return kernels::DType::F16;
  if (name == "f32") return kernels::DType::F32;
  throw std::invalid_argument(
      "unknown --type '" + name +
      "' (expected q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q8_0, f16 or f32; quantize also takes "
      "llama-quantize's mixes q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, iq4_nl, iq4_xs)");
}

// A token file: token ids separated by whitespace. Throws naming the file and the first bad word.
std::vector<int32_t> parse_token_ids(const std::string& text, const std::string& path) {
  std::vector<int32_t> ids;
  std::istringstream words(text);
  for (std::string word; words >> word;) {
    size_t used = 0;
    long long id = -1;
    try {
      id = std::stoll(word, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != word.size() || id < 0 || id > INT32_MAX) {
      throw std::invalid_argument(path + ": token " + std::to_string(ids.size()) + " is '" + word +
                                  "', not a token id");
    }
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

// A file removed when the object goes, also when quantization fails.
struct ScratchFile {
  std::string path;
  ~ScratchFile() {
    std::error_code ignored;
    if (!path.empty()) std::filesystem::remove(path, ignored);
  }
};

// The quantizers read GGUF, so a Hugging Face checkpoint directory is converted to one first (same
// dtypes, GGUF names and RoPE row order), next to the output so that it lands on the output's disk.
std::shared_ptr<const model::GgufFile> open_quantize_input(const std::string& in, const std::string& out,
                                                           bool require_tokenizer, ScratchFile& scratch) {
  if (!model::HfCheckpoint::is_checkpoint_dir(in)) return model::GgufFile::open(in);
  std::string base = out;
  while (base.size() > 1 && base.back() == '/') base.pop_back();  // a --format gptq directory
  scratch.path = base + ".hf-source.gguf";
  model::convert_hf_to_gguf(in, scratch.path, require_tokenizer);
  return model::GgufFile::open(scratch.path);
}

// A GPTQ directory made from an HF checkpoint keeps its tokenizer, so that it takes text as well.
void copy_tokenizer_files(const std::string& hf_dir, const std::string& out_dir) {
  namespace fs = std::filesystem;
  for (const char* name : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}) {
    const fs::path from = fs::path(hf_dir) / name;
    if (fs::exists(from)) fs::copy_file(from, fs::path(out_dir) / name, fs::copy_options::overwrite_existing);
  }
}

}  // namespace

Runner add_tokenize(CLI::App& app) {
  struct Args {
    std::string model_path, text;
    bool no_bos = false, special = false;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--model,-m", a->model_path, "GGUF model or vocabulary file")->required();
  app.add_option("--text", a->text, "Text to tokenize")->required();
  app.add_flag("--no-bos", a->no_bos, "Do not add BOS");
  app.add_flag("--special", a->special,
               "Control tokens' texts in the text (</s>, <|eot_id|>, ...) become those tokens (llama.cpp's "
               "parse_special)");
  return [a]() {
    if (!std::filesystem::exists(a->model_path))
      throw std::runtime_error("model file not found: " + a->model_path);
    auto file = model::GgufFile::open(a->model_path);
    auto tokenizer = model::Tokenizer::from_gguf(*file);
    const auto ids = tokenizer->encode(a->text, !a->no_bos && tokenizer->add_bos_default(), a->special);
    for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
    std::cout << "\n";
    return 0;
  };
}

Runner add_logits(CLI::App& app) {
  struct Args {
    std::string model_path, prompt, tokens, out, device = "cpu";
    int threads = default_threads();
    LoraOption lora;
    KvCacheOption kv_cache;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--model,-m", a->model_path, "GGUF model file or Hugging Face checkpoint directory")
      ->required();
  auto* prompt =
      app.add_option("--prompt,-p", a->prompt, "Prompt text (BOS is added as the vocabulary says)");
  auto* tokens = app.add_option("--tokens", a->tokens,
                                "Token ids instead of text, separated by spaces or commas (no BOS added)");
  prompt->excludes(tokens);
  app.add_option("--out,-o", a->out, "Output file: float32 rows of n_vocab, one per prompt position")
      ->required();
  app.add_option("--threads,-t", a->threads, "CPU threads")->check(CLI::PositiveNumber);
  app.add_option("--device", a->device, "cpu, or cuda (one GPU)")->check(CLI::IsMember({"cpu", "cuda"}));
  add_lora_option(app, a->lora);
  add_kv_cache_option(app, a->kv_cache);
  return [a]() {
    const bool cuda = a->device == "cuda";
    if (cuda) {
      const std::string why = worker::cuda_unavailable_reason();
      if (!why.empty()) throw std::runtime_error("--device cuda: " + why);
    }
    ModelSession s = ModelSession::open(a->model_path, a->threads, /*cpu_model=*/!cuda);
    apply_lora_option(a->lora, s);
    apply_kv_cache_option(a->kv_cache, s);
    std::vector<int32_t> ids;
    if (!a->tokens.empty()) {
      ids = parse_token_list(a->tokens);
    } else if (!a->prompt.empty()) {
      const model::Tokenizer& tokenizer = s.require_tokenizer();
      ids = tokenizer.encode(a->prompt, tokenizer.add_bos_default());
    } else {
      throw std::invalid_argument("pass --prompt or --tokens");
    }
    if (ids.empty()) throw std::invalid_argument("the prompt is empty");
    const int64_t block = 16;
    const int64_t blocks = (static_cast<int64_t>(ids.size()) + block - 1) / block;
    std::vector<int32_t> table(blocks);
    for (int64_t b = 0; b < blocks; ++b) table[b] = static_cast<int32_t>(b);
    std::vector<float> logits;
    const auto batch = worker::ForwardBatch::single(ids, 0, table, true);
    if (cuda) {
      worker::CudaModelOptions gpu_options;
      gpu_options.kv_cache_rotation = !a->kv_cache.no_rotation;
      worker::CudaLlamaModel gpu(s.checkpoint, gpu_options);
      if (!a->lora.path.empty()) {
        gpu.set_lora(1, model::LoraAdapter::read(a->lora.path, gpu.config()), a->lora.scale);
        gpu.set_default_lora(1);
      }
      worker::CudaKvCache cache(gpu.config(), blocks, block, gpu_options.device, a->kv_cache.types());
      gpu.forward(batch, cache, logits);
    } else {
      worker::KvCache cache(s.model->config(), blocks, block, s.model->kv_cache_types());
      s.model->forward(batch, cache, *s.pool, logits);
    }
    std::ofstream out(a->out, std::ios::binary);
    out.write(reinterpret_cast<const char*>(logits.data()),
              static_cast<std::streamsize>(logits.size() * sizeof(float)));
    if (!out) throw std::runtime_error("cannot write " + a->out);
    std::cerr << "wrote " << ids.size() << " rows of " << s.checkpoint->config().n_vocab << " logits to "
              << a->out << "\n";
    return 0;
  };
}

namespace {

// The line a model tool ends with: the file, its size and the run's peak memory (what a 70B model's
// quantization needs of the machine).
void report_written(const std::string& path) {
  std::cerr << "wrote " << path << " (" << std::filesystem::file_size(path)
            << " bytes); peak resident memory " << std::fixed << std::setprecision(1) << peak_resident_mib()
            << " MiB\n";
}

// make-model --rope-scaling: "linear:F" (llama.rope.scaling.factor F), "llama3:F:CTX" (Llama 3.1's
// frequency factors for scaling factor F from an original context of CTX, its low / high frequency
// factors 1 and 4, as rope_freqs.weight) or "yarn:F:CTX" (YaRN's factor F from an original context of CTX).
void apply_rope_scaling(const std::string& spec, model::LlamaShape& shape) {
  const auto bad = [&]() {
    return std::invalid_argument("--rope-scaling " + spec +
                                 ": expected linear:FACTOR, llama3:FACTOR:CONTEXT or yarn:FACTOR:CONTEXT");
  };
  std::vector<std::string> parts;
  for (size_t begin = 0;;) {
    const size_t colon = spec.find(':', begin);
    parts.push_back(spec.substr(begin, colon - begin));
    if (colon == std::string::npos) break;
    begin = colon + 1;
  }
  const auto number = [&](const std::string& text) {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(text, &used);
    } catch (const std::exception&) {
      throw bad();
    }
    if (used != text.size() || !(v >= 1.0) || v > 1e30) throw bad();
    return v;
  };
  if (parts[0] == "linear" && parts.size() == 2) {
    shape.rope_linear_factor = static_cast<float>(number(parts[1]));
  } else if (parts[0] == "llama3" && parts.size() == 3) {
    model::Llama3RopeScaling l3;
    l3.factor = number(parts[1]);
    l3.original_context = number(parts[2]);
    shape.rope_freq_factors = model::llama3_rope_freq_factors(l3, shape.rope_base, shape.head_size());
  } else if (parts[0] == "yarn" && parts.size() == 3) {
    shape.rope_linear_factor = static_cast<float>(number(parts[1]));
    const double context = number(parts[2]);
    if (context != std::floor(context) || context > double{1 << 30}) throw bad();
    shape.rope_yarn_original_context = static_cast<int64_t>(context);
  } else {
    throw bad();
  }
}

}  // namespace

Runner add_make_model(CLI::App& app) {
  struct Args {
    std::string shape = "tiny", type = "q4_0", out, rope_scaling;
    uint64_t seed = 1;
    int64_t vocab = 0, head_dim = 0;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--shape", a->shape, "Named shape: tiny, tiny-h64, small, llama-1b, llama-8b, llama-70b");
  app.add_option("--type", a->type,
                 "Matrix type: q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q8_0, f16, f32 (the K-quants "
                 "need rows of 256: --shape small or larger)");
  app.add_option("--seed", a->seed, "Weight seed");
  app.add_option(
         "--vocab", a->vocab,
         "Vocabulary size instead of the shape's (models of equal size share the synthetic vocabulary, "
         "so a small draft can serve a large target)")
      ->check(CLI::Range(int64_t{354}, int64_t{1} << 20));
  app.add_option("--head-dim", a->head_dim,
                 "Head size instead of the embedding / heads (llama.attention.key_length, as Mistral Nemo's)")
      ->check(CLI::Range(int64_t{2}, int64_t{1024}));
  app.add_option("--rope-scaling", a->rope_scaling,
                 "RoPE scaling: linear:FACTOR (llama.rope.scaling.factor), llama3:FACTOR:CONTEXT (Llama "
                 "3.1's frequency factors from an original context of CONTEXT, as rope_freqs.weight) or "
                 "yarn:FACTOR:CONTEXT (YaRN from an original context of CONTEXT)");
  app.add_option("--out,-o", a->out, "Output GGUF path")->required();
  return [a]() {
    model::LlamaShape shape = model::llama_shape_by_name(a->shape);
    if (a->vocab > 0) shape.n_vocab = a->vocab;
    if (a->head_dim > 0) shape.head_dim = a->head_dim;
    if (!a->rope_scaling.empty()) apply_rope_scaling(a->rope_scaling, shape);
    model::write_random_llama(a->out, shape, parse_matrix_type(a->type), a->seed);
    std::cerr << "wrote " << a->out << " (" << std::filesystem::file_size(a->out) << " bytes)\n";
    return 0;
  };
}

Runner add_quantize(CLI::App& app) {
  struct Args {
    std::string in, out, type = "q4_0", method = "rtn", calib, calib_format = "text", format = "gguf",
                         imatrix;
    int64_t group_size = 128;
    bool pure = false, act_order = false, awq_clip = false;
    int64_t samples = 128, length = 512;
    uint64_t seed = 0;
    double percdamp = 0.01;
    int threads = default_threads();
    std::string size_budget;  // mixed precision (worker/mixed_precision)
    double bits_per_weight = 0;
    int64_t sensitivity_samples = 8;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--model,-m", a->in,
                 "Input GGUF (F32/F16/BF16 or quantized), or a Hugging Face checkpoint directory (converted "
                 "to a scratch GGUF next to the output first; tokenizer.json gives the vocabulary)")
      ->required();
  app.add_option("--out,-o", a->out, "Output GGUF path (--format gptq: a directory)")->required();
  app.add_option("--format", a->format,
                 "gguf (default) or gptq: a GPTQ checkpoint directory (asymmetric INT4, --group-size)")
      ->check(CLI::IsMember({"gguf", "gptq"}));
  app.add_option("--group-size", a->group_size,
                 "--format gptq: inputs sharing a scale and zero (32, 64, 128)");
  app.add_option(
      "--type", a->type,
      "Matrix type: q4_0, q4_1, q5_0, q5_1, q3_k, q4_k, q5_k, q8_0, f16, f32 (gptq / awq: q4_0, q3_k, q4_k "
      "or "
      "q5_k); or one of llama-quantize's mixes, q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, "
      "q5_k_m, "
      "iq4_nl, iq4_xs (llama.cpp's tensor types; rtn: its bytes; gptq: its layer matrices calibrated on "
      "their types' grids, the embedding and head rounded to nearest)");
  app.add_flag("--pure", a->pure, "Quantize every matrix, the embedding and output head included");
  app.add_option("--imatrix", a->imatrix,
                 "rtn: weigh each column's rounding error by an importance matrix (llama.cpp's imatrix GGUF "
                 "or .dat, or `nibble eval imatrix`'s), as llama-quantize --imatrix does");
  app.add_option("--method", a->method, "rtn (round to nearest, default), gptq or awq (need --calib)");
  app.add_option("--calib", a->calib,
                 "Calibration text file (gptq, awq), or token file (--calib-format tokens)");
  app.add_option("--calib-format", a->calib_format, "text, or tokens: whitespace-separated token ids")
      ->check(CLI::IsMember({"text", "tokens"}));
  app.add_option("--calib-samples", a->samples, "Calibration windows")->check(CLI::PositiveNumber);
  app.add_option("--calib-len", a->length, "Tokens per calibration window")->check(CLI::PositiveNumber);
  app.add_option("--seed", a->seed, "Seed for drawing the calibration windows");
  app.add_flag("--act-order", a->act_order, "GPTQ: quantize columns in decreasing Hessian diagonal");
  app.add_flag("--awq-clip", a->awq_clip, "AWQ: also search weight clipping ratios (llm-awq's auto_clip)");
  app.add_option("--percdamp", a->percdamp, "GPTQ: dampening as a fraction of the mean Hessian diagonal")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--threads,-t", a->threads, "CPU threads for the calibration forward passes")
      ->check(CLI::PositiveNumber);
  auto* budget =
      app.add_option("--size-budget", a->size_budget,
                     "Mixed precision: the file at most this size (e.g. 10.2MB); the matrices whose "
                     "4-bit error moves the output most (measured on --calib) stay in Q6_K / Q8_0");
  app.add_option("--bits-per-weight", a->bits_per_weight,
                 "Mixed precision: tensor data at most this many bits per weight")
      ->check(CLI::Range(1.0, 32.0))
      ->excludes(budget);
  app.add_option("--sensitivity-samples", a->sensitivity_samples,
                 "Mixed precision: calibration windows each tensor's sensitivity is measured on")
      ->check(CLI::PositiveNumber);
  return [a]() {
    if (!std::filesystem::exists(a->in)) throw std::runtime_error("model file not found: " + a->in);
    const worker::QuantMethod method = worker::parse_quant_method(a->method);
    const bool gptq_dir = a->format == "gptq";
    const bool mixed = !a->size_budget.empty() || a->bits_per_weight > 0;
    if (gptq_dir && mixed)
      throw std::invalid_argument(
          "--format gptq writes one 4-bit grid: no --size-budget / --bits-per-weight");
    const bool calibrated = method != worker::QuantMethod::rtn || mixed;
    if (!a->imatrix.empty() && (calibrated || gptq_dir)) {
      throw std::invalid_argument(
          "--imatrix weighs round-to-nearest (--method rtn into a GGUF); gptq and awq calibrate on --calib "
          "themselves");
    }
    std::optional<model::ImportanceMatrix> imatrix;
    if (!a->imatrix.empty()) imatrix = model::read_imatrix(a->imatrix);
    // Options are checked before an HF checkpoint is converted, which takes a while for a large one.
    if (calibrated && a->calib.empty())
      throw std::invalid_argument((mixed ? std::string("a size budget") : "--method " + a->method) +
                                  " needs --calib FILE");
    const auto mix = model::parse_llama_cpp_mix(a->type);
    if (mix) {
      if (method == worker::QuantMethod::awq || mixed || gptq_dir || a->pure)
        throw std::invalid_argument(
            "--type " + a->type +
            " is llama-quantize's mix: rtn or gptq into a GGUF only (no --method awq, "
            "size budget, --format gptq or --pure)");
    }
    if (mix && method == worker::QuantMethod::rtn) {
      ScratchFile scratch;
      const auto file = open_quantize_input(a->in, a->out, true, scratch);
      model::requantize_gguf(*file, a->out, *mix, imatrix ? &*imatrix : nullptr);
      report_written(a->out);
      return 0;
    }
    const kernels::DType type = mix ? kernels::DType::Q4_K : parse_matrix_type(a->type);  // a mix: set below
    std::string text;
    std::vector<int32_t> calibration_tokens;
    if (calibrated) {
      std::ifstream text_file(a->calib, std::ios::binary);
      if (!text_file) throw std::runtime_error("cannot read calibration " + a->calib_format + " " + a->calib);
      text.assign(std::istreambuf_iterator<char>(text_file), std::istreambuf_iterator<char>());
      if (a->calib_format == "tokens") {
        calibration_tokens = parse_token_ids(text, a->calib);
        text.clear();
      }
    }
    // Only a GPTQ directory by RTN needs no tokenizer: it holds no vocabulary and reads no text.
    ScratchFile scratch;
    const auto file = open_quantize_input(a->in, a->out, !gptq_dir || calibrated, scratch);
    if (method == worker::QuantMethod::rtn && gptq_dir) {
      worker::CalibratedQuantizeOptions o;
      o.method = method;
      worker::export_gptq_checkpoint(file, "", a->out, model::QuantGrid::int4_asym(a->group_size), o);
    } else if (!calibrated) {
      if (!a->calib.empty()) std::cerr << "note: --calib is not used by --method rtn\n";
      model::requantize_gguf(*file, a->out, type, a->pure, imatrix ? &*imatrix : nullptr);
    } else {
      worker::CalibratedQuantizeOptions o;
      o.method = method;
      o.type = type;
      o.pure = a->pure;
      o.calibration_name = std::filesystem::path(a->calib).filename().string();
      o.calibration_tokens = std::move(calibration_tokens);
      o.samples = a->samples;
      o.length = a->length;
      o.seed = a->seed;
      o.gptq.act_order = a->act_order;
      o.awq.clip = a->awq_clip;
      o.gptq.percdamp = a->percdamp;
      o.threads = a->threads;
      o.progress = [](const std::string& line) { std::cerr << line << std::endl; };
      if (mix) worker::use_llama_cpp_mix(*file, *mix, o);
      std::cerr << a->method << ": " << a->samples << " windows of " << a->length << " tokens from "
                << a->calib << "\n";
      if (gptq_dir) {
        worker::export_gptq_checkpoint(file, text, a->out, model::QuantGrid::int4_asym(a->group_size), o);
      } else if (mixed) {
        worker::MixedPrecisionOptions m;
        if (!a->size_budget.empty()) m.budget.file_bytes = worker::parse_size(a->size_budget);
        m.budget.bits_per_weight = a->bits_per_weight;
        m.sensitivity_samples = a->sensitivity_samples;
        worker::quantize_mixed_precision(file, text, a->out, o, m);
      } else {
        worker::calibrated_quantize_gguf(file, text, a->out, o);
      }
    }
    if (gptq_dir && model::HfCheckpoint::is_checkpoint_dir(a->in)) copy_tokenizer_files(a->in, a->out);
    const std::string written = gptq_dir ? a->out + "/model.safetensors" : a->out;
    report_written(written);
    return 0;
  };
}

Runner add_gguf_split(CLI::App& app) {
  struct Args {
    std::string in, out, max_size;
    int64_t max_tensors = 0;
    bool merge = false, metadata_alone = false;
  };
  auto a = std::make_shared<Args>();
  app.add_flag("--merge", a->merge, "Merge a split model (given by its first file) into one GGUF file");
  auto* tensors = app.add_option("--split-max-tensors", a->max_tensors,
                                 "At most this many tensors a file (llama.cpp's default: 128)")
                      ->check(CLI::PositiveNumber);
  auto* size = app.add_option("--split-max-size", a->max_size,
                              "At most this much tensor data a file: 500M, 2G (decimal, as llama.cpp's "
                              "gguf-split) or 2GiB");
  tensors->excludes(size);
  app.add_flag("--no-tensor-in-metadata", a->metadata_alone,
               "The first file holds the metadata alone (quick to fetch on its own)");
  app.add_option("input", a->in, "GGUF file to split; with --merge, a split model's first file")->required();
  app.add_option("output", a->out,
                 "Split: the output prefix (files PREFIX-00001-of-0000N.gguf); merge: the output file")
      ->required();
  return [a]() {
    if (!std::filesystem::exists(a->in)) throw std::runtime_error("model file not found: " + a->in);
    if (a->merge && (a->max_tensors > 0 || !a->max_size.empty() || a->metadata_alone))
      throw std::invalid_argument(
          "--merge writes one file: no --split-max-tensors / --split-max-size / --no-tensor-in-metadata");
    const auto in = model::GgufFile::open(a->in);  // a split model opens whole
    model::GgufWriter out;
    for (const auto& [key, value] : in->metadata()) out.set(key, value);
    for (const model::GgufTensorInfo& t : in->tensors())
      out.add_tensor_view(t.name, t.dims, t.type, in->tensor_data(t), t.size_bytes);
    if (a->merge) {
      if (std::filesystem::exists(a->out)) throw std::runtime_error(a->out + " exists: not overwriting it");
      out.write(a->out);
      std::cerr << "merged " << in->split_count() << " files into " << a->out << " ("
                << std::filesystem::file_size(a->out) << " bytes)\n";
      return 0;
    }
    model::GgufSplitLimits limits;
    limits.metadata_alone = a->metadata_alone;
    if (!a->max_size.empty()) {
      std::string text = a->max_size;  // gguf-split's 500M / 2G are decimal megabytes / gigabytes
      if (!text.empty() && (text.back() == 'M' || text.back() == 'G')) text += 'B';
      limits.max_bytes = static_cast<uint64_t>(worker::parse_size(text));
    } else {
      limits.max_tensors = a->max_tensors > 0 ? a->max_tensors : 128;
    }
    const std::vector<std::string> paths = out.write_split(a->out, limits);
    for (const std::string& path : paths)
      std::cerr << "wrote " << path << " (" << std::filesystem::file_size(path) << " bytes)\n";
    return 0;
  };
}

}  // namespace nibble::cli
