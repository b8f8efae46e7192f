#include "tests/fuzz/fuzz_targets.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <variant>

#include "cluster/config/cluster_config.hpp"
#include "cluster/openai_api.hpp"
#include "cluster/protocol/client_protocol.hpp"
#include "cluster/protocol/worker_protocol.hpp"
#include "kernels/thread_pool.hpp"
#include "model/gguf.hpp"
#include "model/hf_checkpoint.hpp"
#include "model/hf_tokenizer.hpp"
#include "model/imatrix.hpp"
#include "model/llama_config.hpp"
#include "model/lora_adapter.hpp"
#include "model/random_model.hpp"
#include "model/requantize.hpp"
#include "model/safetensors.hpp"
#include "model/tokenizer.hpp"
#include "model/tool_calls.hpp"
#include "model/unicode_utf8.hpp"
#include "tests/support/test_support.hpp"
#include "worker/gbnf_grammar.hpp"
#include "worker/generator.hpp"
#include "worker/json_constraint.hpp"
#include "worker/json_schema.hpp"
#include "worker/json_schema_grammar.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"

namespace nibble::fuzz {
namespace {

namespace fs = std::filesystem;

void require(bool holds, const std::string& what) {
  if (!holds) throw PropertyBroken(what);
}

std::vector<uint8_t> bytes_of(std::string_view text) { return {text.begin(), text.end()}; }

std::vector<uint8_t> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The readers take a path (they map the file): the input goes into an anonymous in-memory file,
// named through /proc, so that fuzzing does not wear the disk.
class InputFile {
 public:
  InputFile() : fd_(memfd_create("nibble-fuzz-input", 0)) {
    if (fd_ < 0) throw std::runtime_error("memfd_create failed");
  }
  ~InputFile() { close(fd_); }
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;

  std::string write(std::span<const uint8_t> input) {
    if (ftruncate(fd_, 0) != 0 ||
        pwrite(fd_, input.data(), input.size(), 0) != static_cast<ssize_t>(input.size())) {
      throw std::runtime_error("writing the fuzz input failed");
    }
    return "/proc/self/fd/" + std::to_string(fd_);
  }

