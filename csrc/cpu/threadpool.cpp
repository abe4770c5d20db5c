#include "lpipes/threadpool.h"

#include <chrono>
#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LPIPES_PAUSE() _mm_pause()
#else
#define LPIPES_PAUSE() std::this_thread::yield()
#endif

namespace lpipes {
namespace {

int default_threads() {
  if (const char* env = std::getenv("LPIPES_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

using Clock = std::chrono::steady_clock;

// How long a worker spins after a region before it sleeps, and how long the caller spins waiting for
// the workers before it yields its core between checks. Timed, not counted: a pause instruction
// takes ~25 ns on Zen 4 but ~3 ns on older Intel cores (20000 pauses, the former count, were 0.5 ms
// here). The regions of one step follow each other within microseconds, so 100 us keeps the
// workers awake through a step. The bound matters where cores are shared: with 3 processes of 2
// threads on 2 cores (a pipeline on one machine), a worker spinning 0.5 ms after each region and a
// caller spinning for a descheduled worker held the cores that the next stage needed. There, at 8
// streams: 39.3 -> 54.0 tok/s (45.5 with the shorter worker spin alone); one process of 2 threads
// the same within noise (92.1 / 91.9 tok/s).
constexpr auto kWorkerSpin = std::chrono::microseconds(100);
constexpr auto kJoinSpin = std::chrono::microseconds(50);
constexpr int kPausesPerClockRead = 64;

}  // namespace

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool(default_threads());
  return pool;
}

ThreadPool::ThreadPool(int n) { start(n); }

ThreadPool::~ThreadPool() { stop(); }

void ThreadPool::start(int n) {
  num_threads_ = n < 1 ? 1 : n;
  quit_.store(false);
  // Each worker starts from the epoch as it is now: reading it once the thread runs could miss a
  // region that run() started in between, and run() would then wait for it forever.
  const uint64_t epoch = epoch_.load(std::memory_order_acquire);
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back(&ThreadPool::worker, this, i, epoch);
}

void ThreadPool::stop() {
  {
    std::lock_guard<std::mutex> lk(sleep_mu_);
    quit_.store(true);
    epoch_.fetch_add(1);
  }
  sleep_cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::set_num_threads(int n) {
  std::lock_guard<std::mutex> region(region_mu_);
  if (n == num_threads_) return;
  stop();
  start(n);
}

void ThreadPool::run(const std::function<void(int, int)>& fn) {
  std::lock_guard<std::mutex> region(region_mu_);
  if (num_threads_ == 1) {
    fn(0, 1);
    return;
  }
  job_ = &fn;
  remaining_.store(num_threads_ - 1, std::memory_order_relaxed);
  {
    // Bumping the epoch under the sleep mutex means a worker that is about to sleep either sees
    // the new epoch in its predicate or is already waiting and gets the notification.
    std::lock_guard<std::mutex> lk(sleep_mu_);
    epoch_.fetch_add(1, std::memory_order_release);
  }
  if (sleepers_.load(std::memory_order_acquire) > 0) sleep_cv_.notify_all();
  fn(0, num_threads_);
  if (remaining_.load(std::memory_order_acquire) > 0) {
    const Clock::time_point spin_end = Clock::now() + kJoinSpin;
    bool yielding = false;
    for (int i = 1; remaining_.load(std::memory_order_acquire) > 0; ++i) {
      if (yielding) {
        std::this_thread::yield();  // a worker still busy (or not even running): let others run
      } else {
        LPIPES_PAUSE();
        yielding = i % kPausesPerClockRead == 0 && Clock::now() >= spin_end;
      }
    }
  }
  job_ = nullptr;
}

void ThreadPool::worker(int index, uint64_t seen) {
  for (;;) {
    const Clock::time_point spin_end = Clock::now() + kWorkerSpin;
    uint64_t now;
    for (int i = 1; (now = epoch_.load(std::memory_order_acquire)) == seen; ++i) {
      LPIPES_PAUSE();
      if (i % kPausesPerClockRead == 0 && Clock::now() >= spin_end) break;
    }
    if (now == seen) {
      std::unique_lock<std::mutex> lk(sleep_mu_);
      sleepers_.fetch_add(1, std::memory_order_acq_rel);
      sleep_cv_.wait(lk, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
      sleepers_.fetch_sub(1, std::memory_order_acq_rel);
      now = epoch_.load(std::memory_order_acquire);
    }
    seen = now;
    if (quit_.load(std::memory_order_acquire)) return;
    (*job_)(index, num_threads_);
    remaining_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace lpipes
