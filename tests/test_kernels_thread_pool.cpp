// ThreadPool: every index is covered exactly once, for any thread count and grain, and many
// back-to-back dispatches (the decode pattern) neither lose nor duplicate work.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "kernels/thread_pool.hpp"

namespace nibble::kernels {
namespace {

TEST(KernelThreadPool, RunCallsEveryThreadOnce) {
  for (int n_threads : {1, 2, 3, 5}) {
    ThreadPool pool(n_threads);
    EXPECT_EQ(pool.size(), n_threads);
    std::vector<std::atomic<int>> calls(n_threads);
    pool.run([&](int thread_index, int n) {
      EXPECT_EQ(n, n_threads);
      calls[thread_index].fetch_add(1);
    });
    for (int t = 0; t < n_threads; ++t) EXPECT_EQ(calls[t].load(), 1) << "thread " << t;
  }
}

TEST(KernelThreadPool, ParallelForCoversEachIndexOnce) {
  for (int n_threads : {1, 2, 4}) {
    ThreadPool pool(n_threads);
    for (int64_t n : {0, 1, 7, 64, 1000, 1001}) {
      for (int64_t grain : {0, 1, 3, 100, 5000}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        std::atomic<int> chunks{0};
        pool.parallel_for(n, grain, [&](int64_t begin, int64_t end) {
          EXPECT_LE(begin, end);
          chunks.fetch_add(1);
          for (int64_t i = begin; i < end; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
        });
        for (int64_t i = 0; i < n; ++i)
          ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1)
              << "n=" << n << " grain=" << grain << " threads=" << n_threads << " i=" << i;
        EXPECT_LE(chunks.load(), n_threads);
      }
    }
  }
}

TEST(KernelThreadPool, ChunksRespectGrain) {
  ThreadPool pool(4);
  std::atomic<int64_t> smallest{1 << 30};
  pool.parallel_for(50, 20, [&](int64_t begin, int64_t end) {
    int64_t size = end - begin;
    int64_t seen = smallest.load();
    while (size < seen && !smallest.compare_exchange_weak(seen, size)) {
    }
  });
  EXPECT_GE(smallest.load(), 20);
}

TEST(KernelThreadPool, ManyBackToBackRunsSeeEachOthersWrites) {
  ThreadPool pool(3);
  // Each run reads what every thread wrote in the previous run: checks the completion handshake
  // publishes the workers' plain (non-atomic) writes to the caller and to the next run.
  std::vector<int64_t> slots(3, 0);
  for (int iter = 1; iter <= 5000; ++iter) {
    pool.run([&](int thread_index, int) { slots[thread_index] += 1; });
    if (iter % 1000 == 0) {
      for (int64_t v : slots) ASSERT_EQ(v, iter);
    }
  }
}

TEST(KernelThreadPool, WorkersWakeAfterSleeping) {
  ThreadPool pool(2);
  std::atomic<int> total{0};
  for (int i = 0; i < 3; ++i) {
    // Long enough for the workers to give up spinning and block on the condition variable.
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    pool.run([&](int, int) { total.fetch_add(1); });
  }
  EXPECT_EQ(total.load(), 6);
}

}  // namespace
}  // namespace nibble::kernels