 private:
  int fd_;
};

InputFile& input_file() {
  static InputFile file;
  return file;
}

// A folder for readers that want one (an HF tokenizer); removed at exit.
const test::TempDir& scratch_dir() {
  static const test::TempDir dir;
  return dir;
}

// ------------------------------------------------------------------ GGUF model

// A model that loads must run; one that cannot be loaded or run as described is refused by name.
Outcome load_and_run(const std::string& path) {
  std::unique_ptr<worker::LlamaModel> model;
  std::shared_ptr<const model::Tokenizer> tokenizer;
  try {
    model = worker::LlamaModel::load(path);
    tokenizer = model::Tokenizer::from_gguf(model->file());
  } catch (const model::GgufError& e) {
    return {false, e.what()};
  } catch (const std::invalid_argument& e) {  // a model that cannot be run as described
    return {false, e.what()};
  }
  // A model that loads must run: a short prompt and two greedy tokens.
  static kernels::ThreadPool pool(1);
  std::vector<int32_t> prompt = tokenizer->encode("Hello world", tokenizer->add_bos_default());
  if (prompt.empty()) prompt.push_back(0);
  for (const int32_t id : prompt) require(id >= 0 && id < tokenizer->n_vocab(), "prompt token out of range");
  const int64_t trained = model->config().n_ctx_train;
  const int64_t context = trained > 0 ? std::min<int64_t>(trained, 64) : 64;
  try {
    worker::Generator generator(*model, *tokenizer, pool, context);
    worker::GenerateOptions options;
    options.max_tokens = 2;
    options.ignore_eos = true;
    const worker::GenerateResult result = generator.generate(prompt, options);
    for (const int32_t id : result.tokens) {
      require(id >= 0 && id < model->config().n_vocab, "generated token out of the vocabulary");
    }
  } catch (const std::invalid_argument& e) {  // e.g. the prompt does not fit a tiny n_ctx
    return {false, e.what()};
  }
  return {true, {}};
}

Outcome run_gguf_model(std::span<const uint8_t> input) { return load_and_run(input_file().write(input)); }

std::vector<std::vector<uint8_t>> gguf_model_seeds() {
  // The smallest models write_random_llama makes, in each matrix type it writes.
  const model::LlamaShape shape{
      .n_embd = 32, .n_layer = 1, .n_head = 2, .n_head_kv = 1, .n_ff = 64, .n_vocab = 360, .n_ctx = 64};
  std::vector<std::vector<uint8_t>> seeds;
  const fs::path path = scratch_dir().path() / "seed.gguf";
  for (const kernels::DType type : {kernels::DType::Q4_0, kernels::DType::Q8_0, kernels::DType::F16}) {
    model::write_random_llama(path.string(), shape, type, 7);
    seeds.push_back(read_bytes(path));
  }
  // With RoPE scaling (Llama 3.1's rope_freqs.weight and a linear factor) and heads of another size than
  // n_embd / n_head (attention.key_length).
  model::LlamaShape scaled = shape;
  scaled.head_dim = 32;
  scaled.rope_linear_factor = 2.0f;
  scaled.rope_freq_factors = model::llama3_rope_freq_factors({8.0, 1.0, 4.0, 16.0}, scaled.rope_base, 32);
  model::write_random_llama(path.string(), scaled, kernels::DType::Q8_0, 7);
  seeds.push_back(read_bytes(path));
  scaled.rope_yarn_original_context = 16;  // and as YaRN
  model::write_random_llama(path.string(), scaled, kernels::DType::Q8_0, 7);
  seeds.push_back(read_bytes(path));
  // The same model as Q4_1, and as llama.cpp's Q4_K_S mix: with rows of 32 and 64 every K-quant falls
  // back to Q5_0 / Q5_1 (the head to Q8_0).
  const fs::path small_f16 = scratch_dir().path() / "seed-small-f16.gguf";
  model::write_random_llama(small_f16.string(), shape, kernels::DType::F16, 7);
  model::requantize_gguf(*model::GgufFile::open(small_f16.string()), path.string(), kernels::DType::Q4_1,
                         /*pure=*/false);
  seeds.push_back(read_bytes(path));
  model::requantize_gguf(*model::GgufFile::open(small_f16.string()), path.string(),
                         model::LlamaCppMix::q4_k_s);
  seeds.push_back(read_bytes(path));
  // And Q4_K (rows of 256: the smallest such model), requantized from F16 as `nibble quantize`
  // does: Q4_K matrices, a Q8_0 embedding and head (~0.4 MB).
  model::LlamaShape k_shape = shape;
  k_shape.n_embd = 256;
  k_shape.n_ff = 256;
  const fs::path f16_path = scratch_dir().path() / "seed-f16.gguf";
  model::write_random_llama(f16_path.string(), k_shape, kernels::DType::F16, 7);
  model::requantize_gguf(*model::GgufFile::open(f16_path.string()), path.string(), kernels::DType::Q4_K,
                         /*pure=*/false);
  seeds.push_back(read_bytes(path));
  // And llama.cpp's Q5_K_M mix of it: Q5_K matrices and embedding, Q6_K head and ffn_down.
  model::requantize_gguf(*model::GgufFile::open(f16_path.string()), path.string(),
                         model::LlamaCppMix::q5_k_m);
  seeds.push_back(read_bytes(path));
  // And its Q3_K_M mix (Q3_K, Q4_K, Q5_K matrices, Q6_K head) and Q2_K matrices.
  model::requantize_gguf(*model::GgufFile::open(f16_path.string()), path.string(),
                         model::LlamaCppMix::q3_k_m);
  seeds.push_back(read_bytes(path));
  model::requantize_gguf(*model::GgufFile::open(f16_path.string()), path.string(), kernels::DType::Q2_K,
                         /*pure=*/false);
  seeds.push_back(read_bytes(path));
  // A broken model's NaN and inf activations (its first norm's weights NaN, two of them inf), through the
  // Q8_K activations of Q4_K matrices and the Q8_0 ones of Q4_0: the activation quantizers once converted
  // NaN to int (undefined; UBSan stops there).
  const auto with_broken_norm = [&](const std::vector<uint8_t>& bytes) {
    std::vector<uint8_t> broken = bytes;
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    const auto file = model::GgufFile::open(path.string());
    const model::GgufTensorInfo* norm = file->find_tensor("blk.0.attn_norm.weight");
    if (norm == nullptr || norm->type != kernels::DType::F32) return broken;
    const uint64_t at = file->data_offset() + norm->offset;
    for (int64_t i = 0; i < norm->n_elements; ++i) {
      const uint32_t bits = i == 1 ? 0x7f800000u : i == 2 ? 0xff800000u : 0x7fc00000u;  // inf, -inf, NaN
      std::memcpy(broken.data() + at + static_cast<uint64_t>(i) * 4, &bits, 4);
    }
    return broken;
  };
  seeds.push_back(with_broken_norm(seeds[seeds.size() - 4]));  // Q4_K
  seeds.push_back(with_broken_norm(seeds[0]));                 // Q4_0
  // And the types Nibble reads but does not write (kernels/read_only_quants.hpp): the Q4_K model's
  // matrices, embedding and head as random blocks of them, one type a tensor, the ten spread over two
  // seeds. Random scales may be inf or NaN: the model must run all the same.
  const fs::path q4_k_path = scratch_dir().path() / "seed-q4_k.gguf";
  model::requantize_gguf(*model::GgufFile::open(f16_path.string()), q4_k_path.string(), kernels::DType::Q4_K,
                         /*pure=*/false);
  const auto q4_k = model::GgufFile::open(q4_k_path.string());
  constexpr kernels::DType kReadOnly[] = {
      kernels::DType::IQ2_XXS, kernels::DType::IQ2_XS, kernels::DType::IQ2_S, kernels::DType::IQ3_XXS,
      kernels::DType::IQ3_S,   kernels::DType::IQ1_S,  kernels::DType::IQ1_M, kernels::DType::TQ1_0,
      kernels::DType::TQ2_0,   kernels::DType::MXFP4};
  std::mt19937 rng(11);
  for (const size_t first : {size_t{0}, size_t{5}}) {
    model::GgufWriter writer;
    for (const auto& [key, value] : q4_k->metadata()) writer.set(key, value);
    size_t next = first;
    for (const model::GgufTensorInfo& t : q4_k->tensors()) {
      if (t.dims.size() != 2) {
        writer.add_tensor_view(t.name, t.dims, t.type, q4_k->tensor_data(t), t.size_bytes);
        continue;
      }
      const kernels::DType type = kReadOnly[next++ % std::size(kReadOnly)];
      std::vector<uint8_t> bytes(static_cast<size_t>(kernels::row_bytes(type, t.dims[0]) * t.dims[1]));
      for (uint8_t& byte : bytes) byte = static_cast<uint8_t>(rng());
      writer.add_tensor(t.name, t.dims, type, std::move(bytes));
    }
    writer.write(path.string());
    seeds.push_back(read_bytes(path));
  }
  return seeds;
}

// ------------------------------------------------------------------ GGUF split model

// The input is the second and last file of a split model whose first file (the metadata and the
// first half of a small Q4_0 model's tensors) stays fixed: a set opens from its first file, so what
// the second says of itself (split.no / split.count, its tensors, a name the first holds too) meets
// the checks that join the two (a set's files are real files: the first finds the second by name).
struct SplitFiles {
  std::string first, second;
};
const SplitFiles& split_files() {
  static const SplitFiles files = [] {
    const model::LlamaShape shape{
        .n_embd = 32, .n_layer = 1, .n_head = 2, .n_head_kv = 1, .n_ff = 64, .n_vocab = 360, .n_ctx = 64};
    const fs::path whole = scratch_dir().path() / "split-whole.gguf";
    model::write_random_llama(whole.string(), shape, kernels::DType::Q4_0, 7);
    const auto file = model::GgufFile::open(whole.string());
    model::GgufWriter writer;
    for (const auto& [key, value] : file->metadata()) writer.set(key, value);
    for (const model::GgufTensorInfo& t : file->tensors())
      writer.add_tensor_view(t.name, t.dims, t.type, file->tensor_data(t), t.size_bytes);
    const int64_t half = (static_cast<int64_t>(file->tensors().size()) + 1) / 2;
    const auto paths = writer.write_split((scratch_dir().path() / "split").string(), {.max_tensors = half});
    require(paths.size() == 2, "the split seed is not two files");
    return SplitFiles{paths[0], paths[1]};
  }();
  return files;
}

Outcome run_gguf_split(std::span<const uint8_t> input) {
  const SplitFiles& files = split_files();
  {
    std::ofstream out(files.second, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(input.data()), static_cast<std::streamsize>(input.size()));
    if (!out) throw std::runtime_error("writing the fuzz input failed");
  }
  return load_and_run(files.first);
}

std::vector<std::vector<uint8_t>> gguf_split_seeds() { return {read_bytes(split_files().second)}; }

// ------------------------------------------------------------------ safetensors

Outcome run_safetensors(std::span<const uint8_t> input) {
  const std::string path = input_file().write(input);
  try {
    const auto file = model::SafetensorsFile::open(path);
    // Every tensor lies inside the file, in order, and covers exactly its shape's bytes.
    uint64_t end = 0;
    for (const model::SafetensorsTensorInfo& tensor : file->tensors()) {
      require(tensor.offset >= end, "tensors overlap or are out of order");
      require(file->data_offset() + tensor.offset + tensor.size_bytes <= file->file_size(),
              "a tensor extends past the end of the file");
      require(static_cast<uint64_t>(tensor.n_elements) * safetensors_dtype_bytes(tensor.dtype) ==
                  tensor.size_bytes,
              "a tensor's size is not its shape's");
      require(file->find_tensor(tensor.name) == &tensor, "find_tensor does not find a listed tensor");
      end = tensor.offset + tensor.size_bytes;
    }
    return {true, {}};
  } catch (const model::SafetensorsError& e) {
    return {false, e.what()};
  }
}

std::vector<std::vector<uint8_t>> safetensors_seeds() {
  const fs::path path = scratch_dir().path() / "seed.safetensors";
  std::vector<model::SafetensorsTensorData> tensors;
  tensors.push_back(
      {"model.embed_tokens.weight", model::SafetensorsDType::BF16, {3, 4}, std::vector<uint8_t>(24, 1)});
  tensors.push_back({"model.norm.weight", model::SafetensorsDType::F32, {4}, std::vector<uint8_t>(16, 2)});
  tensors.push_back({"qweight", model::SafetensorsDType::I32, {2, 2}, std::vector<uint8_t>(16, 3)});
  tensors.push_back({"scalar", model::SafetensorsDType::F16, {}, std::vector<uint8_t>(2, 4)});
  model::write_safetensors(path.string(), tensors, {{"format", "pt"}});
  return {read_bytes(path)};
}

// ------------------------------------------------------------------ client protocol

// Whatever decodes encodes to a frame that decodes to the same frame again (compared as bytes, so
// that a NaN in a float field does not count as a difference).
template <typename Message, typename Decode>
void require_round_trip(const Message& message, Decode decode, const char* what) {
  const std::vector<uint8_t> once = protocol::encode(message);
  const std::vector<uint8_t> twice = protocol::encode(decode(std::span<const uint8_t>(once)));
  require(once == twice, std::string(what) + ": a decoded message does not survive encode and decode");
}

Outcome run_client_protocol(std::span<const uint8_t> input) {
  Outcome outcome;
  const auto decode_request = [](std::span<const uint8_t> frame) {
    return protocol::decode_client_request(frame);
  };
  const auto decode_response = [](std::span<const uint8_t> frame) {
    return protocol::decode_server_response(frame);
  };
  try {
    require_round_trip(decode_request(input), decode_request, "client request");
    outcome.accepted = true;
  } catch (const protocol::ProtocolError& e) {
    outcome.error = e.what();
  }
  try {
    require_round_trip(decode_response(input), decode_response, "server response");
    outcome.accepted = true;
  } catch (const protocol::ProtocolError& e) {
    if (outcome.error.empty()) outcome.error = e.what();
  }
  if (outcome.accepted) outcome.error.clear();
  return outcome;
}

std::vector<std::vector<uint8_t>> client_protocol_seeds() {
  protocol::GenerateRequest text;
  text.request_id = "r1";
  text.prompt = std::string("Once upon a time");
  text.sampling.temperature = 0.7f;
  text.sampling.top_k = 40;
  text.sampling.seed = 5;
  text.stop = {"\n\n", "END"};
  text.stream = true;
  protocol::GenerateRequest ids;
  ids.request_id = "r2";
  ids.prompt = std::vector<int32_t>{1, 15043, 3186};
  ids.max_tokens = 8;
  protocol::GenerateRequest chat = ids;
  chat.request_id = "r3";
  chat.prompt = std::vector<protocol::ChatMessage>{{"system", "Be brief."}, {"user", "Hi"}};
  chat.logprobs = 3;
  chat.parse_special = true;
  protocol::Final final;
  final.request_id = "r1";
  final.text = "there was";
  final.tokens = {727, 471};
  final.prompt_token_ids = {1, 2, 3};
  final.timings = {1.5, 2.5, 3.5};
  final.logprobs = {{-0.5f, {{727, -0.5f}, {9, -2.0f}}}, {-1.0f, {}}};
  protocol::Stats stats;
  stats.queued = 3;
  stats.draft_accepted = 9;
  return {protocol::encode(protocol::ClientRequestMsg(text)),
          protocol::encode(protocol::ClientRequestMsg(ids)),
          protocol::encode(protocol::ClientRequestMsg(chat)),
          protocol::encode(protocol::ClientRequestMsg(protocol::CancelRequest{"r1"})),
          protocol::encode(protocol::ClientRequestMsg(protocol::HealthRequest{})),
          protocol::encode(protocol::ServerResponseMsg(protocol::Delta{"r1", {5, 6}, "ab"})),
          protocol::encode(protocol::ServerResponseMsg(final)),
          protocol::encode(protocol::ServerResponseMsg(
              protocol::Error{"r1", protocol::ErrorCode::bad_request, "prompt: empty"})),
          protocol::encode(protocol::ServerResponseMsg(stats)),
          protocol::encode(
              protocol::ClientRequestMsg(protocol::LoadAdapterRequest{"r4", "sql", "/a/sql.gguf", 0.5f})),
          protocol::encode(protocol::ClientRequestMsg(protocol::UnloadAdapterRequest{"r5", "sql"})),
          protocol::encode(protocol::ServerResponseMsg(protocol::Adapters{"r4", {"sql", "chat"}}))};
}

// ------------------------------------------------------------------ worker protocol

Outcome run_worker_protocol(std::span<const uint8_t> input) {
  Outcome outcome;
  const auto attempt = [&](auto decode, const char* what) {
    try {
      require_round_trip(decode(input), decode, what);
      outcome.accepted = true;
    } catch (const protocol::ProtocolError& e) {
      if (outcome.error.empty()) outcome.error = e.what();
    }
  };
  attempt([](std::span<const uint8_t> frame) { return protocol::decode_worker_step(frame); }, "worker step");
  attempt([](std::span<const uint8_t> frame) { return protocol::decode_step_result(frame); }, "step result");
  attempt([](std::span<const uint8_t> frame) { return protocol::decode_draft_request(frame); },
          "draft request");
  attempt([](std::span<const uint8_t> frame) { return protocol::decode_draft_reply(frame); }, "draft reply");
  if (outcome.accepted) outcome.error.clear();
  return outcome;
}

std::vector<std::vector<uint8_t>> worker_protocol_seeds() {
  protocol::WorkerStep step;
  step.step_id = 12;
  step.new_sequences.push_back({.seq_id = 7,
                                .temperature = 0.8f,
                                .top_k = 40,
                                .top_p = 0.95f,
                                .min_p = 0.0f,
                                .repetition_penalty = 1.1f,
                                .repeat_last_n = 64,
                                .seed = 99,
                                .logprobs = 0,
                                .presence_penalty = 0.5f,
                                .frequency_penalty = -0.25f,
                                .logit_bias = {{3, -1.5f}, {11, 2.0f}}});
  step.released = {3};
  step.entries.push_back({7, 0, 0, {1, 2, 3, 4}, true, 0, {}});
  step.entries.push_back({8, 1, 16, {5, 6, 7}, true, 2, {}});
  step.entries.push_back({9, 2, 4, {8}, true, 0, {1, 2, 3, 4}});  // after a cached prefix
  step.block_tables = {0, 1, 2, 3, 4, 5};
  step.max_blocks_per_seq = 2;
  protocol::StepResult result;
  result.sampled.push_back({7, 42, {5, 6}, 2, {9, 10}});
  protocol::DraftRequest request;
  protocol::SequenceSampling greedy;
  greedy.seq_id = 7;
  greedy.seed = 1;
  request.sequences.push_back({greedy, 3, {4, 5}, 4});
  protocol::DraftReply reply;
  reply.proposals.push_back({7, {1, 2}, {0.25f, 0.75f, 0.5f, 0.5f}});
  protocol::WorkerStep changes;
  changes.adapter_changes = {{1, "/a/sql.gguf", 0.5f}, {2, "", 1.0f}};
  protocol::StepResult reports;
  reports.adapter_reports = {{1, 2, ""}, {1, 3, "no such file"}};
  return {protocol::encode(step),  protocol::encode(result),  protocol::encode(request),
          protocol::encode(reply), protocol::encode(changes), protocol::encode(reports)};
}

// ------------------------------------------------------------------ OpenAI API bodies

// An HTTP body for /v1/completions and /v1/chat/completions: refused with an ApiError (400 or 404), or
// accepted as a request the client protocol carries through encode and decode unchanged (or refuses
// with a ProtocolError, as the gateway checks before sending), and whose answers serialize.
Outcome run_openai_request(std::span<const uint8_t> input) {
  Outcome outcome;
  const std::string body(input.begin(), input.end());
  for (const auto endpoint :
       {cluster::openai::Endpoint::completions, cluster::openai::Endpoint::chat_completions}) {
    try {
      const cluster::openai::ApiRequest api = cluster::openai::parse_request(endpoint, body, {});
      outcome.accepted = true;
      std::vector<protocol::GenerateRequest> choices = cluster::openai::choice_requests(api);
      require(!choices.empty() && choices.size() <= 64, "openai_request: choices out of bounds");
      for (protocol::GenerateRequest& choice : choices) {
        choice.request_id = "fuzz";
        try {
          protocol::validate(choice);
          const auto decoded =
              protocol::decode_client_request(protocol::encode(protocol::ClientRequestMsg{choice}));
          require(std::get<protocol::GenerateRequest>(decoded) == choice,
                  "openai_request: an accepted request changes through the client protocol");
        } catch (const protocol::ProtocolError&) {
          // the gateway answers 400 before sending
        }
      }
      protocol::Final final;
      final.text = "\xff answer";
      final.tokens = {1, 2};
      final.logprobs = {{-1.0f, {{1, -1.0f}}}, {-2.0f, {}}};
      final.prompt_token_ids = {1, 5, 6};
      final.prompt_logprobs = {{-3.0f, {{4, -0.5f}}}, {-0.5f, {}}};
      const std::vector<protocol::Final> finals(choices.size(), final);
      require(!cluster::openai::dump(cluster::openai::response(api, finals, "id", 0, "m")).empty(),
              "openai_request: an empty response");
      const protocol::Delta delta{"fuzz", {1}, "a", {}};
      require(!cluster::openai::dump(cluster::openai::delta_chunk(api, 0, delta, "id", 0, "m")).empty(),
              "openai_request: an empty chunk");
      if (api.echo) {
        require(!cluster::openai::dump(cluster::openai::echo_chunk(api, choices.size() - 1,
                                                                   final.prompt_token_ids,
                                                                   final.prompt_logprobs, "id", 0, "m"))
                     .empty(),
                "openai_request: an empty echo chunk");
      }
    } catch (const cluster::openai::ApiError& e) {
      require(e.status == 400 || e.status == 404,
              "openai_request: a refusal with status " + std::to_string(e.status));
      if (outcome.error.empty()) outcome.error = e.what();
    }
  }
  // The same body as vLLM's adapter loads and unloads: refused with a 400, or a request the client
  // protocol carries unchanged (or refuses, as the coordinator would).
  const auto adapter_request = [&](auto parse) {
    try {
      auto request = parse(body);
      outcome.accepted = true;
      request.request_id = "fuzz";
      try {
        protocol::validate(request);
        const auto decoded =
            protocol::decode_client_request(protocol::encode(protocol::ClientRequestMsg{request}));
        require(std::get<decltype(request)>(decoded) == request,
                "openai_request: an adapter request changes through the client protocol");
      } catch (const protocol::ProtocolError&) {
      }
    } catch (const cluster::openai::ApiError& e) {
      require(e.status == 400, "openai_request: an adapter refusal with status " + std::to_string(e.status));
      if (outcome.error.empty()) outcome.error = e.what();
    }
  };
  adapter_request(cluster::openai::parse_load_adapter);
  adapter_request(cluster::openai::parse_unload_adapter);
  if (outcome.accepted) outcome.error.clear();
  return outcome;
}

std::vector<std::vector<uint8_t>> openai_request_seeds() {
  return {
      bytes_of(R"({"lora_name": "sql", "lora_path": "/models/sql.gguf", "scale": 0.5})"),
      bytes_of(R"({"model": "nibble", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.7,
                      "top_p": 0.9, "top_k": 40, "stop": ["\n", "END"], "stream": true,
                      "stream_options": {"include_usage": true}, "logprobs": 2, "seed": 5})"),
      bytes_of(
          R"({"prompt": [[1, 15043, 3186], [1, 2]], "max_tokens": 4, "n": 2, "best_of": 2, "user": "u"})"),
      bytes_of(R"({"prompt": ["one", "two"], "seed": 3})"),
      bytes_of(R"({"prompt": ["a b", "c"], "echo": true, "logprobs": 1, "max_tokens": 0, "n": 2})"),
      bytes_of(R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content":
                      [{"type": "text", "text": "Hi"}]}], "max_completion_tokens": 16, "logprobs": true,
                      "top_logprobs": 3, "response_format": {"type": "text"}, "tool_choice": "none"})"),
      bytes_of(R"({"messages": [{"role": "developer", "content": "x", "name": "n"}], "min_p": 0.1,
                      "repetition_penalty": 1.1, "presence_penalty": 0, "logit_bias": {}})")};
}

