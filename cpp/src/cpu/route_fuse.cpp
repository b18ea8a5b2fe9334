// route_fuse on the CPU: the EMA-routing scan of keys and of values (ema_scan_cpu.cpp).
#include "mka/cpu/kernels.h"

namespace mka::cpu {

void route_fuse_fwd(const RouteProblem& p, const TensorRef& k, const TensorRef& v,
                    const RouteInputs& r, const TensorRef& k_fused, const TensorRef& v_fused,
                    const TensorRef& k_state_out, const TensorRef& v_state_out) {
  ema_route_fwd(p, k, r.lam, r.k3, r.k_state, k_fused, k_state_out);
  ema_route_fwd(p, v, r.lam, r.v3, r.v_state, v_fused, v_state_out);
}

void route_fuse_bwd(const RouteProblem& p, const TensorRef& k, const TensorRef& v,
                    const RouteInputs& r, const TensorRef& dk_fused, const TensorRef& dv_fused,
                    const TensorRef& dk_state_out, const TensorRef& dv_state_out,
                    const TensorRef& dk, const TensorRef& dv, const RouteGrads& g) {
  // dlam collects the key and the value contributions: both scans add into it.
  ema_route_bwd(p, k, r.lam, r.k3, r.k_state, dk_fused, dk_state_out, dk, g.dlam, g.dk3,
                g.dk_state);
  ema_route_bwd(p, v, r.lam, r.v3, r.v_state, dv_fused, dv_state_out, dv, g.dlam, g.dv3,
                g.dv_state);
}

}  // namespace mka::cpu
