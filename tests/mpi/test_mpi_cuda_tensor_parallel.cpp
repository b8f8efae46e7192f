// The tensor-parallel GPU forward pass under a real mpirun (CUDA builds; skips without a device):
// every rank of MPI_COMM_WORLD is one CudaLlamaModel shard, and each rank's gathered logits must
// match the whole GPU model computed locally.
//   mpirun -np 2 test_mpi_cuda_tensor_parallel
// HostReduction: the ranks share one GPU (device 0) and reduce through host memory over MPI
// (CommunicatorReducer), as `nibble serve` does when a tensor group's ranks share a GPU. Nccl: each
// rank on its own GPU with NcclReducer, its decode steps replayed from CUDA graphs; skips unless
// the machine has a GPU per rank.
#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "model/random_model.hpp"
#include "parallel/communicator_reducer.hpp"
#include "parallel/mpi_communicator.hpp"
#include "parallel/nccl_communicator.hpp"
#include "parallel/nccl_reducer.hpp"
#include "tests/mpi/mpi_test_support.hpp"
#include "tests/support/test_support.hpp"
#include "worker/cuda_llama_model.hpp"

namespace nibble::parallel {
namespace {

using test::world_rank;
using test::world_size;

// This rank's copy of the project-made model (write_random_llama is deterministic), in a fresh
// directory removed by the destructor. n_vocab 4093 splits unevenly.
class RankModel {
 public:
  explicit RankModel(kernels::DType type) : path((dir_.path() / "model.gguf").string()) {
    model::LlamaShape shape = model::llama_shape_by_name("tiny");
    shape.n_vocab = n_vocab;
    model::write_random_llama(path, shape, type, 5);
  }
  static constexpr int64_t n_vocab = 4093;

 private:
  test::RankTempDir dir_;  // declared before path, which is made from it

 public:
  const std::string path;
};

// An 11-token prefill with logits for every token, then 3 decode steps: [11 + 3, n_vocab].
// device: the model's (the cache lives there too).
std::vector<float> run_conversation(worker::CudaLlamaModel& model, int device = 0) {
  std::vector<int32_t> prompt;
  for (int i = 0; i < 11; ++i) prompt.push_back(3 + (i * 97 + 5) % static_cast<int>(RankModel::n_vocab - 3));
  const std::vector<int32_t> table = {0, 1};
  worker::CudaKvCache cache(model.shard_config(), 2, 16, device);
  std::vector<float> all, logits;
  model.forward(worker::ForwardBatch::single(prompt, 0, table, true), cache, all);
  for (int32_t step = 0; step < 3; ++step) {
    model.forward(worker::ForwardBatch::single({7 + step * 53}, 11 + step, table, false), cache, logits);
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

// Sharded vs whole on the GPU: the partial sums are added in another order before fp16 roundings.
constexpr double kShardBound = 2e-3;

// Every rank's skip decision is the same (one machine), so no rank waits in a collective alone.
#define REQUIRE_GPU()                                            \
  do {                                                           \
    const std::string why = worker::cuda_unavailable_reason();   \
    if (!why.empty()) GTEST_SKIP() << "no CUDA device: " << why; \
  } while (0)

TEST(CudaTensorParallelMpi, HostReductionRanksSharingOneGpuGatherTheWholeModelsLogits) {
  REQUIRE_GPU();
  auto world = MpiCommunicator::duplicate(MPI_COMM_WORLD, "tensor");
  CommunicatorReducer reducer(*world);
  ASSERT_FALSE(reducer.device_pointers());
  RankModel file(kernels::DType::Q4_0);
  auto whole = worker::CudaLlamaModel::load(file.path);
  const std::vector<float> expected = run_conversation(*whole);
  whole.reset();
  auto shard = worker::CudaLlamaModel::load(file.path, {}, reducer.shard(), &reducer);
  const std::vector<float> got = run_conversation(*shard);
  ASSERT_EQ(got.size(), expected.size());
  EXPECT_LT(test::max_relative_rms(got, expected, RankModel::n_vocab), kShardBound);
  std::vector<float> rank0 = got;  // every rank gathered the same logits
  world->broadcast(rank0.data(), rank0.size() * sizeof(float), 0);
  EXPECT_EQ(got, rank0);
}

TEST(CudaTensorParallelMpi, NcclRanksOnTheirOwnGpusGatherTheWholeModelsLogits) {
  REQUIRE_GPU();
  if (worker::cuda_device_count() < world_size()) {
    GTEST_SKIP() << "needs a GPU per rank (" << worker::cuda_device_count() << " for " << world_size()
                 << " ranks)";
  }
  const int device = world_rank();
  auto world = MpiCommunicator::duplicate(MPI_COMM_WORLD, "tensor");
  auto nccl = NcclCommunicator::create(*world, device);
  NcclReducer reducer(*nccl);
  ASSERT_TRUE(reducer.device_pointers());
  RankModel file(kernels::DType::Q4_0);
  worker::CudaModelOptions options;
  options.device = device;
  auto whole = worker::CudaLlamaModel::load(file.path, options);
  const std::vector<float> expected = run_conversation(*whole, device);
  whole.reset();
  options.graphs = true;  // NCCL's collectives only enqueue: the decode steps replay graphs
  auto shard = worker::CudaLlamaModel::load(file.path, options,
                                            worker::TensorShard{nccl->rank(), nccl->size()}, &reducer);
  const std::vector<float> got = run_conversation(*shard, device);
  ASSERT_EQ(got.size(), expected.size());
  EXPECT_LT(test::max_relative_rms(got, expected, RankModel::n_vocab), kShardBound);
  EXPECT_EQ(shard->captured_graphs(), 1) << "the second and third decode steps: one graph";
  std::vector<float> rank0 = got;
  world->broadcast(rank0.data(), rank0.size() * sizeof(float), 0);
  EXPECT_EQ(got, rank0);
}

}  // namespace
}  // namespace nibble::parallel

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  const int any_failed = nibble::test::run_all_tests_on_every_rank(nibble::test::world_rank());
  MPI_Finalize();
  return any_failed;
}
