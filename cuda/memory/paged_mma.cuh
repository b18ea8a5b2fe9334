// Paged decode attention on tensor cores (mma.sync m16n8k16): 16-bit pages, dk = dv = 64 or
// 128, 16-byte aligned rows. A block is (key split, sequence, kv head, up to 16 query rows =
// one m16 tile of the group's tokens x heads). Tiles of 64 keys stream through shared memory
// double-buffered with cp.async, gathered through the block table; each of the 4 warps owns
// 16 keys of a tile and keeps its own online softmax and output accumulator in registers (Q
// fragments loaded once), so the warps never wait on each other inside a tile; at the end
// they merge through shared memory; the splits then write partials for the combine kernel or,
// as one cluster, merge among themselves (paged_cluster_merge.cuh). Each key and value byte
// is read once per (split, kv head) and from shared memory once per warp (ldmatrix) — the
// CUDA-core kernel read each key row once per query row, which bound it at a third of the
// bandwidth.
//
// The block table is read once per tile row, two tiles ahead (TileRows), not per 16-byte copy.
//
// MKA's level 2 (kEma): a second softmax and accumulator over EMA(k), EMA(v). Where pages
// hold a multiple of 16 tokens (or the cache is contiguous) it is derived from level 1's
// scores and the same V fragments (EmaScores, paged_ema_mma.cuh: no EMA rows are built);
// other page sizes turn the tile's rows into their EMA in place, one thread per column
// (mma_tile_ema_serial), and run level 2 over them.
#pragma once
#include "memory/paged_cluster_merge.cuh"
#include "memory/paged_ema_mma.cuh"

