// route_fuse on the GPU: one chunked EMA-route scan per memory (keys, then values).
#include "launchers.h"
#include "mka/cuda_kernels.h"

namespace mka::cuda {

void route_fuse_fwd(const RouteProblem& p, const TensorRef& k, const TensorRef& v,
                    const RouteInputs& r, const TensorRef& k_fused, const TensorRef& v_fused,
                    const TensorRef& k_state_out, const TensorRef& v_state_out, void* stream) {
  DeviceGuard guard(k.device_id);
  auto s = static_cast<cudaStream_t>(stream);
  ema_route_fwd(p, r.lam, rows(k), rows(r.k3), state(r.k_state), rows(k_fused),
                state(k_state_out), s);
  ema_route_fwd(p, r.lam, rows(v), rows(r.v3), state(r.v_state), rows(v_fused),
                state(v_state_out), s);
}

void route_fuse_bwd(const RouteProblem& p, const TensorRef& k, const TensorRef& v,
                    const RouteInputs& r, const TensorRef& dk_fused, const TensorRef& dv_fused,
                    const TensorRef& dk_state_out, const TensorRef& dv_state_out,
                    const TensorRef& dk, const TensorRef& dv, const RouteGrads& g, void* stream,
                    bool add) {
  DeviceGuard guard(k.device_id);
  auto s = static_cast<cudaStream_t>(stream);
  // Both memories add their terms to dlam: sum them in float32, round once.
  Workspace dlam(g.dlam.present() ? size_t(p.B * p.T * p.L) * 4 : 0, s, true);
  ema_route_bwd(p, r.lam, rows(k), rows(r.k3), state(r.k_state), rows(dk_fused),
                state(dk_state_out), rows(dk), rows(g.dk3), dlam.as<float>(), state(g.dk_state),
                add, s);
  ema_route_bwd(p, r.lam, rows(v), rows(r.v3), state(r.v_state), rows(dv_fused),
                state(dv_state_out), rows(dv), rows(g.dv3), dlam.as<float>(), state(g.dv_state),
                add, s);
  if (g.dlam.present()) accumulate(dlam.as<float>(), g.dlam, s, add);
}

}  // namespace mka::cuda
