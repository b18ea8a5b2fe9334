// add_layer_norm on the GPU (mka/layers/norm_ops.h): a block per row. The row, once added and
// rounded to the residual's dtype (what the unfused add stores), stays in shared memory as
// float32 for the mean, the variance about it (two passes: no cancellation) and the output;
// HBM sees x and the residual read once, the residual and out written once. At decode sizes
// (a few rows of ~1k) the kernel is latency-bound, which is why it replaces two launches.
#include <algorithm>

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
    if (smem > 48 * 1024) set_smem(add_layer_norm_kernel<T>, smem);
    add_layer_norm_kernel<T><<<unsigned(p.N), kThreads, smem, s>>>(n);
    check_launch("add_layer_norm_kernel");
  });
}

}  // namespace mka::cuda
