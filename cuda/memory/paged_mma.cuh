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
// The block table is read once per tile row, two tiles ahead (TileRows), not per 16-byte copy.
//
// MKA's level 2 (kEma): after level 1 of a tile, the tile's rows become their EMA in place
// and a second softmax and accumulator run over them. Where pages hold a multiple of 16 tokens
// (or the cache is contiguous) the EMA runs on tensor cores, 16 rows at a time (EmaTc); other
// page sizes take one thread per column walking the rows (mma_tile_ema_serial).
#pragma once
#include "memory/paged_params.cuh"
#include "mma/mma_tile.cuh"

namespace mka::cuda::paged {

constexpr int kMmaWarps = kThreads / 32;
static_assert(kTile == 16 * kMmaWarps, "a warp owns 16 keys of a tile");

constexpr int kSegs = kTile / 16;  // 16-row segments of a tile (level 2 on tensor cores)

template <int D, bool kEma> constexpr size_t mma_smem_bytes() {
  // Q (16 x D), then K and V in two stages; the merge reuses the stages. Level 2: the page
  // checkpoints of each segment that starts a page, per stage (float32, k then v).
  return size_t(16 * D + 2 * 2 * kTile * D) * 2 + (kEma ? size_t(2 * kSegs * 2 * D) * 4 : 0);
}

// Where each row of a tile lives: page (-1: an invalid entry, or outside the block's keys)
// and row within it (-1 outside the block's keys). Looked up by threads < kTile, one row each:
// the table entry is loaded two tiles ahead (raw) and checked and stored in shared memory one
// iteration later (put), so its latency never stalls the copies.
struct TileRows {
  int raw = -1, row = -1;
  bool in = false;
  __device__ __forceinline__ void get(const PagedArgs& a, const BlockKeys& bk, int64_t j0) {
    const int64_t pos = j0 + threadIdx.x;
    in = pos >= bk.lo && pos < bk.hi;
    row = -1, raw = -1;
    if (in) {
      if (!a.table) {
        raw = bk.b, row = int(pos);
      } else {
        const int p = int(pos), slot = p / a.S;  // positions < 2^31 (checked on the host)
        row = p - slot * a.S;
        raw = a.table[bk.b * a.ts0 + slot * a.ts1];
      }
    }
  }
  __device__ __forceinline__ void put(const PagedArgs& a, int2* rows, int* bad) const {
    int page = -1;
    if (in) {
      page = raw >= 0 && raw < a.P ? raw : -1;
      if (page < 0) atomicOr(bad, 1);  // an atomic: many threads may set it
    }
    rows[threadIdx.x] = make_int2(page, row);
  }
};

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
// The keys [lo, hi) each of the block's 16 rows sees, per level (level 1 within the window,
// level 2 from the split's start): fixed for the block, so worked out once into shared
// memory (two 64-bit divisions and the causal/window bounds per row), not in every tile and
// not in registers. Positions fit in 32 bits (checked on the host).
struct RowMask {
  int lo[2][16], hi[16];

