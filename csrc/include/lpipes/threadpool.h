// A persistent worker pool for the CPU kernels.
//
// Decode runs a few hundred short parallel regions per token (tens of microseconds each), so
// waking threads through a condition variable every time would cost more than the work. Workers
// spin on an epoch counter for a short while after each region and only then sleep; the caller
// takes part in every region as thread 0. One region runs at a time (regions from several caller
// threads are serialised by a mutex). Functions run inside a region must not throw.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lpipes {

class ThreadPool {
 public:
  // The process-wide pool; its size comes from LPIPES_NUM_THREADS, else the number of CPUs.
  static ThreadPool& instance();

  int num_threads() const { return num_threads_; }
  // Resize the pool (joins and restarts workers). Not to be called while a region runs.
  void set_num_threads(int n);

  // Run fn(thread_index, num_threads) on every thread of the pool and return when all are done.
  void run(const std::function<void(int, int)>& fn);

  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

 private:
  explicit ThreadPool(int n);
  void start(int n);
  void stop();
  void worker(int index, uint64_t start_epoch);

  int num_threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex region_mu_;  // one region at a time
  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> remaining_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> quit_{false};
  const std::function<void(int, int)>* job_ = nullptr;
};

// Split [0, n) into contiguous chunks of at least `grain` items, one or more per thread,
// and call fn(begin, end) for each. Runs inline when there is not enough work to share.
template <typename F>
void parallel_for(int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return;
  ThreadPool& pool = ThreadPool::instance();
  const int threads = pool.num_threads();
  if (threads <= 1 || n <= grain) {
    fn(int64_t{0}, n);
    return;
  }
  const std::function<void(int, int)> job = [&](int t, int nt) {
    const int64_t chunk = (n + nt - 1) / nt;
    const int64_t begin = t * chunk;
    const int64_t end = begin + chunk < n ? begin + chunk : n;
    if (begin < end) fn(begin, end);
  };
  pool.run(job);
}

}  // namespace lpipes
