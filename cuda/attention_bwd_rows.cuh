// Pieces the two tensor-core backward kernels (mma.sync and wgmma) share: the per-query-row
// statistics of a query block, and the write-out of a key block's dK and dV accumulators.
#pragma once
#include "attention_params.cuh"

namespace mka::cuda {

// lse (in log2 units), delta and the dout weight w of query rows [i0, i0 + BM) of head h
// into st[0..BM), st[BM..2BM), st[2BM..3BM); zeros past Tq (those rows contribute nothing).
template <int BM, int THREADS>
__device__ __forceinline__ void load_row_stats(float* st, const AttnParams& p, int64_t b,
                                               int64_t h, int64_t i0) {
  for (int r = threadIdx.x; r < BM; r += THREADS) {
    const int64_t i = i0 + r;
    const bool in = i < p.Tq;
    st[r] = in ? p.lse_at(b, h)[i] * 1.4426950408889634f : 0.f;
    st[BM + r] = in ? p.delta_at(b, h)[i] : 0.f;
    st[2 * BM + r] = in ? p.w.load(b, i, 1.f) : 0.f;
  }
}

// One element of dK or dV of key j, kv head g, column c, handed over as p.kv_grad says.
template <class T>
__device__ __forceinline__ void put_kv_grad(const AttnParams& p, const Rows& r, int64_t b,
                                            int64_t j, int64_t g, int c, float x) {
  switch (p.kv_grad) {
    case KVGrad::add_io: {
      T* y = r.at<T>(b, j, g) + c;
      *y = from_f<T>(to_f(*y) + x);
      break;
    }
    case KVGrad::store_io: r.at<T>(b, j, g)[c] = from_f<T>(x); break;
  }
}

// Hands over this thread's dK (times the softmax scale) and dV accumulator rows, keys kr0
// and kr0 + 8 in the m16n8 accumulator layout, of kv head g.
template <class T, int DT>
__device__ __forceinline__ void add_dkdv_rows(const AttnParams& p, int64_t b, int64_t g,
                                              int64_t kr0, const float (&dk)[DT][4],
                                              const float (&dv)[DT][4]) {
  const int lane = threadIdx.x % 32;
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = kr0 + r * 8;
    if (j >= p.Tk) continue;
    #pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int c = dt * 8 + (lane % 4) * 2;
      #pragma unroll
      for (int e = 0; e < 2; ++e) {
        put_kv_grad<T>(p, p.dk, b, j, g, c + e, dk[dt][2 * r + e] * p.scale);
        put_kv_grad<T>(p, p.dv, b, j, g, c + e, dv[dt][2 * r + e]);
      }
    }
  }
}

}  // namespace mka::cuda
