// Attention forward on tensor cores (FlashAttention-2 scheme, mma.sync m16n8k16): a block
// owns kBlockM query rows of one (batch, head); each of its 8 warps owns 16 rows. K/V tiles
// stream through shared memory double-buffered with cp.async; scores, the online softmax
// (float32, exp2) and the output accumulator stay in registers; P is reused in registers as
// the A operand of P V. Tiles wholly outside the causal/window band are skipped.
#pragma once
#include "attention_params.cuh"
#include "mma_tile.cuh"

namespace mka::cuda {

constexpr int kFwdBlockM = 128, kFwdWarps = 8, kFwdThreads = kFwdWarps * 32;

template <int D, int BN> constexpr int fwd_smem_bytes() {
  return (kFwdBlockM * D + 2 * 2 * BN * D) * 2;  // Q, then K and V in two stages (2-byte T)
}

template <class T, int D, int BN>
__global__ void __launch_bounds__(kFwdThreads) attention_fwd_mma(AttnParams p) {
  using namespace mma;
  constexpr int kBM = kFwdBlockM, NT = BN / 8, DT = D / 8, KS = D / 16;
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
  // Rows of this thread: r0 = i0 + warp*16 + lane/4, r1 = r0 + 8.
  const int64_t r0 = i0 + warp * 16 + lane / 4, r1 = r0 + 8;

  load_tile<kBM, D, kFwdThreads>(qs, p.q, b, i0, p.Tq, h);
  if (n_begin < n_end) {
    load_tile<BN, D, kFwdThreads>(ks, p.k, b, n_begin * BN, p.Tk, g);
    load_tile<BN, D, kFwdThreads>(vs, p.v, b, n_begin * BN, p.Tk, g);
  }
  cp_async_commit();

  float o[DT][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  unsigned qf[KS][4];
  const float sl2 = p.scale * 1.4426950408889634f;  // scores in log2 units: exp2 is one MUFU op
  // Rows whose band covers a whole tile need no per-element mask.
  const int64_t band_lo = p.key_lo(i_last), band_hi = p.key_hi(i0);

  for (int64_t n = n_begin; n < n_end; ++n) {
    const int stage = int(n - n_begin) & 1;
    if (n + 1 < n_end) {
      load_tile<BN, D, kFwdThreads>(ks + (stage ^ 1) * BN * D, p.k, b, (n + 1) * BN, p.Tk, g);
      load_tile<BN, D, kFwdThreads>(vs + (stage ^ 1) * BN * D, p.v, b, (n + 1) * BN, p.Tk, g);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (n == n_begin)
      for (int kk = 0; kk < KS; ++kk) load_a<D>(qf[kk], qs, warp * 16, kk);
    const T* kt = ks + stage * BN * D;
    const T* vt = vs + stage * BN * D;

    float s[NT][4] = {};
    for (int kk = 0; kk < KS; ++kk)
      for (int np = 0; np < NT / 2; ++np) {
        unsigned bf[4];
        load_b<D>(bf, kt, np * 16, kk);
        mma16816<T>(s[2 * np], qf[kk], bf[0], bf[1]);
        mma16816<T>(s[2 * np + 1], qf[kk], bf[2], bf[3]);
      }

    const int64_t j0 = n * BN;
    const bool full = j0 >= band_lo && j0 + BN <= band_hi;
    float mx[2] = {-INFINITY, -INFINITY};
    for (int nt = 0; nt < NT; ++nt)
      for (int e = 0; e < 4; ++e) {
        const int64_t j = j0 + nt * 8 + (lane % 4) * 2 + (e & 1), i = e < 2 ? r0 : r1;
        float x = s[nt][e] * sl2;
        if (!full && (j < p.key_lo(i) || j >= p.key_hi(i))) x = -INFINITY;
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    float corr[2];
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m[r], quad_max(mx[r]));
      const float base = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
      corr[r] = exp2f(m[r] - base);
      m[r] = m_new;
      mx[r] = base;
    }
    float rs[2] = {0.f, 0.f};
    for (int nt = 0; nt < NT; ++nt)
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - mx[e >> 1]);
        rs[e >> 1] += s[nt][e];
      }
    for (int r = 0; r < 2; ++r) l[r] = l[r] * corr[r] + rs[r];
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][0] *= corr[0], o[dt][1] *= corr[0];
      o[dt][2] *= corr[1], o[dt][3] *= corr[1];
    }

    for (int kk = 0; kk < BN / 16; ++kk) {
      unsigned pa[4];
      acc_to_a<T>(pa, s, kk);
      for (int dp = 0; dp < DT / 2; ++dp) {
        unsigned bf[4];
        load_b_trans<D>(bf, vt, kk * 16, dp);
        mma16816<T>(o[2 * dp], pa, bf[0], bf[1]);
        mma16816<T>(o[2 * dp + 1], pa, bf[2], bf[3]);
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  cp_async_wait<0>();

  for (int r = 0; r < 2; ++r) {
    const int64_t i = r ? r1 : r0;
    const float lt = quad_sum(l[r]);
    if (i >= p.Tq) continue;
    const float inv = lt > 0.f ? 1.f / lt : 0.f;  // no visible key: zeros, lse = -inf
    T* out = p.out.at<T>(b, i, h);
    for (int dt = 0; dt < DT; ++dt) {
      const int c = dt * 8 + (lane % 4) * 2;
      *reinterpret_cast<unsigned*>(out + c) = pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
    if (lane % 4 == 0) p.lse_at(b, h)[i] = lt > 0.f ? (m[r] + log2f(lt)) * 0.6931471805599453f : -INFINITY;
  }
}

}  // namespace mka::cuda
