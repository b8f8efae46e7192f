// The `nibble serve` YAML configuration: values, defaults, and one test per class of error, each
// checking that the message points at the right key and line.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "cluster/config/cluster_config.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::cluster {
namespace {

const std::filesystem::path kRepoRoot = nibble::test::source_dir();

// Parses text that must be rejected; checks the key path and line, and that the message carries
// the source, the key path, "(line N)" and every fragment.
void expect_error(const std::string& yaml, const std::string& key_path, int line,
                  const std::vector<std::string>& fragments = {}) {
  SCOPED_TRACE(yaml);
  try {
    parse_cluster_config(yaml, "test.yaml");
    ADD_FAILURE() << "expected a ConfigError";
  } catch (const ConfigError& error) {
    const std::string message = error.what();
    EXPECT_EQ(error.source(), "test.yaml");
    EXPECT_EQ(error.key_path(), key_path) << message;
    EXPECT_EQ(error.line(), line) << message;
    EXPECT_EQ(message.rfind("test.yaml: ", 0), 0u) << message;
    EXPECT_NE(message.find(key_path), std::string::npos) << message;
    EXPECT_NE(message.find("(line " + std::to_string(line) + ")"), std::string::npos) << message;
    for (const auto& fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "'" << fragment << "' missing from: " << message;
    }
  }
}

TEST(ClusterConfig, MinimalConfigTakesDefaults) {
  const ClusterConfig config = parse_cluster_config("model: {path: target.gguf}\n", "minimal.yaml");
  EXPECT_EQ(config.source, "minimal.yaml");
  EXPECT_EQ(config.model.path, "target.gguf");
  EXPECT_FALSE(config.draft.has_value());
  EXPECT_FALSE(config.openai.has_value());
  EXPECT_EQ(config.parallel.tensor, 1);
  EXPECT_EQ(config.parallel.pipeline, 1);
  EXPECT_EQ(config.parallel.micro_batches, 1);
  EXPECT_EQ(config.device, Device::cpu);
  EXPECT_EQ(config.int4_kernels, Int4KernelChoice::measured);
  EXPECT_EQ(config.int4_layout, Int4LayoutChoice::rows);
  EXPECT_FALSE(config.cutlass_gemm);
  EXPECT_EQ(config.threads, 0);
  EXPECT_EQ(config.server.listen, "tcp://127.0.0.1:5555");
  EXPECT_EQ(config.server.max_queue, 256);
  EXPECT_EQ(config.server.max_message_bytes, 1048576);
  EXPECT_EQ(config.scheduler.max_batch_tokens, 512);
  EXPECT_EQ(config.scheduler.max_running, 64);
  EXPECT_EQ(config.scheduler.prefill_chunk, 256);
  EXPECT_EQ(config.kv_cache.block_size, 16);
  EXPECT_DOUBLE_EQ(config.kv_cache.memory_fraction, 0.5);
  EXPECT_EQ(config.kv_cache.num_blocks, 0);
  EXPECT_TRUE(config.kv_cache.prefix_caching);
  EXPECT_EQ(config.chat_template, "auto");
  EXPECT_EQ(config.context, 4096);
  EXPECT_EQ(config.world_size(), 2);
  ClusterConfig expected;  // the struct's own defaults are the documented ones
  expected.model.path = "target.gguf";
  EXPECT_EQ(config, expected);
}

TEST(ClusterConfig, FullConfigReadsEveryKey) {
  const ClusterConfig config = parse_cluster_config(R"(
model: {path: /models/target.gguf}
draft:
  path: draft.gguf
  max_draft_tokens: 6
  adaptive: false
  placement: own_rank
parallel: {tensor: 2, pipeline: 3, micro_batches: 4}
device: cuda
int4_kernels: tensor_cores
int4_layout: tiles
cutlass_gemm: true
threads: 7
server:
  listen: "ipc:///tmp/nibble.sock"
  max_queue: 10
  max_message_bytes: 4096
scheduler:
  max_batch_tokens: 2048
  max_running: 8
  prefill_chunk: 1024
kv_cache:
  block_size: 32
  memory_fraction: 1
  num_blocks: 1000
  prefix_caching: false
context: 8192
openai:
  listen: "0.0.0.0:8080"
  model_name: llama-70b
  threads: 4
  chat_max_tokens: 512
  api_key_env: NIBBLE_KEY
)",
                                                    "full.yaml");
  EXPECT_EQ(config.model.path, "/models/target.gguf");
  ASSERT_TRUE(config.draft.has_value());
  EXPECT_EQ(config.draft->path, "draft.gguf");
  EXPECT_EQ(config.draft->max_draft_tokens, 6);
  EXPECT_FALSE(config.draft->adaptive);
  EXPECT_EQ(config.draft->placement, DraftPlacement::own_rank);
  EXPECT_EQ(config.parallel.tensor, 2);
  EXPECT_EQ(config.parallel.pipeline, 3);
  EXPECT_EQ(config.parallel.micro_batches, 4);
  EXPECT_EQ(config.device, Device::cuda);
  EXPECT_EQ(config.int4_kernels, Int4KernelChoice::tensor_cores);
  EXPECT_EQ(config.int4_layout, Int4LayoutChoice::tiles);
  EXPECT_TRUE(config.cutlass_gemm);
  EXPECT_EQ(config.threads, 7);
  EXPECT_EQ(config.worker_threads(64, 4), 7);
  EXPECT_EQ(config.server.listen, "ipc:///tmp/nibble.sock");
  EXPECT_EQ(config.server.max_queue, 10);
  EXPECT_EQ(config.server.max_message_bytes, 4096);
  EXPECT_EQ(config.scheduler.max_batch_tokens, 2048);
  EXPECT_EQ(config.scheduler.max_running, 8);
  EXPECT_EQ(config.scheduler.prefill_chunk, 1024);
  EXPECT_EQ(config.kv_cache.block_size, 32);
  EXPECT_DOUBLE_EQ(config.kv_cache.memory_fraction, 1.0);
  EXPECT_EQ(config.kv_cache.num_blocks, 1000);
  EXPECT_FALSE(config.kv_cache.prefix_caching);
  EXPECT_EQ(config.context, 8192);
  ASSERT_TRUE(config.openai.has_value());
  EXPECT_EQ(config.openai->host, "0.0.0.0");
  EXPECT_EQ(config.openai->port, 8080);
  EXPECT_EQ(config.openai->model_name, "llama-70b");
  EXPECT_EQ(config.openai->threads, 4);
  EXPECT_EQ(config.openai->chat_max_tokens, 512);
  EXPECT_EQ(config.openai->api_key_env, "NIBBLE_KEY");
  EXPECT_EQ(config.world_size(), 8);  // 1 coordinator + 6 workers + the draft's own rank
  EXPECT_EQ(config.num_workers(), 6);
}

