// MpiCommunicator and make_groups under a real mpirun:
//   mpirun -np 1+T*P test_mpi_communicator --tensor T --pipeline P [gtest flags]
// Every rank runs every test in the same order (the collectives need all of them). Only rank 0
// prints gtest's report; other ranks print just their failed assertions, tagged with the rank. The
// exit code is non-zero on every rank when any rank failed.
//
// Data are random multiples of 1/8 in [-512, 512], so that float sums are exact whatever order MPI
// reduces in, and expectations computed locally can be compared with ==.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "parallel/mpi_communicator.hpp"
#include "tests/mpi/mpi_test_support.hpp"

namespace nibble::parallel {
namespace {

using test::world_rank;
using test::world_size;

int g_tensor = 0;
int g_pipeline = 0;

// Odd sizes, from one element to well past Open MPI's eager limit (rendezvous protocol).
const size_t kCounts[] = {1, 7, 1001, 65537};
// A small odd chunk limit, so that the chunked code paths run on buffers that fit in memory.
constexpr size_t kSmallChunk = 333;

std::vector<float> random_values(size_t count, uint32_t seed) {
  std::mt19937 generator(seed);
  std::uniform_int_distribution<int> eighths(-4096, 4096);
  std::vector<float> values(count);
  for (auto& value : values) value = static_cast<float>(eighths(generator)) / 8.0f;
  return values;
}

std::vector<unsigned char> random_bytes(size_t count, uint32_t seed) {
  std::mt19937 generator(seed);
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<unsigned char> bytes(count);
  for (auto& value : bytes) value = static_cast<unsigned char>(byte(generator));
  return bytes;
}

uint32_t seed_for(size_t count, int rank) { return static_cast<uint32_t>(count * 131 + rank); }

// Runs body once with MPI's own counts and once forced through the chunked paths.
template <typename Body>
void with_and_without_chunking(MpiCommunicator& comm, Body&& body) {
  for (size_t chunk : {MpiCommunicator::kMaxChunkElements, kSmallChunk}) {
    SCOPED_TRACE("max chunk " + std::to_string(chunk));
    comm.set_max_chunk_elements(chunk);
    body();
  }
  comm.set_max_chunk_elements(MpiCommunicator::kMaxChunkElements);
}

void check_all_reduce(MpiCommunicator& comm) {
  with_and_without_chunking(comm, [&] {
    for (size_t count : kCounts) {
      std::vector<float> data = random_values(count, seed_for(count, comm.rank()));
      std::vector<float> expected(count, 0.0f);
      for (int r = 0; r < comm.size(); ++r) {
        const std::vector<float> theirs = random_values(count, seed_for(count, r));
        for (size_t i = 0; i < count; ++i) expected[i] += theirs[i];
      }
      comm.all_reduce_sum(data.data(), count);
      EXPECT_EQ(data, expected) << "count " << count;
    }
  });
}

void check_all_gather(MpiCommunicator& comm) {
  with_and_without_chunking(comm, [&] {
    for (size_t count : kCounts) {
      const std::vector<float> mine = random_values(count, seed_for(count, comm.rank()));
      std::vector<float> gathered(count * comm.size(), -1.0f);
      comm.all_gather(mine.data(), count, gathered.data());
      for (int r = 0; r < comm.size(); ++r) {
        const std::vector<float> row(gathered.begin() + r * count, gathered.begin() + (r + 1) * count);
        EXPECT_EQ(row, random_values(count, seed_for(count, r))) << "count " << count << " row " << r;
      }
    }
  });
}

void check_broadcast(MpiCommunicator& comm) {
  with_and_without_chunking(comm, [&] {
    for (int root = 0; root < comm.size(); ++root) {
      const size_t bytes = 100003;
      const std::vector<unsigned char> expected = random_bytes(bytes, seed_for(bytes, root));
      std::vector<unsigned char> data = comm.rank() == root ? expected : std::vector<unsigned char>(bytes, 0);
      comm.broadcast(data.data(), bytes, root);
      EXPECT_EQ(data, expected) << "root " << root;
    }
  });
}

// Each rank passes a message to the next one around the ring. Blocking sends on a ring deadlock if
// everyone sends first, so rank 0 sends first and the others receive first.
void check_ring(MpiCommunicator& comm) {
  if (comm.size() < 2) return;
  with_and_without_chunking(comm, [&] {
    for (size_t bytes : {size_t{0}, size_t{1}, size_t{4097}, size_t{100003}}) {
      const int next = (comm.rank() + 1) % comm.size();
      const int prev = (comm.rank() + comm.size() - 1) % comm.size();
      const int tag = static_cast<int>(bytes % 1000);
      const std::vector<unsigned char> mine = random_bytes(bytes, seed_for(bytes, comm.rank()));
      std::vector<unsigned char> received(bytes, 0);
      if (comm.rank() == 0) {
        comm.send(mine.data(), bytes, next, tag);
        comm.recv(received.data(), bytes, prev, tag);
      } else {
        comm.recv(received.data(), bytes, prev, tag);
        comm.send(mine.data(), bytes, next, tag);
      }
      EXPECT_EQ(received, random_bytes(bytes, seed_for(bytes, prev))) << bytes << " bytes";
    }
  });
}

// Nobody leaves the barrier before the last rank has entered it: rank 0 enters late and records
// when; every rank's exit time must be later. (steady_clock is one clock for all processes of a
// host, and this test runs on one host.)
void check_barrier(MpiCommunicator& comm) {
  using Clock = std::chrono::steady_clock;
  comm.barrier();
  int64_t entered = 0;
  if (comm.rank() == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    entered = Clock::now().time_since_epoch().count();
  }
  comm.barrier();
  const int64_t left = Clock::now().time_since_epoch().count();
  comm.broadcast(&entered, sizeof(entered), 0);
  EXPECT_GE(left, entered);
}

class WorldTest : public ::testing::Test {
 protected:
  void SetUp() override { world_ = MpiCommunicator::duplicate(MPI_COMM_WORLD, "world"); }
  std::unique_ptr<MpiCommunicator> world_;
};

TEST_F(WorldTest, RankAndSize) {
  EXPECT_EQ(world_->rank(), world_rank());
  EXPECT_EQ(world_->size(), world_size());
  EXPECT_EQ(world_->size(), 1 + g_tensor * g_pipeline);
}

TEST_F(WorldTest, AllReduceSum) { check_all_reduce(*world_); }
TEST_F(WorldTest, AllGather) { check_all_gather(*world_); }
TEST_F(WorldTest, Broadcast) { check_broadcast(*world_); }
TEST_F(WorldTest, SendRecvRing) { check_ring(*world_); }
TEST_F(WorldTest, Barrier) { check_barrier(*world_); }

TEST_F(WorldTest, RejectsBadArgumentsWithoutCommunicating) {
  char byte = 0;
  EXPECT_THROW(world_->send(&byte, 1, world_->size(), 0), CommunicatorError);
  EXPECT_THROW(world_->recv(&byte, 1, -1, 0), CommunicatorError);
  EXPECT_THROW(world_->send(&byte, 1, 0, -5), CommunicatorError);
  EXPECT_THROW(world_->broadcast(&byte, 1, world_->size()), CommunicatorError);
  EXPECT_THROW(world_->all_reduce_sum(nullptr, 3), CommunicatorError);
  EXPECT_THROW(world_->set_max_chunk_elements(0), CommunicatorError);
}

// A receive that disagrees with the sender about the size throws with MPI's reason, rather than
// aborting the job (MPI_ERRORS_RETURN) or silently delivering part of the message.
TEST_F(WorldTest, SizeMismatchThrows) {
  const std::vector<unsigned char> sixteen(16, 7);
  std::vector<unsigned char> buffer(16, 0);
  if (world_->rank() == 0) {
    world_->send(sixteen.data(), 16, 1, 3);  // longer than the receiver expects
    world_->send(sixteen.data(), 8, 1, 4);   // shorter than the receiver expects
  } else if (world_->rank() == 1) {
    try {
      world_->recv(buffer.data(), 8, 0, 3);
      ADD_FAILURE() << "a truncated receive did not throw";
    } catch (const CommunicatorError& error) {
      EXPECT_NE(std::string(error.what()).find("MPI_Recv failed on rank 1"), std::string::npos)
          << error.what();
      EXPECT_NE(std::string(error.what()).find("TRUNCATE"), std::string::npos) << error.what();
    }
    try {
      world_->recv(buffer.data(), 16, 0, 4);
      ADD_FAILURE() << "a short receive did not throw";
    } catch (const CommunicatorError& error) {
      EXPECT_NE(std::string(error.what()).find("expected 16 bytes, got 8"), std::string::npos)
          << error.what();
    }
  }
  world_->barrier();  // the communicator is still usable after the failed receives
}

class GroupsTest : public ::testing::Test {
 protected:
  GroupsTest() : layout_(world_size(), g_tensor, g_pipeline), me_(layout_.rank(world_rank())) {}
  void SetUp() override { groups_ = make_groups(MPI_COMM_WORLD, layout_); }

