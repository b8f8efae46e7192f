// Continuous batching end to end on a project-made model: many requests of mixed lengths, batched
// and preempted by the scheduler, give exactly the tokens each gives when generated alone.
#include <gtest/gtest.h>

#include <map>

#include "cluster/local_engine.hpp"
#include "model/random_model.hpp"
#include "tests/support/test_support.hpp"
#include "worker/generator.hpp"

namespace nibble::cluster {
namespace {

class LocalEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = (tmp_.path() / "model.gguf").string();
    model::write_random_llama(path, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 5);
    model_ = worker::LlamaModel::load(path);
    tokenizer_ = model::Tokenizer::from_gguf(model_->file());
  }
  std::vector<EngineRequest> mixed_requests(int n, float temperature) const {
    std::vector<EngineRequest> requests;
    for (int i = 0; i < n; ++i) {
      EngineRequest r;
      r.id = 100 + i;
      for (int t = 0; t < 1 + (i * 7) % 37; ++t) r.prompt.push_back(3 + (i * 131 + t * 17) % 4000);
      r.sampling.temperature = temperature;
      r.sampling.seed = i;
      r.limits.max_tokens = 1 + (i * 5) % 19;
      r.limits.ignore_eos = true;
      requests.push_back(r);
    }
    return requests;
  }
  std::vector<int32_t> alone(const EngineRequest& r) {
    worker::Generator generator(*model_, *tokenizer_, pool_, 256);
    worker::GenerateOptions options;
    options.max_tokens = r.limits.max_tokens;
    options.ignore_eos = true;
    options.sampling = r.sampling;
    return generator.generate(r.prompt, options).tokens;
  }
  std::map<uint64_t, EngineResult> run_all(LocalEngine& engine, const std::vector<EngineRequest>& requests) {
    for (const auto& r : requests) EXPECT_EQ(engine.submit(r), Admission::accepted);
    std::map<uint64_t, EngineResult> results;
    for (int steps = 0; !engine.idle() && steps < 10000; ++steps) {
      for (auto& result : engine.step()) results[result.id] = std::move(result);
    }
    return results;
  }
  test::TempDir tmp_;
  std::unique_ptr<worker::LlamaModel> model_;
  std::shared_ptr<const model::Tokenizer> tokenizer_;
  kernels::ThreadPool pool_{2};
};

TEST_F(LocalEngineTest, BatchedAndPreemptedOutputEqualsEachRequestAlone) {
  SchedulerConfig config;
  config.max_batch_tokens = 48;
  config.prefill_chunk = 16;
  config.block_size = 4;
  config.num_blocks = 40;  // 160 positions for 24 requests of up to 55: forces preemption
  config.context = 256;
  // Greedy steps take the argmax path and plain sampled ones the ids-only path
  // (ForwardModel::forward_sample); a repetition penalty on every third request sends the steps it
  // joins through the ids-only path with the rows' histories (greedy ones too): each request's tokens
  // must not depend on which.
  for (const auto& [temperature, penalty] :
       {std::pair{0.0f, false}, std::pair{0.9f, false}, std::pair{0.9f, true}, std::pair{0.0f, true}}) {
    LocalEngine engine(*model_, *tokenizer_, pool_, config);
    auto requests = mixed_requests(24, temperature);
    if (penalty)
      for (size_t i = 0; i < requests.size(); i += 3) requests[i].sampling.repetition_penalty = 1.1f;
    const auto results = run_all(engine, requests);
    ASSERT_EQ(results.size(), requests.size());
    for (const auto& r : requests) {
      EXPECT_EQ(results.at(r.id).tokens, alone(r))
          << "request " << r.id << " at temperature " << temperature << (penalty ? ", penalties" : "");
      EXPECT_EQ(results.at(r.id).finish, worker::FinishReason::length);
    }
    EXPECT_EQ(engine.scheduler().free_blocks(), config.num_blocks);
  }
}

TEST_F(LocalEngineTest, CancelFreesBlocksAndOthersFinish) {
  SchedulerConfig config;
  config.block_size = 4;
  config.num_blocks = 64;
  LocalEngine engine(*model_, *tokenizer_, pool_, config);
  auto requests = mixed_requests(4, 0.0f);
  for (auto& r : requests) r.limits.max_tokens = 16;
  for (const auto& r : requests) ASSERT_EQ(engine.submit(r), Admission::accepted);
  engine.step();
  engine.step();
  const int64_t free_before = engine.scheduler().free_blocks();
  ASSERT_TRUE(engine.cancel(requests[1].id));
  EXPECT_GT(engine.scheduler().free_blocks(), free_before);
  std::map<uint64_t, EngineResult> results;
  while (!engine.idle()) {
    for (auto& result : engine.step()) results[result.id] = result;
  }
  EXPECT_EQ(results.size(), 3u);
  EXPECT_EQ(results.count(requests[1].id), 0u);
  EXPECT_EQ(engine.scheduler().free_blocks(), config.num_blocks);
}

}  // namespace
}  // namespace nibble::cluster
