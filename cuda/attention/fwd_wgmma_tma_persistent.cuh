// The warp-specialised TMA forward as a persistent kernel (opt-in: MKA_CUDA_FWD_PERSISTENT=1,
// docs/configuration.md): attention_fwd_wgmma_tma's producer, consumers and ring, with blocks
// that take items of 128 query rows one after another instead of one each.
#pragma once
#include "attention/fwd_wgmma_tma.cuh"

namespace mka::cuda {

template <int D, int BN> constexpr int tma_fwd_persistent_smem_bytes() {
  // The one-item kernel's, plus Q's empty mbarrier and the current item's index.
  return tma_fwd_smem_bytes<D, BN>() + 8 + 8;
}

// Persistent: a block takes work items (128 query rows of one head) one after another, first
// item blockIdx.x, then the next unclaimed one from a counter (FlashAttention-3's dynamic tile
// scheduler): items are numbered as the one-block-per-item grid numbers its blocks (a head's
// query blocks together, heaviest first), so the items in flight at any time stay a window of
// consecutive ones sharing their keys and values in L2, and a block that drew light items takes
// more. The K/V ring and the consumers' turns run on across items; the producer loads the next
// item's Q (once both consumers' last scores have read this one's) and first tiles while the
// consumers finish the item and store its rows, so a block's start and write-out are exposed
// once per SM, not once per item. The producer warp publishes each item's index in shared
// memory between two named barriers with the consumers (FA3's scheduler barriers; racecheck
// follows those, not mbarriers): it writes the index and arrives on kItemReady, the consumers
// sync there, read it and arrive on kItemRead, which the producer syncs on before it writes the
// next one. An index past the last item ends the loops.
constexpr int kItemReady = 3, kItemRead = 4;  // named barriers (1, 2: the consumers' turns)
constexpr int kItemThreads = 32 + 256;        // the producer warp and both consumers
__device__ __forceinline__ void item_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kItemThreads) : "memory");
}
__device__ __forceinline__ void item_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(kItemThreads) : "memory");
}
template <class T, int D, int BN, bool kDrop = false>
__global__ void __launch_bounds__(kTmaThreads, 1)
    attention_fwd_wgmma_tma_persistent(const __grid_constant__ FwdMaps maps, AttnParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace mma;
  constexpr int kBM = kWgBlockM, S = kTmaStages;
  constexpr unsigned kTileBytes = BN * D * 2, kQBytes = kBM * D * 2;
  static_assert(D % 64 == 0 && BN % 64 == 0, "whole 128-byte panels");
  extern __shared__ unsigned char smem_raw[];
  const TmaFwdSmem<T, D, BN, 2> sm(smem_raw);
  T *qs = sm.qs, *ks = sm.ks, *vs = sm.vs;
  uint64_t *qfull = sm.q, *qempty = sm.q + 1;
  uint64_t *kfull = sm.kfull, *vfull = sm.vfull, *kempty = sm.kempty, *vempty = sm.vempty;
  unsigned* item_at = static_cast<unsigned*>(sm.after());  // the current item
  const int wg = wgmma::warpgroup();  // 0: producer; 1, 2: consumers of rows [64 (wg-1), +64)
  const int cw = max(wg - 1, 0);
  const unsigned nx = unsigned(ceil_div(p.Tq, kBM)), items = nx * unsigned(p.H) * unsigned(p.B);

  if (threadIdx.x == 0) {
    mbar::init(qfull, 1), mbar::init(qempty, 8);  // one arrival per consumer warp
    sm.init_stages();
    mbar::fence_init();
  }
  __syncthreads();

  if (wg == 0) {  // producer: warp 0 runs the item loop, its lane 0 issues the copies
    regs_down<kProducerRegs>();
    if (threadIdx.x >= 32) return;
    const bool issues = threadIdx.x == 0;
    if (issues) tma::prefetch(maps.q), tma::prefetch(maps.k), tma::prefetch(maps.v);
    Ring ring;  // the next tile's stage; the phase its previous tile (S loads back) completed
    unsigned loaded = 0, item = blockIdx.x;
    for (unsigned k = 0;; ++k) {
      if (k > 0) item_sync(kItemRead);  // the consumers read the last index
      if (issues) *item_at = item;
      item_arrive(kItemReady);
      if (item >= items) break;
      const WgFwdBlock<BN> blk(p, 0, item, nx);
      if (k > 0) mbar::wait(qempty, (k - 1) & 1u);  // both consumers' scores read the last Q
      unsigned next = 0;
      if (issues) {
        mbar::arrive_expect_tx(qfull, kQBytes);
        tma::load_tile<kBM, D>(qs, maps.q, blk.b, blk.i0, blk.h, qfull);
        next = atomicAdd(maps.next_item, 1u) + gridDim.x;  // its latency hides behind the loads
      }
      for (int64_t n = blk.n_begin; n < blk.n_end; ++n, ++loaded, ring.next()) {
        if (loaded >= S) mbar::wait(kempty + ring.st, ring.ph ^ 1u);
        if (issues) {
          mbar::arrive_expect_tx(kfull + ring.st, kTileBytes);
          tma::load_tile<BN, D>(ks + ring.st * BN * D, maps.k, blk.b, n * BN, blk.g, kfull + ring.st);
        }
        if (loaded >= S) mbar::wait(vempty + ring.st, ring.ph ^ 1u);
        if (issues) {
          mbar::arrive_expect_tx(vfull + ring.st, kTileBytes);
          tma::load_tile<BN, D>(vs + ring.st * BN * D, maps.v, blk.b, n * BN, blk.g, vfull + ring.st);
        }
      }
      item = __shfl_sync(0xffffffffu, next, 0);
    }
    item_sync(kItemRead);  // the consumers' read of the last index: every arrival met
    return;
  }

  regs_up<kConsumerRegs>();
  const T* qw = qs + cw * 64 * 64;  // this consumer's rows in panel 0 of the Q tile
  const TmaFwdRing<T> ring{ks, vs, kfull, vfull, kempty, vempty};
  Ring kr, vr;  // the stages (and phases) of the next K and V tiles, across items
  if (cw == 1) turn_pass(cw);  // consumer 0 takes the first turn
  for (unsigned k = 0;; ++k) {
    item_sync(kItemReady);
    const unsigned item = *item_at;
    item_arrive(kItemRead);
    if (item >= items) break;
    mbar::wait(qfull, k & 1u);  // this item's Q
    const WgFwdBlock<BN> blk(p, cw, item, nx);
    WgFwdRows<T, D, BN> rows;
    tma_fwd_consume<T, D, BN, kDrop>(rows, blk, p, cw, qw, ring, kr, vr, qempty);
    rows.store(p, blk.b, blk.h, blk.row0);
  }
  if (cw == 0) turn_wait(cw);  // the other consumer's last hand-over
#else
  __trap();  // launched only where the binary has sm_90a code (see attention/launch.cu)
#endif
}

}  // namespace mka::cuda
