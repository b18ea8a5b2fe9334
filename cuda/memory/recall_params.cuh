// The arguments of the recall attention kernels (SPEC §7.2; recall_attention.cu launches
// them, recall_mma.cuh holds the tensor-core ones) and the row blocks the forward and dq
// kernels share.
//
// A row block is (batch b, up to 16 / group consecutive query rows t0.., kv head g, a tile of
// up to 16 of the group's query heads): its query rows x heads are the 16 M rows of the
// m16n8k16 tiles. Its rows' chosen chunks are merged into one list of distinct chunks
// ("units"), each with how many times each row chose it, so a chunk several neighbouring
// rows recall (the common case: neighbours' queries are alike) is read once, and a row's
// scores against another row's chunks are masked. A row that chose a chunk twice sees its
// keys twice, as the CPU kernel does: a count n adds log2(n) to the base-2 scores.
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
  uint64_t* entry_keys = nullptr;    // backward: entry keys ((b G + g) nC + c) Tq + t
  const uint64_t* sorted = nullptr;  // ... sorted
  int64_t n_sorted = 0;
  int64_t B = 0, Tq = 0, Tk = 0, H = 0, G = 0, grp = 0, d = 0, R = 0, C = 0, nC = 0;
  float scale = 1.f, scale_log2 = 1.f;
  // row blocks: hp heads of a row per tile, nt rows per block, mtiles head tiles, tblocks
  int hp = 1, nt = 1, mtiles = 1;
  int64_t tblocks = 0;
  FastDiv fC;  // j / C for j < kCap C

  __device__ __forceinline__ int32_t chosen_at(int64_t b, int64_t t, int64_t g, int64_t r) const {
    return chosen[b * cs[0] + t * cs[1] + g * cs[2] + r * cs[3]];
  }
  __device__ __forceinline__ int64_t stat(int64_t b, int64_t h, int64_t t) const {
    return (b * H + h) * Tq + t;
  }
  // The key of entry (b, t, g, chunk c) in the backward's sorted index.
  __host__ __device__ __forceinline__ uint64_t entry_key(int64_t b, int64_t g, int64_t c,
                                                         int64_t t) const {
    return uint64_t(((b * G + g) * nC + c) * Tq + t);
  }
  // The key of -1 and invalid entries: past every valid one.
  __host__ __device__ __forceinline__ uint64_t no_entry() const { return uint64_t(B * G * nC * Tq); }
};

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

}  // namespace mka::cuda::recall
