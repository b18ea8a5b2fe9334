// Block-tiled exact attention on the CPU: forward with online softmax, backward with the
// softmax recomputed from the saved logsumexp. Never materialises a Tq x Tk matrix.
#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"
#include "mka/cpu/kernels.h"
#include "mka/tile_plan.h"

namespace mka::cpu {
namespace {

// Strided BTHD view of one (batch, head): row t starts at base + t * ld.
template <class T> struct HeadView {
  T* base;
  int64_t ld;
  T* row(int64_t t) const { return base + t * ld; }
};
template <class T> HeadView<T> head(const TensorRef& x, int64_t b, int64_t h) {
  return {ptr<T>(x) + b * x.stride[0] + h * x.stride[2], x.stride[1]};
}

// On the CPU the budget is a cache hint, not a hard limit: with a small L2 (256 KiB) a
// float64 d = 256 tile would not fit half of it, so the smallest tile is always allowed.
template <class T> TilePlan cpu_plan(int64_t d) {
  const size_t floor = TilePlan::working_set(16, 16, 1, int(d), sizeof(T), sizeof(T));
  return plan_tiles(Target::cpu, int(d), sizeof(T), std::max(cpu_tile_budget(), floor));
}

// Attention dropout of a tile (mka/dropout.h): the m x n weights of rows i0.. and key columns
// j0.. of head bh, element (r, c) at s[r * rs + c * cs], each scaled by 1 / (1 - p) or zeroed.
template <class T>
void drop_tile(const DropoutMask& mask, uint64_t bh, int64_t i0, int64_t m, int64_t j0,
               int64_t n, T* s, int64_t rs, int64_t cs) {
  const uint32_t threshold = mask.threshold();
  const T keep = T(mask.keep_scale());
  for (int64_t r = 0; r < m; ++r) {
    T* row = s + r * rs;
    for (int64_t c = j0 / 4; 4 * c < j0 + n; ++c) {
      const Philox4 w = mask.words(bh, uint64_t(i0 + r), uint64_t(c));
      for (int u = 0; u < 4; ++u) {
        const int64_t j = 4 * c + u - j0;
        if (j >= 0 && j < n) row[j * cs] *= w.x[u] < threshold ? keep : T(0);
      }
    }
  }
}

// --- forward ------------------------------------------------------------------------

template <class T> struct FwdCtx {
  AttentionProblem p;
  int bq, bk;
  int64_t n_qblocks;
  TensorRef q, k, v, out, lse;
};

template <class T> struct AttentionFwd {
  using Ctx = FwdCtx<T>;
  template <Isa I> MKA_INLINE static void run(const Ctx& c, int64_t task) {
    const AttentionProblem& p = c.p;
    const int64_t d = p.d, bq = c.bq, bk = c.bk;
    const int64_t qb = task % c.n_qblocks, bh = task / c.n_qblocks;
    const int64_t h = bh % p.H, b = bh / p.H, g = h / p.group();
    const int64_t i0 = qb * bq, m = std::min(p.Tq, i0 + bq) - i0;
    const auto q = head<const T>(c.q, b, h), k = head<const T>(c.k, b, g),
               v = head<const T>(c.v, b, g);
    const auto o = head<T>(c.out, b, h);
    T* lse = ptr<T>(c.lse) + (b * p.H + h) * p.Tq;

    T* Q = scratch<T>(bq * d + d * bk + bq * bk + bq * d + 2 * bq);
    T* Kt = Q + bq * d;      // d x bk, transposed key tile
    T* S = Kt + d * bk;      // bq x bk scores, then probabilities
    T* O = S + bq * bk;      // bq x d unnormalised output
    T* mx = O + bq * d;      // running max
    T* l = mx + bq;          // running sum
    const T scale = T(p.scale), ninf = -std::numeric_limits<T>::infinity();
    for (int64_t r = 0; r < m; ++r) {
      const T* src = q.row(i0 + r);
      for (int64_t x = 0; x < d; ++x) Q[r * d + x] = src[x] * scale;
      mx[r] = ninf;
      l[r] = 0;
    }
    std::fill(O, O + m * d, T(0));

    const int64_t jlo = p.key_lo(i0), jhi = p.key_hi(i0 + m - 1);
    for (int64_t j0 = jlo; j0 < jhi; j0 += bk) {
      const int64_t n = std::min(bk, jhi - j0);
      for (int64_t jj = 0; jj < n; ++jj) {
        const T* src = k.row(j0 + jj);
        for (int64_t x = 0; x < d; ++x) Kt[x * bk + jj] = src[x];
      }
      gemm_nn<T, I>(m, n, d, Q, d, Kt, bk, S, bk, false);
      const bool full = p.key_lo(i0 + m - 1) <= j0 && j0 + n <= p.key_hi(i0);
      for (int64_t r = 0; r < m; ++r) {
        T* s = S + r * bk;
        if (!full) {  // mask keys outside this row's [lo, hi)
          const int64_t lo = std::clamp<int64_t>(p.key_lo(i0 + r) - j0, 0, n);
          const int64_t hi = std::clamp<int64_t>(p.key_hi(i0 + r) - j0, lo, n);
          for (int64_t jj = 0; jj < lo; ++jj) s[jj] = ninf;
          for (int64_t jj = hi; jj < n; ++jj) s[jj] = ninf;
        }
        const T m_new = std::max(mx[r], row_max(s, n));
        if (m_new == ninf) {  // nothing visible yet in this row
          std::fill(s, s + n, T(0));
          continue;
        }
        const T alpha = exp_approx(mx[r] - m_new);
        l[r] = l[r] * alpha + row_exp_sum(s, n, m_new);
        mx[r] = m_new;
        if (alpha != T(1))
          for (int64_t x = 0; x < d; ++x) O[r * d + x] *= alpha;
      }
      // dropout after the row sums: the softmax normalises over every weight, P V sees the kept
      if (p.dropout.active()) drop_tile(p.dropout, uint64_t(bh), i0, m, j0, n, S, bk, 1);
      gemm_nn<T, I>(m, d, n, S, bk, v.row(j0), v.ld, O, d, true);
    }
    for (int64_t r = 0; r < m; ++r) {
      T* dst = o.row(i0 + r);
      const T inv = l[r] > 0 ? T(1) / l[r] : T(0);
      for (int64_t x = 0; x < d; ++x) dst[x] = O[r * d + x] * inv;
      lse[i0 + r] = l[r] > 0 ? mx[r] + std::log(l[r]) : ninf;
    }
  }
};

template <class T>
void fwd(const AttentionProblem& p, const TensorRef& q, const TensorRef& k, const TensorRef& v,
         const TensorRef& out, const TensorRef& lse) {
  if (p.B == 0 || p.Tq == 0 || p.H == 0) return;
  const TilePlan plan = cpu_plan<T>(p.d);
  FwdCtx<T> c{p, plan.block_q, plan.block_k, (p.Tq + plan.block_q - 1) / plan.block_q,
              q, k, v, out, lse};
  run_tasks<AttentionFwd<T>>(p.B * p.H * c.n_qblocks, c, 2.0 * p.B * p.H * p.Tq * p.Tk * p.d);
}

// --- backward -----------------------------------------------------------------------
// One task per (batch, head): key tiles outer, query tiles inner. dK/dV of a key tile are
// finished inside the task; dQ rows belong to the task. With GQA (H > G) several heads
// share a key/value head, so their dK/dV go to per-head buffers reduced afterwards.

template <class T> struct BwdCtx {
  AttentionProblem p;
  int bq, bk;
  TensorRef q, k, v, out, lse, dout, dq;
  RowWeight w;
  T *dk, *dv;                // per-head (B, H, Tk, d) buffers, or dk/dv themselves if H == G
  int64_t dk_sb, dk_sh, dk_st, dv_sb, dv_sh, dv_st;
};

template <class T> struct AttentionBwd {
  using Ctx = BwdCtx<T>;
  template <Isa I> MKA_INLINE static void run(const Ctx& c, int64_t task) {
    const AttentionProblem& p = c.p;
    const int64_t d = p.d, bq = c.bq, bk = c.bk, Tq = p.Tq;
    const int64_t h = task % p.H, b = task / p.H, g = h / p.group();
    const auto q = head<const T>(c.q, b, h), k = head<const T>(c.k, b, g),
               v = head<const T>(c.v, b, g), o = head<const T>(c.out, b, h),
               dout = head<const T>(c.dout, b, h);
    const auto dq = head<T>(c.dq, b, h);
    const T* lse = ptr<T>(c.lse) + (b * p.H + h) * Tq;
    T* dk = c.dk + b * c.dk_sb + h * c.dk_sh;
    T* dv = c.dv + b * c.dv_sb + h * c.dv_sh;

    T* Qt = scratch<T>(3 * Tq * d + Tq + 4 * bk * bq + 2 * bk * d);
    T* dOt = Qt + Tq * d;       // d x Tq, weighted dout transposed
    T* dO = dOt + Tq * d;       // Tq x d, weighted dout rows
    T* D = dO + Tq * d;         // rowsum(dO * O)
    T* St = D + Tq;             // bk x bq, scores then probabilities (transposed)
    T* dPt = St + bk * bq;      // bk x bq, dP then dS (transposed)
    T* dS = dPt + bk * bq;      // bq x bk, scale * dS
    T* dKl = dS + bq * bk;      // bk x d
    T* dVl = dKl + bk * d;      // bk x d
    T* Zt = dVl + bk * d;       // bk x bq, dropout's multipliers (transposed)
    const bool drop = p.dropout.active();
    const T scale = T(p.scale);
    const T* wp = static_cast<const T*>(c.w.data);
    for (int64_t i = 0; i < Tq; ++i) {
      const T wi = wp ? wp[b * c.w.stride_b + i * c.w.stride_t] : T(1);
      const T *qi = q.row(i), *gi = dout.row(i), *oi = o.row(i);
      T dsum = 0;
      for (int64_t x = 0; x < d; ++x) {
        Qt[x * Tq + i] = qi[x] * scale;
        const T gx = gi[x] * wi;
        dOt[x * Tq + i] = gx;
        dO[i * d + x] = gx;
        dsum += gx * oi[x];
      }
      D[i] = dsum;
    }

    for (int64_t j0 = 0; j0 < p.Tk; j0 += bk) {
      const int64_t n = std::min(bk, p.Tk - j0);
      std::fill(dKl, dKl + n * d, T(0));
      std::fill(dVl, dVl + n * d, T(0));
      bool touched = false;
      for (int64_t i0 = 0; i0 < Tq; i0 += bq) {
        const int64_t m = std::min(bq, Tq - i0);
        if (p.key_lo(i0) >= j0 + n || p.key_hi(i0 + m - 1) <= j0) continue;  // no overlap
        touched = true;
        const bool full = p.key_lo(i0 + m - 1) <= j0 && j0 + n <= p.key_hi(i0);
        gemm_nn<T, I>(n, m, d, k.row(j0), k.ld, Qt + i0, Tq, St, bq, false);
        gemm_nn<T, I>(n, m, d, v.row(j0), v.ld, dOt + i0, Tq, dPt, bq, false);
        if (drop) {  // the forward's mask, regenerated: dV from Z P, dS = P (Z dP - D)
          for (int64_t jj = 0; jj < n; ++jj) std::fill(Zt + jj * bq, Zt + jj * bq + m, T(1));
          drop_tile(p.dropout, uint64_t(b * p.H + h), i0, m, j0, n, Zt, 1, bq);
        }
        for (int64_t jj = 0; jj < n; ++jj) {
          T* s = St + jj * bq;
          T* dp = dPt + jj * bq;
          const T* z = Zt + jj * bq;
          for (int64_t ii = 0; ii < m; ++ii) {
            const T pr = exp_approx(s[ii] - lse[i0 + ii]);
            s[ii] = drop ? pr * z[ii] : pr;
            dp[ii] = pr * ((drop ? dp[ii] * z[ii] : dp[ii]) - D[i0 + ii]);
          }
          if (!full)
            for (int64_t ii = 0; ii < m; ++ii) {
              const int64_t j = j0 + jj, i = i0 + ii;
              if (j < p.key_lo(i) || j >= p.key_hi(i)) s[ii] = dp[ii] = T(0);
            }
        }
        gemm_nn<T, I>(n, d, m, St, bq, dO + i0 * d, d, dVl, d, true);
        gemm_nn<T, I>(n, d, m, dPt, bq, q.row(i0), q.ld, dKl, d, true);
        for (int64_t jj = 0; jj < n; ++jj)
          for (int64_t ii = 0; ii < m; ++ii) dS[ii * bk + jj] = dPt[jj * bq + ii] * scale;
        gemm_nn<T, I>(m, d, n, dS, bk, k.row(j0), k.ld, dq.row(i0), dq.ld, true);
      }
      if (!touched) continue;
      for (int64_t jj = 0; jj < n; ++jj) {
        T* dkr = dk + (j0 + jj) * c.dk_st;
        T* dvr = dv + (j0 + jj) * c.dv_st;
        for (int64_t x = 0; x < d; ++x) {
          dkr[x] += dKl[jj * d + x] * scale;
          dvr[x] += dVl[jj * d + x];
        }
      }
    }
  }
};

template <class T>
void bwd(const AttentionProblem& p, const TensorRef& q, const TensorRef& k, const TensorRef& v,
         const TensorRef& out, const TensorRef& lse, const TensorRef& dout, RowWeight w,
         const TensorRef& dq, const TensorRef& dk, const TensorRef& dv) {
  if (p.B == 0 || p.Tq == 0 || p.Tk == 0 || p.H == 0) return;
  const TilePlan plan = cpu_plan<T>(p.d);
  BwdCtx<T> c{p, plan.block_q, plan.block_k, q, k, v, out, lse, dout, dq, w,
              ptr<T>(dk), ptr<T>(dv), dk.stride[0], dk.stride[2], dk.stride[1],
              dv.stride[0], dv.stride[2], dv.stride[1]};
  const int64_t grp = p.group();
  std::vector<T> heads;
  if (grp > 1) {  // per-head buffers (B, H, Tk, d) for dK and dV
    const int64_t per = p.H * p.Tk * p.d;
    heads.assign(size_t(2 * p.B * per), T(0));
    c.dk = heads.data();
    c.dv = heads.data() + p.B * per;
    c.dk_sb = c.dv_sb = per;
    c.dk_sh = c.dv_sh = p.Tk * p.d;
    c.dk_st = c.dv_st = p.d;
  } else {  // heads map one to one: dk's own (b, t, g) strides
    c.dk_sh = dk.stride[2];
    c.dv_sh = dv.stride[2];
  }
  run_tasks<AttentionBwd<T>>(p.B * p.H, c, 5.0 * p.B * p.H * p.Tq * p.Tk * p.d);
  if (grp == 1) return;
  parallel_for(p.B * p.G, [&](int64_t bg) {  // reduce the group's heads
    const int64_t b = bg / p.G, g = bg % p.G;
    for (int64_t t = 0; t < p.Tk; ++t) {
      T* dkr = ptr<T>(dk) + b * dk.stride[0] + t * dk.stride[1] + g * dk.stride[2];
      T* dvr = ptr<T>(dv) + b * dv.stride[0] + t * dv.stride[1] + g * dv.stride[2];
      for (int64_t hh = g * grp; hh < (g + 1) * grp; ++hh) {
        const T* sk = c.dk + b * c.dk_sb + hh * c.dk_sh + t * p.d;
        const T* sv = c.dv + b * c.dv_sb + hh * c.dv_sh + t * p.d;
        for (int64_t x = 0; x < p.d; ++x) {
          dkr[x] += sk[x];
          dvr[x] += sv[x];
        }
      }
    }
  }, 2.0 * p.B * p.H * p.Tk * p.d);
}

}  // namespace

void attention_fwd(const AttentionProblem& p, const TensorRef& q, const TensorRef& k,
                   const TensorRef& v, const TensorRef& out, const TensorRef& lse) {
  if (decode_shaped(p) && !p.dropout.active()) return decode_attention(p, q, k, v, out, lse);
  if (p.dtype == DType::f64) fwd<double>(p, q, k, v, out, lse);
  else fwd<float>(p, q, k, v, out, lse);
}

void attention_bwd(const AttentionProblem& p, const TensorRef& q, const TensorRef& k,
                   const TensorRef& v, const TensorRef& out, const TensorRef& lse,
                   const TensorRef& dout, RowWeight w, const TensorRef& dq,
                   const TensorRef& dk, const TensorRef& dv) {
  if (p.dtype == DType::f64) bwd<double>(p, q, k, v, out, lse, dout, w, dq, dk, dv);
  else bwd<float>(p, q, k, v, out, lse, dout, w, dq, dk, dv);
}

}  // namespace mka::cpu
