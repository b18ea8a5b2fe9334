// The arguments of the paged attention kernels (paged_attention.cu: CUDA cores for every
// dtype and head dim; paged_mma.cuh: tensor cores for 16-bit pages of head dim 64 or 128) and
// the masks they share.
#pragma once
#include "common/device_utils.cuh"

namespace mka::cuda::paged {

constexpr int kThreads = 128;
constexpr int kRows = 16;  // query rows (tokens x heads of one kv head) per block
constexpr int kTile = 64;  // keys per shared-memory tile
constexpr int64_t kMinSplit = 128;  // keys a split gets at least (two tiles)
constexpr int kMaxSplits = 1024;  // splits of one row (the combine keeps a weight per split)
constexpr int kCombineThreads = 256;
constexpr int kMaxCluster = 16;  // blocks of a cluster that merges its splits (non-portable > 8)
constexpr float kLog2e = 1.4426950408889634f;

struct PagedArgs {
  const void *q, *kp, *vp;
  const float *kst, *vst;  // EMA page checkpoints (P, G, d), or null
  TokenScalar lam0, lam1;
  void* out;
  float* lse;
  int64_t qs[3], ks[3], vs[3], os[3];
  const int32_t* table;  // null: contiguous cache, sequence b is "page" b
  int64_t ts0, ts1;
  const int32_t* lens;  // null: every sequence holds S keys (a contiguous cache)
  int64_t ls;
  int B, T, H, G, grp, dk, dv, S, W;
  int64_t P;
  bool causal;
  float scale_log2;  // softmax scale x log2(e): scores in base 2
  int64_t window;    // <= 0: none
  float beta;
  int rows;  // query rows per block: kRows, or 8 where MKA's levels share the m16 tile
  int row_blocks, splits;
  int64_t unit;  // a split is a whole number of these keys (tiles; pages too with level 2)
  float* ws;  // splits > 1: partials [split][b][t][h][level][dv + 2]
  bool cluster;  // splits > 1 as one thread-block cluster that merges them itself (sm_90)
};

// Level l's weight in query row t of sequence b: lam's with MKA's two levels, else 1.
__device__ __forceinline__ float level_weight(const PagedArgs& a, int levels, int l, int64_t b,
                                              int64_t t) {
  return levels == 2 ? (l == 0 ? a.lam0 : a.lam1).load(b, t, 1.f) : 1.f;
}

// A merge of splits (the combine kernel, a cluster): the factor of a row's weighted sum, w / L,
// where L (the splits' exp-weighted sums) is positive; NaN where a bad page or length made L
// NaN; 0 where no split had keys.
__device__ __forceinline__ float merged_scale(float L, float w) {
  return L > 0.f ? w / L : (L != L ? L : 0.f);
}

// The merged row's logsumexp (natural base) from its base-2 max m and sum L: NaN as L, -inf
// where no split had keys.
__device__ __forceinline__ float merged_lse(float m, float L) {
  return L > 0.f ? (m + log2f(L)) / kLog2e : (L != L ? L : -INFINITY);
}

__device__ __forceinline__ int64_t key_hi(const PagedArgs& a, int64_t i, int64_t n) {
  if (!a.causal) return n;
  const int64_t x = i + (n - a.T) + 1;
  return x < 0 ? 0 : (x > n ? n : x);
}
__device__ __forceinline__ int64_t key_lo(const PagedArgs& a, int64_t i, int64_t n) {
  if (a.window <= 0) return 0;
  const int64_t x = i + (n - a.T) - a.window + 1;
  return x < 0 ? 0 : (x > n ? n : x);
}

// What a block (key split, sequence, kv head, up to a.rows query rows) reads: keys [lo, hi)
// (level 1 sees [lo1, hi) at most; with level 2, lo is the split's start). Each sequence cuts
// its own length into the splits. bad: a length beyond the table (NaN rows, nothing read).
struct BlockKeys {
  int b, g, split, f0, R;
  int64_t nk, lo1, lo, hi;
  bool bad;
};

template <bool kEma> __device__ __forceinline__ BlockKeys block_keys(const PagedArgs& a) {
  BlockKeys k;
  const int rb = blockIdx.x % a.row_blocks, bg = blockIdx.x / a.row_blocks;
  k.b = bg / a.G, k.g = bg % a.G, k.split = blockIdx.y;
  k.f0 = rb * a.rows;
  k.R = min(a.rows, a.T * a.grp - k.f0);
  const int64_t raw = a.lens ? a.lens[k.b * a.ls] : a.S;
  const int64_t cap = a.table ? int64_t(a.W) * a.S : int64_t(a.S);
  k.bad = raw < 0 || raw > cap;
  k.nk = raw < 0 ? 0 : (raw > cap ? cap : raw);
  const int64_t i_first = k.f0 / a.grp, i_last = (k.f0 + k.R - 1) / a.grp;
  k.lo1 = key_lo(a, i_first, k.nk);
  int64_t split_len = ceil_div(k.nk > 1 ? k.nk : 1, a.splits);
  split_len = ceil_div(split_len > kMinSplit ? split_len : kMinSplit, a.unit) * a.unit;
  const int64_t lo = kEma ? 0 : k.lo1, hi = key_hi(a, i_last, k.nk);
  k.lo = lo > k.split * split_len ? lo : k.split * split_len;
  k.hi = hi < (k.split + 1) * split_len ? hi : (k.split + 1) * split_len;
  return k;
}

// Page and row of sequence b's token pos; page -1 where the entry is not a page index.
__device__ __forceinline__ int page_of(const PagedArgs& a, int b, int64_t pos, int& row) {
  if (!a.table) {
    row = int(pos);
    return b;
  }
  const int p = int(pos), slot = p / a.S;  // positions < 2^31 (checked on the host)
  row = p - slot * a.S;
  const int page = a.table[b * a.ts0 + slot * a.ts1];
  return page >= 0 && page < a.P ? page : -1;
}

}  // namespace mka::cuda::paged
