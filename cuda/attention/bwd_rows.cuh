// Pieces the two tensor-core backward kernels (mma.sync and wgmma) share: the per-query-row
// statistics of a query block, and the write-out of a key block's dK and dV accumulators.
#pragma once
#include <type_traits>

#include "attention/params.cuh"
#include "common/lookback.cuh"
#include "mma/mma_tile.cuh"

namespace mka::cuda {

// lse (in log2 units), delta and the dout weight w of query rows [i0, i0 + BM) of head h
// into st[0..BM), st[BM..2BM), st[2BM..3BM); zeros past Tq (those rows contribute nothing).
template <int BM, int THREADS>
__device__ __forceinline__ void load_row_stats(float* st, const AttnParams& p, int64_t b,
                                               int64_t h, int64_t i0) {
  for (int r = threadIdx.x; r < BM; r += THREADS) {
    const int64_t i = i0 + r;
    const bool in = i < p.Tq;
    st[r] = in ? p.lse_at(b, h)[i] * 1.4426950408889634f : 0.f;
    st[BM + r] = in ? p.delta_at(b, h)[i] : 0.f;
    st[2 * BM + r] = in ? p.w.load(b, i, 1.f) : 0.f;
  }
}

// One element of dK or dV of key j, kv head g, column c, handed over as p.kv_grad says.
template <class T>
__device__ __forceinline__ void put_kv_grad(const AttnParams& p, const Rows& r, int64_t b,
                                            int64_t j, int64_t g, int c, float x) {
  switch (p.kv_grad) {
    case KVGrad::add_io: {
      T* y = r.at<T>(b, j, g) + c;
      *y = from_f<T>(to_f(*y) + x);
      break;
    }
    case KVGrad::store_io: r.at<T>(b, j, g)[c] = from_f<T>(x); break;
  }
}

// Per-key weights of key j0 + threadIdx.x (threads below the block's key count), loaded by
// the kernel before its main loop (a memory latency in the write-out would stall the whole
// block): with ScanThrough the bits of its (l1, l0), converted in the write-out (scan_weights);
// with ScanSums its level-2 routing weight times beta^(its place in its chunk), and 0; zeros
// past Tk or with neither.
struct KeyWeights {
  float a = 0.f, b = 0.f;
};
template <bool kScan>
__device__ __forceinline__ KeyWeights key_weights(const AttnParams& p, int64_t b, int64_t j0) {
  const int64_t j = j0 + threadIdx.x;
  if (j >= p.Tk) return {};
  if (kScan && p.scan.link)
    return {__uint_as_float(p.scan.l1.bits(b, j, 1.f)), __uint_as_float(p.scan.l0.bits(b, j, 0.f))};
  const ScanSums& s = p.sums;
  if (!s.k) return {};
  return {s.l1.load(b, j, 1.f) * powf(s.beta, float(threadIdx.x % s.chunk)), 0.f};
}
__device__ __forceinline__ float2 scan_weights(const AttnParams& p, KeyWeights kw) {
  return make_float2(p.scan.l1.value(__float_as_uint(kw.a)), p.scan.l0.value(__float_as_uint(kw.b)));
}

// Bytes of shared memory put_dkdv_block needs (the kernels' own are larger).
// kStaged: with the old dK, dV rows an adding write-out stages and ScanThrough's exchange
// (put_dkdv_block's kScan).
template <int D> constexpr int scan_through_smem_bytes() { return 2 * 2 * D * 4; }
template <int D, int BN, bool kStaged = false> constexpr int dkdv_block_smem_bytes() {
  return 2 * BN * (D + 8) * 2 + 2 * BN * 4 + (kStaged ? 2 * BN * D * 2 + scan_through_smem_bytes<D>() : 0);
}

// The scan sums of a key block from its dK, dV rows in shared memory (put_dkdv_block): one
// thread per (memory, chunk of C keys, 8-column piece).
template <class T, int D, int BN, int THREADS, int C>
__device__ __forceinline__ void put_scan_sums(const AttnParams& p, const T* tiles,
                                              const float* weight, int64_t b, int64_t g,
                                              int64_t j0) {
  constexpr int LD = D + 8, P = D / 8, nc = BN / C;
  const ScanSums& sums = p.sums;
  for (int i = threadIdx.x; i < 2 * nc * P; i += THREADS) {
    const int m = i / (nc * P), c = i / P % nc, piece = i % P;
    const int64_t ci = j0 / C + c;
    if (ci >= sums.n_chunks) continue;
    float acc[8] = {};
    #pragma unroll
    for (int r = c * C; r < (c + 1) * C; ++r) {
      const uint4 x = *reinterpret_cast<const uint4*>(tiles + (m * BN + r) * LD + piece * 8);
      const T* xe = reinterpret_cast<const T*>(&x);
      const float w = weight[r];
      #pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += w * to_f(xe[e]);
    }
    float* out = (m ? sums.v : sums.k) + (b * sums.n_chunks + ci) * (p.G * p.d) + g * p.d +
                 piece * 8;
    reinterpret_cast<float4*>(out)[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    reinterpret_cast<float4*>(out)[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
  }
}

// A barrier of the THREADS threads that run the write-out (the block's first THREADS): the
// warp-specialised backward's producer warps take no part (they return early, one of them
// after its last load), so __syncthreads, which counts every thread, cannot be used there.
template <int THREADS> __device__ __forceinline__ void rows_sync() {
  asm volatile("bar.sync 0, %0;\n" ::"n"(THREADS) : "memory");
}

// ScanThrough works on V = d / 64 adjacent columns per thread (one 2- or 4-byte piece of a
// row), 128 threads for both memories: half the instructions per column of one column per
// thread. A thread's values travel as one float or float2 (ScanLane).
template <int D> constexpr int kScanCols = D / 64;
template <int D> using ScanLane = std::conditional_t<kScanCols<D> == 1, float, float2>;
template <int V>
__device__ __forceinline__ std::conditional_t<V == 1, float, float2> scan_lane(const float (&x)[V]) {
  if constexpr (V == 1) return x[0];
  else return make_float2(x[0], x[1]);
}
template <int V> __device__ __forceinline__ void scan_cols(float x, float (&y)[V]) { y[0] = x; }
template <int V> __device__ __forceinline__ void scan_cols(float2 x, float (&y)[V]) {
  y[0] = x.x, y[1] = x.y;
}
template <class T, int V> __device__ __forceinline__ void scan_load(const T* p, float (&x)[V]) {
  if constexpr (V == 1) {
    x[0] = to_f(*p);
  } else {
    const unsigned r = *reinterpret_cast<const unsigned*>(p);
    const T* e = reinterpret_cast<const T*>(&r);
    x[0] = to_f(e[0]), x[1] = to_f(e[1]);
  }
}
template <class T, int V> __device__ __forceinline__ void scan_store(T* p, const float (&x)[V]) {
  if constexpr (V == 1) *p = from_f<T>(x[0]);
  else *reinterpret_cast<unsigned*>(p) = mma::pack2<T>(x[0], x[1]);
}

// ScanThrough's 256 threads take two halves of a key block: threads 0..127 (segment 1, true)
// its upper keys [BN / 2, n), threads 128..255 (segment 0) its lower keys [0, BN / 2), each
// on memory m's columns from c (both halves the same columns).
template <int D> __device__ __forceinline__ bool scan_place(int& m, int& c) {
  constexpr int per = D / kScanCols<D>;  // threads per memory: 2 * per = 128
  const int t = threadIdx.x % (2 * per);
  m = t / per, c = t % per * kScanCols<D>;
  return threadIdx.x < 2 * per;  // segment 1
}

// ScanThrough's slots (aggregate, end value) of memory m, columns from c, kv head g; block
// jb's at agg + jb * stride, end + jb * stride.
struct ScanSlots {
  float* agg;  // beta times the block's share of u at its first key (a zero carry at its end)
  float* end;  // beta u at the block's first key
  int64_t stride;
  __device__ __forceinline__ ScanSlots(const AttnParams& p, int64_t b, int64_t g, int m, int c) {
    const ScanThrough& sc = p.scan;
    stride = 2 * p.G * p.d;
    agg = sc.link + (b * sc.n_blocks * 2 + m) * p.G * p.d + g * p.d + c;
    end = agg + p.B * sc.n_blocks * stride;
  }
};

// The carry entering the last key of this thread's columns of block j0 / BN (the upper half's
// threads; others get zeros): the sequence's dstate_out for its last block, else the next
// block's end value if already published (it usually is by the write-out: that block had less
// work), else kUnset. Loaded as the write-out starts; its latency hides behind the walk.
template <int D>
__device__ __forceinline__ ScanLane<D> scan_carry_peek(const AttnParams& p, int64_t b,
                                                        int64_t g, int64_t j0, int64_t BN) {
  constexpr int V = kScanCols<D>;
  int m, c;
  float x[V] = {};
  if (!scan_place<D>(m, c)) return scan_lane<V>(x);
  const ScanThrough& sc = p.scan;
  const int64_t jb = j0 / BN;
  if (jb < sc.n_blocks - 1) {
    const ScanSlots sl(p, b, g, m, c);
    return peek<ScanLane<D>>(sl.end + (jb + 1) * sl.stride);
  }
  if (sc.dstate_out[m].data)
    #pragma unroll
    for (int v = 0; v < V; ++v) x[v] = sc.dstate_out[m].at(b, g)[c + v];
  return scan_lane<V>(x);
}

// ScanThrough's dlam: its shared memory (wg_bwd_dlam_smem_bytes): x of memory m, key r at
// xs + (m * BN + r) * D, then the block's sums per key and level, acc[2 * r + level].
template <int D, int BN> __device__ __forceinline__ float* dlam_acc(unsigned char* smem) {
  return reinterpret_cast<float*>(smem + 2 * BN * D * 2);
}
// Stages the block's x rows (k, v of keys j0.., kv head g; rows past Tk zero-filled) by
// cp.async and zeroes the sums; called before the main loop, after its first tiles' group is
// committed. The copies are left uncommitted where the loop has a second query block: they
// join that block's group, so they land while the first block computes and are waited for
// with the second's tiles, not the first's; else they form their own group, which the loop's
// last wait (or the one after it) waits for.
template <class T, int D, int BN, int THREADS>
__device__ __forceinline__ void scan_dlam_stage(const AttnParams& p, unsigned char* smem,
                                                int64_t b, int64_t g, int64_t j0, int64_t iters) {
  constexpr int P = D / 8, kRows = THREADS / P;  // a thread's piece column is fixed
  static_assert(THREADS % P == 0 && BN % kRows == 0);
  const int piece = threadIdx.x % P, r0 = threadIdx.x / P;
  #pragma unroll
  for (int m = 0; m < 2; ++m) {
    const Rows& x = p.scan.x[m];
    const T* src = x.template at<T>(b, j0, g) + piece * 8;
    T* dst = reinterpret_cast<T*>(smem) + (m * BN + r0) * D + piece * 8;
    #pragma unroll 4
    for (int r = r0; r < BN; r += kRows, dst += kRows * D) {
      const bool in = j0 + r < p.Tk;  // else 16 zeros, read from row 0's valid address
      mma::cp_async16(dst, src + (in ? r * x.st : 0), in);
    }
  }
  if (iters < 2) mma::cp_async_commit();
  for (int i = threadIdx.x; i < 2 * BN; i += THREADS) dlam_acc<D, BN>(smem)[i] = 0.f;
}

// With dlam: the forward EMA entering the first key of this thread's half block (both
// halves' threads), from the forward's chunk start states; loaded as the write-out starts.
template <int D, int BN>
__device__ __forceinline__ ScanLane<D> scan_dlam_ema_in(const AttnParams& p, int64_t b,
                                                        int64_t g, int64_t j0) {
  constexpr int V = kScanCols<D>;
  int m, c;
  const int64_t j = j0 + (scan_place<D>(m, c) ? BN / 2 : 0);
  const ScanThrough& sc = p.scan;
  float x[V] = {};
  if (j >= p.Tk) return scan_lane<V>(x);
  return *reinterpret_cast<const ScanLane<D>*>(sc.carry[m] + (b * sc.n_chunks + j / sc.chunk) * p.G * p.d + g * p.d + c);
}

// ScanThrough on a key block's dK, dV rows in shared memory (put_dkdv_block), in place, by
// all 256 threads, each half of them on S = BN / 2 of the keys (scan_place), in two phases.
// With u_r = l1_r dY_r + beta u_{r+1} and dX_r = l0_r dY_r + (1 - beta) u_r:
//   1. each thread walks its half's keys backward from a zero carry: a_r = l1_r dY_r +
//      beta a_{r+1}, keeping z_r = l0_r dY_r + (1 - beta) a_r in registers;
//   2. given the carry c entering its half's last key, u_r = a_r + beta^(last - r) c, so
//      dX_r = z_r + (1 - beta) beta^(last - r) c: no dependent chain left.
// The upper half's carry is the one entering the block (`carry_in`, scan_carry_peek's); the
// lower half's is beta (a_S + beta^(n1 - 1) carry_in), n1 >= 1 the upper half's keys (none:
// carry_in itself). Where the next
// block had not published its end value when peeked, the lower half publishes this block's
// aggregate (beta a_0 from a zero carry: beta (a_0 + beta^n0 a_S), n0 its own keys) and takes
// the carry from the look-back over the blocks after this one. The lower half publishes the
// block's end value, beta u_0 (block 0: into dstate_in). Rows past Tk hold zeros and have zero
// weights (a stays 0 over them), so the walk needs no bounds and its loads can go ahead.
// With sc.dlam, a forward walk over each half's keys first makes dlam's sums (below).
// w: the keys' (l1, l0); xchg: scan_through_smem_bytes of shared memory; dlam_smem: the
// staged x and the sums (scan_dlam_stage); ema_in: scan_dlam_ema_in's start state.
template <class T, int D, int BN>
__device__ __forceinline__ void scan_through_block(const AttnParams& p, T* tiles, const float2* w,
                                                   float* xchg, int64_t b, int64_t g, int64_t j0,
                                                   ScanLane<D> carry_in,
                                                   unsigned char* dlam_smem, ScanLane<D> ema_in) {
  constexpr int LD = D + 8, V = kScanCols<D>, S = BN / 2;
  int m, c;
  const bool upper = scan_place<D>(m, c);
  const ScanThrough& sc = p.scan;
  const float beta = sc.beta;
  const int n = int(min(int64_t(BN), p.Tk - j0)), base = upper ? S : 0;
  const int nl = max(0, min(n - base, S));  // this half's keys
  const int64_t nb = sc.n_blocks, jb = j0 / BN;
  T* const col = tiles + (m * BN + base) * LD + c;
  const float2* const wh = w + base;
  float* const x_carry = xchg + m * D + c;  // the upper half's carry (kUnset: not yet known)
  float* const x_share = x_carry + 2 * D;   // a_S
  const bool dlam = sc.dlam != nullptr;
  // dlam: a forward walk over this half's keys, (<x, dY>, <s, dY>) over its columns per key,
  // with s = (1 - beta) sigma, sigma_r = beta sigma_{r-1} + x_r (one FMA per column; the
  // factor goes on the sums); each warp sums 16 keys' pairs at a time (one reduce-scatter),
  // its lanes add them into the block's sums.
  float* const acc = dlam_acc<D, BN>(dlam_smem);
  if (dlam) {
    float s0[V];  // sigma
    scan_cols<V>(ema_in, s0);
    #pragma unroll
    for (int v = 0; v < V; ++v) s0[v] /= 1.f - beta;
    const T* xcol = reinterpret_cast<const T*>(dlam_smem) + (m * BN + base) * D + c;
    #pragma unroll 1  // one copy of the body: the write-out runs once per block, from L2
    for (int q = 0; q < S / 16; ++q) {
      float pr[32];
      #pragma unroll
      for (int k = 0; k < 16; ++k) {
        const int r = q * 16 + k;
        float x[V], dy[V], p0 = 0.f, p1 = 0.f;
        scan_load<T, V>(xcol + r * D, x);
        scan_load<T, V>(col + r * LD, dy);
        #pragma unroll
        for (int v = 0; v < V; ++v) {
          s0[v] = fmaf(beta, s0[v], x[v]);
          p0 = fmaf(x[v], dy[v], p0);
          p1 = fmaf(s0[v], dy[v], p1);
        }
        pr[k] = p0, pr[16 + k] = p1;
      }
      const float sum = warp_reduce_scatter<32>(pr);  // lane l: key l % 16, level l / 16
      const int lane = threadIdx.x % 32;
      atomicAdd(acc + 2 * (base + q * 16 + lane % 16) + lane / 16,
                lane < 16 ? sum : (1.f - beta) * sum);
    }
  }
  float a[V] = {}, z[S][V];
  #pragma unroll
  for (int r = S - 1; r >= 0; --r) {
    float dy[V];
    scan_load<T, V>(col + r * LD, dy);
    const float2 wr = wh[r];
    #pragma unroll
    for (int v = 0; v < V; ++v) {
      a[v] = fmaf(beta, a[v], wr.x * dy[v]);
      z[r][v] = fmaf(1.f - beta, a[v], wr.y * dy[v]);
    }
  }
  float cin[V];
  if (upper) {
    scan_cols<V>(carry_in, cin);
    #pragma unroll
    for (int v = 0; v < V; ++v) x_carry[v] = cin[v], x_share[v] = a[v];
  }
  rows_sync<2 * BN>();  // the write-out's threads (2 per key)
  if (dlam && j0 + threadIdx.x / 2 < p.Tk)  // the block's sums: one atomic per key and level
    atomicAdd(sc.dlam + (b * p.Tk + j0) * 2 + threadIdx.x, acc[threadIdx.x]);
  if (!upper) {
    float share[V];
    bool set = true;
    #pragma unroll
    for (int v = 0; v < V; ++v) {
      cin[v] = x_carry[v], share[v] = x_share[v];
      set = set && is_set(cin[v]);
    }
    const bool known = set || jb == nb - 1;  // the last block's: dstate_out's, whatever its bits
    const float bn = powf(beta, float(n - S));  // n1 = n - S upper keys, if any
    if (!known) {
      // The block's aggregate first (its predecessors' look-backs may wait on it), then the
      // carry from its successors (the last block always knows its carry).
      float agg[V];
      const float bs = powf(beta, float(S));  // share is 0 without upper keys
      #pragma unroll
      for (int v = 0; v < V; ++v) agg[v] = beta * (a[v] + bs * share[v]);
      const ScanSlots sl(p, b, g, m, c);
      publish(sl.agg + jb * sl.stride, scan_lane<V>(agg));
      scan_cols<V>(look_back<ScanLane<D>>(
                       nb - 1 - jb, powf(beta, float(BN)),
                       [&](int64_t k) { return sl.end + (nb - 1 - k) * sl.stride; },
                       [&](int64_t k) { return sl.agg + (nb - 1 - k) * sl.stride; }),
                   cin);
      #pragma unroll
      for (int v = 0; v < V; ++v) x_carry[v] = cin[v];
    }
    if (n > S)
      #pragma unroll
      for (int v = 0; v < V; ++v) cin[v] = beta * share[v] + bn * cin[v];
  }
  rows_sync<2 * BN>();  // the write-out's threads (2 per key)
  if (upper)
    #pragma unroll
    for (int v = 0; v < V; ++v) cin[v] = x_carry[v];
  // Phase 2; rows past Tk get values never written out (decay stays 1 until key nl - 1).
  float decay = 1.f;  // beta^(nl - 1 - r)
  #pragma unroll
  for (int r = S - 1; r >= 0; --r) {
    float dx[V];
    #pragma unroll
    for (int v = 0; v < V; ++v) dx[v] = fmaf((1.f - beta) * decay, cin[v], z[r][v]);
    scan_store<T, V>(col + r * LD, dx);
    if (r == 0 && !upper)
      #pragma unroll
      for (int v = 0; v < V; ++v) a[v] = beta * fmaf(decay, cin[v], a[v]);  // beta u_0
    decay = r < nl ? decay * beta : 1.f;
  }
  if (upper) return;
  if (jb > 0) {
    const ScanSlots sl(p, b, g, m, c);
    publish(sl.end + jb * sl.stride, scan_lane<V>(a));
  } else if (sc.dstate_in[m].data) {
    float* ds = sc.dstate_in[m].at(b, g) + c;
    #pragma unroll
    for (int v = 0; v < V; ++v) ds[v] = sc.add_state ? ds[v] + a[v] : a[v];
  }
}

// Hands over a key block's dK (times the softmax scale) and dV, BN = 16 keys per warp, through
// shared memory: each thread's accumulator rows (keys kr0 and kr0 + 8, kr0 = the warp's first
// key + lane / 4, columns dt * 8 + (lane % 4) * 2 + {0, 1}: the m16n8 layout) go in rounded to
// T; the block then adds or stores (p.kv_grad) whole rows in 16-byte pieces and, where asked
// (p.sums), makes the EMA scan's chunk sums sum_t beta^(t - t0) l1_t dY_t from the same
// rounded rows the scan's later passes read. smem: dkdv_block_smem_bytes, free to overwrite.
// kw: key_weights', loaded before the kernel's main loop. kScan: the kernel may run
// ScanThrough (p.scan), which then replaces the write-out's dK, dV with the scan's dX, and an
// adding write-out stages the old rows by cp.async first (their latency behind the scan;
// smem: dkdv_block_smem_bytes<D, BN, true>). dlam_smem: with ScanThrough's dlam, the region
// scan_dlam_stage filled (the same [2][BN][D] row staging as the old rows', kept apart so it
// can start before the main loop).
template <class T, int D, int BN, int THREADS, bool kScan = false>
__device__ __forceinline__ void put_dkdv_block(const AttnParams& p, unsigned char* smem,
                                               int64_t b, int64_t g, int64_t j0,
                                               const float (&dk)[D / 8][4],
                                               const float (&dv)[D / 8][4], KeyWeights kw,
                                               unsigned char* dlam_smem = nullptr) {
  static_assert(BN == THREADS / 32 * 16 && BN <= THREADS, "16 keys per warp");
  static_assert(sizeof(T) == 2 && BN % 16 == 0, "dkdv_block_smem_bytes; chunks start at j0");
  static_assert(!kScan || THREADS == 2 * 2 * D / kScanCols<D>, "ScanThrough: two halves");
  constexpr int LD = D + 8, P = D / 8;  // padded rows: conflict-free fragment writes
  T* const tiles = reinterpret_cast<T*>(smem);  // dK's, then dV's
  const auto tile = [&](int m) { return tiles + m * BN * LD; };
  float* weight = reinterpret_cast<float*>(smem + 2 * BN * LD * sizeof(T));  // [2][BN]
  const int lane = threadIdx.x % 32, row0 = threadIdx.x / 32 * 16 + lane / 4;
  const ScanSums& sums = p.sums;
  const bool scan = kScan && p.scan.link;
  ScanLane<D> carry = {}, ema_in = {};
  if (kScan && scan) carry = scan_carry_peek<D>(p, b, g, j0, BN);
  if (kScan && scan && p.scan.dlam) ema_in = scan_dlam_ema_in<D, BN>(p, b, g, j0);
  rows_sync<THREADS>();  // every warp is done with the main loop's tiles
  // The old rows an adding write-out adds to, staged ([2][BN][P] 16-byte pieces).
  T* const old = reinterpret_cast<T*>(smem + 2 * BN * LD * sizeof(T) + 2 * BN * 4);
  const bool staged = kScan && p.kv_grad == KVGrad::add_io;
  if (staged) {
    for (int i = threadIdx.x; i < 2 * BN * P; i += THREADS) {
      const int m = i / (BN * P), r = i / P % BN, piece = i % P;
      const int64_t j = min(j0 + r, p.Tk - 1);  // rows past Tk: zero-filled, never read
      mma::cp_async16(old + i * 8, (m ? p.dv : p.dk).template at<T>(b, j, g) + piece * 8,
                      j0 + r < p.Tk);
    }
    mma::cp_async_commit();
  }
  #pragma unroll
  for (int r = 0; r < 2; ++r)
    #pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int at = (row0 + r * 8) * LD + dt * 8 + (lane % 4) * 2;
      *reinterpret_cast<unsigned*>(tile(0) + at) =
          mma::pack2<T>(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
      *reinterpret_cast<unsigned*>(tile(1) + at) = mma::pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  if (threadIdx.x < BN) {
    if (scan) reinterpret_cast<float2*>(weight)[threadIdx.x] = scan_weights(p, kw);
    else if (sums.k) weight[threadIdx.x] = kw.a;
  }
  rows_sync<THREADS>();
  if constexpr (kScan) {
    if (scan)
      scan_through_block<T, D, BN>(p, tiles, reinterpret_cast<const float2*>(weight),
                                   reinterpret_cast<float*>(old + 2 * BN * D), b, g, j0, carry,
                                   dlam_smem, ema_in);
    if (staged) mma::cp_async_wait<0>();
    if (scan || staged) rows_sync<THREADS>();
  }
  for (int i = threadIdx.x; i < 2 * BN * P; i += THREADS) {
    const int m = i / (BN * P), r = i / P % BN, piece = i % P;
    if (j0 + r >= p.Tk) continue;
    uint4 x = *reinterpret_cast<const uint4*>(tile(m) + r * LD + piece * 8);
    T* dst = (m ? p.dv : p.dk).template at<T>(b, j0 + r, g) + piece * 8;
    if (p.kv_grad == KVGrad::add_io) {
      const uint4 y = staged ? *reinterpret_cast<const uint4*>(old + i * 8)
                             : *reinterpret_cast<const uint4*>(dst);
      T* xe = reinterpret_cast<T*>(&x);
      const T* ye = reinterpret_cast<const T*>(&y);
      #pragma unroll
      for (int e = 0; e < 8; ++e) xe[e] = from_f<T>(to_f(xe[e]) + to_f(ye[e]));
    }
    *reinterpret_cast<uint4*>(dst) = x;
  }
  if (sums.k) {  // chunks of 8 or 16 keys: fixed loop bounds, the row loads pipelined
    if (sums.chunk == 8) put_scan_sums<T, D, BN, THREADS, 8>(p, tiles, weight, b, g, j0);
    else put_scan_sums<T, D, BN, THREADS, 16>(p, tiles, weight, b, g, j0);
  }
}

}  // namespace mka::cuda
