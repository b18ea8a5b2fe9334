// A persistent worker pool: parallel_for(n, fn) runs fn(i) for i in [0, n) with dynamic
// scheduling; the calling thread takes part. Nested calls run serially, and so do jobs whose
// `work` (the caller's estimate of the job's multiply-adds, or element operations) is below
// kInlineWork: a worker's wake-up costs more than they take (25-100 us on a loaded 2-core
// machine: a 4-token attention 57 -> 32 us inline; at 2^18 multiply-adds 152 us on two
// threads against 98 inline, at 2^20 201 against 248).
#pragma once
#include <cstdint>
#include <functional>

namespace mka {

void set_num_threads(int n);  // n <= 0: hardware concurrency
int num_threads();
constexpr double kInlineWork = 1 << 19;
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn, double work = kInlineWork);

}  // namespace mka
