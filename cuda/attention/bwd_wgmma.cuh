// Attention backward for Hopper (sm_90a) on warpgroup MMA; the scheme of the mma.sync
// backward (bwd_mma.cuh) with wider tiles. A block owns kWgBwdBlockN = 128 keys
// of one (batch, kv head), two warpgroups of 64 keys, and loops over the GQA group's query
// heads and the 64-row query blocks that see its keys; dK and dV stay in registers and are
// written once (deterministic). Per query block each warpgroup computes
//   S^T = K Q^T, dP^T = V dO^T                 (A and B from shared memory)
//   dV += (w P)^T dO, dK += dS^T Q             (A from registers, B = dO, Q read N-major)
// with dS = w P (dP - delta); dS^T goes to shared memory and each warpgroup then computes
// half of the columns of dQ = dS K (A read M-major) for float32 atomics. kDrop: attention
// dropout (SPEC §3.5), as in the mma.sync backward: w P Z for dV, dS = w P (Z dP - delta).
#pragma once
#include "attention/bwd_rows.cuh"
#include "attention/dropout.cuh"
#include "attention/params.cuh"
#include "mma/wgmma.cuh"

#include <type_traits>

namespace mka::cuda {

constexpr int kWgBwdBlockN = 128, kWgBwdBlockM = 64, kWgBwdThreads = 256;

template <int D> constexpr int wg_bwd_smem_bytes() {
  constexpr int BN = kWgBwdBlockN, BM = kWgBwdBlockM;
  // K, V; Q and dO in two stages; dS^T; lse, delta, w in two stages (float); alignment.
  return (2 * BN * D + 2 * 2 * BM * D + BN * BM) * 2 + 2 * 3 * BM * 4 + 1024;
}
// With ScanThrough's dlam, after those: the block's scan inputs x (k, v rows, staged while
// the main loop runs) and its dlam sums per key and level (float).
template <int D> constexpr int wg_bwd_dlam_smem_bytes() {
  return 2 * kWgBwdBlockN * D * 2 + 2 * kWgBwdBlockN * 4;
}

// Pieces of a query block's step that the lockstep kernel and the warp-specialised one
// (bwd_wgmma_ws.cuh) share, for a warpgroup's 64 keys and a 64-row query block.

// A backward block: keys [j0, j_last] of kv head g in batch b, and the query blocks that see
// them, iterated over the group's query heads: iteration it is rows [(mb0 + it % nq) BM, + BM)
// of query head g * group + it / nq.
template <int BN, int BM> struct WgBwdBlock {
  int64_t g, b, j0, j_last, q_hi, mb0, nq, iters;
  __device__ __forceinline__ explicit WgBwdBlock(const AttnParams& p)
      : g(blockIdx.y), b(blockIdx.z), j0(int64_t(blockIdx.x) * BN), j_last(min(p.Tk, j0 + BN) - 1),
        q_hi(min(p.Tq, p.query_hi(j_last))), mb0(p.query_lo(j0) / BM),
        nq(q_hi > p.query_lo(j0) ? ceil_div(q_hi, BM) - mb0 : 0), iters(nq * p.group) {}
};

// Step kk (16 of the d columns) of S^T = K Q^T or dP^T = V dO^T: A = the warpgroup's 64 key
// rows xw in panel 0 of a BN-row tile, B = the BM-row query tile yt, both K-major.
template <class T, int BN, int BM>
__device__ __forceinline__ void wg_bwd_scores_step(float (&acc)[BM / 8 * 4], const T* xw,
                                                   const T* yt, int kk) {
  const int off_x = (kk / 4) * BN * 64 + (kk % 4) * 16, off_y = (kk / 4) * BM * 64 + (kk % 4) * 16;
  wgmma::Mma<T, BM>::template ss<0, 0>(acc, wgmma::desc_k(xw + off_x), wgmma::desc_k(yt + off_y), kk > 0);
}

// Dropout's keep bits of a warp's 16 key rows (from key j) against query rows i0 + 8 mt + ...:
// bit 4 mt + e for s[mt][e], the layout DropKeep::frag_key_rows reads (two words for 128 query
// rows); 0 without dropout.
template <int MT> using WgKeepBits = std::conditional_t<(MT > 8), uint64_t, unsigned>;
template <bool kDrop, int MT>
__device__ __forceinline__ WgKeepBits<MT> wg_bwd_keep(const DropKeep& drop, uint64_t bh,
                                                      int64_t i0, int64_t j) {
  WgKeepBits<MT> keep = 0;
  if constexpr (kDrop)
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      keep |= WgKeepBits<MT>(drop.frag_key_rows(bh, i0 + mt * 8, j)) << (4 * mt);
  return keep;
}

// Whether every (query row, key) of query rows [i0, i0 + BM) and keys [wj0, wj_last] is inside
// the band and the sequences (no per-element mask), and whether query row i sees key j.
template <int BM>
__device__ __forceinline__ bool wg_bwd_full_tile(const AttnParams& p, int64_t i0, int64_t q_hi,
                                                 int64_t wj0, int64_t wj_last) {
  return i0 >= p.query_lo(wj_last) && i0 + BM <= q_hi && wj0 + 63 < p.Tk && i0 + BM <= p.query_hi(wj0);
}
// The query rows i0 + r that see a thread's accumulator keys kr0 (k = 0) and kr0 + 8 (k = 1):
// rlo[k] <= r < rhi[k], from query_lo(j) <= i < query_hi(j) (AttnParams; which also bounds i
// by Tq; no row past Tk), clamped to [0, BM]. Made once per tile that crosses a band edge, so
// its elements test a 32-bit row offset against two bounds instead of working out their query
// row's 64-bit key bounds each. 32-bit positions: the launcher takes these kernels only for
// Tq + Tk < 2^30 (in 64-bit the d = 128 dropout kernels spilled).
template <int BM>
__device__ __forceinline__ void wg_bwd_key_band(const AttnParams& p, int64_t kr0, int64_t i0,
                                                int (&rlo)[2], int (&rhi)[2]) {
  const int shift = int(p.Tk - p.Tq), tq = int(p.Tq), tk = int(p.Tk);
  const int window = p.window > 0 ? int(min(p.window, p.Tq + p.Tk)) : 0;  // wider: no effect
  #pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int j = int(kr0) + k * 8;
    const int lo = p.causal ? max(0, j - shift) : 0;
    const int hi = j >= tk ? 0 : window > 0 ? min(tq, j - shift + window) : tq;
    rlo[k] = min(max(lo - int(i0), 0), BM);
    rhi[k] = min(max(hi - int(i0), 0), BM);
  }
}

