// Attention of Tq >= 1 new query tokens against each sequence's pages on the GPU (SPEC §7.1),
// split over keys (flash-decoding). A block is (key split, sequence, key/value head, up to
// kRows query rows of that head's group): it reads each key and value row of its split once
// into shared memory and serves every query head of the group from there, so GQA costs no
// extra HBM bytes. Decoding is memory-bound: the block count is raised by splitting the keys
// until the GPU is full, and a combine kernel merges the splits' partial softmaxes.
//
// MKA's level 2 (EMA keys/values) is rebuilt in shared memory from each page's checkpoint of
// the EMA state while the raw rows are there: a step reads the pages once plus one (G, d)
// float32 state per page, with no scan of the sequence and no extra kernel.
//
// Table entries and lengths live on the device and are not read by the host (that would
// synchronise every step); a block that meets an invalid entry or length never reads outside
// the pages and writes NaN for its rows.
#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>

#include "memory/paged_mma.cuh"
#include "memory/paged_params.cuh"
#include "mka/cuda/kernels.h"
#include "mka/environment.h"
#include "mka/memory/paged_ops.h"

namespace mka::cuda {
namespace {

using namespace paged;

// Shared-memory rows are padded by 16 bytes so that 16-byte reads of consecutive rows by a
// warp's lanes fall in different banks.
template <class T, int D> struct Smem {
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kLd = D + kVec;
  static constexpr size_t bytes() {
    return 2 * size_t(kTile) * kLd * sizeof(T) + size_t(kRows) * D * 4 + size_t(kRows) * kTile * 4 +
           5 * kRows * 4 + 2 * kTile * 4;
  }
};

// Scores of rows [0, R) against the tile's keys in sK (q pre-scaled, base 2), masked to
// each row's visible keys: -inf where masked or the key's page is invalid.
template <class T, int D>
__device__ __forceinline__ void tile_scores(const PagedArgs& a, const T* sK, const float* sQ,
                                            float* sS, const int* sPage, int R, int f0,
                                            int64_t nk, int64_t j0, int n, bool windowed) {
  using Sm = Smem<T, D>;
  for (int idx = threadIdx.x; idx < R * kTile; idx += kThreads) {
    const int r = idx / kTile, jj = idx % kTile;
    const int64_t i = (f0 + r) / a.grp, pos = j0 + jj;
    float s = -INFINITY;
    if (jj < n && sPage[jj] >= 0 && pos < key_hi(a, i, nk) &&
        (!windowed || pos >= key_lo(a, i, nk))) {
      const T* k = sK + jj * Sm::kLd;
      const float* q = sQ + r * D;
      float acc = 0.f;
#pragma unroll
      for (int x = 0; x < D; x += Sm::kVec) {
        float kv[Sm::kVec];
        load_v<Sm::kVec>(k + x, kv);
#pragma unroll
        for (int e = 0; e < Sm::kVec; e += 4) {
          const float4 qv = *reinterpret_cast<const float4*>(q + x + e);
          acc = fmaf(qv.x, kv[e], acc);
          acc = fmaf(qv.y, kv[e + 1], acc);
          acc = fmaf(qv.z, kv[e + 2], acc);
          acc = fmaf(qv.w, kv[e + 3], acc);
        }
      }
      s = acc;
    }
    sS[r * kTile + jj] = s;
  }
}

// Online softmax of the tile's scores, one warp per row: probabilities (relative to the new
// running max) replace the scores; sA gets each row's rescale factor of its accumulator.
__device__ __forceinline__ void tile_softmax(float* sS, float* sM, float* sL, float* sA, int R) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int r = warp; r < R; r += kThreads / 32) {
    float* s = sS + r * kTile;
    float v[kTile / 32], mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < kTile / 32; ++c) mx = fmaxf(mx, v[c] = s[lane + 32 * c]);
    mx = warp_max(mx);
    const float m_old = sM[r], m_new = fmaxf(m_old, mx);
    float sum = 0.f, alpha = 1.f;
    if (m_new != -INFINITY) {
      alpha = exp2f(m_old - m_new);  // m_old = -inf: 0
#pragma unroll
      for (int c = 0; c < kTile / 32; ++c) sum += (v[c] = exp2f(v[c] - m_new));
    } else {
#pragma unroll
      for (int c = 0; c < kTile / 32; ++c) v[c] = 0.f;
    }
#pragma unroll
    for (int c = 0; c < kTile / 32; ++c) s[lane + 32 * c] = v[c];
    sum = warp_sum(sum);
    if (lane == 0) sL[r] = sL[r] * alpha + sum, sM[r] = m_new, sA[r] = alpha;
  }
}

