#include "cluster/config/cluster_config.hpp"

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <map>
#include <sstream>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "model/chat_template.hpp"

namespace nibble::cluster {
namespace {

std::string format_message(const std::string& source, const std::string& key_path, int line,
                           const std::string& detail) {
  std::string message = source + ": ";
  if (!key_path.empty()) message += key_path + ": ";
  message += detail;
  if (line > 0) message += " (line " + std::to_string(line) + ")";
  return message;
}

// One key: value pair of a mapping, with what is needed to point at it in a message.
struct Entry {
  std::string path;  // dotted key path from the top, e.g. "parallel.tensor"
  int line = 0;      // 1-based line of the key (a null value has no useful mark of its own)
  YAML::Node value;
};

// A validated mapping: its keys are all allowed and none repeats.
struct Section {
  std::string path;
  int line = 0;
  std::map<std::string, Entry, std::less<>> entries;

  const Entry* find(std::string_view key) const {
    auto it = entries.find(key);
    return it == entries.end() ? nullptr : &it->second;
  }
};

std::string child_path(const std::string& parent, const std::string& key) {
  return parent.empty() ? key : parent + "." + key;
}

int line_of(const YAML::Node& node) { return node.Mark().line >= 0 ? node.Mark().line + 1 : 0; }

// How a value looks, for "expected X, got Y".
std::string describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Scalar:
      return "'" + node.Scalar() + "'";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a mapping";
    default:
      return "nothing";
  }
}

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::string join(std::initializer_list<std::string_view> names) {
  std::string out;
  for (auto name : names) {
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

bool is_power_of_two(int64_t value) { return value > 0 && (value & (value - 1)) == 0; }

// Turns YAML nodes into checked values; every failure becomes a ConfigError naming the source.
class Reader {
 public:
  explicit Reader(std::string source) : source_(std::move(source)) {}

  [[noreturn]] void fail(const std::string& path, int line, const std::string& detail) const {
    throw ConfigError(source_, path, line, detail);
  }

  // The mapping under `entry`; null (every key commented out) counts as empty.
  Section section(const Entry& entry, std::initializer_list<std::string_view> allowed) const {
    Section section{entry.path, entry.line, {}};
    if (entry.value.IsNull()) return section;
    if (!entry.value.IsMap())
      fail(entry.path, entry.line, "expected a mapping, got " + describe(entry.value));
    for (const auto& pair : entry.value) {
      const int key_line = line_of(pair.first);
      if (!pair.first.IsScalar()) {
        fail(entry.path, key_line, "keys must be plain names, got " + describe(pair.first));
      }
      const std::string key = pair.first.Scalar();
      const std::string path = child_path(entry.path, key);
      if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
        fail(path, key_line, unknown_key_detail(key, allowed));
      }
      // yaml-cpp keeps both pairs of a repeated key, so repeats can be caught here.
      auto [it, inserted] = section.entries.try_emplace(key, Entry{path, key_line, pair.second});
      if (!inserted) {
        fail(path, key_line, "duplicate key (first given on line " + std::to_string(it->second.line) + ")");
      }
    }
    return section;
  }

  const Entry& require(const Section& section, std::string_view key) const {
    if (const Entry* entry = section.find(key)) return *entry;
    const std::string where = section.path.empty() ? "the top level" : "'" + section.path + "'";
    fail(child_path(section.path, std::string(key)), std::max(section.line, 1),
         "required key is missing from " + where);
  }

  template <typename Int>
  Int integer(const Entry& entry, int64_t min, int64_t max,
              const std::string& expected = "an integer") const {
    static_assert(std::is_integral_v<Int>);
    const std::string text = scalar(entry, expected);
    int64_t value = 0;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (error == std::errc::result_out_of_range) fail(entry.path, entry.line, out_of_range(text, min, max));
    if (error != std::errc() || end != text.data() + text.size()) {
      fail(entry.path, entry.line, "expected " + expected + ", got '" + text + "'");
    }
    if (value < min || value > max) fail(entry.path, entry.line, out_of_range(text, min, max));
    return static_cast<Int>(value);
  }

  double real(const Entry& entry) const {
    const std::string text = scalar(entry, "a number");
    double value = 0;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (error != std::errc() || end != text.data() + text.size() || !std::isfinite(value)) {
      fail(entry.path, entry.line, "expected a number, got '" + text + "'");
    }
    return value;
  }

  std::string text(const Entry& entry) const {
    std::string value = scalar(entry, "a string");
    if (value.empty()) fail(entry.path, entry.line, "must not be empty");
    return value;
  }

  // One of a fixed set of words, returned as its index in `choices`.
  size_t choice(const Entry& entry, std::initializer_list<std::string_view> choices) const {
    const std::string value = scalar(entry, "one of " + join(choices));
    const auto it = std::find(choices.begin(), choices.end(), value);
    if (it == choices.end())
      fail(entry.path, entry.line, "expected one of " + join(choices) + ", got '" + value + "'");
    return static_cast<size_t>(it - choices.begin());
  }

 private:
  std::string scalar(const Entry& entry, const std::string& expected) const {
    if (!entry.value.IsScalar())
      fail(entry.path, entry.line, "expected " + expected + ", got " + describe(entry.value));
    return entry.value.Scalar();
  }

  static std::string out_of_range(const std::string& text, int64_t min, int64_t max) {
    if (max == std::numeric_limits<int>::max() || max == std::numeric_limits<int64_t>::max()) {
      return "must be at least " + std::to_string(min) + ", got " + text;
    }
    return "must be between " + std::to_string(min) + " and " + std::to_string(max) + ", got " + text;
  }

  static std::string unknown_key_detail(const std::string& key,
                                        std::initializer_list<std::string_view> allowed) {
    std::string detail = "unknown key '" + key + "'";
    // A close match is almost always a typo; say which key was meant.
    for (auto candidate : allowed) {
      if (edit_distance(key, candidate) <= 2) {
        detail += " (did you mean '" + std::string(candidate) + "'?)";
        break;
      }
    }
    return detail + "; allowed keys: " + join(allowed);
  }

  std::string source_;
};

constexpr int kIntMax = std::numeric_limits<int>::max();
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
// Far beyond any real cluster, and small enough that 1 + tensor * pipeline cannot overflow.
constexpr int kMaxParallel = 4096;

ClusterConfig build_config(const Reader& reader, const Section& top, const std::string& source) {
  ClusterConfig config;
  config.source = source;

  const Section model = reader.section(reader.require(top, "model"), {"path"});
  config.model.path = reader.text(reader.require(model, "path"));

  if (const Entry* entry = top.find("draft")) {
    const Section draft = reader.section(
        *entry, {"method", "path", "max_draft_tokens", "adaptive", "placement", "ngram_min", "ngram_max"});
    DraftConfig& out = config.draft.emplace();
    if (const Entry* e = draft.find("method"))
      out.method = static_cast<DraftMethod>(reader.choice(*e, {"model", "ngram"}));
    if (out.method == DraftMethod::model) {
      out.path = reader.text(reader.require(draft, "path"));
      for (const char* key : {"ngram_min", "ngram_max"})
        if (const Entry* e = draft.find(key)) reader.fail(e->path, e->line, "only with method: ngram");
    } else {
      if (const Entry* e = draft.find("path"))
        reader.fail(e->path, e->line, "method: ngram proposes from the sequence itself: no draft model");
      if (const Entry* e = draft.find("placement"))
        reader.fail(e->path, e->line, "method: ngram has no draft model to place");
      if (const Entry* e = draft.find("ngram_min")) out.ngram_min = reader.integer<int>(*e, 1, 64);
      if (const Entry* e = draft.find("ngram_max")) out.ngram_max = reader.integer<int>(*e, 1, 64);
      if (out.ngram_max < out.ngram_min)
        reader.fail(draft.find("ngram_max") != nullptr ? draft.find("ngram_max")->path : draft.path,
                    draft.find("ngram_max") != nullptr ? draft.find("ngram_max")->line : draft.line,
                    "ngram_max " + std::to_string(out.ngram_max) + " is below ngram_min " +
                        std::to_string(out.ngram_min));
    }
    if (const Entry* e = draft.find("max_draft_tokens"))
      out.max_draft_tokens = reader.integer<int>(*e, 1, 16);
    if (const Entry* e = draft.find("adaptive")) out.adaptive = reader.choice(*e, {"false", "true"}) == 1;
    if (const Entry* e = draft.find("placement")) {
      out.placement = static_cast<DraftPlacement>(reader.choice(*e, {"last_stage", "own_rank"}));
    }
  }

  if (const Entry* entry = top.find("lora_adapters")) {
    if (!entry->value.IsSequence() && !entry->value.IsNull())
      reader.fail(entry->path, entry->line, "expected a list of adapters, got " + describe(entry->value));
    size_t index = 0;
    for (const YAML::Node& item : entry->value) {
      const Entry element{entry->path + "[" + std::to_string(index++) + "]", line_of(item), item};
      const Section adapter = reader.section(element, {"name", "path", "scale"});
      LoraAdapterConfig out;
      const Entry& name = reader.require(adapter, "name");
      out.name = reader.text(name);
      out.path = reader.text(reader.require(adapter, "path"));
      if (const Entry* e = adapter.find("scale")) out.scale = reader.real(*e);
      for (const LoraAdapterConfig& earlier : config.lora_adapters) {
        if (earlier.name == out.name)
          reader.fail(name.path, name.line, "adapter '" + out.name + "' is named twice");
      }
      config.lora_adapters.push_back(std::move(out));
    }
  }

  if (const Entry* entry = top.find("parallel")) {
    const Section parallel = reader.section(*entry, {"tensor", "pipeline", "micro_batches"});
    if (const Entry* e = parallel.find("tensor"))
      config.parallel.tensor = reader.integer<int>(*e, 1, kMaxParallel);
    if (const Entry* e = parallel.find("pipeline")) {
      config.parallel.pipeline = reader.integer<int>(*e, 1, kMaxParallel);
    }
    config.parallel.micro_batches = config.parallel.pipeline;
    if (const Entry* e = parallel.find("micro_batches")) {
      config.parallel.micro_batches = reader.integer<int>(*e, 1, kIntMax);
    }
    if (config.num_workers() > kMaxParallel) {
      reader.fail(parallel.path, parallel.line,
                  "tensor * pipeline = " + std::to_string(config.num_workers()) + " workers, more than " +
                      std::to_string(kMaxParallel));
    }
  }

  if (const Entry* e = top.find("device"))
    config.device = static_cast<Device>(reader.choice(*e, {"cpu", "cuda"}));
  if (const Entry* e = top.find("int4_kernels")) {
    config.int4_kernels =
        static_cast<Int4KernelChoice>(reader.choice(*e, {"measured", "cuda_cores", "tensor_cores", "half2"}));
  }
  if (const Entry* e = top.find("int4_layout")) {
    config.int4_layout =
        static_cast<Int4LayoutChoice>(reader.choice(*e, {"rows", "tiles", "cutlass", "measured"}));
    // cuda_cores and half2 read the rows only.
    const bool rows_only =
        config.int4_kernels == Int4KernelChoice::cuda_cores || config.int4_kernels == Int4KernelChoice::half2;
    if (config.int4_layout == Int4LayoutChoice::tiles && rows_only) {
      reader.fail(e->path, e->line,
                  std::string("tiles cannot be read by int4_kernels: ") +
                      int4_kernel_choice_name(config.int4_kernels) +
                      " (only the tensor-core kernels read tiles); use rows, or int4_kernels: measured or "
                      "tensor_cores");
    }
    if (config.int4_layout == Int4LayoutChoice::cutlass && rows_only) {
      reader.fail(e->path, e->line,
                  std::string("cutlass cannot be read by int4_kernels: ") +
                      int4_kernel_choice_name(config.int4_kernels) +
                      " (only CUTLASS's GEMM reads it); use rows, or int4_kernels: measured or tensor_cores");
    }
    if (config.int4_layout == Int4LayoutChoice::measured &&
        config.int4_kernels != Int4KernelChoice::measured) {
      reader.fail(
          e->path, e->line,
          std::string("measured times each layout's kernels at load: it needs int4_kernels: measured, "
                      "not ") +
              int4_kernel_choice_name(config.int4_kernels));
    }
  }

  if (const Entry* e = top.find("cutlass_gemm")) {
    config.cutlass_gemm = reader.choice(*e, {"false", "true"}) == 1;
    if (config.cutlass_gemm && config.int4_kernels == Int4KernelChoice::cuda_cores) {
      reader.fail(
          e->path, e->line,
          "true cannot go with int4_kernels: cuda_cores (which pins every product to the CUDA cores); "
          "use measured, tensor_cores or half2");
    }
    if (config.cutlass_gemm && config.int4_layout == Int4LayoutChoice::measured) {
      reader.fail(
          e->path, e->line,
          "true cannot go with int4_layout: measured (which weighs the CUTLASS copy itself and keeps one "
          "copy of each matrix); use int4_layout: rows or tiles with it");
    }
  }

  if (const Entry* e = top.find("int8_activations")) {
    config.int8_activations = reader.choice(*e, {"false", "true"}) == 1;
    if (config.int8_activations && config.int4_layout != Int4LayoutChoice::rows) {
      reader.fail(e->path, e->line,
                  std::string("true cannot go with int4_layout: ") +
                      int4_layout_choice_name(config.int4_layout) +
                      " (the W4A8 GEMV reads the row-major layout); use int4_layout: rows");
    }
  }

  if (const Entry* e = top.find("cuda_graphs"))
    config.cuda_graphs = reader.choice(*e, {"false", "true"}) == 1;
  if (const Entry* e = top.find("prefill_attention"))
    config.tensor_core_prefill_attention = reader.choice(*e, {"cuda_cores", "tensor_cores"}) == 1;
  if (const Entry* e = top.find("decode_split_tokens")) {
    config.decode_split_tokens = reader.integer<int>(*e, 32, kIntMax, "a multiple of 32");
    if (config.decode_split_tokens % 32 != 0) {
      reader.fail(e->path, e->line,
                  std::to_string(config.decode_split_tokens) +
                      " is not a multiple of 32 (the decode attention's tile of positions)");
    }
  }

  if (const Entry* e = top.find("threads")) {
    const bool automatic = e->value.IsScalar() && e->value.Scalar() == "auto";
    config.threads = automatic ? 0 : reader.integer<int>(*e, 1, kIntMax, "an integer or 'auto'");
  }

  if (const Entry* e = top.find("chat_template")) {
    config.chat_template = reader.text(*e);
    if (config.chat_template != "auto" && !model::chat_format_by_name(config.chat_template)) {
      reader.fail(
          e->path, e->line,
          "unknown chat format '" + config.chat_template + "' (auto, " + model::chat_format_names() + ")");
    }
  }

  if (const Entry* entry = top.find("server")) {
    const Section server = reader.section(
        *entry, {"listen", "max_queue", "max_message_bytes", "step_timeout_ms", "lora_updates"});
    if (const Entry* e = server.find("listen")) {
      config.server.listen = reader.text(*e);
      const std::string_view listen = config.server.listen;
      const bool tcp = listen.starts_with("tcp://") && listen.size() > 6;
      const bool ipc = listen.starts_with("ipc://") && listen.size() > 6;
      if (!tcp && !ipc) {
        reader.fail(e->path, e->line,
                    "expected a tcp://HOST:PORT or ipc://PATH endpoint, got '" + config.server.listen + "'");
      }
      if (tcp && listen.find(':', 6) == std::string_view::npos) {
        reader.fail(e->path, e->line, "a tcp:// endpoint needs a port, got '" + config.server.listen + "'");
      }
    }
    if (const Entry* e = server.find("max_queue"))
      config.server.max_queue = reader.integer<int>(*e, 1, kIntMax);
    if (const Entry* e = server.find("step_timeout_ms"))
      config.server.step_timeout_ms = reader.integer<int>(*e, 100, kIntMax);
    if (const Entry* e = server.find("lora_updates"))
      config.server.lora_updates = reader.choice(*e, {"false", "true"}) == 1;
    if (const Entry* e = server.find("max_message_bytes")) {
      config.server.max_message_bytes = reader.integer<int64_t>(*e, 1, kInt64Max);
    }
  }

  if (const Entry* entry = top.find("openai")) {
    const Section openai =
        reader.section(*entry, {"listen", "model_name", "threads", "chat_max_tokens", "api_key_env"});
    OpenAiConfig o;
    if (const Entry* e = openai.find("listen")) {
      const std::string listen = reader.text(*e);
      const size_t colon = listen.rfind(':');
      const std::string port = colon == std::string::npos ? "" : listen.substr(colon + 1);
      const bool digits = !port.empty() && port.size() <= 5 &&
                          std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; });
      if (colon == 0 || colon == std::string::npos || !digits || std::stoi(port) > 65535 ||
          listen.find("://") != std::string::npos) {
        reader.fail(e->path, e->line, "expected HOST:PORT (port 0-65535, no scheme), got '" + listen + "'");
      }
      o.host = listen.substr(0, colon);
      o.port = std::stoi(port);
    }
    if (const Entry* e = openai.find("model_name")) o.model_name = reader.text(*e);
    if (const Entry* e = openai.find("api_key_env")) o.api_key_env = reader.text(*e);
    if (const Entry* e = openai.find("threads")) o.threads = reader.integer<int>(*e, 1, 1024);
    if (const Entry* e = openai.find("chat_max_tokens"))
      o.chat_max_tokens = reader.integer<int>(*e, 1, kIntMax);
    config.openai = o;
  }

  if (const Entry* entry = top.find("scheduler")) {
    const Section scheduler = reader.section(*entry, {"max_batch_tokens", "max_running", "prefill_chunk"});
    if (const Entry* e = scheduler.find("max_batch_tokens")) {
      config.scheduler.max_batch_tokens = reader.integer<int>(*e, 1, kIntMax);
    }
    if (const Entry* e = scheduler.find("max_running")) {
      config.scheduler.max_running = reader.integer<int>(*e, 1, kIntMax);
    }
    if (const Entry* e = scheduler.find("prefill_chunk")) {
      config.scheduler.prefill_chunk = reader.integer<int>(*e, 1, kIntMax);
    }
    // A chunk larger than the step budget could never be scheduled.
    if (config.scheduler.prefill_chunk > config.scheduler.max_batch_tokens) {
      const Entry* e = scheduler.find("prefill_chunk");
      if (e == nullptr) e = scheduler.find("max_batch_tokens");
      reader.fail(e->path, e->line,
                  "prefill_chunk (" + std::to_string(config.scheduler.prefill_chunk) +
                      ") must not exceed max_batch_tokens (" +
                      std::to_string(config.scheduler.max_batch_tokens) + ")");
    }
  }

  if (const Entry* e = top.find("context")) config.context = reader.integer<int>(*e, 1, kIntMax);

  if (const Entry* entry = top.find("kv_cache")) {
    const Section kv = reader.section(*entry, {"block_size", "memory_fraction", "num_blocks",
                                               "prefix_caching", "dtype", "k_dtype", "v_dtype", "rotation"});
    if (const Entry* e = kv.find("prefix_caching"))
      config.kv_cache.prefix_caching = reader.choice(*e, {"false", "true"}) == 1;
    if (const Entry* e = kv.find("rotation"))
      config.kv_cache.rotation = reader.choice(*e, {"false", "true"}) == 1;
    // dtype for both sides, k_dtype / v_dtype for one (llama.cpp's --cache-type-k / -v).
    for (const auto& [key, value] :
         {std::pair{"dtype", &config.kv_cache.dtype}, std::pair{"k_dtype", &config.kv_cache.k_dtype},
          std::pair{"v_dtype", &config.kv_cache.v_dtype}}) {
      const Entry* e = kv.find(key);
      if (e == nullptr) continue;
      static constexpr std::string_view kTypes[] = {"f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"};
      *value = std::string(kTypes[reader.choice(
          *e, {kTypes[0], kTypes[1], kTypes[2], kTypes[3], kTypes[4], kTypes[5], kTypes[6]})]);
    }
    if (const Entry* e = kv.find("block_size")) {
      config.kv_cache.block_size = reader.integer<int>(*e, 1, 1 << 16);
      if (!is_power_of_two(config.kv_cache.block_size)) {
        reader.fail(e->path, e->line,
                    "must be a power of two, got " + std::to_string(config.kv_cache.block_size));
      }
    }
    if (const Entry* e = kv.find("memory_fraction")) {
      config.kv_cache.memory_fraction = reader.real(*e);
      if (!(config.kv_cache.memory_fraction > 0.0 && config.kv_cache.memory_fraction <= 1.0)) {
        reader.fail(e->path, e->line, "must be in (0, 1], got " + e->value.Scalar());
      }
    }
    if (const Entry* e = kv.find("num_blocks")) {
      config.kv_cache.num_blocks = reader.integer<int64_t>(*e, 0, kInt64Max / (1 << 16));
      // An explicit pool too small for one full-length sequence would stall at the first long prompt.
      const int64_t capacity = config.kv_cache.num_blocks * config.kv_cache.block_size;
      if (config.kv_cache.num_blocks > 0 && capacity < config.context) {
        reader.fail(e->path, e->line,
                    std::to_string(config.kv_cache.num_blocks) + " blocks of " +
                        std::to_string(config.kv_cache.block_size) + " tokens hold " +
                        std::to_string(capacity) + " tokens, fewer than context (" +
                        std::to_string(config.context) + ")");
      }
    }
  }
  return config;
}

}  // namespace

