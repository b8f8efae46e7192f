// Dummy checkpoints ("dummy:<shape>"): the spec, the config and weight size of the shape, weights
// generated per tensor from the documented seeds (only the layers bound), the synthetic tokenizer,
// and that the CPU model runs on one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <stdexcept>

#include "kernels/packed_weights.hpp"
#include "kernels/random_weights.hpp"
#include "kernels/thread_pool.hpp"
#include "model/llama_checkpoint.hpp"
#include "model/random_model.hpp"
#include "model/tokenizer.hpp"
#include "tests/support/test_support.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"

namespace nibble::model {
namespace {

std::vector<uint8_t> expected_blocks(int64_t n_out, int64_t k, uint64_t seed) {
  std::vector<uint8_t> out(static_cast<size_t>(n_out * (k / 32) * 18));
  EXPECT_EQ(kernels::fill_random_q4_0(out.data(), n_out, k, seed), kernels::Status::ok);
  return out;
}

bool equals(const WeightMatrix& w, const std::vector<uint8_t>& bytes) {
  return w.type == kernels::DType::Q4_0 && w.data != nullptr &&
         std::equal(bytes.begin(), bytes.end(), w.data) &&
         static_cast<size_t>(w.n_out * w.row_bytes()) == bytes.size();
}

TEST(LlamaCheckpointDummy, ConfigFromTheShape) {
  const auto c = LlamaCheckpoint::open("dummy:llama-70b");
  EXPECT_TRUE(c->is_dummy());
  EXPECT_EQ(c->gguf(), nullptr);
  EXPECT_EQ(c->hf(), nullptr);
  EXPECT_EQ(c->path(), "dummy:llama-70b");
  EXPECT_EQ(c->dummy_seed(), 0u);
  const LlamaConfig& cfg = c->config();
  EXPECT_EQ(cfg.n_embd, 8192);
  EXPECT_EQ(cfg.n_layer, 80);
  EXPECT_EQ(cfg.n_head, 64);
  EXPECT_EQ(cfg.n_head_kv, 8);
  EXPECT_EQ(cfg.head_dim, 128);
  EXPECT_EQ(cfg.rope_dims, 128);
  EXPECT_EQ(cfg.n_ff, 28672);
  EXPECT_EQ(cfg.n_vocab, 128256);
  EXPECT_EQ(cfg.n_ctx_train, 8192);
  EXPECT_EQ(cfg.rope_base, 500000.0f);
  EXPECT_FALSE(cfg.tied_output);
  // Q4_0 matrices (18 bytes per 32 weights) and f32 norms: 70553706496 weights of which
  // (2 x 80 + 1) x 8192 = 1318912 are norms -> 39685718016 + 5275648 bytes.
  const int64_t norms = 161 * 8192;
  const int64_t params = llama_shape_by_name("llama-70b").n_params();
  EXPECT_EQ(c->weight_bytes(), static_cast<uint64_t>((params - norms) / 32 * 18 + norms * 4));
  EXPECT_EQ(c->weight_bytes(), 39690993664u);
}

TEST(LlamaCheckpointDummy, SeedSuffixAndErrors) {
  EXPECT_EQ(LlamaCheckpoint::open("dummy:tiny:seed=7")->dummy_seed(), 7u);
  EXPECT_TRUE(LlamaCheckpoint::is_dummy_spec("dummy:tiny"));
  EXPECT_FALSE(LlamaCheckpoint::is_dummy_spec("tiny.gguf"));
  try {
    LlamaCheckpoint::open("dummy:llama-405b");
    FAIL() << "an unknown shape was accepted";
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("llama-405b"), std::string::npos) << what;
    EXPECT_NE(what.find("tiny, tiny-h64, small, llama-1b, llama-8b or llama-70b"), std::string::npos) << what;
  }
  EXPECT_THROW(LlamaCheckpoint::open("dummy:tiny:seed=x"), std::invalid_argument);
  EXPECT_THROW(LlamaCheckpoint::open("dummy:tiny:colour=7"), std::invalid_argument);
}

TEST(LlamaCheckpointDummy, WeightsFollowThePerTensorSeeds) {
  const auto c = LlamaCheckpoint::open("dummy:tiny:seed=3");
  const LlamaConfig& cfg = c->config();
  // The documented rule: index 0 embedding, 1 + 7 L + j matrices, 1 + 7 n_layer the head.
  const uint64_t step = 0x9e3779b97f4a7c15ull;
  EXPECT_EQ(c->dummy_tensor_seed(DummyTensor::embedding), 3u);
  EXPECT_EQ(c->dummy_tensor_seed(DummyTensor::matrix, 1, LayerMatrix::attn_v), 3u + 10u * step);
  EXPECT_EQ(c->dummy_tensor_seed(DummyTensor::head), 3u + 15u * step);
  std::set<uint64_t> seeds = {c->dummy_tensor_seed(DummyTensor::embedding),
                              c->dummy_tensor_seed(DummyTensor::head),
                              c->dummy_tensor_seed(DummyTensor::output_norm)};
  for (int64_t l = 0; l < cfg.n_layer; ++l) {
    seeds.insert(c->dummy_tensor_seed(DummyTensor::attn_norm, l));
    seeds.insert(c->dummy_tensor_seed(DummyTensor::ffn_norm, l));
    for (const LayerMatrix m : kLayerMatrices) seeds.insert(c->dummy_tensor_seed(DummyTensor::matrix, l, m));
  }
  EXPECT_EQ(seeds.size(), static_cast<size_t>(3 + 9 * cfg.n_layer));  // every tensor its own seed

  const LlamaWeights w = c->bind_weights(1, 2);  // layer 1 only
  ASSERT_EQ(w.layers.size(), 2u);
  EXPECT_EQ(w.layers[0].wq.data, nullptr);
  EXPECT_TRUE(w.layers[0].attn_norm.empty());
  EXPECT_TRUE(equals(w.token_embd,
                     expected_blocks(cfg.n_vocab, cfg.n_embd, c->dummy_tensor_seed(DummyTensor::embedding))));
  EXPECT_TRUE(
      equals(w.output, expected_blocks(cfg.n_vocab, cfg.n_embd, c->dummy_tensor_seed(DummyTensor::head))));
  for (const LayerMatrix m : kLayerMatrices) {
    const auto [n_out, k] = layer_matrix_shape(cfg, m);
    const WeightMatrix& got = w.layers[1].matrix(m);
    EXPECT_EQ(got.n_out, n_out);
    EXPECT_EQ(got.k, k);
    EXPECT_TRUE(equals(got, expected_blocks(n_out, k, c->dummy_tensor_seed(DummyTensor::matrix, 1, m))))
        << "matrix " << static_cast<int>(m);
  }
  EXPECT_EQ(w.layers[1].wo.k, cfg.q_dim());
  EXPECT_EQ(w.layers[1].w_down.k, cfg.n_ff);
  ASSERT_EQ(w.layers[1].ffn_norm.size(), static_cast<size_t>(cfg.n_embd));
  EXPECT_EQ(w.layers[1].ffn_norm, c->dummy_norm(DummyTensor::ffn_norm, 1));
  EXPECT_NE(w.layers[1].ffn_norm, w.layers[1].attn_norm);
  for (const float x : w.output_norm) {
    EXPECT_GE(x, 0.9f);
    EXPECT_LE(x, 1.1f);
  }
  // Another seed, other weights.
  const LlamaWeights other = LlamaCheckpoint::open("dummy:tiny:seed=4")->bind_weights(1, 2);
  EXPECT_FALSE(std::equal(w.layers[1].wq.data,
                          w.layers[1].wq.data + w.layers[1].wq.n_out * w.layers[1].wq.row_bytes(),
                          other.layers[1].wq.data));
  EXPECT_THROW(c->bind_weights(0, 3), std::invalid_argument);
}

// Packing for the CPU several matrices at a time gives every matrix the bytes packing it alone gives.
TEST(LlamaCheckpointDummy, PackingOnThreadsEqualsPackingEachMatrixAlone) {
  const auto c = LlamaCheckpoint::open("dummy:tiny:seed=5");
  LlamaWeights serial = c->bind_weights();
  LlamaWeights threaded = c->bind_weights();
  serial.pack_for_cpu(/*release_source=*/false, 1);
  threaded.pack_for_cpu(/*release_source=*/false, 3);
  auto same = [](const WeightMatrix& a, const WeightMatrix& b) {
    if (a.packed == nullptr || b.packed == nullptr) return false;
    const kernels::PackedMatrix alone = kernels::pack_for_matmul(a.type, a.data, a.n_out, a.k);
    return a.packed->size_bytes() == alone.size_bytes() && b.packed->size_bytes() == alone.size_bytes() &&
           std::equal(alone.data(), alone.data() + alone.size_bytes(), a.packed->data()) &&
           std::equal(alone.data(), alone.data() + alone.size_bytes(), b.packed->data());
  };
  ASSERT_EQ(threaded.layers.size(), static_cast<size_t>(c->config().n_layer));
  for (size_t l = 0; l < threaded.layers.size(); ++l) {
    const LlamaLayerWeights& a = serial.layers[l];
    const LlamaLayerWeights& b = threaded.layers[l];
    EXPECT_TRUE(same(a.wq, b.wq) && same(a.wk, b.wk) && same(a.wv, b.wv) && same(a.wo, b.wo) &&
                same(a.w_gate, b.w_gate) && same(a.w_up, b.w_up) && same(a.w_down, b.w_down))
        << "layer " << l;
  }
  EXPECT_TRUE(same(serial.output, threaded.output));
}

TEST(LlamaCheckpointDummy, SyntheticTokenizerEqualsTheRandomModelFiles) {
  test::TempDir dir;
  const std::string path = (dir.path() / "tiny.gguf").string();
  write_random_llama(path, llama_shape_by_name("tiny"), kernels::DType::Q4_0, 1);
  const auto from_file = Tokenizer::from_gguf(*GgufFile::open(path));
  const auto synthetic = make_synthetic_tokenizer(4096);
  ASSERT_EQ(synthetic->n_vocab(), from_file->n_vocab());
  for (int32_t id = 0; id < synthetic->n_vocab(); ++id)
    ASSERT_EQ(synthetic->token_text(id), from_file->token_text(id));
  EXPECT_EQ(synthetic->bos_id(), 1);
  EXPECT_EQ(synthetic->eos_id(), 2);
  EXPECT_TRUE(synthetic->add_bos_default());
  const std::string text = "Once upon a time, the quick brown fox jumps over the lazy dog.";
  EXPECT_EQ(synthetic->encode(text, true), from_file->encode(text, true));
}

TEST(LlamaCheckpointDummy, TheCpuModelRunsOnDummyTiny) {
  const auto c = LlamaCheckpoint::open("dummy:tiny");
  worker::LlamaModel model(c);
  worker::KvCache cache(model.config(), 2, 16);
  kernels::ThreadPool pool(1);
  std::vector<float> logits;
  model.forward(worker::ForwardBatch::single({1, 100, 200, 300}, 0, {0, 1}, false), cache, pool, logits);
  ASSERT_EQ(logits.size(), static_cast<size_t>(c->config().n_vocab));
  double sq = 0.0;
  for (const float x : logits) {
    ASSERT_TRUE(std::isfinite(x));
    sq += static_cast<double>(x) * x;
  }
  // Unit-scale activations through the normed head of std 1/sqrt(n_embd) weights: logits of order 1.
  const double rms = std::sqrt(sq / static_cast<double>(logits.size()));
  EXPECT_GT(rms, 0.1);
  EXPECT_LT(rms, 10.0);
}

}  // namespace
}  // namespace nibble::model
