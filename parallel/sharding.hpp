#pragma once
// Megatron-style splits of a Llama model over T tensor-parallel ranks and P pipeline stages. The
// arithmetic lives in worker/tensor_shard.hpp (the sharded forward pass needs it, and worker/ must
// not include parallel/); this header keeps the parallel:: names. See there for the contracts:
//   split_heads   attention: each rank owns whole query heads and the KV heads they read
//   split_rows    column-parallel weights and, with a granularity, row-parallel inputs
//   split_vocab   the output projection / embedding over n_vocab (uneven allowed)
//   split_layers  transformer blocks over pipeline stages (uneven allowed)
#include "worker/tensor_shard.hpp"

namespace nibble::parallel {

using worker::HeadShard;
using worker::ShardRange;
using worker::split_heads;
using worker::split_layers;
using worker::split_rows;
using worker::split_vocab;

}  // namespace nibble::parallel