// acc (this thread's rows x 4 columns) = acc * alpha + P V over the tile's n keys.
template <class T, int D, int RPT>
__device__ __forceinline__ void tile_pv(const T* sV, const float* sS, const float* sA,
                                        float (&acc)[RPT][4], int R, int n) {
  using Sm = Smem<T, D>;
  constexpr int kColThreads = D / 4, kRowStep = kThreads / kColThreads;
  const int cx = (threadIdx.x % kColThreads) * 4, r0 = threadIdx.x / kColThreads;
#pragma unroll
  for (int k = 0; k < RPT; ++k) {
    const int r = r0 + k * kRowStep;
    if (r < R) {
      const float al = sA[r];
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[k][e] *= al;
    }
  }
  for (int jj = 0; jj < n; ++jj) {
    float v[4];
    const T* src = sV + jj * Sm::kLd + cx;
    if constexpr (sizeof(T) == 4) {
      const float4 f = *reinterpret_cast<const float4*>(src);
      v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    } else {
      const uint2 u = *reinterpret_cast<const uint2*>(src);
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int x = 0; x < 4; ++x) v[x] = to_f(e[x]);
    }
#pragma unroll
    for (int k = 0; k < RPT; ++k) {
      const int r = r0 + k * kRowStep;
      if (r < R) {
        const float p = sS[r * kTile + jj];
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[k][e] = fmaf(p, v[e], acc[k][e]);
      }
    }
  }
}

// Rows [j0, j0 + n) of one kv head's pages into shared memory (zeros past d and for invalid
// pages). vec: 16-byte loads (rows and strides aligned).
template <class T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* base, const int64_t* st, int g, int d,
                                          const int* sPage, const int* sRow, int n, bool vec) {
  using Sm = Smem<T, D>;
  constexpr int kChunks = D / Sm::kVec;
  for (int idx = threadIdx.x; idx < kTile * kChunks; idx += kThreads) {
    const int jj = idx / kChunks, x = (idx % kChunks) * Sm::kVec;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (jj < n && sPage[jj] >= 0 && x < d) {
      const T* src = base + sPage[jj] * st[0] + sRow[jj] * st[1] + g * st[2] + x;
      if (vec) {
        val = __ldg(reinterpret_cast<const uint4*>(src));
      } else {
        T* e = reinterpret_cast<T*>(&val);
        for (int u = 0; u < Sm::kVec && x + u < d; ++u) e[u] = src[u];
      }
    }
    *reinterpret_cast<uint4*>(dst + jj * Sm::kLd + x) = val;
  }
}

// EMA of the tile's rows in place (float32 states, stored rounded to T), restarting from a
// page's checkpoint at its first row. st: this thread's running states of its columns.
template <class T, int D>
__device__ __forceinline__ void tile_ema(const PagedArgs& a, T* sK, T* sV, const int* sPage,
                                         const int* sRow, int g, int n, float (&st)[2 * D / kThreads]) {
  using Sm = Smem<T, D>;
  const float beta = a.beta, one_m = 1.f - a.beta;
#pragma unroll
  for (int u = 0; u < 2 * D / kThreads; ++u) {
    const int c = threadIdx.x + u * kThreads;
    const bool is_v = c >= D;
    const int col = is_v ? c - D : c;
    const int d = is_v ? a.dv : a.dk;
    if (col >= d) continue;
    T* buf = is_v ? sV : sK;
    const float* ckpt = is_v ? a.vst : a.kst;
    float s = st[u];
    for (int jj = 0; jj < n; ++jj) {
      if (sRow[jj] == 0) s = sPage[jj] >= 0 ? ckpt[(int64_t(sPage[jj]) * a.G + g) * d + col] : 0.f;
      T* e = buf + jj * Sm::kLd + col;
      s = fmaf(beta, s, one_m * to_f(*e));
      *e = from_f<T>(s);
    }
    st[u] = s;
  }
}