ConfigError::ConfigError(std::string source, std::string key_path, int line, const std::string& detail)
    : std::runtime_error(format_message(source, key_path, line, detail)),
      source_(std::move(source)),
      key_path_(std::move(key_path)),
      line_(line) {}

const char* device_name(Device device) { return device == Device::cuda ? "cuda" : "cpu"; }

const char* int4_kernel_choice_name(Int4KernelChoice choice) {
  switch (choice) {
    case Int4KernelChoice::cuda_cores:
      return "cuda_cores";
    case Int4KernelChoice::tensor_cores:
      return "tensor_cores";
    case Int4KernelChoice::half2:
      return "half2";
    case Int4KernelChoice::measured:
      break;
  }
  return "measured";
}

const char* int4_layout_choice_name(Int4LayoutChoice choice) {
  switch (choice) {
    case Int4LayoutChoice::rows:
      return "rows";
    case Int4LayoutChoice::tiles:
      return "tiles";
    case Int4LayoutChoice::cutlass:
      return "cutlass";
    case Int4LayoutChoice::measured:
      return "measured";
  }
  return "rows";
}

const char* draft_placement_name(DraftPlacement placement) {
  return placement == DraftPlacement::own_rank ? "own_rank" : "last_stage";
}

int ClusterConfig::worker_threads(int host_cores, int workers_on_host) const {
  if (threads > 0) return threads;
  return std::max(1, host_cores / std::max(1, workers_on_host));
}

