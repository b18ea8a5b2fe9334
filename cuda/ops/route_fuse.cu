// route_fuse on the GPU: the chunked EMA-route scan over keys and values (one launch per
// pass for both). The *_rows forms also serve fastmka's fusion.
#include "ops/building_blocks.h"
#include "mka/cuda/kernels.h"

namespace mka::cuda {
namespace {

// The key and value scans' inputs; carry (optional, 2 * ema_carry_bytes): their chunk start
// states, keys' first.
std::pair<ScanOperand, ScanOperand> memories(const RouteProblem& p, const TensorRef& k,
                                           const TensorRef& v, const RouteInputs& r,
                                           float* carry) {
  ScanOperand km = scan_operand(rows(k), rows(r.k3), state(r.k_state));
  ScanOperand vm = scan_operand(rows(v), rows(r.v3), state(r.v_state));
  if (carry) km.carry = carry, vm.carry = carry + ema_carry_bytes(p) / 4;
  return {km, vm};
}

}  // namespace

void route_fuse_fwd_rows(const RouteProblem& p, const TensorRef& k, const TensorRef& v,
                         const RouteInputs& r, Rows k_fused, Rows v_fused, StateView k_state_out,
                         StateView v_state_out, float* carry, cudaStream_t s) {
  auto [km, vm] = memories(p, k, v, r, carry);
  km.y = k_fused, km.state_out = k_state_out;
  vm.y = v_fused, vm.state_out = v_state_out;
  ema_route_fwd(p, r.lam, km, vm, s);
}

void route_fuse_bwd_rows(const RouteProblem& p, const TensorRef& k, const TensorRef& v,
                         const RouteInputs& r, Rows dk_fused, Rows dv_fused,
                         StateView dk_state_out, StateView dv_state_out, const TensorRef& dk,
                         const TensorRef& dv, const RouteGrads& g, bool add, float* carry,
                         cudaStream_t s, const ScanSums* sums) {
  auto [km, vm] = memories(p, k, v, r, carry);
  km.dy = dk_fused, km.dstate_out = dk_state_out;
  km.dx = rows(dk), km.dx3 = rows(g.dk3), km.dstate_in = state(g.dk_state);
  vm.dy = dv_fused, vm.dstate_out = dv_state_out;
  vm.dx = rows(dv), vm.dx3 = rows(g.dv3), vm.dstate_in = state(g.dv_state);
  // Both memories add their terms to dlam: sum them in float32, round once.
  Workspace dlam(g.dlam.present() ? size_t(p.B * p.T * p.L) * 4 : 0, s, true);
  ema_route_bwd(p, r.lam, km, vm, dlam.as<float>(), add, add, s, sums);
  if (g.dlam.present()) accumulate(dlam.as<float>(), g.dlam, s, add);
}

void route_fuse_fwd(const RouteProblem& p, const RouteFuseFwd& a) {
  DeviceGuard guard(a.k.device_id);
  route_fuse_fwd_rows(p, a.k, a.v, a.route, rows(a.k_fused), rows(a.v_fused),
                      state(a.k_state_out), state(a.v_state_out), nullptr,
                      static_cast<cudaStream_t>(a.launch.stream));
}

void route_fuse_bwd(const RouteProblem& p, const RouteFuseBwd& a) {
  DeviceGuard guard(a.k.device_id);
  route_fuse_bwd_rows(p, a.k, a.v, a.route, rows(a.dk_fused), rows(a.dv_fused),
                      state(a.dk_state_out), state(a.dv_state_out), a.dk, a.dv, a.grads,
                      a.accumulate, nullptr, static_cast<cudaStream_t>(a.launch.stream));
}

}  // namespace mka::cuda