TEST(ClusterConfig, DerivedDefaults) {
  const ClusterConfig config =
      parse_cluster_config("model: {path: m.gguf}\nparallel: {pipeline: 3}\ndraft: {path: d.gguf}\n", "t");
  EXPECT_EQ(config.parallel.micro_batches, 3);  // follows pipeline
  ASSERT_TRUE(config.draft.has_value());
  EXPECT_EQ(config.draft->max_draft_tokens, 4);
  EXPECT_TRUE(config.draft->adaptive);
  EXPECT_EQ(config.draft->placement, DraftPlacement::last_stage);
  EXPECT_EQ(config.draft->method, DraftMethod::model);
  EXPECT_TRUE(config.has_draft_model());
  // Prompt lookup: no draft model, so no path, no placement and no rank of its own.
  const ClusterConfig lookup = parse_cluster_config(
      "model: {path: m.gguf}\ndraft: {method: ngram, ngram_max: 3, max_draft_tokens: 5}\n", "t");
  ASSERT_TRUE(lookup.draft.has_value());
  EXPECT_EQ(lookup.draft->method, DraftMethod::ngram);
  EXPECT_EQ(lookup.draft->ngram_min, 1);
  EXPECT_EQ(lookup.draft->ngram_max, 3);
  EXPECT_EQ(lookup.draft->max_draft_tokens, 5);
  EXPECT_FALSE(lookup.has_draft_model());
  EXPECT_FALSE(lookup.draft_has_own_rank());
  EXPECT_EQ(lookup.world_size(), 2);
  EXPECT_EQ(parse_cluster_config(render_cluster_config(lookup), "rendered"), lookup);
  // threads: auto shares the cores among the host's workers, never below one.
  EXPECT_EQ(config.worker_threads(16, 4), 4);
  EXPECT_EQ(config.worker_threads(2, 3), 1);
  EXPECT_EQ(config.worker_threads(8, 0), 8);
}

TEST(ClusterConfig, EmptySectionsTakeDefaults) {
  const ClusterConfig config =
      parse_cluster_config("model:\n  path: m.gguf\nscheduler:\n  # all defaults\n", "t");
  EXPECT_EQ(config.scheduler.max_batch_tokens, 512);
}

TEST(ClusterConfig, ThreadsAuto) {
  EXPECT_EQ(parse_cluster_config("model: {path: m}\nthreads: auto\n", "t").threads, 0);
  expect_error("model: {path: m}\nthreads: many\n", "threads", 2,
               {"expected an integer or 'auto'", "'many'"});
  expect_error("model: {path: m}\nthreads: 0\n", "threads", 2, {"at least 1"});
}

TEST(ClusterConfig, UnknownKeys) {
  expect_error(
      "model: {path: m}\nparallel:\n  tensr: 2\n", "parallel.tensr", 3,
      {"unknown key 'tensr'", "did you mean 'tensor'", "allowed keys: tensor, pipeline, micro_batches"});
  expect_error("model: {path: m}\n\n\nspeculate: true\n", "speculate", 4,
               {"unknown key", "allowed keys: model,"});
  expect_error("model:\n  path: m\n  sha: abc\n", "model.sha", 3, {"allowed keys: path"});
  expect_error("model: {path: m}\nkv_cache: {block_size: 16, blocks: 9}\n", "kv_cache.blocks", 2);
  expect_error("model: {path: m}\nkv_cache:\n  prefix_caching: yes please\n", "kv_cache.prefix_caching", 3,
               {"'yes please'"});
  expect_error("model: {path: m}\nchat_template: llama-3\n", "chat_template", 2,
               {"unknown chat format 'llama-3'", "auto, chatml, llama2"});
  EXPECT_EQ(parse_cluster_config("model: {path: m}\nchat_template: gemma\n", "t").chat_template, "gemma");
}

