// Recall attention on tensor cores (mma.sync m16n8k16): 16-bit inputs, d = 64 or 128,
// 16-byte aligned rows.
//
// Forward and dq: a block per row block (recall_params.cuh: up to 16 query rows x heads of
// one kv head, their chosen chunks merged). The merged chunks' keys stream through shared
// memory in tiles of 64, double-buffered with cp.async, gathered chunk by chunk; each of the
// 4 warps owns 16 keys of a tile with its own online softmax (forward) or dQ accumulator
// (dq), Q (and dO) fragments held in registers. The warps merge through shared memory in a
// fixed order: deterministic.
//
// dK/dV: a block per (batch, kv head, chunk, 64-key tile of the chunk) holds the tile's K and
// V in shared memory and walks the (row, head) pairs of the rows that chose the chunk (a
// sorted index, rows in increasing order), 64 pairs at a time as in the attention backward
// (bwd_mma.cuh) without its dQ: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q in
// float32 registers, written once. Every key of every chunk is written (zeros where no row
// chose it).
#pragma once
#include "memory/recall_params.cuh"
#include "mma/mma_tile.cuh"
#include "mma/warp_keys.cuh"

namespace mka::cuda::recall {

constexpr int kWarps = kThreads / 32;
static_assert(kTile == 16 * kWarps, "a warp owns 16 keys of a tile");

template <int D> constexpr size_t rows_mma_smem(int tiles16) {
  // tiles16 16 x D tiles (Q, dO), then K and V in two stages; the merge reuses the stages.
  return size_t(tiles16 * 16 * D + 2 * 2 * kTile * D) * 2;
}

// Q-like rows of the block's M rows into a swizzled 16 x D tile (zeros for padding rows).
template <class T, int D>
__device__ __forceinline__ void issue_rows(T* tile, const Rows& x, const RowSmem& s,
                                           const RowBlock& rb) {
  using namespace mma;
  for (int e = threadIdx.x; e < 16 * (D / 8); e += kThreads) {
    const int r = e / (D / 8), c = e % (D / 8), i = s.rowi[r];
    const T* src = i >= 0 ? x.at<const T>(rb.b, rb.t0 + i, s.head[r]) + c * 8
                          : static_cast<const T*>(x.data);
    cp_async16(tile + swz<D>(r, c), src, i >= 0);
  }
}

// Keys [64 kt, 64 kt + 64) of the block's merged chunks, K and V, into a stage (zeros past
// the last chunk).
template <class T, int D>
__device__ __forceinline__ void issue_keys(const Args& a, const RowSmem& s, const RowBlock& rb,
                                           T* sK, T* sV, int kt) {
  using namespace mma;
  constexpr int kChunks = D / 8;
  const int nkeys = s.nunits * int(a.C);
  for (int e = threadIdx.x; e < kTile * kChunks; e += kThreads) {
    const int r = e / kChunks, c = e % kChunks, j = kt * kTile + r;
    const bool ok = j < nkeys;
    int64_t pos = 0;
    if (ok) {
      const int u = int(a.fC.div(unsigned(j)));
      pos = int64_t(s.unit[u]) * a.C + (j - u * int(a.C));
    }
    const T* k = static_cast<const T*>(a.k.data);
    const T* v = static_cast<const T*>(a.v.data);
    cp_async16(sK + swz<D>(r, c), ok ? a.k.at<const T>(rb.b, pos, rb.g) + c * 8 : k, ok);
    cp_async16(sV + swz<D>(r, c), ok ? a.v.at<const T>(rb.b, pos, rb.g) + c * 8 : v, ok);
  }
}

// The tile loop both row kernels run: stage kt + 1 loads while `body(sK, sV, kt)` computes.
template <class T, int D, class Body>
__device__ __forceinline__ void key_tiles(const Args& a, const RowSmem& s, const RowBlock& rb,
                                          T* stage0, int tiles, Body&& body) {
  using namespace mma;
  auto stage = [&](int kt) { return stage0 + (kt & 1) * 2 * kTile * D; };
  for (int kt = 0; kt < tiles; ++kt) {
    cp_async_next_stage(kt + 1 < tiles, [&] {
      issue_keys<T, D>(a, s, rb, stage(kt + 1), stage(kt + 1) + kTile * D, kt + 1);
    });
    __syncthreads();
    body(stage(kt), stage(kt) + kTile * D, kt);
    __syncthreads();  // the stage is refilled next iteration
  }
}

// f(hr, nt, c, n) for each of this thread's score elements sc[nt][2 hr + c] of tile kt: M row
// lane/4 + 8 hr, key 64 kt + 16 warp + 8 nt + 2 (lane % 4) + c, chosen n times by the row.
template <class F>
__device__ __forceinline__ void for_each_score(const Args& a, const RowSmem& s, int kt, F&& f) {
  const int lane = threadIdx.x % 32, k0 = 16 * (threadIdx.x / 32);
#pragma unroll
  for (int hr = 0; hr < 2; ++hr)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c)
        f(hr, nt, c, key_count(a, s, lane / 4 + 8 * hr, kt * kTile + k0 + 8 * nt + 2 * (lane % 4) + c));
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) recall_fwd_mma(const Args a) {
  using namespace mma;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* stage0 = sQ + 16 * D;
  __shared__ RowSmem s;
  __shared__ float sM[kWarps][16], sL[kWarps][16], rowM[16], rowL[16];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, k0 = 16 * warp;
  const RowBlock rb = row_block(a);
  merge_chunks(a, s, rb);
  const int nkeys = s.nunits * int(a.C), tiles = (nkeys + kTile - 1) / kTile;
  issue_rows<T, D>(sQ, a.q, s, rb);
  if (tiles > 0) issue_keys<T, D>(a, s, rb, stage0, stage0 + kTile * D, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  unsigned qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a<D>(qa[kk], sQ, 0, kk);

  WarpSoftmax<D> st;
  st.init();
  key_tiles<T, D>(a, s, rb, stage0, tiles, [&](const T* sK, const T* sV, int kt) {
    float sc[2][4] = {};
    warp_scores<T, D>(sc, qa, sK, k0);
    float mx[2] = {-INFINITY, -INFINITY};
    for_each_score(a, s, kt, [&](int hr, int nt, int c, int n) {
      float& x = sc[nt][2 * hr + c];
      x = n > 0 ? counted(x * a.scale_log2, n) : -INFINITY;
      mx[hr] = fmaxf(mx[hr], x);
    });
    st.update(sc, mx);
    warp_times_rows<T, D>(st.o, sc, sV, k0);
  });
  cp_async_wait<0>();

  // Merge the warps: per row the max over warps, each warp's share rescaled to it.
  if (lane % 4 == 0)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) sM[warp][lane / 4 + 8 * hr] = st.m[hr], sL[warp][lane / 4 + 8 * hr] = st.l[hr];
  __syncthreads();
  if (threadIdx.x < 16) merge_stats<kWarps>(sM, sL, threadIdx.x, rowM[threadIdx.x], rowL[threadIdx.x]);
  __syncthreads();
  float f[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) f[hr] = st.l[hr] > 0.f ? exp2f(st.m[hr] - rowM[lane / 4 + 8 * hr]) : 0.f;
  merge_warps<kWarps, D>(reinterpret_cast<float*>(stage0), st.o, f, [&](int r, int x, float sum) {
    const int i = s.rowi[r];
    if (i < 0) return;
    const int64_t t = rb.t0 + i;
    const float L = rowL[r];
    const bool bad = s.bad[i];
    a.out.at<T>(rb.b, t, s.head[r])[x] = from_f<T>(bad ? qnan() : (L > 0.f ? sum / L : 0.f));
    if (x == 0)
      a.lse[a.stat(rb.b, s.head[r], t)] =
          bad ? qnan() : (L > 0.f ? (rowM[r] + log2f(L)) / kLog2e : -INFINITY);
  });
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) recall_dq_mma(const Args a) {
  using namespace mma;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + 16 * D;
  T* stage0 = sdO + 16 * D;
  __shared__ RowSmem s;
  __shared__ float sLse2[16], sDelta[16];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, k0 = 16 * warp;
  const RowBlock rb = row_block(a);
  merge_chunks(a, s, rb);
  const int nkeys = s.nunits * int(a.C), tiles = (nkeys + kTile - 1) / kTile;
  issue_rows<T, D>(sQ, a.q, s, rb);
  issue_rows<T, D>(sdO, a.dout, s, rb);
  if (tiles > 0) issue_keys<T, D>(a, s, rb, stage0, stage0 + kTile * D, 0);
  cp_async_commit();
  if (threadIdx.x < 16) {
    const int r = threadIdx.x, i = s.rowi[r];
    float lse2 = INFINITY, delta = 0.f;  // padding rows: P = 0
    if (i >= 0) {
      const int64_t at = a.stat(rb.b, s.head[r], rb.t0 + i);
      lse2 = lse2_of(a.lse[at]);
      delta = a.delta[at];
    }
    sLse2[r] = lse2, sDelta[r] = delta;
  }
  cp_async_wait<0>();
  __syncthreads();
  unsigned qa[D / 16][4], oa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a<D>(qa[kk], sQ, 0, kk), load_a<D>(oa[kk], sdO, 0, kk);
  float lse2[2], delta[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) lse2[hr] = sLse2[lane / 4 + 8 * hr], delta[hr] = sDelta[lane / 4 + 8 * hr];

  float dq[D / 8][4] = {};
  key_tiles<T, D>(a, s, rb, stage0, tiles, [&](const T* sK, const T* sV, int kt) {
    float sc[2][4] = {}, dp[2][4] = {};
    warp_scores<T, D>(sc, qa, sK, k0);
    warp_scores<T, D>(dp, oa, sV, k0);
    // dS = P (dP - delta), P = n exp2(scale log2e S - lse2) for a key chosen n times.
    for_each_score(a, s, kt, [&](int hr, int nt, int c, int n) {
      float& x = sc[nt][2 * hr + c];
      const float p = n > 0 ? exp2f(counted(x * a.scale_log2, n) - lse2[hr]) : 0.f;
      x = p * (dp[nt][2 * hr + c] - delta[hr]);
    });
    warp_times_rows<T, D>(dq, sc, sK, k0);
  });
  cp_async_wait<0>();

  const float f[2] = {a.scale, a.scale};
  merge_warps<kWarps, D>(reinterpret_cast<float*>(stage0), dq, f, [&](int r, int x, float sum) {
    const int i = s.rowi[r];
    if (i < 0) return;
    a.dq.at<T>(rb.b, rb.t0 + i, s.head[r])[x] = from_f<T>(s.bad[i] ? qnan() : sum);
  });
}

