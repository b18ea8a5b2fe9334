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
  });
}

RowWeight level_weight(const TensorRef& lam, int64_t l) {
  const size_t elem = lam.dtype == DType::f64 ? 8 : 4;
  return {static_cast<const char*>(lam.data) + l * lam.stride[2] * int64_t(elem),
          lam.stride[0], lam.stride[1]};
}

}  // namespace

void mka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const TensorRef& q,
             const TensorRef& k, const TensorRef& v, const RouteInputs& r,
             const TensorRef& mem_k, const TensorRef& mem_v, const TensorRef& out,
             const TensorRef& o_levels, const TensorRef& lse_levels,
             const TensorRef& k_state_out, const TensorRef& v_state_out,
             const SavedKeys& saved) {
  const int64_t L = r.lam.shape[2];
  attention_fwd(level_problem(ap, 0, 0), q, k, v, select0(o_levels, 0), select0(lse_levels, 0));
  const bool keep = saved.k.present();  // the EMA keys into the caller's buffers, or scratch
  Buffer kb(ap.dtype, {keep ? 0 : ap.B, ap.Tk, ap.G, ap.d});
  Buffer vb(ap.dtype, {keep ? 0 : ap.B, ap.Tk, ap.G, ap.d});
  const TensorRef ke = keep ? saved.k : TensorRef(kb), ve = keep ? saved.v : TensorRef(vb);
  ema_route_fwd(rp, k, TensorRef{}, TensorRef{}, r.k_state, ke, k_state_out);
  ema_route_fwd(rp, v, TensorRef{}, TensorRef{}, r.v_state, ve, v_state_out);
  attention_fwd(level_problem(ap, 1, 0), q, ke, ve, select0(o_levels, 1),
                select0(lse_levels, 1));
  if (L == 3)
    attention_fwd(level_problem(ap, 2, mem_k.shape[1]), q, mem_k, mem_v, select0(o_levels, 2),
                  select0(lse_levels, 2));
  if (ap.dtype == DType::f64) mix<double>(ap, L, r.lam, o_levels, out, TensorRef{}, false);
  else mix<float>(ap, L, r.lam, o_levels, out, TensorRef{}, false);
}

void mka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const TensorRef& q,
             const TensorRef& k, const TensorRef& v, const RouteInputs& r,
             const TensorRef& mem_k, const TensorRef& mem_v, const TensorRef& o_levels,
             const TensorRef& lse_levels, const TensorRef& dout,
             const TensorRef& dk_state_out, const TensorRef& dv_state_out,
             const TensorRef& dq, const TensorRef& dk, const TensorRef& dv,
             const TensorRef& dmem_k, const TensorRef& dmem_v, const RouteGrads& g,
             const SavedKeys& saved) {
  const int64_t L = r.lam.shape[2];
  if (g.dlam.present()) {
    if (ap.dtype == DType::f64) mix<double>(ap, L, r.lam, o_levels, dout, g.dlam, true);
    else mix<float>(ap, L, r.lam, o_levels, dout, g.dlam, true);
  }
  // Each level's output enters as lam[., l] * O_l: its incoming gradient is weighted.
  attention_bwd(level_problem(ap, 0, 0), q, k, v, select0(o_levels, 0), select0(lse_levels, 0),
                dout, level_weight(r.lam, 0), dq, dk, dv);
  const bool kept = saved.k.present();  // the forward's EMA keys, or remade here
  Buffer kb(ap.dtype, {kept ? 0 : ap.B, ap.Tk, ap.G, ap.d});
  Buffer vb(ap.dtype, {kept ? 0 : ap.B, ap.Tk, ap.G, ap.d});
  const TensorRef ke = kept ? saved.k : TensorRef(kb), ve = kept ? saved.v : TensorRef(vb);
  if (!kept) {
    ema_route_fwd(rp, k, TensorRef{}, TensorRef{}, r.k_state, ke, TensorRef{});
    ema_route_fwd(rp, v, TensorRef{}, TensorRef{}, r.v_state, ve, TensorRef{});
  }
  Buffer dke(ap.dtype, {ap.B, ap.Tk, ap.G, ap.d}), dve(ap.dtype, {ap.B, ap.Tk, ap.G, ap.d});
  attention_bwd(level_problem(ap, 1, 0), q, ke, ve, select0(o_levels, 1),
                select0(lse_levels, 1), dout, level_weight(r.lam, 1), dq, dke, dve);
  ema_route_bwd(rp, k, TensorRef{}, TensorRef{}, r.k_state, dke, dk_state_out, dk, TensorRef{},
                TensorRef{}, g.dk_state);
  ema_route_bwd(rp, v, TensorRef{}, TensorRef{}, r.v_state, dve, dv_state_out, dv, TensorRef{},
                TensorRef{}, g.dv_state);
  if (L == 3)
    attention_bwd(level_problem(ap, 2, mem_k.shape[1]), q, mem_k, mem_v, select0(o_levels, 2),
                  select0(lse_levels, 2), dout, level_weight(r.lam, 2), dq, dmem_k, dmem_v);
}

}  // namespace mka::cpu
