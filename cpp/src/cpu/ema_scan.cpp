// The EMA scan with routing (SPEC §2) for one memory (keys or values), forward and
// backward. Memory-bound: one pass over x forward, two passes backward. Tasks are
// (batch, kv head, channel chunk); the scan itself runs along time inside a task.
#include <vector>

#include "simd.h"
#include "mka/cpu/kernels.h"

namespace mka::cpu {
namespace {

constexpr int64_t kChunk = 64;  // channels per task

template <class T> struct ScanCtx {
  RouteProblem p;
  int64_t n_chunks;
  TensorRef x, lam, x3, state_in, y, state_out;  // forward
  TensorRef dy, dstate_out, dx, dx3, dstate_in;   // backward
  T* dlam_part;  // (tasks, T, L) partial sums of dlam, or nullptr
};

template <class T> struct Row {  // (b, t, g, channel offset) addressing of a (B,T,G,d) tensor
  static T* at(const TensorRef& r, int64_t b, int64_t t, int64_t g, int64_t c0) {
    return ptr<T>(r) + b * r.stride[0] + t * r.stride[1] + g * r.stride[2] + c0;
  }
};
template <class T> T* state_at(const TensorRef& r, int64_t b, int64_t g, int64_t c0) {
  return ptr<T>(r) + b * r.stride[0] + g * r.stride[1] + c0;
}

// Routing weights of token (b, t); without lam the output is the EMA itself.
template <class T> struct Weights {
  T l0 = 0, l1 = 1, l2 = 0;
};
template <class T> MKA_INLINE Weights<T> weights(const ScanCtx<T>& c, int64_t b, int64_t t) {
  if (!c.lam.present()) return {};
  const T* l = ptr<T>(c.lam) + b * c.lam.stride[0] + t * c.lam.stride[1];
  const int64_t s = c.lam.stride[2];
  return {l[0], l[s], c.p.L == 3 ? l[2 * s] : T(0)};
}

template <class T> struct ScanFwd {
  using Ctx = ScanCtx<T>;
  template <Isa I> MKA_INLINE static void run(const Ctx& c, int64_t task) {
    const RouteProblem& p = c.p;
    const int64_t ch = task % c.n_chunks, bg = task / c.n_chunks;
    const int64_t g = bg % p.G, b = bg / p.G, c0 = ch * kChunk;
    const int64_t n = std::min(kChunk, p.d - c0);
    const T beta = T(p.beta), one_m = T(1) - T(p.beta);
    const bool l3 = c.x3.present() && c.lam.present();
    T s[kChunk] = {};
    if (c.state_in.present()) std::copy_n(state_at<const T>(c.state_in, b, g, c0), n, s);
    for (int64_t t = 0; t < p.T; ++t) {
      const T* x = Row<const T>::at(c.x, b, t, g, c0);
      T* y = Row<T>::at(c.y, b, t, g, c0);
      const Weights<T> w = weights(c, b, t);
      const T* x3 = l3 ? Row<const T>::at(c.x3, b, t, g, c0) : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        s[i] = beta * s[i] + one_m * x[i];
        y[i] = w.l0 * x[i] + w.l1 * s[i];
      }
      if (x3)
        for (int64_t i = 0; i < n; ++i) y[i] += w.l2 * x3[i];
    }
    if (c.state_out.present()) std::copy_n(s, n, state_at<T>(c.state_out, b, g, c0));
  }
};

template <class T> struct ScanBwd {
  using Ctx = ScanCtx<T>;
  template <Isa I> MKA_INLINE static void run(const Ctx& c, int64_t task) {
    const RouteProblem& p = c.p;
    const int64_t ch = task % c.n_chunks, bg = task / c.n_chunks;
    const int64_t g = bg % p.G, b = bg / p.G, c0 = ch * kChunk;
    const int64_t n = std::min(kChunk, p.d - c0);
    const T beta = T(p.beta), one_m = T(1) - T(p.beta);
    const bool l3 = c.x3.present() && c.lam.present();
    if (c.dlam_part) {  // forward recompute of the EMA for d(lam) = <x|EMA|x3, dy>
      T* part = c.dlam_part + task * p.T * p.L;
      T s[kChunk] = {};
      if (c.state_in.present()) std::copy_n(state_at<const T>(c.state_in, b, g, c0), n, s);
      for (int64_t t = 0; t < p.T; ++t) {
        const T* x = Row<const T>::at(c.x, b, t, g, c0);
        const T* dy = Row<const T>::at(c.dy, b, t, g, c0);
        T a0 = 0, a1 = 0;
        for (int64_t i = 0; i < n; ++i) {
          s[i] = beta * s[i] + one_m * x[i];
          a0 += x[i] * dy[i];
          a1 += s[i] * dy[i];
        }
        part[t * p.L + 0] = a0;
        part[t * p.L + 1] = a1;
        if (p.L == 3) {
          T a2 = 0;
          if (l3) {
            const T* x3 = Row<const T>::at(c.x3, b, t, g, c0);
            for (int64_t i = 0; i < n; ++i) a2 += x3[i] * dy[i];
          }
          part[t * p.L + 2] = a2;
        }
      }
    }
    // Reverse scan: a_t = l1_t dy_t + beta a_{t+1}, seeded by the returned state's gradient.
    T carry[kChunk] = {};
    if (c.dstate_out.present()) std::copy_n(state_at<const T>(c.dstate_out, b, g, c0), n, carry);
    for (int64_t t = p.T - 1; t >= 0; --t) {
      const T* dy = Row<const T>::at(c.dy, b, t, g, c0);
      T* dx = Row<T>::at(c.dx, b, t, g, c0);
      const Weights<T> w = weights(c, b, t);
      for (int64_t i = 0; i < n; ++i) {
        const T a = w.l1 * dy[i] + carry[i];
        dx[i] += w.l0 * dy[i] + one_m * a;
        carry[i] = beta * a;
      }
      if (l3 && c.dx3.present()) {
        T* dx3 = Row<T>::at(c.dx3, b, t, g, c0);
        for (int64_t i = 0; i < n; ++i) dx3[i] += w.l2 * dy[i];
      }
    }
    if (c.dstate_in.present()) {
      T* ds = state_at<T>(c.dstate_in, b, g, c0);
      for (int64_t i = 0; i < n; ++i) ds[i] += carry[i];
    }
  }
};

template <class T> ScanCtx<T> make_ctx(const RouteProblem& p) {
  ScanCtx<T> c{};
  c.p = p;
  c.n_chunks = (p.d + kChunk - 1) / kChunk;
  return c;
}

template <class T>
void fwd(const RouteProblem& p, const TensorRef& x, const TensorRef& lam, const TensorRef& x3,
         const TensorRef& state_in, const TensorRef& y, const TensorRef& state_out) {
  ScanCtx<T> c = make_ctx<T>(p);
  c.x = x; c.lam = lam; c.x3 = x3; c.state_in = state_in; c.y = y; c.state_out = state_out;
  run_tasks<ScanFwd<T>>(p.B * p.G * c.n_chunks, c, 4.0 * p.B * p.T * p.G * p.d * p.L);
}

template <class T>
void bwd(const RouteProblem& p, const TensorRef& x, const TensorRef& lam, const TensorRef& x3,
         const TensorRef& state_in, const TensorRef& dy, const TensorRef& dstate_out,
         const TensorRef& dx, const TensorRef& dlam, const TensorRef& dx3,
         const TensorRef& dstate_in) {
  ScanCtx<T> c = make_ctx<T>(p);
  c.x = x; c.lam = lam; c.x3 = x3; c.state_in = state_in; c.dy = dy;
  c.dstate_out = dstate_out; c.dx = dx; c.dx3 = dx3; c.dstate_in = dstate_in;
  const int64_t tasks = p.B * p.G * c.n_chunks, per_b = p.G * c.n_chunks;
  std::vector<T> part;
  if (dlam.present() && lam.present()) {
    part.assign(size_t(tasks * p.T * p.L), T(0));
    c.dlam_part = part.data();
  }
  run_tasks<ScanBwd<T>>(tasks, c, 10.0 * p.B * p.T * p.G * p.d * p.L);
  if (!c.dlam_part) return;
  parallel_for(p.B, [&](int64_t b) {  // reduce the partial sums of dlam over (g, chunk)
    for (int64_t t = 0; t < p.T; ++t)
      for (int64_t l = 0; l < p.L; ++l) {
        T s = 0;
        for (int64_t i = 0; i < per_b; ++i) s += part[((b * per_b + i) * p.T + t) * p.L + l];
        ptr<T>(dlam)[b * dlam.stride[0] + t * dlam.stride[1] + l * dlam.stride[2]] += s;
      }
  }, double(tasks) * p.T * p.L);
}

}  // namespace

void ema_route_fwd(const RouteProblem& p, const TensorRef& x, const TensorRef& lam,
                   const TensorRef& x3, const TensorRef& state_in, const TensorRef& y,
                   const TensorRef& state_out) {
  if (p.dtype == DType::f64) fwd<double>(p, x, lam, x3, state_in, y, state_out);
  else fwd<float>(p, x, lam, x3, state_in, y, state_out);
}

void ema_route_bwd(const RouteProblem& p, const TensorRef& x, const TensorRef& lam,
                   const TensorRef& x3, const TensorRef& state_in, const TensorRef& dy,
                   const TensorRef& dstate_out, const TensorRef& dx, const TensorRef& dlam,
                   const TensorRef& dx3, const TensorRef& dstate_in) {
  if (p.dtype == DType::f64)
    bwd<double>(p, x, lam, x3, state_in, dy, dstate_out, dx, dlam, dx3, dstate_in);
  else
    bwd<float>(p, x, lam, x3, state_in, dy, dstate_out, dx, dlam, dx3, dstate_in);
}

}  // namespace mka::cpu
