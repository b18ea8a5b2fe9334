// Attention forward for Hopper, warp-specialised (the FlashAttention-3 schedule): a producer
// warpgroup whose one thread loads Q and every K/V tile by TMA, and two consumer warpgroups of
// 64 query rows each. K and V have their own stages and barriers (full: the tile's bytes
// landed; empty: both consumers are done with it), so a K stage is refilled as soon as its
// S = Q K^T is done and a V stage once its P V is.
//
// Each consumer overlaps its own work (intra-warpgroup pipelining): per tile t it issues
// S_t = Q K_t^T and O += P_{t-1} V_{t-1} together, then makes tile t's softmax weights while
// both products run, and converts them to P_t once O's product is done. Between the two
// consumers the tensor cores are handed over per issue (named barriers, as in the ping-pong
// kernel), so one consumer's softmax runs during the other's products and the tensor cores
// always have a queue. The producer gives its registers to the consumers (setmaxnreg).
// With dropout (kDrop) a consumer makes a tile's keep bits while its products run and applies
// them to the weights after the row sums, as the ping-pong kernel does.
//
// Two consumers at both head dims. At d = 64 a tile's exp2 work on the special-function units
// takes as long as its products on the tensor cores, which is why FlashAttention-3 runs three
// consumers there (192 query rows a block); three fit 160 registers per consumer thread only
// with ~260 bytes of spills, and on an H100 they were slower with a causal mask (0.80x at 1k,
// 0.94x at 4k, 0.98x at 16k) and 1.06x without (bench/results/h100_ops.md, built from
// 159a9b4, where the consumer count was a template parameter).
#pragma once
#include "attention/fwd_wgmma.cuh"
#include "attention/fwd_wgmma_pingpong.cuh"
#include "common/tma.cuh"