// ------------------------------------------------------------------ cluster config

Outcome run_cluster_config(std::span<const uint8_t> input) {
  const std::string text(input.begin(), input.end());
  cluster::ClusterConfig config;
  try {
    config = cluster::parse_cluster_config(text, "fuzz.yaml");
  } catch (const cluster::ConfigError& e) {
    return {false, e.what()};
  }
  // The start-up log's rendering must parse back to the same configuration.
  const std::string rendered = cluster::render_cluster_config(config);
  try {
    require(cluster::parse_cluster_config(rendered, "rendered.yaml") == config,
            "the rendered configuration parses to a different one:\n" + rendered);
  } catch (const cluster::ConfigError& e) {
    throw PropertyBroken(std::string("the rendered configuration is refused: ") + e.what() + "\n" + rendered);
  }
  return {true, {}};
}

std::vector<std::vector<uint8_t>> cluster_config_seeds() {
  std::vector<fs::path> examples;  // the example configurations, in a fixed order
  for (const auto& entry : fs::directory_iterator(test::source_dir() / "config")) {
    if (entry.path().extension() == ".yaml") examples.push_back(entry.path());
  }
  std::sort(examples.begin(), examples.end());
  std::vector<std::vector<uint8_t>> seeds = {
      bytes_of("model:\n  path: target.gguf\n"),
      bytes_of(
          "model: {path: t.gguf}\nopenai:\n  listen: \"127.0.0.1:8000\"\n  model_name: llama\n  threads: 4\n"
          "  chat_max_tokens: 64\n")};
  for (const fs::path& path : examples) seeds.push_back(read_bytes(path));
  return seeds;
}

