// Recall attention on the CPU (mka/memory/recall_ops.h): each query row reads only the
// chunks chosen for it, in place (no gathered copy of the recalled keys).
//
// Forward: one task per (batch, row, key/value head): its chunks are read once for all the
// query heads of the group, one online softmax per head. Backward: one task per (batch,
// key/value head), walking every row: the chunks a row recalls are scattered over the
// sequence and several rows recall the same chunk, so dk/dv of a head's keys are written by
// that task alone (race-free without atomics or per-thread copies); dq rows are the task's too.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "mka/cpu/thread_pool.h"
#include "mka/memory/recall_ops.h"
#include "mka/problem.h"

namespace mka::cpu {
namespace {

template <class T> T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t x = 0; x < n; ++x) s += a[x] * b[x];
  return s;
}

template <class T> void axpy(T w, const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

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

template <class T> void fwd(const RecallProblem& p, const RecallFwd& a) {
  const auto q = rows<const T>(a.q), k = rows<const T>(a.k), v = rows<const T>(a.v);
  const auto out = rows<T>(a.out);
  T* lse = static_cast<T*>(a.lse.data);
  const Chosen ch = chosen_of(a.chosen);
  const int64_t d = p.d, grp = p.group();
  const T scale = T(p.scale), ninf = -std::numeric_limits<T>::infinity();
  parallel_for(p.B * p.Tq * p.G, [&](int64_t task) {
    const int64_t g = task % p.G, t = task / p.G % p.Tq, b = task / (p.G * p.Tq);
    thread_local std::vector<T> acc;
    acc.assign(size_t(grp * (d + 2)), T(0));
    T* m = acc.data() + grp * d;
    T* l = m + grp;
    std::fill(m, m + grp, ninf);
    for (int64_t r = 0; r < p.R; ++r) {
      const int64_t c = ch.at(b, t, g, r);
      if (c < 0) continue;
      for (int64_t j = c * p.C; j < (c + 1) * p.C; ++j) {
        const T *kj = k.at(b, j, g), *vj = v.at(b, j, g);
        for (int64_t x = 0; x < grp; ++x) {
          const T s = dot(q.at(b, t, g * grp + x), kj, d) * scale;
          T* o = acc.data() + x * d;
          if (s > m[x]) {  // a new maximum: rescale what is summed so far
            const T alpha = m[x] == ninf ? T(0) : std::exp(m[x] - s);
            for (int64_t i = 0; i < d; ++i) o[i] *= alpha;
            l[x] *= alpha;
            m[x] = s;
          }
          const T w = std::exp(s - m[x]);
          l[x] += w;
          axpy(w, vj, o, d);
        }
      }
    }
    for (int64_t x = 0; x < grp; ++x) {
      const int64_t h = g * grp + x;
      T* dst = out.at(b, t, h);
      const T inv = l[x] > 0 ? T(1) / l[x] : T(0);
      for (int64_t i = 0; i < d; ++i) dst[i] = acc[size_t(x * d + i)] * inv;
      lse[(b * p.H + h) * p.Tq + t] = l[x] > 0 ? m[x] + std::log(l[x]) : ninf;
    }
  });
}

template <class T> void bwd(const RecallProblem& p, const RecallBwd& a) {
  const auto q = rows<const T>(a.q), k = rows<const T>(a.k), v = rows<const T>(a.v),
             out = rows<const T>(a.out), dout = rows<const T>(a.dout);
  const auto dq = rows<T>(a.dq), dk = rows<T>(a.dk), dv = rows<T>(a.dv);
  const T* lse = static_cast<const T*>(a.lse.data);
  const Chosen ch = chosen_of(a.chosen);
  const int64_t d = p.d, grp = p.group();
  const T scale = T(p.scale);
  parallel_for(p.B * p.G, [&](int64_t task) {
    const int64_t g = task % p.G, b = task / p.G;
    for (int64_t j = 0; j < p.Tk; ++j) {  // every key of the head: zero where none recalls it
      std::fill(dk.at(b, j, g), dk.at(b, j, g) + d, T(0));
      std::fill(dv.at(b, j, g), dv.at(b, j, g) + d, T(0));
    }
    for (int64_t t = 0; t < p.Tq; ++t)
      for (int64_t x = 0; x < grp; ++x) {
        const int64_t h = g * grp + x;
        const T *qi = q.at(b, t, h), *gi = dout.at(b, t, h);
        T* dqi = dq.at(b, t, h);
        std::fill(dqi, dqi + d, T(0));
        const T L = lse[(b * p.H + h) * p.Tq + t];
        if (std::isinf(L)) continue;  // no chunk: no gradient
        const T D = dot(gi, out.at(b, t, h), d);
        for (int64_t r = 0; r < p.R; ++r) {
          const int64_t c = ch.at(b, t, g, r);
          if (c < 0) continue;
          for (int64_t j = c * p.C; j < (c + 1) * p.C; ++j) {
            const T *kj = k.at(b, j, g), *vj = v.at(b, j, g);
            const T pr = std::exp(dot(qi, kj, d) * scale - L);
            const T ds = pr * (dot(gi, vj, d) - D) * scale;
            axpy(ds, kj, dqi, d);
            axpy(ds, qi, dk.at(b, j, g), d);
            axpy(pr, gi, dv.at(b, j, g), d);
          }
        }
      }
  });
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
