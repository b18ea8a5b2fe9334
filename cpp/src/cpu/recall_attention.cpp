// Recall attention on the CPU (mka/memory/recall_ops.h): each query row reads only the
// chunks chosen for it, in place (no gathered copy of the recalled keys), a chunk at a time
// through the shared micro-kernels (simd.h): scores of the group's query heads against the
// chunk's keys by dot products, one softmax update per chunk, P V as a GEMM.
//
// Forward: one task per (batch, row, key/value head): its chunks are read once for all the
// query heads of the group. Backward: one task per (batch, key/value head), walking every
// row: the chunks a row recalls are scattered over the sequence and several rows recall the
// same chunk, so dk/dv of a head's keys are written by that task alone (race-free without
// atomics or per-thread copies); dq rows are the task's too.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"
#include "mka/memory/recall_ops.h"
#include "mka/problem.h"

namespace mka::cpu {
namespace {

// Strided (B, T, heads, d) rows.
template <class T> struct Rows {
  T* base;
  int64_t sb, st, sh;
  T* at(int64_t b, int64_t t, int64_t h) const { return base + b * sb + t * st + h * sh; }
};
template <class T> Rows<T> rows(const TensorRef& x) {
  return {static_cast<T*>(x.data), x.stride[0], x.stride[1], x.stride[2]};
}

struct Chosen {
  const int32_t* base;
  int64_t sb, st, sg, sr;
  int64_t at(int64_t b, int64_t t, int64_t g, int64_t r) const {
    return base[b * sb + t * st + g * sg + r * sr];
  }
};
Chosen chosen_of(const TensorRef& c) {
  return {static_cast<const int32_t*>(c.data), c.stride[0], c.stride[1], c.stride[2],
          c.stride[3]};
}

// Rows x of head group g at (b, t) into a dense (group, d) block, times `scale`.
template <class T>
MKA_INLINE void gather_group(const Rows<const T>& x, int64_t b, int64_t t, int64_t g,
                             int64_t grp, int64_t d, T scale, T* dst) {
  for (int64_t h = 0; h < grp; ++h) {
    const T* src = x.at(b, t, g * grp + h);
    for (int64_t i = 0; i < d; ++i) dst[h * d + i] = src[i] * scale;
  }
}

template <class T> struct FwdTask {
  struct Ctx {
    RecallProblem p;
    Rows<const T> q, k, v;
    Rows<T> out;
    T* lse;
    Chosen ch;
  };

  template <Isa I> MKA_INLINE static void run(const Ctx& c, int64_t task) {
    const RecallProblem& p = c.p;
    const int64_t g = task % p.G, t = task / p.G % p.Tq, b = task / (p.G * p.Tq);
    const int64_t d = p.d, grp = p.group(), C = p.C;
    const T ninf = -std::numeric_limits<T>::infinity();
    T* Q = scratch<T>(size_t(grp * (2 * d + C + 2)));
    T* O = Q + grp * d;
    T* S = O + grp * d;  // (grp, C) scores, then probabilities
    T* m = S + grp * C;
    T* l = m + grp;
    gather_group(c.q, b, t, g, grp, d, T(p.scale), Q);
    std::fill(O, O + grp * d, T(0));
    std::fill(m, m + grp, ninf);
    std::fill(l, l + grp, T(0));
    for (int64_t r = 0; r < p.R; ++r) {
      const int64_t chunk = c.ch.at(b, t, g, r);
      if (chunk < 0) continue;
      const int64_t j0 = chunk * C;
      for (int64_t jj = 0; jj < C; ++jj) dot_many<T, I>(grp, Q, d, c.k.at(b, j0 + jj, g), S + jj, C);
      for (int64_t h = 0; h < grp; ++h) {  // one online-softmax update per chunk
        T* s = S + h * C;
        const T m_new = std::max(m[h], row_max(s, C));
        const T alpha = m[h] == ninf ? T(0) : exp_approx(m[h] - m_new);
        l[h] = l[h] * alpha + row_exp_sum(s, C, m_new);
        m[h] = m_new;
        if (alpha != T(1))
          for (int64_t i = 0; i < d; ++i) O[h * d + i] *= alpha;
      }
      gemm_nn<T, I>(grp, d, C, S, C, c.v.at(b, j0, g), c.v.st, O, d, true);
    }
    for (int64_t h = 0; h < grp; ++h) {
      const int64_t head = g * grp + h;
      T* dst = c.out.at(b, t, head);
      const T inv = l[h] > 0 ? T(1) / l[h] : T(0);
      for (int64_t i = 0; i < d; ++i) dst[i] = O[h * d + i] * inv;
      c.lse[(b * p.H + head) * p.Tq + t] = l[h] > 0 ? m[h] + std::log(l[h]) : ninf;
    }
  }
};

template <class T> struct BwdTask {
  struct Ctx {
    RecallProblem p;
    Rows<const T> q, k, v, out, dout;
    Rows<T> dq, dk, dv;
    const T* lse;
    Chosen ch;
  };

  // Per row and chunk, for the group's heads at once: S = Q Kᵀ, P = exp(scale S - lse),
  // dP = dO Vᵀ, dS = P (dP - D) scale; dQ += dS K, dK += dSᵀ Q, dV += Pᵀ dO.
  template <Isa I> MKA_INLINE static void run(const Ctx& c, int64_t task) {
    const RecallProblem& p = c.p;
    const int64_t g = task % p.G, b = task / p.G;
    const int64_t d = p.d, grp = p.group(), C = p.C;
    const T scale = T(p.scale);
    for (int64_t j = 0; j < p.Tk; ++j) {  // every key of the head: zero where none recalls it
      std::fill(c.dk.at(b, j, g), c.dk.at(b, j, g) + d, T(0));
      std::fill(c.dv.at(b, j, g), c.dv.at(b, j, g) + d, T(0));
    }
    T* Q = scratch<T>(size_t(grp * (3 * d + 3 * C + 2)));
    T* dO = Q + grp * d;
    T* dQ = dO + grp * d;
    T* S = dQ + grp * d;   // (grp, C): P, then dS
    T* dP = S + grp * C;   // (grp, C)
    T* PT = dP + grp * C;  // (C, grp): Pᵀ, then dSᵀ
    T* L = PT + grp * C;
    T* D = L + grp;
    for (int64_t t = 0; t < p.Tq; ++t) {
      gather_group(c.q, b, t, g, grp, d, T(1), Q);
      gather_group(c.dout, b, t, g, grp, d, T(1), dO);
      std::fill(dQ, dQ + grp * d, T(0));
      bool any = false;
      for (int64_t h = 0; h < grp; ++h) {
        const int64_t head = g * grp + h;
        L[h] = c.lse[(b * p.H + head) * p.Tq + t];
        any = any || !std::isinf(L[h]);
        const T* o = c.out.at(b, t, head);
        T acc = 0;
        for (int64_t i = 0; i < d; ++i) acc += dO[h * d + i] * o[i];
        D[h] = acc;
      }
      for (int64_t r = 0; any && r < p.R; ++r) {
        const int64_t chunk = c.ch.at(b, t, g, r);
        if (chunk < 0) continue;
        const int64_t j0 = chunk * C;
        for (int64_t jj = 0; jj < C; ++jj) {
          dot_many<T, I>(grp, Q, d, c.k.at(b, j0 + jj, g), S + jj, C);
          dot_many<T, I>(grp, dO, d, c.v.at(b, j0 + jj, g), dP + jj, C);
        }
        for (int64_t h = 0; h < grp; ++h)
          for (int64_t jj = 0; jj < C; ++jj) {
            T& s = S[h * C + jj];
            const T pr = std::isinf(L[h]) ? T(0) : exp_approx(s * scale - L[h]);
            PT[jj * grp + h] = pr;
            s = pr * (dP[h * C + jj] - D[h]) * scale;  // dS
          }
        gemm_nn<T, I>(C, d, grp, PT, grp, dO, d, c.dv.at(b, j0, g), c.dv.st, true);
        for (int64_t h = 0; h < grp; ++h)
          for (int64_t jj = 0; jj < C; ++jj) PT[jj * grp + h] = S[h * C + jj];
        gemm_nn<T, I>(grp, d, C, S, C, c.k.at(b, j0, g), c.k.st, dQ, d, true);
        gemm_nn<T, I>(C, d, grp, PT, grp, Q, d, c.dk.at(b, j0, g), c.dk.st, true);
      }
      for (int64_t h = 0; h < grp; ++h) {
        T* dst = c.dq.at(b, t, g * grp + h);
        std::copy(dQ + h * d, dQ + (h + 1) * d, dst);
      }
    }
  }
};

template <class T> void fwd(const RecallProblem& p, const RecallFwd& a) {
  typename FwdTask<T>::Ctx c{p, rows<const T>(a.q), rows<const T>(a.k), rows<const T>(a.v),
                             rows<T>(a.out), static_cast<T*>(a.lse.data), chosen_of(a.chosen)};
  run_tasks<FwdTask<T>>(p.B * p.Tq * p.G, c, 2.0 * p.B * p.Tq * p.H * p.R * p.C * p.d);
}

template <class T> void bwd(const RecallProblem& p, const RecallBwd& a) {
  typename BwdTask<T>::Ctx c{p,
                             rows<const T>(a.q),
                             rows<const T>(a.k),
                             rows<const T>(a.v),
                             rows<const T>(a.out),
                             rows<const T>(a.dout),
                             rows<T>(a.dq),
                             rows<T>(a.dk),
                             rows<T>(a.dv),
                             static_cast<const T*>(a.lse.data),
                             chosen_of(a.chosen)};
  run_tasks<BwdTask<T>>(p.B * p.G, c, 5.0 * p.B * p.Tq * p.H * p.R * p.C * p.d);
}

}  // namespace

void recall_fwd(const RecallProblem& p, const RecallFwd& a) {
  if (p.dtype == DType::f64) fwd<double>(p, a);
  else fwd<float>(p, a);
}

void recall_bwd(const RecallProblem& p, const RecallBwd& a) {
  if (p.dtype == DType::f64) bwd<double>(p, a);
  else bwd<float>(p, a);
}

}  // namespace mka::cpu