// ------------------------------------------------------------------ tokenizers on arbitrary text

// A byte-level BPE vocabulary: the 256 byte characters, a few merges and an end-of-text token,
// with Llama 3's pre-tokenizer (PCRE2 on whatever bytes come).
std::shared_ptr<const model::Tokenizer> tiny_byte_bpe() {
  std::vector<model::GgufValue> tokens;
  std::vector<model::GgufValue> types;
  for (int b = 0; b < 256; ++b) {
    tokens.push_back(model::GgufValue::make_string(model::utf8::byte_to_unicode(static_cast<uint8_t>(b))));
    types.push_back(model::GgufValue::make_int(model::GgufValueType::INT32, 1));
  }
  const std::string space = model::utf8::byte_to_unicode(' ');
  std::vector<model::GgufValue> merges;
  for (const auto& [left, right] : std::vector<std::pair<std::string, std::string>>{
           {"t", "h"}, {space, "th"}, {"e", "r"}, {space, "a"}, {"i", "n"}, {"th", "e"}}) {
    merges.push_back(model::GgufValue::make_string(left + " " + right));
    tokens.push_back(model::GgufValue::make_string(left + right));
    types.push_back(model::GgufValue::make_int(model::GgufValueType::INT32, 1));
  }
  const auto eot = static_cast<uint64_t>(tokens.size());
  tokens.push_back(model::GgufValue::make_string("<|end_of_text|>"));
  types.push_back(model::GgufValue::make_int(model::GgufValueType::INT32, 3));
  std::map<std::string, model::GgufValue> metadata;
  metadata["tokenizer.ggml.model"] = model::GgufValue::make_string("gpt2");
  metadata["tokenizer.ggml.pre"] = model::GgufValue::make_string("llama-bpe");
  metadata["tokenizer.ggml.tokens"] = model::GgufValue::make_array(model::GgufValueType::STRING, tokens);
  metadata["tokenizer.ggml.token_type"] = model::GgufValue::make_array(model::GgufValueType::INT32, types);
  metadata["tokenizer.ggml.merges"] = model::GgufValue::make_array(model::GgufValueType::STRING, merges);
  metadata["tokenizer.ggml.bos_token_id"] = model::GgufValue::make_uint(model::GgufValueType::UINT32, eot);
  metadata["tokenizer.ggml.eos_token_id"] = model::GgufValue::make_uint(model::GgufValueType::UINT32, eot);
  return model::Tokenizer::from_metadata(metadata, "tiny byte-level BPE");
}

