#pragma once
// Shared by the MPI test programs: on ranks other than 0 gtest's report is replaced by this
// listener, which prints failed assertions only, prefixed with the rank.
#include <gtest/gtest.h>

#include <cstdio>

namespace nibble::test {

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

}  // namespace nibble::test
