// dst += src (or dst = src): folds a dense float32 gradient accumulator into a strided
// gradient of any supported dtype (one rounding to the output dtype, at the end); src null
// reads as zeros.
#include "ops/building_blocks.h"

namespace mka::cuda {
namespace {

struct Shape4 {
  int64_t n[4] = {1, 1, 1, 1}, s[4] = {0, 0, 0, 0};
};

template <class T> __global__ void accumulate_kernel(const float* src, T* dst, Shape4 sh,
                                                     int64_t numel, bool add) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  int64_t rest = i, off = 0;
  for (int dim = 3; dim >= 0; --dim) {
    off += (rest % sh.n[dim]) * sh.s[dim];
    rest /= sh.n[dim];
  }
  dst[off] = from_f<T>((add ? to_f(dst[off]) : 0.f) + (src ? src[i] : 0.f));
}

// The common case, a dense dst: four elements per thread in one vector access each.
template <class T> struct alignas(4 * sizeof(T)) Pack4 {
  T x[4];
};
template <class T> __global__ void accumulate_dense_kernel(const float4* src, Pack4<T>* dst,
                                                           int64_t n4, bool add) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n4) return;
  const float4 a = src ? src[i] : make_float4(0.f, 0.f, 0.f, 0.f);
  Pack4<T> y;
  if (add) y = dst[i];  // dst = src needs no read
  y.x[0] = from_f<T>((add ? to_f(y.x[0]) : 0.f) + a.x);
  y.x[1] = from_f<T>((add ? to_f(y.x[1]) : 0.f) + a.y);
  y.x[2] = from_f<T>((add ? to_f(y.x[2]) : 0.f) + a.z);
  y.x[3] = from_f<T>((add ? to_f(y.x[3]) : 0.f) + a.w);
  dst[i] = y;
}

}  // namespace

void accumulate(const float* src, const TensorRef& dst, cudaStream_t s, bool add) {
  const int64_t numel = dst.numel();
  if (numel == 0) return;
  MKA_CHECK(dst.ndim >= 1 && dst.ndim <= 4, "accumulate: rank ", dst.ndim, " not supported");
  Shape4 sh;  // right-aligned: leading dims of size 1
  for (int d = 0; d < dst.ndim; ++d) {
    sh.n[4 - dst.ndim + d] = dst.shape[d];
    sh.s[4 - dst.ndim + d] = dst.stride[d];
  }
  constexpr int kThreads = 256;
  dispatch_dtype(dst.dtype, "accumulate", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (numel % 4 == 0 && is_contiguous(dst) && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
        reinterpret_cast<uintptr_t>(dst.data) % sizeof(Pack4<T>) == 0) {
      accumulate_dense_kernel<T><<<unsigned(ceil_div(numel / 4, kThreads)), kThreads, 0, s>>>(
          reinterpret_cast<const float4*>(src), static_cast<Pack4<T>*>(dst.data), numel / 4, add);
      check_launch("accumulate");
      return;
    }
    accumulate_kernel<T><<<unsigned(ceil_div(numel, kThreads)), kThreads, 0, s>>>(
        src, static_cast<T*>(dst.data), sh, numel, add);
    check_launch("accumulate");
  });
}

}  // namespace mka::cuda
