// Attention forward for Hopper (sm_90a) on warpgroup MMA. A block owns kWgBlockM = 128 query
// rows of one (batch, head): two warpgroups of 64 rows. Q, K and V tiles sit in 128B-swizzled
// shared memory that wgmma reads directly (no ldmatrix round trip through registers):
// S = Q K^T is D/16 m64nBNk16 products; P stays in registers as the A operand of O += P V,
// which reads V N-major. The online softmax is the mma.sync kernel's (float32 statistics,
// exp2, per-row mask bounds, band tiles unmasked). This file: the per-warpgroup pieces
// (WgFwdRows, WgFwdBlock) and the lockstep pipeline, K/V double-buffered by cp.async with
// both warpgroups meeting at a barrier per tile; fwd_wgmma_pingpong.cuh has the
// ping-pong pipeline built from the same pieces.
#pragma once
#include "attention/dropout.cuh"
#include "attention/params.cuh"
#include "mma/wgmma.cuh"

namespace mka::cuda {

constexpr int kWgBlockM = 128, kWgThreads = 256;

template <int D, int BN, int STAGES> constexpr int wg_fwd_smem_bytes() {
  // Q, K/V stages, mbarriers (full, empty per stage and one for Q), 1 KiB alignment slack.
  return (kWgBlockM * D + STAGES * 2 * BN * D) * 2 + (2 * STAGES + 1) * 8 + 1024;
}

// This warpgroup's output rows: the O accumulator and softmax statistics of a thread's two
// rows (row0, row0 + 8), and the tile-level pieces of the forward.
template <class T, int D, int BN> struct WgFwdRows {
  static constexpr int NT = BN / 8, DT = D / 8, KS = D / 16;
  float o[DT][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  // Issues S = Q K^T for the warpgroup's 64 rows (qw: first of them in panel 0 of a Q tile
  // of q_rows rows; kt: a K tile). One commit group.
  __device__ __forceinline__ void issue_scores(float (&s)[NT][4], const T* qw, int q_rows,
                                               const T* kt) {
    auto& s_flat = reinterpret_cast<float(&)[NT * 4]>(s);
    const uint64_t qd = wgmma::desc_k(qw), kd = wgmma::desc_k(kt);
    wgmma::fence();
    #pragma unroll
    for (int kk = 0; kk < KS; ++kk)  // 16 columns of d per product; 4 per 64-column panel
      wgmma::Mma<T, BN>::template ss<0, 0>(s_flat,
                                           wgmma::desc_at(qd, (kk / 4) * q_rows * 64 + (kk % 4) * 16),
                                           wgmma::desc_at(kd, (kk / 4) * BN * 64 + (kk % 4) * 16), kk > 0);
    wgmma::commit();
  }

  // Scores (complete) -> P in A-operand registers; updates m, l and rescales O. Row i sees
  // tile column jj iff vlo[r] <= jj < vhi[r]; `full`: every column of every row (no mask).
  // With dropout (kDrop; SPEC §3.5) the weights take their keep multipliers after the row
  // sums (l sums every weight: the softmax normalises over all of them, and the lse the
  // backward reads is unchanged).
  template <bool kDrop>
  __device__ __forceinline__ void softmax(float (&s)[NT][4], unsigned (&pa)[BN / 16][4],
                                          const AttnParams& p, int64_t row0, int64_t j0,
                                          bool full, float sl2, const DropKeep& drop,
                                          uint64_t keep) {
    float corr[2];
    weights(s, p, row0, j0, full, sl2, corr);
    if constexpr (kDrop) apply_keep(s, drop, keep);
    rescale_o(corr);
    to_a(pa, s);
  }

  // keep: WgFwdBlock::keep_bits of the tile.
  __device__ __forceinline__ static void apply_keep(float (&s)[NT][4], const DropKeep& drop,
                                                    uint64_t keep) {
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      #pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = drop.apply(unsigned(keep >> (4 * nt)), e, s[nt][e]);
  }

  // The softmax in its three steps, for pipelines where O += P V of the previous tile is
  // still in flight while this tile's weights are made: scores -> unnormalised weights in
  // place (m, l updated; corr: the factor O must take before the next P V), then O's
  // rescale and P's conversion once that product is done.
  __device__ __forceinline__ void weights(float (&s)[NT][4], const AttnParams& p, int64_t row0,
                                          int64_t j0, bool full, float sl2, float (&corr)[2]) {
    if (full)
      weights_impl<false>(s, p, row0, j0, sl2, corr);
    else
      weights_impl<true>(s, p, row0, j0, sl2, corr);
  }
  __device__ __forceinline__ void rescale_o(const float (&corr)[2]) {
    #pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][0] *= corr[0], o[dt][1] *= corr[0];
      o[dt][2] *= corr[1], o[dt][3] *= corr[1];
    }
  }
  __device__ __forceinline__ void to_a(unsigned (&pa)[BN / 16][4], const float (&s)[NT][4]) {
    #pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) mma::acc_to_a<T>(pa[kk], s, kk);
  }

  // With only two warps per scheduler the kernel is latency-bound (ncu: "fixed latency
  // execution dependency"): row max and row sum run as four independent chains each.
  template <bool kMasked>
  __device__ __forceinline__ void weights_impl(float (&s)[NT][4], const AttnParams& p,
                                               int64_t row0, int64_t j0, float sl2,
                                               float (&corr)[2]) {
    using namespace mma;
    const int lane = threadIdx.x % 32;
    int vlo[2] = {0, 0}, vhi[2] = {BN, BN};
    if constexpr (kMasked)
      #pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t i = row0 + r * 8;
        vlo[r] = int(max(int64_t(0), min(int64_t(BN), p.key_lo(i) - j0)));
        vhi[r] = int(max(int64_t(0), min(int64_t(BN), p.key_hi(i) - j0)));
      }
    float mx[2][4];
    #pragma unroll
    for (int r = 0; r < 2; ++r)
      #pragma unroll
      for (int c = 0; c < 4; ++c) mx[r][c] = -INFINITY;
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float x = s[nt][e] * sl2;
        if constexpr (kMasked) {
          const int jj = nt * 8 + (lane % 4) * 2 + (e & 1);
          x = jj >= vlo[r] && jj < vhi[r] ? x : -INFINITY;
        }
        s[nt][e] = x;
        mx[r][nt % 4] = fmaxf(mx[r][nt % 4], x);
      }
    float base[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float tile_max = fmaxf(fmaxf(mx[r][0], mx[r][1]), fmaxf(mx[r][2], mx[r][3]));
      const float m_new = fmaxf(m[r], quad_max(tile_max));
      base[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
      corr[r] = wgmma::ex2(m[r] - base[r]);
      m[r] = m_new;
    }
    float rs[2][4] = {};
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = wgmma::ex2(s[nt][e] - base[e >> 1]);
        rs[e >> 1][nt % 4] += s[nt][e];
      }
    #pragma unroll
    for (int r = 0; r < 2; ++r)
      l[r] = l[r] * corr[r] + ((rs[r][0] + rs[r][1]) + (rs[r][2] + rs[r][3]));
  }

  // Issues O += P V (vt: a V tile, read N-major). One commit group.
  __device__ __forceinline__ void issue_pv(const unsigned (&pa)[BN / 16][4], const T* vt) {
    auto& o_flat = reinterpret_cast<float(&)[DT * 4]>(o);
    const uint64_t vd = wgmma::desc_mn(vt, BN * 128);
    wgmma::fence();
    #pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)  // 16 keys per product: two 8-row atoms of V
      wgmma::Mma<T, D>::template rs<1>(o_flat, pa[kk], wgmma::desc_at(vd, kk * 16 * 64), 1);
    wgmma::commit();
  }
  __device__ __forceinline__ void fence_o() {
    wgmma::fence_regs(reinterpret_cast<float(&)[DT * 4]>(o));
  }

  // Normalized rows and their log-sum-exp (natural log); rows without a visible key: zeros
  // and -inf.
  __device__ __forceinline__ void store(const AttnParams& p, int64_t b, int64_t h, int64_t row0) {
    using namespace mma;
    const int lane = threadIdx.x % 32;
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = row0 + r * 8;
      const float lt = quad_sum(l[r]);
      if (i >= p.Tq) continue;
      const float inv = lt > 0.f ? 1.f / lt : 0.f;
      #pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        store_out2<T>(p, b, i, h, dt * 8 + (lane % 4) * 2, o[dt][2 * r] * inv,
                      o[dt][2 * r + 1] * inv);
      if (lane % 4 == 0)
        p.lse_at(b, h)[i] = lt > 0.f ? (m[r] + log2f(lt)) * 0.6931471805599453f : -INFINITY;
    }
  }
};

