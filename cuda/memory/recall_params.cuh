// The arguments of the recall attention kernels (SPEC §7.2; recall_attention.cu launches
// them, recall_mma.cuh and recall_chunks.cuh hold the tensor-core ones), the inverse index
// of the chosen entries, and the row blocks the row-major forward and dq kernels share.
//
// A row block is (batch b, up to 16 / group consecutive query rows t0.., kv head g, a tile of
// up to 16 of the group's query heads): its query rows x heads are the 16 M rows of the
// m16n8k16 tiles. Its rows' chosen chunks are merged into one list of distinct chunks
// ("units"), each with how many times each row chose it, so a chunk several neighbouring
// rows recall (the common case: neighbours' queries are alike) is read once, and a row's
// scores against another row's chunks are masked. A row that chose a chunk twice sees its
// keys twice, as the CPU kernel does: a count n adds log2(n) to the base-2 scores.
//
// The inverse index: every valid chosen entry (b, t, g, r) of chunk c as the 64-bit key
// (((b G + g) nC + c) Tq + t) R + r, radix-sorted, so the entries that chose a chunk are one
// run of the sorted keys (rows in increasing t, then r: a chunk chosen twice by a row is two
// entries), and `run_starts[(b G + g) nC + c]` is where that run starts.
#pragma once
#include "common/device_utils.cuh"

namespace mka::cuda::recall {

constexpr int kThreads = 128;
constexpr int kTile = 64;   // keys per shared-memory tile
constexpr int kCap = 128;   // chosen entries a row block merges (rows x R)
constexpr int kMaxRows = 16;
constexpr float kLog2e = 1.4426950408889634f;

struct Args {
  Rows q, k, v, out, dout, dq, dk, dv;
  const int32_t* chosen = nullptr;
  int64_t cs[4] = {};
  float* lse = nullptr;            // (B, H, Tq), natural log
  float* delta = nullptr;          // (B, H, Tq): rowsum(dO o O), backward scratch
  uint64_t* entry_keys = nullptr;    // the inverse index's keys (entry_key), in entry order
  const uint64_t* sorted = nullptr;  // ... sorted
  int64_t* run_starts = nullptr;     // [(b G + g) nC + c]: where that chunk's run starts
  int64_t B = 0, Tq = 0, Tk = 0, H = 0, G = 0, grp = 0, d = 0, R = 0, C = 0, nC = 0;
  // The (b G + g) units [bg0, bg1) one launch of the chunk-tile kernels covers (a slab).
  int64_t bg0 = 0, bg1 = 0;
  // Chunk-major partials (recall_chunks.cuh): per (row t, head hh of the group, partial p =
  // r kts + kt: entry r's key tile kt) of the slab's units, d floats at part_index(...) * d
  // and (forward) one base-2 log-sum-exp at part_lse[part_index(...)].
  float* part = nullptr;
  float* part_lse = nullptr;
  int64_t kts = 1, tile_keys = kTile;  // key tiles per chunk, keys per tile (the last: fewer)
  int64_t stripe = 0;                  // forward: sorted entries per block
  float scale = 1.f, scale_log2 = 1.f;
  // row blocks: hp heads of a row per tile, nt rows per block, mtiles head tiles, tblocks
  int hp = 1, nt = 1, mtiles = 1;
  int64_t tblocks = 0;
  FastDiv fC;   // j / C for j < kCap C
  FastDiv fgrp;  // pair / group for the pairs of a chunk's run (< B Tq H R < 2^31)
  FastDiv fR;    // (t R + r) / R

