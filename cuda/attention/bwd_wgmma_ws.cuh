// Attention backward for Hopper, warp-specialised: the lockstep backward's tiles and products
// (bwd_wgmma.cuh) with FlashAttention-3's schedule around them. Warpgroups 0 and 1 are the
// consumers (64 keys each, dK and dV in registers); warpgroup 2 is the producer: one thread
// loads K and V once and each query block's Q, dO and row statistics (lse, delta) by TMA into
// two stages, and it gives its registers to the consumers (setmaxnreg). Every shared-memory
// write the consumers wait for is TMA's, completing on an mbarrier. The consumers never issue
// a copy or wait on a block-wide barrier in the loop:
//   wait for the stage (mbarrier);
//   S^T = K Q^T and dP^T = V dO^T as two wgmma groups: P's exponentials run under dP;
//   dV += (w P)^T dO and dK += dS^T Q issued, then dS^T stored (two stages) while they run;
//   one named barrier (d = 128: both consumers, whose dQ columns read every key's dS^T;
//   d = 64 at 128 query rows: both, whose dQ rows read every key's; d = 64 at 64 rows: the
//   warpgroup alone, each dQ sums its own keys), dQ = dS K issued;
//   wait for all three, release the stage; dQ (times the scale) into the warpgroup's float32
//   panels in shared memory, and one thread adds them onto the float32 accumulator by TMA
//   reductions (FlashAttention-3's dQ path: the L2 does the adds, the consumers issue no
//   atomics). The issuing thread waits for its last reduction to have read the panels before
//   the next block's dS^T barrier, after which they are overwritten.
// A query block is BM = 64 rows (d = 128: dQ split by columns) or 128 rows (d = 64, FA3's tile
// for that head size: twice the products per step for the same barriers, waits and dQ
// reduction; dQ split by rows; S^T and dP^T m64n128, 64 + 64 accumulators per thread beside
// dK and dV's 32 + 32). d = 64 at BM = 64 remains for ScanThrough's dlam, whose region does
// not fit beside BM = 128's stages.
// A consumer can run a query block ahead of the other. The stage it refills waits for every
// consumer warp's release (the empty mbarrier); where both consumers read all of dS^T the
// buffer it reuses is the other's two blocks back, which the shared barrier of the block
// between orders (at d = 64, BM = 64 each warpgroup reads only its own rows of dS^T).
// The write-out (put_dkdv_block) runs on the consumers alone: its barriers count 256 threads.
// Row weights w (mka's levels) arrive as a third statistics box, from a float32 copy of w
// made before the kernel (ws_row_weights). ScanThrough (fastmka) runs in the write-out as in
// the lockstep kernel; with its dlam the consumers stage x by cp.async before the loop, which
// fits beside the stages at d = 64 only (d = 128 with dlam takes the lockstep kernel).
#pragma once
#include "attention/bwd_wgmma.cuh"
#include "common/tma.cuh"

