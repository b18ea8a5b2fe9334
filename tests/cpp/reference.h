// Naive float64 references of SPEC §1-3, as plain loops over dense row-major vectors:
// attention (with bottom-right causal alignment, window, GQA), the EMA, route_fuse,
// fastmka and mka, each with a hand-derived backward. Slow on purpose; they share no code
// with the kernels. test_reference.cpp checks every backward here against central finite
// differences of its forward.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "host_tensor.h"

namespace mka::test::ref {

// One problem's sizes and options. q (B,Tq,H,d); k, v, k3, v3 (B,Tk,G,d); lam (B,T,L) with
// T = Tk for route_fuse/fastmka and Tq for mka; mem_k/mem_v (B,M,G,d); states (B,G,d).
struct Dims {
  int64_t B = 1, Tq = 1, Tk = 1, H = 1, G = 1, d = 1, M = 0;
  int64_t L = 2;
  bool causal = true;
  int64_t window = -1;  // -1: none
  double scale = 1.0;
  double beta = 0.5;
};

// Every tensor input of the four ops; an empty vector is an absent optional input.
struct Inputs {
  Vec q, k, v, lam, k3, v3, k_state, v_state, mem_k, mem_v;
};
// Forward results. route_fuse: out = k_fused, out2 = v_fused. lse (B,H,Tq): -inf on rows
// that see no key.
struct Outputs {
  Vec out, out2, lse, k_state, v_state;
};
// Incoming gradients of the outputs above (empty: not given, i.e. zero).
struct Seeds {
  Vec dout, dout2, dk_state, dv_state;
};
// Gradients of sum(out * dout) + sum(out2 * dout2) + sum(states * dstates) for each input.
struct Grads {
  Vec dq, dk, dv, dlam, dk3, dv3, dk_state, dv_state, dmem_k, dmem_v;
};

namespace detail {

inline Vec zeros(int64_t n) { return Vec(size_t(n), 0.0); }

// Query row i sees key j (SPEC §1): j <= i + (Tk - Tq) if causal, j > i + (Tk - Tq) - w.
inline bool visible(bool causal, int64_t window, int64_t Tq, int64_t Tk, int64_t i, int64_t j) {
  const int64_t diag = i + (Tk - Tq);
  if (causal && j > diag) return false;
  if (window > 0 && j <= diag - window) return false;
  return true;
}

// Plain attention on (B,Tq,H,d) queries and (B,Tk,G,d) keys/values.
struct Attention {
  int64_t B, Tq, Tk, H, G, d;
  bool causal;
  int64_t window;
  double scale;

  size_t qi(int64_t b, int64_t t, int64_t h) const { return size_t(((b * Tq + t) * H + h) * d); }
  size_t ki(int64_t b, int64_t t, int64_t g) const { return size_t(((b * Tk + t) * G + g) * d); }

  // Softmax row of query (b, i, h): probabilities over all Tk keys (0 where masked).
  // Returns false when the row sees no key.
  bool probs(const Vec& q, const Vec& k, int64_t b, int64_t i, int64_t h, Vec& p,
             double& lse) const {
    const int64_t g = h / (H / G);
    double mx = -std::numeric_limits<double>::infinity();
    p.assign(size_t(Tk), 0.0);
    for (int64_t j = 0; j < Tk; ++j) {
      if (!visible(causal, window, Tq, Tk, i, j)) continue;
      double s = 0;
      for (int64_t x = 0; x < d; ++x) s += q[qi(b, i, h) + x] * k[ki(b, j, g) + x];
      p[size_t(j)] = s * scale;
      mx = std::max(mx, s * scale);
    }
    if (mx == -std::numeric_limits<double>::infinity()) {
      lse = mx;
      return false;
    }
    double sum = 0;
    for (int64_t j = 0; j < Tk; ++j)
      if (visible(causal, window, Tq, Tk, i, j)) sum += std::exp(p[size_t(j)] - mx);
    for (int64_t j = 0; j < Tk; ++j)
      p[size_t(j)] = visible(causal, window, Tq, Tk, i, j) ? std::exp(p[size_t(j)] - mx) / sum : 0;
    lse = mx + std::log(sum);
    return true;
  }

