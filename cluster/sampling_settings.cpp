#include "cluster/sampling_settings.hpp"

namespace nibble::cluster {

worker::SamplingParams to_sampling_params(const protocol::SequenceSampling& s) {
  worker::SamplingParams params;
  params.temperature = s.temperature;
  params.top_k = s.top_k;
  params.top_p = s.top_p;
  params.min_p = s.min_p;
  params.repetition_penalty = s.repetition_penalty;
  params.repeat_last_n = s.repeat_last_n;
  params.seed = s.seed;
  return params;
}

protocol::SequenceSampling to_sequence_sampling(uint64_t seq_id, const worker::SamplingParams& p) {
  return {seq_id, p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.repeat_last_n, p.seed};
}

}  // namespace nibble::cluster
