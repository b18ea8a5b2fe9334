// A persistent worker pool: parallel_for(n, fn) runs fn(i) for i in [0, n) with dynamic
// scheduling; the calling thread takes part. Nested calls run serially.
#pragma once
#include <cstdint>
#include <functional>

namespace mka {

void set_num_threads(int n);  // n <= 0: hardware concurrency
int num_threads();
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

}  // namespace mka