TEST(ClusterConfig, WrongTypes) {
  expect_error("model: {path: m}\nparallel:\n  tensor: two\n", "parallel.tensor", 3,
               {"parallel.tensor: expected an integer, got 'two' (line 3)"});
  expect_error("model: {path: m}\nparallel:\n  tensor: 2.5\n", "parallel.tensor", 3, {"expected an integer"});
  expect_error("model: {path: m}\nparallel: 2\n", "parallel", 2, {"expected a mapping, got '2'"});
  expect_error("model: m.gguf\n", "model", 1, {"expected a mapping"});
  expect_error("model: {path: [a, b]}\n", "model.path", 1, {"expected a string, got a list"});
  expect_error("model: {path: m}\ncontext:\n", "context", 2, {"expected an integer, got nothing"});
  expect_error("model: {path: m}\nkv_cache:\n  memory_fraction: half\n", "kv_cache.memory_fraction", 3,
               {"expected a number, got 'half'"});
  expect_error("model: {path: m}\nserver:\n  max_queue: {a: 1}\n", "server.max_queue", 3, {"got a mapping"});
  expect_error("model: {path: m}\nscheduler:\n  max_running: 99999999999999999999\n", "scheduler.max_running",
               3);
}

TEST(ClusterConfig, OutOfRangeValues) {
  expect_error("model: {path: m}\nparallel: {tensor: 0}\n", "parallel.tensor", 2,
               {"between 1 and 4096, got 0"});
  expect_error("model: {path: m}\nparallel:\n  pipeline: -1\n", "parallel.pipeline", 3, {"got -1"});
  expect_error("model: {path: m}\nparallel:\n  micro_batches: 0\n", "parallel.micro_batches", 3);
  expect_error("model: {path: m}\nserver:\n  listen: \"http://127.0.0.1:80\"\n", "server.listen", 3,
               {"tcp://", "ipc://", "http://127.0.0.1:80"});
  expect_error("model: {path: m}\nserver:\n  listen: \"tcp://127.0.0.1\"\n", "server.listen", 3, {"port"});
  expect_error("model: {path: m}\nopenai:\n  listen: \"localhost\"\n", "openai.listen", 3,
               {"HOST:PORT", "localhost"});
  expect_error("model: {path: m}\nopenai:\n  listen: \"h:70000\"\n", "openai.listen", 3, {"0-65535"});
  expect_error("model: {path: m}\nopenai:\n  listen: \"http://h:80\"\n", "openai.listen", 3, {"no scheme"});
  expect_error("model: {path: m}\nopenai:\n  listen: \":80\"\n", "openai.listen", 3, {"HOST:PORT"});
  expect_error("model: {path: m}\nopenai: {threads: 0}\n", "openai.threads", 2);
  expect_error("model: {path: m}\nopenai: {port: 80}\n", "openai.port", 2, {"unknown key"});
  expect_error("model: {path: m}\nkv_cache:\n  memory_fraction: 0\n", "kv_cache.memory_fraction", 3,
               {"(0, 1]"});
  expect_error("model: {path: m}\nkv_cache:\n  memory_fraction: 1.5\n", "kv_cache.memory_fraction", 3);
  expect_error("model: {path: m}\nkv_cache:\n  memory_fraction: .nan\n", "kv_cache.memory_fraction", 3);
  expect_error("model: {path: m}\nkv_cache:\n  block_size: 24\n", "kv_cache.block_size", 3, {"power of two"});
  expect_error("model: {path: m}\ndraft:\n  path: d\n  max_draft_tokens: 17\n", "draft.max_draft_tokens", 4,
               {"between 1 and 16, got 17"});
  expect_error("model: {path: m}\ndraft:\n  path: d\n  max_draft_tokens: 0\n", "draft.max_draft_tokens", 4);
  expect_error("model: {path: m}\ndraft:\n  path: d\n  adaptive: maybe\n", "draft.adaptive", 4);
  expect_error("model: {path: m}\ndraft:\n  path: d\n  placement: first_stage\n", "draft.placement", 4,
               {"last_stage, own_rank"});
  expect_error("model: {path: m}\ndraft:\n  method: eagle\n", "draft.method", 3, {"model, ngram"});
  expect_error("model: {path: m}\ndraft:\n  method: ngram\n  path: d\n", "draft.path", 4, {"no draft model"});
  expect_error("model: {path: m}\ndraft:\n  method: ngram\n  placement: own_rank\n", "draft.placement", 4,
               {"no draft model to place"});
  expect_error("model: {path: m}\ndraft:\n  method: ngram\n  ngram_min: 3\n  ngram_max: 2\n",
               "draft.ngram_max", 5, {"ngram_max 2 is below ngram_min 3"});
  expect_error("model: {path: m}\ndraft:\n  path: d\n  ngram_max: 2\n", "draft.ngram_max", 4,
               {"only with method: ngram"});
  expect_error("model: {path: m}\ndevice: gpu\n", "device", 2, {"expected one of cpu, cuda, got 'gpu'"});
  expect_error("model: {path: m}\nint4_kernels: fastest\n", "int4_kernels", 2,
               {"expected one of measured, cuda_cores, tensor_cores, half2, got 'fastest'"});
  expect_error("model: {path: m}\nint4_layout: columns\n", "int4_layout", 2,
               {"expected one of rows, tiles, cutlass, measured, got 'columns'"});
  // Tiles cannot be read by the CUDA-core kernels, whichever key comes first.
  expect_error("model: {path: m}\nint4_kernels: cuda_cores\nint4_layout: tiles\n", "int4_layout", 3,
               {"int4_kernels: cuda_cores", "tensor-core"});
  expect_error("model: {path: m}\nint4_layout: tiles\nint4_kernels: cuda_cores\n", "int4_layout", 2,
               {"int4_kernels: cuda_cores"});
  // Nor CUTLASS's order.
  expect_error("model: {path: m}\nint4_layout: cutlass\nint4_kernels: cuda_cores\n", "int4_layout", 2,
               {"int4_kernels: cuda_cores", "CUTLASS"});
  // The half2 GEMV reads the rows only, too.
  expect_error("model: {path: m}\nint4_kernels: half2\nint4_layout: tiles\n", "int4_layout", 3,
               {"int4_kernels: half2", "tensor-core"});
  expect_error("model: {path: m}\nint4_layout: cutlass\nint4_kernels: half2\n", "int4_layout", 2,
               {"int4_kernels: half2", "CUTLASS"});
  // A measured layout is timed at load: the kernels must be too; and it weighs the CUTLASS copy itself.
  expect_error("model: {path: m}\nint4_layout: measured\nint4_kernels: tensor_cores\n", "int4_layout", 2,
               {"int4_kernels: measured", "not tensor_cores"});
  expect_error("model: {path: m}\nint4_kernels: cuda_cores\nint4_layout: measured\n", "int4_layout", 3,
               {"not cuda_cores"});
  expect_error("model: {path: m}\nint4_layout: measured\ncutlass_gemm: true\n", "cutlass_gemm", 3,
               {"int4_layout: measured"});
  expect_error("model: {path: m}\nint8_activations: true\nint4_layout: measured\n", "int8_activations", 2,
               {"int4_layout: measured", "row-major"});
  // 8-bit activations: the W4A8 GEMV reads the row-major layout only.
  expect_error("model: {path: m}\nint8_activations: maybe\n", "int8_activations", 2,
               {"expected one of false, true, got 'maybe'"});
  expect_error("model: {path: m}\nint8_activations: true\nint4_layout: tiles\n", "int8_activations", 2,
               {"int4_layout: tiles", "row-major"});
  expect_error("model: {path: m}\nint4_layout: cutlass\nint8_activations: true\n", "int8_activations", 3,
               {"int4_layout: cutlass"});
  expect_error("model: {path: m}\ncuda_graphs: sometimes\n", "cuda_graphs", 2,
               {"expected one of false, true, got 'sometimes'"});
  expect_error("model: {path: m}\nprefill_attention: tensor-cores\n", "prefill_attention", 2,
               {"expected one of cuda_cores, tensor_cores, got 'tensor-cores'"});
  expect_error("model: {path: m}\ndecode_split_tokens: 48\n", "decode_split_tokens", 2,
               {"48 is not a multiple of 32"});
  expect_error("model: {path: m}\ndecode_split_tokens: 16\n", "decode_split_tokens", 2,
               {"at least 32, got 16"});
  expect_error("model: {path: m}\ndecode_split_tokens: many\n", "decode_split_tokens", 2,
               {"a multiple of 32"});
  expect_error("model: {path: m}\ncutlass_gemm: yes please\n", "cutlass_gemm", 2,
               {"expected one of false, true, got 'yes please'"});
  // The CUTLASS GEMM is not a CUDA-core kernel, whichever key comes first.
  expect_error("model: {path: m}\ncutlass_gemm: true\nint4_kernels: cuda_cores\n", "cutlass_gemm", 2,
               {"int4_kernels: cuda_cores"});
  expect_error("model: {path: ''}\n", "model.path", 1, {"must not be empty"});
  expect_error("model: {path: m}\nparallel: {tensor: 4096, pipeline: 2}\n", "parallel", 2, {"8192 workers"});
}

