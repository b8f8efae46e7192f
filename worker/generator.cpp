#include "worker/generator.hpp"

#include <algorithm>
#include <chrono>
#include <stdexcept>

namespace nibble::worker {

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

Generator::Generator(LlamaModel& model, const model::Tokenizer& tokenizer, kernels::ThreadPool& pool,
                     int64_t context)
    : cache_(
          std::make_unique<KvCache>(model.config(), blocks_for(context), kBlockSize, model.kv_cache_types())),
      tokenizer_(tokenizer),
      context_(context) {
  model_.n_vocab = model.config().n_vocab;
  model_.forward = [&model, &pool, cache = cache_.get()](const ForwardBatch& batch,
                                                         std::vector<float>& logits) {
    model.forward(batch, *cache, pool, logits);
  };
}

Generator::Generator(GeneratorModel model, const model::Tokenizer& tokenizer, int64_t context)
    : model_(std::move(model)), tokenizer_(tokenizer), context_(context) {
  if (!model_.forward) throw std::invalid_argument("a GeneratorModel needs a forward function");
}

GenerateResult Generator::generate(const std::vector<int32_t>& prompt_tokens, const GenerateOptions& options,
                                   const TokenCallback& on_token) {
  validate(options.sampling);
  if (prompt_tokens.empty()) throw std::invalid_argument("the prompt is empty");
  if (options.max_tokens < 0) throw std::invalid_argument("max_tokens must be >= 0");
  for (const std::string& stop : options.stop) {
    if (stop.empty()) throw std::invalid_argument("stop strings must not be empty");
  }
  const int64_t n_vocab = model_.n_vocab;
  for (int32_t id : prompt_tokens) {
    if (id < 0 || id >= n_vocab)
      throw std::invalid_argument("prompt token " + std::to_string(id) + " is outside the vocabulary");
  }
  const auto n_prompt = static_cast<int64_t>(prompt_tokens.size());
  if (n_prompt + options.max_tokens > context_) {
    throw std::invalid_argument("prompt (" + std::to_string(n_prompt) + " tokens) plus max_tokens (" +
                                std::to_string(options.max_tokens) + ") exceeds the context of " +
                                std::to_string(context_) + " tokens");
  }

  GenerateResult result;
  result.prompt_tokens = prompt_tokens;
  Sampler sampler(options.sampling);
  BlockAllocator allocator(blocks_for(context_));
  std::vector<int32_t> table;
  allocator.reserve(table, n_prompt + options.max_tokens, kBlockSize);
  std::vector<int32_t> history = prompt_tokens;
  std::vector<float> logits;
  std::vector<int32_t> ids;
  // The model can return only the ids: the argmax when greedy without a bias or penalty, else the
  // id drawn with the sampler's next uniform and the history so far (the uniform taken when the pass
  // gives the next token, as sampler.sample() would; passes that only fill the cache draw nothing).
  const bool no_penalty = !adjusts_logits(options.sampling);
  const bool greedy_ids = no_penalty && model_.greedy && options.sampling.temperature <= 0.0f;
  const bool sampled_ids = !greedy_ids && model_.sample;
  const bool ids_only = greedy_ids || sampled_ids;
  const std::vector<SamplingParams> sample_params(1, options.sampling);
  std::vector<double> uniform(1, 0.0);
  auto run = [&](const ForwardBatch& batch, bool gives_token) {
    if (greedy_ids) {
      model_.greedy(batch, ids);
    } else if (sampled_ids) {
      uniform[0] = gives_token ? sampler.uniform() : 0.0;
      model_.sample(batch, sample_params, uniform, TokenHistories{history}, ids);
    } else {
      model_.forward(batch, logits);
    }
  };
  Completion completion(tokenizer_, {options.max_tokens, options.stop, options.ignore_eos});

  const auto start = std::chrono::steady_clock::now();
  if (options.max_tokens == 0) return result;
  for (int64_t begin = 0; begin < n_prompt; begin += options.prefill_chunk) {
    const int64_t end = std::min(n_prompt, begin + options.prefill_chunk);
    std::vector<int32_t> chunk(prompt_tokens.begin() + begin, prompt_tokens.begin() + end);
    run(ForwardBatch::single(chunk, static_cast<int32_t>(begin), table, false), end == n_prompt);
  }

  auto decode_start = start;
  for (int32_t step = 0; !completion.finished(); ++step) {
    const int32_t token = ids_only ? ids.at(0) : sampler.sample(logits.data(), n_vocab, history);
    if (step == 0) {
      result.prompt_seconds = seconds_since(start);
      decode_start = std::chrono::steady_clock::now();
    }
    history.push_back(token);
    const std::string delta = completion.add(token);
    if (on_token && (!delta.empty() || !completion.finished())) on_token(delta, token);
    if (completion.finished()) break;
    const int32_t pos = static_cast<int32_t>(n_prompt + step);
    run(ForwardBatch::single({token}, pos, table, false), true);
  }
  result.tokens = completion.tokens();
  result.text = completion.text();
  result.finish = completion.finish_reason();
  result.generate_seconds = seconds_since(decode_start);
  allocator.release(table);
  return result;
}

}  // namespace nibble::worker
