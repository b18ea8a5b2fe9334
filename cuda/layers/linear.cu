// linear_small on the GPU (mka/layers/linear_ops.h): a warp per output feature n reads row n
// of W once (16-byte loads, four in flight per lane) and the M <= 8 rows of x (a few KB,
// served by L1/L2 to all warps), sums M dot products by shuffles and writes
// act(x W^T + bias)[:, n]. Rows of W that are not 16-byte aligned, or K not a whole number
// of vectors, take the same loop one element at a time.
#include <cstdint>
#include <type_traits>

#include "common/device_utils.cuh"
#include "mka/layers/linear_ops.h"

namespace mka::cuda {
namespace {

constexpr int kWarps = 8;

struct LinArgs {
  const void *x, *w, *b;
  void* o;
  int64_t xs, ws, os;
  int M, N, K, act;
};

template <class T> __device__ __forceinline__ float finish(float y, const LinArgs& a, int n) {
  if (a.b) y += to_f(static_cast<const T*>(a.b)[n]);
  if (a.act == 1) {  // GELU of the product as the dtype holds it, as linear then gelu
    const float r = to_f(from_f<T>(y));
    y = 0.5f * r * (1.f + erff(r * 0.70710678118654752f));
  }
  return y;
}

template <class T, int M, int V>
__global__ void __launch_bounds__(32 * kWarps) linear_small_kernel(const LinArgs a) {
  const int n = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (n >= a.N) return;
  const T* w = static_cast<const T*>(a.w) + n * a.ws;
  const T* x = static_cast<const T*>(a.x);
  float acc[M] = {};
  // Four vectors of W per lane loaded before any is used: the loop is a stream of W's row,
  // and its speed is the bytes in flight.
  constexpr int kAhead = 4;
  for (int k0 = lane * V; k0 < a.K; k0 += kAhead * 32 * V) {
    float wv[kAhead][V];
#pragma unroll
    for (int u = 0; u < kAhead; ++u)
      if (k0 + u * 32 * V < a.K) load_v<V>(w + k0 + u * 32 * V, wv[u]);
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int k = k0 + u * 32 * V;
      if (k >= a.K) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (M > 4 && m >= a.M) continue;  // 5-8 rows share the M = 8 instantiation
        float xv[V];
        load_v<V>(x + m * a.xs + k, xv);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[m] = fmaf(wv[u][e], xv[e], acc[m]);
      }
    }
  }
  T* o = static_cast<T*>(a.o);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (M > 4 && m >= a.M) continue;
    const float y = warp_sum(acc[m]);
    if (lane == m) o[m * a.os + n] = from_f<T>(finish<T>(y, a, n));
  }
}

bool aligned(const TensorRef& t, int64_t vec) {
  return reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && t.stride[0] % vec == 0;
}

}  // namespace

void linear_small(const LinearProblem& p, const LinearSmall& a) {
  MKA_CHECK(p.N < (int64_t(1) << 31) && p.K < (int64_t(1) << 31), "weight: too large (",
            p.N, " x ", p.K, ") for the CUDA kernel");
  DeviceGuard guard(p.device_id);
  auto s = static_cast<cudaStream_t>(a.launch.stream);
  LinArgs l{};
  l.x = a.x.data, l.w = a.weight.data, l.b = a.bias.present() ? a.bias.data : nullptr;
  l.o = a.out.data;
  l.xs = a.x.stride[0], l.ws = a.weight.stride[0], l.os = a.out.stride[0];
  l.M = int(p.M), l.N = int(p.N), l.K = int(p.K), l.act = p.activation;
  const unsigned grid = unsigned(ceil_div(p.N, kWarps));
  dispatch_dtype(p.dtype, "linear_small", [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    constexpr int64_t kVec = 16 / sizeof(T);
    const bool vec = p.K % kVec == 0 && aligned(a.x, kVec) && aligned(a.weight, kVec);
    auto go = [&](auto mc) {
      constexpr int M = decltype(mc)::value;
      if (vec) linear_small_kernel<T, M, int(kVec)><<<grid, 32 * kWarps, 0, s>>>(l);
      else linear_small_kernel<T, M, 1><<<grid, 32 * kWarps, 0, s>>>(l);
    };
    switch (p.M) {
      case 1: go(std::integral_constant<int, 1>{}); break;
      case 2: go(std::integral_constant<int, 2>{}); break;
      case 3: go(std::integral_constant<int, 3>{}); break;
      case 4: go(std::integral_constant<int, 4>{}); break;
      default: go(std::integral_constant<int, 8>{}); break;  // 5-8 rows: the kernel stops at M
    }
    check_launch("linear_small_kernel");
  });
}

}  // namespace mka::cuda