// The synthetic SentencePiece vocabulary, the byte-level one above, and llama.cpp's test
// vocabularies when the fixtures are there.
const std::vector<std::shared_ptr<const model::Tokenizer>>& text_tokenizers() {
  static const auto tokenizers = [] {
    std::vector<std::shared_ptr<const model::Tokenizer>> all = {model::make_synthetic_tokenizer(600),
                                                                tiny_byte_bpe()};
    if (const auto fixtures = test::fixtures_dir()) {
      for (const char* name : {"ggml-vocab-llama-spm.gguf", "ggml-vocab-gpt-2.gguf"}) {
        const fs::path path = *fixtures / "tokenizer" / name;
        if (fs::exists(path))
          all.push_back(model::Tokenizer::from_gguf(*model::GgufFile::open(path.string())));
      }
    }
    return all;
  }();
  return tokenizers;
}

void check_tokenizer_on(const model::Tokenizer& tokenizer, std::string_view text) {
  const std::vector<int32_t> ids = tokenizer.encode(text, true);
  for (const int32_t id : ids) require(id >= 0 && id < tokenizer.n_vocab(), "encode gave an id out of range");
  const std::string decoded = tokenizer.decode(ids);
  // Every byte has a token (byte fallback, or a byte character), so valid text comes back as it
  // was; SentencePiece reads a literal "▁" as its space marker, so that text is left out.
  const bool valid = model::utf8::replace_invalid(text) == text;
  const bool has_marker = tokenizer.kind() == model::TokenizerKind::sentencepiece &&
                          text.find("\xE2\x96\x81") != std::string_view::npos;
  if (valid && !has_marker) require(decoded == text, "valid text does not decode to itself");
  // With special tokens parsed too: every id in range.
  for (const int32_t id : tokenizer.encode(text, false, /*parse_special=*/true))
    require(id >= 0 && id < tokenizer.n_vocab(), "encode with parse_special gave an id out of range");
  // The streaming decoder's pieces are valid UTF-8 and add up to the whole decode's text.
  model::StreamingDecoder stream(tokenizer);
  std::string streamed;
  for (const int32_t id : ids) {
    const std::string piece = stream.push(id);
    require(model::utf8::replace_invalid(piece) == piece, "the streaming decoder emitted invalid UTF-8");
    streamed += piece;
  }
  streamed += stream.flush();
  require(streamed == model::utf8::replace_invalid(decoded), "the streamed text differs from decode()'s");
}

// First byte: which tokenizer; the rest: the text.
Outcome run_tokenizer_text(std::span<const uint8_t> input) {
  if (input.empty()) return {true, {}};
  const auto& tokenizers = text_tokenizers();
  const model::Tokenizer& tokenizer = *tokenizers[input[0] % tokenizers.size()];
  const std::string_view text(reinterpret_cast<const char*>(input.data()) + 1, input.size() - 1);
  check_tokenizer_on(tokenizer, text);
  return {true, {}};
}

std::vector<std::vector<uint8_t>> tokenizer_text_seeds() {
  std::vector<std::vector<uint8_t>> seeds;
  for (const std::string text :
       {"Hello world", " leading space and  two", "caf\xC3\xA9 \xF0\x9F\x98\x80 \xE4\xB8\xAD",
        "tabs\tand\nnewlines\r\n", "numbers 12345 and 'quotes' don't", "\xFF\xC3 broken"}) {
    for (uint8_t which = 0; which < 4; ++which) {
      std::vector<uint8_t> seed = {which};
      seed.insert(seed.end(), text.begin(), text.end());
      seeds.push_back(std::move(seed));
    }
  }
  return seeds;
}

