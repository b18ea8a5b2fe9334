// FastMKA on the GPU: route fusion in one memory-bound pass (the chunked EMA-route scan)
// into the fused keys/values, then the attention kernels. The fusion pass moves ~3 bytes per
// key/value byte against attention's O(T) reuse of each key, so it costs a few percent of
// the attention at training lengths (bench/PERF_NOTES.md). The forward keeps the fused
// keys/values and the scans' chunk start states in the caller's SavedKeys, so the backward
// neither remakes them nor rereads k/v for them; without SavedKeys both live in scratch and
// the backward recomputes them.
#include "launchers.h"
#include "mka/cuda_kernels.h"

namespace mka::cuda {
namespace {

// The fused keys/values and the two scans' chunk start states: the caller's, or scratch.
struct Fused {
  KVScratch scratch;
  Workspace carry_scratch;
  Rows kr, vr;
  float *kc = nullptr, *vc = nullptr;
  Fused(const AttentionProblem& ap, const RouteProblem& rp, const SavedKeys& saved,
        cudaStream_t s)
      : scratch(saved.k.present() ? AttentionProblem{} : ap, s),
        carry_scratch(saved.k.present() ? 0 : 2 * ema_carry_bytes(rp), s, false) {
    const bool kept = saved.k.present();
    kr = kept ? rows(saved.k) : scratch.kr;
    vr = kept ? rows(saved.v) : scratch.vr;
    kc = kept ? static_cast<float*>(saved.carry.data) : carry_scratch.as<float>();
    vc = kc ? kc + ema_carry_bytes(rp) / 4 : nullptr;
  }
};

// The two memories' scans over k and v (x3: k3, v3), with the chunk start states kept in f.
std::pair<ScanMemory, ScanMemory> memories(const TensorRef& k, const TensorRef& v,
                                           const RouteInputs& r, const Fused& f) {
  ScanMemory km = scan_memory(rows(k), rows(r.k3), state(r.k_state));
  ScanMemory vm = scan_memory(rows(v), rows(r.v3), state(r.v_state));
  km.carry = f.kc, vm.carry = f.vc;
  return {km, vm};
}

void fuse(const RouteProblem& rp, const TensorRef& k, const TensorRef& v, const RouteInputs& r,
          const Fused& f, const TensorRef& k_state_out, const TensorRef& v_state_out,
          cudaStream_t s) {
  auto [km, vm] = memories(k, v, r, f);
  km.y = f.kr, vm.y = f.vr;
  km.state_out = state(k_state_out), vm.state_out = state(v_state_out);
  ema_route_fwd(rp, r.lam, km, vm, s);
}

}  // namespace

void fastmka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const TensorRef& q,
                 const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                 const TensorRef& out, const TensorRef& lse, const TensorRef& k_state_out,
                 const TensorRef& v_state_out, const SavedKeys& saved, void* stream) {
  DeviceGuard guard(q.device_id);
  auto s = static_cast<cudaStream_t>(stream);
  Fused f(ap, rp, saved, s);
  fuse(rp, k, v, r, f, k_state_out, v_state_out, s);
  attention_fwd_rows(ap, rows(q), f.kr, f.vr, rows(out), static_cast<float*>(lse.data), s);
}

void fastmka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const TensorRef& q,
                 const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                 const TensorRef& out, const TensorRef& lse, const TensorRef& dout,
                 const TensorRef& dk_state_out, const TensorRef& dv_state_out,
                 const TensorRef& dq, const TensorRef& dk, const TensorRef& dv,
                 const RouteGrads& g, const SavedKeys& saved, void* stream, bool add) {
  DeviceGuard guard(q.device_id);
  auto s = static_cast<cudaStream_t>(stream);
  Fused f(ap, rp, saved, s);
  if (!saved.k.present()) fuse(rp, k, v, r, f, TensorRef{}, TensorRef{}, s);
  // dK, dV of the fused keys/values: stored by the attention kernel in the inputs' dtype
  // (no float32 copy, no zero fill), read by the scan's backward.
  KVScratch df(ap, s);
  Workspace dq_acc(size_t(ap.B * ap.Tq * ap.H * ap.d) * 4, s, true);
  attention_bwd_rows(ap, rows(q), f.kr, f.vr, rows(out), static_cast<const float*>(lse.data),
                     rows(dout), TokenScalar{}, dense_rows(dq_acc.as<float>(), ap.Tq, ap.H, ap.d),
                     df.kr, df.vr, KVGrad::store_io, s);
  accumulate(dq_acc.as<float>(), dq, s, add);
  Workspace dlam(g.dlam.present() ? size_t(rp.B * rp.T * rp.L) * 4 : 0, s, true);
  auto [km, vm] = memories(k, v, r, f);
  km.dy = df.kr, km.dstate_out = state(dk_state_out);
  km.dx = rows(dk), km.dx3 = rows(g.dk3), km.dstate_in = state(g.dk_state);
  vm.dy = df.vr, vm.dstate_out = state(dv_state_out);
  vm.dx = rows(dv), vm.dx3 = rows(g.dv3), vm.dstate_in = state(g.dv_state);
  ema_route_bwd(rp, r.lam, km, vm, dlam.as<float>(), add, add, s);
  if (g.dlam.present()) accumulate(dlam.as<float>(), g.dlam, s, add);
}

}  // namespace mka::cuda
