// LoRA adapters (model/lora_adapter, worker/lora_weights): llama.cpp's GGUF adapter files read and
// written, the adapted forward pass against the same model with the updates merged into its weights
// (llama-export-lora's merge), sequences of different adapters in one batch, tensor-parallel shards
// and pipeline stages of an adapted model, and the files an adapter reader must refuse.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "model/lora_adapter.hpp"
#include "model/random_model.hpp"
#include "tests/support/test_support.hpp"
#include "tests/support/thread_group.hpp"
#include "worker/llama_model.hpp"

namespace nibble::worker {
namespace {

using model::LayerMatrix;

const std::vector<LayerMatrix> kAll(std::begin(model::kLayerMatrices), std::end(model::kLayerMatrices));

// A 11-token prompt (every row's logits), then 3 decode steps: [11 + 3, n_vocab]. adapter: the
// sequence's adapter index (0: the base model).
std::vector<float> run_sequence(LlamaModel& model, kernels::ThreadPool& pool, int32_t adapter) {
  const int64_t n_vocab = model.config().n_vocab;
  std::vector<int32_t> prompt;
  for (int i = 0; i < 11; ++i) prompt.push_back(3 + (i * 113 + 29) % static_cast<int>(n_vocab - 3));
  const std::vector<int32_t> table = {0};
  KvCache cache(model.shard_config(), 1, 16);
  std::vector<float> all, logits;
  ForwardBatch prefill = ForwardBatch::single(prompt, 0, table, true);
  prefill.seq_adapters = {adapter};
  model.forward(prefill, cache, pool, all);
  for (int32_t step = 0; step < 3; ++step) {
    ForwardBatch decode = ForwardBatch::single({7 + step * 41}, 11 + step, table, false);
    decode.seq_adapters = {adapter};
    model.forward(decode, cache, pool, logits);
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

struct TinyModel {
  test::TempDir tmp;
  std::string path;
  model::LlamaConfig config;
  explicit TinyModel(kernels::DType type = kernels::DType::F32) {
    path = (tmp.path() / "base.gguf").string();
    model::write_random_llama(path, model::llama_shape_by_name("tiny"), type, 21);
    config = model::LlamaConfig::from_gguf(*model::GgufFile::open(path));
  }
};

TEST(LoraAdapter, GgufRoundTripKeepsEveryValueAndTheScale) {
  TinyModel m;
  const model::LoraAdapter made =
      model::make_random_lora(m.config, 4, 8.0f, 0.5f, 3, {LayerMatrix::attn_q, LayerMatrix::ffn_down}, true);
  const std::string path = (m.tmp.path() / "adapter.gguf").string();
  made.write_gguf(path, m.config.architecture, kernels::DType::F32);
  const model::LoraAdapter read = model::LoraAdapter::read_gguf(path, m.config);
  EXPECT_EQ(read.alpha, 8.0f);
  EXPECT_EQ(read.n_matrices(), 2 * m.config.n_layer + 1);
  for (size_t l = 0; l < read.layers.size(); ++l) {
    for (size_t w = 0; w < 7; ++w) {
      ASSERT_EQ(read.layers[l][w].has_value(), made.layers[l][w].has_value()) << l << " " << w;
      if (!read.layers[l][w]) continue;
      EXPECT_EQ(read.layers[l][w]->rank, 4);
      EXPECT_EQ(read.layers[l][w]->a, made.layers[l][w]->a);
      EXPECT_EQ(read.layers[l][w]->b, made.layers[l][w]->b);
    }
  }
  ASSERT_TRUE(read.output);
  EXPECT_EQ(read.output->b, made.output->b);
  EXPECT_FLOAT_EQ(read.scale(*read.output, 0.5f), 0.5f * 8.0f / 4.0f);  // llama.cpp: user * alpha / rank
  model::LoraAdapter no_alpha = read;
  no_alpha.alpha = 0;
  EXPECT_FLOAT_EQ(no_alpha.scale(*read.output, 0.5f), 0.5f);
}

// The adapted pass equals the model whose weights hold W + scale B A (F32 base: only rounding
// differs), and differs clearly from the base.
TEST(LoraAdapter, AdaptedModelEqualsTheMergedWeights) {
  TinyModel m;
  const model::LoraAdapter adapter = model::make_random_lora(m.config, 8, 16.0f, 0.4f, 5, kAll, true);
  const std::string merged_path = (m.tmp.path() / "merged.gguf").string();
  model::merge_lora(*model::GgufFile::open(m.path), {{&adapter, 0.75f}}, merged_path);

  kernels::ThreadPool pool(2);
  auto base = LlamaModel::load(m.path);
  EXPECT_EQ(base->add_lora(adapter, 0.75f), 1);
  auto merged = LlamaModel::load(merged_path);
  const std::vector<float> adapted = run_sequence(*base, pool, 1);
  const std::vector<float> expected = run_sequence(*merged, pool, 0);
  const std::vector<float> plain = run_sequence(*base, pool, 0);
  ASSERT_EQ(adapted.size(), expected.size());
  // Measured 5e-7 (the merged weights round differently); the merge at a scale 1% off gives 2e-2.
  EXPECT_LT(test::max_relative_rms(adapted, expected, m.config.n_vocab), 1e-4);
  EXPECT_GT(test::max_relative_rms(plain, expected, m.config.n_vocab), 0.05) << "the adapter changes nothing";
}

// Two adapters and the base in one batch: each sequence's rows are what it gets alone.
TEST(LoraAdapter, SequencesOfDifferentAdaptersShareABatch) {
  TinyModel m(kernels::DType::Q4_0);
  kernels::ThreadPool pool(2);
  auto model = LlamaModel::load(m.path);
  model->add_lora(model::make_random_lora(m.config, 4, 0, 0.3f, 7, kAll, true));
  model->add_lora(model::make_random_lora(m.config, 16, 32.0f, 0.3f, 8, {LayerMatrix::attn_v}));
  const int64_t v = m.config.n_vocab;

  std::vector<std::vector<float>> alone(3);
  for (int32_t a = 0; a < 3; ++a) alone[static_cast<size_t>(a)] = run_sequence(*model, pool, a);
  // The three sequences' prompts as one batch (rows in order 2, 0, 1), each in its own block.
  std::vector<int32_t> prompt;
  for (int i = 0; i < 11; ++i) prompt.push_back(3 + (i * 113 + 29) % static_cast<int>(v - 3));
  KvCache cache(model->shard_config(), 3, 16);
  ForwardBatch batch;
  const int32_t order[] = {2, 0, 1};
  for (int32_t row = 0; row < 3; ++row) {
    batch.add_sequence(prompt, 0, row, 11);
    batch.block_tables.push_back(row);
    batch.seq_adapters.push_back(order[row]);
  }
  batch.max_blocks_per_seq = 1;
  std::vector<float> logits;
  model->forward(batch, cache, pool, logits);
  for (int32_t row = 0; row < 3; ++row) {
    const std::vector<float> got(logits.begin() + row * 11 * v, logits.begin() + (row + 1) * 11 * v);
    const std::vector<float>& want = alone[static_cast<size_t>(order[row])];
    EXPECT_LT(test::max_relative_rms(got, std::vector<float>(want.begin(), want.begin() + 11 * v), v), 1e-5)
        << "row " << row << " (adapter " << order[row] << ")";
  }
  EXPECT_GT(test::max_relative_rms(alone[1], alone[2], v), 0.05);
  EXPECT_GT(test::max_relative_rms(alone[0], alone[1], v), 0.05);

  batch.seq_adapters[1] = 3;
  EXPECT_THROW(model->forward(batch, cache, pool, logits), std::invalid_argument);
  batch.seq_adapters = {1};
  EXPECT_THROW(model->forward(batch, cache, pool, logits), std::invalid_argument);
}

// Adapters loaded into and removed from slots while the model serves (a job's runtime loads): a slot
// past the end leaves the ones between empty, a removed slot is refused by batches while the others
// keep their indices and outputs, and a slot reused by another adapter gives that adapter's logits.
TEST(LoraAdapter, SlotsAreLoadedRemovedAndReused) {
  TinyModel m(kernels::DType::Q4_0);
  kernels::ThreadPool pool(2);
  auto model = LlamaModel::load(m.path);
  const model::LoraAdapter first = model::make_random_lora(m.config, 4, 0, 0.3f, 7, kAll, true);
  const model::LoraAdapter second =
      model::make_random_lora(m.config, 8, 16.0f, 0.3f, 8, {LayerMatrix::attn_v});
  const int64_t v = m.config.n_vocab;
  const std::vector<float> base = run_sequence(*model, pool, 0);

  model->set_lora(3, first, 0.5f);
  EXPECT_EQ(model->n_loras(), 3);
  EXPECT_FALSE(model->has_lora(1));
  EXPECT_TRUE(model->has_lora(3));
  EXPECT_THROW(run_sequence(*model, pool, 1), std::invalid_argument);  // an empty slot
  model->set_lora(1, second);
  const std::vector<float> with_first = run_sequence(*model, pool, 3);
  const std::vector<float> with_second = run_sequence(*model, pool, 1);
  EXPECT_GT(test::max_relative_rms(with_first, base, v), 0.05);
  EXPECT_GT(test::max_relative_rms(with_second, with_first, v), 0.05);

  // What the adapters give alone, on a fresh model.
  auto fresh = LlamaModel::load(m.path);
  fresh->add_lora(first, 0.5f);
  fresh->add_lora(second);
  EXPECT_EQ(run_sequence(*fresh, pool, 1), with_first);
  EXPECT_EQ(run_sequence(*fresh, pool, 2), with_second);

  model->remove_lora(3);
  model->remove_lora(3);  // already empty: nothing to do
  model->remove_lora(9);  // never loaded: likewise
  EXPECT_FALSE(model->has_lora(3));
  EXPECT_THROW(run_sequence(*model, pool, 3), std::invalid_argument);
  EXPECT_EQ(run_sequence(*model, pool, 1), with_second);
  EXPECT_EQ(run_sequence(*model, pool, 0), base);
  model->set_lora(3, second);  // reused by the other adapter
  EXPECT_EQ(run_sequence(*model, pool, 3), with_second);
  EXPECT_THROW(model->set_lora(0, first), std::invalid_argument);
}

// Tensor shards (T 2 and 4: column- and row-parallel updates, the KV heads replicated at 4) and two
// pipeline stages of the adapted model give the whole adapted model's logits.
TEST(LoraAdapter, ShardsAndStagesOfAnAdaptedModelMatchTheWholeOne) {
  TinyModel m;
  const model::LoraAdapter adapter = model::make_random_lora(m.config, 6, 12.0f, 0.4f, 9, kAll, true);
  std::vector<float> expected;
  {
    kernels::ThreadPool pool(1);
    auto whole = LlamaModel::load(m.path);
    whole->add_lora(adapter, 1.5f);
    expected = run_sequence(*whole, pool, 1);
  }
  for (int tensor : {2, 4}) {
    test::ThreadGroup group(tensor);
    std::vector<std::unique_ptr<test::ThreadGroup::Reducer>> reducers;
    std::vector<std::unique_ptr<LlamaModel>> shards;
    for (int r = 0; r < tensor; ++r) {
      reducers.push_back(std::make_unique<test::ThreadGroup::Reducer>(group, r));
      shards.push_back(LlamaModel::load(m.path, TensorShard{r, tensor}, reducers.back().get()));
      shards.back()->add_lora(adapter, 1.5f);
    }
    std::vector<std::vector<float>> got(static_cast<size_t>(tensor));
    std::vector<std::thread> threads;
    for (int r = 0; r < tensor; ++r) {
      threads.emplace_back([&, r] {
        kernels::ThreadPool pool(1);
        got[static_cast<size_t>(r)] = run_sequence(*shards[static_cast<size_t>(r)], pool, 1);
      });
    }
    for (auto& t : threads) t.join();
    for (int r = 0; r < tensor; ++r) {
      // Only rounding differs (measured 2e-5: fp16 K/V amplify the partial sums' order); a shard
      // taking the wrong slice of A or B gives ~1.
      EXPECT_LT(test::max_relative_rms(got[static_cast<size_t>(r)], expected, m.config.n_vocab), 2e-4)
          << "T " << tensor << " rank " << r;
    }
  }
  // Two stages: the first's hidden states into the second.
  kernels::ThreadPool pool(1);
  auto first = LlamaModel::load(m.path, {}, nullptr, LayerRange{0, 1});
  auto second = LlamaModel::load(m.path, {}, nullptr, LayerRange{1, -1});
  first->add_lora(adapter, 1.5f);
  second->add_lora(adapter, 1.5f);
  std::vector<int32_t> prompt;
  for (int i = 0; i < 11; ++i) prompt.push_back(3 + (i * 113 + 29) % static_cast<int>(m.config.n_vocab - 3));
  KvCache c1(first->shard_config(), 1, 16), c2(second->shard_config(), 1, 16);
  ForwardBatch batch = ForwardBatch::single(prompt, 0, {0}, true);
  batch.seq_adapters = {1};
  std::vector<float> hidden, logits;
  first->forward_stage(batch, c1, pool, nullptr, hidden);
  second->forward_stage(batch, c2, pool, hidden.data(), logits);
  const std::vector<float> want(expected.begin(), expected.begin() + 11 * m.config.n_vocab);
  EXPECT_LT(test::max_relative_rms(logits, want, m.config.n_vocab), 1e-6);
}

// llama.cpp's own logits for the Q4_1 model of tests/data/llama-cpp-q4_1 with the adapter of
// tests/data/llama-cpp-lora (F16, rank 8, alpha 16, every matrix and the head) at scale 0.75: the 63
// prompt tokens and 24 greedy ones in one batch. Measured 2.4e-2 (the base alone is 1.5e-2 from
// llama.cpp: its 8-bit activations; it also rounds the adapter's inputs to fp16); the adapter at
// scale 1.5 gives 2.1, none 1.3.
TEST(LoraAdapter, LogitsMatchLlamaCppWithTheAdapter) {
  const auto data = test::test_data_dir();
  auto model = LlamaModel::load((data / "llama-cpp-q4_1" / "tiny-llama-q4_1.gguf").string());
  const std::string adapter_path = (data / "llama-cpp-lora" / "tiny-lora-f16.gguf").string();
  model->set_default_lora(
      model->add_lora(model::LoraAdapter::read_gguf(adapter_path, model->config()), 0.75f));
  struct {
    int64_t n_vocab = 0;
    std::vector<int32_t> tokens;  // prompt, then generated
    std::vector<float> logits;    // [tokens, n_vocab]
  } ref;
  std::ifstream tokens(data / "llama-cpp-lora" / "tiny-llama-q4_1-lora.tokens");
  std::string key;
  int64_t n_prompt = 0;
  tokens >> key >> n_prompt >> key >> ref.n_vocab;
  for (int32_t id = 0; tokens >> id;) ref.tokens.push_back(id);
  ASSERT_EQ(ref.tokens.size(), static_cast<size_t>(n_prompt + 24));
  const std::vector<uint8_t> bytes =
      test::read_file_bytes(data / "llama-cpp-lora" / "tiny-llama-q4_1-lora.logits");
  ASSERT_EQ(bytes.size(), ref.tokens.size() * static_cast<size_t>(ref.n_vocab) * sizeof(float));
  ref.logits.resize(bytes.size() / sizeof(float));
  std::memcpy(ref.logits.data(), bytes.data(), bytes.size());
  ASSERT_EQ(ref.n_vocab, model->config().n_vocab);
  kernels::ThreadPool pool(2);
  KvCache cache(model->shard_config(), 6, 16);
  std::vector<float> logits;
  model->forward(ForwardBatch::single(ref.tokens, 0, {0, 1, 2, 3, 4, 5}, true), cache, pool, logits);
  ASSERT_EQ(logits.size(), ref.logits.size());
  EXPECT_LT(test::max_relative_rms(logits, ref.logits, ref.n_vocab), 4e-2);
  int64_t same = 0;
  const auto rows = static_cast<int64_t>(ref.tokens.size());
  for (int64_t r = 0; r < rows; ++r) {
    const auto row = [&](const std::vector<float>& v) { return v.begin() + r * ref.n_vocab; };
    same += std::max_element(row(logits), row(logits) + ref.n_vocab) - row(logits) ==
            std::max_element(row(ref.logits), row(ref.logits) + ref.n_vocab) - row(ref.logits);
  }
  EXPECT_GE(same, rows * 9 / 10) << "argmax agreement";
}

// PEFT adapter directories (what vLLM serves) on the Hugging Face checkpoint they were made for:
// transformers + peft's logits (tools/peft_reference.py, attention rounded to fp16 as Nibble's KV
// cache). "all": every projection and lm_head (q/k B rows reordered as the model's q/k rows are; the
// frozen head peft saves beside its adapter skipped); "rslora": alpha / sqrt(r) and a rank_pattern.
TEST(LoraAdapter, PeftDirectoriesMatchTransformersAndPeft) {
  const auto data = test::test_data_dir();
  const nlohmann::json sequences =
      nlohmann::json::parse(std::ifstream(data / "hf-tiny-llama" / "reference.json"))["sequences"];
  kernels::ThreadPool pool(2);
  for (const char* variant : {"all", "rslora"}) {
    SCOPED_TRACE(variant);
    auto model = LlamaModel::load((data / "hf-tiny-llama" / "f32").string());
    const auto dir = data / "hf-tiny-llama-lora" / variant;
    const model::LoraAdapter adapter = model::LoraAdapter::read(dir.string(), model->config());
    EXPECT_EQ(adapter.rank_stabilized, std::string(variant) == "rslora");
    model->set_default_lora(model->add_lora(adapter));
    const std::vector<uint8_t> bytes = test::read_file_bytes(dir / "logits_fp16kv.f32");
    std::vector<float> want(bytes.size() / sizeof(float));
    std::memcpy(want.data(), bytes.data(), bytes.size());
    std::vector<float> got;
    for (const auto& seq : sequences) {
      const auto ids = seq.get<std::vector<int32_t>>();
      KvCache cache(model->shard_config(), 3, 16);
      std::vector<float> logits;
      model->forward(ForwardBatch::single(ids, 0, {0, 1, 2}, true), cache, pool, logits);
      got.insert(got.end(), logits.begin(), logits.end());
    }
    ASSERT_EQ(got.size(), want.size());
    // Worst rows measured 3e-6 ("all") and 9e-5 ("rslora": fp16 K/V amplify float rounding, as for
    // the base model in HfLlama.F32LogitsMatchTransformers); the adapters move the logits by 2.1 and
    // 1.3 (reference.json's relative_effect), q/k's B rows left in HF's order by 2.2 and 1.8.
    EXPECT_LT(test::max_relative_rms(got, want, model->config().n_vocab), 1e-3);
  }
}

// What a reader must refuse, each by name.
TEST(LoraAdapter, RefusesFilesThatAreNotAdaptersOfThisModel) {
  TinyModel m;
  const auto refused = [&](const std::string& path, const std::string& part) {
    try {
      model::LoraAdapter::read_gguf(path, m.config);
      ADD_FAILURE() << path << " was read";
    } catch (const model::GgufError& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  refused(m.path, "not a LoRA adapter");  // a model, not an adapter

  // An adapter made for another shape (n_ff 768 against 256).
  model::LlamaConfig other = m.config;
  other.n_ff = 768;
  const std::string wrong = (m.tmp.path() / "wrong.gguf").string();
  model::make_random_lora(other, 4, 8, 0.1f, 1, {LayerMatrix::ffn_up})
      .write_gguf(wrong, "llama", kernels::DType::F16);
  refused(wrong, "maybe wrong base model");

  // Another architecture.
  const std::string qwen = (m.tmp.path() / "qwen.gguf").string();
  model::make_random_lora(m.config, 4, 8, 0.1f, 1, {LayerMatrix::ffn_up})
      .write_gguf(qwen, "qwen2", kernels::DType::F32);
  refused(qwen, "architecture 'qwen2'");

  // A lora_a without its lora_b, a layer the model lacks, the embedding, ranks that differ.
  const auto write = [&](const std::string& name,
                         std::vector<std::pair<std::string, std::vector<int64_t>>> tensors) {
    model::GgufWriter w;
    w.set_string("general.architecture", "llama");
    w.set_string("general.type", "adapter");
    w.set_string("adapter.type", "lora");
    w.set_float32("adapter.lora.alpha", 8);
    for (const auto& [tensor, dims] : tensors) {
      w.add_tensor(tensor, dims, kernels::DType::F32,
                   std::vector<uint8_t>(4 * static_cast<size_t>(dims[0] * dims[1])));
    }
    const std::string path = (m.tmp.path() / name).string();
    w.write(path);
    return path;
  };
  const int64_t e = m.config.n_embd;
  refused(write("half.gguf", {{"blk.0.attn_q.weight.lora_a", {e, 4}}}), "lora_a without lora_b");
  refused(
      write("layer.gguf", {{"blk.9.attn_q.weight.lora_a", {e, 4}}, {"blk.9.attn_q.weight.lora_b", {4, e}}}),
      "not a matrix of this 2-layer model");
  refused(write("embd.gguf", {{"token_embd.weight.lora_a", {e, 4}}, {"token_embd.weight.lora_b", {4, e}}}),
          "token embedding");
  refused(
      write("rank.gguf", {{"blk.0.attn_q.weight.lora_a", {e, 4}}, {"blk.0.attn_q.weight.lora_b", {5, e}}}),
      "rank 4 and lora_b's 5 differ");
  refused(write("empty.gguf", {}), "no LoRA tensors");
}

// PEFT directories a reader must refuse: what would change the product in ways it does not compute.
TEST(LoraAdapter, RefusesPeftDirectoriesItCannotServe) {
  const auto source = test::test_data_dir() / "hf-tiny-llama-lora" / "rslora";
  const model::LlamaConfig base =
      LlamaModel::load((test::test_data_dir() / "hf-tiny-llama" / "f32").string())->config();
  test::TempDir tmp;
  const auto refused = [&](const std::string& key, const nlohmann::json& value, const std::string& part) {
    const auto dir = tmp.path() / key;
    std::filesystem::create_directories(dir);
    std::filesystem::copy_file(source / "adapter_model.safetensors", dir / "adapter_model.safetensors");
    nlohmann::json config = nlohmann::json::parse(std::ifstream(source / "adapter_config.json"));
    config[key] = value;
    std::ofstream(dir / "adapter_config.json") << config.dump();
    try {
      model::LoraAdapter::read(dir.string(), base);
      ADD_FAILURE() << key << " was read";
    } catch (const model::GgufError& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  refused("use_dora", true, "DoRA adapters are not supported");
  refused("peft_type", "IA3", "peft_type is not \"LORA\"");
  refused("fan_in_fan_out", true, "fan_in_fan_out");
  refused("bias", "all", "adapters with biases are not supported");
  refused("alpha_pattern", {{"q_proj", 2}}, "per-module alphas");
  refused("lora_alpha", "8", "lora_alpha: expected a positive number");
  // No adapter_config.json; pickle weights only.
  EXPECT_THROW(model::LoraAdapter::read(tmp.path().string(), base), model::GgufError);
  const auto pickle = tmp.path() / "pickle";
  std::filesystem::create_directories(pickle);
  std::filesystem::copy_file(source / "adapter_config.json", pickle / "adapter_config.json");
  std::ofstream(pickle / "adapter_model.bin") << "not read";
  try {
    model::LoraAdapter::read(pickle.string(), base);
    ADD_FAILURE() << "pickle weights were read";
  } catch (const model::GgufError& e) {
    EXPECT_NE(std::string(e.what()).find("safe_serialization=True"), std::string::npos) << e.what();
  }
  // The tiny GGUF model's shape is not the HF model's: wrong base.
  model::LlamaConfig other = base;
  other.n_ff = 96;
  try {
    model::LoraAdapter::read(source.string(), other);
    ADD_FAILURE() << "an adapter of another shape was read";
  } catch (const model::GgufError& e) {
    EXPECT_NE(std::string(e.what()).find("maybe wrong base model"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace nibble::worker
