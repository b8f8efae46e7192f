#include "kernels/thread_pool.hpp"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NIBBLE_CPU_RELAX() _mm_pause()
#else
#define NIBBLE_CPU_RELAX() ((void)0)
#endif

namespace nibble::kernels {
namespace {

// A worker polls for the next job with pause instructions (a few tens of microseconds: the gap
// between the matmuls of a decode step), then yields its core a while in case the machine is
// oversubscribed, then sleeps on the condition variable. The caller polls for stragglers the same
// way but never sleeps.
constexpr int kSpinIterations = 1 << 11;
constexpr int kYieldIterations = 1 << 6;

}  // namespace

// Protocol: run() publishes `job`, then bumps `generation` (release). Workers spin on
// `generation` (acquire), falling back to the condition variable; each worker decrements
// `pending` (acq_rel) after its call, and run() returns once it reads zero (acquire), so the
// callers' writes are visible to the caller. `sleepers` lets run() skip the mutex and the wake-up
// when every worker is still spinning; it and `generation` are seq_cst so that either the waking
// side sees a sleeper or the sleeper sees the new generation (no lost wake-up).
struct ThreadPool::Impl {
  int n_threads = 1;
  std::vector<std::thread> workers;
  const std::function<void(int, int)>* job = nullptr;
  std::atomic<uint64_t> generation{0};
  std::atomic<int> pending{0};
  std::atomic<int> sleepers{0};
  std::atomic<bool> stopping{false};
  std::mutex mutex;
  std::condition_variable wake;

  void worker_loop(int thread_index) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t current = generation.load(std::memory_order_acquire);
      for (int spin = 0; current == seen && spin < kSpinIterations + kYieldIterations; ++spin) {
        if (spin < kSpinIterations) {
          NIBBLE_CPU_RELAX();
        } else {
          std::this_thread::yield();
        }
        current = generation.load(std::memory_order_acquire);
      }
      if (current == seen) {
        std::unique_lock<std::mutex> lock(mutex);
        sleepers.fetch_add(1);
        wake.wait(lock, [&] { return generation.load() != seen || stopping.load(); });
        sleepers.fetch_sub(1);
        current = generation.load(std::memory_order_acquire);
      }
      if (stopping.load(std::memory_order_acquire)) return;
      seen = current;
      (*job)(thread_index, n_threads);
      pending.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  void wake_sleepers() {
    if (sleepers.load() == 0) return;
    { std::lock_guard<std::mutex> lock(mutex); }  // orders us after a sleeper's predicate check
    wake.notify_all();
  }
};

ThreadPool::ThreadPool(int n_threads) : impl_(new Impl) {
  impl_->n_threads = n_threads < 1 ? 1 : n_threads;
  impl_->workers.reserve(static_cast<size_t>(impl_->n_threads - 1));
  for (int i = 1; i < impl_->n_threads; ++i)
    impl_->workers.emplace_back([this, i] { impl_->worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->stopping.store(true);
    impl_->generation.fetch_add(1);
  }
  impl_->wake.notify_all();
  for (std::thread& worker : impl_->workers) worker.join();
  delete impl_;
}

int ThreadPool::size() const { return impl_->n_threads; }

void ThreadPool::run(const std::function<void(int thread_index, int n_threads)>& fn) {
  Impl& p = *impl_;
  if (p.n_threads == 1) {
    fn(0, 1);
    return;
  }
  p.job = &fn;
  p.pending.store(p.n_threads - 1, std::memory_order_relaxed);
  p.generation.fetch_add(1);  // seq_cst: publishes job/pending, pairs with the sleepers check
  p.wake_sleepers();
  fn(0, p.n_threads);
  for (int spin = 0; p.pending.load(std::memory_order_acquire) != 0; ++spin) {
    if (spin < kSpinIterations) {
      NIBBLE_CPU_RELAX();
    } else {
      std::this_thread::yield();  // a worker was descheduled; give it the core
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain,
                              const std::function<void(int64_t begin, int64_t end)>& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  int64_t n_chunks = n / grain;
  if (n_chunks > impl_->n_threads) n_chunks = impl_->n_threads;
  if (n_chunks <= 1) {
    fn(0, n);
    return;
  }
  run([&](int thread_index, int) {
    if (thread_index >= n_chunks) return;
    const int64_t begin = n * thread_index / n_chunks;
    const int64_t end = n * (thread_index + 1) / n_chunks;
    fn(begin, end);
  });
}

}  // namespace nibble::kernels
