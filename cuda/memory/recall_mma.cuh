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
      const float lse = a.lse[at];
      lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
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

// --- dK, dV per chunk tile ------------------------------------------------------------
constexpr int kPairs = 64;  // (row, head) pairs per step

template <int D> constexpr size_t dkdv_mma_smem() {
  // K, V; Q and dO in two stages; lse2 and delta in two stages (float).
  return size_t(2 * kTile * D + 2 * 2 * kPairs * D) * 2 + 2 * 2 * kPairs * 4;
}

// First index of `sorted[0, n)` not below `key`.
__device__ __forceinline__ int64_t lower_bound(const uint64_t* sorted, int64_t n, uint64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted[mid] < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// The rows that chose chunk c of (b, g): entries [lo, hi) of the sorted index.
struct ChunkRows {
  int64_t lo, hi;
};
__device__ __forceinline__ ChunkRows chunk_rows(const Args& a, int64_t b, int64_t g, int64_t c) {
  return {lower_bound(a.sorted, a.n_sorted, a.entry_key(b, g, c, 0)),
          lower_bound(a.sorted, a.n_sorted, a.entry_key(b, g, c + 1, 0))};
}

struct ChunkTile {
  int64_t b, g, c, j0;  // keys [j0, j0 + n) of kv head g
  int n;
};
__device__ __forceinline__ ChunkTile chunk_tile(const Args& a, int tile_keys) {
  const int64_t kts = (a.C + tile_keys - 1) / tile_keys;
  int64_t idx = blockIdx.x;
  ChunkTile ct;
  const int64_t kt = idx % kts;
  idx /= kts;
  ct.c = idx % a.nC;
  idx /= a.nC;
  ct.g = idx % a.G;
  ct.b = idx / a.G;
  ct.j0 = ct.c * a.C + kt * tile_keys;
  ct.n = int(min(int64_t(tile_keys), a.C - kt * tile_keys));
  return ct;
}

// Pair f of a chunk's rows: its query row and head.
__device__ __forceinline__ void pair_of(const Args& a, const ChunkRows& cr, const ChunkTile& ct,
                                        int64_t f, int64_t& t, int64_t& h) {
  const int64_t e = f / a.grp;
  t = int64_t(a.sorted[cr.lo + e] % uint64_t(a.Tq));
  h = ct.g * a.grp + f % a.grp;
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads, 2) recall_dkdv_mma(const Args a) {
  using namespace mma;
  constexpr int BN = kTile, BM = kPairs, KS = D / 16, DT = D / 8, MT = BM / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + BN * D;
  T* qs = vs + BN * D;        // [2][BM][D]
  T* dos = qs + 2 * BM * D;   // [2][BM][D]
  float* stats = reinterpret_cast<float*>(dos + 2 * BM * D);  // [2][2][BM]: lse2, delta

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const ChunkTile ct = chunk_tile(a, BN);
  const ChunkRows cr = chunk_rows(a, ct.b, ct.g, ct.c);
  const int64_t pairs = (cr.hi - cr.lo) * a.grp, iters = (pairs + BM - 1) / BM;

  __shared__ int sT[2][BM], sH[2][BM];  // each stage's pairs: query row (-1: none) and head
  auto issue = [&](int64_t it, int stage) {  // pairs [it BM, it BM + BM) into `stage`
    for (int r = threadIdx.x; r < BM; r += kThreads) {
      const int64_t f = it * BM + r;
      float lse2 = INFINITY, delta = 0.f;  // past the last pair: P = 0
      int64_t t = -1, h = 0;
      if (f < pairs) {
        pair_of(a, cr, ct, f, t, h);
        const float lse = a.lse[a.stat(ct.b, h, t)];
        lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
        delta = a.delta[a.stat(ct.b, h, t)];
      }
      sT[stage][r] = int(t), sH[stage][r] = int(h);
      stats[stage * 2 * BM + r] = lse2, stats[stage * 2 * BM + BM + r] = delta;
    }
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
    for (int e = threadIdx.x; e < BN * (D / 8); e += kThreads) {
      const int r = e / (D / 8), c = e % (D / 8);
      const bool ok = r < ct.n;
      cp_async16(ks + swz<D>(r, c), ok ? a.k.at<const T>(ct.b, ct.j0 + r, ct.g) + c * 8 : static_cast<const T*>(a.k.data), ok);
      cp_async16(vs + swz<D>(r, c), ok ? a.v.at<const T>(ct.b, ct.j0 + r, ct.g) + c * 8 : static_cast<const T*>(a.v.data), ok);
    }
    issue(0, 0);  // iters is the block's: every thread meets issue's barrier
    cp_async_commit();
  }
  for (int64_t it = 0; it < iters; ++it) {
    const int stage = int(it & 1);
    cp_async_next_stage(it + 1 < iters, [&] { issue(it + 1, stage ^ 1); });
    __syncthreads();
    const T* qt = qs + stage * BM * D;
    const T* dot = dos + stage * BM * D;
    const float* lse2 = stats + stage * 2 * BM;
    const float* delta = lse2 + BM;

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
    // s <- P (for dV), dp <- dS = P (dP - delta) (for dK).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = mt * 8 + (lane % 4) * 2 + (e & 1);
        const float pr = exp2f(s[mt][e] * a.scale_log2 - lse2[r]);
        s[mt][e] = pr;
        dp[mt][e] = pr * (dp[mt][e] - delta[r]);
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
    __syncthreads();  // the next prefetch overwrites this stage
  }
  cp_async_wait<0>();

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
