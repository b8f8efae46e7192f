#include "cluster/sampling_settings.hpp"

namespace nibble::cluster {

worker::SamplingParams to_sampling_params(const protocol::SequenceSampling& s) {
  worker::SamplingParams params;
  params.temperature = s.temperature;
  params.top_k = s.top_k;
  params.top_p = s.top_p;
  params.min_p = s.min_p;
  params.repetition_penalty = s.repetition_penalty;
  params.presence_penalty = s.presence_penalty;
  params.frequency_penalty = s.frequency_penalty;
  params.repeat_last_n = s.repeat_last_n;
  for (const protocol::TokenBias& b : s.logit_bias) params.logit_bias.push_back({b.token, b.bias});
  params.seed = s.seed;
  return params;
}

protocol::SequenceSampling to_sequence_sampling(uint64_t seq_id, const worker::SamplingParams& p) {
  protocol::SequenceSampling s{.seq_id = seq_id,
                               .temperature = p.temperature,
                               .top_k = p.top_k,
                               .top_p = p.top_p,
                               .min_p = p.min_p,
                               .repetition_penalty = p.repetition_penalty,
                               .repeat_last_n = p.repeat_last_n,
                               .seed = p.seed,
                               .presence_penalty = p.presence_penalty,
                               .frequency_penalty = p.frequency_penalty};
  for (const worker::TokenBias& b : p.logit_bias) s.logit_bias.push_back({b.token, b.bias});
  return s;
}

}  // namespace nibble::cluster