// What a block and its warpgroup cover: query rows, key tiles, mask bands.
template <int BN> struct WgFwdBlock {
  int64_t h, b, g, i0, n_begin, n_end, row0;
  int64_t band_lo, band_hi, any_lo, any_hi;
  bool wg_rows;
  // wg: which 64-row half of the block's query rows the calling warpgroup computes.
  __device__ __forceinline__ WgFwdBlock(const AttnParams& p, int wg)
      : WgFwdBlock(p, wg, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x) {}
  // Work item `item` of a persistent grid, numbered as the one-block-per-item grid
  // (ceil(Tq / kWgBlockM), H, B) numbers its blocks: a head's query blocks together.
  __device__ __forceinline__ WgFwdBlock(const AttnParams& p, int wg, unsigned item, unsigned nx)
      : WgFwdBlock(p, wg, item % nx, (item / nx) % unsigned(p.H), item / nx / unsigned(p.H), nx) {}
  // (x, h, b): block x of nx over the query rows of head h in batch b.
  __device__ __forceinline__ WgFwdBlock(const AttnParams& p, int wg, int64_t x, int64_t h_,
                                        int64_t b_, int64_t nx) {
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    // Heavy (late, causal) query blocks first so the tail of the grid is short.
    const int64_t mb = p.causal ? nx - 1 - x : x;
    h = h_, b = b_, g = h / p.group;
    i0 = mb * kWgBlockM;
    const int64_t i_last = min(p.Tq, i0 + kWgBlockM) - 1;
    const int64_t lo = p.key_lo(i0), hi = p.key_hi(i_last);
    n_begin = lo / BN, n_end = hi > lo ? ceil_div(hi, BN) : n_begin;
    // This warpgroup's rows [w0, w_last] (empty past Tq); the thread's rows row0, row0 + 8.
    const int64_t w0 = i0 + wg * 64, w_last = min(i_last, w0 + 63);
    row0 = w0 + warp * 16 + lane / 4;
    wg_rows = w0 <= w_last;
    // Keys every row of the warpgroup sees (tiles inside need no mask), keys any row sees.
    band_lo = wg_rows ? p.key_lo(w_last) : 0, band_hi = wg_rows ? p.key_hi(w0) : 0;
    any_lo = wg_rows ? p.key_lo(w0) : 0, any_hi = wg_rows ? p.key_hi(w_last) : 0;
  }
  // Does any row of this warpgroup see tile n? (Causal diagonal, windows.)
  __device__ __forceinline__ bool sees(int64_t n) const {
    return wg_rows && n * BN < any_hi && n * BN + BN > any_lo;
  }
  __device__ __forceinline__ bool full(int64_t n) const {
    return n * BN >= band_lo && n * BN + BN <= band_hi;
  }
  // Dropout's keep bits of tile n for the calling thread, bit 4 nt + e for its scores
  // s[nt][e] (WgFwdRows): per warp the accumulator is BN / 8 m16n8 fragments of the warp's 16
  // rows and key columns n BN + 8 nt + ..., the layout DropKeep::frag_query_rows reads. The
  // whole warp calls it; made before the tile's scores, where their registers are still free.
  __device__ __forceinline__ uint64_t keep_bits(const DropKeep& drop, const AttnParams& p,
                                                int64_t n) const {
    const uint64_t bh = uint64_t(b * p.H + h);
    const int64_t wrow0 = row0 - (threadIdx.x % 32) / 4;  // the warp's first row
    uint64_t keep = 0;
    #pragma unroll 4
    for (int nt = 0; nt < BN / 8; ++nt)
      keep |= uint64_t(drop.frag_query_rows(bh, wrow0, n * BN + nt * 8)) << (4 * nt);
    return keep;
  }
};

