// Attention on CUDA cores, float32 arithmetic: the float32 path (tensor cores would round
// to tf32, above SPEC's 1e-5) and the fallback for half inputs whose rows are not 16-byte
// aligned. One warp per query row (forward, dq) or key row (dk/dv); lanes split the head
// dim (NC = d / 32 channels each) and, for scores, take one key or query of a 32-row tile
// kept in shared memory. kDrop: attention dropout (p.dropout), each lane's weight's
// multiplier evaluated by the lane (its four-key Philox group's lanes run it together).
#pragma once
#include <cmath>

#include "attention/bwd_rows.cuh"
#include "attention/dropout.cuh"
#include "attention/params.cuh"

namespace mka::cuda {

constexpr int kSimtWarps = 8;  // rows per block
constexpr int kSimtTile = 32;  // keys (or queries) per shared-memory tile

// Copies rows [r0, r0 + 32) of x (batch b, head h) into tile[32][ld] as float; zeros past n.
template <class T, int NC>
__device__ __forceinline__ void load_tile(float* tile, int ld, const Rows& x, int64_t b,
                                          int64_t r0, int64_t n, int64_t h) {
  constexpr int D = NC * 32;
  for (int e = threadIdx.x; e < kSimtTile * D; e += blockDim.x) {
    const int r = e / D, c = e % D;
    tile[r * ld + c] = r0 + r < n ? to_f(x.at<const T>(b, r0 + r, h)[c]) : 0.f;
  }
}

template <class T, int NC, bool kDrop> __global__ void __launch_bounds__(kSimtWarps * 32)
attention_fwd_simt(AttnParams p) {
  constexpr int D = NC * 32, LD = D + 1;  // +1: a lane per key reads a column conflict-free
  __shared__ float ks[kSimtTile * LD], vs[kSimtTile * D], qs[kSimtWarps * D];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z, h = blockIdx.y, g = h / p.group;
  const int64_t i0 = int64_t(blockIdx.x) * kSimtWarps, i = i0 + warp;
  const bool row = i < p.Tq;
  const int64_t lo = row ? p.key_lo(i) : 0, hi = row ? p.key_hi(i) : 0;
  const int64_t last = min(p.Tq, i0 + kSimtWarps) - 1;
  const int64_t blk_lo = p.key_lo(i0), blk_hi = p.key_hi(last);
  for (int c = lane; c < D; c += 32) qs[warp * D + c] = row ? to_f(p.q.at<const T>(b, i, h)[c]) : 0.f;
  const DropKeep drop(p.dropout);  // read only where kDrop

  float m = -INFINITY, l = 0.f, acc[NC] = {};
  for (int64_t j0 = blk_lo - blk_lo % kSimtTile; j0 < blk_hi; j0 += kSimtTile) {
    __syncthreads();
    load_tile<T, NC>(ks, LD, p.k, b, j0, p.Tk, g);
    load_tile<T, NC>(vs, D, p.v, b, j0, p.Tk, g);
    __syncthreads();
    const int64_t j = j0 + lane;
    float s = -INFINITY;
    if (j >= lo && j < hi) {
      s = 0.f;
      for (int c = 0; c < D; ++c) s += qs[warp * D + c] * ks[lane * LD + c];
      s *= p.scale;
    }
    const float m_new = fmaxf(m, warp_max(s));
    if (m_new == -INFINITY) continue;  // nothing visible yet in this row
    const float corr = expf(m - m_new), e = expf(s - m_new);
    l = l * corr + warp_sum(e);
    // Dropout after the row sum: the softmax normalises over every weight.
    const float pe = kDrop ? e * drop.at(b * p.H + h, i, j) : e;
    for (int r = 0; r < NC; ++r) acc[r] *= corr;
    for (int jj = 0; jj < kSimtTile; ++jj) {
      const float pj = __shfl_sync(0xffffffffu, pe, jj);
      for (int r = 0; r < NC; ++r) acc[r] += pj * vs[jj * D + lane + 32 * r];
    }
    m = m_new;
  }
  if (!row) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;  // no visible key: zeros, lse = -inf
  for (int r = 0; r < NC; ++r) {
    if (p.out_f32) p.out.at<float>(b, i, h)[lane + 32 * r] = acc[r] * inv;
    else p.out.at<T>(b, i, h)[lane + 32 * r] = from_f<T>(acc[r] * inv);
  }
  if (lane == 0) p.lse_at(b, h)[i] = l > 0.f ? m + logf(l) : -INFINITY;
}

// delta[b, h, i] = <dout, out> of row (b, i, h), float32 (the softmax backward's row term);
// with p.zero_dq, the row of the dq accumulator (dense float32) is zeroed too.
template <class T, int V> __global__ void attention_bwd_delta(AttnParams p) {
  // V = 8: half a warp per row, 16-byte loads; V = 1 (unaligned views): a warp per row.
  constexpr int kLanes = V == 1 ? 32 : 16;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  const int lane = threadIdx.x % kLanes;
  const bool active = row < p.B * p.Tq * p.H;  // inactive lanes still join the shuffles
  const int64_t h = row % p.H, i = (row / p.H) % p.Tq, b = row / (p.H * p.Tq);
  float s = 0.f;
  if (active) {
    const T* o = p.out.at<const T>(b, i, h);
    const T* dO = p.dout.at<const T>(b, i, h);
    for (int64_t c = int64_t(lane) * V; c < p.d; c += kLanes * V) {
      float x[V], y[V];
      load_v<V>(o + c, x);
      load_v<V>(dO + c, y);
      #pragma unroll
      for (int e = 0; e < V; ++e) s += x[e] * y[e];
    }
    if (p.zero_dq) {
      float* dq = p.dq.at<float>(b, i, h);
      for (int64_t c = lane; c < p.d; c += kLanes) dq[c] = 0.f;
    }
  }
  #pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (active && lane == 0) p.delta_at(b, h)[i] = s;
}

// dq: one warp per query row, looping over its visible keys.
template <class T, int NC, bool kDrop> __global__ void __launch_bounds__(kSimtWarps * 32)
attention_bwd_dq_simt(AttnParams p) {
  constexpr int D = NC * 32, LD = D + 1;
  __shared__ float ks[kSimtTile * LD], vs[kSimtTile * LD], qs[kSimtWarps * D], dos[kSimtWarps * D];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z, h = blockIdx.y, g = h / p.group;
  const int64_t i0 = int64_t(blockIdx.x) * kSimtWarps, i = i0 + warp;
  const bool row = i < p.Tq;
  const int64_t lo = row ? p.key_lo(i) : 0, hi = row ? p.key_hi(i) : 0;
  const int64_t last = min(p.Tq, i0 + kSimtWarps) - 1;
  const int64_t blk_lo = p.key_lo(i0), blk_hi = p.key_hi(last);
  for (int c = lane; c < D; c += 32) {
    qs[warp * D + c] = row ? to_f(p.q.at<const T>(b, i, h)[c]) : 0.f;
    dos[warp * D + c] = row ? to_f(p.dout.at<const T>(b, i, h)[c]) : 0.f;
  }
  const float lse = row ? p.lse_at(b, h)[i] : 0.f, delta = row ? p.delta_at(b, h)[i] : 0.f;
  const float w = row ? p.w.load(b, i, 1.f) : 0.f;
  const DropKeep drop(p.dropout);  // read only where kDrop
  float acc[NC] = {};
  for (int64_t j0 = blk_lo - blk_lo % kSimtTile; j0 < blk_hi; j0 += kSimtTile) {
    __syncthreads();
    load_tile<T, NC>(ks, LD, p.k, b, j0, p.Tk, g);
    load_tile<T, NC>(vs, LD, p.v, b, j0, p.Tk, g);
    __syncthreads();
    const int64_t j = j0 + lane;
    float ds = 0.f;
    if (j >= lo && j < hi) {
      float s = 0.f, dp = 0.f;
      for (int c = 0; c < D; ++c) {
        s += qs[warp * D + c] * ks[lane * LD + c];
        dp += dos[warp * D + c] * vs[lane * LD + c];
      }
      // With dropout dS = w P (Z dP - delta), Z the weight's multiplier.
      ds = w * expf(s * p.scale - lse) * ((kDrop ? dp * drop.at(b * p.H + h, i, j) : dp) - delta);
    }
    for (int jj = 0; jj < kSimtTile; ++jj) {
      const float dsj = __shfl_sync(0xffffffffu, ds, jj);
      for (int r = 0; r < NC; ++r) acc[r] += dsj * ks[jj * LD + lane + 32 * r];
    }
  }
  if (!row) return;
  float* dq = p.dq.at<float>(b, i, h);
  for (int r = 0; r < NC; ++r) dq[lane + 32 * r] += acc[r] * p.scale;
}

// dk, dv: one warp per key row, looping over the group's query heads and visible queries.
template <class T, int NC, bool kDrop> __global__ void __launch_bounds__(kSimtWarps * 32)
attention_bwd_dkdv_simt(AttnParams p) {
  constexpr int D = NC * 32, LD = D + 1;
  __shared__ float qs[kSimtTile * LD], dos[kSimtTile * LD], ks[kSimtWarps * D], vs[kSimtWarps * D];
  __shared__ float lse_s[kSimtTile], delta_s[kSimtTile], w_s[kSimtTile];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z, g = blockIdx.y;
  const int64_t j0 = int64_t(blockIdx.x) * kSimtWarps, j = j0 + warp;
  const bool key = j < p.Tk;
  const int64_t qlo = key ? p.query_lo(j) : 0, qhi = key ? p.query_hi(j) : 0;
  const int64_t last = min(p.Tk, j0 + kSimtWarps) - 1;
  const int64_t blk_lo = p.query_lo(j0), blk_hi = p.query_hi(last);
  for (int c = lane; c < D; c += 32) {
    ks[warp * D + c] = key ? to_f(p.k.at<const T>(b, j, g)[c]) : 0.f;
    vs[warp * D + c] = key ? to_f(p.v.at<const T>(b, j, g)[c]) : 0.f;
  }
  const DropKeep drop(p.dropout);  // read only where kDrop
  float dk[NC] = {}, dv[NC] = {};
  for (int64_t h = g * p.group; h < (g + 1) * p.group; ++h) {
    for (int64_t i0 = blk_lo - blk_lo % kSimtTile; i0 < blk_hi; i0 += kSimtTile) {
      __syncthreads();
      load_tile<T, NC>(qs, LD, p.q, b, i0, p.Tq, h);
      load_tile<T, NC>(dos, LD, p.dout, b, i0, p.Tq, h);
      if (threadIdx.x < kSimtTile) {
        const int64_t i = i0 + threadIdx.x;
        const bool in = i < p.Tq;
        lse_s[threadIdx.x] = in ? p.lse_at(b, h)[i] : 0.f;
        delta_s[threadIdx.x] = in ? p.delta_at(b, h)[i] : 0.f;
        w_s[threadIdx.x] = in ? p.w.load(b, i, 1.f) : 0.f;
      }
      __syncthreads();
      const int64_t i = i0 + lane;
      float pw = 0.f, ds = 0.f;  // weighted (dropped) probability, score gradient of (i, j)
      if (i >= qlo && i < qhi) {
        float s = 0.f, dp = 0.f;
        for (int c = 0; c < D; ++c) {
          s += qs[lane * LD + c] * ks[warp * D + c];
          dp += dos[lane * LD + c] * vs[warp * D + c];
        }
        const float pr = expf(s * p.scale - lse_s[lane]);
        const float z = kDrop ? drop.at(b * p.H + h, i, j) : 1.f;  // dropout's multiplier
        pw = w_s[lane] * pr;
        ds = pw * ((kDrop ? z * dp : dp) - delta_s[lane]);  // w P (Z dP - delta)
        if constexpr (kDrop) pw *= z;                       // w P Z, for dV
      }
      for (int ii = 0; ii < kSimtTile; ++ii) {
        const float pwi = __shfl_sync(0xffffffffu, pw, ii);
        const float dsi = __shfl_sync(0xffffffffu, ds, ii);
        for (int r = 0; r < NC; ++r) {
          dv[r] += pwi * dos[ii * LD + lane + 32 * r];
          dk[r] += dsi * qs[ii * LD + lane + 32 * r];
        }
      }
    }
  }
  if (!key) return;
  for (int r = 0; r < NC; ++r) {
    put_kv_grad<T>(p, p.dk, b, j, g, lane + 32 * r, dk[r] * p.scale);
    put_kv_grad<T>(p, p.dv, b, j, g, lane + 32 * r, dv[r]);
  }
}

}  // namespace mka::cuda
