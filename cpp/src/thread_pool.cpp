// Persistent worker threads with dynamic scheduling through an atomic counter. Workers
// sleep on a condition variable between jobs, so a call costs a wake-up, not a spawn.
#include "mka/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace mka {
namespace {

thread_local bool in_parallel_region = false;

class Pool {
 public:
  ~Pool() { resize(0); }

  int size() {
    std::lock_guard<std::mutex> g(mu_);
    return int(workers_.size()) + 1;
  }

  void resize(int n_workers) {
    std::lock_guard<std::mutex> job_guard(job_mu_);
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_ = false;
    // Workers start from the current generation: one that read it only after the first
    // run() began would sleep through that job and never report done.
    const uint64_t start = generation_;
    for (int i = 0; i < n_workers; ++i) workers_.emplace_back([this, start] { loop(start); });
  }

  void run(int64_t n, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> job_guard(job_mu_);  // one job at a time
    {
      std::lock_guard<std::mutex> g(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      active_ = int(workers_.size());
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return active_ == 0; });
    fn_ = nullptr;
  }

 private:
  void work() {
    in_parallel_region = true;
    for (int64_t i; (i = next_.fetch_add(1)) < n_;) (*fn_)(i);
    in_parallel_region = false;
  }

  void loop(uint64_t seen) {
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
      }
      work();
      std::lock_guard<std::mutex> g(mu_);
      if (--active_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex job_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

int default_threads() {
  if (const char* env = std::getenv("MKA_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

Pool& pool() {
  static Pool* p = [] {
    auto* pl = new Pool();  // leaked on purpose: joining threads at exit can deadlock
    pl->resize(default_threads() - 1);
    return pl;
  }();
  return *p;
}

}  // namespace

void set_num_threads(int n) { pool().resize(std::max(1, n <= 0 ? default_threads() : n) - 1); }

int num_threads() { return pool().size(); }

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (n == 1 || in_parallel_region || num_threads() == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  pool().run(n, fn);
}

}  // namespace mka
