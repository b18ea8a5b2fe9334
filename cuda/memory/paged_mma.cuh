// Paged decode attention on tensor cores (mma.sync m16n8k16): 16-bit pages, dk = dv = 64 or
// 128, 16-byte aligned rows. A block is (key split, sequence, kv head, up to 16 query rows =
// one m16 tile of the group's tokens x heads). Tiles of 64 keys stream through shared memory
// double-buffered with cp.async, gathered through the block table; each of the 4 warps owns
// 16 keys of a tile and keeps its own online softmax and output accumulator in registers (Q
// fragments loaded once), so the warps never wait on each other inside a tile; at the end
// they merge through shared memory. Each key and value byte is read once per (split, kv head)
// and from shared memory once per warp (ldmatrix) — the CUDA-core kernel read each key row
// once per query row, which bound it at a third of the bandwidth.
//
// MKA's level 2 (kEma): after level 1 of a tile, the tile's rows become their EMA in place
// (one thread per column, restarting from the page checkpoint at each page's first row), and
// a second softmax and accumulator run over them.
#pragma once
#include "memory/paged_params.cuh"
#include "mma/mma_tile.cuh"

namespace mka::cuda::paged {

constexpr int kMmaWarps = kThreads / 32;
static_assert(kTile == 16 * kMmaWarps, "a warp owns 16 keys of a tile");

template <int D> constexpr size_t mma_smem_bytes() {
  // Q (16 x D), then K and V in two stages; the merge reuses the stages.
  return size_t(16 * D + 2 * 2 * kTile * D) * 2;
}

// One level's per-warp state: the running max and sum of rows lane/4 and lane/4 + 8, and the
// output accumulator (16 rows x D in m16n8 tiles).
template <int D> struct WarpSoftmax {
  float m[2], l[2], o[D / 8][4];
  __device__ __forceinline__ void init() {
    m[0] = m[1] = -INFINITY, l[0] = l[1] = 0.f;
#pragma unroll
    for (int t = 0; t < D / 8; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  }
};

// Scores of this warp's 16 keys (rows j0 + 16 warp.. of the tile), masked; then the online
// softmax update and O += P V.
template <class T, int D>
__device__ __forceinline__ void mma_tile_level(const PagedArgs& a, const BlockKeys& bk,
                                               const unsigned (&qa)[D / 16][4], const T* sK,
                                               const T* sV, int64_t j0, bool windowed,
                                               WarpSoftmax<D>& st) {
  using namespace mma;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int k0 = 16 * warp;
  float s[2][4] = {};
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    unsigned b[4];
    load_b<D>(b, sK, k0, kk);
    mma16816<T>(s[0], qa[kk], b[0], b[1]);
    mma16816<T>(s[1], qa[kk], b[2], b[3]);
  }
  // Mask: row r = lane/4 + 8 (c >> 1), key j0 + k0 + 8 nt + 2 (lane % 4) + (c & 1).
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = lane / 4 + 8 * hr;
    const int64_t i = (bk.f0 + r) / a.grp;
    const int64_t hi = r < bk.R ? min(key_hi(a, i, bk.nk), bk.hi) : 0;
    const int64_t lo = windowed ? max(key_lo(a, i, bk.nk), bk.lo) : bk.lo;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t pos = j0 + k0 + 8 * nt + 2 * (lane % 4) + c;
        float& x = s[nt][2 * hr + c];
        x = (pos >= lo && pos < hi) ? x * a.scale_log2 : -INFINITY;
        mx[hr] = fmaxf(mx[hr], x);
      }
  }
  float alpha[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float m_new = fmaxf(st.m[hr], quad_max(mx[hr]));
    float sum = 0.f;
    if (m_new == -INFINITY) {
      alpha[hr] = 1.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) s[nt][2 * hr] = s[nt][2 * hr + 1] = 0.f;
    } else {
      alpha[hr] = exp2f(st.m[hr] - m_new);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) sum += (s[nt][2 * hr + c] = exp2f(s[nt][2 * hr + c] - m_new));
    }
    st.l[hr] = st.l[hr] * alpha[hr] + quad_sum(sum);
    st.m[hr] = m_new;
  }
#pragma unroll
  for (int t = 0; t < D / 8; ++t) {
    st.o[t][0] *= alpha[0], st.o[t][1] *= alpha[0];
    st.o[t][2] *= alpha[1], st.o[t][3] *= alpha[1];
  }
  unsigned pa[4];
  acc_to_a<T, 2>(pa, s, 0);
#pragma unroll
  for (int np = 0; np < D / 16; ++np) {
    unsigned b[4];
    load_b_trans<D>(b, sV, k0, np);
    mma16816<T>(st.o[2 * np], pa, b[0], b[1]);
    mma16816<T>(st.o[2 * np + 1], pa, b[2], b[3]);
  }
}

