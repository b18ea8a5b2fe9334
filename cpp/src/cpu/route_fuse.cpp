// route_fuse on the CPU: the EMA-routing scan of keys and of values (ema_scan.cpp).
#include "mka/cpu/kernels.h"

namespace mka::cpu {

void route_fuse_fwd(const RouteProblem& p, const RouteFuseFwd& a) {
  const RouteInputs& r = a.route;
  ema_route_fwd(p, a.k, r.lam, r.k3, r.k_state, a.k_fused, a.k_state_out);
  ema_route_fwd(p, a.v, r.lam, r.v3, r.v_state, a.v_fused, a.v_state_out);
}

void route_fuse_bwd(const RouteProblem& p, const RouteFuseBwd& a) {
  const RouteInputs& r = a.route;
  const RouteGrads& g = a.grads;
  // dlam collects the key and the value contributions: both scans add into it.
  ema_route_bwd(p, a.k, r.lam, r.k3, r.k_state, a.dk_fused, a.dk_state_out, a.dk, g.dlam, g.dk3,
                g.dk_state);
  ema_route_bwd(p, a.v, r.lam, r.v3, r.v_state, a.dv_fused, a.dv_state_out, a.dv, g.dlam, g.dv3,
                g.dv_state);
}

}  // namespace mka::cpu