TEST(ClusterConfig, InconsistentValues) {
  expect_error("model: {path: m}\nscheduler:\n  max_batch_tokens: 128\n  prefill_chunk: 256\n",
               "scheduler.prefill_chunk", 4, {"must not exceed max_batch_tokens (128)"});
  // Only the budget is given: the default chunk no longer fits, and the budget is the key to blame.
  expect_error("model: {path: m}\nscheduler:\n  max_batch_tokens: 100\n", "scheduler.max_batch_tokens", 3);
  expect_error("model: {path: m}\ncontext: 1024\nkv_cache:\n  block_size: 16\n  num_blocks: 10\n",
               "kv_cache.num_blocks", 5, {"hold 160 tokens", "context (1024)"});
}

TEST(ClusterConfig, MissingRequiredKeys) {
  expect_error("parallel: {tensor: 2}\n", "model", 1, {"required key is missing from the top level"});
  expect_error("device: cpu\nmodel:\n  # path: m.gguf\n", "model.path", 2,
               {"required key is missing from 'model'"});
  expect_error("model: {path: m}\n\ndraft:\n  max_draft_tokens: 2\n", "draft.path", 3,
               {"missing from 'draft'"});
}

TEST(ClusterConfig, DuplicateKeys) {
  expect_error("model: {path: m}\nparallel:\n  tensor: 2\n  tensor: 4\n", "parallel.tensor", 4,
               {"duplicate key", "first given on line 3"});
  expect_error("model: {path: m}\ncontext: 1\ncontext: 2\n", "context", 3, {"duplicate key"});
}

