#pragma once
// The Communicator interface over NCCL, for workers whose activations live on a GPU: one rank per
// GPU, the unique id made by group rank 0 and handed to the others over an existing (MPI)
// communicator at start-up. Built only with CUDA.
//
// Differences from MpiCommunicator, both forced by NCCL:
// - data pointers are device pointers (cudaMalloc'd memory of this rank's device);
// - send/recv match by order alone: the tag is checked to be >= 0 but not transmitted, so two
//   messages between the same pair of ranks must be received in the order they were sent (the
//   pipeline sends one activation tensor per step, in step order).
// Every call of the interface stays blocking (it synchronizes its stream before returning), like the
// interface says; all_reduce_sum_on is the stream-ordered exception, for a GPU model's reductions.
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <memory>

#include "parallel/communicator.hpp"

namespace nibble::parallel {

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `bootstrap`'s ranks: bootstrap rank 0 makes the NCCL id and broadcasts it,
  // then every rank joins with its bootstrap rank on `device`. Throws CommunicatorError naming
  // the failing call.
  static std::unique_ptr<NcclCommunicator> create(Communicator& bootstrap, int device);
  // Joins a group whose id every rank already has (a single rank can make it itself).
  static std::unique_ptr<NcclCommunicator> create(const ncclUniqueId& id, int rank, int size, int device);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }

  // data: [count] floats in device memory.
  void all_reduce_sum(float* data, size_t count) override;
  // The same, stream-ordered: enqueued on `stream` (the caller's, a model's) behind its work and
  // returning at once, the sums there for whatever the stream runs next; a stream being captured
  // records it into the graph. send, recv: [count] floats in device memory (the same for in place).
  // Arguments NCCL refuses throw; a failure after the call returned shows in check_async_error()
  // (every blocking call checks it too).
  void all_reduce_sum_on(const float* send, float* recv, size_t count, cudaStream_t stream);
  // Throws CommunicatorError for a failure of the communicator's stream-ordered work (ncclCommGetAsyncError).
  void check_async_error();
  // send: [count_per_rank], recv: [size(), count_per_rank] floats in device memory.
  void all_gather(const float* send, size_t count_per_rank, float* recv) override;
  // The same, stream-ordered on `stream` like all_reduce_sum_on (a capture records it).
  void all_gather_on(const float* send, size_t count_per_rank, float* recv, cudaStream_t stream);
  // data: [bytes] in device memory.
  void broadcast(void* data, size_t bytes, int root) override;
  // data: [bytes] in device memory; see the class comment on tags.
  void send(const void* data, size_t bytes, int dest, int tag) override;
  void recv(void* data, size_t bytes, int src, int tag) override;
  void barrier() override;

 private:
  NcclCommunicator(ncclComm_t comm, cudaStream_t stream, int rank, int size, int device);
  void finish(const char* what);  // waits for the stream, turning an error into CommunicatorError

  ncclComm_t comm_;
  cudaStream_t stream_;
  int rank_, size_, device_;
};

}  // namespace nibble::parallel