// --- dK, dV (and dQ partials) per chunk tile ------------------------------------------
constexpr int kPairs = 64;  // (row, head) pairs per step
static_assert(kPairs <= kThreads, "a thread per pair of a step");

// The step loop of the chunk-tile kernels (recall_dkdv_mma, recall_fwd_chunks): step it + 1's
// rows load by cp.async while body(it, stage) computes step it. issue(it, stage) fills a
// stage with step it's pairs (every thread calls it; a barrier inside); copies the caller
// issued before (the tile's K and V) join step 0's group.
template <class Issue, class Body>
__device__ __forceinline__ void pair_steps(int64_t iters, Issue&& issue, Body&& body) {
  if (iters == 0) return;
  issue(0, 0);
  mma::cp_async_commit();
  for (int64_t it = 0; it < iters; ++it) {
    const int stage = int(it & 1);
    mma::cp_async_next_stage(it + 1 < iters, [&] { issue(it + 1, stage ^ 1); });
    __syncthreads();
    body(it, stage);
    __syncthreads();  // the next prefetch overwrites this stage
  }
}

// The sorted key of pair threadIdx.x of a step, loaded one step ahead into a register: a
// step's issue then waits on no global load (its statistics and rows go by cp.async).
struct PairKey {
  uint64_t key = 0;
  // Loads the key of pair f = it BM + threadIdx.x of the run at sorted[lo..] (pairs: the
  // run's pairs, entry f / group).
  __device__ __forceinline__ void load(const Args& a, int64_t lo, int64_t pairs, int64_t it) {
    const int64_t f = it * kPairs + threadIdx.x;
    if (threadIdx.x < kPairs && f < pairs) key = a.sorted[lo + a.fgrp.div(uint32_t(f))];
  }
};

