// nibble_worker_cuda in a build without CUDA (NIBBLE_CUDA=OFF): every entry point says so, so that
// `nibble generate --device cuda` and friends fail with a clear message instead of needing #ifdefs.
#include "worker/cuda_llama_model.hpp"

namespace nibble::worker {

namespace {

[[noreturn]] void unavailable() { throw CudaUnavailable(cuda_unavailable_reason()); }

}  // namespace

std::string cuda_unavailable_reason() {
  return "this nibble was built without CUDA (configure with -DNIBBLE_CUDA=ON where nvcc is installed)";
}

int cuda_device_count() { return 0; }

CudaMemoryInfo cuda_memory_info(int) { unavailable(); }

struct CudaLlamaModel::Impl {};

CudaKvCache::CudaKvCache(const model::LlamaConfig&, int64_t, int64_t, int, KvCacheTypes)
    : n_blocks_(0), block_size_(0), kv_dim_(0), n_layer_(0), k_row_bytes_(0), v_row_bytes_(0) {
  unavailable();
}
CudaKvCache::~CudaKvCache() = default;
std::vector<uint16_t> CudaKvCache::layer_to_host(int64_t, bool) const { unavailable(); }
std::vector<uint8_t> CudaKvCache::layer_bytes_to_host(int64_t, bool) const { unavailable(); }

std::unique_ptr<CudaLlamaModel> CudaLlamaModel::load(const std::string&, CudaModelOptions, TensorShard,
                                                     ShardReducer*, LayerRange) {
  unavailable();
}
CudaLlamaModel::CudaLlamaModel(std::shared_ptr<const model::LlamaCheckpoint>, CudaModelOptions, TensorShard,
                               ShardReducer*, LayerRange) {
  unavailable();
}
CudaLlamaModel::~CudaLlamaModel() = default;
const model::LlamaConfig& CudaLlamaModel::config() const { unavailable(); }
const model::LlamaConfig& CudaLlamaModel::shard_config() const { unavailable(); }
TensorShard CudaLlamaModel::shard() const { unavailable(); }
LayerRange CudaLlamaModel::layers() const { unavailable(); }
bool CudaLlamaModel::is_first_stage() const { unavailable(); }
bool CudaLlamaModel::is_last_stage() const { unavailable(); }
const model::LlamaCheckpoint& CudaLlamaModel::checkpoint() const { unavailable(); }
int64_t CudaLlamaModel::weight_bytes() const { unavailable(); }
int64_t CudaLlamaModel::captured_graphs() const { unavailable(); }
void CudaLlamaModel::set_programmatic_launch(bool) { unavailable(); }
void CudaLlamaModel::set_fused_epilogues(bool) { unavailable(); }
void CudaLlamaModel::set_fused_norms(bool) { unavailable(); }
void CudaLlamaModel::set_mma_prefill_attention(bool) { unavailable(); }
void CudaLlamaModel::set_kv_cache_types(const KvCacheTypes&) { unavailable(); }
const KvCacheTypes& CudaLlamaModel::kv_cache_types() const { unavailable(); }
void CudaLlamaModel::set_kv_cache_rotation(bool) { unavailable(); }
void CudaLlamaModel::set_lora(int32_t, const model::LoraAdapter&, float) { unavailable(); }
void CudaLlamaModel::remove_lora(int32_t) { unavailable(); }
void CudaLlamaModel::set_default_lora(int32_t) { unavailable(); }
bool CudaLlamaModel::has_lora(int32_t) const { unavailable(); }
bool CudaLlamaModel::mma_prefill_attention_applies() const { unavailable(); }
const CudaModelOptions& CudaLlamaModel::options() const { unavailable(); }
const std::vector<CudaInt4KernelChoice>& CudaLlamaModel::int4_kernel_choices() const { unavailable(); }
const std::vector<CudaQ4KChoice>& CudaLlamaModel::q4_k_choices() const { unavailable(); }
const std::vector<CudaFusionChoice>& CudaLlamaModel::one_row_fusions() const { unavailable(); }
void CudaLlamaModel::forward(const ForwardBatch&, CudaKvCache&, std::vector<float>&) { unavailable(); }
void CudaLlamaModel::forward_greedy(const ForwardBatch&, CudaKvCache&, std::vector<int32_t>&) {
  unavailable();
}
void CudaLlamaModel::forward_stage_verify(const ForwardBatch&, CudaKvCache&, const float*,
                                          const std::vector<VerifySequence>&, std::vector<int32_t>&,
                                          std::vector<std::vector<int32_t>>&) {
  unavailable();
}
CudaStepProfile CudaLlamaModel::profile_greedy(const ForwardBatch&, CudaKvCache&, std::vector<int32_t>&) {
  unavailable();
}
void CudaLlamaModel::forward_stage_greedy(const ForwardBatch&, CudaKvCache&, const float*,
                                          std::vector<int32_t>&) {
  unavailable();
}
void CudaLlamaModel::forward_sample(const ForwardBatch&, CudaKvCache&, const std::vector<SamplingParams>&,
                                    const std::vector<double>&, std::vector<int32_t>&,
                                    const TokenHistories&) {
  unavailable();
}
std::shared_ptr<KeptRows> CudaLlamaModel::make_kept_rows(int64_t) { unavailable(); }
void CudaLlamaModel::forward_draft_sample(const ForwardBatch&, CudaKvCache&,
                                          const std::vector<SamplingParams>&, const std::vector<double>&,
                                          const std::vector<KeptRowRef>&, std::vector<int32_t>&) {
  unavailable();
}
void CudaLlamaModel::forward_stage(const ForwardBatch&, CudaKvCache&, const float*, std::vector<float>&) {
  unavailable();
}

}  // namespace nibble::worker
