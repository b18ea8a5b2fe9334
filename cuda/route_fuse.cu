// route_fuse on the GPU: one chunked EMA-route scan per memory (keys, then values).
#include "launchers.h"
#include "mka/cuda_kernels.h"

namespace mka::cuda {

void route_fuse_fwd(const RouteProblem& p, const TensorRef& k, const TensorRef& v,
                    const RouteInputs& r, const TensorRef& k_fused, const TensorRef& v_fused,
                    const TensorRef& k_state_out, const TensorRef& v_state_out, void* stream) {
  DeviceGuard guard(k.device_id);
  ScanMemory km = scan_memory(rows(k), rows(r.k3), state(r.k_state));
  ScanMemory vm = scan_memory(rows(v), rows(r.v3), state(r.v_state));
  km.y = rows(k_fused), km.state_out = state(k_state_out);
  vm.y = rows(v_fused), vm.state_out = state(v_state_out);
  ema_route_fwd(p, r.lam, km, vm, static_cast<cudaStream_t>(stream));
}

void route_fuse_bwd(const RouteProblem& p, const TensorRef& k, const TensorRef& v,
                    const RouteInputs& r, const TensorRef& dk_fused, const TensorRef& dv_fused,
                    const TensorRef& dk_state_out, const TensorRef& dv_state_out,
                    const TensorRef& dk, const TensorRef& dv, const RouteGrads& g, void* stream,
                    bool add) {
  DeviceGuard guard(k.device_id);
  auto s = static_cast<cudaStream_t>(stream);
  ScanMemory km = scan_memory(rows(k), rows(r.k3), state(r.k_state));
  ScanMemory vm = scan_memory(rows(v), rows(r.v3), state(r.v_state));
  km.dy = rows(dk_fused), km.dstate_out = state(dk_state_out);
  km.dx = rows(dk), km.dx3 = rows(g.dk3), km.dstate_in = state(g.dk_state);
  vm.dy = rows(dv_fused), vm.dstate_out = state(dv_state_out);
  vm.dx = rows(dv), vm.dx3 = rows(g.dv3), vm.dstate_in = state(g.dv_state);
  // Both memories add their terms to dlam: sum them in float32, round once.
  Workspace dlam(g.dlam.present() ? size_t(p.B * p.T * p.L) * 4 : 0, s, true);
  ema_route_bwd(p, r.lam, km, vm, dlam.as<float>(), add, add, s);
  if (g.dlam.present()) accumulate(dlam.as<float>(), g.dlam, s, add);
}

}  // namespace mka::cuda