template <int D> constexpr size_t dkdv_mma_smem(bool dq) {
  // K, V; Q and dO in two stages; with dq the tile's dS^T; lse and delta in two stages.
  return size_t(2 * kTile * D + 2 * 2 * kPairs * D + (dq ? kTile * kPairs : 0)) * 2 +
         2 * 2 * kPairs * 4;
}

// kDq (the chunk-major backward): each step also computes its pairs' dQ over the tile's keys,
// dQ = dS K, and writes it, times the scale, as the pair's partial (row, head, entry r, key
// tile) into a.part — a pair appears once in a chunk's run, so nothing accumulates across
// steps, and recall_merge_partials sums a row's partials in a fixed order. dS goes through
// shared memory so the warps can re-split by pairs (as the attention backward, bwd_mma.cuh),
// and the dQ columns are done in halves at d = 128 so the 16 x d accumulator does not sit
// beside dK and dV whole (registers).
template <class T, int D, bool kDq>
__global__ void __launch_bounds__(kThreads, 2) recall_dkdv_mma(const Args a) {
  using namespace mma;
  constexpr int BN = kTile, BM = kPairs, KS = D / 16, DT = D / 8, MT = BM / 8;
  constexpr int kHalves = D == 128 ? 2 : 1, HT = DT / kHalves;  // dQ column tiles per half
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + BN * D;
  T* qs = vs + BN * D;        // [2][BM][D]
  T* dos = qs + 2 * BM * D;   // [2][BM][D]
  T* dst = dos + 2 * BM * D;  // kDq: [BN][BM] dS^T
  float* stats = reinterpret_cast<float*>(dst + (kDq ? BN * BM : 0));  // [2][2][BM]: lse, delta

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const ChunkTile ct = chunk_tile(a, BN);
  const ChunkRows cr = chunk_rows(a, ct.bg, ct.c);
  const int64_t pairs = (cr.hi - cr.lo) * a.grp, iters = (pairs + BM - 1) / BM;

  // Each stage's pairs: query row (-1: none) and head; kDq: where its dQ partial goes.
  __shared__ int sT[2][BM], sH[2][BM];
  __shared__ int64_t sPart[kDq ? 2 : 1][BM];
  PairKey pk;
  auto issue = [&](int64_t it, int stage) {  // pairs [it BM, it BM + BM) into `stage`
    if (threadIdx.x < BM) {
      const int r = threadIdx.x;
      const int64_t f = it * BM + r;
      float* st = stats + stage * 2 * BM;
      int64_t t = -1, e = 0, h = 0;
      if (f < pairs) {
        a.key_row(pk.key, cr.first, t, e);
        h = ct.g * a.grp + (f - int64_t(a.fgrp.div(uint32_t(f))) * a.grp);
        cp_async4(st + r, a.lse + a.stat(ct.b, h, t));
        cp_async4(st + BM + r, a.delta + a.stat(ct.b, h, t));
      } else {
        st[r] = INFINITY, st[BM + r] = 0.f;  // past the last pair: P = 0
      }
      sT[stage][r] = int(t), sH[stage][r] = int(h);
      if constexpr (kDq)
        sPart[stage][r] = t < 0 ? -1 : a.part_index(ct.bg, t, h - ct.g * a.grp, e * a.kts + ct.kt);
    }
    pk.load(a, cr.lo, pairs, it + 1);
    __syncthreads();
    T* qt = qs + stage * BM * D;
    T* dot = dos + stage * BM * D;
    for (int e = threadIdx.x; e < BM * (D / 8); e += kThreads) {
      const int r = e / (D / 8), c = e % (D / 8), t = sT[stage][r], h = sH[stage][r];
      const bool ok = t >= 0;
      cp_async16(qt + swz<D>(r, c), ok ? a.q.at<const T>(ct.b, t, h) + c * 8 : static_cast<const T*>(a.q.data), ok);
      cp_async16(dot + swz<D>(r, c), ok ? a.dout.at<const T>(ct.b, t, h) + c * 8 : static_cast<const T*>(a.dout.data), ok);
    }
  };

  float dk[DT][4] = {}, dv[DT][4] = {};
  if (iters > 0) {
    load_tile<BN, D, kThreads>(ks, a.k, ct.b, ct.j0, ct.j0 + ct.n, ct.g);
    load_tile<BN, D, kThreads>(vs, a.v, ct.b, ct.j0, ct.j0 + ct.n, ct.g);
    pk.load(a, cr.lo, pairs, 0);
  }
  pair_steps(iters, issue, [&](int64_t, int stage) {
    const T* qt = qs + stage * BM * D;
    const T* dot = dos + stage * BM * D;
    const float* lse = stats + stage * 2 * BM;
    const float* delta = lse + BM;

    float s[MT][4] = {}, dp[MT][4] = {};
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      unsigned ka[4], va[4];
      load_a<D>(ka, ks, warp * 16, kk);
      load_a<D>(va, vs, warp * 16, kk);
#pragma unroll
      for (int np = 0; np < MT / 2; ++np) {
        unsigned qb[4], ob[4];
        load_b<D>(qb, qt, np * 16, kk);
        load_b<D>(ob, dot, np * 16, kk);
        mma16816<T>(s[2 * np], ka, qb[0], qb[1]);
        mma16816<T>(s[2 * np + 1], ka, qb[2], qb[3]);
        mma16816<T>(dp[2 * np], va, ob[0], ob[1]);
        mma16816<T>(dp[2 * np + 1], va, ob[2], ob[3]);
      }
    }
    // s[mt][e]: key warp 16 + lane/4 + 8 (e >> 1), pair mt 8 + 2 (lane % 4) + (e & 1).
    // s <- P (for dV), dp <- dS = P (dP - delta) (for dK and dQ).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = mt * 8 + (lane % 4) * 2 + (e & 1);
        const float pr = exp2f(s[mt][e] * a.scale_log2 - lse2_of(lse[r]));
        s[mt][e] = pr;
        dp[mt][e] = pr * (dp[mt][e] - delta[r]);
      }
    if constexpr (kDq) {
      // dS^T to shared memory (keys as rows; read after the barrier below), zeros for the
      // keys past the tile's n (zero rows of K, but their P is not masked: exp2(-lse2) may
      // overflow for a row of very negative scores, and inf times 0 is NaN).
      const int row = warp * 16 + lane / 4, c = (lane % 4) * 2;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        *reinterpret_cast<unsigned*>(dst + swz<BM>(row, mt) + c) =
            row < ct.n ? pack2<T>(dp[mt][0], dp[mt][1]) : 0u;
        *reinterpret_cast<unsigned*>(dst + swz<BM>(row + 8, mt) + c) =
            row + 8 < ct.n ? pack2<T>(dp[mt][2], dp[mt][3]) : 0u;
      }
    }
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      unsigned pa[4], da[4];
      acc_to_a<T>(pa, s, kk);
      acc_to_a<T>(da, dp, kk);