bool ClusterConfig::operator==(const ClusterConfig& other) const {
  return model == other.model && draft == other.draft && parallel == other.parallel &&
         device == other.device && int4_kernels == other.int4_kernels && int4_layout == other.int4_layout &&
         cutlass_gemm == other.cutlass_gemm && int8_activations == other.int8_activations &&
         cuda_graphs == other.cuda_graphs &&
         tensor_core_prefill_attention == other.tensor_core_prefill_attention &&
         decode_split_tokens == other.decode_split_tokens && threads == other.threads &&
         chat_template == other.chat_template && server == other.server && scheduler == other.scheduler &&
         kv_cache == other.kv_cache && context == other.context && lora_adapters == other.lora_adapters;
}

// YAML text is Unicode in UTF-8, of printable characters only (YAML 1.2, 5.1: tab, line breaks and
// no other C0 or C1 control). yaml-cpp reads whatever bytes come, so a binary file given as the
// config (a .gguf, say) or a stray control byte would otherwise surface as odd keys or values.
namespace {
void check_yaml_text(std::string_view text, const Reader& reader) {
  int line = 1;
  size_t line_start = 0;
  for (size_t i = 0; i < text.size();) {
    const auto lead = static_cast<unsigned char>(text[i]);
    const size_t length = lead < 0x80           ? 1
                          : (lead >> 5) == 0x6  ? 2
                          : (lead >> 4) == 0xe  ? 3
                          : (lead >> 3) == 0x1e ? 4
                                                : 0;
    uint32_t code = length == 1   ? lead
                    : length == 2 ? lead & 0x1fu
                    : length == 3 ? lead & 0x0fu
                                  : lead & 0x07u;
    bool valid = length != 0 && i + length <= text.size();
    for (size_t k = 1; valid && k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      valid = (next >> 6) == 0x2;
      code = (code << 6) | (next & 0x3fu);
    }
    static constexpr uint32_t kSmallest[] = {0, 0, 0x80, 0x800, 0x10000};  // shorter forms are overlong
    valid = valid && code >= kSmallest[length] && code <= 0x10ffff && (code < 0xd800 || code > 0xdfff);
    const std::string where =
        " at line " + std::to_string(line) + ", column " + std::to_string(i - line_start + 1);
    if (!valid) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02x", lead);
      reader.fail("", line,
                  "byte " + std::string(hex) + where + " is not UTF-8: a configuration is UTF-8 YAML text");
    }
    const bool printable = code == '\t' || code == '\n' || code == '\r' ||
                           (code >= 0x20 && code != 0x7f && (code < 0x80 || code > 0x9f || code == 0x85));
    if (!printable) {
      char hex[16];
      std::snprintf(hex, sizeof hex, "U+%04X", static_cast<unsigned>(code));
      reader.fail("", line, "control character " + std::string(hex) + where + " is not allowed in YAML text");
    }
    if (code == '\n') {
      ++line;
      line_start = i + 1;
    }
    i += length;
  }
}