// s = w P and dp = dS packed as A operands (16 query rows per kk) for dV's and dK's products.
template <class T, int BM> struct WgBwdPacked {
  unsigned pa[BM / 16][4], da[BM / 16][4];
  __device__ __forceinline__ WgBwdPacked(const float (&s)[BM / 8][4], const float (&dp)[BM / 8][4]) {
    #pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      mma::acc_to_a<T>(pa[kk], s, kk);
      mma::acc_to_a<T>(da[kk], dp, kk);
    }
  }
};

// dV += (w P)^T dO and dK += dS^T Q (A from registers; dO and Q read N-major), issued as one
// wgmma group.
template <class T, int D, int BM>
__device__ __forceinline__ void wg_bwd_issue_dvdk(float (&dv)[D / 8 * 4], float (&dk)[D / 8 * 4],
                                                  const WgBwdPacked<T, BM>& a, const T* qt,
                                                  const T* dot) {
  wgmma::fence();
  #pragma unroll
  for (int kk = 0; kk < BM / 16; ++kk) {  // reduce over 16 query rows per product
    wgmma::Mma<T, D>::template rs<1>(dv, a.pa[kk], wgmma::desc_mn(dot + kk * 16 * 64, BM * 128), 1);
    wgmma::Mma<T, D>::template rs<1>(dk, a.da[kk], wgmma::desc_mn(qt + kk * 16 * 64, BM * 128), 1);
  }
  wgmma::commit();
}