#pragma unroll
      for (int np = 0; np < DT / 2; ++np) {
        unsigned ob[4], qb[4];
        load_b_trans<D>(ob, dot, kk * 16, np);
        load_b_trans<D>(qb, qt, kk * 16, np);
        mma16816<T>(dv[2 * np], pa, ob[0], ob[1]);
        mma16816<T>(dv[2 * np + 1], pa, ob[2], ob[3]);
        mma16816<T>(dk[2 * np], da, qb[0], qb[1]);
        mma16816<T>(dk[2 * np + 1], da, qb[2], qb[3]);
      }
    }
    if constexpr (kDq) {
      __syncthreads();  // every warp's dS^T is in (pair_steps' barrier ends its reads)
      // dQ of pairs warp 16 + lane/4 + 8 hr over the tile's keys, columns 8 dt + 2 (lane % 4).
      int64_t part[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) part[hr] = sPart[stage][warp * 16 + lane / 4 + 8 * hr];
#pragma unroll
      for (int half = 0; half < kHalves; ++half) {
        float dq[HT][4] = {};
        mma_at_rows<T, BM, D, BN, HT>(dq, dst, warp, ks, half * (HT / 2));
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          if (part[hr] < 0) continue;
          float* row = a.part + part[hr] * D + half * (D / kHalves) + 2 * (lane % 4);
#pragma unroll
          for (int dt = 0; dt < HT; ++dt)
            *reinterpret_cast<float2*>(row + 8 * dt) =
                make_float2(dq[dt][2 * hr] * a.scale, dq[dt][2 * hr + 1] * a.scale);
        }
      }
    }
  });

  // Rows warp 16 + lane/4 + 8 hr of the tile, columns 8 dt + 2 (lane % 4) + {0, 1}.
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = warp * 16 + lane / 4 + 8 * hr;
    if (r >= ct.n) continue;
    T* dkr = a.dk.at<T>(ct.b, ct.j0 + r, ct.g);
    T* dvr = a.dv.at<T>(ct.b, ct.j0 + r, ct.g);
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int c = dt * 8 + 2 * (lane % 4);
      *reinterpret_cast<unsigned*>(dkr + c) = pack2<T>(dk[dt][2 * hr] * a.scale, dk[dt][2 * hr + 1] * a.scale);
      *reinterpret_cast<unsigned*>(dvr + c) = pack2<T>(dv[dt][2 * hr], dv[dt][2 * hr + 1]);
    }
  }
}

}  // namespace mka::cuda::recall