  RankLayout layout_;
  RankInfo me_;
  ParallelGroups groups_;
};

TEST_F(GroupsTest, CoordinatorIsInNoGroup) {
  if (me_.role != Role::coordinator) GTEST_SKIP() << "workers are checked below";
  EXPECT_EQ(groups_.workers, nullptr);
  EXPECT_EQ(groups_.tensor, nullptr);
  EXPECT_EQ(groups_.pipeline, nullptr);
}

// Gathers each member's world rank over comm (as floats: exact for any realistic world).
std::vector<int> gather_world_ranks(MpiCommunicator& comm) {
  const float mine = static_cast<float>(world_rank());
  std::vector<float> all(comm.size());
  comm.all_gather(&mine, 1, all.data());
  return std::vector<int>(all.begin(), all.end());
}

TEST_F(GroupsTest, GroupsMatchTheLayout) {
  if (me_.role != Role::worker) return;
  ASSERT_NE(groups_.workers, nullptr);
  ASSERT_NE(groups_.tensor, nullptr);
  ASSERT_NE(groups_.pipeline, nullptr);
  EXPECT_EQ(groups_.workers->size(), layout_.num_workers());
  EXPECT_EQ(groups_.workers->rank(), me_.worker_index);
  EXPECT_EQ(groups_.tensor->size(), g_tensor);
  EXPECT_EQ(groups_.tensor->rank(), me_.tp_rank);
  EXPECT_EQ(groups_.pipeline->size(), g_pipeline);
  EXPECT_EQ(groups_.pipeline->rank(), me_.stage);

  std::vector<int> all_workers(layout_.num_workers());
  std::iota(all_workers.begin(), all_workers.end(), 1);
  EXPECT_EQ(gather_world_ranks(*groups_.workers), all_workers);
  EXPECT_EQ(gather_world_ranks(*groups_.tensor), me_.tensor_group);
  EXPECT_EQ(gather_world_ranks(*groups_.pipeline), me_.pipeline_group);
}

// The collectives on every group, all groups of a kind running at the same time.
TEST_F(GroupsTest, CollectivesOnEachGroup) {
  if (me_.role != Role::worker) return;
  for (MpiCommunicator* comm : {groups_.workers.get(), groups_.tensor.get(), groups_.pipeline.get()}) {
    SCOPED_TRACE(comm->name());
    check_all_reduce(*comm);
    check_all_gather(*comm);
    check_broadcast(*comm);
    check_ring(*comm);
  }
}

// Activations go forward stage by stage and gradients-like messages back, between peers with the
// same tp_rank: each stage receives its predecessor's world rank, which must be prev_stage_peer.
TEST_F(GroupsTest, PipelineNeighboursExchange) {
  if (me_.role != Role::worker) return;
  MpiCommunicator& pipe = *groups_.pipeline;
  const int me = world_rank();
  int from_prev = -1;
  int from_next = -1;
  if (!me_.is_first_stage) pipe.recv(&from_prev, sizeof(int), pipe.rank() - 1, 1);
  if (!me_.is_last_stage) pipe.send(&me, sizeof(int), pipe.rank() + 1, 1);
  if (!me_.is_last_stage) pipe.recv(&from_next, sizeof(int), pipe.rank() + 1, 2);
  if (!me_.is_first_stage) pipe.send(&me, sizeof(int), pipe.rank() - 1, 2);
  EXPECT_EQ(from_prev, me_.prev_stage_peer.value_or(-1));
  EXPECT_EQ(from_next, me_.next_stage_peer.value_or(-1));
}

TEST(MakeGroups, RejectsALayoutForAnotherWorld) {
  // Checked before any split, so every rank throws and none waits in a collective.
  const int tensor = world_size();  // 1 + T*1 ranks: one too many for this world
  EXPECT_THROW(make_groups(MPI_COMM_WORLD, RankLayout(1 + tensor, tensor, 1)), CommunicatorError);
}

TEST(HostLocalRank, AgreesWithSharedMemorySplit) {
  MPI_Comm host = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &host);
  int expected = -1;
  MPI_Comm_rank(host, &expected);
  MPI_Comm_free(&host);
  EXPECT_EQ(host_local_rank(MPI_COMM_WORLD), expected);

