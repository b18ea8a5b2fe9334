// Attention backward on tensor cores (FlashAttention-2 scheme). A block owns kBwdBlockN
// keys of one (batch, kv head) and loops over the GQA group's query heads and the query
// blocks that see its keys, so dK and dV are summed in registers and written once
// (deterministic). Each of its 4 warps owns 16 keys and computes, per query block,
//   S^T = K Q^T, dP^T = V dO^T            (scores recomputed; P from the saved lse)
//   dV += (w P)^T dO,  dK += dS^T Q        with dS = w P (dP - delta)
// then dS goes through shared memory so the warps can re-split by query rows for
//   dQ += dS K                             (float32 atomics: many key blocks share a row).
// Q, dO and the row statistics are double-buffered with cp.async. kDrop: attention dropout
// (p.dropout), its mask Z (0 or 1 / (1 - p) per weight) regenerated: dV from w P Z, and
// dS = w P (Z dP - delta).
#pragma once
#include "attention/bwd_rows.cuh"
#include "attention/dropout.cuh"
#include "attention/params.cuh"
#include "mma/mma_tile.cuh"

namespace mka::cuda {

constexpr int kBwdBlockN = 64, kBwdBlockM = 64, kBwdWarps = 4, kBwdThreads = kBwdWarps * 32;

template <int D> constexpr int bwd_smem_bytes() {
  // K, V; Q and dO in two stages; dS^T; lse, delta, w in two stages (float).
  return (2 * kBwdBlockN * D + 2 * 2 * kBwdBlockM * D + kBwdBlockN * kBwdBlockM) * 2 +
         2 * 3 * kBwdBlockM * 4;
}

template <class T, int D, bool kDrop>
__global__ void __launch_bounds__(kBwdThreads, 2) attention_bwd_mma(AttnParams p) {
  using namespace mma;
  constexpr int BN = kBwdBlockN, BM = kBwdBlockM, KS = D / 16, DT = D / 8, MT = BM / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + BN * D;
  T* qs = vs + BN * D;        // [2][BM][D]
  T* dos = qs + 2 * BM * D;   // [2][BM][D]
  T* dst = dos + 2 * BM * D;  // [BN][BM] dS^T
  float* stats = reinterpret_cast<float*>(dst + BN * BM);  // [2][3][BM]: lse2, delta, w

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t g = blockIdx.y, b = blockIdx.z;
  const int64_t j0 = int64_t(blockIdx.x) * BN, j_last = min(p.Tk, j0 + BN) - 1;
  const int64_t q_lo = p.query_lo(j0), q_hi = min(p.Tq, p.query_hi(j_last));
  const int64_t mb0 = q_lo / BM, nq = q_hi > q_lo ? ceil_div(q_hi, BM) - mb0 : 0;
  const int64_t iters = nq * p.group;
  // Keys of this thread's accumulator rows: kr0 and kr0 + 8.
  const int64_t kr0 = j0 + warp * 16 + lane / 4;
  const float sl2 = p.scale * 1.4426950408889634f;
  const DropKeep drop(p.dropout);  // read only where kDrop

  auto issue = [&](int64_t it, int stage) {  // prefetch query block `it` into `stage`
    const int64_t h = g * p.group + it / nq, i0 = (mb0 + it % nq) * BM;
    load_tile<BM, D, kBwdThreads>(qs + stage * BM * D, p.q, b, i0, p.Tq, h);
    load_tile<BM, D, kBwdThreads>(dos + stage * BM * D, p.dout, b, i0, p.Tq, h);
    load_row_stats<BM, kBwdThreads>(stats + stage * 3 * BM, p, b, h, i0);
  };

  load_tile<BN, D, kBwdThreads>(ks, p.k, b, j0, p.Tk, g);
  load_tile<BN, D, kBwdThreads>(vs, p.v, b, j0, p.Tk, g);
  if (iters > 0) issue(0, 0);
  cp_async_commit();

  const KeyWeights key_w = key_weights<false>(p, b, j0);  // its latency hides behind the loop
  float dk[DT][4] = {}, dv[DT][4] = {};
  for (int64_t it = 0; it < iters; ++it) {
    const int stage = int(it & 1);
    const int64_t h = g * p.group + it / nq, i0 = (mb0 + it % nq) * BM;
    cp_async_next_stage(it + 1 < iters, [&] { issue(it + 1, stage ^ 1); });
    __syncthreads();
    const T* qt = qs + stage * BM * D;
    const T* dot = dos + stage * BM * D;
    const float* lse2 = stats + stage * 3 * BM;
    const float* delta = lse2 + BM;
    const float* wr = lse2 + 2 * BM;

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

    // s <- w P (for dV), dp <- dS = w P (dP - delta) (for dK and dQ); with dropout
    // s <- w P Z, dp <- w P (Z dP - delta).
    const bool full = i0 >= p.query_lo(j_last) && i0 + BM <= q_hi && j0 + BN <= p.Tk &&
                      i0 + BM <= p.query_hi(j0);
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      unsigned keep = 0;
      if constexpr (kDrop) keep = drop.frag_key_rows(b * p.H + h, i0 + mt * 8, j0 + warp * 16);
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = mt * 8 + (lane % 4) * 2 + (e & 1);
        const int64_t i = i0 + r, j = kr0 + (e >> 1) * 8;
        const bool vis = full || (i < p.Tq && j < p.Tk && j >= p.key_lo(i) && j < p.key_hi(i));
        const float pr = vis ? exp2f(s[mt][e] * sl2 - lse2[r]) : 0.f;
        const float pw = wr[r] * pr;
        s[mt][e] = kDrop ? drop.apply(keep, e, pw) : pw;
        dp[mt][e] = pw * ((kDrop ? drop.apply(keep, e, dp[mt][e]) : dp[mt][e]) - delta[r]);
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

    // dS^T to shared memory (keys as rows), then dQ with warps split by query rows.
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int c = (lane % 4) * 2;
      const int row = warp * 16 + lane / 4;
      *reinterpret_cast<unsigned*>(dst + swz<BM>(row, mt) + c) = pack2<T>(dp[mt][0], dp[mt][1]);
      *reinterpret_cast<unsigned*>(dst + swz<BM>(row + 8, mt) + c) = pack2<T>(dp[mt][2], dp[mt][3]);
    }
    __syncthreads();
    float dq[DT][4] = {};
    mma_at_rows<T, BM, D, BN, DT>(dq, dst, warp, ks, 0);
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = i0 + warp * 16 + lane / 4 + r * 8;
      if (i >= p.Tq) continue;
      float* row = p.dq.at<float>(b, i, h);
      #pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const int c = dt * 8 + (lane % 4) * 2;
        atomicAdd(row + c, dq[dt][2 * r] * p.scale);
        atomicAdd(row + c + 1, dq[dt][2 * r + 1] * p.scale);
      }
    }
    __syncthreads();  // the next prefetch overwrites this stage; the next dS^T this tile
  }
  cp_async_wait<0>();

  static_assert(dkdv_block_smem_bytes<D, BN>() <= bwd_smem_bytes<D>());
  put_dkdv_block<T, D, BN, kBwdThreads>(p, smem_raw, b, g, j0, dk, dv, key_w);
}

}  // namespace mka::cuda