  __device__ __forceinline__ void init(const PagedArgs& a, const BlockKeys& bk) {
    if (threadIdx.x < 16) {
      const int r = threadIdx.x;
      const int64_t i = (bk.f0 + r) / a.grp;
      hi[r] = int(r < bk.R ? min(key_hi(a, i, bk.nk), bk.hi) : 0);
      lo[0][r] = int(max(key_lo(a, i, bk.nk), bk.lo));
      lo[1][r] = int(bk.lo);
    }
  }
};

template <class T, int D>
__device__ __forceinline__ void mma_tile_level(const PagedArgs& a, const unsigned (&qa)[D / 16][4],
                                               const T* sK, const T* sV, int64_t j0,
                                               const RowMask& mask, int level, WarpSoftmax<D>& st) {
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
    const int lo = mask.lo[level][lane / 4 + 8 * hr], hi = mask.hi[lane / 4 + 8 * hr];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int pos = int(j0) + k0 + 8 * nt + 2 * (lane % 4) + c;
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
// for invalid entries); with level 2 on tensor cores, the checkpoints of the segments that
// start a page too (sC: [segment][k | v][D] float32; zeros for an invalid page).
template <class T, int D, bool kCkpt>
__device__ __forceinline__ void mma_issue_tile(const PagedArgs& a, const BlockKeys& bk, T* sK,
                                               T* sV, float* sC, const int2* rows) {
  using namespace mma;
  constexpr int kChunks = D / 8;
  const T* k = static_cast<const T*>(a.kp);
  const T* v = static_cast<const T*>(a.vp);
  for (int e = threadIdx.x; e < kTile * kChunks; e += kThreads) {
    const int r = e / kChunks, c = e % kChunks;
    const int2 pr = rows[r];
    const bool ok = pr.x >= 0;
    const T* ksrc = ok ? k + pr.x * a.ks[0] + pr.y * a.ks[1] + bk.g * a.ks[2] + c * 8 : k;
    const T* vsrc = ok ? v + pr.x * a.vs[0] + pr.y * a.vs[1] + bk.g * a.vs[2] + c * 8 : v;
    cp_async16(sK + swz<D>(r, c), ksrc, ok);
    cp_async16(sV + swz<D>(r, c), vsrc, ok);
  }
  if constexpr (kCkpt) {
    constexpr int kC = 2 * D / 4;  // 16-byte chunks of one segment's k and v checkpoints
    for (int e = threadIdx.x; e < kSegs * kC; e += kThreads) {
      const int seg = e / kC, c = e % kC, kv = c / (D / 4), x = 4 * (c % (D / 4));
      const int2 pr = rows[16 * seg];
      if (pr.y != 0) continue;  // not a page's first row: the EMA carries on
      const float* ck = kv ? a.vst : a.kst;
      const bool ok = pr.x >= 0;
      cp_async16(sC + (seg * 2 + kv) * D + x, ok ? ck + (int64_t(pr.x) * a.G + bk.g) * D + x : ck, ok);
    }
  }
}

// Level 2 on tensor cores. Within 16 rows, EMA = L X + beta^(r+1) s_in with
// L[r][c] = (1 - beta) beta^(r-c) for c <= r (lower triangular) and s_in the state before
// the rows: the page's checkpoint where they start a page, else the last EMA row before them
// (sE, float32, [k | v][D]). L is split into two 16-bit parts (hi + lo: ~16-bit coefficients)
// with float32 sums, so the result matches the float32 scan up to its final rounding to T.
// A warp owns 16-column pairs w, w + 4, ... of [K | V] over all rows (4 per warp at D = 128):
// it reads and rewrites only its own columns and states, so no warp waits on another.
template <class T, int D> struct EmaTc {
  static constexpr int kPairs = 2 * D / 16 / kMmaWarps;
  unsigned lh[4], ll[4];
  float pw[2];  // beta^(g + 1), beta^(g + 9): g = lane / 4

  __device__ __forceinline__ void init(float beta) {
    using namespace mma;
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    auto coef = [&](int r, int c) { return c <= r ? (1.f - beta) * powf(beta, float(r - c)) : 0.f; };
    // A fragment: a[0] (g, 2t..), a[1] (g + 8, 2t..), a[2] (g, 2t + 8..), a[3] (g + 8, 2t + 8..).
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i & 1), c = 2 * t + 8 * (i >> 1);
      const float x0 = coef(r, c), x1 = coef(r, c + 1);
      const float h0 = to_f(from_f<T>(x0)), h1 = to_f(from_f<T>(x1));
      lh[i] = pack2<T>(h0, h1);
      ll[i] = pack2<T>(x0 - h0, x1 - h1);
    }
    pw[0] = powf(beta, float(g + 1)), pw[1] = powf(beta, float(g + 9));
  }