template <class T, int D, bool kEma>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(const PagedArgs a) {
  allow_dependents();  // the combine may launch now: it waits for this grid's end
  using Sm = Smem<T, D>;
  constexpr int kLevels = kEma ? 2 : 1;
  constexpr int kRowStep = kThreads / (D / 4), RPT = (kRows + kRowStep - 1) / kRowStep;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kTile * Sm::kLd;
  float* sQ = reinterpret_cast<float*>(sV + kTile * Sm::kLd);
  float* sS = sQ + kRows * D;
  float* sM = sS + kRows * kTile;  // [level][row]
  float* sL = sM + 2 * kRows;
  float* sA = sL + 2 * kRows;
  int* sPage = reinterpret_cast<int*>(sA + kRows);
  int* sRow = sPage + kTile;
  __shared__ int bad;

  const BlockKeys bk = block_keys<kEma>(a);
  const int b = bk.b, g = bk.g, split = bk.split, f0 = bk.f0, R = bk.R;
  const int64_t nk = bk.nk;
  if (threadIdx.x == 0) bad = bk.bad;

  for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
    const int r = idx / D, x = idx % D;
    float v = 0.f;
    if (r < R && x < a.dk) {
      const int f = f0 + r, i = f / a.grp, h = g * a.grp + f % a.grp;
      v = to_f(static_cast<const T*>(a.q)[b * a.qs[0] + i * a.qs[1] + h * a.qs[2] + x]) *
          a.scale_log2;
    }
    sQ[idx] = v;
  }
  if (threadIdx.x < 2 * kRows) sM[threadIdx.x] = -INFINITY, sL[threadIdx.x] = 0.f;

  float acc[kLevels][RPT][4] = {};
  float st[2 * D / kThreads] = {};
  const bool vec = (a.dk % Sm::kVec == 0) && (a.dv % Sm::kVec == 0) &&
                   (reinterpret_cast<uintptr_t>(a.kp) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(a.vp) % 16 == 0) && a.ks[0] % Sm::kVec == 0 &&
                   a.ks[1] % Sm::kVec == 0 && a.ks[2] % Sm::kVec == 0 && a.vs[0] % Sm::kVec == 0 &&
                   a.vs[1] % Sm::kVec == 0 && a.vs[2] % Sm::kVec == 0;

  const int64_t lo1 = bk.lo1, lo = bk.lo, hi = bk.hi;
  __syncthreads();

  for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, hi - j0));
    for (int jj = threadIdx.x; jj < kTile; jj += kThreads) {
      const int64_t pos = j0 + jj;
      int page = -1, row = 0;
      if (jj < n) {
        page = page_of(a, b, pos, row);
        if (page < 0) atomicOr(&bad, 1);  // an atomic: many threads may set it
      }
      sPage[jj] = page, sRow[jj] = row;
    }
    __syncthreads();
    load_tile<T, D>(sK, static_cast<const T*>(a.kp), a.ks, g, a.dk, sPage, sRow, n, vec);
    load_tile<T, D>(sV, static_cast<const T*>(a.vp), a.vs, g, a.dv, sPage, sRow, n, vec);
    __syncthreads();
    if (j0 + n > lo1) {  // level 1: raw keys within the window
      tile_scores<T, D>(a, sK, sQ, sS, sPage, R, f0, nk, j0, n, true);
      __syncthreads();
      tile_softmax(sS, sM, sL, sA, R);
      __syncthreads();
      tile_pv<T, D, RPT>(sV, sS, sA, acc[0], R, n);
      __syncthreads();
    }
    if constexpr (kEma) {  // level 2: EMA keys/values, no window
      tile_ema<T, D>(a, sK, sV, sPage, sRow, g, n, st);
      __syncthreads();
      tile_scores<T, D>(a, sK, sQ, sS, sPage, R, f0, nk, j0, n, false);
      __syncthreads();
      tile_softmax(sS, sM + kRows, sL + kRows, sA, R);
      __syncthreads();
      tile_pv<T, D, RPT>(sV, sS, sA, acc[1], R, n);
    }
    __syncthreads();
  }

  // Out: this block's partial (splits > 1) or the final rows.
  constexpr int kColThreads = D / 4;
  const int cx = (threadIdx.x % kColThreads) * 4, r0 = threadIdx.x / kColThreads;
  const float nan = __int_as_float(0x7fc00000);
