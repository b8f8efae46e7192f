// Pipeline parallelism of the CPU forward pass, without MPI: the model is cut into P stages of
// contiguous layers, each with its own KV cache, and the hidden states are handed from stage to
// stage by hand. The last stage's logits must equal the whole model's bit for bit (the same
// operations in the same order), for prefill and for decode through the caches.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "model/random_model.hpp"
#include "tests/support/test_support.hpp"
#include "worker/llama_model.hpp"
#include "worker/tensor_shard.hpp"

namespace nibble::worker {
namespace {

struct Stage {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<KvCache> cache;
};

// Runs one batch through every stage in order; returns the last stage's logits.
std::vector<float> run_pipeline(std::vector<Stage>& stages, const ForwardBatch& batch,
                                kernels::ThreadPool& pool) {
  std::vector<float> hidden, out;
  for (size_t s = 0; s < stages.size(); ++s) {
    stages[s].model->forward_stage(batch, *stages[s].cache, pool, s == 0 ? nullptr : hidden.data(), out);
    if (s + 1 < stages.size()) hidden.swap(out);
  }
  return out;
}

class PipelineParallelTest : public ::testing::TestWithParam<int> {};

TEST_P(PipelineParallelTest, StagesInSequenceReproduceTheWholeModel) {
  const int pipeline = GetParam();
  model::LlamaShape shape = model::llama_shape_by_name("tiny");
  shape.n_layer = 5;  // uneven over 2 and 3 stages
  test::TempDir tmp;
  const std::string path = (tmp.path() / "model.gguf").string();
  model::write_random_llama(path, shape, kernels::DType::Q4_0, 21);
  kernels::ThreadPool pool(2);

  std::vector<int32_t> prompt;
  for (int i = 0; i < 19; ++i) prompt.push_back(3 + (i * 97 + 5) % static_cast<int>(shape.n_vocab - 3));
  const std::vector<int32_t> table = {2, 0};

  std::vector<float> expected;
  {
    auto whole = LlamaModel::load(path);
    KvCache cache(whole->shard_config(), 3, 16);
    std::vector<float> logits;
    whole->forward(ForwardBatch::single(prompt, 0, table, true), cache, pool, expected);
    for (int step = 0; step < 3; ++step) {
      whole->forward(ForwardBatch::single({7 + step}, 19 + step, table, false), cache, pool, logits);
      expected.insert(expected.end(), logits.begin(), logits.end());
    }
  }

  std::vector<Stage> stages;
  int64_t layers_seen = 0;
  for (int s = 0; s < pipeline; ++s) {
    const ShardRange r = split_layers(static_cast<size_t>(shape.n_layer), static_cast<size_t>(pipeline),
                                      static_cast<size_t>(s));
    Stage stage;
    stage.model = LlamaModel::load(path, {}, nullptr,
                                   LayerRange{static_cast<int64_t>(r.begin), static_cast<int64_t>(r.end())});
    EXPECT_EQ(stage.model->shard_config().n_layer, static_cast<int64_t>(r.count));
    EXPECT_EQ(stage.model->is_first_stage(), s == 0);
    EXPECT_EQ(stage.model->is_last_stage(), s == pipeline - 1);
    layers_seen += stage.model->shard_config().n_layer;
    // Each stage caches only its own layers.
    stage.cache = std::make_unique<KvCache>(stage.model->shard_config(), 3, 16);
    stages.push_back(std::move(stage));
  }
  EXPECT_EQ(layers_seen, shape.n_layer);

  std::vector<float> got = run_pipeline(stages, ForwardBatch::single(prompt, 0, table, true), pool);
  for (int step = 0; step < 3; ++step) {
    const std::vector<float> logits =
        run_pipeline(stages, ForwardBatch::single({7 + step}, 19 + step, table, false), pool);
    got.insert(got.end(), logits.begin(), logits.end());
  }
  ASSERT_EQ(got.size(), expected.size());
  EXPECT_EQ(got, expected);
}

INSTANTIATE_TEST_SUITE_P(Stages, PipelineParallelTest, ::testing::Values(1, 2, 3, 5));

TEST(PipelineParallel, RejectsBadRangesAndMissingHidden) {
  test::TempDir tmp;
  const std::string path = (tmp.path() / "model.gguf").string();
  model::write_random_llama(path, model::llama_shape_by_name("tiny"), kernels::DType::F32, 3);  // 2 layers
  EXPECT_THROW(LlamaModel::load(path, {}, nullptr, LayerRange{1, 1}), std::invalid_argument);
  EXPECT_THROW(LlamaModel::load(path, {}, nullptr, LayerRange{0, 3}), std::invalid_argument);
  EXPECT_THROW(LlamaModel::load(path, {}, nullptr, LayerRange{-1, 2}), std::invalid_argument);

  kernels::ThreadPool pool(1);
  std::vector<float> out;
  auto second = LlamaModel::load(path, {}, nullptr, LayerRange{1, 2});
  KvCache cache(second->shard_config(), 1, 16);
  EXPECT_THROW(second->forward(ForwardBatch::single({5}, 0, {0}, false), cache, pool, out),
               std::invalid_argument);  // a later stage without hidden states
  auto first = LlamaModel::load(path, {}, nullptr, LayerRange{0, 1});
  KvCache first_cache(first->shard_config(), 1, 16);
  first->forward_stage(ForwardBatch::single({5, 6}, 0, {0}, false), first_cache, pool, nullptr, out);
  EXPECT_EQ(out.size(), static_cast<size_t>(2 * first->config().n_embd));  // hidden states, not logits
}

}  // namespace
}  // namespace nibble::worker