// yaml-cpp 0.7 (Debian 12's) never returns from LoadAll on some malformed streams: a lone ',' reads
// as an endless run of empty documents, each one allocated (jbeder/yaml-cpp#1040, fixed upstream by
// stopping at the first empty document; fuzzing found it here). The documents are counted here with
// that fix, up to the second, and the one document is then read by YAML::Load.
class DocumentCounter : public YAML::EventHandler {
 public:
  void OnDocumentStart(const YAML::Mark&) override {
    depth_ = 0;
    root_is_null = false;
  }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark& mark, YAML::anchor_t) override {
    if (depth_ == 0) root_is_null = true;
    at_node(mark);
  }
  void OnAlias(const YAML::Mark& mark, YAML::anchor_t) override { at_node(mark); }
  void OnScalar(const YAML::Mark& mark, const std::string&, YAML::anchor_t, const std::string&) override {
    at_node(mark);
  }
  void OnSequenceStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {
    at_node(mark);
    ++depth_;
  }
  void OnSequenceEnd() override { --depth_; }
  void OnMapStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t,
                  YAML::EmitterStyle::value) override {
    at_node(mark);
    ++depth_;
  }
  void OnMapEnd() override { --depth_; }

  int root_line = 0;  // the line of the document's root node
  bool root_is_null = false;

 private:
  void at_node(const YAML::Mark& mark) {
    if (depth_ == 0) root_line = mark.line + 1;
  }
  int depth_ = 0;
};