namespace mka::cuda::paged {

// kStack (MKA, at most 8 query rows per block, pages of a multiple of 16 tokens): level 2 in
// rows 8-15 of level 1's m16 tile (EmaScores::stacked), one accumulator for both levels: the
// registers of the MHA kernel's and its blocks per SM, where two accumulators (255 registers)
// left 2 blocks per SM and MKA at ~1.9x MHA's time whatever its level 2 cost.
template <class T, int D, bool kEma, bool kStack = false>
__global__ void __launch_bounds__(kThreads, kStack ? 3 : 1) paged_attention_mma(const PagedArgs a) {
  using namespace mma;
  static_assert(kEma || !kStack, "only MKA's levels stack");
  allow_dependents();  // the combine may launch now: it waits for this grid's end
  constexpr int kLevels = kEma ? 2 : 1;                 // levels of the output
  constexpr int kRegLevels = kEma && !kStack ? 2 : 1;  // softmax states and accumulators
  extern __shared__ __align__(128) unsigned char smem_raw[];
  constexpr int kQRows = q_rows<kStack>();
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* stage0 = sQ + kQRows * D;  // [stage][K | V][kTile][D]
  __shared__ __align__(16) T qzero[8];  // Q's rows past kQRows (load_q)
  __shared__ int bad;
  __shared__ float sM[kRegLevels][kMmaWarps][16], sL[kRegLevels][kMmaWarps][16];
  __shared__ float rowM[kRegLevels][16], rowL[kRegLevels][16];
  __shared__ int2 sRows[2][kTile];  // TileRows of the two stages
  using Ema = EmaScores<T, D>;
  __shared__ std::conditional_t<kEma, typename Ema::Shared, char> esh;  // level 2's chains
  __shared__ RowMask mask;

  const BlockKeys bk = block_keys<kEma>(a);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Level 2 from level 1's scores needs every 16-row segment inside one page (EmaScores).
  const bool ema_tc = kStack || (kEma && (!a.table || a.S % 16 == 0));  // kStack: checked by the host
  if (threadIdx.x == 0) bad = bk.bad;
  if (kStack && threadIdx.x < 8) qzero[threadIdx.x] = from_f<T>(0.f);  // read by load_q past 8 rows
  if constexpr (kStack) mask.init_stacked(a, bk);  // read after the next barrier
  else mask.init(a, bk);
  // Q rows (zeros past R) into a swizzled tile.
  for (int e = threadIdx.x; e < kQRows * (D / 8); e += kThreads) {
    const int r = e / (D / 8), c = e % (D / 8);
    const bool in = r < bk.R;
    const int f = bk.f0 + (in ? r : 0), i = f / a.grp, h = bk.g * a.grp + f % a.grp;
    const T* src = static_cast<const T*>(a.q) + bk.b * a.qs[0] + i * a.qs[1] + h * a.qs[2] + c * 8;
    cp_async16(sQ + swz<D>(r, c), src, in);
  }
  const int64_t t_begin = bk.lo / kTile, t_end = bk.hi > bk.lo ? ceil_div(bk.hi, kTile) : t_begin;
  auto slot = [&](int64_t t) { return int(t - t_begin) & 1; };
  auto stage = [&](int64_t t) { return stage0 + slot(t) * 2 * kTile * D; };
  float* sC = reinterpret_cast<float*>(stage0 + 2 * 2 * kTile * D);  // [k | v][D]
  auto issue = [&](int64_t t) { mma_issue_tile<T, D>(a, bk, stage(t), stage(t) + kTile * D, sRows[slot(t)]); };
  __syncthreads();  // bad's first value before the lookups may set it
  if (threadIdx.x < kTile)
    for (int64_t t = t_begin; t < t_end && t < t_begin + 2; ++t) {
      TileRows tr;
      tr.get(a, bk, t * kTile);
      tr.put(a, sRows[slot(t)], &bad);
    }
  __syncthreads();
  if (t_begin < t_end) {
    issue(t_begin);
    if (kEma && ema_tc) mma_issue_ckpts<D>(a, bk, sC, sRows[slot(t_begin)]);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  unsigned qa[D / 16][4];  // MHA: Q's fragments stay in registers
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    if constexpr (!kEma) load_a<D>(qa[kk], sQ, 0, kk);
  (void)qa;

  WarpSoftmax<D> lv[kRegLevels];
#pragma unroll
  for (int l = 0; l < kRegLevels; ++l) lv[l].init();
  float est[2 * D / kThreads] = {};
  Ema ema;
  if constexpr (kEma)
    if (ema_tc) ema.init(a.beta, esh);

  for (int64_t t = t_begin; t < t_end; ++t) {
    TileRows ahead;  // tile t + 2: loaded now, stored where tile t's rows were at the end
    const bool look = threadIdx.x < kTile && t + 2 < t_end;
    if (look) ahead.get(a, bk, (t + 2) * kTile);
    cp_async_next_stage(t + 1 < t_end, [&] { issue(t + 1); });
    __syncthreads();
    T* sK = stage(t);
    T* sV = sK + kTile * D;
    const int64_t j0 = t * kTile;
    const int k0 = 16 * warp;
    float s1[2][4] = {};  // this warp's 16 keys' scores, scaled (base 2)
    if constexpr (kEma)  // Q's registers go to level 2
      warp_scores_by<T, D>(s1, [&](unsigned (&f)[4], int kk) { load_q<D, kQRows>(f, sQ, qzero, kk); }, sK, k0);
    else
      warp_scores<T, D>(s1, qa, sK, k0);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s1[nt][c] *= a.scale_log2;
    if (!kStack && j0 + kTile > bk.lo1) {  // level 1: within the window
      float p[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) p[nt][c] = s1[nt][c];
      softmax_step<D>(p, j0, k0, mask, 0, lv[0]);
      warp_times_rows<T, D>(lv[0].o, p, sV, k0);
    }
    if constexpr (kEma) {
      const int2* rows = sRows[slot(t)];
      if (ema_tc) {
        const unsigned starts = t == t_begin ? 1u : 0u;  // the split's first page (see EmaScores)
        float z[2][4];
        ema.template scores_local<kQRows>(z, s1, sQ, qzero, sC, starts, a.scale_log2, esh);
        ema.values_chain(sV, sC, starts, esh);
        __syncthreads();  // the segments' local sums are published
        if constexpr (kStack) ema.stacked(s1, z, sV, starts, j0, mask, esh, lv[0]);
        else ema.level2(z, sV, starts, j0, mask, esh, lv[kRegLevels - 1]);
      } else {
        __syncthreads();  // level 1 has read the rows
        mma_tile_ema_serial<T, D>(a, bk, sK, sV, rows, j0, est);
        __syncthreads();
        tile_level<T, D>(a, sQ, sK, sV, j0, mask, 1, lv[kRegLevels - 1]);
      }
    }
    if (look) ahead.put(a, sRows[slot(t)], &bad);
    __syncthreads();  // the stage and its rows are refilled next iteration
  }

  // Merge the warps (mma/warp_keys.cuh): per row the max over warps, each warp's share rescaled
  // to it and summed in a fixed order, level by level through sW.
  float* sO = reinterpret_cast<float*>(stage0);  // [level][16][D]
  float* sW = sO + kRegLevels * 16 * D;           // [warp][16][D], one level at a time
  static_assert((kRegLevels + kMmaWarps) * 16 * D * 4 <= 2 * 2 * kTile * D * sizeof(T),
                "the merge fits in the stages");
  if (lane % 4 == 0)
#pragma unroll
    for (int l = 0; l < kRegLevels; ++l)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        sM[l][warp][lane / 4 + 8 * hr] = lv[l].m[hr];
        sL[l][warp][lane / 4 + 8 * hr] = lv[l].l[hr];
      }
  __syncthreads();
  if (threadIdx.x < kRegLevels * 16) {
    const int l = threadIdx.x / 16, r = threadIdx.x % 16;
    merge_stats<kMmaWarps>(sM[l], sL[l], r, rowM[l][r], rowL[l][r]);
  }
  __syncthreads();
#pragma unroll
  for (int l = 0; l < kRegLevels; ++l) {
    float f[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
      f[hr] = lv[l].l[hr] > 0.f ? exp2f(lv[l].m[hr] - rowM[l][lane / 4 + 8 * hr]) : 0.f;
    merge_warps<kMmaWarps, D>(sW, lv[l].o, f, [&](int r, int x, float sum) { sO[(l * 16 + r) * D + x] = sum; });
  }

  // Level l of query row r: merged row (l, r), or row r + 8 l of the stacked tile.
  auto at = [](int l, int r) { return kStack ? r + 8 * l : l * 16 + r; };
  const float* mM = &rowM[0][0];
  const float* mL = &rowL[0][0];
  static_assert(kLevels * 16 * kMaxCluster * 5 <= kMmaWarps * 16 * D * 4, "the weights fit in sW");
  if (a.cluster) return cluster_merge<T, D, kLevels>(a, bk, sO, mM, mL, &bad, at, sW);
  const float nan = __int_as_float(0x7fc00000);
  for (int e = threadIdx.x; e < bk.R * D; e += kThreads) {
    const int r = e / D, x = e % D;
    const int f = bk.f0 + r, i = f / a.grp, h = bk.g * a.grp + f % a.grp;
    if (a.splits > 1) {
      float* part = a.ws + ((((int64_t(bk.split) * a.B + bk.b) * a.T + i) * a.H + h) * kLevels) * (D + 2);
#pragma unroll
      for (int l = 0; l < kLevels; ++l, part += D + 2) {
        part[x] = bad ? nan : sO[at(l, r) * D + x];
        if (x == 0) part[D] = mM[at(l, r)], part[D + 1] = bad ? nan : mL[at(l, r)];
      }
      continue;
    }
    float o = 0.f;
#pragma unroll
    for (int l = 0; l < kLevels; ++l) {
      const float L = mL[at(l, r)];
      const float w = level_weight(a, kEma ? 2 : 1, l, bk.b, i);
      if (L > 0.f) o += sO[at(l, r) * D + x] * (w / L);
    }
    static_cast<T*>(a.out)[bk.b * a.os[0] + i * a.os[1] + h * a.os[2] + x] = from_f<T>(bad ? nan : o);
    if (a.lse && x == 0) {
      const float L = mL[at(0, r)];
      a.lse[(int64_t(bk.b) * a.H + h) * a.T + i] =
          bad ? nan : (L > 0.f ? (mM[at(0, r)] + log2f(L)) / kLog2e : -INFINITY);
    }
  }
}

}  // namespace mka::cuda::paged