// Rows [j0, j0 + 64) of the split's keys, K and V, into a stage (zeros outside [lo, hi) and
// for invalid entries, which set bad).
template <class T, int D>
__device__ __forceinline__ void mma_issue_tile(const PagedArgs& a, const BlockKeys& bk, T* sK,
                                               T* sV, int64_t j0, int* bad) {
  using namespace mma;
  constexpr int kChunks = D / 8;
  for (int e = threadIdx.x; e < kTile * kChunks; e += kThreads) {
    const int r = e / kChunks, c = e % kChunks;
    const int64_t pos = j0 + r;
    int row = 0, page = -1;
    const bool in = pos >= bk.lo && pos < bk.hi;
    if (in) {
      page = page_of(a, bk.b, pos, row);
      if (page < 0) atomicOr(bad, 1);  // an atomic: many threads may set it
    }
    const bool ok = in && page >= 0;
    const T* k = static_cast<const T*>(a.kp);
    const T* v = static_cast<const T*>(a.vp);
    const T* ksrc = ok ? k + page * a.ks[0] + row * a.ks[1] + bk.g * a.ks[2] + c * 8 : k;
    const T* vsrc = ok ? v + page * a.vs[0] + row * a.vs[1] + bk.g * a.vs[2] + c * 8 : v;
    cp_async16(sK + swz<D>(r, c), ksrc, ok);
    cp_async16(sV + swz<D>(r, c), vsrc, ok);
  }
}

// The tile's rows turned into their EMA in place (float32 states, rounded to T), restarting
// from each page's checkpoint at its first row. st[u]: column threadIdx.x + 128 u of [K | V].
template <class T, int D>
__device__ __forceinline__ void mma_tile_ema(const PagedArgs& a, const BlockKeys& bk, T* sK,
                                             T* sV, const int* sStart, int64_t j0,
                                             float (&st)[2 * D / kThreads]) {
  using namespace mma;
  const float beta = a.beta, one_m = 1.f - a.beta;
  const int n = int(bk.hi - j0 < kTile ? bk.hi - j0 : kTile);
#pragma unroll
  for (int u = 0; u < 2 * D / kThreads; ++u) {
    const int cidx = threadIdx.x + u * kThreads;
    const bool is_v = cidx >= D;
    const int col = is_v ? cidx - D : cidx;
    T* buf = is_v ? sV : sK;
    const float* ckpt = is_v ? a.vst : a.kst;
    float s = st[u];
    for (int r = 0; r < n; ++r) {
      const int page = sStart[r];  // -2: not a page's first row; -1: an invalid page
      if (page > -2) s = page >= 0 ? ckpt[(int64_t(page) * a.G + bk.g) * D + col] : 0.f;
      T* e = buf + swz<D>(r, col >> 3) + (col & 7);
      s = fmaf(beta, s, one_m * to_f(*e));
      *e = from_f<T>(s);
    }
    st[u] = s;
  }
}

template <class T, int D, bool kEma>
__global__ void __launch_bounds__(kThreads) paged_attention_mma(const PagedArgs a) {
  using namespace mma;
  constexpr int kLevels = kEma ? 2 : 1;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* stage0 = sQ + 16 * D;  // [stage][K | V][kTile][D]
  __shared__ int bad;
  __shared__ float sM[kLevels][kMmaWarps][16], sL[kLevels][kMmaWarps][16];
  __shared__ float rowM[kLevels][16], rowL[kLevels][16];
  __shared__ int sStart[kTile];  // level 2: the page a tile row starts, -2 if none

  const BlockKeys bk = block_keys<kEma>(a);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) bad = bk.bad;
  // Q rows (zeros past R) into a swizzled tile.
  for (int e = threadIdx.x; e < 16 * (D / 8); e += kThreads) {
    const int r = e / (D / 8), c = e % (D / 8);
    const bool in = r < bk.R;
    const int f = bk.f0 + (in ? r : 0), i = f / a.grp, h = bk.g * a.grp + f % a.grp;
    const T* src = static_cast<const T*>(a.q) + bk.b * a.qs[0] + i * a.qs[1] + h * a.qs[2] + c * 8;
    cp_async16(sQ + swz<D>(r, c), src, in);
  }
  const int64_t t_begin = bk.lo / kTile, t_end = bk.hi > bk.lo ? ceil_div(bk.hi, kTile) : t_begin;
  auto stage = [&](int64_t t) { return stage0 + (int(t - t_begin) & 1) * 2 * kTile * D; };
  __syncthreads();  // bad's first value before the loads may set it
  if (t_begin < t_end) mma_issue_tile<T, D>(a, bk, stage(t_begin), stage(t_begin) + kTile * D,
                                            t_begin * kTile, &bad);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  unsigned qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a<D>(qa[kk], sQ, 0, kk);

  WarpSoftmax<D> lv[kLevels];
