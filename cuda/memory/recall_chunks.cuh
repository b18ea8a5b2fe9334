// Chunk-major recall on tensor cores (mma.sync m16n8k16): 16-bit inputs, d = 64 or 128,
// 16-byte aligned rows. The default path of the tensor-core case (recall_attention.cu says
// when the row-major kernels of recall_mma.cuh run instead, and why).
//
// Forward: every valid chosen entry is a key of the inverse index (recall_params.cuh), so the
// entries that chose a chunk are one run of the sorted keys. A block takes a stripe of
// consecutive sorted entries (~1024 (entry, query head) pairs: a long run is split over
// several blocks, so the early chunks that many rows recall do not make a tail) and, per
// chunk its stripe meets, holds one key tile of the chunk (up to 128 keys; its K and V read
// once per stripe, the stripes of one run mostly from L2) in shared memory and walks the
// (entry, query head) pairs 64 at a time, Q gathered by cp.async, double-buffered, the sorted
// keys a step ahead (PairKey). Each warp owns 16 pairs and all the tile's keys: S = Q K^T, its
// own softmax (no merge across warps), O = P V, written as the pair's partial — O normalised
// by its own sum, in float32, with one base-2 log-sum-exp — at (row, head, entry r, key tile).
// recall_merge_partials then combines a row's partials in a fixed order (deterministic).
// A chunk chosen twice by a row is two entries, two equal partials: it counts twice.
//
// The partials of all (b, kv head) units would be Tq·H·R·(d + 1) floats (8.7 GB at B = 1,
// Tq = 64k, H = 32, R = 8, d = 128); the launcher runs slabs of whole units within a budget.
#pragma once
#include "memory/recall_mma.cuh"

