// The NCCL communicator with one rank on the one GPU a session is lent (several GPUs are never
// available here; the tensor-parallel logic is tested with several MPI ranks on the CPU backend).
// Skips without a CUDA device.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "parallel/nccl_communicator.hpp"
#include "tests/cuda/cuda_test_util.hpp"

namespace nibble::parallel {
namespace {

std::unique_ptr<NcclCommunicator> single_rank() {
  ncclUniqueId id{};
  EXPECT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  return NcclCommunicator::create(id, 0, 1, 0);
}

std::vector<float> random_values(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

TEST(CudaNcclCommunicator, OneRankCollectivesOnDeviceMemory) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  auto comm = single_rank();
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->size(), 1);

  // The sum over one rank is the data itself, bit for bit, for an odd count.
  const std::vector<float> values = random_values(1001, 3);
  cuda_test::DeviceBuffer<float> data(values);
  ASSERT_NE(data.ptr, nullptr);
  comm->all_reduce_sum(data.ptr, values.size());
  EXPECT_EQ(data.to_host(), values);

  // all_gather of one rank copies send into recv (distinct buffers).
  cuda_test::DeviceBuffer<float> gathered(std::vector<float>(values.size(), -1.0f));
  comm->all_gather(data.ptr, values.size(), gathered.ptr);
  EXPECT_EQ(gathered.to_host(), values);

  comm->broadcast(data.ptr, values.size() * sizeof(float), 0);
  EXPECT_EQ(data.to_host(), values);
  comm->barrier();
}

TEST(CudaNcclCommunicator, BadRanksAreErrorsNotHangs) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  auto comm = single_rank();
  cuda_test::DeviceBuffer<float> data(std::vector<float>(4, 1.0f));
  EXPECT_THROW(comm->broadcast(data.ptr, 16, 1), CommunicatorError);
  EXPECT_THROW(comm->send(data.ptr, 16, 1, 0), CommunicatorError);
  EXPECT_THROW(comm->recv(data.ptr, 16, -1, 0), CommunicatorError);
  EXPECT_THROW(comm->send(data.ptr, 16, 0, -2), CommunicatorError);
  ncclUniqueId id{};
  ASSERT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  EXPECT_THROW(NcclCommunicator::create(id, 1, 1, 0), CommunicatorError);
}

}  // namespace
}  // namespace nibble::parallel