struct DocumentCount {
  int documents = 0;    // before the first empty one, at most 2
  int second_line = 0;  // where the second starts
};

// The first line that is not blank, a comment or a document marker, and its number (0 for none).
std::pair<int, std::string> first_content_line(const std::string& text) {
  std::istringstream lines(text);
  std::string line;
  for (int number = 1; std::getline(lines, line); ++number) {
    const size_t begin = line.find_first_not_of(" \t\r");
    if (begin == std::string::npos || line[begin] == '#') continue;
    const std::string content = line.substr(begin, line.find_last_not_of(" \t\r") + 1 - begin);
    if (content == "---" || content == "..." || content[0] == '%') continue;
    return {number, content};
  }
  return {0, {}};
}

DocumentCount count_documents(const std::string& text) {
  std::istringstream stream(text);
  YAML::Parser parser(stream);
  DocumentCounter counter;
  DocumentCount count;
  while (count.documents < 2 && parser.HandleNextDocument(counter) && !counter.root_is_null) {
    if (++count.documents == 2) count.second_line = counter.root_line;
  }
  return count;
}
}  // namespace

ClusterConfig parse_cluster_config(const std::string& yaml_text, const std::string& source_name) {
  const Reader reader(source_name);
  check_yaml_text(yaml_text, reader);
  YAML::Node root;
  try {
    const DocumentCount count = count_documents(yaml_text);
    if (count.documents == 0) {
      // No document, yet maybe text: yaml-cpp reads a stray ',' before any key as an empty document.
      const auto [line, text] = first_content_line(yaml_text);
      if (line == 0) reader.fail("", 1, "the configuration is empty (model.path at least is required)");
      reader.fail("", line,
                  "YAML syntax error: no document could be read, yet the line holds '" + text + "'");
    }
    if (count.documents > 1) reader.fail("", count.second_line, "expected one YAML document, found another");
    root = YAML::Load(yaml_text);  // reads the first document only
  } catch (const YAML::ParserException& error) {
    reader.fail("", error.mark.line + 1,
                "YAML syntax error: " + error.msg + " at column " + std::to_string(error.mark.column + 1));
  } catch (const YAML::Exception& error) {
    reader.fail("", error.mark.line + 1, std::string("YAML error: ") + error.msg);
  }
  if (!root.IsMap())
    reader.fail("", line_of(root), "expected a mapping of keys at the top level, got " + describe(root));

  const Section top = reader.section(
      Entry{"", 1, root},
      {"model", "draft", "parallel", "device", "int4_kernels", "int4_layout", "cutlass_gemm",
       "int8_activations", "cuda_graphs", "prefill_attention", "decode_split_tokens", "threads",
       "chat_template", "server", "scheduler", "kv_cache", "context", "openai", "lora_adapters"});
  return build_config(reader, top, source_name);
}