#pragma unroll
  for (int k = 0; k < RPT; ++k) {
    const int r = r0 + k * kRowStep;
    if (r >= R) continue;
    const int f = f0 + r, i = f / a.grp, h = g * a.grp + f % a.grp;
    if (a.splits > 1) {
      float* part = a.ws + ((((int64_t(split) * a.B + b) * a.T + i) * a.H + h) * kLevels) * (a.dv + 2);
#pragma unroll
      for (int l = 0; l < kLevels; ++l, part += a.dv + 2) {
        for (int e = 0; e < 4 && cx + e < a.dv; ++e) part[cx + e] = bad ? nan : acc[l][k][e];
        if (cx == 0) part[a.dv] = sM[l * kRows + r], part[a.dv + 1] = bad ? nan : sL[l * kRows + r];
      }
      continue;
    }
    float o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int l = 0; l < kLevels; ++l) {
      const float li = sL[l * kRows + r];
      const float w = level_weight(a, kEma ? 2 : 1, l, b, i);
      if (li > 0.f)
        for (int e = 0; e < 4; ++e) o[e] += acc[l][k][e] * (w / li);
    }
    T* dst = static_cast<T*>(a.out) + b * a.os[0] + i * a.os[1] + h * a.os[2];
    for (int e = 0; e < 4 && cx + e < a.dv; ++e) dst[cx + e] = from_f<T>(bad ? nan : o[e]);
    if (a.lse && cx == 0) {
      const float li = sL[r];
      a.lse[(int64_t(b) * a.H + h) * a.T + i] =
          bad ? nan : (li > 0.f ? (sM[r] + log2f(li)) / kLog2e : -INFINITY);
    }
  }
}

