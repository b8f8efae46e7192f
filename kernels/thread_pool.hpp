#pragma once
// A fixed set of worker threads for data-parallel loops. Decode steps issue hundreds of small
// parallel loops per token, so workers spin briefly before sleeping to keep dispatch latency low.
#include <cstdint>
#include <functional>

namespace nibble::kernels {

class ThreadPool {
 public:
  // n_threads counts the calling thread: ThreadPool(1) runs everything inline.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const;
  // Calls fn(thread_index, n_threads) once on every thread (the caller is thread 0) and returns
  // when all calls have returned. Not re-entrant.
  void run(const std::function<void(int thread_index, int n_threads)>& fn);
  // Splits [0, n) into contiguous chunks of at least `grain` items, one per thread.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t begin, int64_t end)>& fn);

 private:
  struct Impl;
  Impl* impl_;
};

}  // namespace nibble::kernels
