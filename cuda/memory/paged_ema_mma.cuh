// MKA's level 2 in the paged decode kernel: attention over EMA(k), EMA(v) of the cached
// keys and values, without writing the EMA rows anywhere.
//
// Within a 16-key segment that starts from the state s_in,
//   EMA_t = sum_{u <= t} L[t][u] x_u + beta^(t+1) s_in,   L[t][u] = (1 - beta) beta^(t - u),
// so level 2 needs no EMA rows at all (EmaScores, where pages hold a multiple of 16 tokens):
//   scores  q . EMA(k)_t = (S1 L^T)[t] + beta^(t+1) (q . s_in_k)      S1 = level 1's scores
//   output  sum_t P2_t EMA(v)_t = (P2 L) V + (sum_t P2_t beta^(t+1)) s_in_v
// Both products are 16 x 16 x 16 mma on fragments the warp already holds, and V is read by
// the same ldmatrix as level 1's. What crosses segments — and so warps — is small: per query
// row the scalar q . s_in_k, per value column the state s_in_v; each warp publishes its
// segment's local sums (from a zero state) and after one barrier every warp walks the four
// segments' chain itself, so no warp waits for another's softmax.
//
// s_in is a page checkpoint only where the block's keys start (a split starts on a page):
// along a sequence a page's checkpoint is the EMA carried over the pages before it (what
// paged_write_ema writes), so the chain carries on across pages — the checkpoints of the
// other pages are neither read nor multiplied by q (12.5 % of the bytes at pages of 16).
// L is split into two 16-bit parts (hi + lo), and so are the scores it multiplies: the
// products keep ~16 bits where one 16-bit operand would keep 8.
#pragma once
#include <type_traits>

#include "memory/paged_mma_steps.cuh"

