// FastMKA on the GPU: route fusion in one memory-bound pass (the chunked EMA-route scan)
// into a stream-ordered scratch copy of the fused keys/values, then the attention kernels.
// The fusion pass moves ~3 bytes per key/value byte against attention's O(T) reuse of each
// key, so it costs a few percent of the attention at training lengths (bench/PERF_NOTES.md).
// Backward recomputes the fusion rather than keeping the fused copy alive between passes.
#include "launchers.h"
#include "mka/cuda_kernels.h"

namespace mka::cuda {
namespace {

// kc, vc (optional): keep the scans' chunk start states for the backward's dlam pass.
void fuse(const RouteProblem& rp, const TensorRef& k, const TensorRef& v, const RouteInputs& r,
          const KVScratch& f, const TensorRef& k_state_out, const TensorRef& v_state_out,
          cudaStream_t s, float* kc = nullptr, float* vc = nullptr) {
  ema_route_fwd(rp, r.lam, rows(k), rows(r.k3), state(r.k_state), f.kr, state(k_state_out), s,
                kc);
  ema_route_fwd(rp, r.lam, rows(v), rows(r.v3), state(r.v_state), f.vr, state(v_state_out), s,
                vc);
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
  const bool dlam_needed = g.dlam.present() && r.lam.present();
  Workspace kc(dlam_needed ? ema_carry_bytes(rp) : 0, s, false);
  Workspace vc(dlam_needed ? ema_carry_bytes(rp) : 0, s, false);
  fuse(rp, k, v, r, f, TensorRef{}, TensorRef{}, s, kc.as<float>(), vc.as<float>());
  // dK, dV of the fused keys/values: stored by the attention kernel in the inputs' dtype
  // (no float32 copy, no zero fill), read by the scan's backward.
  KVScratch df(ap, s);
  Workspace dq_acc(size_t(ap.B * ap.Tq * ap.H * ap.d) * 4, s, true);
  attention_bwd_rows(ap, rows(q), f.kr, f.vr, rows(out), static_cast<const float*>(lse.data),
                     rows(dout), TokenScalar{}, dense_rows(dq_acc.as<float>(), ap.Tq, ap.H, ap.d),
                     df.kr, df.vr, KVGrad::store_io, s);
  accumulate(dq_acc.as<float>(), dq, s);
  Workspace dlam(g.dlam.present() ? size_t(rp.B * rp.T * rp.L) * 4 : 0, s, true);
  ema_route_bwd(rp, r.lam, rows(k), rows(r.k3), state(r.k_state), df.kr, GradDType::input,
                state(dk_state_out), rows(dk), rows(g.dk3), GradDType::input, dlam.as<float>(),
                state(g.dk_state), s, kc.as<float>());
  ema_route_bwd(rp, r.lam, rows(v), rows(r.v3), state(r.v_state), df.vr, GradDType::input,
                state(dv_state_out), rows(dv), rows(g.dv3), GradDType::input, dlam.as<float>(),
                state(g.dv_state), s, vc.as<float>());
  if (g.dlam.present()) accumulate(dlam.as<float>(), g.dlam, s);
}

}  // namespace mka::cuda