namespace mka::cuda::recall {

constexpr int kFwdPairs = kPairs;   // (entry, head) pairs per step: 4 warps x 16 M rows
constexpr int kFwdMaxKeys = 128;    // keys per block tile: up to two 64-key sub-tiles
constexpr int kStripePairs = 1024;  // pairs a forward block takes (its stripe)

template <int D> constexpr size_t fwd_chunks_smem(int64_t tile_keys) {
  // K and V of the tile (64-key sub-tiles), Q in two stages.
  return size_t(2 * 64 * ((tile_keys + 63) / 64) * D + 2 * kFwdPairs * D) * 2;
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads, 2) recall_fwd_chunks(const Args a) {
  using namespace mma;
  constexpr int BM = kFwdPairs;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int nsub = int((a.tile_keys + 63) / 64);
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + nsub * 64 * D;
  T* qs = vs + nsub * 64 * D;  // [2][BM][D]
  // Each stage's pairs: query row (-1: none), query head, and where the partial goes.
  __shared__ int sT[2][BM], sH[2][BM];
  __shared__ int64_t sPart[2][BM];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kt = int(blockIdx.x % a.kts);
  // The slab's entries are sorted keys [slab_lo, slab_hi); this block's stripe is [lo, hi).
  const int64_t slab_lo = a.run_starts[a.bg0 * a.nC], slab_hi = a.run_starts[a.bg1 * a.nC];
  const int64_t lo = slab_lo + int64_t(blockIdx.x / a.kts) * a.stripe;
  const int64_t hi = min(slab_hi, lo + a.stripe);

  // Segments: the stripe's entries of one chunk each.
  for (int64_t seg = lo; seg < hi;) {
    const int64_t u = a.key_unit(a.sorted[seg]);  // (b G + g) nC + c
    const int64_t end = min(hi, a.run_starts[u + 1]);
    const int64_t bg = u / a.nC, c = u % a.nC, b = bg / a.G, g = bg % a.G;
    const int64_t j0 = c * a.C + kt * a.tile_keys;  // keys [j0, j0 + n) of kv head g
    const int n = int(min(a.tile_keys, a.C - kt * a.tile_keys));
    const int64_t pairs = (end - seg) * a.grp, iters = (pairs + BM - 1) / BM;
    const uint32_t first = uint32_t(a.unit_key(u));

    PairKey pk;
    auto issue = [&](int64_t it, int stage) {  // pairs [it BM, it BM + BM) into `stage`
      if (threadIdx.x < BM) {
        const int r = threadIdx.x;
        const int64_t f = it * BM + r;
        int64_t t = -1, e = 0, h = 0, part = -1;
        if (f < pairs) {
          a.key_row(pk.key, first, t, e);
          const int64_t hh = f - int64_t(a.fgrp.div(uint32_t(f))) * a.grp;
          h = g * a.grp + hh;
          part = a.part_index(bg, t, hh, e * a.kts + kt);
        }
        sT[stage][r] = int(t), sH[stage][r] = int(h), sPart[stage][r] = part;
      }
      pk.load(a, seg, pairs, it + 1);
      __syncthreads();
      T* qt = qs + stage * BM * D;
      for (int e = threadIdx.x; e < BM * (D / 8); e += kThreads) {
        const int r = e / (D / 8), cc = e % (D / 8), t = sT[stage][r];
        const bool ok = t >= 0;
        cp_async16(qt + swz<D>(r, cc),
                   ok ? a.q.at<const T>(b, t, sH[stage][r]) + cc * 8 : static_cast<const T*>(a.q.data), ok);
      }
    };

    __syncthreads();  // the previous segment's tiles and stages are consumed
    for (int sub = 0; sub < nsub; ++sub) {  // zero rows past n: P V reads them with P = 0
      load_tile<64, D, kThreads>(ks + sub * 64 * D, a.k, b, j0 + 64 * sub, j0 + n, g);
      load_tile<64, D, kThreads>(vs + sub * 64 * D, a.v, b, j0 + 64 * sub, j0 + n, g);
    }
    pk.load(a, seg, pairs, 0);
    pair_steps(iters, issue, [&](int64_t, int stage) {
      const T* qt = qs + stage * BM * D;
      WarpSoftmax<D> st;  // rows: pairs warp 16 + lane/4 (+ 8)
      st.init();
      for (int k0 = 0; k0 < n; k0 += 64) {  // the tile's 64-key sub-tiles
        float sc[8][4] = {};
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          unsigned qa[4];
          load_a<D>(qa, qt, warp * 16, kk);
#pragma unroll
          for (int np = 0; np < 4; ++np) {
            if (k0 + 16 * np >= n) continue;  // keys past the tile: masked below
            unsigned kb[4];
            load_b<D>(kb, ks, k0 + 16 * np, kk);
            mma16816<T>(sc[2 * np], qa, kb[0], kb[1]);
            mma16816<T>(sc[2 * np + 1], qa, kb[2], kb[3]);
          }
        }
        // sc[nt][e]: pair lane/4 + 8 (e >> 1), key k0 + 8 nt + 2 (lane % 4) + (e & 1).
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float& x = sc[nt][e];
            x = k0 + 8 * nt + 2 * (lane % 4) + (e & 1) < n ? x * a.scale_log2 : -INFINITY;
            mx[e >> 1] = fmaxf(mx[e >> 1], x);
          }
        st.update(sc, mx);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          if (k0 + 16 * kk >= n) continue;
          unsigned pa[4];
          acc_to_a<T>(pa, sc, kk);
          warp_times_rows<T, D>(st.o, pa, vs, k0 + 16 * kk);
        }
      }
      // The partials: O / l and m + log2 l (no keys with a finite score: 0 and -inf; a NaN
      // sum spreads).
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int64_t part = sPart[stage][warp * 16 + lane / 4 + 8 * hr];
        if (part < 0) continue;
        const float l = st.l[hr], inv = l != 0.f ? 1.f / l : 0.f;
        float* row = a.part + part * D + 2 * (lane % 4);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
          *reinterpret_cast<float2*>(row + 8 * dt) = make_float2(st.o[dt][2 * hr] * inv, st.o[dt][2 * hr + 1] * inv);
        if (lane % 4 == 0) a.part_lse[part] = l != 0.f ? st.m[hr] + log2f(l) : -INFINITY;
      }
    });
    seg = end;
  }
}

// --- merging a row's partials ---------------------------------------------------------
constexpr int kMergeWarps = kThreads / 32;  // a warp per (row, query head)

