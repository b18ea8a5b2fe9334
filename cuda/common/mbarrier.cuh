// Shared-memory mbarriers (sm_90) for producer/consumer pipelines inside a block: phases
// complete when the expected number of arrivals is in; cp.async copies can arrive when they
// land. Waiters name the parity of the phase they wait for.
#pragma once
#include "common/device_utils.cuh"

namespace mka::cuda {

namespace mbar {
__device__ __forceinline__ unsigned addr(const uint64_t* bar) {
  return unsigned(__cvta_generic_to_shared(bar));
}
__device__ __forceinline__ void init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(addr(bar)), "r"(count));
}
__device__ __forceinline__ void arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(addr(bar)) : "memory");
}
// Arrives once this thread's earlier cp.async copies have landed.
__device__ __forceinline__ void arrive_on_copies(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(addr(bar)) : "memory");
}
// Waits until the phase of the given parity has completed.
__device__ __forceinline__ void wait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(addr(bar)),
      "r"(parity)
      : "memory");
}
}  // namespace mbar

}  // namespace mka::cuda
