// Full MKA on the CPU: one tiled attention per memory level, mixed per query token.
// L1 attends to k/v (with the window), L2 to their EMA (built from k/v here, so a decode
// cache holds only k/v), L3 to the recalled memory tokens without a causal mask.
#include "buffer.h"
#include "mka/cpu/kernels.h"
#include "mka/cpu/thread_pool.h"

namespace mka::cpu {
namespace {

// Row (b, t, h) of a (B, T, H, d) view.
template <class T> T* at(const TensorRef& t, int64_t b, int64_t i, int64_t h) {
  return ptr<T>(t) + b * t.stride[0] + i * t.stride[1] + h * t.stride[2];
}

// Forward: out = sum_l lam[., l] * O_l.  Backward: dlam[., l] += <dout, O_l>.
template <class T>
void mix(const AttentionProblem& p, int64_t L, const TensorRef& lam, const TensorRef& o_levels,
         const TensorRef& out_or_dout, const TensorRef& dlam, bool backward) {
  parallel_for(p.B * p.Tq, [&](int64_t bt) {
    const int64_t b = bt / p.Tq, t = bt % p.Tq;
    const T* lw = ptr<const T>(lam) + b * lam.stride[0] + t * lam.stride[1];
    T dl[3] = {0, 0, 0};
    for (int64_t h = 0; h < p.H; ++h) {
      T* o = at<T>(out_or_dout, b, t, h);
      if (!backward) std::fill(o, o + p.d, T(0));
      for (int64_t l = 0; l < L; ++l) {
        const T* ol = at<const T>(select0(o_levels, l), b, t, h);
        if (backward) {
          for (int64_t x = 0; x < p.d; ++x) dl[l] += o[x] * ol[x];
        } else {
          const T w = lw[l * lam.stride[2]];
          for (int64_t x = 0; x < p.d; ++x) o[x] += w * ol[x];
        }
      }
    }
    if (backward) {
      T* dst = ptr<T>(dlam) + b * dlam.stride[0] + t * dlam.stride[1];
      for (int64_t l = 0; l < L; ++l) dst[l * dlam.stride[2]] += dl[l];
    }
  }, double(p.B) * p.Tq * p.H * p.d * L);
}

RowWeight level_weight(const TensorRef& lam, int64_t l) {
  const size_t elem = lam.dtype == DType::f64 ? 8 : 4;
  return {static_cast<const char*>(lam.data) + l * lam.stride[2] * int64_t(elem),
          lam.stride[0], lam.stride[1]};
}

}  // namespace

void mka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const MkaFwd& a) {
  const RouteInputs& r = a.route;
  const int64_t L = r.lam.shape[2];
  attention_fwd(level_problem(ap, 0, 0), a.q, a.k, a.v, select0(a.o_levels, 0),
                select0(a.lse_levels, 0));
  const DerivedKeys e(ap, a.saved);
  ema_route_fwd(rp, a.k, TensorRef{}, TensorRef{}, r.k_state, e.k, a.k_state_out);
  ema_route_fwd(rp, a.v, TensorRef{}, TensorRef{}, r.v_state, e.v, a.v_state_out);
  attention_fwd(level_problem(ap, 1, 0), a.q, e.k, e.v, select0(a.o_levels, 1),
                select0(a.lse_levels, 1));
  if (L == 3)
    attention_fwd(level_problem(ap, 2, a.mem_k.shape[1]), a.q, a.mem_k, a.mem_v,
                  select0(a.o_levels, 2), select0(a.lse_levels, 2));
  if (ap.dtype == DType::f64) mix<double>(ap, L, r.lam, a.o_levels, a.out, TensorRef{}, false);
  else mix<float>(ap, L, r.lam, a.o_levels, a.out, TensorRef{}, false);
}

void mka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const MkaBwd& a) {
  const RouteInputs& r = a.route;
  const RouteGrads& g = a.grads;
  const int64_t L = r.lam.shape[2];
  if (g.dlam.present()) {
    if (ap.dtype == DType::f64) mix<double>(ap, L, r.lam, a.o_levels, a.dout, g.dlam, true);
    else mix<float>(ap, L, r.lam, a.o_levels, a.dout, g.dlam, true);
  }
  // Each level's output enters as lam[., l] * O_l: its incoming gradient is weighted.
  attention_bwd(level_problem(ap, 0, 0), a.q, a.k, a.v, select0(a.o_levels, 0),
                select0(a.lse_levels, 0), a.dout, level_weight(r.lam, 0), a.dq, a.dk, a.dv);
  const DerivedKeys e(ap, a.saved);  // the forward's EMA keys, or remade here
  if (!a.saved.k.present()) {
    ema_route_fwd(rp, a.k, TensorRef{}, TensorRef{}, r.k_state, e.k, TensorRef{});
    ema_route_fwd(rp, a.v, TensorRef{}, TensorRef{}, r.v_state, e.v, TensorRef{});
  }
  Buffer dke(ap.dtype, {ap.B, ap.Tk, ap.G, ap.d}), dve(ap.dtype, {ap.B, ap.Tk, ap.G, ap.d});
  attention_bwd(level_problem(ap, 1, 0), a.q, e.k, e.v, select0(a.o_levels, 1),
                select0(a.lse_levels, 1), a.dout, level_weight(r.lam, 1), a.dq, dke, dve);
  ema_route_bwd(rp, a.k, TensorRef{}, TensorRef{}, r.k_state, dke, a.dk_state_out, a.dk,
                TensorRef{}, TensorRef{}, g.dk_state);
  ema_route_bwd(rp, a.v, TensorRef{}, TensorRef{}, r.v_state, dve, a.dv_state_out, a.dv,
                TensorRef{}, TensorRef{}, g.dv_state);
  if (L == 3)
    attention_bwd(level_problem(ap, 2, a.mem_k.shape[1]), a.q, a.mem_k, a.mem_v,
                  select0(a.o_levels, 2), select0(a.lse_levels, 2), a.dout,
                  level_weight(r.lam, 2), a.dq, a.dmem_k, a.dmem_v);
}

}  // namespace mka::cpu