namespace mka::cuda {

constexpr int kWsBwdThreads = 384;
constexpr int kWsProducerRegs = 32, kWsConsumerRegs = 232;
static_assert(128 * kWsProducerRegs + 2 * 128 * kWsConsumerRegs <=
                  65536 / kWsBwdThreads / 8 * 8 * kWsBwdThreads,
              "the producer's registers must cover the consumers' setmaxnreg");

struct BwdMaps {
  CUtensorMap q, dout, k, v;  // 64-column boxes of BM (q, dout) and kWgBwdBlockN rows
  CUtensorMap lse, delta;     // (B * H * Tq) floats in boxes of ws_stat_box<BM>()
  CUtensorMap w;              // (B * Tq) floats, boxes of ws_stat_box<BM>(): with row weights only
  CUtensorMap dq;             // the float32 accumulator (B, Tq, H, D): 32-column boxes of kWsDqRows rows
};

// A query block's statistics start at any element, a TMA box at a multiple of 16 bytes: the
// box starts up to 3 elements early and is 4 longer; each box has a slot of a multiple of
// 256 bytes.
template <int BM> constexpr int ws_stat_box() { return BM + 4; }
template <int BM> constexpr int ws_stat_slot() { return (BM + 4 + 63) / 64 * 64; }

// The shared memory after the alignment: K, V; Q, dO and dS^T in two stages; lse, delta and w
// in two stages; mbarriers (K/V; full and empty per stage); each consumer's dQ (64 rows) as
// two float32 sw128 panels (64 x 32), 1024-byte aligned; with ScanThrough's dlam its region
// (wg_bwd_dlam_smem_bytes) from ws_bwd_dlam_at.
template <int D, int BM> constexpr int ws_bwd_bars_at() {
  constexpr int BN = kWgBwdBlockN;
  return (2 * BN * D + 2 * 2 * BM * D + 2 * BN * BM) * 2 + 2 * 3 * ws_stat_slot<BM>() * 4;
}
constexpr int kWsDqRows = 64;                          // a consumer's dQ rows per step
constexpr int kWsDqPanels = 2 * 2 * kWsDqRows * 32 * 4;  // 2 consumers x 2 panels, bytes
template <int D, int BM> constexpr int ws_bwd_dq_at() {
  return (ws_bwd_bars_at<D, BM>() + 5 * 8 + 1023) / 1024 * 1024;
}
template <int D, int BM> constexpr int ws_bwd_dlam_at() { return ws_bwd_dq_at<D, BM>() + kWsDqPanels; }
template <int D, int BM> constexpr int ws_bwd_smem_bytes(bool dlam = false) {
  return ws_bwd_dlam_at<D, BM>() + (dlam ? wg_bwd_dlam_smem_bytes<D>() : 0) + 1024;  // + alignment
}
// Whether ScanThrough's dlam fits (227 KiB a block on Hopper): at d = 64 and 64 rows only.
template <int D, int BM> constexpr bool ws_bwd_takes_dlam() {
  return ws_bwd_smem_bytes<D, BM>(true) <= 227 * 1024;
}
static_assert(ws_bwd_smem_bytes<64, 128>() <= 227 * 1024 && ws_bwd_takes_dlam<64, 64>() &&
              !ws_bwd_takes_dlam<128, 64>());

// w as float32, contiguous (B * Tq): the warp-specialised backward's third statistics box.
static __global__ void ws_row_weights(TokenScalar w, float* out, int64_t Tq, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = w.load(i / Tq, i % Tq, 1.f);
}

__device__ __forceinline__ void consumers_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// This thread's dQ fragment (64 rows x 64 columns per warpgroup, times the scale) into the
// warpgroup's two float32 panels of 32 columns in the 128-byte swizzle the reduction's tensor
// map reads: chunk c (16 bytes) of row r sits at chunk c ^ (r % 8), so a warp's float2 stores
// of 8 rows spread over all 32 banks (256 bytes in two wavefronts, unless the hardware splits
// 8-byte stores by half-warp, where rows r and r ^ 1 share banks: not profiled).
__device__ __forceinline__ void ws_stage_dq(float* panels, const float (&dq)[8][4], int warp,
                                            int lane, float scale) {
  #pragma unroll
  for (int dt = 0; dt < 8; ++dt) {
    float* panel = panels + (dt / 4) * kWsDqRows * 32;
    const int chunk = (dt % 4) * 2 + (lane % 4) / 2;
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + lane / 4 + r * 8;
      *reinterpret_cast<float2*>(panel + row * 32 + (chunk ^ (row % 8)) * 4 + (lane % 2) * 2) =
          make_float2(dq[dt][2 * r] * scale, dq[dt][2 * r + 1] * scale);
    }
  }
}

