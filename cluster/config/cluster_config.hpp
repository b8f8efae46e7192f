#pragma once
// The configuration of the distributed service, read from YAML by every rank of
//   mpirun -np 1+T*P nibble serve --config cluster.yaml
// Every rank parses the same file, so a bad file fails everywhere with the same message, before any
// communicator exists. Validation is strict: an unknown key or a value of the wrong type is an error
// (a typo silently falling back to a default is the worst failure mode of a config file).
//
// Schema (only model.path is required; everything else has the default shown):
//
//   model:
//     path: target.gguf          # GGUF file or HF checkpoint directory of the target (required)
//   draft:                       # optional; present = speculative decoding on
//     method: model              # model: a draft model proposes | ngram: prompt lookup, no model
//                                # (speculative/ngram_draft.hpp)
//     path: draft.gguf           # method model: GGUF file or HF directory of the draft (required)
//     max_draft_tokens: 4        # tokens proposed per step, 1..16
//     adaptive: true             # false: always propose max_draft_tokens, never switch off
//     placement: last_stage      # method model: last_stage | own_rank (see DraftPlacement)
//     ngram_min: 1               # method ngram: the shortest suffix looked up, 1..64
//     ngram_max: 4               # method ngram: the longest, ngram_min..64
//   lora_adapters:               # optional: LoRA adapters served on the base model (vLLM's --lora-modules,
//     - name: sql                # llama.cpp's --lora); a request names one (client `adapter`, OpenAI
//       path: sql-lora.gguf      # `model`); llama.cpp's GGUF adapter or a PEFT directory
//       (model/lora_adapter.hpp), scale: 1.0               # scaled as llama.cpp scales it; device: cpu only
//   parallel:
//     tensor: 1                  # T: tensor-parallel ranks per pipeline stage, >= 1
//     pipeline: 1                # P: pipeline stages, >= 1
//     micro_batches: <pipeline>  # micro-batches in flight through the pipeline, >= 1
//   device: cpu                  # cpu | cuda (workers on GPU local rank % GPUs; CUDA builds only)
//   int4_kernels: measured       # device: cuda: measured | cuda_cores | tensor_cores | half2
//                                # (Int4KernelChoice)
//   int4_layout: rows            # device: cuda: rows | tiles | cutlass | measured (Int4LayoutChoice;
//                                # tiles and cutlass refuse cuda_cores and half2; cutlass: one copy,
//                                # CUTLASS's GEMM only; measured: per shape, timed at load; needs
//                                # int4_kernels: measured)
//   cutlass_gemm: false          # device: cuda: true adds CUTLASS's Hopper GEMMs as candidates (a second
//                                # copy of the INT4 weights; worker::CudaModelOptions::cutlass_gemm;
//                                # refused with int4_kernels: cuda_cores)
//   int8_activations: false      # device: cuda: true runs one-row INT4 products (batch-1 decode) on the
//                                # W4A8 GEMV, activations rounded to 8 bits (needs int4_layout: rows;
//                                # worker::CudaModelOptions::int8_activations)
//   prefill_attention: cuda_cores  # device: cuda: cuda_cores | tensor_cores: prompt chunks' attention on
//                                # the tensor cores (FlashAttention-2's schedule; head_dim 64 / 128, a
//                                # grouping up to 64; worker::CudaModelOptions::mma_prefill_attention)
//   decode_split_tokens: 256     # device: cuda: positions a decode attention block takes, a multiple of
//                                # 32, whatever the batch (worker::CudaModelOptions::decode_split_tokens;
//                                # `nibble bench-gpu`'s decode attention table times the sizes)
//   cuda_graphs: true            # device: cuda: false launches every pass's kernels directly (vLLM's
//                                # --enforce-eager): decode steps are otherwise replayed from CUDA graphs,
//                                # tensor shards on NCCL included (worker::CudaModelOptions::graphs)
//   threads: auto                # CPU threads per worker: an integer >= 1, or auto
//   chat_template: auto          # how a conversation (a request's messages) becomes a prompt: auto = the
//                                # format of the model's chat template (GGUF tokenizer.chat_template, HF
//                                # tokenizer_config.json), as llama.cpp detects it;
//                                # or a format's name (model/chat_template.hpp: chatml, llama2, llama3, ...)
//   server:
//     listen: "tcp://127.0.0.1:5555"  # client ROUTER endpoint, tcp:// or ipc://
//     max_queue: 256             # queued requests before new ones are refused as "overloaded"
//     max_message_bytes: 1048576 # client frames larger than this are rejected
//     step_timeout_ms: 60000     # a step without a result for this long means a worker is lost
//   scheduler:
//     max_batch_tokens: 512      # token budget per step (decode tokens + prefill chunks)
//     max_running: 64            # sequences in the running batch
//     prefill_chunk: 256         # prompt tokens per sequence per step, <= max_batch_tokens
//   kv_cache:
//     block_size: 16             # tokens per KV block, a power of two
//     memory_fraction: 0.5       # share of a worker's free memory given to KV blocks, in (0, 1]
//     num_blocks: 0              # blocks per worker; 0 = derive from memory_fraction
//     prefix_caching: true       # a prompt starts after the longest cached prefix of whole blocks that
//                                # earlier sequences computed (vLLM's automatic prefix caching;
//                                # cluster/kv_block_pool.hpp); false computes every prompt in full
//     dtype: f16                 # or llama.cpp's cache types q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl (CPU and
//                                # CUDA workers alike; KvCacheConfig below)
//     k_dtype: <dtype>           # one side's type (llama.cpp's --cache-type-k / --cache-type-v)
//     v_dtype: <dtype>
//     rotation: true             # llama.cpp's Walsh-Hadamard rotation of a quantized cache (heads of 64+)
//   context: 4096                # max prompt + generated tokens per sequence
//   openai:                      # optional; present = the OpenAI-compatible HTTP API (`nibble openai`'s,
//                                # cluster/openai_server) served by the coordinator's process too
//     listen: "127.0.0.1:8000"   # HOST:PORT; port 0 takes a free one (the start-up log names it)
//     model_name: <file name>    # the name /v1/models lists; default: the model path's file name, less .gguf
//     threads: 16                # HTTP requests served at once
//     chat_max_tokens: 256       # max_tokens of a chat request that gives none
//     api_key_env: NAME          # optional: /v1/* needs "Authorization: Bearer <key>", the key read from
//     this
//                                # environment variable at start-up (so neither file nor log holds it)
//
// A section may be left empty (`scheduler:` with every key commented out) to take its defaults.

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace nibble::cluster {

// A configuration that cannot be used. The message reads
//   "<source>: <key.path>: <what is wrong> (line N)"
// with the key path and line left out where there is none (an unreadable file, an empty one).
class ConfigError : public std::runtime_error {
 public:
  ConfigError(std::string source, std::string key_path, int line, const std::string& detail);

  const std::string& source() const { return source_; }
  const std::string& key_path() const { return key_path_; }  // e.g. "parallel.tensor"; may be empty
  int line() const { return line_; }                         // 1-based; 0 when unknown

 private:
  std::string source_;
  std::string key_path_;
  int line_;
};

enum class Device { cpu, cuda };

// Where the draft model of speculative decoding runs.
enum class DraftPlacement {
  last_stage,  // in the sampling worker (tensor rank 0 of the last pipeline stage)
  own_rank,    // in a process of its own: the last world rank (world_size() counts it)
};

// How a GPU worker's group-wise INT4 matrices pick their kernels (worker::Int4Kernels): measured
// times every candidate at load and takes the fastest per row range; cuda_cores, tensor_cores and
// half2 (one row on the half2 GEMV, the tensor cores above) fix the choice, so that every process of a job,
// and `nibble generate --int4-kernels` with the same value, computes each product with the same kernels
// (bit-identical runs across processes).
enum class Int4KernelChoice { measured, cuda_cores, tensor_cores, half2 };
// How a GPU worker lays out group-wise INT4 and GGUF Q4_K matrices (worker::Int4Layout): rows as
// loaded; tiles, repacked at load into the tensor-core kernels' chunks; or cutlass, group-wise INT4
// only in CUTLASS's order for its Hopper GEMM. The CUDA-core and half2 GEMVs read neither of the last
// two, so int4_kernels: cuda_cores or half2 with them is a config error. measured: per group-wise INT4 shape,
// the one of the three whose kernels decode fastest when timed at load (needs int4_kernels: measured; refuses
// cutlass_gemm: true).
enum class Int4LayoutChoice { rows, tiles, cutlass, measured };

const char* device_name(Device device);
const char* int4_kernel_choice_name(Int4KernelChoice choice);
const char* int4_layout_choice_name(Int4LayoutChoice choice);
const char* draft_placement_name(DraftPlacement placement);

struct ModelConfig {
  // As written, or resolved against the config file's folder by load_cluster_config; "dummy:<shape>"
  // (random weights, no file) is kept as written.
  std::string path;

  bool operator==(const ModelConfig&) const = default;
};

// What proposes the draft tokens of speculative decoding.
enum class DraftMethod {
  model,  // a small draft model (path)
  ngram,  // prompt lookup: the continuation of the sequence's last n tokens where they occurred before
};

struct DraftConfig {
  DraftMethod method = DraftMethod::model;
  std::string path;                  // method model; resolved like ModelConfig::path
  int ngram_min = 1, ngram_max = 4;  // method ngram: suffix lengths looked up
  int max_draft_tokens = 4;
  // Adaptive k per sequence and the measured off-switch (speculative/speculator.hpp); false
  // proposes max_draft_tokens at every step (for measurements and tests of exactness).
  bool adaptive = true;
  DraftPlacement placement = DraftPlacement::last_stage;

  bool operator==(const DraftConfig&) const = default;
};

// A LoRA adapter the service serves (model/lora_adapter.hpp).
struct LoraAdapterConfig {
  std::string name;  // what requests call it; unique
  std::string path;  // resolved like ModelConfig::path
  double scale = 1.0;

  bool operator==(const LoraAdapterConfig&) const = default;
};

struct ParallelConfig {
  int tensor = 1;
  int pipeline = 1;
  int micro_batches = 1;  // defaults to `pipeline`: one micro-batch per stage keeps every stage busy

  bool operator==(const ParallelConfig&) const = default;
};

struct ServerConfig {
  std::string listen = "tcp://127.0.0.1:5555";  // loopback by default: exposing it is a decision
  int max_queue = 256;
  int64_t max_message_bytes = 1 << 20;
  int step_timeout_ms = 60000;  // fail every request and end the job when a step takes longer
  // Clients may load and unload LoRA adapters while the job runs (vLLM's
  // VLLM_ALLOW_RUNTIME_LORA_UPDATING): off by default, since a load reads a path the client names.
  bool lora_updates = false;

  bool operator==(const ServerConfig&) const = default;
};

struct OpenAiConfig {
  std::string host = "127.0.0.1";
  int port = 8000;         // 0: any free port
  std::string model_name;  // empty (the key left out): the model path's file name without .gguf
  int threads = 16;
  int chat_max_tokens = 256;
  std::string api_key_env;  // empty: no key asked for

  bool operator==(const OpenAiConfig&) const = default;
};

struct SchedulerSettings {
  int max_batch_tokens = 512;
  int max_running = 64;
  int prefill_chunk = 256;

  bool operator==(const SchedulerSettings&) const = default;
};

struct KvCacheConfig {
  int block_size = 16;
  double memory_fraction = 0.5;
  int64_t num_blocks = 0;  // 0 = derive from memory_fraction
  bool prefix_caching = true;
  // How K and V are stored: f16, or as llama.cpp's --cache-type-k/-v: q8_0 (8-bit blocks of 32 with an
  // fp16 scale, like vLLM's 8-bit kv_cache_dtype: 1.9x the blocks in the same memory), q5_1, q5_0, q4_1,
  // q4_0 or iq4_nl (3.6x).
  std::string dtype = "f16";
  // One side's type instead of dtype's (llama.cpp's --cache-type-k / --cache-type-v); empty: dtype.
  std::string k_dtype, v_dtype;
  // A quantized cache's Q, K and V rotated by a Walsh-Hadamard transform as llama.cpp's are (heads of 64
  // or more); false is llama.cpp's LLAMA_ATTN_ROT_DISABLE=1.
  bool rotation = true;

  bool operator==(const KvCacheConfig&) const = default;
};

struct ClusterConfig {
  // Where the configuration came from (a file path or the name given to parse_cluster_config);
  // for messages only, so it does not take part in ==.
  std::string source;

  ModelConfig model;
  std::optional<DraftConfig> draft;              // nullopt = no speculative decoding
  std::vector<LoraAdapterConfig> lora_adapters;  // request adapter i + 1 is lora_adapters[i]
  ParallelConfig parallel;
  Device device = Device::cpu;
  Int4KernelChoice int4_kernels = Int4KernelChoice::measured;
  Int4LayoutChoice int4_layout = Int4LayoutChoice::rows;
  bool cutlass_gemm = false;
  bool int8_activations = false;
  bool cuda_graphs = true;
  bool tensor_core_prefill_attention = false;  // prefill_attention: tensor_cores
  int decode_split_tokens = 256;
  int threads = 0;  // 0 = auto; see worker_threads()
  std::string chat_template = "auto";
  ServerConfig server;
  SchedulerSettings scheduler;
  KvCacheConfig kv_cache;
  int context = 4096;
  std::optional<OpenAiConfig> openai;  // nullopt = no HTTP API in the coordinator's process

  // Processes mpirun must start: the coordinator plus tensor * pipeline workers, plus the draft's
  // own rank when it has one.
  int world_size() const { return 1 + parallel.tensor * parallel.pipeline + (draft_has_own_rank() ? 1 : 0); }
  // A draft model to load (speculative decoding with method model).
  bool has_draft_model() const { return draft.has_value() && draft->method == DraftMethod::model; }
  bool draft_has_own_rank() const {
    return draft.has_value() && draft->method == DraftMethod::model &&
           draft->placement == DraftPlacement::own_rank;
  }
  int num_workers() const { return parallel.tensor * parallel.pipeline; }

  // Threads per worker: `threads` if set, else the host's cores shared among the workers on that
  // host (only known at start-up, hence not resolved while parsing), at least 1.
  int worker_threads(int host_cores, int workers_on_host) const;

  bool operator==(const ClusterConfig& other) const;
};

// Reads and validates a configuration file. Relative model and draft paths are resolved against the
// file's folder, so a config works whatever directory mpirun is started from.
// Throws ConfigError (also when the file cannot be read).
ClusterConfig load_cluster_config(const std::string& path);

// Validates YAML text; source_name stands for the file in messages. Paths are kept as written.
ClusterConfig parse_cluster_config(const std::string& yaml_text, const std::string& source_name);

// The effective configuration (defaults filled in) as YAML, for the start-up log. Parsing the result
// gives back an equal ClusterConfig.
std::string render_cluster_config(const ClusterConfig& config);

}  // namespace nibble::cluster
