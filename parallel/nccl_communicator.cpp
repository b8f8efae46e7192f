#include "parallel/nccl_communicator.hpp"

#include <string>

namespace nibble::parallel {

namespace {

void check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw CommunicatorError(std::string("NCCL ") + what + ": " + ncclGetErrorString(r));
}
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw CommunicatorError(std::string("CUDA ") + what + ": " + cudaGetErrorString(e));
}

}  // namespace

std::unique_ptr<NcclCommunicator> NcclCommunicator::create(Communicator& bootstrap, int device) {
  ncclUniqueId id{};
  if (bootstrap.rank() == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  bootstrap.broadcast(&id, sizeof id, 0);
  return create(id, bootstrap.rank(), bootstrap.size(), device);
}

std::unique_ptr<NcclCommunicator> NcclCommunicator::create(const ncclUniqueId& id, int rank, int size,
                                                           int device) {
  if (size < 1 || rank < 0 || rank >= size)
    throw CommunicatorError("NCCL group: rank " + std::to_string(rank) + " of " + std::to_string(size));
  check(cudaSetDevice(device), "cudaSetDevice");
  cudaStream_t stream = nullptr;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRank(&comm, size, id, rank);
  if (r != ncclSuccess) {
    cudaStreamDestroy(stream);
    check(r, "ncclCommInitRank");
  }
  return std::unique_ptr<NcclCommunicator>(new NcclCommunicator(comm, stream, rank, size, device));
}

NcclCommunicator::NcclCommunicator(ncclComm_t comm, cudaStream_t stream, int rank, int size, int device)
    : comm_(comm), stream_(stream), rank_(rank), size_(size), device_(device) {}

NcclCommunicator::~NcclCommunicator() {
  ncclCommDestroy(comm_);
  cudaStreamDestroy(stream_);
}

void NcclCommunicator::finish(const char* what) {
  check(cudaStreamSynchronize(stream_), what);
  ncclResult_t async = ncclSuccess;
  check(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
  check(async, what);
}

void NcclCommunicator::all_reduce_sum(float* data, size_t count) {
  check(ncclAllReduce(data, data, count, ncclFloat32, ncclSum, comm_, stream_), "ncclAllReduce");
  finish("all_reduce_sum");
}

void NcclCommunicator::all_reduce_sum_on(const float* send, float* recv, size_t count, cudaStream_t stream) {
  check(ncclAllReduce(send, recv, count, ncclFloat32, ncclSum, comm_, stream),
        "ncclAllReduce (stream-ordered)");
}

void NcclCommunicator::check_async_error() {
  ncclResult_t async = ncclSuccess;
  check(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
  check(async, "a stream-ordered collective");
}

void NcclCommunicator::all_gather(const float* send, size_t count_per_rank, float* recv) {
  all_gather_on(send, count_per_rank, recv, stream_);
  finish("all_gather");
}

void NcclCommunicator::all_gather_on(const float* send, size_t count_per_rank, float* recv,
                                     cudaStream_t stream) {
  check(ncclAllGather(send, recv, count_per_rank, ncclFloat32, comm_, stream), "ncclAllGather");
}

void NcclCommunicator::broadcast(void* data, size_t bytes, int root) {
  if (root < 0 || root >= size_)
    throw CommunicatorError("broadcast root " + std::to_string(root) + " out of range");
  check(ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, stream_), "ncclBroadcast");
  finish("broadcast");
}

void NcclCommunicator::send(const void* data, size_t bytes, int dest, int tag) {
  if (dest < 0 || dest >= size_ || tag < 0)
    throw CommunicatorError("send to rank " + std::to_string(dest) + " tag " + std::to_string(tag));
  check(ncclSend(data, bytes, ncclUint8, dest, comm_, stream_), "ncclSend");
  finish("send");
}

void NcclCommunicator::recv(void* data, size_t bytes, int src, int tag) {
  if (src < 0 || src >= size_ || tag < 0)
    throw CommunicatorError("recv from rank " + std::to_string(src) + " tag " + std::to_string(tag));
  check(ncclRecv(data, bytes, ncclUint8, src, comm_, stream_), "ncclRecv");
  finish("recv");
}

void NcclCommunicator::barrier() {
  // NCCL has no barrier: an all-reduce of one float on scratch device memory is one.
  float* scratch = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&scratch), sizeof(float), stream_), "cudaMallocAsync");
  check(cudaMemsetAsync(scratch, 0, sizeof(float), stream_), "cudaMemsetAsync");
  check(ncclAllReduce(scratch, scratch, 1, ncclFloat32, ncclSum, comm_, stream_), "ncclAllReduce");
  check(cudaFreeAsync(scratch, stream_), "cudaFreeAsync");
  finish("barrier");
}

}  // namespace nibble::parallel