// Merges the splits' partials of one (b, t, h) per block in two parallel passes (a loop over
// the splits per thread is a chain of load latencies: 18 us at 49 splits on an H100). First
// each thread reads the statistics of some splits into shared memory and the block reduces
// them to the row's max and sum, leaving each split's weight exp2(m_s - m); then groups of
// threads, one column per thread, each sum every groups-th split's values, eight loads in
// flight per thread, and the groups' sums meet in shared memory. A split without keys
// (L_s = 0) weighs 0 and its values, which may be anything, are not used.
template <class T, int kLevels>
__global__ void __launch_bounds__(kCombineThreads) paged_combine_kernel(const PagedArgs a) {
  constexpr int kWarps = kCombineThreads / 32, kBatch = 8;
  __shared__ float sW[kLevels][kMaxSplits], sLs[kLevels][kMaxSplits];
  __shared__ float sRed[kWarps][kLevels];
  __shared__ float sSum[kCombineThreads];
  const int64_t bth = blockIdx.x;
  const int h = int(bth % a.H), t = int((bth / a.H) % a.T), b = int(bth / (int64_t(a.H) * a.T));
  const int64_t per_split = int64_t(a.B) * a.T * a.H * kLevels * (a.dv + 2);
  const float* base = a.ws + (((int64_t(b) * a.T + t) * a.H + h) * kLevels) * (a.dv + 2);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // A block-wide reduction of one value per level, both levels behind one pair of barriers:
  // max (fmaxf) or sum (a NaN propagates).
  auto reduce = [&](float (&v)[kLevels], bool is_max) {
#pragma unroll
    for (int l = 0; l < kLevels; ++l) {
      v[l] = is_max ? warp_max(v[l]) : warp_sum(v[l]);
      if (lane == 0) sRed[warp][l] = v[l];
    }
    __syncthreads();
#pragma unroll
    for (int l = 0; l < kLevels; ++l) {
      float r = sRed[0][l];
      for (int w = 1; w < kWarps; ++w) r = is_max ? fmaxf(r, sRed[w][l]) : r + sRed[w][l];
      v[l] = r;
    }
    __syncthreads();
  };
  wait_for_prior_grid();  // the partials (launched by launch_after)
  float m[kLevels], L[kLevels];
#pragma unroll
  for (int l = 0; l < kLevels; ++l) m[l] = -INFINITY, L[l] = 0.f;
  for (int s = threadIdx.x; s < a.splits; s += kCombineThreads)
#pragma unroll
    for (int l = 0; l < kLevels; ++l) {
      const float* part = base + s * per_split + l * (a.dv + 2);
      const float ms = part[a.dv], ls = part[a.dv + 1];
      sW[l][s] = ms, sLs[l][s] = ls;
      if (ls != 0.f) m[l] = fmaxf(m[l], ms);
    }
  reduce(m, true);
  for (int s = threadIdx.x; s < a.splits; s += kCombineThreads)
#pragma unroll
    for (int l = 0; l < kLevels; ++l) {
      const float ls = sLs[l][s];
      const float e = ls != 0.f ? exp2f(sW[l][s] - m[l]) : 0.f;  // a NaN sum propagates
      sW[l][s] = e;
      L[l] += ls * e;
    }
  reduce(L, false);  // its barriers also publish sW
  float scale[kLevels];
#pragma unroll
  for (int l = 0; l < kLevels; ++l) scale[l] = merged_scale(L[l], level_weight(a, kLevels, l, b, t));
  T* dst = static_cast<T*>(a.out) + b * a.os[0] + t * a.os[1] + h * a.os[2];
  const int cols = a.dv <= 32 ? 32 : a.dv <= 64 ? 64 : a.dv <= 128 ? 128 : 256;
  const int groups = kCombineThreads / cols, group = threadIdx.x / cols, x = threadIdx.x % cols;
  for (int x0 = 0; x0 < a.dv; x0 += cols) {
    float o = 0.f;
    if (x0 + x < a.dv) {
#pragma unroll
      for (int l = 0; l < kLevels; ++l) {
        const float* col = base + l * (a.dv + 2) + x0 + x;
        float sum = 0.f;
        for (int s0 = group; s0 < a.splits; s0 += kBatch * groups) {
          float v[kBatch];
#pragma unroll
          for (int j = 0; j < kBatch; ++j) {
            const int s = s0 + j * groups;
            v[j] = s < a.splits ? col[s * per_split] : 0.f;
          }
#pragma unroll
          for (int j = 0; j < kBatch; ++j) {
            const int s = s0 + j * groups;
            // A split with keys adds v * w even where w underflowed to 0: a NaN or Inf in its
            // values spreads, as in an unsplit call.
            if (s < a.splits && sLs[l][s] != 0.f) sum += v[j] * sW[l][s];
          }
        }
        o += sum * scale[l];
      }
    }
    sSum[threadIdx.x] = o;
    __syncthreads();
    if (group == 0 && x0 + x < a.dv) {
      for (int g = 1; g < groups; ++g) o += sSum[g * cols + x];
      dst[x0 + x] = from_f<T>(o);
    }
    __syncthreads();
  }
  if (a.lse && threadIdx.x == 0) a.lse[(int64_t(b) * a.H + h) * a.T + t] = merged_lse(m[0], L[0]);
}

int64_t gcd64(int64_t x, int64_t y) { return y == 0 ? x : gcd64(y, x % y); }