template <class T, int D, int BM, bool kDrop = false>
__global__ void __launch_bounds__(kWsBwdThreads, 1)
    attention_bwd_wgmma_ws(const __grid_constant__ BwdMaps maps, AttnParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace mma;
  constexpr int BN = kWgBwdBlockN, KS = D / 16, DT = D / 8, MT = BM / 8;
  constexpr int kStatBox = ws_stat_box<BM>(), kStatSlot = ws_stat_slot<BM>();
  constexpr unsigned kKVBytes = 2 * BN * D * 2;                  // K + V
  constexpr unsigned kQBytes = 2 * BM * D * 2 + 2 * kStatBox * 4;  // Q + dO + lse + delta
  constexpr int kSlots = 3;  // statistics per stage: lse, delta, w
  static_assert((D == 128 && BM == 64) || (D == 64 && (BM == 64 || BM == 128)),
                "dS^T in one or two 128-byte panels per key row; dQ by columns or rows");
  extern __shared__ unsigned char smem_raw[];
  unsigned char* base = wgmma::align1024(smem_raw);
  T* ks = reinterpret_cast<T*>(base);  // BN x D
  T* vs = ks + BN * D;                 // BN x D
  T* qs = vs + BN * D;                 // [2][BM x D]
  T* dos = qs + 2 * BM * D;            // [2][BM x D]
  T* dsts = dos + 2 * BM * D;          // [2][dS^T: BN x BM (BM / 64 panels)]
  float* stats = reinterpret_cast<float*>(dsts + 2 * BN * BM);  // [2][lse, delta, w][slot]
  float* dqs = reinterpret_cast<float*>(base + ws_bwd_dq_at<D, BM>());  // [2 consumers][2 panels]
  uint64_t* kvbar = reinterpret_cast<uint64_t*>(stats + 2 * kSlots * kStatSlot);
  uint64_t* full = kvbar + 1;  // [2]: the stage's Q, dO and statistics landed
  uint64_t* empty = full + 2;  // [2]: every consumer warp is done with the stage

  // The warpgroup from threadIdx, not wgmma::warpgroup(): made uniform, it kept more values in
  // registers across the loop and the d = 128 consumers spilled ~100 bytes.
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const WgBwdBlock<BN, BM> blk(p);
  const int64_t g = blk.g, b = blk.b, j0 = blk.j0, j_last = blk.j_last, q_hi = blk.q_hi;
  const int64_t mb0 = blk.mb0, nq = blk.nq, iters = blk.iters;
  const bool has_w = p.w.data != nullptr;

  if (threadIdx.x == 0) {
    mbar::init(kvbar, 1);
    for (int st = 0; st < 2; ++st) mbar::init(full + st, 1), mbar::init(empty + st, 8);
    mbar::fence_init();
  }
  __syncthreads();

  if (wg == 2) {  // producer: one thread issues every load, the others have nothing to do
    regs_down<kWsProducerRegs>();
    if (threadIdx.x != 256) return;
    tma::prefetch(maps.q), tma::prefetch(maps.dout), tma::prefetch(maps.k), tma::prefetch(maps.v);
    mbar::arrive_expect_tx(kvbar, kKVBytes);
    tma::load_tile<BN, D>(ks, maps.k, b, j0, g, kvbar);
    tma::load_tile<BN, D>(vs, maps.v, b, j0, g, kvbar);
    for (int64_t it = 0; it < iters; ++it) {
      const int st = int(it & 1);
      if (it >= 2) mbar::wait(empty + st, unsigned((it >> 1) - 1) & 1u);
      const int64_t h = g * p.group + it / nq, i0 = (mb0 + it % nq) * BM;
      // Statistics past Tq are the next head's (or zeros past the end): the consumers mask
      // those rows' P and take their delta as 0.
      const int at = int((b * p.H + h) * p.Tq + i0) & ~3;
      float* stat = stats + st * kSlots * kStatSlot;
      mbar::arrive_expect_tx(full + st, kQBytes + (has_w ? kStatBox * 4 : 0));
      tma::load_tile<BM, D>(qs + st * BM * D, maps.q, b, i0, h, full + st);
      tma::load_tile<BM, D>(dos + st * BM * D, maps.dout, b, i0, h, full + st);
      tma::load_floats(stat, maps.lse, at, full + st);
      tma::load_floats(stat + kStatSlot, maps.delta, at, full + st);
      if (has_w) tma::load_floats(stat + 2 * kStatSlot, maps.w, int(b * p.Tq + i0) & ~3, full + st);
    }
    return;
  }

  regs_up<kWsConsumerRegs>();
  const int64_t wj0 = j0 + wg * 64, wj_last = min(j_last, wj0 + 63);
  const int64_t kr0 = wj0 + warp * 16 + lane / 4;
  const float sl2 = p.scale * 1.4426950408889634f;
  const DropKeep drop(p.dropout);  // read only where kDrop
  const KeyWeights key_w = key_weights<true>(p, b, j0);  // its latency hides behind the loop
  // ScanThrough's dlam: x staged by the consumers' copies while the loop runs.
  constexpr int kDlamAt = ws_bwd_dlam_at<D, BM>();
  const bool dlam = p.scan.link && p.scan.dlam;  // as the launcher sized the shared memory
  if constexpr (ws_bwd_takes_dlam<D, BM>())
    if (dlam) scan_dlam_stage<T, D, BN, 256>(p, base + kDlamAt, b, g, j0, 0);
  float dk[DT][4] = {}, dv[DT][4] = {};
  auto& dk_flat = reinterpret_cast<float(&)[DT * 4]>(dk);
  auto& dv_flat = reinterpret_cast<float(&)[DT * 4]>(dv);
  const T* kw = ks + wg * 64 * 64;  // this warpgroup's 64 key rows in panel 0
  const T* vw = vs + wg * 64 * 64;
  float* dqw = dqs + wg * 2 * kWsDqRows * 32;  // this warpgroup's dQ panels
  const bool dq_issuer = threadIdx.x % 128 == 0;
  mbar::wait(kvbar, 0);

  for (int64_t it = 0; it < iters; ++it) {
    const int st = int(it & 1);
    const int64_t h = g * p.group + it / nq, i0 = (mb0 + it % nq) * BM;
    mbar::wait(full + st, unsigned(it >> 1) & 1u);
    const T* qt = qs + st * BM * D;
    const T* dot = dos + st * BM * D;
    T* dst = dsts + st * BN * BM;
    const float* lse = stats + st * kSlots * kStatSlot + (int((b * p.H + h) * p.Tq + i0) & 3);
    const float* delta = lse + kStatSlot;
    const float* wr = stats + st * kSlots * kStatSlot + 2 * kStatSlot + (int(b * p.Tq + i0) & 3);

    float s[MT][4] = {}, dp[MT][4] = {};
    auto& s_flat = reinterpret_cast<float(&)[MT * 4]>(s);
    auto& dp_flat = reinterpret_cast<float(&)[MT * 4]>(dp);
    wgmma::fence();
    #pragma unroll
    for (int kk = 0; kk < KS; ++kk) wg_bwd_scores_step<T, BN, BM>(s_flat, kw, qt, kk);  // S^T
    wgmma::commit();
    #pragma unroll
    for (int kk = 0; kk < KS; ++kk) wg_bwd_scores_step<T, BN, BM>(dp_flat, vw, dot, kk);  // dP^T
    wgmma::commit();
    // Dropout's keep bits while the products run.
    const auto keep = wg_bwd_keep<kDrop, MT>(drop, uint64_t(b * p.H + h), i0, wj0 + warp * 16);
    wgmma::wait<1>();  // S^T (groups complete in order)
    wgmma::fence_regs(s_flat);

    // s <- w P while dP^T runs (masked per element only on tiles that cross a band edge, which
    // every tile with rows past Tq is).
    const bool full_tile = wg_bwd_full_tile<BM>(p, i0, q_hi, wj0, wj_last);
    auto weights = [&](auto masked) {
      int rlo[2], rhi[2];
      if constexpr (decltype(masked)::value) wg_bwd_key_band<BM>(p, kr0, i0, rlo, rhi);
      #pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = mt * 8 + (lane % 4) * 2 + (e & 1);
          float pr = wgmma::ex2(fmaf(s[mt][e], sl2, -lse[r] * 1.4426950408889634f));
          if (has_w) pr *= wr[r];  // before the mask: past Tq w is another row's
          if constexpr (decltype(masked)::value)
            if (r < rlo[e >> 1] || r >= rhi[e >> 1]) pr = 0.f;
          s[mt][e] = pr;
        }
    };
    if (full_tile)
      weights(std::false_type{});
    else
      weights(std::true_type{});
    wgmma::wait<0>();  // dP^T
    wgmma::fence_regs(dp_flat);
    // dp <- dS = w P (dP - delta), s <- w P for dV; with dropout w P (Z dP - delta), w P Z. Rows past
    // Tq hold another head's delta, which may be Inf or NaN (its dO's): 0 there, else 0 times
    // it would reach dK through dS.
    const bool past_tq = i0 + BM > p.Tq;
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = mt * 8 + (lane % 4) * 2 + (e & 1);
        const float dl = past_tq && i0 + r >= p.Tq ? 0.f : delta[r];
        if constexpr (kDrop) {
          const unsigned kb = unsigned(keep >> (4 * mt));
          dp[mt][e] = s[mt][e] * (drop.apply(kb, e, dp[mt][e]) - dl);
          s[mt][e] = drop.apply(kb, e, s[mt][e]);
        } else {
          dp[mt][e] = s[mt][e] * (dp[mt][e] - dl);
        }
      }

    const WgBwdPacked<T, BM> packed(s, dp);
    wg_bwd_issue_dvdk<T, D, BM>(dv_flat, dk_flat, packed, qt, dot);
    wg_bwd_store_ds<T, BN, BM>(dst, packed, wg * 64 + warp * 16 + lane / 4, lane);  // while dV, dK run
    wgmma::fence_async_smem();
    if (dq_issuer) tma::wait_read<0>();  // the last block's dQ panels are read: free after the barrier
    // dQ's products read dS^T of both halves at d = 128 and at 128 rows (both consumers
    // meet), of its own keys at d = 64, 64 rows (its warpgroup only).
    if constexpr (D == 128 || BM == 128)
      consumers_sync(1, 256);
    else
      consumers_sync(2 + wg, 128);
    float dq[8][4] = {};
    const int2 at = wg_bwd_dq<T, D, BN, BM>(dq, dst, ks, wg, dk_flat, dv_flat);  // column, row
    __syncwarp();
    if (lane == 0) mbar::arrive(empty + st);  // this warp's reads of Q, dO and the statistics
    ws_stage_dq(dqw, dq, warp, lane, p.scale);
    wgmma::fence_async_smem();  // the panels' writes before the reduction reads them
    consumers_sync(4 + wg, 128);
    if (dq_issuer) {
      #pragma unroll
      for (int c = 0; c < 2; ++c)
        tma::reduce_add(maps.dq, dqw + c * kWsDqRows * 32, at.x + c * 32, int(h), int(i0) + at.y,
                        int(b));
      tma::commit();
    }
  }

  if constexpr (ws_bwd_takes_dlam<D, BM>())
    if (dlam) mma::cp_async_wait<0>();  // the write-out's first barrier publishes x
  static_assert(dkdv_block_smem_bytes<D, BN, true>() <= ws_bwd_bars_at<D, BM>(),
                "the write-out stays clear of the mbarriers and dlam's region");
  put_dkdv_block<T, D, BN, 256, true>(p, base, b, g, j0, dk, dv, key_w, base + kDlamAt);
  if (dq_issuer) tma::wait_done<0>();  // the reductions complete before the block retires
#else
  __trap();  // launched only where the binary has sm_90a code (see attention/launch.cu)
#endif
}

}  // namespace mka::cuda