namespace mka::cuda::paged {

template <class T, int D> struct EmaScores {
  // The segment's local sums cross warps through shared memory (sums of the rows from a
  // zero state at the segment's last key; at the block's first page, the checkpoint terms).
  struct Shared {
    float zk[kSegs][16];  // (S1 L^T)[15] per query row
    float ck[kSegs][16];  // q . checkpoint_k per query row, where a segment starts from one
    T sv[kSegs][D];       // s_in_v of each segment (its value columns; rounded as EMA rows were)
    // L's B fragments, per lane (the same in every warp; shared memory, not 16 registers):
    // [S1 L^T hi | S1 L^T lo | P2 L][n-tile][reg][lane] (P2 is 16-bit already: L's hi serves).
    unsigned l[3][2][2][32];
  };
  // V columns walked per thread: pairs of columns, the 16 rows of kSegs / kParts segments.
  static constexpr int kParts = 2 * kThreads / D;  // threads per column pair (2 or 4)
  static constexpr int kSegPer = kSegs / kParts;
  static_assert(kSegs % kParts == 0 && 32 % kParts == 0, "a column pair's threads share a warp");

  float pw[2][2];        // beta^(t + 1) of this lane's key columns t = 8 nt + 2 (lane % 4) + c
  float b16, beta, tail;  // beta^16; tail: beta^((16 - off) % 16) of this thread's V walk
  float ck_in[2];   // q . s_in_k before the tile (rows lane/4, lane/4 + 8; the same in every warp)
  float2 sv_in;     // s_in_v before the tile, this thread's column pair (V chain)

  // Powers of beta as exp2(e log2 beta) (the special-function unit; powf is ~40 instructions
  // each, a fixed cost that shows at small caches). sh.l is written by warp 0: read after the
  // next barrier.
  __device__ __forceinline__ void init(float b, Shared& sh) {
    using namespace mma;
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const float lb = log2f(b);
    auto pow_b = [&](int e) { return e == 0 ? 1.f : exp2f(float(e) * lb); };  // beta = 0: 0^0 = 1
    beta = b, b16 = pow_b(16);
    tail = pow_b((16 - (lane / (32 / kParts)) * 8 / kParts) & 15);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 2; ++i) pw[nt][i] = pow_b(8 * nt + 2 * t + i + 1);
    ck_in[0] = ck_in[1] = 0.f;
    sv_in = make_float2(0.f, 0.f);
    if (threadIdx.x >= 32) return;
    auto L = [&](int r, int c) { return c <= r ? (1.f - b) * pow_b(r - c) : 0.f; };
    auto split = [&](int which, int nt, int i, float x0, float x1) {
      const float h0 = to_f(from_f<T>(x0)), h1 = to_f(from_f<T>(x1));
      sh.l[which][nt][i][lane] = pack2<T>(h0, h1);
      if (which == 0) sh.l[1][nt][i][lane] = pack2<T>(x0 - h0, x1 - h1);
    };
    // B fragment: reg i holds rows k = 2t + 8i, 2t + 8i + 1 of column n = 8 nt + g.
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int n = 8 * nt + g, k = 2 * t + 8 * i;
        split(0, nt, i, L(n, k), L(n, k + 1));  // B[k][n] = L[n][k]
        split(2, nt, i, L(k, n), L(k + 1, n));  // B[k][n] = L[k][n]
      }
  }

  // Before the barrier, each warp: its segment's S1 L^T (z, kept for after), its last column
  // and the checkpoint's q . s_in_k where the segment starts a page, into shared memory.
  // s1: level 1's scores of the warp's keys, scaled (base 2), not masked.
  template <int kQRows>
  __device__ __forceinline__ void scores_local(float (&z)[2][4], const float (&s1)[2][4],
                                               const T* sQ, const T* qzero, const float* sC,
                                               unsigned starts, float scale_log2,
                                               Shared& sh) const {
    using namespace mma;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float hi[2][4], lo[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        hi[nt][c] = to_f(from_f<T>(s1[nt][c]));
        lo[nt][c] = s1[nt][c] - hi[nt][c];
      }
    unsigned ah[4], al[4];
    acc_to_a<T, 2>(ah, hi, 0);
    acc_to_a<T, 2>(al, lo, 0);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const unsigned h0 = sh.l[0][nt][0][lane], h1 = sh.l[0][nt][1][lane];
      z[nt][0] = z[nt][1] = z[nt][2] = z[nt][3] = 0.f;
      mma16816<T>(z[nt], al, h0, h1);
      mma16816<T>(z[nt], ah, sh.l[1][nt][0][lane], sh.l[1][nt][1][lane]);
      mma16816<T>(z[nt], ah, h0, h1);
    }
    if (t == 3) sh.zk[warp][g] = z[1][1], sh.zk[warp][g + 8] = z[1][3];  // key 15
    if ((starts >> warp) & 1u) {
      // q . checkpoint on tensor cores: column 0 of B the checkpoint's hi part, column 1 its lo.
      const float* ck = sC;
      float c[4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        unsigned qa[4], b[2] = {0u, 0u};
        load_q<D, kQRows>(qa, sQ, qzero, kk);
        if (g < 2) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const float2 x = *reinterpret_cast<const float2*>(ck + 16 * kk + 8 * i + 2 * t);
            const float h0 = to_f(from_f<T>(x.x)), h1 = to_f(from_f<T>(x.y));
            b[i] = g == 0 ? pack2<T>(h0, h1) : pack2<T>(x.x - h0, x.y - h1);
          }
        }
        mma16816<T>(c, qa, b[0], b[1]);
      }
      if (t == 0) sh.ck[warp][g] = (c[0] + c[1]) * scale_log2, sh.ck[warp][g + 8] = (c[2] + c[3]) * scale_log2;
    }
  }

  // Before the barrier, every thread: its column pair's EMA over its segments from a zero
  // state, then the chain over the tile's segments (shuffles within the pair's threads) into
  // sh.sv. The parts start their walks kTile / kParts / 8 ... rows apart (rotated within the
  // segment, split into two walks) so that the threads of a warp read different banks.
  __device__ __forceinline__ void values_chain(const T* sV, const float* sC, unsigned starts,
                                               Shared& sh) {
    constexpr int kLanes = 32 / kParts;  // lanes of one part in a warp
    const int lane = threadIdx.x % 32, part = lane / kLanes;
    const int col = 2 * ((threadIdx.x / 32) * kLanes + lane % kLanes);
    const int off = part * 8 / kParts;  // init's tail is beta^((16 - off) % 16)
    const float one_m = 1.f - beta;
    float2 zs[kSegPer];
#pragma unroll
    for (int u = 0; u < kSegPer; ++u) {
      const int seg = part * kSegPer + u;
      float2 z = make_float2(0.f, 0.f), za = z;
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const int rr = (off + r) & 15, row = 16 * seg + rr;
        if (rr == 0) za = z, z = make_float2(0.f, 0.f);  // rows off..15 done; rows 0..off-1 next
        const unsigned x = *reinterpret_cast<const unsigned*>(sV + mma::swz<D>(row, col >> 3) + (col & 7));
        const T* xv = reinterpret_cast<const T*>(&x);
        z.x = fmaf(beta, z.x, one_m * to_f(xv[0]));
        z.y = fmaf(beta, z.y, one_m * to_f(xv[1]));
      }
      zs[u] = make_float2(fmaf(tail, z.x, za.x), fmaf(tail, z.y, za.y));
    }
    float2 s = sv_in;