ClusterConfig load_cluster_config(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw ConfigError(path, "", 0, "cannot open the configuration file");
  std::ostringstream text;
  text << file.rdbuf();
  if (file.bad()) throw ConfigError(path, "", 0, "cannot read the configuration file");

  ClusterConfig config = parse_cluster_config(text.str(), path);
  // Model paths are relative to the config file, not to wherever mpirun happened to be started.
  const std::filesystem::path folder = std::filesystem::path(path).parent_path();
  auto resolve = [&folder](std::string& model_path) {
    if (model_path.rfind("dummy:", 0) == 0) return;  // a dummy model (model/llama_checkpoint.hpp), no file
    const std::filesystem::path model(model_path);
    if (model.is_relative()) model_path = (folder / model).lexically_normal().string();
  };
  resolve(config.model.path);
  if (config.draft && config.draft->method == DraftMethod::model) resolve(config.draft->path);
  for (LoraAdapterConfig& adapter : config.lora_adapters) resolve(adapter.path);
  return config;
}

std::string render_cluster_config(const ClusterConfig& config) {
  // Free-form strings (paths, the endpoint) are written double-quoted: yaml-cpp writes some plain
  // scalars it then reads back differently (fuzzing found "a    [" followed by carriage returns).
  YAML::Emitter out;
  out << YAML::Comment("effective configuration" + (config.source.empty() ? "" : " from " + config.source));
  out << YAML::BeginMap;
  out << YAML::Key << "model" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "path" << YAML::Value << YAML::DoubleQuoted << config.model.path;
  out << YAML::EndMap;
  if (config.draft) {
    out << YAML::Key << "draft" << YAML::Value << YAML::BeginMap;
    if (config.draft->method == DraftMethod::ngram) {
      out << YAML::Key << "method" << YAML::Value << "ngram";
      out << YAML::Key << "ngram_min" << YAML::Value << config.draft->ngram_min;
      out << YAML::Key << "ngram_max" << YAML::Value << config.draft->ngram_max;
    } else {
      out << YAML::Key << "path" << YAML::Value << YAML::DoubleQuoted << config.draft->path;
      out << YAML::Key << "placement" << YAML::Value << draft_placement_name(config.draft->placement);
    }
    out << YAML::Key << "max_draft_tokens" << YAML::Value << config.draft->max_draft_tokens;
    out << YAML::Key << "adaptive" << YAML::Value << config.draft->adaptive;
    out << YAML::EndMap;
  }
  if (!config.lora_adapters.empty()) {
    out << YAML::Key << "lora_adapters" << YAML::Value << YAML::BeginSeq;
    for (const LoraAdapterConfig& adapter : config.lora_adapters) {
      char scale[32];
      const auto written = std::to_chars(scale, scale + sizeof(scale), adapter.scale);
      out << YAML::BeginMap << YAML::Key << "name" << YAML::Value << YAML::DoubleQuoted << adapter.name;
      out << YAML::Key << "path" << YAML::Value << YAML::DoubleQuoted << adapter.path;
      out << YAML::Key << "scale" << YAML::Value << std::string(scale, written.ptr) << YAML::EndMap;
    }
    out << YAML::EndSeq;
  }
  out << YAML::Key << "parallel" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "tensor" << YAML::Value << config.parallel.tensor;
  out << YAML::Key << "pipeline" << YAML::Value << config.parallel.pipeline;
  out << YAML::Key << "micro_batches" << YAML::Value << config.parallel.micro_batches;
  out << YAML::EndMap;
  out << YAML::Key << "device" << YAML::Value << device_name(config.device);
  out << YAML::Key << "int4_kernels" << YAML::Value << int4_kernel_choice_name(config.int4_kernels);
  out << YAML::Key << "int4_layout" << YAML::Value << int4_layout_choice_name(config.int4_layout);
  out << YAML::Key << "cutlass_gemm" << YAML::Value << config.cutlass_gemm;
  out << YAML::Key << "int8_activations" << YAML::Value << config.int8_activations;
  out << YAML::Key << "cuda_graphs" << YAML::Value << config.cuda_graphs;
  out << YAML::Key << "prefill_attention" << YAML::Value
      << (config.tensor_core_prefill_attention ? "tensor_cores" : "cuda_cores");
  out << YAML::Key << "decode_split_tokens" << YAML::Value << config.decode_split_tokens;
  out << YAML::Key << "threads" << YAML::Value;
  if (config.threads > 0) {
    out << config.threads;
  } else {
    out << "auto";
  }
  out << YAML::Key << "chat_template" << YAML::Value << config.chat_template;
  out << YAML::Key << "server" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "listen" << YAML::Value << YAML::DoubleQuoted << config.server.listen;
  out << YAML::Key << "max_queue" << YAML::Value << config.server.max_queue;
  out << YAML::Key << "max_message_bytes" << YAML::Value << config.server.max_message_bytes;
  out << YAML::Key << "step_timeout_ms" << YAML::Value << config.server.step_timeout_ms;
  out << YAML::Key << "lora_updates" << YAML::Value << config.server.lora_updates;
  out << YAML::EndMap;
  out << YAML::Key << "scheduler" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "max_batch_tokens" << YAML::Value << config.scheduler.max_batch_tokens;
  out << YAML::Key << "max_running" << YAML::Value << config.scheduler.max_running;
  out << YAML::Key << "prefill_chunk" << YAML::Value << config.scheduler.prefill_chunk;
  out << YAML::EndMap;
  out << YAML::Key << "kv_cache" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "block_size" << YAML::Value << config.kv_cache.block_size;
  // Shortest text that reads back as the same double.
  char fraction[32];
  const auto written = std::to_chars(fraction, fraction + sizeof(fraction), config.kv_cache.memory_fraction);
  out << YAML::Key << "memory_fraction" << YAML::Value << std::string(fraction, written.ptr);
  out << YAML::Key << "num_blocks" << YAML::Value << config.kv_cache.num_blocks;
  out << YAML::Key << "prefix_caching" << YAML::Value << config.kv_cache.prefix_caching;
  out << YAML::Key << "dtype" << YAML::Value << config.kv_cache.dtype;
  if (!config.kv_cache.k_dtype.empty())
    out << YAML::Key << "k_dtype" << YAML::Value << config.kv_cache.k_dtype;
  if (!config.kv_cache.v_dtype.empty())
    out << YAML::Key << "v_dtype" << YAML::Value << config.kv_cache.v_dtype;
  out << YAML::Key << "rotation" << YAML::Value << config.kv_cache.rotation;
  out << YAML::EndMap;
  out << YAML::Key << "context" << YAML::Value << config.context;
  if (config.openai) {
    out << YAML::Key << "openai" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "listen" << YAML::Value << YAML::DoubleQuoted
        << config.openai->host + ":" + std::to_string(config.openai->port);
    // Empty is the default (the model file's name), which the key cannot spell.
    if (!config.openai->model_name.empty())
      out << YAML::Key << "model_name" << YAML::Value << YAML::DoubleQuoted << config.openai->model_name;
    out << YAML::Key << "threads" << YAML::Value << config.openai->threads;
    out << YAML::Key << "chat_max_tokens" << YAML::Value << config.openai->chat_max_tokens;
    if (!config.openai->api_key_env.empty())
      out << YAML::Key << "api_key_env" << YAML::Value << YAML::DoubleQuoted << config.openai->api_key_env;
    out << YAML::EndMap;
  }
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

}  // namespace nibble::cluster