  // The tile's rows below hi become their EMA in place (sC: its checkpoints, see above).
  __device__ __forceinline__ void tile(const BlockKeys& bk, T* sK, T* sV, const float* sC,
                                       float* sE, const int2* rows, int64_t j0) const {
    using namespace mma;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int seg = 0; seg < kSegs; ++seg) {
      if (j0 + 16 * seg >= bk.hi) break;
      // A page starts here (the same for the whole block): its checkpoint, else the carry.
      const float* s_in = rows[16 * seg].y == 0 ? sC + seg * 2 * D : sE;
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {
        const int p = warp + kMmaWarps * j, kv = p >= D / 16, np = kv ? p - D / 16 : p;
        T* buf = kv ? sV : sK;
        unsigned b[4];
        load_b_trans<D>(b, buf, 16 * seg, np);
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const int col = kv * D + 16 * np + 8 * n + 2 * t;
          const float2 si = *reinterpret_cast<const float2*>(s_in + col);
          float z[4] = {};
          mma16816<T>(z, ll, b[2 * n], b[2 * n + 1]);
          mma16816<T>(z, lh, b[2 * n], b[2 * n + 1]);
          const float e0 = fmaf(pw[0], si.x, z[0]), e1 = fmaf(pw[0], si.y, z[1]);
          const float e2 = fmaf(pw[1], si.x, z[2]), e3 = fmaf(pw[1], si.y, z[3]);
          const int chunk = 2 * np + n;
          *reinterpret_cast<unsigned*>(buf + swz<D>(16 * seg + g, chunk) + 2 * t) = pack2<T>(e0, e1);
          *reinterpret_cast<unsigned*>(buf + swz<D>(16 * seg + g + 8, chunk) + 2 * t) = pack2<T>(e2, e3);
          // The segment's last row (g = 7, second half) is the next one's state.
          const float c0 = __shfl_sync(0xffffffffu, e2, 28 + t);
          const float c1 = __shfl_sync(0xffffffffu, e3, 28 + t);
          __syncwarp();  // every lane has read its s_in (sE) before it is overwritten
          if (g == 0) *reinterpret_cast<float2*>(sE + col) = make_float2(c0, c1);
        }
      }
    }
  }
};

