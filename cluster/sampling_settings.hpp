#pragma once
// A sequence's sampler settings as the worker-side code uses them (worker::SamplingParams) and as
// they travel in the control plane (protocol::SequenceSampling).
#include <cstdint>

#include "cluster/protocol/worker_protocol.hpp"
#include "worker/sampler.hpp"

namespace nibble::cluster {

worker::SamplingParams to_sampling_params(const protocol::SequenceSampling& sampling);
protocol::SequenceSampling to_sequence_sampling(uint64_t seq_id, const worker::SamplingParams& params);

}  // namespace nibble::cluster