#pragma unroll
  for (int l = 0; l < kLevels; ++l) lv[l].init();
  float est[2 * D / kThreads] = {};

  for (int64_t t = t_begin; t < t_end; ++t) {
    cp_async_next_stage(t + 1 < t_end, [&] {
      mma_issue_tile<T, D>(a, bk, stage(t + 1), stage(t + 1) + kTile * D, (t + 1) * kTile, &bad);
    });
    __syncthreads();
    T* sK = stage(t);
    T* sV = sK + kTile * D;
    const int64_t j0 = t * kTile;
    if (j0 + kTile > bk.lo1) mma_tile_level<T, D>(a, bk, qa, sK, sV, j0, true, lv[0]);
    if constexpr (kEma) {
      if (threadIdx.x < kTile) {
        int row = 1;
        const int64_t pos = j0 + threadIdx.x;
        const int page = pos < bk.hi ? page_of(a, bk.b, pos, row) : -1;
        sStart[threadIdx.x] = row == 0 ? page : -2;
      }
      __syncthreads();
      mma_tile_ema<T, D>(a, bk, sK, sV, sStart, j0, est);
      __syncthreads();
      mma_tile_level<T, D>(a, bk, qa, sK, sV, j0, false, lv[kLevels - 1]);
    }
    __syncthreads();  // the stage is refilled next iteration
  }

  // Merge the warps: per row the max over warps, each warp's share rescaled into sO.
  float* sO = reinterpret_cast<float*>(stage0);  // [level][16][D]
  if (lane % 4 == 0)
#pragma unroll
    for (int l = 0; l < kLevels; ++l)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        sM[l][warp][lane / 4 + 8 * hr] = lv[l].m[hr];
        sL[l][warp][lane / 4 + 8 * hr] = lv[l].l[hr];
      }
  for (int e = threadIdx.x; e < kLevels * 16 * D; e += kThreads) sO[e] = 0.f;
  __syncthreads();
  if (threadIdx.x < kLevels * 16) {
    const int l = threadIdx.x / 16, r = threadIdx.x % 16;
    float m = -INFINITY, L = 0.f;
    for (int w = 0; w < kMmaWarps; ++w) m = fmaxf(m, sM[l][w][r]);
    for (int w = 0; w < kMmaWarps; ++w)
      if (sL[l][w][r] > 0.f) L += sL[l][w][r] * exp2f(sM[l][w][r] - m);
    rowM[l][r] = m, rowL[l][r] = L;
  }
  __syncthreads();
#pragma unroll
  for (int l = 0; l < kLevels; ++l)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = lane / 4 + 8 * hr;
      const float f = lv[l].l[hr] > 0.f ? exp2f(lv[l].m[hr] - rowM[l][r]) : 0.f;
#pragma unroll
      for (int t = 0; t < D / 8; ++t) {
        float* dst = sO + (l * 16 + r) * D + 8 * t + 2 * (lane % 4);
        atomicAdd(dst, lv[l].o[t][2 * hr] * f);
        atomicAdd(dst + 1, lv[l].o[t][2 * hr + 1] * f);
      }
    }
  __syncthreads();

  const float nan = __int_as_float(0x7fc00000);
  for (int e = threadIdx.x; e < bk.R * D; e += kThreads) {
    const int r = e / D, x = e % D;
    const int f = bk.f0 + r, i = f / a.grp, h = bk.g * a.grp + f % a.grp;
    if (a.splits > 1) {
      float* part = a.ws + ((((int64_t(bk.split) * a.B + bk.b) * a.T + i) * a.H + h) * kLevels) * (D + 2);
#pragma unroll
      for (int l = 0; l < kLevels; ++l, part += D + 2) {
        part[x] = bad ? nan : sO[(l * 16 + r) * D + x];
        if (x == 0) part[D] = rowM[l][r], part[D + 1] = bad ? nan : rowL[l][r];
      }
      continue;
    }
    float o = 0.f;
#pragma unroll
    for (int l = 0; l < kLevels; ++l) {
      const float L = rowL[l][r];
      const float w = kEma ? (l == 0 ? a.lam0 : a.lam1).load(bk.b, i, 1.f) : 1.f;
      if (L > 0.f) o += sO[(l * 16 + r) * D + x] * (w / L);
    }
    static_cast<T*>(a.out)[bk.b * a.os[0] + i * a.os[1] + h * a.os[2] + x] = from_f<T>(bad ? nan : o);
    if (a.lse && x == 0) {
      const float L = rowL[0][r];
      a.lse[(int64_t(bk.b) * a.H + h) * a.T + i] =
          bad ? nan : (L > 0.f ? (rowM[0][r] + log2f(L)) / kLog2e : -INFINITY);
    }
  }
}

}  // namespace mka::cuda::paged