// dS^T into shared memory (keys as rows, 64 query columns per swizzled panel) from its packed
// A operands: this thread's accumulator rows `row` and row + 8 (the m16n8 layout), query
// columns 16 kk + 8 h + 2 (lane % 4) of da[kk][2 h] (row) and da[kk][2 h + 1] (row + 8).
template <class T, int BN, int BM>
__device__ __forceinline__ void wg_bwd_store_ds(T* dst, const WgBwdPacked<T, BM>& a, int row, int lane) {
  #pragma unroll
  for (int mt = 0; mt < BM / 8; ++mt) {
    const int c = (lane % 4) * 2, kk = mt / 2, h = mt % 2;
    *reinterpret_cast<unsigned*>(dst + wgmma::sw128<BN>(row, mt) + c) = a.da[kk][2 * h];
    *reinterpret_cast<unsigned*>(dst + wgmma::sw128<BN>(row + 8, mt) + c) = a.da[kk][2 * h + 1];
  }
}

// dQ = dS K (A = dS^T read M-major, B = K read N-major), a 64 x 64 tile per warpgroup: with
// d = 128 warpgroup wg takes column panel wg over all keys; with d = 64 and BM = 128 it takes
// row panel wg (query rows 64 wg ...) over all keys; with d = 64 and BM = 64 its own 64 keys,
// and both warpgroups add. Issued as one group, then every group of the block's step is
// waited for (dV's and dK's too) and the accumulators pinned. Returns dq's first column (x)
// and first row in the query block (y).
template <class T, int D, int BN, int BM = 64>
__device__ __forceinline__ int2 wg_bwd_dq(float (&dq)[8][4], const T* dst, const T* ks, int wg,
                                          float (&dk)[D / 8 * 4], float (&dv)[D / 8 * 4]) {
  constexpr bool kSplitCols = D == 128, kSplitRows = BM == 128;
  static_assert(!(kSplitCols && kSplitRows), "d = 128 takes 64 query rows");
  const int col0 = kSplitCols ? wg * 64 : 0, row0 = kSplitRows ? wg * 64 : 0;
  const int key0 = kSplitCols || kSplitRows ? 0 : wg * 64;
  auto& dq_flat = reinterpret_cast<float(&)[32]>(dq);
  wgmma::fence();
  #pragma unroll
  for (int kk = 0; kk < (kSplitCols || kSplitRows ? BN : 64) / 16; ++kk) {  // 16 keys per product
    const int key = key0 + kk * 16;
    wgmma::Mma<T, 64>::template ss<1, 1>(dq_flat, wgmma::desc_mn(dst + (row0 / 64) * BN * 64 + key * 64, BN * 128),
                                         wgmma::desc_mn(ks + (col0 / 64) * BN * 64 + key * 64, BN * 128),
                                         kk > 0);
  }
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_regs(dq_flat);
  wgmma::fence_regs(dk);
  wgmma::fence_regs(dv);
  return make_int2(col0, row0);
}

// This thread's dQ rows (times the scale) added to the float32 accumulator by float2 atomics
// (sm_90: a template, instantiated only by the sm_90a kernels).
template <int DT>
__device__ __forceinline__ void wg_bwd_add_dq(const AttnParams& p, const float (&dq)[DT][4],
                                              int64_t b, int64_t h, int64_t i0, int col0,
                                              int warp, int lane) {
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = i0 + warp * 16 + lane / 4 + r * 8;
    if (i >= p.Tq) continue;
    float* row = p.dq.at<float>(b, i, h) + col0;
    #pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int c = dt * 8 + (lane % 4) * 2;
      atomicAdd(reinterpret_cast<float2*>(row + c),
                make_float2(dq[dt][2 * r] * p.scale, dq[dt][2 * r + 1] * p.scale));
    }
  }
}