#pragma unroll
    for (int seg = 0; seg < kSegs; ++seg) {
      const int src = (lane % kLanes) + kLanes * (seg / kSegPer);
      const float zx = __shfl_sync(0xffffffffu, zs[seg % kSegPer].x, src);
      const float zy = __shfl_sync(0xffffffffu, zs[seg % kSegPer].y, src);
      if ((starts >> seg) & 1u) s = *reinterpret_cast<const float2*>(sC + D + col);
      if (seg / kSegPer == part) *reinterpret_cast<unsigned*>(&sh.sv[seg][col]) = mma::pack2<T>(s.x, s.y);
      s = make_float2(fmaf(b16, s.x, zx), fmaf(b16, s.y, zy));
    }
    sv_in = s;
  }

  // q . s_in_k of the warp's segment for its rows g (and g + 8 where kHalves = 2): every warp
  // walks the chain of all four segments, so ck_in stays the same in every warp.
  template <int kHalves>
  __device__ __forceinline__ void key_chain(float (&cin)[2], unsigned starts, const Shared& sh) {
    const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4;
    cin[0] = cin[1] = 0.f;
#pragma unroll
    for (int seg = 0; seg < kSegs; ++seg) {
      const bool start = (starts >> seg) & 1u;
#pragma unroll
      for (int hr = 0; hr < kHalves; ++hr) {
        float& c = ck_in[hr];
        if (start) c = sh.ck[seg][g + 8 * hr];
        if (seg == warp) cin[hr] = c;
        c = fmaf(b16, c, sh.zk[seg][g + 8 * hr]);
      }
    }
  }

  // Level 2 in rows 8-15 of level 1's tile (at most 8 query rows: rows g + 8 of the scores and
  // the accumulator are level 2 of query row g): one online softmax, one P V for both levels.
  // s1: level 1's scores (rows g), z: S1 L^T (rows g); st: the stacked state.
  __device__ __forceinline__ void stacked(const float (&s1)[2][4], const float (&z)[2][4],
                                          const T* sV, unsigned starts, int64_t j0,
                                          const RowMask& mask, const Shared& sh,
                                          WarpSoftmax<D>& st) {
    float cin[2];
    key_chain<1>(cin, starts, sh);
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        s[nt][c] = s1[nt][c];
        s[nt][2 + c] = fmaf(pw[nt][c], cin[0], z[nt][c]);
      }
    softmax_step<D>(s, j0, 16 * (threadIdx.x / 32), mask, 0, st);
    values<1>(s, sV, sh, st);
  }

  // After the barrier, each warp: its segment's level-2 scores, the online softmax (st), then
  // its values. Every warp walks the key chain of all four segments, so ck_in stays the same
  // in every warp. starts: bit s set where segment s starts a page (read before the barrier:
  // the tile's rows are refilled while slower warps are here).
  __device__ __forceinline__ void level2(const float (&z)[2][4], const T* sV, unsigned starts,
                                         int64_t j0, const RowMask& mask, const Shared& sh,
                                         WarpSoftmax<D>& st) {
    float cin[2];
    key_chain<2>(cin, starts, sh);
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[nt][c] = fmaf(pw[nt][c & 1], cin[c >> 1], z[nt][c]);
    softmax_step<D>(s, j0, 16 * (threadIdx.x / 32), mask, 1, st);
    values<0>(s, sV, sh, st);
  }

  // O += (P2 L) V + (P2 . beta^(t+1)) s_in_v for the accumulator rows of level 2: g and g + 8
  // (kFirst = 0), or g + 8 only (kFirst = 1: rows g are level 1's, whose P V is the same mma).
  template <int kFirst>
  __device__ __forceinline__ void values(const float (&p)[2][4], const T* sV, const Shared& sh,
                                         WarpSoftmax<D>& st) const {
    using namespace mma;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
    float w_in[2] = {0.f, 0.f};
#pragma unroll
    for (int hr = kFirst; hr < 2; ++hr) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) w_in[hr] = fmaf(p[nt][2 * hr + c], pw[nt][c], w_in[hr]);
      w_in[hr] = quad_sum(w_in[hr]);
    }
    unsigned pa[4];
    acc_to_a<T, 2>(pa, p, 0);
    float w[2][4] = {};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) mma16816<T>(w[nt], pa, sh.l[2][nt][0][lane], sh.l[2][nt][1][lane]);
    // acc_to_a's layout: a[0], a[2] rows g, a[1], a[3] rows g + 8.
    if (kFirst == 0) pa[0] = pack2<T>(w[0][0], w[0][1]), pa[2] = pack2<T>(w[1][0], w[1][1]);
    pa[1] = pack2<T>(w[0][2], w[0][3]), pa[3] = pack2<T>(w[1][2], w[1][3]);
    warp_times_rows<T, D>(st.o, pa, sV, 16 * warp);
#pragma unroll
    for (int n8 = 0; n8 < D / 8; ++n8) {
      const T* vp = &sh.sv[warp][8 * n8 + 2 * t];
      const float vx = to_f(vp[0]), vy = to_f(vp[1]);
#pragma unroll
      for (int hr = kFirst; hr < 2; ++hr) {
        st.o[n8][2 * hr] = fmaf(w_in[hr], vx, st.o[n8][2 * hr]);
        st.o[n8][2 * hr + 1] = fmaf(w_in[hr], vy, st.o[n8][2 * hr + 1]);
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

}  // namespace mka::cuda::paged
