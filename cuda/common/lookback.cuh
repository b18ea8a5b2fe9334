// Decoupled look-back between thread blocks of one kernel: the single-pass forward scan
// (ema_scan_1pass.cuh) and the backward scan run through the attention backward's write-out
// (bwd_rows.cuh). Each block publishes its aggregate (its own share, from a zero
// carry) as soon as it has it, and its end state once it knows its start; a block walks its
// predecessors, summing decayed aggregates, up to the nearest published end state.
//
// Values are published without flags or fences: the buffers start as kUnset bytes, a NaN
// pattern that float arithmetic never makes (GPU NaN results are 0x7fffffff), and a reader
// takes a float once it differs. 32-bit stores are single-copy atomic, so each float a
// reader sees set is the published one. In the forward scan a block waits only on
// predecessors that started before it (lower block ids: the GPU starts blocks in id order,
// as CUB's single-pass scan assumes); ScanThrough's blocks wait on higher ids, which is safe
// only while they all fit on the GPU at once (attention/params.cuh). The first block of a
// walk publishes its end state without waiting.
#pragma once
#include <cstdint>

namespace mka::cuda {

constexpr int kLookback = 4;  // predecessors polled at once
constexpr unsigned kUnset = 0xffffffffu;

__device__ __forceinline__ void publish(float* p, float v) { __stcg(p, v); }  // to L2
__device__ __forceinline__ void publish(float* p, float2 v) {
  __stcg(reinterpret_cast<float2*>(p), v);
}
template <class V> __device__ __forceinline__ V peek(const float* p) {  // never stale L1
  return __ldcv(reinterpret_cast<const V*>(p));
}
__device__ __forceinline__ bool is_set(float v) { return __float_as_uint(v) != kUnset; }
__device__ __forceinline__ bool is_set(float2 v) { return is_set(v.x) && is_set(v.y); }
__device__ __forceinline__ float axpby(float a, float x, float b, float y) { return a * x + b * y; }
__device__ __forceinline__ float2 axpby(float a, float2 x, float b, float2 y) {
  return make_float2(a * x.x + b * y.x, a * x.y + b * y.y);
}
template <class V> __device__ __forceinline__ V unset_value();
template <> __device__ __forceinline__ float unset_value<float>() { return __uint_as_float(kUnset); }
template <> __device__ __forceinline__ float2 unset_value<float2>() {
  return make_float2(__uint_as_float(kUnset), __uint_as_float(kUnset));
}

// The state entering item i from its predecessors i - 1, i - 2, ... (each crossed decays by
// D): the sum of their aggregates, decayed, up to the nearest one whose end state is
// published, which ends it. end_at(j), agg_at(j): where predecessor j publishes them.
template <class V, class EndAt, class AggAt>
__device__ V look_back(int64_t i, float D, EndAt end_at, AggAt agg_at) {
  V acc = {};
  float mult = 1.f;
  for (int64_t j = i - 1;;) {
    V e[kLookback], g[kLookback];
    #pragma unroll
    for (int k = 0; k < kLookback; ++k) {  // one round trip for the whole window
      const bool in = j - k >= 0;
      e[k] = in ? peek<V>(end_at(j - k)) : unset_value<V>();
      g[k] = in ? peek<V>(agg_at(j - k)) : unset_value<V>();
    }
    int used = 0;
    #pragma unroll
    for (int k = 0; k < kLookback; ++k) {
      if (is_set(e[k])) return axpby(1.f, acc, mult, e[k]);
      if (!is_set(g[k])) break;
      acc = axpby(1.f, acc, mult, g[k]);
      mult *= D;
      ++used;
    }
    if (used == 0) __nanosleep(64);  // the next predecessor has not published yet
    j -= used;
  }
}

}  // namespace mka::cuda