  void forward(const Vec& q, const Vec& k, const Vec& v, Vec& out, Vec& lse) const {
    out = zeros(B * Tq * H * d);
    lse = zeros(B * H * Tq);
    Vec p;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < Tq; ++i) {
          double l;
          const bool any = probs(q, k, b, i, h, p, l);
          lse[size_t((b * H + h) * Tq + i)] = l;
          if (!any) continue;  // no visible key: zeros
          for (int64_t j = 0; j < Tk; ++j)
            for (int64_t x = 0; x < d; ++x)
              out[qi(b, i, h) + x] += p[size_t(j)] * v[ki(b, j, h / (H / G)) + x];
        }
  }

  // Adds the gradients of sum(out * dout) into dq, dk, dv.
  void backward(const Vec& q, const Vec& k, const Vec& v, const Vec& dout, Vec& dq, Vec& dk,
                Vec& dv) const {
    Vec p, dp(static_cast<size_t>(Tk));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < Tq; ++i) {
          double l;
          if (!probs(q, k, b, i, h, p, l)) continue;
          const int64_t g = h / (H / G);
          double D = 0;  // sum_j p_j dp_j
          for (int64_t j = 0; j < Tk; ++j) {
            double s = 0;
            for (int64_t x = 0; x < d; ++x) s += dout[qi(b, i, h) + x] * v[ki(b, j, g) + x];
            dp[size_t(j)] = s;
            D += p[size_t(j)] * s;
          }
          for (int64_t j = 0; j < Tk; ++j) {
            const double pj = p[size_t(j)];
            if (pj == 0) continue;
            const double ds = pj * (dp[size_t(j)] - D) * scale;
            for (int64_t x = 0; x < d; ++x) {
              dq[qi(b, i, h) + x] += ds * k[ki(b, j, g) + x];
              dk[ki(b, j, g) + x] += ds * q[qi(b, i, h) + x];
              dv[ki(b, j, g) + x] += pj * dout[qi(b, i, h) + x];
            }
          }
        }
  }
};

// EMA along time of a (B,T,G,d) sequence: s_t = beta s_{t-1} + (1 - beta) x_t.
struct Ema {
  int64_t B, T, G, d;
  double beta;

  size_t at(int64_t b, int64_t t, int64_t g) const { return size_t(((b * T + t) * G + g) * d); }
  size_t st(int64_t b, int64_t g) const { return size_t((b * G + g) * d); }

  void forward(const Vec& x, const Vec& state_in, Vec& y, Vec& state_out) const {
    y = zeros(B * T * G * d);
    state_out = state_in.empty() ? zeros(B * G * d) : state_in;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t c = 0; c < d; ++c) {
            double& s = state_out[st(b, g) + c];
            s = beta * s + (1 - beta) * x[at(b, t, g) + c];
            y[at(b, t, g) + c] = s;
          }
  }

  // Gradients of sum(y * dy) + sum(state_out * dstate_out): adds into dx, returns dstate_in.
  Vec backward(const Vec& dy, const Vec& dstate_out, Vec& dx) const {
    Vec carry = dstate_out.empty() ? zeros(B * G * d) : dstate_out;  // dL/ds_t from later t
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = T - 1; t >= 0; --t)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t c = 0; c < d; ++c) {
            double& a = carry[st(b, g) + c];
            const double ds = dy[at(b, t, g) + c] + a;
            dx[at(b, t, g) + c] += (1 - beta) * ds;
            a = beta * ds;
          }
    return carry;
  }
};

// One memory's routed EMA (keys or values): y = lam0 x + lam1 EMA(x) (+ lam2 x3).
struct Route {
  Ema ema;
  int64_t L;

  double lam(const Vec& l, int64_t b, int64_t t, int64_t lv) const {
    return l[size_t((b * ema.T + t) * L + lv)];
  }

  void forward(const Vec& x, const Vec& lam_, const Vec& x3, const Vec& state_in, Vec& y,
               Vec& state_out) const {
    Vec e;
    ema.forward(x, state_in, e, state_out);
    y = zeros(int64_t(x.size()));
    for (int64_t b = 0; b < ema.B; ++b)
      for (int64_t t = 0; t < ema.T; ++t)
        for (int64_t g = 0; g < ema.G; ++g)
          for (int64_t c = 0; c < ema.d; ++c) {
            const size_t i = ema.at(b, t, g) + c;
            y[i] = lam(lam_, b, t, 0) * x[i] + lam(lam_, b, t, 1) * e[i];
            if (L == 3) y[i] += lam(lam_, b, t, 2) * x3[i];
          }
  }