// ------------------------------------------------------------------ Hugging Face tokenizer.json

Outcome run_hf_tokenizer(std::span<const uint8_t> input) {
  const fs::path dir = scratch_dir().path() / "hf";
  fs::create_directories(dir);
  {
    std::ofstream out(dir / "tokenizer.json", std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(input.data()), static_cast<std::streamsize>(input.size()));
  }
  std::shared_ptr<const model::Tokenizer> tokenizer;
  try {
    tokenizer = model::load_hf_tokenizer(dir.string());
  } catch (const model::HfCheckpointError& e) {
    return {false, e.what()};
  } catch (const model::GgufError& e) {  // the vocabulary it makes is refused as a GGUF one would be
    return {false, e.what()};
  }
  for (const std::string_view text :
       {std::string_view("Hello world, caf\xC3\xA9!"), std::string_view("\xFF x")}) {
    for (const int32_t id : tokenizer->encode(text, true)) {
      require(id >= 0 && id < tokenizer->n_vocab(), "encode gave an id out of range");
    }
  }
  for (int32_t id = 0; id < std::min(tokenizer->n_vocab(), 512); ++id) (void)tokenizer->token_bytes(id);
  return {true, {}};
}

std::vector<std::vector<uint8_t>> hf_tokenizer_seeds() {
  std::vector<std::vector<uint8_t>> seeds = {bytes_of(test::tiny_llama_tokenizer_json(300))};
  // The synthetic vocabulary of the project's test models, as transformers would write it.
  const fs::path path = scratch_dir().path() / "vocab.gguf";
  model::GgufWriter writer;
  for (const auto& [key, value] : model::synthetic_tokenizer_metadata(400)) writer.set(key, value);
  writer.write(path.string());
  seeds.push_back(bytes_of(test::tokenizer_json_of(*model::GgufFile::open(path.string()))));
  return seeds;
}

// ------------------------------------------------------------------ Hugging Face config.json

// The committed HF checkpoints (plain, tied and GPTQ / AWQ in five layouts), each copied once
// into a folder of its own whose config.json the input replaces.
const std::vector<fs::path>& hf_checkpoint_dirs() {
  static const auto dirs = [] {
    std::vector<fs::path> sources;
    for (const char* family : {"hf-tiny-llama", "gptq-tiny-llama"}) {
      for (const auto& entry : fs::directory_iterator(test::test_data_dir() / family)) {
        if (fs::exists(entry.path() / "model.safetensors")) sources.push_back(entry.path());
      }
    }
    std::sort(sources.begin(), sources.end());
    std::vector<fs::path> copies;
    for (const fs::path& source : sources) {
      const fs::path copy = scratch_dir().path() / ("hf-" + std::to_string(copies.size()));
      fs::create_directories(copy);
      fs::copy_file(source / "model.safetensors", copy / "model.safetensors",
                    fs::copy_options::overwrite_existing);
      fs::copy_file(source / "config.json", copy / "config.json.original",
                    fs::copy_options::overwrite_existing);
      copies.push_back(copy);
    }
    return copies;
  }();
  return dirs;
}

// First byte: which checkpoint's tensors; the rest: its config.json. What loads must run a step.
Outcome run_hf_config(std::span<const uint8_t> input) {
  if (input.empty()) return {false, "empty input"};
  const auto& dirs = hf_checkpoint_dirs();
  const fs::path& dir = dirs[input[0] % dirs.size()];
  {
    std::ofstream out(dir / "config.json", std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(input.data()) + 1,
              static_cast<std::streamsize>(input.size() - 1));
  }
  std::unique_ptr<worker::LlamaModel> model;
  try {
    model = worker::LlamaModel::load(dir.string());
  } catch (const model::HfCheckpointError& e) {
    return {false, e.what()};
  } catch (const model::SafetensorsError& e) {
    return {false, e.what()};
  } catch (const std::invalid_argument& e) {
    return {false, e.what()};
  }
  static kernels::ThreadPool pool(1);
  const int64_t n_vocab = model->config().n_vocab;
  worker::KvCache cache(model->config(), 1, 16);
  std::vector<float> logits;
  const std::vector<int32_t> tokens = {static_cast<int32_t>(1 % n_vocab), static_cast<int32_t>(2 % n_vocab)};
  model->forward(worker::ForwardBatch::single(tokens, 0, {0}, false), cache, pool, logits);
  require(static_cast<int64_t>(logits.size()) == n_vocab,
          "a step's logits are not one row of the vocabulary");
  return {true, {}};
}

std::vector<std::vector<uint8_t>> hf_config_seeds() {
  std::vector<std::vector<uint8_t>> seeds;
  const auto& dirs = hf_checkpoint_dirs();
  for (size_t i = 0; i < dirs.size(); ++i) {
    std::vector<uint8_t> seed = {static_cast<uint8_t>(i)};
    const std::vector<uint8_t> config = read_bytes(dirs[i] / "config.json.original");
    seed.insert(seed.end(), config.begin(), config.end());
    seeds.push_back(std::move(seed));
  }
  return seeds;
}

// ------------------------------------------------------------------ imatrix

// An importance matrix file (llama.cpp's GGUF or legacy .dat): refused with a GgufError, or read, and
// then it survives writing in the GGUF format and reading back (the counts as F32, as llama.cpp stores
// them: a legacy count above 2^24 comes back rounded to float).
Outcome run_imatrix(std::span<const uint8_t> input) {
  const std::string path = input_file().write(input);
  model::ImportanceMatrix m;
  try {
    m = model::read_imatrix(path);
  } catch (const model::GgufError& e) {
    return {false, e.what()};
  }
  const fs::path copy = scratch_dir().path() / "imatrix-copy.gguf";
  model::write_imatrix(m, copy.string());
  const model::ImportanceMatrix back = model::read_imatrix(copy.string());
  require(back.entries.size() == m.entries.size(), "entries lost in the round trip");
  for (const auto& [name, e] : m.entries) {
    const auto it = back.entries.find(name);
    require(it != back.entries.end() && static_cast<float>(it->second.count) == static_cast<float>(e.count) &&
                it->second.sums.size() == e.sums.size() &&
                std::memcmp(it->second.sums.data(), e.sums.data(), e.sums.size() * sizeof(float)) == 0,
            "entry '" + name + "' changed in the round trip");
    require(m.importance(name)->size() == e.sums.size(), "importance row of the wrong length");
  }
  return {true, {}};
}

