// The device switch every op's entry point ends in: the CPU kernels, or the CUDA kernels
// (cuda/) in a CUDA build, or a clear error in a build without them.
#pragma once
#include "mka/error.h"
#include "mka/tensor.h"

namespace mka {

template <class CpuFn, class CudaFn>
void on_device(Device dev, [[maybe_unused]] const char* op, CpuFn&& cpu,
               [[maybe_unused]] CudaFn&& cuda) {
  if (dev == Device::cpu) {
    cpu();
    return;
  }
#ifdef MKA_WITH_CUDA
  cuda();
#else
  fail(op, ": this build of mka has no CUDA kernels (built without a CUDA compiler)");
#endif
}

// Expands to the CUDA call in a CUDA build, to nothing otherwise.
#ifdef MKA_WITH_CUDA
#define MKA_CUDA_CALL(...) __VA_ARGS__
#else
#define MKA_CUDA_CALL(...)
#endif

}  // namespace mka
