// Pieces the two tensor-core backward kernels (mma.sync and wgmma) share: the per-query-row
// statistics of a query block, and the write-out of a key block's dK and dV accumulators.
#pragma once
#include "attention_params.cuh"
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

// The scan-sum weight of key j0 + threadIdx.x (threads below the block's key count): its
// level-2 routing weight times beta^(its place in its chunk); 0 past Tk or without sums.
__device__ __forceinline__ float scan_sum_weight(const AttnParams& p, int64_t b, int64_t j0) {
  const ScanSums& s = p.sums;
  const int64_t j = j0 + threadIdx.x;
  if (!s.k || j >= p.Tk) return 0.f;
  return s.l1.load(b, j, 1.f) * powf(s.beta, float(threadIdx.x % s.chunk));
}

// Bytes of shared memory put_dkdv_block needs (the kernels' own are larger).
template <int D, int BN> constexpr int dkdv_block_smem_bytes() {
  return 2 * BN * (D + 8) * 2 + BN * 4;
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

// Hands over a key block's dK (times the softmax scale) and dV, BN = 16 keys per warp, through
// shared memory: each thread's accumulator rows (keys kr0 and kr0 + 8, kr0 = the warp's first
// key + lane / 4, columns dt * 8 + (lane % 4) * 2 + {0, 1}: the m16n8 layout) go in rounded to
// T; the block then adds or stores (p.kv_grad) whole rows in 16-byte pieces and, where asked
// (p.sums), makes the EMA scan's chunk sums sum_t beta^(t - t0) l1_t dY_t from the same
// rounded rows the scan's later passes read. smem: dkdv_block_smem_bytes, free to overwrite.
// sum_weight: scan_sum_weight's, loaded by the kernel before its main loop (a memory latency
// here would stall the whole block).
template <class T, int D, int BN, int THREADS>
__device__ __forceinline__ void put_dkdv_block(const AttnParams& p, unsigned char* smem,
                                               int64_t b, int64_t g, int64_t j0,
                                               const float (&dk)[D / 8][4],
                                               const float (&dv)[D / 8][4], float sum_weight) {
  static_assert(BN == THREADS / 32 * 16 && BN <= THREADS, "16 keys per warp");
  static_assert(sizeof(T) == 2 && BN % 16 == 0, "dkdv_block_smem_bytes; chunks start at j0");
  constexpr int LD = D + 8, P = D / 8;  // padded rows: conflict-free fragment writes
  T* const tiles = reinterpret_cast<T*>(smem);  // dK's, then dV's
  const auto tile = [&](int m) { return tiles + m * BN * LD; };
  float* weight = reinterpret_cast<float*>(smem + 2 * BN * LD * sizeof(T));
  const int lane = threadIdx.x % 32, row0 = threadIdx.x / 32 * 16 + lane / 4;
  const ScanSums& sums = p.sums;
  __syncthreads();  // every warp is done with the main loop's tiles
  #pragma unroll
  for (int r = 0; r < 2; ++r)
    #pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int at = (row0 + r * 8) * LD + dt * 8 + (lane % 4) * 2;
      *reinterpret_cast<unsigned*>(tile(0) + at) =
          mma::pack2<T>(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
      *reinterpret_cast<unsigned*>(tile(1) + at) = mma::pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  if (sums.k && threadIdx.x < BN) weight[threadIdx.x] = sum_weight;
  __syncthreads();
  for (int i = threadIdx.x; i < 2 * BN * P; i += THREADS) {
    const int m = i / (BN * P), r = i / P % BN, piece = i % P;
    if (j0 + r >= p.Tk) continue;
    uint4 x = *reinterpret_cast<const uint4*>(tile(m) + r * LD + piece * 8);
    T* dst = (m ? p.dv : p.dk).template at<T>(b, j0 + r, g) + piece * 8;
    if (p.kv_grad == KVGrad::add_io) {
      const uint4 y = *reinterpret_cast<const uint4*>(dst);
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