std::vector<std::vector<uint8_t>> imatrix_seeds() {
  model::ImportanceMatrix m;
  m.entries["blk.0.attn_q.weight"] = {{1.0f, 2.0f, 3.0f, 4.0f}, 3};
  m.entries["blk.0.ffn_down.weight"] = {{0.5f, 0.25f}, 0};
  m.datasets = {"text.txt"};
  m.chunk_count = 3;
  m.chunk_size = 1;
  const fs::path path = scratch_dir().path() / "seed.imatrix";
  model::write_imatrix(m, path.string());
  std::vector<std::vector<uint8_t>> seeds = {read_bytes(path)};
  // llama.cpp's legacy .dat: one entry of two values, then the chunk count and the dataset's name.
  std::vector<uint8_t> legacy;
  auto i32 = [&](int32_t v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    legacy.insert(legacy.end(), p, p + 4);
  };
  const std::string name = "blk.0.ffn_up.weight";
  i32(1);
  i32(static_cast<int32_t>(name.size()));
  legacy.insert(legacy.end(), name.begin(), name.end());
  i32(2);
  i32(2);
  const float values[2] = {4.0f, 6.0f};
  const auto* v = reinterpret_cast<const uint8_t*>(values);
  legacy.insert(legacy.end(), v, v + sizeof values);
  i32(1);
  i32(4);
  legacy.insert(legacy.end(), {'w', 'i', 'k', 'i'});
  seeds.push_back(std::move(legacy));
  return seeds;
}

// ------------------------------------------------------------------ JSON output constraint

// Any bytes: the recognizer takes a prefix of them; a refused byte leaves its state as it was; a text it
// takes whole and calls complete is a JSON object by nlohmann::json's parser too.
Outcome run_json_output(std::span<const uint8_t> input) {
  worker::JsonPrefix prefix;
  size_t taken = 0;
  for (; taken < input.size(); ++taken) {
    const worker::JsonPrefix before = prefix;
    if (!prefix.feed(input[taken])) {
      require(std::memcmp(&before, &prefix, sizeof prefix) == 0,
              "json_output: a refused byte changed the state");
      break;
    }
  }
  if (taken < input.size())
    return {false, "byte " + std::to_string(taken) + " cannot continue a JSON object"};
  if (!prefix.complete()) return {false, "an unfinished JSON object"};
  const std::string text(input.begin(), input.end());
  try {
    require(nlohmann::json::parse(text).is_object(), "json_output: a complete text that is not an object");
  } catch (const nlohmann::json::out_of_range&) {
    // a number beyond a double: JSON's grammar allows it, nlohmann does not
  } catch (const nlohmann::json::parse_error& e) {
    require(false, std::string("json_output: a complete text nlohmann refuses: ") + e.what());
  }
  return {true, ""};
}

// Any text as a JSON schema: compiled or refused with a message (std::invalid_argument), nothing else;
// a compiled one walks a few texts without fault.
Outcome run_json_schema(std::span<const uint8_t> input) {
  // Its grammar, made or refused by the converter naming a place; a grammar that does not compile would be
  // the converter's own slip ("grammar: ..." from the check at its end).
  try {
    worker::json_schema_grammar(std::string_view(reinterpret_cast<const char*>(input.data()), input.size()));
  } catch (const std::invalid_argument& e) {
    require(std::string(e.what()).starts_with("json_schema"),
            std::string("json_schema: the schema's grammar does not compile: ") + e.what());
  }
  std::shared_ptr<const worker::JsonSchema> schema;
  try {
    schema = worker::JsonSchema::compile(
        std::string_view(reinterpret_cast<const char*>(input.data()), input.size()));
  } catch (const std::invalid_argument& e) {
    return {false, e.what()};
  }
  for (const char* text : {R"({"a": 1, "b": "x", "c": [true, null], "d": {"e": -0.5}})", "{}", R"({"a")"}) {
    worker::JsonPrefix prefix(schema.get());
    prefix.feed(text);
  }
  return {true, ""};
}

std::vector<std::vector<uint8_t>> json_schema_seeds() {
  return {
      bytes_of(R"({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]},
                      "c": {"type": "array", "items": {"type": "boolean"}}, "d": {"type": "object",
                      "properties": {"e": {"type": "number"}}, "required": ["e"]}}, "required": ["a"],
                      "additionalProperties": false, "title": "t"})"),
      bytes_of(R"({"type": "object"})"),
      bytes_of(R"({"properties": {"s": {"const": "k"}, "n": {"type": "null"}}})"),
      bytes_of(R"({"type": "object", "properties": {"u": {"type": ["string", "integer", "null"]},
                      "v": {"anyOf": [{"type": "object", "properties": {"w": {"type": "boolean"}}}, {"type": "null"},
                      {"type": "array", "items": {"type": "number"}}]}}})"),
      bytes_of(R"({"$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}}}, "C": {"enum":
                      ["a"]}}, "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}, "q": {"allOf":
                      [{"$ref": "#/$defs/C"}]}, "r": {"anyOf": [{"$ref": "#/$defs/P"}, {"type": "null"}]}}})")};
}

std::vector<std::vector<uint8_t>> json_output_seeds() {
  return {bytes_of(R"({"a": [1, -2.5e+3, 0, true, false, null, {"b": "x\"\\\u00e9\n"}], "c": {}})"),
          bytes_of(" {\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\": [[], {}, \"\"]}"), bytes_of("{}")};
}

// ------------------------------------------------------------------ tool calls

// Any text as a model's answer, in both forms, free and held to a call: read as calls (each one's
// arguments a JSON object's text, the content the text before them) or as the content whole; what may be
// streamed never exceeds the text nor shrinks as it grows. Any text as a request's tools: read or refused
// with a message.
Outcome run_tool_calls(std::span<const uint8_t> input) {
  const std::string_view text(reinterpret_cast<const char*>(input.data()), input.size());
  bool calls = false;
  for (const model::ToolPrompt& prompt : {model::ToolPrompt{model::ToolForm::llama3_json, ""},
                                          model::ToolPrompt{model::ToolForm::hermes, ""}}) {
    for (const bool required : {false, true}) {
      const model::ParsedAnswer answer = model::parse_tool_calls(prompt, text, required);
      if (answer.calls.empty()) {
        require(answer.content == text, "tool_calls: no calls, and the content is not the text");
        continue;
      }
      calls = true;
      require(text.starts_with(answer.content), "tool_calls: the content is not the text before the calls");
      for (const model::ToolCall& call : answer.calls)
        require(nlohmann::json::parse(call.arguments, nullptr, false).is_object(),
                "tool_calls: arguments that are not a JSON object: " + call.arguments);
    }
    size_t before = 0;
    for (size_t n = 0; n <= std::min<size_t>(text.size(), 256); ++n) {
      const size_t now = model::streamable_content(prompt, text.substr(0, n), false);
      require(now >= before && now <= n, "tool_calls: streamable text shrank or ran past the text");
      before = now;
    }
  }
  try {
    model::parse_tools(text);
    return {true, ""};
  } catch (const std::invalid_argument& e) {
    if (calls) return {true, ""};
    return {false, e.what()};
  }
}