namespace mka::cuda {

constexpr int kTmaThreads = 384, kTmaStages = 3;
constexpr int kProducerRegs = 24, kConsumerRegs = 240;
// setmaxnreg.inc waits until the block's pool has the registers: the producer's release must
// cover the consumers' growth, or the consumers spin forever.
static_assert(128 * kProducerRegs + 2 * 128 * kConsumerRegs <=
                  65536 / kTmaThreads / 8 * 8 * kTmaThreads,
              "the producer's registers must cover the consumers' setmaxnreg");

struct FwdMaps {
  CUtensorMap q, k, v;  // 64-column boxes of kWgBlockM (q) and BN (k, v) rows
  unsigned* next_item;  // the persistent kernel's item counter, zero at launch (else unused)
};

// A stage of the K/V ring and the phase its barriers complete in on this lap.
struct Ring {
  int st = 0;
  unsigned ph = 0;
  __device__ __forceinline__ void next() {
    if (++st == kTmaStages) st = 0, ph ^= 1u;
  }
};

template <int D, int BN> constexpr int tma_fwd_smem_bytes() {
  // Q, K and V stages, mbarriers (Q; full and empty per stage of K and of V), alignment slack.
  return (kWgBlockM * D + kTmaStages * 2 * BN * D) * 2 + (1 + 4 * kTmaStages) * 8 + 1024;
}

// The TMA forwards' shared memory (tma_fwd_smem_bytes): Q (kWgBlockM x D) and the K and V
// stages ([S][BN x D] each) in 128-byte-swizzled panels from a 1024-byte boundary, then the
// mbarriers: kQBars for Q (full; the persistent kernel's empty too), full and empty per stage
// of K and of V. after(): the first byte past them.
template <class T, int D, int BN, int kQBars> struct TmaFwdSmem {
  T *qs, *ks, *vs;
  uint64_t *q, *kfull, *vfull, *kempty, *vempty;
  __device__ __forceinline__ explicit TmaFwdSmem(unsigned char* raw) {
    qs = reinterpret_cast<T*>(wgmma::align1024(raw));
    ks = qs + kWgBlockM * D;
    vs = ks + kTmaStages * BN * D;
    q = reinterpret_cast<uint64_t*>(vs + kTmaStages * BN * D);
    kfull = q + kQBars, vfull = kfull + kTmaStages;
    kempty = vfull + kTmaStages, vempty = kempty + kTmaStages;
  }
  __device__ __forceinline__ void* after() const { return vempty + kTmaStages; }
  // The stages' barriers, by one thread: a load lands once; a stage is free after one
  // arrival per consumer warp.
  __device__ __forceinline__ void init_stages() const {
    for (int st = 0; st < kTmaStages; ++st) {
      mbar::init(kfull + st, 1), mbar::init(vfull + st, 1);
      mbar::init(kempty + st, 8), mbar::init(vempty + st, 8);
    }
  }
};

// The K/V ring's stages and their barriers, as the consumers see them.
template <class T> struct TmaFwdRing {
  const T* ks;  // [S][BN x D]
  const T* vs;  // [S][BN x D]
  uint64_t *kfull, *vfull, *kempty, *vempty;  // [S] each
};

// A consumer's (cw's) share of one block of 128 query rows, O left in rows: tile 0's scores
// alone, then per tile t S_t = Q K_t^T issued with O += P_{t-1} V_{t-1} and tile t's softmax
// weights made while both run, then the last P V. kr, vr: the ring positions of the block's
// first K and V tiles, left on the next block's. qempty (the persistent kernel's; else null):
// arrived on by each warp once the block's last scores have read Q.
template <class T, int D, int BN, bool kDrop>
__device__ __forceinline__ void tma_fwd_consume(WgFwdRows<T, D, BN>& rows, const WgFwdBlock<BN>& blk,
                                                const AttnParams& p, int cw, const T* qw,
                                                const TmaFwdRing<T>& r, Ring& kr, Ring& vr,
                                                uint64_t* qempty) {
  using namespace mma;
  constexpr int kBM = kWgBlockM, NT = BN / 8;
  // A warp is done with a stage once its wgmma.wait_group returned (warp-synchronous): its
  // first lane arrives for it.
  const bool arrives = threadIdx.x % 32 == 0;
  const float sl2 = p.scale * 1.4426950408889634f;
  const DropKeep drop(p.dropout);  // read only where kDrop
  const int tiles = int(blk.n_end - blk.n_begin);
  float s[NT][4] = {};
  unsigned pa[BN / 16][4];
  float corr[2];
  if (tiles == 0) {
    // No product brings the warp's lanes together after their wait for Q: without this, lane
    // 0's arrival could let the next Q land (its phase complete) while a lane still polls.
    __syncwarp();
    if (qempty && arrives) mbar::arrive(qempty);
    return;
  }
  // Tile 0: its scores alone.
  mbar::wait(r.kfull + kr.st, kr.ph);
  turn_wait(cw);
  rows.issue_scores(s, qw, kBM, r.ks + kr.st * BN * D);
  turn_pass(cw);
  // Dropout's keep bits while the scores run (Philox: integer work beside the products).
  uint64_t keep = kDrop ? blk.keep_bits(drop, p, blk.n_begin) : 0;
  wgmma::wait<0>();
  wgmma::fence_regs(reinterpret_cast<float(&)[NT * 4]>(s));
  if (arrives) {
    mbar::arrive(r.kempty + kr.st);
    if (qempty && tiles == 1) mbar::arrive(qempty);  // the block's last read of Q
  }
  rows.weights(s, p, blk.row0, blk.n_begin * BN, blk.full(blk.n_begin), sl2, corr);
  if constexpr (kDrop) rows.apply_keep(s, drop, keep);  // after the row sums (SPEC §3.5)
  rows.to_a(pa, s);  // O is still zero: no rescale
  for (int t = 1; t < tiles; ++t) {
    kr.next();
    const int64_t n = blk.n_begin + t;
    mbar::wait(r.kfull + kr.st, kr.ph);
    mbar::wait(r.vfull + vr.st, vr.ph);
    turn_wait(cw);
    rows.issue_scores(s, qw, kBM, r.ks + kr.st * BN * D);  // S_t
    rows.issue_pv(pa, r.vs + vr.st * BN * D);              // O += P_{t-1} V_{t-1}
    turn_pass(cw);
    if constexpr (kDrop) keep = blk.keep_bits(drop, p, n);
    wgmma::wait<1>();  // S_t done (groups complete in order)
    wgmma::fence_regs(reinterpret_cast<float(&)[NT * 4]>(s));
    if (arrives) {
      mbar::arrive(r.kempty + kr.st);
      if (qempty && t == tiles - 1) mbar::arrive(qempty);
    }
    rows.weights(s, p, blk.row0, n * BN, blk.full(n), sl2, corr);
    if constexpr (kDrop) rows.apply_keep(s, drop, keep);
    wgmma::wait<0>();  // O's product done: O and P's registers are free
    rows.fence_o();
    if (arrives) mbar::arrive(r.vempty + vr.st);
    vr.next();
    rows.rescale_o(corr);
    rows.to_a(pa, s);
  }
  mbar::wait(r.vfull + vr.st, vr.ph);
  turn_wait(cw);
  rows.issue_pv(pa, r.vs + vr.st * BN * D);
  turn_pass(cw);
  wgmma::wait<0>();
  rows.fence_o();
  if (arrives) mbar::arrive(r.vempty + vr.st);
  kr.next(), vr.next();  // the next block's first tile
}

template <class T, int D, int BN, bool kDrop = false>
__global__ void __launch_bounds__(kTmaThreads, 1)
    attention_fwd_wgmma_tma(const __grid_constant__ FwdMaps maps, AttnParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace mma;
  constexpr int kBM = kWgBlockM, S = kTmaStages;
  constexpr unsigned kTileBytes = BN * D * 2, kQBytes = kBM * D * 2;
  static_assert(D % 64 == 0 && BN % 64 == 0, "whole 128-byte panels");
  extern __shared__ unsigned char smem_raw[];
  const TmaFwdSmem<T, D, BN, 1> sm(smem_raw);
  T *qs = sm.qs, *ks = sm.ks, *vs = sm.vs;
  uint64_t *qbar = sm.q, *kfull = sm.kfull, *vfull = sm.vfull, *kempty = sm.kempty, *vempty = sm.vempty;
  const int wg = wgmma::warpgroup();  // 0: producer; 1, 2: consumers of rows [64 (wg-1), +64)
  const int cw = max(wg - 1, 0);
  const WgFwdBlock<BN> blk(p, cw);
  const int tiles = int(blk.n_end - blk.n_begin);

  if (threadIdx.x == 0) {
    mbar::init(qbar, 1);
    sm.init_stages();
    mbar::fence_init();
  }
  __syncthreads();

  if (wg == 0) {  // producer
    regs_down<kProducerRegs>();
    if (threadIdx.x == 0) {
      tma::prefetch(maps.q), tma::prefetch(maps.k), tma::prefetch(maps.v);
      mbar::arrive_expect_tx(qbar, kQBytes);
      tma::load_tile<kBM, D>(qs, maps.q, blk.b, blk.i0, blk.h, qbar);
      Ring ring;  // tile t's stage; the phase its previous tile (t - S) completed
      for (int t = 0; t < tiles; ++t, ring.next()) {
        const int64_t row = (blk.n_begin + t) * BN;
        if (t >= S) mbar::wait(kempty + ring.st, ring.ph ^ 1u);
        mbar::arrive_expect_tx(kfull + ring.st, kTileBytes);
        tma::load_tile<BN, D>(ks + ring.st * BN * D, maps.k, blk.b, row, blk.g, kfull + ring.st);
        if (t >= S) mbar::wait(vempty + ring.st, ring.ph ^ 1u);
        mbar::arrive_expect_tx(vfull + ring.st, kTileBytes);
        tma::load_tile<BN, D>(vs + ring.st * BN * D, maps.v, blk.b, row, blk.g, vfull + ring.st);
      }
    }
    return;
  }

  regs_up<kConsumerRegs>();
  WgFwdRows<T, D, BN> rows;
  Ring kr, vr;
  mbar::wait(qbar, 0);
  if (cw == 1) turn_pass(cw);  // consumer 0 takes the first turn
  tma_fwd_consume<T, D, BN, kDrop>(rows, blk, p, cw, qs + cw * 64 * 64,
                                   {ks, vs, kfull, vfull, kempty, vempty}, kr, vr, nullptr);
  if (cw == 0) turn_wait(cw);  // the other consumer's last hand-over
  rows.store(p, blk.b, blk.h, blk.row0);
#else
  __trap();  // launched only where the binary has sm_90a code (see attention/launch.cu)
#endif
}

}  // namespace mka::cuda
