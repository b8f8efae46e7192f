// Tensor and pipeline parallelism of the GPU forward pass in one process (skips without a device):
// T = 2 CudaLlamaModel shards in two threads on the one GPU, their collectives through the
// in-process host reducer (tests/support/thread_group.hpp), must give the whole GPU model's logits
// (only the summation order of the partial sums differs) and the CPU model's within the GPU-vs-CPU
// bounds of test_cuda_llama_model; two pipeline stages chained must give the whole GPU model's
// logits exactly (the same kernels on the same values). The vocabulary is odd, so the logits
// gather is uneven.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "model/llama_checkpoint.hpp"
#include "model/lora_adapter.hpp"
#include "model/random_model.hpp"
#include "parallel/nccl_communicator.hpp"
#include "parallel/nccl_reducer.hpp"
#include "tests/cuda/cuda_test_util.hpp"
#include "tests/support/test_support.hpp"
#include "tests/support/thread_group.hpp"
#include "worker/cuda_llama_model.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"

namespace k = nibble::kernels;
namespace m = nibble::model;
namespace p = nibble::parallel;
namespace w = nibble::worker;
namespace t = nibble::test;

namespace {

// GPU vs CPU (test_cuda_llama_model's bounds: fp16 activations against the CPU's Q8_0 ones).
constexpr double kQuantizedBound = 4e-2;
constexpr double kFloatBound = 3e-3;
// Sharded vs whole on the GPU: the same products, summed in another order before an fp16 rounding
// (measured bound is to be filled from the first GPU run; an fp16 ulp on a few elements stays far
// below this).
constexpr double kShardBound = 2e-3;

constexpr int64_t kVocab = 1001;  // odd: 501 + 500 columns over two shards

std::string random_model(const std::filesystem::path& dir, k::DType type) {
  m::LlamaShape s = m::llama_shape_by_name("tiny");  // 4 heads, 2 KV heads, n_ff 256, 2 layers
  s.n_vocab = kVocab;
  s.n_layer = 4;  // two layers per pipeline stage
  const std::string path = (dir / ("model-" + std::string(k::type_name(type)) + ".gguf")).string();
  m::write_random_llama(path, s, type, /*seed=*/23);
  return path;
}

// A 13-token prefill with every token's logits, then 4 decode steps; the steps' logits (or a
// non-last stage's hidden states) concatenated. `stage` runs one step: (batch, its output).
template <class Step>
std::vector<float> run_conversation(Step&& stage) {
  std::vector<int32_t> prompt;
  for (int i = 0; i < 13; ++i) prompt.push_back(3 + (i * 131 + 17) % static_cast<int>(kVocab - 3));
  const std::vector<int32_t> table = {1, 0};  // out of order on purpose
  std::vector<float> all, out;
  stage(w::ForwardBatch::single(prompt, 0, table, true), out);
  all.insert(all.end(), out.begin(), out.end());
  for (int32_t step = 0; step < 4; ++step) {
    stage(w::ForwardBatch::single({5 + step * 37}, 13 + step, table, false), out);
    all.insert(all.end(), out.begin(), out.end());
  }
  return all;
}

std::vector<float> gpu_logits(w::CudaLlamaModel& model) {
  w::CudaKvCache cache(model.shard_config(), 2, 16);
  return run_conversation(
      [&](const w::ForwardBatch& b, std::vector<float>& out) { model.forward(b, cache, out); });
}

// T shards of `path` in T threads, their collectives through the host: each shard loaded with
// `options`, set up by prepare(model) and run by run(model) -> its output; every shard's output.
template <class Prepare, class Run>
std::vector<std::vector<float>> on_shards(const std::string& path, int tensor,
                                          const w::CudaModelOptions& options, Prepare&& prepare, Run&& run) {
  t::ThreadGroup group(tensor);
  std::vector<std::unique_ptr<t::ThreadGroup::Reducer>> reducers;
  std::vector<std::unique_ptr<w::CudaLlamaModel>> shards;
  for (int r = 0; r < tensor; ++r) {
    reducers.push_back(std::make_unique<t::ThreadGroup::Reducer>(group, r));
    shards.push_back(
        w::CudaLlamaModel::load(path, options, w::TensorShard{r, tensor}, reducers.back().get()));
    prepare(*shards.back());
  }
  std::vector<std::vector<float>> got(static_cast<size_t>(tensor));
  std::vector<std::thread> threads;
  for (int r = 0; r < tensor; ++r) {
    threads.emplace_back([&, r] {
      try {
        got[r] = run(*shards[r]);
      } catch (const std::exception& e) {
        // The other shard would wait at the barrier forever: stop the test program loudly instead.
        std::fprintf(stderr, "shard %d: %s\n", r, e.what());
        std::abort();
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int r = 0; r < tensor; ++r) EXPECT_EQ(shards[r]->captured_graphs(), 0) << "rank " << r;
  return got;
}

// T shards of `path`; every shard's gathered logits of the conversation.
std::vector<std::vector<float>> sharded_gpu_logits(const std::string& path, int tensor) {
  w::CudaModelOptions options;
  options.graphs = true;  // ignored with a host reducer: its reductions cannot be captured
  return on_shards(
      path, tensor, options, [](w::CudaLlamaModel&) {},
      [](w::CudaLlamaModel& model) { return gpu_logits(model); });
}

class CudaTensorParallel : public ::testing::TestWithParam<k::DType> {};

TEST_P(CudaTensorParallel, TwoShardsGiveTheWholeModelsLogitsOnTheGpuAndTheCpu) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  t::TempDir tmp;
  const std::string path = random_model(tmp.path(), GetParam());
  std::vector<float> whole, cpu;
  {
    auto model = w::CudaLlamaModel::load(path);
    whole = gpu_logits(*model);
  }
  {
    auto model = w::LlamaModel::load(path);
    k::ThreadPool pool(1);
    w::KvCache cache(model->shard_config(), 2, 16);
    cpu = run_conversation(
        [&](const w::ForwardBatch& b, std::vector<float>& out) { model->forward(b, cache, pool, out); });
  }
  const std::vector<std::vector<float>> shards = sharded_gpu_logits(path, 2);
  const double cpu_bound = GetParam() == k::DType::F16 ? kFloatBound : kQuantizedBound;
  for (size_t r = 0; r < shards.size(); ++r) {
    ASSERT_EQ(shards[r].size(), whole.size()) << "rank " << r;
    EXPECT_LT(t::max_relative_rms(shards[r], whole, kVocab), kShardBound) << "rank " << r;
    EXPECT_LT(t::max_relative_rms(shards[r], cpu, kVocab), cpu_bound) << "rank " << r;
    EXPECT_EQ(shards[r], shards[0]) << "every shard gathers the same rows";
  }
}

TEST_P(CudaTensorParallel, TwoPipelineStagesChainedGiveTheWholeModelsLogits) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  t::TempDir tmp;
  const std::string path = random_model(tmp.path(), GetParam());
  // The same INT4 kernels in the whole model and both stages (measured choices are timed per model
  // and may differ between them; Q4_0 goes up as INT4 groups).
  w::CudaModelOptions options;
  options.int4_kernels = w::Int4Kernels::cuda_cores;
  std::vector<float> whole;
  {
    auto model = w::CudaLlamaModel::load(path, options);
    whole = gpu_logits(*model);
  }
  options.graphs = true;  // a single-shard stage keeps them
  auto first = w::CudaLlamaModel::load(path, options, {}, nullptr, w::LayerRange{0, 2});
  auto last = w::CudaLlamaModel::load(path, options, {}, nullptr, w::LayerRange{2, -1});
  ASSERT_TRUE(first->is_first_stage() && !first->is_last_stage());
  ASSERT_TRUE(!last->is_first_stage() && last->is_last_stage());
  EXPECT_EQ(first->shard_config().n_layer, 2);
  w::CudaKvCache first_cache(first->shard_config(), 2, 16), last_cache(last->shard_config(), 2, 16);
  std::vector<float> hidden;
  const std::vector<float> chained = run_conversation([&](const w::ForwardBatch& b, std::vector<float>& out) {
    first->forward_stage(b, first_cache, nullptr, hidden);
    ASSERT_EQ(hidden.size(), b.tokens.size() * static_cast<size_t>(first->config().n_embd));
    last->forward_stage(b, last_cache, hidden.data(), out);
  });
  ASSERT_EQ(chained.size(), whole.size());
  EXPECT_LE(t::max_relative_rms(chained, whole, kVocab), 1e-6);
  EXPECT_GT(first->captured_graphs() + last->captured_graphs(), 0) << "decode steps of a stage replay graphs";
  std::vector<int32_t> ids;
  EXPECT_THROW(first->forward_greedy(w::ForwardBatch::single({1}, 0, {0}, false), first_cache, ids),
               std::logic_error);
  // The last stage's argmax on the device (forward_stage_greedy, what a GPU worker sends for greedy
  // requests) equals the argmax of its logits for the same hidden states; positions are rewritten
  // with the same values.
  const auto batch = w::ForwardBatch::single({5, 6, 7}, 0, {0, 1}, true);
  std::vector<float> logits;
  first->forward_stage(batch, first_cache, nullptr, hidden);
  last->forward_stage(batch, last_cache, hidden.data(), logits);
  last->forward_stage_greedy(batch, last_cache, hidden.data(), ids);
  ASSERT_EQ(ids.size(), 3u);
  for (size_t r = 0; r < ids.size(); ++r) {
    const float* row = logits.data() + r * kVocab;
    EXPECT_EQ(ids[r], static_cast<int32_t>(std::max_element(row, row + kVocab) - row)) << "row " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(Types, CudaTensorParallel, ::testing::Values(k::DType::Q4_0, k::DType::F16),
                         [](const auto& param_info) { return std::string(k::type_name(param_info.param)); });

// LoRA adapters on tensor shards (each shard its cut of the factors: B's rows for q/k/v, gate/up and the
// head, A's columns for attn_output and ffn_down, whose partial updates the all-reduce adds): three
// sequences in one batch, on an adapter on every matrix and the head (rank 4), one on attn_v only (rank
// 16) and none, a prompt then decode steps. Two shards give the whole GPU model's logits with the same
// adapters (within the sharding bound) and the CPU's (within the GPU-vs-CPU bound); the adapted rows
// are far from the base model's, so a dropped or doubled partial update could not pass.
TEST(CudaTensorParallelLora, TwoShardsWithAdaptersGiveTheWholeModelsLogitsInOneBatch) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  t::TempDir tmp;
  const std::string path = random_model(tmp.path(), k::DType::Q4_0);
  const auto checkpoint = m::LlamaCheckpoint::open(path);
  const m::LlamaConfig& c = checkpoint->config();
  const std::vector<m::LayerMatrix> all(std::begin(m::kLayerMatrices), std::end(m::kLayerMatrices));
  const m::LoraAdapter everywhere = m::make_random_lora(c, 4, 0, 0.3f, 7, all, true);
  const m::LoraAdapter v_only = m::make_random_lora(c, 16, 32.0f, 0.3f, 8, {m::LayerMatrix::attn_v});
  const auto add_adapters = [&](auto& model) {
    model.set_lora(1, everywhere, 0.75f);
    model.set_lora(2, v_only, 1.0f);
  };
  const std::vector<int32_t> adapters = {2, 0, 1};  // sequence s's adapter
  // The batches' logits concatenated; with_adapters false: the same batches on the base model.
  const auto scenario = [&](const auto& forward, bool with_adapters) {
    std::vector<float> all_logits, out;
    int32_t pos = 0, token = 3;
    for (const int32_t count : {11, 1, 1, 1}) {
      w::ForwardBatch batch;
      for (int32_t s = 0; s < 3; ++s) {
        std::vector<int32_t> toks;
        for (int32_t i = 0; i < count; ++i) toks.push_back(token = 3 + (token * 131 + 17) % (kVocab - 3));
        batch.add_sequence(toks, pos, s, 1);
        batch.block_tables.push_back(s);
      }
      batch.max_blocks_per_seq = 1;
      if (with_adapters) batch.seq_adapters = adapters;
      forward(batch, out);
      all_logits.insert(all_logits.end(), out.begin(), out.end());
      pos += count;
    }
    return all_logits;
  };
  const auto on_gpu = [&](w::CudaLlamaModel& model) {
    w::CudaKvCache cache(model.shard_config(), 3, 16);
    return scenario([&](const w::ForwardBatch& b, std::vector<float>& out) { model.forward(b, cache, out); },
                    true);
  };
  w::CudaModelOptions options;
  options.int4_kernels = w::Int4Kernels::cuda_cores;  // the same kernels in the whole model and the shards
  std::vector<float> whole, cpu, base;
  {
    w::CudaLlamaModel model(checkpoint, options);
    add_adapters(model);
    whole = on_gpu(model);
  }
  {
    w::LlamaModel model(checkpoint);
    add_adapters(model);
    k::ThreadPool pool(1);
    for (const bool with_adapters : {true, false}) {
      w::KvCache cache(c, 3, 16);
      (with_adapters ? cpu : base) = scenario(
          [&](const w::ForwardBatch& b, std::vector<float>& out) { model.forward(b, cache, pool, out); },
          with_adapters);
    }
  }
  const std::vector<std::vector<float>> shards = on_shards(path, 2, options, add_adapters, on_gpu);
  ASSERT_EQ(whole.size(), cpu.size());
  EXPECT_LT(t::max_relative_rms(whole, cpu, kVocab), kQuantizedBound);
  for (size_t r = 0; r < shards.size(); ++r) {
    ASSERT_EQ(shards[r].size(), whole.size()) << "rank " << r;
    EXPECT_LT(t::max_relative_rms(shards[r], whole, kVocab), kShardBound) << "rank " << r;
    EXPECT_LT(t::max_relative_rms(shards[r], cpu, kVocab), kQuantizedBound) << "rank " << r;
    EXPECT_EQ(shards[r], shards[0]) << "every shard gathers the same rows";
  }
  const size_t rows = whole.size() / kVocab;  // 4 steps x 3 sequences, in sequence order
  for (size_t row = 0; row < rows; ++row) {
    if (adapters[row % 3] == 0) continue;
    const auto at = [&](const std::vector<float>& v) {
      return std::vector<float>(v.begin() + static_cast<std::ptrdiff_t>(row * kVocab),
                                v.begin() + static_cast<std::ptrdiff_t>((row + 1) * kVocab));
    };
    EXPECT_GT(t::max_relative_rms(at(shards[0]), at(base), kVocab), 2 * kQuantizedBound) << "row " << row;
  }
}

// A dummy shards by slicing the whole generated matrices: T = 2 on the GPU equals the whole dummy.
TEST(CudaTensorParallelDummy, TwoShardsOfDummyTinyGiveTheWholeModelsLogits) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  std::vector<float> whole;
  {
    auto model = w::CudaLlamaModel::load("dummy:tiny");
    whole = gpu_logits(*model);
  }
  const int64_t n_vocab = m::llama_shape_by_name("tiny").n_vocab;
  const std::vector<std::vector<float>> shards = sharded_gpu_logits("dummy:tiny", 2);
  for (size_t r = 0; r < shards.size(); ++r) {
    ASSERT_EQ(shards[r].size(), whole.size()) << "rank " << r;
    EXPECT_LT(t::max_relative_rms(shards[r], whole, n_vocab), kShardBound) << "rank " << r;
  }
}

// A tensor group of one on NCCL (the one GPU a session has): the pass takes the sharded path, its
// collectives through NcclReducer (the all-reduces, the logits gathered from the head's local
// columns), enqueued on the model's stream, so that the decode steps replay from CUDA graphs (what
// T > 1 on NCCL does, which needs a GPU per rank). Every step's logits, and the device argmax's ids,
// equal the whole model's direct launches bit for bit (a group of one sums nothing and gathers a
// copy), with two sequences (the gather's strided path) and one (its one-row path); a gather left
// outside the graph, or on another stream, would return an earlier step's logits. At one rank an
// in-place all-reduce enqueues nothing, so the all-reduce's capture is the communicator test's (out of
// place), and the gather's padding (uneven column counts) needs two ranks.
TEST(CudaTensorParallelNccl, AGroupOfOneReplaysTheShardedPassFromGraphs) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  t::TempDir tmp;
  const std::string path = random_model(tmp.path(), k::DType::Q4_0);
  w::CudaModelOptions options;
  options.int4_kernels = w::Int4Kernels::cuda_cores;  // the same kernels in both models
  options.fused_norms = false;  // a model with a reducer keeps its norms apart from the products
  auto whole = w::CudaLlamaModel::load(path, options);
  ncclUniqueId id{};
  ASSERT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  auto nccl = p::NcclCommunicator::create(id, 0, 1, 0);
  p::NcclReducer reducer(*nccl);
  options.graphs = true;
  auto grouped = w::CudaLlamaModel::load(path, options, w::TensorShard{0, 1}, &reducer);
  w::CudaKvCache whole_cache(whole->shard_config(), 4, 16), grouped_cache(grouped->shard_config(), 4, 16);
  const std::vector<int32_t> tables = {3, 1, 0, 2};  // two sequences, two blocks each
  int32_t next_pos[2] = {0, 0}, token = 3;
  // Each sequence in `counts` (its table row) brings `count` tokens, logits for its last one.
  const auto batch_of = [&](const std::vector<std::pair<int32_t, int>>& counts) {
    w::ForwardBatch b;
    for (const auto& [row, count] : counts) {
      std::vector<int32_t> tokens;
      for (int i = 0; i < count; ++i) tokens.push_back(token = 3 + (token * 131 + 17) % (kVocab - 3));
      b.add_sequence(tokens, next_pos[row], row, 1);
      next_pos[row] += count;
    }
    b.block_tables = tables;
    b.max_blocks_per_seq = 2;
    return b;
  };
  const auto step = [&](const std::vector<std::pair<int32_t, int>>& counts, bool greedy) {
    const w::ForwardBatch b = batch_of(counts);
    if (greedy) {
      std::vector<int32_t> a, g;
      whole->forward_greedy(b, whole_cache, a);
      grouped->forward_greedy(b, grouped_cache, g);
      ASSERT_EQ(a.size(), counts.size());
      EXPECT_EQ(a, g);
      return;
    }
    std::vector<float> a, g;
    whole->forward(b, whole_cache, a);
    grouped->forward(b, grouped_cache, g);
    ASSERT_EQ(a.size(), counts.size() * static_cast<size_t>(kVocab));
    EXPECT_EQ(a, g) << "the group of one's pass, graphs or not, is the whole model's";
  };
  step({{0, 9}, {1, 5}}, false);  // prompts: run directly
  for (int i = 0; i < 4; ++i) step({{0, 1}, {1, 1}}, false);
  EXPECT_EQ(grouped->captured_graphs(), 1) << "two-sequence decode steps replay one graph";
  for (int i = 0; i < 4; ++i) step({{0, 1}}, false);
  EXPECT_EQ(grouped->captured_graphs(), 2) << "one-sequence steps: a graph of their own";
  for (int i = 0; i < 3; ++i) step({{0, 1}, {1, 1}}, true);
  EXPECT_EQ(grouped->captured_graphs(), 2) << "greedy steps replay the same graph, the argmax after it";
  EXPECT_LE(next_pos[0], 32);  // inside the two blocks
  nccl->check_async_error();
}

// The dummy run_conversation uses kVocab for its token ids, which stay inside tiny's 4096.
static_assert(kVocab < 4096);

}  // namespace