// Splits: a block's time is about its keys plus a fixed cost (Q, the merge, its partials;
// ~2 tiles), and a launch takes ceil(blocks / slots) waves of it, slots = SMs x the blocks
// resident per SM. The plan takes the fewest splits within 1 % of the best such estimate
// (at batch 1 one full wave, not the 1.3 waves a fixed 4 blocks per SM gave), each split at
// least kMinSplit keys and a whole number of tiles (and of pages with level 2: its EMA
// restarts at page boundaries). The lengths are on the device: the host plans with the
// table's capacity, and each block cuts its own sequence's length into that many splits.
//
// busy > 0 (the tensor-core MHA kernel at d = 128): where fewer blocks than `busy` would
// run, the keys are split just enough to reach about that many, which keeps HBM saturated;
// more splits only add partials and combine work (H100, B 1, 32k keys: 32 splits 55.8 us,
// the wave model's 49 59.6; G 32, B 1, 4k: 8 splits 31.9 us, 12 34.2; B 16, 4k: 2 splits
// 100.8, 3 101.8). MKA's
// kernel has more work per key and gains from every slot (B 1, 128k: 48 splits 218 us, 32
// 240): it keeps the wave model, as does the CUDA-core kernel.
// MKA_CUDA_DECODE_SPLITS overrides the count (within the same caps) for tuning and tests.
void plan_splits(PagedArgs& a, int64_t capacity, int64_t slots, int64_t busy) {
  const int64_t base = int64_t(a.row_blocks) * a.B * a.G;
  // At least kMinSplit keys of the capacity a split, at most kMaxSplits splits.
  const int64_t cap = std::clamp<int64_t>(ceil_div(capacity, kMinSplit), 1, kMaxSplits);
  a.unit = a.kst ? kTile / gcd64(kTile, a.S) * a.S : kTile;
  static const int forced = decode_splits_from_environment();  // tuning and tests
  if (forced > 0) {
    a.splits = int(std::min<int64_t>(forced, cap));
    return;
  }
  const int64_t most = std::min(cap, 4 * ceil_div(slots, base) + 1);
  if (busy > 0 && base < busy) {
    a.splits = int(std::clamp<int64_t>((busy + base / 2) / base, 1, most));
    return;
  }
  auto cost = [&](int64_t n) {
    return double(ceil_div(base * n, slots)) * (double(capacity) / double(n) + 2 * kTile);
  };
  double best = cost(1);
  for (int64_t n = 2; n <= most; ++n) best = std::min(best, cost(n));
  a.splits = 1;
  while (a.splits < most && cost(a.splits) > 1.01 * best) ++a.splits;
}

// Blocks of Kernel resident per SM at this shared-memory size (queried once per device, when
// the kernel's shared-memory limit is raised).
template <auto Kernel> int64_t resident_slots(int smem, int device) {
  static std::once_flag once[64];
  static int per_sm[64];
  std::call_once(once[device % 64], [&] {
    set_smem(Kernel, smem);
    int n = 0;
    per_sm[device % 64] =
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kThreads, smem) == cudaSuccess && n > 0 ? n : 1;
  });
  return int64_t(per_sm[device % 64]) * num_sms(device);
}

cudaLaunchConfig_t cluster_config(dim3 grid, int smem, cudaStream_t s, cudaLaunchAttribute& attr) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid, cfg.blockDim = dim3(kThreads), cfg.dynamicSmemBytes = smem, cfg.stream = s;
  attr = cudaLaunchAttribute{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 1, attr.val.clusterDim.y = grid.y, attr.val.clusterDim.z = 1;
  cfg.attrs = &attr, cfg.numAttrs = 1;
  return cfg;
}

// The largest cluster in which Kernel (with `smem` bytes of dynamic shared memory, set before)
// may merge its splits on this device, worked out once per device: 0 where the code the device
// runs predates sm_90 (clusters, distributed shared memory), else the largest size up to
// MKA_CUDA_DECODE_CLUSTER (0 by default: opt-in) of which the occupancy API places a cluster
// beside that shared memory (sizes above 8 are non-portable: allowed first).
template <auto Kernel> int cluster_limit(int smem, int device) {
  static std::once_flag once[64];
  static int limit[64];
  const int slot = device % 64;
  std::call_once(once[slot], [&] {
    static const int wanted = decode_cluster_from_environment();
    int n = wanted > 1 && runs_sm90_code<Kernel>(device) ? wanted : 0;
    if (n > 8 &&
        cudaFuncSetAttribute(Kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
      (void)cudaGetLastError();
      n = 8;
    }
    for (; n > 1; --n) {  // a fit is what a GPC's SMs hold
      cudaLaunchAttribute attr;
      const cudaLaunchConfig_t cfg = cluster_config(dim3(1, unsigned(n)), smem, nullptr, attr);
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, Kernel, &cfg) == cudaSuccess && clusters > 0) break;
      (void)cudaGetLastError();
    }
    limit[slot] = n > 1 ? n : 0;
  });
  return limit[slot];
}