template <class T, int D, bool kDrop = false>
__global__ void __launch_bounds__(kWgBwdThreads, 1) attention_bwd_wgmma(AttnParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace mma;
  constexpr int BN = kWgBwdBlockN, BM = kWgBwdBlockM, KS = D / 16, DT = D / 8, MT = BM / 8;
  static_assert((D == 64 || D == 128) && BM == 64, "one 128-byte panel of dS^T per key row");
  extern __shared__ unsigned char smem_raw[];
  const unsigned pad = (1024u - unsigned(__cvta_generic_to_shared(smem_raw)) % 1024u) % 1024u;
  T* ks = reinterpret_cast<T*>(smem_raw + pad);  // BN x D
  T* vs = ks + BN * D;                            // BN x D
  T* qs = vs + BN * D;                            // [2][BM x D]
  T* dos = qs + 2 * BM * D;                       // [2][BM x D]
  T* dst = dos + 2 * BM * D;                      // dS^T: BN x BM (one panel)
  float* stats = reinterpret_cast<float*>(dst + BN * BM);  // [2][3][BM]: lse2, delta, w

  const int wg = wgmma::warpgroup(), warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const WgBwdBlock<BN, BM> blk(p);
  const int64_t g = blk.g, b = blk.b, j0 = blk.j0, j_last = blk.j_last, q_hi = blk.q_hi;
  const int64_t mb0 = blk.mb0, nq = blk.nq, iters = blk.iters;
  // This warpgroup's keys [wj0, wj_last] and this thread's accumulator rows kr0, kr0 + 8.
  const int64_t wj0 = j0 + wg * 64, wj_last = min(j_last, wj0 + 63);
  const int64_t kr0 = wj0 + warp * 16 + lane / 4;
  const float sl2 = p.scale * 1.4426950408889634f;
  const DropKeep drop(p.dropout);  // read only where kDrop

  auto issue = [&](int64_t it, int stage) {  // prefetch query block `it` into `stage`
    const int64_t h = g * p.group + it / nq, i0 = (mb0 + it % nq) * BM;
    wgmma::load_tile<BM, D, kWgBwdThreads>(qs + stage * BM * D, p.q, b, i0, p.Tq, h);
    wgmma::load_tile<BM, D, kWgBwdThreads>(dos + stage * BM * D, p.dout, b, i0, p.Tq, h);
    load_row_stats<BM, kWgBwdThreads>(stats + stage * 3 * BM, p, b, h, i0);
  };

  wgmma::load_tile<BN, D, kWgBwdThreads>(ks, p.k, b, j0, p.Tk, g);
  wgmma::load_tile<BN, D, kWgBwdThreads>(vs, p.v, b, j0, p.Tk, g);
  if (iters > 0) issue(0, 0);
  cp_async_commit();

  const KeyWeights key_w = key_weights<true>(p, b, j0);  // its latency hides behind the loop
  // ScanThrough's dlam: x staged behind the first tiles, for the write-out.
  constexpr int kDlamAt = wg_bwd_smem_bytes<D>() - 1024;  // after the main loop's buffers
  if (p.scan.dlam)
    scan_dlam_stage<T, D, BN, kWgBwdThreads>(p, smem_raw + pad + kDlamAt, b, g, j0, iters);
  float dk[DT][4] = {}, dv[DT][4] = {};
  auto& dk_flat = reinterpret_cast<float(&)[DT * 4]>(dk);
  auto& dv_flat = reinterpret_cast<float(&)[DT * 4]>(dv);
  const T* kw = ks + wg * 64 * 64;  // this warpgroup's 64 key rows in panel 0
  const T* vw = vs + wg * 64 * 64;

  for (int64_t it = 0; it < iters; ++it) {
    const int stage = int(it & 1);
    const int64_t h = g * p.group + it / nq, i0 = (mb0 + it % nq) * BM;
    cp_async_next_stage(it + 1 < iters, [&] { issue(it + 1, stage ^ 1); });
    wgmma::fence_async_smem();
    __syncthreads();
    const T* qt = qs + stage * BM * D;
    const T* dot = dos + stage * BM * D;
    const float* lse2 = stats + stage * 3 * BM;
    const float* delta = lse2 + BM;
    const float* wr = lse2 + 2 * BM;

    float s[MT][4] = {}, dp[MT][4] = {};
    auto& s_flat = reinterpret_cast<float(&)[MT * 4]>(s);
    auto& dp_flat = reinterpret_cast<float(&)[MT * 4]>(dp);
    wgmma::fence();
    #pragma unroll
    for (int kk = 0; kk < KS; ++kk) {  // reduce over d: 16 columns per product
      wg_bwd_scores_step<T, BN, BM>(s_flat, kw, qt, kk);
      wg_bwd_scores_step<T, BN, BM>(dp_flat, vw, dot, kk);
    }
    wgmma::commit();
    // Dropout's keep bits while the products run (per warp the accumulators are MT m16n8
    // fragments of the warp's 16 key rows and query columns i0 + 8 mt + ...).
    const unsigned keep = wg_bwd_keep<kDrop, MT>(drop, uint64_t(b * p.H + h), i0, wj0 + warp * 16);
    wgmma::wait<0>();
    wgmma::fence_regs(s_flat);
    wgmma::fence_regs(dp_flat);

    // s <- w P (for dV), dp <- dS = w P (dP - delta) (for dK and dQ); with dropout w P Z and
    // w P (Z dP - delta).
    const bool full = wg_bwd_full_tile<BM>(p, i0, q_hi, wj0, wj_last);
    auto ds = [&](auto masked) {  // the per-element mask only on tiles that cross a band edge
      int rlo[2], rhi[2];
      if constexpr (decltype(masked)::value) wg_bwd_key_band<BM>(p, kr0, i0, rlo, rhi);
      #pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = mt * 8 + (lane % 4) * 2 + (e & 1);
          float pr = wgmma::ex2(s[mt][e] * sl2 - lse2[r]);
          if constexpr (decltype(masked)::value)
            if (r < rlo[e >> 1] || r >= rhi[e >> 1]) pr = 0.f;
          const float pw = wr[r] * pr;
          if constexpr (kDrop) {
            const unsigned kb = keep >> (4 * mt);
            s[mt][e] = drop.apply(kb, e, pw);
            dp[mt][e] = pw * (drop.apply(kb, e, dp[mt][e]) - delta[r]);
          } else {
            s[mt][e] = pw;
            dp[mt][e] = pw * (dp[mt][e] - delta[r]);
          }
        }
    };
    if (full)
      ds(std::false_type{});
    else
      ds(std::true_type{});

    const WgBwdPacked<T, BM> packed(s, dp);
    wg_bwd_issue_dvdk<T, D, BM>(dv_flat, dk_flat, packed, qt, dot);
    wg_bwd_store_ds<T, BN, BM>(dst, packed, wg * 64 + warp * 16 + lane / 4, lane);
    wgmma::fence_async_smem();
    __syncthreads();
    float dq[8][4] = {};
    const int col0 = wg_bwd_dq<T, D, BN>(dq, dst, ks, wg, dk_flat, dv_flat).x;
    wg_bwd_add_dq(p, dq, b, h, i0, col0, warp, lane);
    __syncthreads();  // the next prefetch overwrites this stage; the next dS^T this tile
  }
  cp_async_wait<0>();

  static_assert(dkdv_block_smem_bytes<D, BN, true>() <= wg_bwd_smem_bytes<D>() - 1024);
  put_dkdv_block<T, D, BN, kWgBwdThreads, true>(p, smem_raw + pad, b, g, j0, dk, dv, key_w,
                                                smem_raw + pad + kDlamAt);
#else
  __trap();  // launched only where the binary has sm_90a code (see attention/launch.cu)
#endif
}

}  // namespace mka::cuda
