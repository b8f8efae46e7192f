#include "parallel/mpi_communicator.hpp"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <utility>

namespace nibble::parallel {
namespace {

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "MPI error code " + std::to_string(code);
  return std::string(text, static_cast<size_t>(length));
}

// Throws for calls made before this rank is part of an MpiCommunicator (split, dup, world queries).
void check_setup(int code, const char* call) {
  if (code != MPI_SUCCESS) throw CommunicatorError(std::string(call) + " failed: " + mpi_error_string(code));
}

// Calls fn(offset, n) for consecutive chunks [offset, offset + n) of [0, count), n <= max_chunk.
// A zero count still makes one (empty) call, so a zero-byte send still pairs with its recv.
template <typename Fn>
void for_each_chunk(size_t count, size_t max_chunk, Fn&& fn) {
  size_t offset = 0;
  do {
    const size_t n = std::min(max_chunk, count - offset);
    fn(offset, static_cast<int>(n));
    offset += n;
  } while (offset < count);
}

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm owned, std::string name) : comm_(owned), name_(std::move(name)) {
  // Errors come back as codes that check() turns into exceptions, instead of MPI's default abort
  // without context.
  check_setup(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  if (!name_.empty()) check_setup(MPI_Comm_set_name(comm_, name_.c_str()), "MPI_Comm_set_name");
  check_setup(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
  check_setup(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  void* tag_ub = nullptr;
  int found = 0;
  check_setup(MPI_Comm_get_attr(comm_, MPI_TAG_UB, &tag_ub, &found), "MPI_Comm_get_attr(MPI_TAG_UB)");
  if (found) max_tag_ = *static_cast<int*>(tag_ub);
}

MpiCommunicator::~MpiCommunicator() {
  // After MPI_Finalize the handle is gone with MPI; freeing it then would be an error.
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&comm_);
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::split(MPI_Comm parent, int color, int key,
                                                        const std::string& name) {
  MPI_Comm child = MPI_COMM_NULL;
  check_setup(MPI_Comm_split(parent, color, key, &child), "MPI_Comm_split");
  if (child == MPI_COMM_NULL) return nullptr;
  return std::unique_ptr<MpiCommunicator>(new MpiCommunicator(child, name));
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::duplicate(MPI_Comm comm, const std::string& name) {
  MPI_Comm copy = MPI_COMM_NULL;
  check_setup(MPI_Comm_dup(comm, &copy), "MPI_Comm_dup");
  return std::unique_ptr<MpiCommunicator>(new MpiCommunicator(copy, name));
}

void MpiCommunicator::set_max_chunk_elements(size_t elements) {
  if (elements == 0 || elements > kMaxChunkElements) {
    throw CommunicatorError("max chunk must be in [1, INT_MAX], got " + std::to_string(elements));
  }
  max_chunk_ = elements;
}

void MpiCommunicator::check(int code, const char* call) const {
  if (code == MPI_SUCCESS) return;
  throw CommunicatorError(std::string(call) + " failed on rank " + std::to_string(rank_) + " of " +
                          std::to_string(size_) + (name_.empty() ? "" : " in '" + name_ + "'") + ": " +
                          mpi_error_string(code));
}

void MpiCommunicator::check_peer(int peer, const char* what, const char* call) const {
  if (peer < 0 || peer >= size_) {
    throw CommunicatorError(std::string(call) + ": " + what + " " + std::to_string(peer) +
                            " is outside [0, " + std::to_string(size_) + ")" +
                            (name_.empty() ? "" : " in '" + name_ + "'"));
  }
}

void MpiCommunicator::check_tag(int tag, const char* call) const {
  if (tag < 0 || tag > max_tag_) {
    throw CommunicatorError(std::string(call) + ": tag " + std::to_string(tag) + " is outside [0, " +
                            std::to_string(max_tag_) + "]");
  }
}

void MpiCommunicator::all_reduce_sum(float* data, size_t count) {
  if (data == nullptr && count > 0) throw CommunicatorError("all_reduce_sum: null buffer");
  for_each_chunk(count, max_chunk_, [&](size_t offset, int n) {
    check(MPI_Allreduce(MPI_IN_PLACE, data + offset, n, MPI_FLOAT, MPI_SUM, comm_), "MPI_Allreduce");
  });
}

void MpiCommunicator::all_gather(const float* send, size_t count_per_rank, float* recv) {
  if ((send == nullptr || recv == nullptr) && count_per_rank > 0)
    throw CommunicatorError("all_gather: null buffer");
  if (count_per_rank <= max_chunk_) {
    const int n = static_cast<int>(count_per_rank);
    check(MPI_Allgather(send, n, MPI_FLOAT, recv, n, MPI_FLOAT, comm_), "MPI_Allgather");
    return;
  }
  // Each chunk of a row lands in every rank's row of recv: receive it as a type holding n floats
  // whose extent is a whole row, so rank r's piece goes to recv + r * count_per_rank + offset.
  const auto row_bytes = static_cast<MPI_Aint>(count_per_rank * sizeof(float));
  for_each_chunk(count_per_rank, max_chunk_, [&](size_t offset, int n) {
    MPI_Datatype piece = MPI_DATATYPE_NULL;
    MPI_Datatype row_strided = MPI_DATATYPE_NULL;
    check(MPI_Type_contiguous(n, MPI_FLOAT, &piece), "MPI_Type_contiguous");
    const int resized = MPI_Type_create_resized(piece, 0, row_bytes, &row_strided);
    MPI_Type_free(&piece);
    check(resized, "MPI_Type_create_resized");
    int code = MPI_Type_commit(&row_strided);
    if (code == MPI_SUCCESS) {
      code = MPI_Allgather(send + offset, n, MPI_FLOAT, recv + offset, 1, row_strided, comm_);
    }
    MPI_Type_free(&row_strided);
    check(code, "MPI_Allgather");
  });
}

void MpiCommunicator::broadcast(void* data, size_t bytes, int root) {
  check_peer(root, "root", "broadcast");
  if (data == nullptr && bytes > 0) throw CommunicatorError("broadcast: null buffer");
  auto* base = static_cast<char*>(data);
  for_each_chunk(bytes, max_chunk_, [&](size_t offset, int n) {
    check(MPI_Bcast(base + offset, n, MPI_BYTE, root, comm_), "MPI_Bcast");
  });
}

void MpiCommunicator::send(const void* data, size_t bytes, int dest, int tag) {
  check_peer(dest, "dest", "send");
  check_tag(tag, "send");
  if (data == nullptr && bytes > 0) throw CommunicatorError("send: null buffer");
  const auto* base = static_cast<const char*>(data);
  // Chunks with one (dest, tag) are matched in order (MPI's non-overtaking rule), so the receiver's
  // identical chunking reassembles them.
  for_each_chunk(bytes, max_chunk_, [&](size_t offset, int n) {
    check(MPI_Send(base + offset, n, MPI_BYTE, dest, tag, comm_), "MPI_Send");
  });
}

void MpiCommunicator::recv(void* data, size_t bytes, int src, int tag) {
  check_peer(src, "src", "recv");
  check_tag(tag, "recv");
  if (data == nullptr && bytes > 0) throw CommunicatorError("recv: null buffer");
  auto* base = static_cast<char*>(data);
  for_each_chunk(bytes, max_chunk_, [&](size_t offset, int n) {
    MPI_Status status;
    check(MPI_Recv(base + offset, n, MPI_BYTE, src, tag, comm_, &status), "MPI_Recv");
    int received = 0;
    check(MPI_Get_count(&status, MPI_BYTE, &received), "MPI_Get_count");
    if (received != n) {
      // A shorter message means the sender's size disagrees with ours; longer ones fail above
      // with MPI_ERR_TRUNCATE.
      throw CommunicatorError("recv on rank " + std::to_string(rank_) + " from rank " + std::to_string(src) +
                              " (tag " + std::to_string(tag) + "): expected " + std::to_string(n) +
                              " bytes, got " + std::to_string(received));
    }
  });
}

void MpiCommunicator::barrier() { check(MPI_Barrier(comm_), "MPI_Barrier"); }

ParallelGroups make_groups(MPI_Comm world, const RankLayout& layout) {
  int world_size = 0;
  int world_rank = 0;
  check_setup(MPI_Comm_size(world, &world_size), "MPI_Comm_size");
  check_setup(MPI_Comm_rank(world, &world_rank), "MPI_Comm_rank");
  if (world_size != layout.world_size()) {
    throw CommunicatorError("MPI world has " + std::to_string(world_size) + " ranks but the layout needs " +
                            layout.describe());
  }
  const RankInfo me = layout.rank(world_rank);
  const bool worker = me.role == Role::worker;
  // Every rank takes part in every split (they are collective over world); the coordinator opts
  // out with MPI_UNDEFINED and gets null.
  ParallelGroups groups;
  groups.workers = MpiCommunicator::split(world, worker ? 0 : MPI_UNDEFINED, me.worker_index, "workers");
  groups.tensor = MpiCommunicator::split(world, worker ? me.stage : MPI_UNDEFINED, me.tp_rank,
                                         "tensor stage " + std::to_string(me.stage));
  groups.pipeline = MpiCommunicator::split(world, worker ? me.tp_rank : MPI_UNDEFINED, me.stage,
                                           "pipeline tp_rank " + std::to_string(me.tp_rank));
  return groups;
}

int host_local_rank(MPI_Comm world) {
  int comparison = MPI_UNEQUAL;
  check_setup(MPI_Comm_compare(world, MPI_COMM_WORLD, &comparison), "MPI_Comm_compare");
  if (comparison == MPI_IDENT || comparison == MPI_CONGRUENT) {
    // Open MPI's launcher exports this; reading it costs no communication.
    if (const char* value = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")) {
      char* end = nullptr;
      const long local = std::strtol(value, &end, 10);
      if (end != value && *end == '\0' && local >= 0 && local <= INT_MAX) return static_cast<int>(local);
    }
  }
  MPI_Comm host = MPI_COMM_NULL;
  check_setup(MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &host),
              "MPI_Comm_split_type");
  int local = 0;
  const int code = MPI_Comm_rank(host, &local);
  MPI_Comm_free(&host);
  check_setup(code, "MPI_Comm_rank");
  return local;
}

RankInfo describe_this_rank(MPI_Comm world, const RankLayout& layout) {
  int world_rank = 0;
  check_setup(MPI_Comm_rank(world, &world_rank), "MPI_Comm_rank");
  RankInfo info = layout.rank(world_rank);
  info.local_rank = host_local_rank(world);
  return info;
}

}  // namespace nibble::parallel
