// The steps of the paged decode kernel on tensor cores (paged_mma.cuh): where a tile's rows
// live (TileRows), the rows' key ranges (RowMask), a level's online softmax per warp
// (softmax_step over mma/warp_keys.cuh's steps) and the copies of a tile into shared memory.
#pragma once
#include "memory/paged_params.cuh"
#include "mma/mma_tile.cuh"
#include "mma/warp_keys.cuh"

namespace mka::cuda::paged {

constexpr int kMmaWarps = kThreads / 32;
static_assert(kTile == 16 * kMmaWarps, "a warp owns 16 keys of a tile");

constexpr int kSegs = kTile / 16;  // 16-row segments of a tile (level 2 on tensor cores)

// Q's rows in shared memory: MKA's stacked levels (rows 8-15 of the tile hold level 2) keep 8.
template <bool kStack> constexpr int q_rows() { return kStack ? 8 : 16; }

template <int D, bool kEma, bool kStack = false> constexpr size_t mma_smem_bytes() {
  // Q (q_rows x D), then K and V in two stages; the merge reuses the stages. Level 2: the
  // checkpoint pair of the block's first page (float32, k then v).
  return size_t(q_rows<kStack>() * D + 2 * 2 * kTile * D) * 2 + (kEma ? size_t(2 * D) * 4 : 0);
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

using mma::WarpSoftmax;

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
  // MKA's levels stacked in one m16 tile (at most 8 query rows): rows 0-7 are level 1 of the
  // query rows, rows 8-15 level 2 of the same rows; lo[0] holds both.
  __device__ __forceinline__ void init_stacked(const PagedArgs& a, const BlockKeys& bk) {
    if (threadIdx.x < 16) {
      const int r = threadIdx.x % 8;
      const int64_t i = (bk.f0 + r) / a.grp;
      hi[threadIdx.x] = int(r < bk.R ? min(key_hi(a, i, bk.nk), bk.hi) : 0);
      lo[0][threadIdx.x] = threadIdx.x < 8 ? int(max(key_lo(a, i, bk.nk), bk.lo)) : int(bk.lo);
    }
  }
};


// One warp's 16 keys of a tile, for one level: S = Q K^T (mma::warp_scores, Q's fragments
// from registers (MHA) or loaded from shared memory per tile (load_q; MKA, whose level 2
// needs those 32 registers)), the masked online softmax (softmax_step), O += P V
// (mma::warp_times_rows).

// Q's A operand (16 x 16, k-chunk pair kk) from its shared-memory tile of kQRows rows
// (swizzled); rows past it read a 16-byte zero chunk.
template <int D, int kQRows, class T>
__device__ __forceinline__ void load_q(unsigned (&a)[4], const T* sQ, const T* zero16, int kk) {
  const int l = threadIdx.x & 31, row = (l & 7) + ((l >> 3) & 1) * 8;
  mma::ldsm_x4(a, row < kQRows ? sQ + mma::swz<D>(row, 2 * kk + (l >> 4)) : zero16);
}

// s: scores of rows lane/4 + 8 (c >> 1), keys j0 + k0 + 8 nt + 2 (lane % 4) + (c & 1); keys
// outside the level's [lo, hi) of a row are masked. On return s holds P (unnormalised) and the
// state's max, sum and accumulator are rescaled to the new max.
template <int D>
__device__ __forceinline__ void softmax_step(float (&s)[2][4], int64_t j0, int k0,
                                             const RowMask& mask, int level, WarpSoftmax<D>& st) {
  using namespace mma;
  const int lane = threadIdx.x % 32;
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
        x = (pos >= lo && pos < hi) ? x : -INFINITY;
        mx[hr] = fmaxf(mx[hr], x);
      }
  }
  st.update(s, mx);
}

// One level over the warp's keys of a tile whose rows hold that level's keys and values.
template <class T, int D>
__device__ __forceinline__ void tile_level(const PagedArgs& a, const T* sQ, const T* sK, const T* sV, int64_t j0,
                                           const RowMask& mask, int level, WarpSoftmax<D>& st) {
  const int k0 = 16 * (threadIdx.x / 32);
  float s[2][4] = {};
  mma::warp_scores_by<T, D>(s, [&](unsigned (&f)[4], int kk) { load_q<D, 16>(f, sQ, sQ, kk); }, sK, k0);
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) s[nt][c] *= a.scale_log2;
  softmax_step<D>(s, j0, k0, mask, level, st);
  mma::warp_times_rows<T, D>(st.o, s, sV, k0);
}

// Rows [j0, j0 + 64) of the split's keys, K and V, into a stage (zeros outside [lo, hi) and
// for invalid entries).
template <class T, int D>
__device__ __forceinline__ void mma_issue_tile(const PagedArgs& a, const BlockKeys& bk, T* sK,
                                               T* sV, const int2* rows) {
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
}

// The checkpoint pair of the page where the block's keys start (sC: [k | v][D] float32;
// zeros for an invalid page).
template <int D>
__device__ __forceinline__ void mma_issue_ckpts(const PagedArgs& a, const BlockKeys& bk,
                                                float* sC, const int2* rows) {
  for (int e = threadIdx.x; e < 2 * D / 4; e += kThreads) {
    const int kv = e / (D / 4), x = 4 * (e % (D / 4));
    const float* ck = kv ? a.vst : a.kst;
    const int page = rows[0].x;
    mma::cp_async16(sC + kv * D + x, page >= 0 ? ck + (int64_t(page) * a.G + bk.g) * D + x : ck, page >= 0);
  }
}

}  // namespace mka::cuda::paged
