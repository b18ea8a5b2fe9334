// Attention forward for Hopper, ping-pong pipeline: the lockstep kernel's pieces
// (fwd_wgmma.cuh) with three K/V stages behind mbarriers (full: a tile's copies
// landed; empty: both warpgroups are done with it), so the two warpgroups drift up to one tile
// apart, and two named barriers that hand the tensor cores from one warpgroup to the other per
// product: one warpgroup's softmax (exp2 on the special-function units) runs while the other's
// products run (the FlashAttention-3 schedule, without a producer warp or TMA).
#pragma once
#include "attention/fwd_wgmma.cuh"
#include "common/mbarrier.cuh"

namespace mka::cuda {

// Named barriers 1 and 2 (0 is __syncthreads): warpgroup w waits on 1 + w for its turn on
// the tensor cores and hands the turn over by arriving on the other's.
__device__ __forceinline__ void turn_wait(int wg) {
  asm volatile("bar.sync %0, 256;\n" ::"r"(1 + wg) : "memory");
}
__device__ __forceinline__ void turn_pass(int wg) {
  asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - wg) : "memory");
}

template <class T, int D, int BN, bool kDrop = false>
__global__ void __launch_bounds__(kWgThreads, 1) attention_fwd_wgmma_pp(AttnParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace mma;
  constexpr int kBM = kWgBlockM, NT = BN / 8, S = 3;
  static_assert(D % 64 == 0 && BN % 64 == 0, "whole 128-byte panels");
  extern __shared__ unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(wgmma::align1024(smem_raw));  // kBM x D
  T* ks = qs + kBM * D;                               // [S][BN x D]
  T* vs = ks + S * BN * D;                            // [S][BN x D]
  uint64_t* full = reinterpret_cast<uint64_t*>(vs + S * BN * D);  // [S]: tile landed
  uint64_t* empty = full + S;                                      // [S]: both done with it
  uint64_t* qbar = empty + S;
  const int wg = wgmma::warpgroup();
  const WgFwdBlock<BN> blk(p, wg);
  const int64_t b = blk.b, g = blk.g, tiles = blk.n_end - blk.n_begin;

  if (threadIdx.x == 0) {
    for (int st = 0; st < S; ++st) mbar::init(full + st, kWgThreads), mbar::init(empty + st, kWgThreads);
    mbar::init(qbar, kWgThreads);
  }
  __syncthreads();
  auto load_kv = [&](int64_t t) {  // tile n_begin + t into stage t % S, by every thread
    const int st = int(t % S);
    wgmma::load_tile<BN, D, kWgThreads>(ks + st * BN * D, p.k, b, (blk.n_begin + t) * BN, p.Tk, g);
    wgmma::load_tile<BN, D, kWgThreads>(vs + st * BN * D, p.v, b, (blk.n_begin + t) * BN, p.Tk, g);
    mbar::arrive_on_copies(full + st);
  };
  wgmma::load_tile<kBM, D, kWgThreads>(qs, p.q, b, blk.i0, p.Tq, blk.h);
  mbar::arrive_on_copies(qbar);
  for (int64_t t = 0; t < min(tiles, int64_t(S - 1)); ++t) load_kv(t);
  mbar::wait(qbar, 0);

  WgFwdRows<T, D, BN> rows;
  const float sl2 = p.scale * 1.4426950408889634f;
  const DropKeep drop(p.dropout);  // read only where kDrop
  if (wg == 1) turn_pass(wg);  // warpgroup 0 takes the first turn
  for (int64_t t = 0; t < tiles; ++t) {
    const int st = int(t % S);
    // Refill the stage of tile t - 1 with tile t + S - 1 once both warpgroups are done with it:
    // this warpgroup may run one tile ahead of the other.
    if (t + S - 1 < tiles) {
      if (t >= 1) mbar::wait(empty + (t - 1) % S, unsigned(((t - 1) / S) & 1));
      load_kv(t + S - 1);
    }
    mbar::wait(full + st, unsigned((t / S) & 1));
    wgmma::fence_async_smem();
    const int64_t n = blk.n_begin + t;
    const bool sees = blk.sees(n);
    // Dropout's keep bits before the turn: Philox runs while the other warpgroup's products do.
    uint64_t keep = 0;
    if constexpr (kDrop)
      if (sees) keep = blk.keep_bits(drop, p, n);
    float s[NT][4] = {};
    unsigned pa[BN / 16][4];
    turn_wait(wg);
    if (sees) rows.issue_scores(s, qs + wg * 64 * 64, kBM, ks + st * BN * D);
    wgmma::wait<0>();
    turn_pass(wg);
    if (sees) {
      wgmma::fence_regs(reinterpret_cast<float(&)[NT * 4]>(s));
      rows.template softmax<kDrop>(s, pa, p, blk.row0, n * BN, blk.full(n), sl2, drop, keep);
    }
    turn_wait(wg);
    if (sees) rows.issue_pv(pa, vs + st * BN * D);
    wgmma::wait<0>();
    turn_pass(wg);
    rows.fence_o();
    mbar::arrive(empty + st);
  }
  if (wg == 0) turn_wait(wg);  // the other warpgroup's last hand-over
  rows.store(p, b, blk.h, blk.row0);
#else
  __trap();  // launched only where the binary has sm_90a code (see attention/launch.cu)
#endif
}

}  // namespace mka::cuda