  // Through a duplicate the environment variable does not apply, so this takes the split path.
  MPI_Comm copy = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &copy);
  EXPECT_EQ(host_local_rank(copy), expected);
  MPI_Comm_free(&copy);

  const RankInfo info = describe_this_rank(MPI_COMM_WORLD, RankLayout(world_size(), g_tensor, g_pipeline));
  EXPECT_EQ(info.local_rank, expected);
  EXPECT_EQ(info.world_rank, world_rank());
}

// Reads --tensor N and --pipeline N (or --name=N) from what gtest left; false on anything else.
bool parse_arguments(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    if (const auto equals = arg.find('='); equals != std::string::npos) {
      value = arg.substr(equals + 1);
      arg.resize(equals);
    } else if (i + 1 < argc) {
      value = argv[++i];
    }
    int* target = arg == "--tensor" ? &g_tensor : arg == "--pipeline" ? &g_pipeline : nullptr;
    if (target == nullptr || value.empty()) return false;
    *target = std::atoi(value.c_str());
  }
  return g_tensor >= 1 && g_pipeline >= 1;
}

}  // namespace
}  // namespace nibble::parallel

int main(int argc, char** argv) {
  using namespace nibble::parallel;
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  const int rank = world_rank();
  int failed = 0;

  if (!parse_arguments(argc, argv)) {
    if (rank == 0)
      std::fprintf(stderr, "usage: mpirun -np 1+T*P %s --tensor T --pipeline P [gtest flags]\n", argv[0]);
    failed = 1;
  } else {
    try {
      RankLayout layout(world_size(), g_tensor, g_pipeline);  // the tests assume a matching world
    } catch (const std::exception& error) {
      if (rank == 0) std::fprintf(stderr, "%s\n", error.what());
      failed = 1;
    }
  }

  const int any_failed = nibble::test::run_all_tests_on_every_rank(rank, failed != 0);
  MPI_Finalize();
  return any_failed;
}