TEST(ClusterConfig, SyntaxErrorsAndEmptyFiles) {
  for (const std::string text : {"", "\n\n", "# nothing but a comment\n", "---\n"}) {
    expect_error(text, "", 1, {"empty"});
  }
  expect_error("model: {path: m}\nparallel: [1, 2\n", "", 3, {"YAML syntax error"});
  expect_error("model:\n  path: m\n parallel: 2\n", "", 3, {"YAML syntax error"});
  expect_error("- model\n- parallel\n", "", 1, {"expected a mapping of keys at the top level, got a list"});
  expect_error("model: {path: m}\n---\nmodel: {path: n}\n", "", 3, {"one YAML document"});
  // Fuzzing's find: yaml-cpp 0.7's LoadAll never returned on a stray ',' (an endless run of empty
  // documents, allocating); Load reads it as an empty document.
  expect_error(",", "", 1, {"YAML syntax error: no document could be read, yet the line holds ','"});
  expect_error("# a comment\n, model: {path: m}\n", "", 2, {"YAML syntax error", "', model: {path: m}'"});
}

// Fuzzing's find: yaml-cpp reads any bytes, and a listen address holding a control byte and invalid
// UTF-8 rendered back (the start-up log's rendering) as a different configuration. A binary file
// given as the config is refused the same way.
TEST(ClusterConfig, TextMustBeUtf8WithoutControlCharacters) {
  expect_error("model:\n  path: m\xff.gguf\n", "", 2, {"byte 0xff at line 2, column 10 is not UTF-8"});
  expect_error("model: {path: m}\nserver:\n  listen: \"tcp://127.0.0.1:5555\x02\"\n", "", 3,
               {"control character U+0002 at line 3, column 32 is not allowed"});
  expect_error(std::string("GGUF\x03\0\0\0", 8), "", 1, {"control character U+0003 at line 1, column 5"});
  expect_error("model: {path: m}\n# \xc0\xaf overlong\n", "", 2,
               {"byte 0xc0 at line 2, column 3 is not UTF-8"});
  expect_error("model: {path: m}\n# \xed\xa0\x80 a surrogate\n", "", 2, {"byte 0xed", "is not UTF-8"});
  expect_error("model: {path: m}\n# \xc2\x9b a C1 control\n", "", 2, {"control character U+009B"});
  // Tabs in comments, CR LF line ends and text beyond ASCII are fine.
  EXPECT_EQ(
      parse_cluster_config("# caf\xc3\xa9\t\xe2\x9c\x93\r\nmodel:\r\n  path: m\xc3\xa9.gguf\r\n", "t.yaml")
          .model.path,
      "m\xc3\xa9.gguf");
}

