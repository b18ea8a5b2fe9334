// Persistent worker threads with dynamic scheduling through an atomic counter. Workers
// sleep on a condition variable between jobs, so a call costs a wake-up, not a spawn, and
// the calling thread never waits for a wake-up it does not need.
#include "mka/cpu/thread_pool.h"

#include "mka/environment.h"
#include "mka/error.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
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
    // Workers start from the current generation, so a new worker waits for the next job.
    const uint64_t start = generation_;
    for (int i = 0; i < n_workers; ++i) workers_.emplace_back([this, start] { loop(start); });
  }

  // The caller waits for the job's items, not for the workers: a worker that wakes after
  // the caller ran every item finds nothing to claim (on a loaded 2-core machine waiting for
  // wake-ups cost ~100 us per small call).
  void run(int64_t n, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> job_guard(job_mu_);  // one job at a time
    uint32_t gen;
    {
      std::lock_guard<std::mutex> g(mu_);
      fn_ = &fn;
      n_ = n;
      gen = uint32_t(++generation_);
      claim_.store(uint64_t(gen) << 32);
      done_.store(0);
    }
    cv_.notify_all();
    work(gen, fn, n);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return done_.load() == n; });
    fn_ = nullptr;
  }

 private:
  // Items are claimed from claim_ = (generation << 32) | next index by compare-exchange, so
  // a worker still holding an old job's generation can never take (or skip) an item of the
  // next job; fn is only called for a claimed item, i.e. while its job is running.
  void work(uint32_t gen, const std::function<void(int64_t)>& fn, int64_t n) {
    in_parallel_region = true;
    for (;;) {
      uint64_t c = claim_.load();
      int64_t i = -1;
      while (uint32_t(c >> 32) == gen && int64_t(c & 0xffffffffu) < n) {
        if (claim_.compare_exchange_weak(c, c + 1)) {
          i = int64_t(c & 0xffffffffu);
          break;
        }
      }
      if (i < 0) break;
      fn(i);
      if (done_.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> g(mu_);
        done_cv_.notify_one();
      }
    }
    in_parallel_region = false;
  }

  void loop(uint64_t seen) {
    for (;;) {
      const std::function<void(int64_t)>* fn;
      int64_t n;
      uint32_t gen;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        fn = fn_, n = n_, gen = uint32_t(generation_);
      }
      if (fn) work(gen, *fn, n);
    }
  }

  std::mutex job_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
  uint64_t generation_ = 0;
  bool stop_ = false;
};

int default_threads() {
  return num_threads_from_environment().value_or(
      int(std::max(1u, std::thread::hardware_concurrency())));
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

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn, double work) {
  if (n <= 0) return;
  MKA_CHECK(n <= int64_t(0xffffffff), "parallel_for: ", n, " tasks exceed the 32-bit index");
  if (n == 1 || work < kInlineWork || in_parallel_region || num_threads() == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  pool().run(n, fn);
}

}  // namespace mka