  // Adds dx, dlam, dx3 (when L == 3); returns dstate_in.
  Vec backward(const Vec& x, const Vec& lam_, const Vec& x3, const Vec& state_in, const Vec& dy,
               const Vec& dstate_out, Vec& dx, Vec& dlam, Vec& dx3) const {
    Vec e, s;
    ema.forward(x, state_in, e, s);
    Vec de = zeros(int64_t(x.size()));
    for (int64_t b = 0; b < ema.B; ++b)
      for (int64_t t = 0; t < ema.T; ++t)
        for (int64_t g = 0; g < ema.G; ++g)
          for (int64_t c = 0; c < ema.d; ++c) {
            const size_t i = ema.at(b, t, g) + c;
            const size_t li = size_t((b * ema.T + t) * L);
            dx[i] += lam(lam_, b, t, 0) * dy[i];
            de[i] = lam(lam_, b, t, 1) * dy[i];
            dlam[li + 0] += x[i] * dy[i];
            dlam[li + 1] += e[i] * dy[i];
            if (L == 3) {
              dlam[li + 2] += x3[i] * dy[i];
              dx3[i] += lam(lam_, b, t, 2) * dy[i];
            }
          }
    return ema.backward(de, dstate_out, dx);
  }
};

inline Attention attention_of(const Dims& p, bool causal, int64_t window, int64_t Tk) {
  return {p.B, p.Tq, Tk, p.H, p.G, p.d, causal, window, p.scale};
}

inline Vec grad_like(const Vec& x) { return x.empty() ? Vec{} : zeros(int64_t(x.size())); }

}  // namespace detail

// --- the four ops -----------------------------------------------------------------------

inline Outputs attention(const Dims& p, const Inputs& in) {
  Outputs o;
  detail::attention_of(p, p.causal, p.window, p.Tk).forward(in.q, in.k, in.v, o.out, o.lse);
  return o;
}
inline Grads attention_bwd(const Dims& p, const Inputs& in, const Seeds& s) {
  Grads g;
  g.dq = detail::grad_like(in.q), g.dk = detail::grad_like(in.k), g.dv = detail::grad_like(in.v);
  detail::attention_of(p, p.causal, p.window, p.Tk)
      .backward(in.q, in.k, in.v, s.dout, g.dq, g.dk, g.dv);
  return g;
}

inline detail::Route route_of(const Dims& p, int64_t T) {
  return {{p.B, T, p.G, p.d, p.beta}, p.L};
}

inline Outputs route_fuse(const Dims& p, const Inputs& in) {
  Outputs o;
  const auto r = route_of(p, p.Tk);
  r.forward(in.k, in.lam, in.k3, in.k_state, o.out, o.k_state);
  r.forward(in.v, in.lam, in.v3, in.v_state, o.out2, o.v_state);
  return o;
}
inline Grads route_fuse_bwd(const Dims& p, const Inputs& in, const Seeds& s) {
  using detail::grad_like;
  Grads g;
  g.dk = grad_like(in.k), g.dv = grad_like(in.v), g.dlam = grad_like(in.lam);
  g.dk3 = grad_like(in.k3), g.dv3 = grad_like(in.v3);
  const auto r = route_of(p, p.Tk);
  const Vec dks = r.backward(in.k, in.lam, in.k3, in.k_state, s.dout, s.dk_state, g.dk, g.dlam, g.dk3);
  const Vec dvs = r.backward(in.v, in.lam, in.v3, in.v_state, s.dout2, s.dv_state, g.dv, g.dlam, g.dv3);
  if (!in.k_state.empty()) g.dk_state = dks;
  if (!in.v_state.empty()) g.dv_state = dvs;
  return g;
}