TEST(ClusterConfig, RenderRoundTrips) {
  // openai: without model_name renders without it (the default, which the key cannot spell).
  const ClusterConfig unnamed = parse_cluster_config("model: {path: m}\nopenai: {threads: 2}\n", "u.yaml");
  EXPECT_EQ(parse_cluster_config(render_cluster_config(unnamed), "rendered"), unnamed);
  const ClusterConfig full = parse_cluster_config(
      "model: {path: \"/m/t a.gguf\"}\ndraft: {path: d.gguf, placement: own_rank}\nparallel: {tensor: 2, "
      "pipeline: 2}\ndevice: cuda\nint4_kernels: cuda_cores\nthreads: 3\nserver: {listen: "
      "\"tcp://0.0.0.0:7000\"}\nkv_cache: "
      "{memory_fraction: 0.9, prefix_caching: false}\nchat_template: llama3\nopenai: {listen: \"[::1]:0\", "
      "model_name: \"a: b\", api_key_env: K}\n",
      "full.yaml");
  const std::string rendered = render_cluster_config(full);
  EXPECT_NE(rendered.find("# effective configuration from full.yaml"), std::string::npos) << rendered;
  EXPECT_NE(rendered.find("micro_batches: 2"), std::string::npos) << rendered;
  EXPECT_NE(rendered.find("memory_fraction: 0.9\n"), std::string::npos) << rendered;
  EXPECT_EQ(parse_cluster_config(rendered, "rendered"), full) << rendered;

  // Fuzzing's find: a path folded from two lines, ending in "    [", was written as a plain scalar
  // that read back as something else; paths and the endpoint are now written double-quoted.
  const ClusterConfig odd_path = parse_cluster_config(
      "model:\n  path: ../build pe \n   One host,p    [\r\r\r\r\nserver: {listen: 'tcp://h:1 # x'}\n",
      "odd.yaml");
  EXPECT_EQ(odd_path.model.path.rfind("../build pe One host,p    [", 0), 0u) << odd_path.model.path;
  EXPECT_EQ(odd_path.server.listen, "tcp://h:1 # x");
  const std::string rendered_odd = render_cluster_config(odd_path);
  EXPECT_EQ(parse_cluster_config(rendered_odd, "rendered"), odd_path) << rendered_odd;

  const ClusterConfig tiles =
      parse_cluster_config("model: {path: m.gguf}\ndevice: cuda\nint4_layout: tiles\n", "tiles.yaml");
  const std::string rendered_tiles = render_cluster_config(tiles);
  EXPECT_NE(rendered_tiles.find("int4_layout: tiles"), std::string::npos) << rendered_tiles;
  EXPECT_EQ(parse_cluster_config(rendered_tiles, "rendered"), tiles) << rendered_tiles;
  EXPECT_FALSE(parse_cluster_config(rendered_tiles, "rendered") == full);
  const ClusterConfig half2 =
      parse_cluster_config("model: {path: m.gguf}\ndevice: cuda\nint4_kernels: half2\n", "half2.yaml");
  EXPECT_EQ(half2.int4_kernels, Int4KernelChoice::half2);
  const std::string rendered_half2 = render_cluster_config(half2);
  EXPECT_NE(rendered_half2.find("int4_kernels: half2"), std::string::npos) << rendered_half2;
  EXPECT_EQ(parse_cluster_config(rendered_half2, "rendered"), half2) << rendered_half2;
  const ClusterConfig with_cutlass =
      parse_cluster_config("model: {path: m.gguf}\ndevice: cuda\ncutlass_gemm: true\n", "cutlass.yaml");
  const std::string rendered_cutlass = render_cluster_config(with_cutlass);
  EXPECT_NE(rendered_cutlass.find("cutlass_gemm: true"), std::string::npos) << rendered_cutlass;
  EXPECT_EQ(parse_cluster_config(rendered_cutlass, "rendered"), with_cutlass) << rendered_cutlass;
  EXPECT_FALSE(with_cutlass == parse_cluster_config("model: {path: m.gguf}\ndevice: cuda\n", "plain.yaml"));
  const ClusterConfig cutlass_layout =
      parse_cluster_config("model: {path: m.gguf}\ndevice: cuda\nint4_layout: cutlass\n", "one-copy.yaml");
  EXPECT_EQ(cutlass_layout.int4_layout, Int4LayoutChoice::cutlass);
  const std::string rendered_layout = render_cluster_config(cutlass_layout);
  EXPECT_NE(rendered_layout.find("int4_layout: cutlass"), std::string::npos) << rendered_layout;
  EXPECT_EQ(parse_cluster_config(rendered_layout, "rendered"), cutlass_layout) << rendered_layout;
  EXPECT_FALSE(cutlass_layout == tiles);
  const ClusterConfig measured_layout =
      parse_cluster_config("model: {path: m.gguf}\ndevice: cuda\nint4_layout: measured\n", "measured.yaml");
  EXPECT_EQ(measured_layout.int4_layout, Int4LayoutChoice::measured);
  const std::string rendered_measured = render_cluster_config(measured_layout);
  EXPECT_NE(rendered_measured.find("int4_layout: measured"), std::string::npos) << rendered_measured;
  EXPECT_EQ(parse_cluster_config(rendered_measured, "rendered"), measured_layout) << rendered_measured;
  EXPECT_FALSE(measured_layout == cutlass_layout);
  // A device: cuda job with one key set (`line`, as rendered): read, rendered with that line, read back
  // equal, and unequal to the job without it.
  const auto with_key = [](const std::string& line) {
    const std::string yaml = "model: {path: m.gguf}\ndevice: cuda\n" + line + "\n";
    const ClusterConfig config = parse_cluster_config(yaml, "key.yaml");
    const std::string text = render_cluster_config(config);
    EXPECT_NE(text.find(line), std::string::npos) << text;
    EXPECT_EQ(parse_cluster_config(text, "rendered"), config) << text;
    EXPECT_FALSE(config == parse_cluster_config("model: {path: m.gguf}\ndevice: cuda\n", "plain.yaml"))
        << line;
    return config;
  };
  const ClusterConfig plain = parse_cluster_config("model: {path: m.gguf}\n", "plain.yaml");
  EXPECT_TRUE(with_key("int8_activations: true").int8_activations);
  EXPECT_FALSE(plain.int8_activations);
  EXPECT_FALSE(with_key("cuda_graphs: false").cuda_graphs);
  EXPECT_TRUE(plain.cuda_graphs);
  EXPECT_TRUE(with_key("prefill_attention: tensor_cores").tensor_core_prefill_attention);
  EXPECT_FALSE(plain.tensor_core_prefill_attention);
  EXPECT_EQ(with_key("decode_split_tokens: 64").decode_split_tokens, 64);
  EXPECT_EQ(plain.decode_split_tokens, 256);

  const ClusterConfig minimal = parse_cluster_config("model: {path: m.gguf}\n", "minimal.yaml");
  const std::string rendered_minimal = render_cluster_config(minimal);
  EXPECT_NE(rendered_minimal.find("threads: auto"), std::string::npos) << rendered_minimal;
  EXPECT_EQ(rendered_minimal.find("draft"), std::string::npos) << rendered_minimal;
  EXPECT_EQ(parse_cluster_config(rendered_minimal, "rendered"), minimal) << rendered_minimal;
}