// Any text as a GBNF grammar: compiled or refused with a message; a compiled one reads a few texts,
// and whatever prefix of them it takes it took byte by byte the same way. Any text as a regular
// expression: refused by offset, or made a grammar that compiles (or is refused only for its size).
Outcome run_grammar(std::span<const uint8_t> input) {
  try {
    const std::string text = worker::Grammar::regex_text(
        std::string_view(reinterpret_cast<const char*>(input.data()), input.size()));
    try {
      worker::Grammar::compile(text);
    } catch (const std::invalid_argument& e) {
      require(std::string(e.what()).find("more than") != std::string::npos,
              std::string("grammar: a regex's grammar does not compile: ") + e.what() + "\n" + text);
    }
  } catch (const std::invalid_argument&) {
    // refused as a regex: fine, it is read as a grammar below
  }
  std::shared_ptr<const worker::Grammar> grammar;
  try {
    grammar =
        worker::Grammar::compile(std::string_view(reinterpret_cast<const char*>(input.data()), input.size()));
  } catch (const std::invalid_argument& e) {
    return {false, e.what()};
  }
  for (const char* text : {"abc 123", "{\"a\": [1, 2]}", "\xc3\xa9\xe2\x82\xac-", ""}) {
    worker::GrammarPrefix whole(grammar.get()), bytes(grammar.get());
    const bool all = whole.feed(text);
    size_t taken = 0;
    while (text[taken] != '\0' && bytes.feed(static_cast<unsigned char>(text[taken]))) ++taken;
    require(all == (text[taken] == '\0'), "grammar: feeding a text whole and byte by byte disagree");
    require(whole.complete() == bytes.complete(), "grammar: whole and byte by byte end in different states");
  }
  return {true, ""};
}

std::vector<std::vector<uint8_t>> grammar_seeds() {
  return {bytes_of("root ::= expr\nexpr ::= term (\"+\" term)*\nterm ::= [0-9]+ | \"(\" expr \")\"\n"),
          bytes_of("# json-ish\nroot ::= \"{\" ws (pair (\",\" ws pair)*)? \"}\"\npair ::= str \":\" ws str\n"
                   "str ::= \"\\\"\" [^\"\\\\]{0,8} \"\\\"\"\nws ::= [ \\t\\n]?\n"),
          bytes_of("root ::= (\n  \"a\" |\n  [\\u00e0-\\u00ff]{2,3}\n) . [^a-c]?\n")};
}

// The base model of the lora_adapter target: the smallest shape gguf_model's seeds use, as Q4_0.
const std::string& lora_base_path() {
  static const std::string path = [] {
    const model::LlamaShape shape{
        .n_embd = 32, .n_layer = 1, .n_head = 2, .n_head_kv = 1, .n_ff = 64, .n_vocab = 360, .n_ctx = 64};
    const std::string p = (scratch_dir().path() / "lora-base.gguf").string();
    model::write_random_llama(p, shape, kernels::DType::Q4_0, 3);
    return p;
  }();
  return path;
}

// A LoRA adapter file for that model: refused by name, or read, added to the model and run.
Outcome run_lora_adapter(std::span<const uint8_t> input) {
  const std::string path = input_file().write(input);
  auto model = worker::LlamaModel::load(lora_base_path());
  try {
    model->add_lora(model::LoraAdapter::read_gguf(path, model->config()));
  } catch (const model::GgufError& e) {
    return {false, e.what()};
  }
  static kernels::ThreadPool pool(1);
  worker::KvCache cache(model->shard_config(), 1, 16);
  worker::ForwardBatch batch = worker::ForwardBatch::single({1, 40, 41}, 0, {0}, false);
  batch.seq_adapters = {1};
  std::vector<float> logits;
  model->forward(batch, cache, pool, logits);
  require(logits.size() == static_cast<size_t>(model->config().n_vocab), "one row of logits");
  return {true, ""};
}

std::vector<std::vector<uint8_t>> lora_adapter_seeds() {
  const model::LlamaConfig config = model::LlamaConfig::from_gguf(*model::GgufFile::open(lora_base_path()));
  const fs::path path = scratch_dir().path() / "seed-lora.gguf";
  std::vector<std::vector<uint8_t>> seeds;
  model::make_random_lora(config, 2, 4, 0.5f, 1, {model::LayerMatrix::attn_q, model::LayerMatrix::ffn_down},
                          true)
      .write_gguf(path.string(), "llama", kernels::DType::F16);
  seeds.push_back(read_bytes(path));
  model::make_random_lora(config, 3, 0, 0.5f, 2, {model::LayerMatrix::attn_v})
      .write_gguf(path.string(), "llama", kernels::DType::F32);
  seeds.push_back(read_bytes(path));
  return seeds;
}

std::vector<std::vector<uint8_t>> tool_calls_seeds() {
  return {
      bytes_of(
          R"({"name": "get_weather", "parameters": {"city": "Oslo", "days": [1, 2.5]}}; {"name": "n", "arguments": {}})"),
      bytes_of("Sure.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"s\": "
               "\"}{\"}}\n</tool_call>\n"),
      bytes_of(
          R"([{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}])"),
      bytes_of("<|python_tag|>{\"name\": \"x\", \"parameters\": {\"\u00e9\": null}}")};
}

}  // namespace

const std::vector<Target>& targets() {
  static const std::vector<Target> all = {
      {"gguf_model", run_gguf_model, gguf_model_seeds},
      {"gguf_split", run_gguf_split, gguf_split_seeds},
      {"safetensors", run_safetensors, safetensors_seeds},
      {"client_protocol", run_client_protocol, client_protocol_seeds},
      {"worker_protocol", run_worker_protocol, worker_protocol_seeds},
      {"cluster_config", run_cluster_config, cluster_config_seeds},
      {"tokenizer_text", run_tokenizer_text, tokenizer_text_seeds},
      {"hf_tokenizer", run_hf_tokenizer, hf_tokenizer_seeds},
      {"hf_config", run_hf_config, hf_config_seeds},
      {"imatrix", run_imatrix, imatrix_seeds},
      {"openai_request", run_openai_request, openai_request_seeds},
      {"json_output", run_json_output, json_output_seeds},
      {"json_schema", run_json_schema, json_schema_seeds},
      {"tool_calls", run_tool_calls, tool_calls_seeds},
      {"grammar", run_grammar, grammar_seeds},
      {"lora_adapter", run_lora_adapter, lora_adapter_seeds},
  };
  return all;
}

const Target& target_by_name(const std::string& name) {
  std::string names;
  for (const Target& target : targets()) {
    if (name == target.name) return target;
    names += names.empty() ? "" : ", ";
    names += target.name;
  }
  throw std::invalid_argument("unknown fuzz target '" + name + "' (known: " + names + ")");
}

}  // namespace nibble::fuzz