inline Outputs fastmka(const Dims& p, const Inputs& in) {
  const Outputs fused = route_fuse(p, in);
  Outputs o;
  detail::attention_of(p, p.causal, p.window, p.Tk)
      .forward(in.q, fused.out, fused.out2, o.out, o.lse);
  o.k_state = fused.k_state, o.v_state = fused.v_state;
  return o;
}
inline Grads fastmka_bwd(const Dims& p, const Inputs& in, const Seeds& s) {
  const Outputs fused = route_fuse(p, in);
  Vec dq = detail::grad_like(in.q), dkf = detail::grad_like(in.k), dvf = detail::grad_like(in.v);
  detail::attention_of(p, p.causal, p.window, p.Tk)
      .backward(in.q, fused.out, fused.out2, s.dout, dq, dkf, dvf);
  Grads g = route_fuse_bwd(p, in, Seeds{dkf, dvf, s.dk_state, s.dv_state});
  g.dq = dq;
  return g;
}

// mka's levels: L1 k/v with the window, L2 EMA(k)/EMA(v) causal without the window, L3 the
// memory tokens without a causal mask. lam is query-side (B, Tq, L).
struct MkaLevels {
  Vec o[3], ek, ev;
  Outputs result;
};
inline MkaLevels mka_levels(const Dims& p, const Inputs& in) {
  MkaLevels m;
  const detail::Ema ema{p.B, p.Tk, p.G, p.d, p.beta};
  ema.forward(in.k, in.k_state, m.ek, m.result.k_state);
  ema.forward(in.v, in.v_state, m.ev, m.result.v_state);
  Vec lse;
  detail::attention_of(p, p.causal, p.window, p.Tk).forward(in.q, in.k, in.v, m.o[0], lse);
  detail::attention_of(p, p.causal, -1, p.Tk).forward(in.q, m.ek, m.ev, m.o[1], lse);
  if (p.L == 3)
    detail::attention_of(p, false, -1, p.M).forward(in.q, in.mem_k, in.mem_v, m.o[2], lse);
  Vec& out = m.result.out;
  out = detail::zeros(p.B * p.Tq * p.H * p.d);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t t = 0; t < p.Tq; ++t)
      for (int64_t l = 0; l < p.L; ++l) {
        const double w = in.lam[size_t((b * p.Tq + t) * p.L + l)];
        for (int64_t i = 0; i < p.H * p.d; ++i) {
          const size_t at = size_t((b * p.Tq + t) * p.H * p.d + i);
          out[at] += w * m.o[l][at];
        }
      }
  return m;
}
inline Outputs mka(const Dims& p, const Inputs& in) { return mka_levels(p, in).result; }

inline Grads mka_bwd(const Dims& p, const Inputs& in, const Seeds& s) {
  using detail::grad_like;
  const MkaLevels m = mka_levels(p, in);
  Grads g;
  g.dq = grad_like(in.q), g.dk = grad_like(in.k), g.dv = grad_like(in.v);
  g.dlam = grad_like(in.lam), g.dmem_k = grad_like(in.mem_k), g.dmem_v = grad_like(in.mem_v);
  Vec dlev[3];
  for (int64_t l = 0; l < p.L; ++l) dlev[l] = detail::zeros(int64_t(s.dout.size()));
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t t = 0; t < p.Tq; ++t)
      for (int64_t l = 0; l < p.L; ++l) {
        const size_t li = size_t((b * p.Tq + t) * p.L + l);
        for (int64_t i = 0; i < p.H * p.d; ++i) {
          const size_t at = size_t((b * p.Tq + t) * p.H * p.d + i);
          g.dlam[li] += s.dout[at] * m.o[l][at];
          dlev[l][at] = in.lam[li] * s.dout[at];
        }
      }
  detail::attention_of(p, p.causal, p.window, p.Tk)
      .backward(in.q, in.k, in.v, dlev[0], g.dq, g.dk, g.dv);
  Vec dek = grad_like(in.k), dev = grad_like(in.v);
  detail::attention_of(p, p.causal, -1, p.Tk).backward(in.q, m.ek, m.ev, dlev[1], g.dq, dek, dev);
  const detail::Ema ema{p.B, p.Tk, p.G, p.d, p.beta};
  const Vec dks = ema.backward(dek, s.dk_state, g.dk);
  const Vec dvs = ema.backward(dev, s.dv_state, g.dv);
  if (!in.k_state.empty()) g.dk_state = dks;
  if (!in.v_state.empty()) g.dv_state = dvs;
  if (p.L == 3)
    detail::attention_of(p, false, -1, p.M)
        .backward(in.q, in.mem_k, in.mem_v, dlev[2], g.dq, g.dmem_k, g.dmem_v);
  return g;
}

}  // namespace mka::test::ref