TEST(ClusterConfig, LoadResolvesModelPathsAgainstTheFile) {
  const auto folder =
      std::filesystem::temp_directory_path() / ("nibble_config_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(folder);
  const auto file = folder / "cluster.yaml";
  std::ofstream(file) << "model: {path: models/t.gguf}\ndraft: {path: /abs/d.gguf}\n";
  const ClusterConfig config = load_cluster_config(file.string());
  EXPECT_EQ(config.source, file.string());
  EXPECT_EQ(config.model.path, (folder / "models/t.gguf").string());
  EXPECT_EQ(config.draft->path, "/abs/d.gguf");
  // A dummy model names no file: kept as written.
  std::ofstream(file) << "model: {path: \"dummy:llama-70b\"}\ndraft: {path: \"dummy:llama-1b:seed=2\"}\n";
  const ClusterConfig dummy = load_cluster_config(file.string());
  EXPECT_EQ(dummy.model.path, "dummy:llama-70b");
  EXPECT_EQ(dummy.draft->path, "dummy:llama-1b:seed=2");

  std::ofstream(file) << "model: {path: m}\nparallel:\n  tensor: x\n";
  try {
    load_cluster_config(file.string());
    ADD_FAILURE() << "expected a ConfigError";
  } catch (const ConfigError& error) {
    EXPECT_EQ(std::string(error.what()),
              file.string() + ": parallel.tensor: expected an integer, got 'x' (line 3)");
  }
  std::filesystem::remove_all(folder);

  EXPECT_THROW(load_cluster_config((folder / "missing.yaml").string()), ConfigError);
}

// lora_adapters: a list of {name, path, scale}, names unique, on CPU and GPU workers in any layout; paths
// resolve against the file like the model's, and the list renders back.
TEST(ClusterConfig, LoraAdaptersAreAListOfNamedFiles) {
  const ClusterConfig config = parse_cluster_config(
      "model: {path: m.gguf}\nlora_adapters:\n  - {name: sql, path: a/sql.gguf, scale: 0.5}\n"
      "  - name: chat\n    path: /abs/chat.gguf\n",
      "t.yaml");
  ASSERT_EQ(config.lora_adapters.size(), 2u);
  EXPECT_EQ(config.lora_adapters[0], (LoraAdapterConfig{"sql", "a/sql.gguf", 0.5}));
  EXPECT_EQ(config.lora_adapters[1], (LoraAdapterConfig{"chat", "/abs/chat.gguf", 1.0}));
  EXPECT_EQ(parse_cluster_config(render_cluster_config(config), "rendered"), config);
  EXPECT_TRUE(parse_cluster_config("model: {path: m}\nlora_adapters:\n", "t.yaml").lora_adapters.empty());

  expect_error("model: {path: m}\nlora_adapters: {name: a, path: b}\n", "lora_adapters", 2,
               {"expected a list of adapters"});
  expect_error("model: {path: m}\nlora_adapters:\n  - {name: a, path: b}\n  - {name: a, path: c}\n",
               "lora_adapters[1].name", 4, {"adapter 'a' is named twice"});
  expect_error("model: {path: m}\nlora_adapters:\n  - {name: a}\n", "lora_adapters[0].path", 3,
               {"required key is missing"});
  expect_error("model: {path: m}\nlora_adapters:\n  - {name: a, path: b, alpha: 2}\n",
               "lora_adapters[0].alpha", 3, {"unknown key 'alpha'", "allowed keys: name, path, scale"});
  expect_error("model: {path: m}\nlora_adapters:\n  - {name: a, path: b, scale: x}\n",
               "lora_adapters[0].scale", 3, {"expected a number"});
  // GPU workers take adapters unsharded and as tensor shards (each its cut of the factors).
  for (const std::string tensor : {"1", "2"}) {
    const ClusterConfig lora_on_gpu =
        parse_cluster_config("model: {path: m}\ndevice: cuda\nparallel: {tensor: " + tensor +
                                 "}\nlora_adapters:\n  - {name: a, path: b}\n",
                             "t.yaml");
    EXPECT_EQ(lora_on_gpu.lora_adapters.size(), 1u);
    EXPECT_EQ(parse_cluster_config(render_cluster_config(lora_on_gpu), "rendered"), lora_on_gpu);
  }
  // The KV cache's type: f16 unless asked for a quantized one, on the CPU and the CUDA workers alike.
  EXPECT_EQ(config.kv_cache.dtype, "f16");
  for (const std::string type : {"q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"}) {
    const ClusterConfig quantized =
        parse_cluster_config("model: {path: m}\nkv_cache: {dtype: " + type + "}\n", "t.yaml");
    EXPECT_EQ(quantized.kv_cache.dtype, type);
    EXPECT_EQ(parse_cluster_config(render_cluster_config(quantized), "rendered"), quantized);
  }
  // Each side its own type (llama.cpp's --cache-type-k / -v), over dtype.
  const ClusterConfig mixed =
      parse_cluster_config("model: {path: m}\nkv_cache: {dtype: q8_0, v_dtype: q4_0}\n", "t.yaml");
  EXPECT_EQ(mixed.kv_cache.dtype, "q8_0");
  EXPECT_EQ(mixed.kv_cache.k_dtype, "");
  EXPECT_EQ(mixed.kv_cache.v_dtype, "q4_0");
  EXPECT_EQ(parse_cluster_config(render_cluster_config(mixed), "rendered"), mixed);
  expect_error("model: {path: m}\nkv_cache: {k_dtype: q4_k}\n", "kv_cache.k_dtype", 2,
               {"expected one of f16, q8_0"});
  const ClusterConfig on_gpu =
      parse_cluster_config("model: {path: m}\ndevice: cuda\nkv_cache: {v_dtype: q4_0}\n", "t.yaml");
  EXPECT_EQ(on_gpu.kv_cache.v_dtype, "q4_0");
  EXPECT_EQ(parse_cluster_config(render_cluster_config(on_gpu), "rendered"), on_gpu);
  EXPECT_TRUE(config.kv_cache.rotation);  // llama.cpp's default; off is its LLAMA_ATTN_ROT_DISABLE=1
  const ClusterConfig unrotated =
      parse_cluster_config("model: {path: m}\nkv_cache: {dtype: q4_0, rotation: false}\n", "t.yaml");
  EXPECT_FALSE(unrotated.kv_cache.rotation);
  EXPECT_EQ(parse_cluster_config(render_cluster_config(unrotated), "rendered"), unrotated);
  expect_error("model: {path: m}\nkv_cache: {rotation: sometimes}\n", "kv_cache.rotation", 2,
               {"expected one of false, true"});
  expect_error("model: {path: m}\nkv_cache: {dtype: fp8}\n", "kv_cache.dtype", 2,
               {"expected one of f16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl"});
  // Loads and unloads while the job runs: off unless asked for.
  EXPECT_FALSE(config.server.lora_updates);
  const ClusterConfig updates =
      parse_cluster_config("model: {path: m}\nserver: {lora_updates: true}\n", "t.yaml");
  EXPECT_TRUE(updates.server.lora_updates);
  EXPECT_EQ(parse_cluster_config(render_cluster_config(updates), "rendered"), updates);
  expect_error("model: {path: m}\nserver: {lora_updates: yes please}\n", "server.lora_updates", 2,
               {"expected one of false, true"});
  EXPECT_TRUE(
      parse_cluster_config(
          "model: {path: m}\ndevice: cuda\nparallel: {tensor: 2}\nserver: {lora_updates: true}\n", "t.yaml")
          .server.lora_updates);

  const auto folder =
      std::filesystem::temp_directory_path() / ("nibble_lora_config_" + std::to_string(::getpid()));
  std::filesystem::create_directories(folder);
  std::ofstream(folder / "c.yaml") << "model: {path: m.gguf}\nlora_adapters: [{name: a, path: l/a.gguf}]\n";
  EXPECT_EQ(load_cluster_config((folder / "c.yaml").string()).lora_adapters[0].path,
            (folder / "l/a.gguf").string());
  std::filesystem::remove_all(folder);
}

TEST(ClusterConfig, ExampleConfigsParse) {
  const auto examples = kRepoRoot / "config";
  const ClusterConfig local = load_cluster_config((examples / "local-tp2.yaml").string());
  EXPECT_EQ(local.parallel.tensor, 2);
  EXPECT_EQ(local.parallel.pipeline, 1);
  EXPECT_EQ(local.world_size(), 3);
  EXPECT_EQ(local.device, Device::cpu);
  EXPECT_FALSE(local.draft.has_value());

  const ClusterConfig grid = load_cluster_config((examples / "tp2-pp2.yaml").string());
  EXPECT_EQ(grid.parallel.tensor, 2);
  EXPECT_EQ(grid.parallel.pipeline, 2);
  EXPECT_EQ(grid.world_size(), 5);

  const ClusterConfig speculative = load_cluster_config((examples / "speculative.yaml").string());
  ASSERT_TRUE(speculative.draft.has_value());
  EXPECT_EQ(speculative.draft->max_draft_tokens, 4);
  // Relative model paths now point next to the repository's build folder, wherever the test runs.
  EXPECT_EQ(speculative.model.path,
            (examples / "../build/models/llama-1b-q4_0.gguf").lexically_normal().string());
}

}  // namespace
}  // namespace nibble::cluster
