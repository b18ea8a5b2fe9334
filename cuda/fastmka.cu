// FastMKA on the GPU: route fusion in one memory-bound pass (the chunked EMA-route scan)
// into a stream-ordered scratch copy of the fused keys/values, then the attention kernels.
// The fusion pass moves ~3 bytes per key/value byte against attention's O(T) reuse of each
// key, so it costs a few percent of the attention at training lengths (bench/PERF_NOTES.md).
// Backward recomputes the fusion rather than keeping the fused copy alive between passes.
#include "launchers.h"
#include "mka/cuda_kernels.h"

namespace mka::cuda {
namespace {

void fuse(const RouteProblem& rp, const TensorRef& k, const TensorRef& v, const RouteInputs& r,
          const KVScratch& f, const TensorRef& k_state_out, const TensorRef& v_state_out,
          cudaStream_t s) {
  ema_route_fwd(rp, r.lam, rows(k), rows(r.k3), state(r.k_state), f.kr, state(k_state_out), s);
  ema_route_fwd(rp, r.lam, rows(v), rows(r.v3), state(r.v_state), f.vr, state(v_state_out), s);
}

}  // namespace

void fastmka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const TensorRef& q,
                 const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                 const TensorRef& out, const TensorRef& lse, const TensorRef& k_state_out,
                 const TensorRef& v_state_out, void* stream) {
  DeviceGuard guard(q.device_id);
  auto s = static_cast<cudaStream_t>(stream);
  KVScratch f(ap, s);
  fuse(rp, k, v, r, f, k_state_out, v_state_out, s);
  attention_fwd_rows(ap, rows(q), f.kr, f.vr, rows(out), static_cast<float*>(lse.data), s);
}

void fastmka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const TensorRef& q,
                 const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                 const TensorRef& out, const TensorRef& lse, const TensorRef& dout,
                 const TensorRef& dk_state_out, const TensorRef& dv_state_out,
                 const TensorRef& dq, const TensorRef& dk, const TensorRef& dv,
                 const RouteGrads& g, void* stream) {
  DeviceGuard guard(q.device_id);
  auto s = static_cast<cudaStream_t>(stream);
  KVScratch f(ap, s);
  fuse(rp, k, v, r, f, TensorRef{}, TensorRef{}, s);
  const size_t kv_bytes = size_t(ap.B * ap.Tk * ap.G * ap.d) * 4;
  Workspace dq_acc(size_t(ap.B * ap.Tq * ap.H * ap.d) * 4, s, true);
  Workspace dkf(kv_bytes, s, true), dvf(kv_bytes, s, true);
  const Rows dkf_rows = dense_rows(dkf.as<float>(), ap.Tk, ap.G, ap.d);
  const Rows dvf_rows = dense_rows(dvf.as<float>(), ap.Tk, ap.G, ap.d);
  attention_bwd_rows(ap, rows(q), f.kr, f.vr, rows(out), static_cast<const float*>(lse.data),
                     rows(dout), TokenScalar{}, dense_rows(dq_acc.as<float>(), ap.Tq, ap.H, ap.d),
                     dkf_rows, dvf_rows, s);
  accumulate(dq_acc.as<float>(), dq, s);
  Workspace dlam(g.dlam.present() ? size_t(rp.B * rp.T * rp.L) * 4 : 0, s, true);
  ema_route_bwd(rp, r.lam, rows(k), rows(r.k3), state(r.k_state), dkf_rows, GradDType::f32,
                state(dk_state_out), rows(dk), rows(g.dk3), GradDType::input, dlam.as<float>(),
                state(g.dk_state), s);
  ema_route_bwd(rp, r.lam, rows(v), rows(r.v3), state(r.v_state), dvf_rows, GradDType::f32,
                state(dv_state_out), rows(dv), rows(g.dv3), GradDType::input, dlam.as<float>(),
                state(g.dv_state), s);
  if (g.dlam.present()) accumulate(dlam.as<float>(), g.dlam, s);
}

}  // namespace mka::cuda
