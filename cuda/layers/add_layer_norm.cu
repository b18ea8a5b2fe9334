// add_layer_norm on the GPU (mka/layers/norm_ops.h). At decode sizes (a few rows of ~1k) the
// kernel is latency-bound, which is why it replaces two launches, and why rows of up to 2048
// 16-bit elements (1024 float32) take a warp each: 16-byte loads of the whole row issued at
// once into registers, warp shuffles for the sums, no barrier. Longer rows, or rows that are
// not 16-byte aligned, take a block each with the row in shared memory as float32. Either way
// the sum is rounded to the residual's dtype (what the unfused add stores) before the mean and
// the variance about it (two passes: no cancellation); HBM sees x and the residual read once,
// the residual and out written once.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/device_utils.cuh"
#include "mka/layers/norm_ops.h"

namespace mka::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxC = 56 * 1024;  // the row in shared memory: 224 KiB of float32

struct NormArgs {
  const void *x, *w, *b;
  void *r, *o;
  int64_t xs, rs, os;
  int C;
  float eps;
};

// Sum over the block (every thread gets it); `red` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red is reused by consecutive sums
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) t += red[i];
  return t;
}

template <class T> __global__ void __launch_bounds__(kThreads) add_layer_norm_kernel(const NormArgs a) {
  extern __shared__ float row[];
  __shared__ float red[kThreads / 32];
  const int64_t n = blockIdx.x;
  const T* x = static_cast<const T*>(a.x) + n * a.xs;
  T* r = static_cast<T*>(a.r) + n * a.rs;
  T* o = static_cast<T*>(a.o) + n * a.os;
  float sum = 0.f;
  for (int c = threadIdx.x; c < a.C; c += kThreads) {
    const T v = from_f<T>(to_f(x[c]) + to_f(r[c]));
    r[c] = v;
    const float f = to_f(v);
    row[c] = f;
    sum += f;
  }
  const float mean = block_sum(sum, red) / float(a.C);
  float sq = 0.f;
  for (int c = threadIdx.x; c < a.C; c += kThreads) {
    const float d = row[c] - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(block_sum(sq, red) / float(a.C) + a.eps);
  const T* w = static_cast<const T*>(a.w);
  const T* b = static_cast<const T*>(a.b);
  for (int c = threadIdx.x; c < a.C; c += kThreads) {
    float y = (row[c] - mean) * rstd;
    if (w) y *= to_f(w[c]);
    if (b) y += to_f(b[c]);
    o[c] = from_f<T>(y);
  }
}

constexpr int kWarpRows = 4;  // rows per block of the warp kernel

// A warp per row: lane l holds 16-byte vectors l, l + 32, ... (N of them) of the row.
template <class T, int N>
__global__ void __launch_bounds__(32 * kWarpRows) add_layer_norm_warp(const NormArgs a, int64_t rows) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t n = int64_t(blockIdx.x) * kWarpRows + threadIdx.x / 32;
  if (n >= rows) return;
  const int lane = threadIdx.x % 32;
  const T* x = static_cast<const T*>(a.x) + n * a.xs;
  T* r = static_cast<T*>(a.r) + n * a.rs;
  T* o = static_cast<T*>(a.o) + n * a.os;
  float v[N][kVec], xv[N][kVec];
  // Every load before any store: the residual's stores could alias later loads as far as
  // the compiler knows, which would serialise the round trips.
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int j = (lane + 32 * i) * kVec;
    if (j < a.C) load_v<kVec>(x + j, xv[i]), load_v<kVec>(r + j, v[i]);
  }
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int j = (lane + 32 * i) * kVec;
    if (j >= a.C) continue;
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum += (v[i][e] = to_f(from_f<T>(v[i][e] + xv[i][e])));
    store_v<kVec>(r + j, v[i]);
  }
  const float mean = warp_sum(sum) / float(a.C);
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i)
    if ((lane + 32 * i) * kVec < a.C)
#pragma unroll
      for (int e = 0; e < kVec; ++e) sq += (v[i][e] - mean) * (v[i][e] - mean);
  const float rstd = rsqrtf(warp_sum(sq) / float(a.C) + a.eps);
  const T* w = static_cast<const T*>(a.w);
  const T* b = static_cast<const T*>(a.b);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int j = (lane + 32 * i) * kVec;
    if (j >= a.C) continue;
    float wv[kVec], bv[kVec];
    if (w) load_v<kVec>(w + j, wv);
    if (b) load_v<kVec>(b + j, bv);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float y = (v[i][e] - mean) * rstd;
      if (w) y *= wv[e];
      if (b) y += bv[e];
      v[i][e] = y;
    }
    store_v<kVec>(o + j, v[i]);
  }
}

// Rows of whole, 16-byte aligned vectors (pointers and row strides).
bool vector_rows(const AddLayerNorm& a, int64_t C, size_t elem) {
  const int64_t vec = 16 / int64_t(elem);
  auto ok = [&](const TensorRef& t, bool row) {
    return !t.present() || (reinterpret_cast<uintptr_t>(t.data) % 16 == 0 &&
                            (!row || t.stride[0] % vec == 0));
  };
  return C % vec == 0 && ok(a.x, true) && ok(a.residual, true) && ok(a.out, true) &&
         ok(a.weight, false) && ok(a.bias, false);
}

}  // namespace

void add_layer_norm(const NormProblem& p, const AddLayerNorm& a) {
  if (p.N == 0 || p.C == 0) return;
  MKA_CHECK(p.C <= kMaxC, "x: rows of ", p.C, " elements exceed the CUDA kernel's ", kMaxC);
  MKA_CHECK(p.N < (int64_t(1) << 31), "x: too many rows (", p.N, ") for the CUDA kernel");
  DeviceGuard guard(p.device_id);
  auto s = static_cast<cudaStream_t>(a.launch.stream);
  NormArgs n{};
  n.x = a.x.data, n.r = a.residual.data, n.o = a.out.data;
  n.w = a.weight.present() ? a.weight.data : nullptr;
  n.b = a.bias.present() ? a.bias.data : nullptr;
  n.xs = a.x.stride[0], n.rs = a.residual.stride[0], n.os = a.out.stride[0];
  n.C = int(p.C), n.eps = float(p.eps);
  const int smem = int(p.C * sizeof(float));
  dispatch_dtype(p.dtype, "add_layer_norm", [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    constexpr int64_t kVec = 16 / sizeof(T);
    const int64_t per_lane = ceil_div(p.C, 32 * kVec);  // vectors per lane
    if (per_lane <= 8 && vector_rows(a, p.C, sizeof(T))) {
      const unsigned grid = unsigned(ceil_div(p.N, kWarpRows));
      auto go = [&](auto nc) {
        add_layer_norm_warp<T, decltype(nc)::value><<<grid, 32 * kWarpRows, 0, s>>>(n, p.N);
      };
      if (per_lane <= 1) go(std::integral_constant<int, 1>{});
      else if (per_lane <= 2) go(std::integral_constant<int, 2>{});
      else if (per_lane <= 4) go(std::integral_constant<int, 4>{});
      else go(std::integral_constant<int, 8>{});
      check_launch("add_layer_norm_warp");
      return;
    }
    if (smem > 48 * 1024) set_smem(add_layer_norm_kernel<T>, smem);
    add_layer_norm_kernel<T><<<unsigned(p.N), kThreads, smem, s>>>(n);
    check_launch("add_layer_norm_kernel");
  });
}

}  // namespace mka::cuda