// Plans the splits, launches `Kernel` (either kernel: same grid and partials) and, with
// several splits, the combine kernel — or, for a kernel that can (kCluster: the tensor-core
// one) on sm_90 with at most the cluster limit of splits, the splits as one cluster that
// merges them itself.
template <auto Kernel, class T, bool kEma, bool kFillHbm = false, bool kCluster = false>
void launch(PagedArgs& a, int smem, const char* name, int64_t capacity, int device,
            cudaStream_t s, int rows = kRows) {
  a.rows = rows;
  a.row_blocks = int(ceil_div(int64_t(a.T) * a.grp, rows));
  // kFillHbm (the tensor-core MHA kernel at d = 128): two blocks per SM hold ~64 KB of tiles
  // in flight each, which saturates HBM. (At d = 64 the same rule measured slower: B 16, 1k
  // keys, H = G = 12: 35.3 us against the wave model's 27.2.)
  const int64_t slots = resident_slots<Kernel>(smem, device);
  const int64_t busy = kFillHbm ? std::min<int64_t>(slots, 2 * num_sms(device)) : 0;
  plan_splits(a, capacity, slots, busy);
  const int64_t blocks = int64_t(a.row_blocks) * a.B * a.G;
  MKA_CHECK(blocks < (int64_t(1) << 31), "paged_attention: too many blocks (B x G x row blocks = ",
            blocks, ")");
  const dim3 grid(unsigned(blocks), unsigned(a.splits));
  a.cluster = kCluster && a.splits > 1 && a.splits <= cluster_limit<Kernel>(smem, device);
  if (a.cluster) {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = cluster_config(grid, smem, s, attr);
    check_cuda(cudaLaunchKernelEx(&cfg, Kernel, a), name);
    return;
  }
  Workspace ws(a.splits > 1 ? size_t(a.splits) * a.B * a.T * a.H * (kEma ? 2 : 1) * (a.dv + 2) * 4 : 0,
               s, false);
  a.ws = ws.as<float>();
  Kernel<<<grid, kThreads, smem, s>>>(a);
  check_launch(name);
  if (a.splits > 1) {
    // Launched while the blocks of the last wave still run; it waits for their partials.
    launch_after<paged_combine_kernel<T, kEma ? 2 : 1>>(
        dim3(unsigned(int64_t(a.B) * a.T * a.H)), dim3(kCombineThreads), 0, s, device, a);
  }
}

// The tensor-core kernel's case (16-bit pages, checked by the caller): dk = dv = 64 or 128,
// 16-byte aligned rows of q, k and v (ldmatrix tiles filled by 16-byte cp.async).
bool mma_case(const PagedArgs& a) {
  auto aligned = [&](const void* p, const int64_t* st) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && st[0] % 8 == 0 && st[1] % 8 == 0 &&
           st[2] % 8 == 0;
  };
  return a.dk == a.dv && (a.dk == 64 || a.dk == 128) && aligned(a.q, a.qs) &&
         aligned(a.kp, a.ks) && aligned(a.vp, a.vs);
}

template <class T> void dispatch(PagedArgs& a, int64_t capacity, int device, cudaStream_t s) {
  const int d = std::max(a.dk, a.dv);
  const bool ema = a.kst != nullptr;
  auto go = [&](auto dc, auto ec) {
    constexpr int D = decltype(dc)::value;
    constexpr bool kEma = decltype(ec)::value;
    if constexpr (sizeof(T) == 2 && D <= 128) {
      if (mma_case(a) && a.dk == D) {
        // MKA with at most 8 query rows per kv head, level 2 from level 1's scores: stacked.
        if constexpr (kEma)
          if (int64_t(a.T) * a.grp <= 8 && (!a.table || a.S % 16 == 0))
            return launch<paged_attention_mma<T, D, true, true>, T, true, false, true>(
                a, int(mma_smem_bytes<D, true, true>()), "paged_attention_mma", capacity, device, s, 8);
        return launch<paged_attention_mma<T, D, kEma>, T, kEma, !kEma && D == 128, true>(
            a, int(mma_smem_bytes<D, kEma>()), "paged_attention_mma", capacity, device, s);
      }
    }
    launch<paged_attention_kernel<T, D, kEma>, T, kEma>(
        a, int(Smem<T, D>::bytes()), "paged_attention_kernel", capacity, device, s);
  };
  auto with_ema = [&](auto dc) {
    if (ema) go(dc, std::true_type{});
    else go(dc, std::false_type{});
  };
  if (d <= 64) with_ema(std::integral_constant<int, 64>{});
  else if (d <= 128) with_ema(std::integral_constant<int, 128>{});
  else if (d <= 256) with_ema(std::integral_constant<int, 256>{});
  else fail("paged_attention: head dim ", d, " has no CUDA kernel (at most 256)");
}