template <class T, int D, int BN, bool kDrop = false>
__global__ void __launch_bounds__(kWgThreads, 1) attention_fwd_wgmma(AttnParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace mma;
  constexpr int kBM = kWgBlockM, NT = BN / 8;
  static_assert(D % 64 == 0 && BN % 64 == 0, "whole 128-byte panels");
  extern __shared__ unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(wgmma::align1024(smem_raw));  // kBM x D
  T* ks = qs + kBM * D;                               // [2][BN x D]
  T* vs = ks + 2 * BN * D;                            // [2][BN x D]
  const int wg = wgmma::warpgroup();
  const WgFwdBlock<BN> blk(p, wg);
  const int64_t b = blk.b, g = blk.g;

  wgmma::load_tile<kBM, D, kWgThreads>(qs, p.q, b, blk.i0, p.Tq, blk.h);
  if (blk.n_begin < blk.n_end) {
    wgmma::load_tile<BN, D, kWgThreads>(ks, p.k, b, blk.n_begin * BN, p.Tk, g);
    wgmma::load_tile<BN, D, kWgThreads>(vs, p.v, b, blk.n_begin * BN, p.Tk, g);
  }
  cp_async_commit();

  WgFwdRows<T, D, BN> rows;
  const float sl2 = p.scale * 1.4426950408889634f;  // scores in log2 units: exp2 is one MUFU op
  const DropKeep drop(p.dropout);  // read only where kDrop
  for (int64_t n = blk.n_begin; n < blk.n_end; ++n) {
    const int stage = int(n - blk.n_begin) & 1;
    cp_async_next_stage(n + 1 < blk.n_end, [&] {
      wgmma::load_tile<BN, D, kWgThreads>(ks + (stage ^ 1) * BN * D, p.k, b, (n + 1) * BN, p.Tk, g);
      wgmma::load_tile<BN, D, kWgThreads>(vs + (stage ^ 1) * BN * D, p.v, b, (n + 1) * BN, p.Tk, g);
    });
    wgmma::fence_async_smem();
    __syncthreads();
    if (blk.sees(n)) {
      uint64_t keep = 0;
      if constexpr (kDrop) keep = blk.keep_bits(drop, p, n);
      float s[NT][4] = {};
      unsigned pa[BN / 16][4];
      rows.issue_scores(s, qs + wg * 64 * 64, kBM, ks + stage * BN * D);
      wgmma::wait<0>();
      wgmma::fence_regs(reinterpret_cast<float(&)[NT * 4]>(s));
      rows.template softmax<kDrop>(s, pa, p, blk.row0, n * BN, blk.full(n), sl2, drop, keep);
      rows.issue_pv(pa, vs + stage * BN * D);
      wgmma::wait<0>();
      rows.fence_o();
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  cp_async_wait<0>();
  rows.store(p, b, blk.h, blk.row0);
#else
  __trap();  // launched only where the binary has sm_90a code (see attention/launch.cu)
#endif
}

}  // namespace mka::cuda
