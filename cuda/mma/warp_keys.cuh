// The steps of kernels where each warp owns 16 keys of a shared-memory tile and 16 query rows
// (one m16 tile) — the paged decode (memory/paged_mma.cuh) and recall (memory/recall_mma.cuh)
// kernels: scores of the warp's keys, the online softmax of its rows, acc += X (keys' rows),
// and the merge of the warps' accumulators and statistics at the end.
//
// Layout of a warp's 16 x 16 scores s[nt][c]: row lane/4 + 8 (c >> 1), key k0 + 8 nt +
// 2 (lane % 4) + (c & 1); of its 16 x D accumulator o[t][c]: row lane/4 + 8 (c >> 1), column
// 8 t + 2 (lane % 4) + (c & 1).
#pragma once
#include "mma/mma_tile.cuh"

namespace mka::cuda::mma {

// s += X K^T over the warp's keys (rows k0.. of `tile`); xfrag(a, kk) gives X's A operand of
// k-chunk pair kk (loaded from shared memory per call, say).
template <class T, int D, class XFrag>
__device__ __forceinline__ void warp_scores_by(float (&s)[2][4], XFrag&& xfrag, const T* tile, int k0) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    unsigned xa[4], b[4];
    xfrag(xa, kk);
    load_b<D>(b, tile, k0, kk);
    mma16816<T>(s[0], xa, b[0], b[1]);
    mma16816<T>(s[1], xa, b[2], b[3]);
  }
}

// The same with X's fragments in registers.
template <class T, int D>
__device__ __forceinline__ void warp_scores(float (&s)[2][4], const unsigned (&xa)[D / 16][4],
                                            const T* tile, int k0) {
  warp_scores_by<T, D>(s, [&](unsigned (&f)[4], int kk) {
    f[0] = xa[kk][0], f[1] = xa[kk][1], f[2] = xa[kk][2], f[3] = xa[kk][3];
  }, tile, k0);
}

// acc += A (16 x the warp's 16 keys, as an A operand) times the keys' rows of `tile`: P V, dS K.
template <class T, int D>
__device__ __forceinline__ void warp_times_rows(float (&acc)[D / 8][4], const unsigned (&xa)[4],
                                                const T* tile, int k0) {
#pragma unroll
  for (int np = 0; np < D / 16; ++np) {
    unsigned b[4];
    load_b_trans<D>(b, tile, k0, np);
    mma16816<T>(acc[2 * np], xa, b[0], b[1]);
    mma16816<T>(acc[2 * np + 1], xa, b[2], b[3]);
  }
}

// The same with A in the scores' (accumulator) layout.
template <class T, int D>
__device__ __forceinline__ void warp_times_rows(float (&acc)[D / 8][4], const float (&x)[2][4],
                                                const T* tile, int k0) {
  unsigned xa[4];
  acc_to_a<T, 2>(xa, x, 0);
  warp_times_rows<T, D>(acc, xa, tile, k0);
}

// One warp's online softmax (base 2): running max and sum of rows lane/4 and lane/4 + 8, and
// the output accumulator.
template <int D> struct WarpSoftmax {
  float m[2], l[2], o[D / 8][4];
  __device__ __forceinline__ void init() {
    m[0] = m[1] = -INFINITY, l[0] = l[1] = 0.f;
#pragma unroll
    for (int t = 0; t < D / 8; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  }

  // s: the warp's scores (scaled, masked keys -inf) of 8 NT keys (16 in the layout above;
  // more n-tiles alike), mx: this thread's max of each row half. On return s holds P
  // (unnormalised) and the max, sum and accumulator are rescaled.
  template <int NT>
  __device__ __forceinline__ void update(float (&s)[NT][4], const float (&mx)[2]) {
    float alpha[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const float m_new = fmaxf(m[hr], quad_max(mx[hr]));
      float sum = 0.f;
      if (m_new == -INFINITY) {
        alpha[hr] = 1.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) s[nt][2 * hr] = s[nt][2 * hr + 1] = 0.f;
      } else {
        alpha[hr] = exp2f(m[hr] - m_new);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) sum += (s[nt][2 * hr + c] = exp2f(s[nt][2 * hr + c] - m_new));
      }
      l[hr] = l[hr] * alpha[hr] + quad_sum(sum);
      m[hr] = m_new;
    }
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      o[t][0] *= alpha[0], o[t][1] *= alpha[0];
      o[t][2] *= alpha[1], o[t][3] *= alpha[1];
    }
  }
};

// The warps' statistics of one row: the max over warps and the sum rescaled to it (warps
// that saw nothing in the row add nothing). sM, sL: [kWarps][16] in shared memory.
template <int kWarps>
__device__ __forceinline__ void merge_stats(const float (*sM)[16], const float (*sL)[16], int r,
                                            float& m, float& L) {
  m = -INFINITY, L = 0.f;
  for (int w = 0; w < kWarps; ++w) m = fmaxf(m, sM[w][r]);
  for (int w = 0; w < kWarps; ++w)
    if (sL[w][r] > 0.f) L += sL[w][r] * exp2f(sM[w][r] - m);
}

// Each warp's 16 x D accumulator times f[hr] (rows lane/4 and lane/4 + 8) into its own slice
// sO[warp], then the sum over the warps in a fixed order (deterministic; no shared-memory
// float atomics, which are compare-and-swap loops), per element, to `put(row, col, sum)`.
// Ends with a barrier: sO may be reused after it.
template <int kWarps, int D, class Put>
__device__ __forceinline__ void merge_warps(float* sO, const float (&o)[D / 8][4],
                                            const float (&f)[2], Put&& put) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float* row = sO + (warp * 16 + lane / 4 + 8 * hr) * D + 2 * (lane % 4);
#pragma unroll
    for (int t = 0; t < D / 8; ++t)
      *reinterpret_cast<float2*>(row + 8 * t) = make_float2(o[t][2 * hr] * f[hr], o[t][2 * hr + 1] * f[hr]);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < 16 * D; e += 32 * kWarps) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += sO[w * 16 * D + e];
    put(e / D, e % D, sum);
  }
  __syncthreads();
}

}  // namespace mka::cuda::mma