// Level 2 where pages hold a number of tokens that is not a multiple of 16: the tile's rows
// turned into their EMA in place, one thread per column (float32 states, rounded to T),
// restarting from each page's checkpoint at its first row. st[u]: column threadIdx.x + 128 u
// of [K | V].
template <class T, int D>
__device__ __forceinline__ void mma_tile_ema_serial(const PagedArgs& a, const BlockKeys& bk,
                                                    T* sK, T* sV, const int2* rows, int64_t j0,
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
      const int2 pr = rows[r];
      if (pr.y == 0) s = pr.x >= 0 ? ckpt[(int64_t(pr.x) * a.G + bk.g) * D + col] : 0.f;
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
  __shared__ int2 sRows[2][kTile];  // TileRows of the two stages
  __shared__ float sE[kEma ? 2 * D : 1];  // level 2 on tensor cores: the EMA carried (EmaTc)
  __shared__ RowMask mask;

  const BlockKeys bk = block_keys<kEma>(a);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Level 2 on tensor cores needs every 16-row segment inside one page (see EmaTc).
  const bool ema_tc = kEma && (!a.table || a.S % 16 == 0);
  if (threadIdx.x == 0) bad = bk.bad;
  mask.init(a, bk);  // read after the next barrier
  // Q rows (zeros past R) into a swizzled tile.
  for (int e = threadIdx.x; e < 16 * (D / 8); e += kThreads) {
    const int r = e / (D / 8), c = e % (D / 8);
    const bool in = r < bk.R;
    const int f = bk.f0 + (in ? r : 0), i = f / a.grp, h = bk.g * a.grp + f % a.grp;
    const T* src = static_cast<const T*>(a.q) + bk.b * a.qs[0] + i * a.qs[1] + h * a.qs[2] + c * 8;
    cp_async16(sQ + swz<D>(r, c), src, in);
  }
  const int64_t t_begin = bk.lo / kTile, t_end = bk.hi > bk.lo ? ceil_div(bk.hi, kTile) : t_begin;
  auto slot = [&](int64_t t) { return int(t - t_begin) & 1; };
  auto stage = [&](int64_t t) { return stage0 + slot(t) * 2 * kTile * D; };
  float* sC0 = reinterpret_cast<float*>(stage0 + 2 * 2 * kTile * D);  // [stage][seg][k | v][D]
  auto ckpts = [&](int64_t t) { return sC0 + slot(t) * kSegs * 2 * D; };
  auto issue = [&](int64_t t) {
    if (ema_tc) mma_issue_tile<T, D, kEma>(a, bk, stage(t), stage(t) + kTile * D, ckpts(t), sRows[slot(t)]);
    else mma_issue_tile<T, D, false>(a, bk, stage(t), stage(t) + kTile * D, nullptr, sRows[slot(t)]);
  };
  __syncthreads();  // bad's first value before the lookups may set it
  if (threadIdx.x < kTile)
    for (int64_t t = t_begin; t < t_end && t < t_begin + 2; ++t) {
      TileRows tr;
      tr.get(a, bk, t * kTile);
      tr.put(a, sRows[slot(t)], &bad);
    }
  __syncthreads();
  if (t_begin < t_end) issue(t_begin);
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
  EmaTc<T, D> etc;
  if (ema_tc) etc.init(a.beta);

  for (int64_t t = t_begin; t < t_end; ++t) {
    TileRows ahead;  // tile t + 2: loaded now, stored where tile t's rows were at the end
    const bool look = threadIdx.x < kTile && t + 2 < t_end;
    if (look) ahead.get(a, bk, (t + 2) * kTile);
    cp_async_next_stage(t + 1 < t_end, [&] { issue(t + 1); });
    __syncthreads();
    T* sK = stage(t);
    T* sV = sK + kTile * D;
    const int64_t j0 = t * kTile;
    if (j0 + kTile > bk.lo1) mma_tile_level<T, D>(a, qa, sK, sV, j0, mask, 0, lv[0]);
    if constexpr (kEma) {
      __syncthreads();  // level 1 has read the rows
      if (ema_tc) etc.tile(bk, sK, sV, ckpts(t), sE, sRows[slot(t)], j0);
      else mma_tile_ema_serial<T, D>(a, bk, sK, sV, sRows[slot(t)], j0, est);
      __syncthreads();
      mma_tile_level<T, D>(a, qa, sK, sV, j0, mask, 1, lv[kLevels - 1]);
    }
    if (look) ahead.put(a, sRows[slot(t)], &bad);
    __syncthreads();  // the stage and its rows are refilled next iteration
  }

  // Merge the warps: per row the max over warps; each warp's share, rescaled to it, goes to
  // its own slice of sW and the slices are summed in a fixed order (no shared-memory atomics:
  // float atomics on shared memory are compare-and-swap loops, four warps contending).
  float* sO = reinterpret_cast<float*>(stage0);  // [level][16][D]
  float* sW = sO + kLevels * 16 * D;              // [warp][16][D], one level at a time
  static_assert((kLevels + kMmaWarps) * 16 * D * 4 <= 2 * 2 * kTile * D * sizeof(T),
                "the merge fits in the stages");
  if (lane % 4 == 0)
#pragma unroll
    for (int l = 0; l < kLevels; ++l)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        sM[l][warp][lane / 4 + 8 * hr] = lv[l].m[hr];
        sL[l][warp][lane / 4 + 8 * hr] = lv[l].l[hr];
      }
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
  for (int l = 0; l < kLevels; ++l) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = lane / 4 + 8 * hr;
      const float f = lv[l].l[hr] > 0.f ? exp2f(lv[l].m[hr] - rowM[l][r]) : 0.f;
#pragma unroll
      for (int t = 0; t < D / 8; ++t)
        *reinterpret_cast<float2*>(sW + (warp * 16 + r) * D + 8 * t + 2 * (lane % 4)) =
            make_float2(lv[l].o[t][2 * hr] * f, lv[l].o[t][2 * hr + 1] * f);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < 16 * D; e += kThreads) {
      float acc = 0.f;
#pragma unroll
      for (int w = 0; w < kMmaWarps; ++w) acc += sW[w * 16 * D + e];
      sO[l * 16 * D + e] = acc;
    }
    __syncthreads();
  }

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
