// The NCCL communicator with one rank on the one GPU a session is lent (several GPUs are never
// available here; the tensor-parallel logic is tested with several MPI ranks on the CPU backend).
// Skips without a CUDA device.
#include <gtest/gtest.h>

#include <functional>
#include <random>
#include <string>
#include <vector>

#include "parallel/nccl_communicator.hpp"
#include "parallel/nccl_reducer.hpp"
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

// staged holds `first`: enqueue() run directly on stream must leave `first` in out. Then enqueue() is
// captured into a CUDA graph (thread-local mode, the model's), staged rewritten with `second` and the
// graph replayed: out must hold `second` (a step left outside the graph would leave `first`).
void check_direct_then_replayed(cudaStream_t stream, const std::function<void()>& enqueue,
                                cuda_test::DeviceBuffer<float>& staged, const std::vector<float>& first,
                                const std::vector<float>& second, const cuda_test::DeviceBuffer<float>& out) {
  enqueue();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(out.to_host(), first);

  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  enqueue();
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(staged.ptr, second.data(), second.size() * sizeof(float), cudaMemcpyHostToDevice),
            cudaSuccess);
  // From pageable memory the copy may return before its DMA lands; the stream does not wait for it.
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(out.to_host(), second);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
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

// The stream-ordered all-reduce (what a GPU model's reductions use): on the caller's stream, behind the
// work before it and ahead of the work after it, with no blocking call; and recorded into a CUDA graph
// when that stream is being captured (the model's mode: thread-local), the graph then replayed on
// fresh data. One rank: the sum is the data itself, bit for bit. Out of place, so that NCCL has work
// to enqueue at one rank (a copy; in place it has none): enqueued on another stream, it would run at
// capture time and the replay would leave the first values.
TEST(CudaNcclCommunicator, OneRankAllReduceOnTheCallersStreamAndInAGraph) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  auto comm = single_rank();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const std::vector<float> first = random_values(777, 5), second = random_values(777, 6);
  const size_t bytes = first.size() * sizeof(float);
  cuda_test::DeviceBuffer<float> staged(first), data(std::vector<float>(first.size(), 0.0f)),
      reduced(std::vector<float>(first.size(), 0.0f)), out(std::vector<float>(first.size(), -1.0f));
  // Stream order: data <- staged, the all-reduce into reduced, out <- reduced, then one synchronization.
  const auto enqueue = [&] {
    EXPECT_EQ(cudaMemcpyAsync(data.ptr, staged.ptr, bytes, cudaMemcpyDeviceToDevice, stream), cudaSuccess);
    comm->all_reduce_sum_on(data.ptr, reduced.ptr, first.size(), stream);
    EXPECT_EQ(cudaMemcpyAsync(out.ptr, reduced.ptr, bytes, cudaMemcpyDeviceToDevice, stream), cudaSuccess);
  };
  check_direct_then_replayed(stream, enqueue, staged, first, second, out);
  cudaStreamDestroy(stream);
  comm->check_async_error();  // nothing failed after returning
  comm->barrier();            // the communicator still answers blocking calls
}

// The reducer's stream-ordered logits gather (what a sharded model's graphs hold), at one rank: the
// gathered rows are the local ones. One row takes the all-gather straight into out; several rows go
// through the scratch and the strided copies. Each is checked run directly, then captured into a graph
// and replayed on fresh values (a step left outside the graph would leave the first values), with an
// odd column count; scratch is made only by reserve_gather (moved once, then not), and a gather of
// more rows than reserved is refused.
TEST(CudaNcclReducer, OneRankGathersColumnsOnTheCallersStreamAndInAGraph) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  auto comm = single_rank();
  NcclReducer reducer(*comm);
  ASSERT_TRUE(reducer.stream_ordered());
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const std::vector<int64_t> counts = {333};
  EXPECT_TRUE(reducer.reserve_gather(3, counts)) << "the first reservation allocates";
  EXPECT_FALSE(reducer.reserve_gather(3, counts)) << "the same size again does not move the scratch";
  EXPECT_FALSE(reducer.reserve_gather(1, counts));
  for (const int64_t rows : {int64_t{1}, int64_t{3}}) {
    SCOPED_TRACE(std::to_string(rows) + " rows");
    const size_t n = static_cast<size_t>(rows * counts[0]);
    const std::vector<float> first = random_values(n, 7), second = random_values(n, 8);
    cuda_test::DeviceBuffer<float> staged(first), local(std::vector<float>(n, 0.0f)),
        out(std::vector<float>(n, -1.0f));
    const auto enqueue = [&] {
      EXPECT_EQ(cudaMemcpyAsync(local.ptr, staged.ptr, n * sizeof(float), cudaMemcpyDeviceToDevice, stream),
                cudaSuccess);
      EXPECT_TRUE(reducer.gather_columns_on_stream(local.ptr, rows, counts, out.ptr, stream));
    };
    check_direct_then_replayed(stream, enqueue, staged, first, second, out);
  }
  cuda_test::DeviceBuffer<float> big(std::vector<float>(4 * 333, 1.0f)), big_out(4 * 333);
  EXPECT_THROW(reducer.gather_columns_on_stream(big.ptr, 4, counts, big_out.ptr, stream), CommunicatorError)
      << "4 rows were never reserved";
  EXPECT_THROW(reducer.reserve_gather(1, {100, 233}), CommunicatorError) << "two counts for a group of one";
  // The blocking gather reserves for itself.
  const std::vector<float> values = random_values(5 * 333, 9);
  cuda_test::DeviceBuffer<float> five(values), five_out(values.size());
  reducer.gather_columns(five.ptr, 5, counts, five_out.ptr);
  EXPECT_EQ(five_out.to_host(), values);
  cudaStreamDestroy(stream);
  comm->check_async_error();
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
