// Helper threads that stay alive between kernel calls. A decode step makes a few hundred kernel calls
// of a few hundred microseconds each; starting a std::thread per call cost about 1 ms a step. Here the
// helpers sleep on a condition variable (after a short spin, since the next call usually comes within
// microseconds) and the calling thread works too: parts are claimed from a shared counter, so a call
// never waits for a helper that is slow to wake, it just does that part itself. Which thread runs a
// part never changes what the part computes.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include <immintrin.h>

namespace mlx_med {

class WorkerPool {
 public:
  explicit WorkerPool(size_t helpers) {
    for (size_t i = 0; i < helpers; i++) {
      try {
        threads_.emplace_back([this] { serve(); });
      } catch (const std::system_error&) {  // no thread to be had (a process limit): fewer helpers
        break;
      }
    }
  }
  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  size_t helpers() const { return threads_.size(); }

  // fn(part) for every part in [0, parts), spread over the helpers and the calling thread; returns
  // when all are done. A call made while another is running (a second caller) runs its parts itself.
  void run(size_t parts, const std::function<void(size_t)>& fn) {
    std::unique_lock<std::mutex> busy(running_, std::try_to_lock);
    if (parts <= 1 || threads_.empty() || !busy.owns_lock()) {
      for (size_t p = 0; p < parts; p++) fn(p);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      parts_ = parts;
      next_.store(0);
      done_.store(0);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    work();
    while (done_.load(std::memory_order_acquire) < parts) _mm_pause();
    // Close the job: a helper that has not picked it up by now must not touch fn after we return.
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = nullptr;
    left_.wait(lock, [this] { return inside_ == 0; });
  }

 private:
  // Claim and run parts of the current job until none is left.
  void work() {
    for (size_t p; (p = next_.fetch_add(1)) < parts_;) {
      (*job_)(p);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void serve() {
    size_t seen = generation_.load();
    for (;;) {
      // The next call often comes within microseconds: spin a while before sleeping (on the Zen 4 box
      // a decode step took 167-173 ms with 500 us of spinning, 182-200 ms with none; a training step
      // and the kernel tests were no slower, within that day's noise).
      auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kSpinNs);
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until) {
        _mm_pause();
      }
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_.load() != seen; });
      if (stopping_) return;
      seen = generation_.load();
      if (job_ == nullptr) continue;  // that job was closed before this helper woke
      inside_++;
      lock.unlock();
      work();
      lock.lock();
      if (--inside_ == 0) left_.notify_all();
    }
  }

  static constexpr long kSpinNs = 500000;
  std::vector<std::thread> threads_;
  std::mutex running_;  // one job at a time
  std::mutex mutex_;    // guards job_, inside_, stopping_ and the generation's change
  std::condition_variable wake_, left_;
  const std::function<void(size_t)>* job_ = nullptr;
  size_t parts_ = 0;
  std::atomic<size_t> next_{0}, done_{0}, generation_{0};
  size_t inside_ = 0;
  bool stopping_ = false;
};

// The most threads one kernel call splits its work over (cpu_kernels.cpp: MLX_MED_KERNEL_THREADS).
size_t kernel_threads();

// The process's pool: kernel_threads() - 1 helpers (the caller is the other thread), made on first use
// and never destroyed (joining helpers during the process's exit could wait on a job still running).
inline WorkerPool& worker_pool() {
  static WorkerPool* pool = new WorkerPool(kernel_threads() - 1);
  return *pool;
}

}  // namespace mlx_med