// A warp per (b, t, query head) of the slab's units merges the row's R·kts partials in the
// order of p = r kts + kt, D / 32 columns per lane. kSoftmax (the forward's combine): weights
// exp2(lse_p - max) — the paged decode's split combine (paged_attention.cu) for a handful of
// splits — into out (input dtype) and lse (natural log); a row with no chunk gets zeros and
// -inf. Else (dq): the plain sum of the dQ partials. Entries -1 have no partial; a row with
// an invalid entry (neither -1 nor a chunk below nC) gets NaN, as in the row-major kernels.
template <class T, int D, bool kSoftmax>
__global__ void __launch_bounds__(kThreads) recall_merge_partials(const Args a) {
  constexpr int V = D / 32;
  static_assert(V == 2 || V == 4, "d = 64 or 128");
  const int lane = threadIdx.x % 32;
  const int64_t w = int64_t(blockIdx.x) * kMergeWarps + threadIdx.x / 32;
  if (w >= (a.bg1 - a.bg0) * a.Tq * a.grp) return;  // whole warps
  const int64_t hh = w % a.grp, row = w / a.grp, bg = a.bg0 + row / a.Tq, t = row % a.Tq;
  const int64_t b = bg / a.G, g = bg % a.G, h = g * a.grp + hh;
  const int64_t P = a.R * a.kts, base = a.part_index(bg, t, hh, 0);
  const float* lse2 = kSoftmax ? a.part_lse + base : nullptr;
  const float* part = a.part + base * D + lane * V;
  // Whether partial p exists (its entry is a valid chunk); marks the row bad for an invalid one.
  auto exists = [&](int64_t p, bool& bad) {
    const int32_t c = a.chosen_at(b, t, g, p / a.kts);
    bad = bad || (c != -1 && (c < 0 || c >= a.nC));
    return c >= 0 && c < a.nC;
  };

  // Pass 1, a partial per lane: bad entries and (kSoftmax) the max.
  bool bad = false;
  float M = -INFINITY;
  for (int64_t p = lane; p < P; p += 32)
    if (exists(p, bad) && kSoftmax) M = fmaxf(M, lse2[p]);
  bad = __any_sync(0xffffffffu, bad);
  if constexpr (kSoftmax) M = warp_max(M);

  // Pass 2: lane j's weight of partial p0 + j, then the values in order of p, four loads in
  // flight. A weight of 0 (no partial, no keys, or underflow) skips the load; NaN spreads.
  float L = 0.f, acc[V] = {};
  for (int64_t p0 = 0; p0 < P; p0 += 32) {
    float wp = 0.f;
    bool unused = false;
    if (p0 + lane < P && exists(p0 + lane, unused)) {
      if constexpr (kSoftmax) wp = lse2[p0 + lane] == -INFINITY ? 0.f : exp2f(lse2[p0 + lane] - M);
      else wp = 1.f;
    }
    if constexpr (kSoftmax) L += warp_sum(wp);
    const int n = int(min(int64_t(32), P - p0));
    for (int j0 = 0; j0 < n; j0 += 4) {
      float wj[4], x[4][V];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wj[i] = __shfl_sync(0xffffffffu, wp, (j0 + i) & 31);
        if (j0 + i >= n) wj[i] = 0.f;
        const float* src = part + (p0 + j0 + i) * D;
        if constexpr (V == 4) {
          const float4 f = wj[i] != 0.f ? *reinterpret_cast<const float4*>(src) : make_float4(0.f, 0.f, 0.f, 0.f);
          x[i][0] = f.x, x[i][1] = f.y, x[i][2] = f.z, x[i][3] = f.w;
        } else {
          const float2 f = wj[i] != 0.f ? *reinterpret_cast<const float2*>(src) : make_float2(0.f, 0.f);
          x[i][0] = f.x, x[i][1] = f.y;
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += wj[i] == 0.f ? 0.f : wj[i] * x[i][v];
    }
  }

  const float f = bad ? qnan() : kSoftmax ? (L != 0.f ? 1.f / L : 0.f) : 1.f;
  T* dst = (kSoftmax ? a.out : a.dq).at<T>(b, t, h) + lane * V;
  if constexpr (V == 4)
    *reinterpret_cast<uint2*>(dst) = make_uint2(mma::pack2<T>(acc[0] * f, acc[1] * f),
                                                mma::pack2<T>(acc[2] * f, acc[3] * f));
  else
    *reinterpret_cast<unsigned*>(dst) = mma::pack2<T>(acc[0] * f, acc[1] * f);
  if (kSoftmax && lane == 0)
    a.lse[a.stat(b, h, t)] = bad ? qnan() : (L != 0.f ? (M + log2f(L)) / kLog2e : -INFINITY);
}

}  // namespace mka::cuda::recall