  __device__ __forceinline__ int32_t chosen_at(int64_t b, int64_t t, int64_t g, int64_t r) const {
    return chosen[b * cs[0] + t * cs[1] + g * cs[2] + r * cs[3]];
  }
  __device__ __forceinline__ int64_t stat(int64_t b, int64_t h, int64_t t) const {
    return (b * H + h) * Tq + t;
  }
  // The key of entry r of (b, t, g), choosing chunk c, in the sorted index.
  __host__ __device__ __forceinline__ uint64_t entry_key(int64_t b, int64_t g, int64_t c,
                                                         int64_t t, int64_t r) const {
    return uint64_t((((b * G + g) * nC + c) * Tq + t) * R + r);
  }
  // The first key of unit u = (b G + g) nC + c (u = B G nC: no_entry).
  __host__ __device__ __forceinline__ uint64_t unit_key(int64_t u) const {
    return uint64_t(u) * uint64_t(Tq * R);
  }
  // The key of -1 and invalid entries: past every valid one.
  __host__ __device__ __forceinline__ uint64_t no_entry() const { return unit_key(B * G * nC); }
  // A valid key's unit (b G + g) nC + c, and its row t and entry r given the low 32 bits of
  // its unit's first key (the key minus that is t R + r < Tq R < 2^31).
  __device__ __forceinline__ int64_t key_unit(uint64_t key) const {
    return int64_t(key / uint64_t(Tq * R));
  }
  __device__ __forceinline__ void key_row(uint64_t key, uint32_t unit_first, int64_t& t,
                                          int64_t& r) const {
    const uint32_t tr = uint32_t(key) - unit_first, tt = fR.div(tr);
    t = tt, r = tr - tt * uint32_t(R);
  }
  // Where the partial p of (unit bg, row t, head hh of the group) lies in the slab's scratch.
  __device__ __forceinline__ int64_t part_index(int64_t bg, int64_t t, int64_t hh, int64_t p) const {
    return (((bg - bg0) * Tq + t) * grp + hh) * (R * kts) + p;
  }
};

// --- the inverse index ------------------------------------------------------------------
// First index of `sorted[0, n)` not below `key`.
__device__ __forceinline__ int64_t lower_bound(const uint64_t* sorted, int64_t n, uint64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted[mid] < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// The entries that chose chunk c of unit bg = b G + g: sorted keys [lo, hi); `first`: the
// low 32 bits of the chunk's first key (entry_key(b, g, c, 0, 0)), for key_row.
struct ChunkRows {
  int64_t lo, hi;
  uint32_t first;
};
__device__ __forceinline__ ChunkRows chunk_rows(const Args& a, int64_t bg, int64_t c) {
  const int64_t u = bg * a.nC + c;
  return {a.run_starts[u], a.run_starts[u + 1], uint32_t(a.unit_key(u))};
}

// A block of the dK/dV kernels: key tile kt of chunk c of unit bg (kv head g of batch b).
struct ChunkTile {
  int64_t b, g, bg, c, j0;  // keys [j0, j0 + n) of kv head g: key tile kt of chunk c
  int kt, n;
};
// Block blockIdx.x of a launch over the slab's units [bg0, bg1) x nC chunks x their key
// tiles: the tile fastest, then the unit, the chunk slowest — a row may recall only earlier
// chunks, so the early chunks have the longest runs, and they start first.
__device__ __forceinline__ ChunkTile chunk_tile(const Args& a, int tile_keys) {
  const int64_t kts = (a.C + tile_keys - 1) / tile_keys, nbg = a.bg1 - a.bg0;
  int64_t idx = blockIdx.x;
  ChunkTile ct;
  ct.kt = int(idx % kts);
  idx /= kts;
  ct.bg = a.bg0 + idx % nbg;
  ct.c = idx / nbg;
  ct.b = ct.bg / a.G;
  ct.g = ct.bg % a.G;
  ct.j0 = ct.c * a.C + int64_t(ct.kt) * tile_keys;
  ct.n = int(min(int64_t(tile_keys), a.C - int64_t(ct.kt) * tile_keys));
  return ct;
}

// Pair f of the run of tile ct's chunk (its entry f / group, query head f % group of the
// group): the entry's query row t and index r, and the absolute query head h.
__device__ __forceinline__ void pair_of(const Args& a, const ChunkRows& cr, const ChunkTile& ct,
                                        int64_t f, int64_t& t, int64_t& r, int64_t& h) {
  const uint32_t e = a.fgrp.div(uint32_t(f));
  a.key_row(a.sorted[cr.lo + e], cr.first, t, r);
  h = ct.g * a.grp + (f - int64_t(e) * a.grp);
}

struct RowBlock {
  int64_t b, t0, g;
  int h0;  // first head (within the group) of the tile
};

__device__ __forceinline__ RowBlock row_block(const Args& a) {
  int64_t idx = blockIdx.x;
  RowBlock rb;
  rb.h0 = int(idx % a.mtiles) * kMaxRows;
  idx /= a.mtiles;
  rb.g = idx % a.G;
  idx /= a.G;
  rb.t0 = (idx % a.tblocks) * a.nt;
  rb.b = idx / a.tblocks;
  return rb;
}

// A row block's merged chunk list and its M rows.
struct RowSmem {
  int unit[kCap];                       // chunk of unit u
  unsigned char cnt[kCap][kMaxRows];    // times block row i chose unit u
  int ent[kCap];
  int rowi[kMaxRows];  // M row m: block row i, -1 for padding
  int head[kMaxRows];  // M row m: query head (absolute)
  int bad[kMaxRows];   // block row i met an invalid chosen entry
  int warp_units[kThreads / 32];
  int nunits;
};

// Fills s for row block rb (all threads; ends with a barrier). Invalid entries (neither -1
// nor a chunk below nC) are never followed: they mark their row bad.
__device__ __forceinline__ void merge_chunks(const Args& a, RowSmem& s, const RowBlock& rb) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  if (tid < kMaxRows) {
    const int m = tid, i = m / a.hp, h = rb.h0 + m % a.hp;
    const bool ok = i < a.nt && rb.t0 + i < a.Tq && h < a.grp;
    s.rowi[m] = ok ? i : -1;
    s.head[m] = ok ? int(rb.g * a.grp + h) : 0;
    s.bad[m] = 0;
  }
  __syncthreads();
  const int E = int(a.nt * a.R);  // <= kCap = kThreads
  int c = -1;
  if (tid < E) {
    const int i = tid / int(a.R), r = tid % int(a.R);
    if (rb.t0 + i < a.Tq) {
      const int32_t x = a.chosen_at(rb.b, rb.t0 + i, rb.g, r);
      if (x >= 0 && x < a.nC) c = x;
      else if (x != -1) s.bad[i] = 1;
    }
    s.ent[tid] = c;
  }
  __syncthreads();
  bool first = c >= 0;
  for (int e = 0; first && e < tid; ++e) first = s.ent[e] != c;
  const unsigned bal = __ballot_sync(0xffffffffu, first);
  if (lane == 0) s.warp_units[warp] = __popc(bal);
  __syncthreads();
  int base = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    base += w < warp ? s.warp_units[w] : 0;
    total += s.warp_units[w];
  }
  if (tid == 0) s.nunits = total;
  if (first) {  // in order of first occurrence; one thread counts its chunk's entries
    const int u = base + __popc(bal & ((1u << lane) - 1u));
    s.unit[u] = c;
#pragma unroll
    for (int i = 0; i < kMaxRows; ++i) s.cnt[u][i] = 0;
    for (int e = tid; e < E; ++e)
      if (s.ent[e] == c) ++s.cnt[u][e / int(a.R)];
  }
  __syncthreads();
}

// How many times M row m's query row chose the chunk holding the block's key j (0: masked).
__device__ __forceinline__ int key_count(const Args& a, const RowSmem& s, int m, int j) {
  const int i = s.rowi[m];
  if (i < 0 || j >= s.nunits * int(a.C)) return 0;
  return s.cnt[a.fC.div(unsigned(j))][i];
}

// Base-2 score of a key chosen n times (n > 0).
__device__ __forceinline__ float counted(float x, int n) {
  return n > 1 ? x + log2f(float(n)) : x;
}

__device__ __forceinline__ float qnan() { return __int_as_float(0x7fc00000); }

// A saved lse (natural log) as the base-2 offset of P = exp2(scale log2e S - lse2): -inf (a
// row without keys) and +inf (no pair) both give P = 0.
__device__ __forceinline__ float lse2_of(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

}  // namespace mka::cuda::recall
