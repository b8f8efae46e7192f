#pragma once
// Shared by the MPI test programs: this rank's place in MPI_COMM_WORLD, a per-rank temporary
// directory, and the gtest set-up under which only rank 0 reports in full.
#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>

namespace nibble::test {

inline int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

inline int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// A fresh directory for this rank's files (e.g. its copy of a model), removed by the destructor.
class RankTempDir {
 public:
  RankTempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "nibble_rank_XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~RankTempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  RankTempDir(const RankTempDir&) = delete;
  RankTempDir& operator=(const RankTempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// On ranks other than 0 gtest's report is replaced by this listener, which prints failed
// assertions only, prefixed with the rank.

class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                 result.file_name() ? result.file_name() : "?", result.line_number(), result.summary());
  }

 private:
  int rank_;
};

// Runs every test on this rank (rank 0 reports in full, other ranks only their failures) unless
// `skip` (a set-up failure already counted), then fails every rank if any rank failed. Returns the
// exit code; the caller still calls MPI_Finalize.
inline int run_all_tests_on_every_rank(int rank, bool skip = false) {
  int failed = skip ? 1 : 0;
  if (!skip) {
    if (rank != 0) {
      auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
      listeners.Append(new FailurePrinter(rank));
    }
    failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  }
  // mpirun reports the first non-zero exit anyway, but this way rank 0 can say so.
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0 && any_failed && !failed)
    std::fprintf(stderr, "FAILED on another rank (see [rank N] lines)\n");
  return any_failed;
}

}  // namespace nibble::test
