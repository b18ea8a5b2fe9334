// Pieces the two tensor-core backward kernels (mma.sync and wgmma) share: the per-query-row
// statistics of a query block, and the write-out of a key block's dK and dV accumulators.
#pragma once
#include <type_traits>

#include "attention_params.cuh"
#include "lookback.cuh"
#include "mma_tile.cuh"

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
// block): with ScanThrough its (l1, l0); with ScanSums its level-2 routing weight times
// beta^(its place in its chunk), and 0; zeros past Tk or with neither.
struct KeyWeights {
  float a = 0.f, b = 0.f;
};
template <bool kScan>
__device__ __forceinline__ KeyWeights key_weights(const AttnParams& p, int64_t b, int64_t j0) {
  const int64_t j = j0 + threadIdx.x;
  if (j >= p.Tk) return {};
  if (kScan && p.scan.link) return {p.scan.l1.load(b, j, 1.f), p.scan.l0.load(b, j, 0.f)};
  const ScanSums& s = p.sums;
  if (!s.k) return {};
  return {s.l1.load(b, j, 1.f) * powf(s.beta, float(threadIdx.x % s.chunk)), 0.f};
}

// Bytes of shared memory put_dkdv_block needs (the kernels' own are larger).
// kStaged: with the old dK, dV rows an adding write-out stages (put_dkdv_block's kScan).
template <int D, int BN, bool kStaged = false> constexpr int dkdv_block_smem_bytes() {
  return 2 * BN * (D + 8) * 2 + 2 * BN * 4 + (kStaged ? 2 * BN * D * 2 : 0);
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

// This thread's memory m and first column c; false for threads past both memories' columns.
template <int D> __device__ __forceinline__ bool scan_place(int& m, int& c) {
  constexpr int per = D / kScanCols<D>;  // threads per memory
  m = threadIdx.x / per, c = threadIdx.x % per * kScanCols<D>;
  return threadIdx.x < 2 * per;
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

// The carry entering the last key of this thread's columns of block j0 / BN: the sequence's
// dstate_out for its last block, else the next block's end value if already published (it
// usually is: that block had less work), else kUnset. Loaded by the kernel at the start of
// its last query block, so its latency hides behind that block's products.
template <int D>
__device__ __forceinline__ ScanLane<D> scan_carry_early(const AttnParams& p, int64_t b,
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

// ScanThrough on a key block's dK, dV rows in shared memory (put_dkdv_block), in place: each
// thread walks the block's keys backward over its columns. Given the carry entering the last
// key (`carry_in`: scan_carry_early's), one walk makes u_r = a_r + beta^(n-1-r) carry, with
// a_r the block's own share (a zero carry at its end), and dX_r, and publishes the block's
// aggregate (beta a_0) and end value (beta u_0; block 0: dstate_in's). Where the next block
// had not yet published its end value, a first walk makes a_0 alone, publishes it, and the
// look-back over the blocks after this one gives the carry. w: the keys' (l1, l0).
template <class T, int D, int BN>
__device__ __forceinline__ void scan_through_block(const AttnParams& p, T* tiles, const float2* w,
                                                   int64_t b, int64_t g, int64_t j0,
                                                   ScanLane<D> carry_in) {
  constexpr int LD = D + 8, V = kScanCols<D>, kBatch = 8;
  int m, c;
  if (!scan_place<D>(m, c)) return;
  const ScanThrough& sc = p.scan;
  const float beta = sc.beta;
  const int n = int(min(int64_t(BN), p.Tk - j0));
  const int64_t nb = sc.n_blocks, jb = j0 / BN;
  T* const col = tiles + m * BN * LD + c;
  const ScanSlots sl(p, b, g, m, c);
  bool agg_published = jb == nb - 1;  // the last block's aggregate is never read
  if (!is_set(carry_in)) {
    float share[V] = {}, dy[V];
    #pragma unroll 8
    for (int r = n - 1; r >= 0; --r) {
      scan_load<T, V>(col + r * LD, dy);
      #pragma unroll
      for (int v = 0; v < V; ++v) share[v] = fmaf(beta, share[v], w[r].x * dy[v]);
    }
    #pragma unroll
    for (int v = 0; v < V; ++v) share[v] *= beta;
    publish(sl.agg + jb * sl.stride, scan_lane<V>(share));
    agg_published = true;
    // The blocks after this one, walked as the predecessors of a reverse scan.
    carry_in = look_back<ScanLane<D>>(
        nb - 1 - jb, powf(beta, float(BN)),
        [&](int64_t k) { return sl.end + (nb - 1 - k) * sl.stride; },
        [&](int64_t k) { return sl.agg + (nb - 1 - k) * sl.stride; });
  }
  float carry[V], a[V] = {}, u[V] = {}, decay = 1.f;  // decay = beta^(n - 1 - r)
  scan_cols<V>(carry_in, carry);
  const auto key = [&](int r, const float (&dy)[V], float2 wr) {
    float dx[V];
    #pragma unroll
    for (int v = 0; v < V; ++v) {
      a[v] = fmaf(beta, a[v], wr.x * dy[v]);
      u[v] = fmaf(decay, carry[v], a[v]);
      dx[v] = fmaf(1.f - beta, u[v], wr.y * dy[v]);
    }
    scan_store<T, V>(col + r * LD, dx);
    decay *= beta;
  };
  int r = n - 1;
  for (; r >= kBatch - 1; r -= kBatch) {  // a batch's loads first: one latency per batch
    float dy[kBatch][V];
    float2 wr[kBatch];
    #pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      scan_load<T, V>(col + (r - k) * LD, dy[k]);
      wr[k] = w[r - k];
    }
    #pragma unroll
    for (int k = 0; k < kBatch; ++k) key(r - k, dy[k], wr[k]);
  }
  for (; r >= 0; --r) {
    float dy[V];
    scan_load<T, V>(col + r * LD, dy);
    key(r, dy, w[r]);
  }
  #pragma unroll
  for (int v = 0; v < V; ++v) a[v] *= beta, u[v] *= beta;
  if (!agg_published) publish(sl.agg + jb * sl.stride, scan_lane<V>(a));
  if (jb > 0) {
    publish(sl.end + jb * sl.stride, scan_lane<V>(u));
  } else if (sc.dstate_in[m].data) {
    float* ds = sc.dstate_in[m].at(b, g) + c;
    #pragma unroll
    for (int v = 0; v < V; ++v) ds[v] = sc.add_state ? ds[v] + u[v] : u[v];
  }
}

// Hands over a key block's dK (times the softmax scale) and dV, BN = 16 keys per warp, through
// shared memory: each thread's accumulator rows (keys kr0 and kr0 + 8, kr0 = the warp's first
// key + lane / 4, columns dt * 8 + (lane % 4) * 2 + {0, 1}: the m16n8 layout) go in rounded to
// T; the block then adds or stores (p.kv_grad) whole rows in 16-byte pieces and, where asked
// (p.sums), makes the EMA scan's chunk sums sum_t beta^(t - t0) l1_t dY_t from the same
// rounded rows the scan's later passes read. smem: dkdv_block_smem_bytes, free to overwrite.
// kw: key_weights', loaded before the kernel's main loop. kScan: the kernel may run
// ScanThrough (p.scan), which then replaces the write-out's dK, dV with the scan's dX (carry:
// scan_carry_early's, loaded by the kernel during its last query block), and an
// adding write-out stages the old rows by cp.async first (their latency behind the scan;
// smem: dkdv_block_smem_bytes<D, BN, true>).
template <class T, int D, int BN, int THREADS, bool kScan = false>
__device__ __forceinline__ void put_dkdv_block(const AttnParams& p, unsigned char* smem,
                                               int64_t b, int64_t g, int64_t j0,
                                               const float (&dk)[D / 8][4],
                                               const float (&dv)[D / 8][4], KeyWeights kw,
                                               ScanLane<D> carry = {}) {
  static_assert(BN == THREADS / 32 * 16 && BN <= THREADS, "16 keys per warp");
  static_assert(sizeof(T) == 2 && BN % 16 == 0, "dkdv_block_smem_bytes; chunks start at j0");
  constexpr int LD = D + 8, P = D / 8;  // padded rows: conflict-free fragment writes
  T* const tiles = reinterpret_cast<T*>(smem);  // dK's, then dV's
  const auto tile = [&](int m) { return tiles + m * BN * LD; };
  float* weight = reinterpret_cast<float*>(smem + 2 * BN * LD * sizeof(T));  // [2][BN]
  const int lane = threadIdx.x % 32, row0 = threadIdx.x / 32 * 16 + lane / 4;
  const ScanSums& sums = p.sums;
  const bool scan = kScan && p.scan.link;
  __syncthreads();  // every warp is done with the main loop's tiles
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
    if (scan) reinterpret_cast<float2*>(weight)[threadIdx.x] = make_float2(kw.a, kw.b);
    else if (sums.k) weight[threadIdx.x] = kw.a;
  }
  __syncthreads();
  if constexpr (kScan) {
    if (scan)
      scan_through_block<T, D, BN>(p, tiles, reinterpret_cast<const float2*>(weight), b, g, j0,
                                   carry);
    if (staged) mma::cp_async_wait<0>();
    if (scan || staged) __syncthreads();
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
