// Attention forward on tensor cores (FlashAttention-2 scheme, mma.sync m16n8k16): a block
// owns kFwdBlockM query rows of one (batch, head); each of its 4 warps owns 32 rows (two
// m16 tiles share every K/V fragment read from shared memory, halving that traffic). K/V tiles
// stream through shared memory double-buffered with cp.async; scores, the online softmax
// (float32, exp2) and the output accumulator stay in registers; P is reused in registers as
// the A operand of P V. Tiles wholly outside the causal/window band are skipped. kDrop:
// attention dropout (p.dropout) on P after the row sums, before P V.
#pragma once
#include "attention/dropout.cuh"
#include "attention/params.cuh"
#include "mma/mma_tile.cuh"

namespace mka::cuda {

constexpr int kFwdBlockM = 128, kFwdWarps = 4, kFwdThreads = kFwdWarps * 32;
constexpr int kFwdWarpRows = kFwdBlockM / kFwdWarps, kFwdMT = kFwdWarpRows / 16;

template <int D, int BN> constexpr int fwd_smem_bytes() {
  return (kFwdBlockM * D + 2 * 2 * BN * D) * 2;  // Q, then K and V in two stages (2-byte T)
}

template <class T, int D, int BN, bool kDrop>
__global__ void __launch_bounds__(kFwdThreads, 2) attention_fwd_mma(AttnParams p) {
  using namespace mma;
  constexpr int kBM = kFwdBlockM, NT = BN / 8, DT = D / 8, KS = D / 16;
  static_assert(kFwdWarpRows % 16 == 0, "whole m16 tiles per warp");
  static_assert(NT <= 16, "dropout's keep bits: 64 per m16 tile");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* ks = qs + kBM * D;  // [2][BN][D]
  T* vs = ks + 2 * BN * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Heavy (late, causal) query blocks first so the tail of the grid is short.
  const int64_t mb = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int64_t h = blockIdx.y, b = blockIdx.z, g = h / p.group;
  const int64_t i0 = mb * kBM, i_last = min(p.Tq, i0 + kBM) - 1;
  const int64_t lo = p.key_lo(i0), hi = p.key_hi(i_last);
  const int64_t n_begin = lo / BN, n_end = hi > lo ? ceil_div(hi, BN) : n_begin;
  // Accumulator rows of this thread: row(m, r) = i0 + warp*32 + m*16 + lane/4 + 8r.
  const int64_t row0 = i0 + warp * kFwdWarpRows + lane / 4;
  const DropKeep drop(p.dropout);  // read only where kDrop

  load_tile<kBM, D, kFwdThreads>(qs, p.q, b, i0, p.Tq, h);
  if (n_begin < n_end) {
    load_tile<BN, D, kFwdThreads>(ks, p.k, b, n_begin * BN, p.Tk, g);
    load_tile<BN, D, kFwdThreads>(vs, p.v, b, n_begin * BN, p.Tk, g);
  }
  cp_async_commit();

  constexpr int MT = kFwdMT;
  float o[MT][DT][4] = {};
  float m[MT][2], l[MT][2];
  #pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    #pragma unroll
    for (int r = 0; r < 2; ++r) m[mt][r] = -INFINITY, l[mt][r] = 0.f;
  const float sl2 = p.scale * 1.4426950408889634f;  // scores in log2 units: exp2 is one MUFU op
  // Rows whose band covers a whole tile need no per-element mask.
  const int64_t band_lo = p.key_lo(i_last), band_hi = p.key_hi(i0);

  for (int64_t n = n_begin; n < n_end; ++n) {
    const int stage = int(n - n_begin) & 1;
    // Dropout's keep bits of this tile, 4 per fragment (bit 4 nt + e: s[mt][nt][e]), made
    // here, where the scores' registers are free: next to them Philox spilled. Four
    // evaluations at a time hide each one's latency without spilling either.
    uint64_t keep[MT] = {};
    if constexpr (kDrop)
      #pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        #pragma unroll 4
        for (int nt = 0; nt < NT; ++nt)
          keep[mt] |= uint64_t(drop.frag_query_rows(b * p.H + h, i0 + warp * kFwdWarpRows + mt * 16,
                                                    n * BN + nt * 8))
                      << (4 * nt);
    cp_async_next_stage(n + 1 < n_end, [&] {
      load_tile<BN, D, kFwdThreads>(ks + (stage ^ 1) * BN * D, p.k, b, (n + 1) * BN, p.Tk, g);
      load_tile<BN, D, kFwdThreads>(vs + (stage ^ 1) * BN * D, p.v, b, (n + 1) * BN, p.Tk, g);
    });
    __syncthreads();
    const T* kt = ks + stage * BN * D;
    const T* vt = vs + stage * BN * D;

    float s[MT][NT][4] = {};
    #pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      unsigned qa[MT][4];
      #pragma unroll
      for (int mt = 0; mt < MT; ++mt) load_a<D>(qa[mt], qs, warp * kFwdWarpRows + mt * 16, kk);
      #pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        unsigned bf[4];
        load_b<D>(bf, kt, np * 16, kk);
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(s[mt][2 * np], qa[mt], bf[0], bf[1]);
          mma16816<T>(s[mt][2 * np + 1], qa[mt], bf[2], bf[3]);
        }
      }
    }

    const int64_t j0 = n * BN;
    const bool full = j0 >= band_lo && j0 + BN <= band_hi;
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      // Visible columns of this thread's two rows, relative to the tile: [vlo, vhi).
      int vlo[2] = {0, 0}, vhi[2] = {BN, BN};
      if (!full)
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t i = row0 + mt * 16 + r * 8;
          vlo[r] = int(max(int64_t(0), min(int64_t(BN), p.key_lo(i) - j0)));
          vhi[r] = int(max(int64_t(0), min(int64_t(BN), p.key_hi(i) - j0)));
        }
      float mx[2] = {-INFINITY, -INFINITY};
      #pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int jj = nt * 8 + (lane % 4) * 2 + (e & 1), r = e >> 1;
          const float x = jj >= vlo[r] && jj < vhi[r] ? s[mt][nt][e] * sl2 : -INFINITY;
          s[mt][nt][e] = x;
          mx[r] = fmaxf(mx[r], x);
        }
      float corr[2];
      #pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_new = fmaxf(m[mt][r], quad_max(mx[r]));
        const float base = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
        corr[r] = exp2f(m[mt][r] - base);
        m[mt][r] = m_new;
        mx[r] = base;
      }
      float rs[2] = {0.f, 0.f};
      #pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][nt][e] = exp2f(s[mt][nt][e] - mx[e >> 1]);
          rs[e >> 1] += s[mt][nt][e];
        }
      #pragma unroll
      for (int r = 0; r < 2; ++r) l[mt][r] = l[mt][r] * corr[r] + rs[r];
      if constexpr (kDrop)  // after the row sums: the softmax normalises over every weight
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          #pragma unroll
          for (int e = 0; e < 4; ++e)
            s[mt][nt][e] = drop.apply(unsigned(keep[mt] >> (4 * nt)), e, s[mt][nt][e]);
      #pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[mt][dt][0] *= corr[0], o[mt][dt][1] *= corr[0];
        o[mt][dt][2] *= corr[1], o[mt][dt][3] *= corr[1];
      }
    }

    #pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      unsigned pa[MT][4];
      #pragma unroll
      for (int mt = 0; mt < MT; ++mt) acc_to_a<T>(pa[mt], s[mt], kk);
      #pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        unsigned bf[4];
        load_b_trans<D>(bf, vt, kk * 16, dp);
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(o[mt][2 * dp], pa[mt], bf[0], bf[1]);
          mma16816<T>(o[mt][2 * dp + 1], pa[mt], bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  cp_async_wait<0>();

  #pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = row0 + mt * 16 + r * 8;
      const float lt = quad_sum(l[mt][r]);
      if (i >= p.Tq) continue;
      const float inv = lt > 0.f ? 1.f / lt : 0.f;  // no visible key: zeros, lse = -inf
      #pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        store_out2<T>(p, b, i, h, dt * 8 + (lane % 4) * 2, o[mt][dt][2 * r] * inv,
                      o[mt][dt][2 * r + 1] * inv);
      if (lane % 4 == 0)
        p.lse_at(b, h)[i] = lt > 0.f ? (m[mt][r] + log2f(lt)) * 0.6931471805599453f : -INFINITY;
    }
}

}  // namespace mka::cuda