PagedArgs common_args(const TensorRef& q, const TensorRef& kp, const TensorRef& vp,
                      const TensorRef& out, const TensorRef& lse, int64_t B, int64_t T,
                      int64_t H, int64_t G, int64_t dk, int64_t dv, bool causal, double scale,
                      int64_t window) {
  PagedArgs a{};
  a.q = q.data, a.kp = kp.data, a.vp = vp.data, a.out = out.data;
  a.lse = lse.present() ? static_cast<float*>(lse.data) : nullptr;
  for (int i = 0; i < 3; ++i)
    a.qs[i] = q.stride[i], a.ks[i] = kp.stride[i], a.vs[i] = vp.stride[i], a.os[i] = out.stride[i];
  a.B = int(B), a.T = int(T), a.H = int(H), a.G = int(G), a.grp = int(H / G);
  a.dk = int(dk), a.dv = int(dv);
  a.causal = causal, a.scale_log2 = float(scale) * kLog2e, a.window = window;
  return a;
}

}  // namespace

bool decode_shaped(const AttentionProblem& p) {
  return p.group() * p.Tq <= kRows && p.Tk >= 4 * kTile && p.d <= 256 && !p.dropout.active() &&
         p.Tk < (int64_t(1) << 31) && p.B * p.Tq * p.H < (int64_t(1) << 31);
}

void decode_attention(const AttentionProblem& p, const AttentionFwd& f) {
  if (p.B == 0 || p.Tq == 0 || p.H == 0) return;
  DeviceGuard guard(f.q.device_id);
  PagedArgs args = common_args(f.q, f.k, f.v, f.out, f.lse, p.B, p.Tq, p.H, p.G, p.d, p.d,
                               p.causal, p.scale, p.window);
  args.S = int(p.Tk), args.W = 1, args.P = p.B;  // "page" b is sequence b: no table, no lengths
  dispatch_dtype(p.dtype, "attention", [&](auto* t) {
    dispatch<std::remove_pointer_t<decltype(t)>>(args, p.Tk, f.q.device_id,
                                                 static_cast<cudaStream_t>(f.launch.stream));
  });
}

void paged_attention(const PagedProblem& p, const PagedAttentionFwd& a) {
  if (p.B == 0 || p.T == 0 || p.H == 0) return;
  MKA_CHECK(p.B * p.T * p.H < (int64_t(1) << 31) && p.T * p.group() < (int64_t(1) << 31),
            "q: too many rows for the CUDA kernel (B x Tq x H = ", p.B * p.T * p.H, ")");
  MKA_CHECK(p.W * p.S < (int64_t(1) << 31), "block_table: ", p.W, " pages of ", p.S,
            " tokens exceed 2^31 token slots");
  DeviceGuard guard(p.device_id);
  auto s = static_cast<cudaStream_t>(a.launch.stream);
  PagedArgs args = common_args(a.q, a.pages.k_pages, a.pages.v_pages, a.out, a.lse, p.B, p.T,
                               p.H, p.G, p.dk, p.dv, p.causal, p.scale, p.window);
  args.table = static_cast<const int32_t*>(a.pages.block_table.data);
  args.ts0 = a.pages.block_table.stride[0], args.ts1 = a.pages.block_table.stride[1];
  args.lens = static_cast<const int32_t*>(a.seqlens.data), args.ls = a.seqlens.stride[0];
  args.S = int(p.S), args.W = int(p.W), args.P = p.P;
  if (p.ema) {
    args.kst = static_cast<const float*>(a.ema.k_page_states.data);
    args.vst = static_cast<const float*>(a.ema.v_page_states.data);
    args.beta = float(p.beta);
    args.lam0 = lam_level(a.lam, 0), args.lam1 = lam_level(a.lam, 1);
  }
  dispatch_dtype(p.dtype, "paged_attention", [&](auto* t) {
    dispatch<std::remove_pointer_t<decltype(t)>>(args, p.W * p.S, p.device_id, s);
  });
}

}  // namespace mka::cuda
