// FastMKA on the GPU: route fusion in one memory-bound pass (the chunked EMA-route scan)
// into the fused keys/values, then the attention kernels. The fusion pass moves ~3 bytes per
// key/value byte against attention's O(T) reuse of each key, so it costs a few percent of
// the attention at training lengths (docs/kernels.md). The forward keeps the fused
// keys/values and the scans' chunk start states in the caller's SavedKeys, so the backward
// neither remakes them nor rereads k/v for them; without SavedKeys both live in scratch and
// the backward recomputes them. Without level 3's gradients, the scan's backward (with L = 2
// dlam too) runs through the Hopper attention backward's write-out (ScanThrough); otherwise
// the attention backward makes the backward scan's chunk sums from the fused keys'
// gradients it holds, so the scan skips its local pass.
#include "ops/building_blocks.h"
#include "mka/cuda/kernels.h"

namespace mka::cuda {
namespace {

// The fused keys/values and both scans' chunk start states: the caller's, or scratch.
struct Fused {
  KVScratch scratch;
  Workspace carry_scratch;
  Rows kr, vr;
  float* carry;
  Fused(const AttentionProblem& ap, const RouteProblem& rp, const SavedKeys& saved,
        cudaStream_t s)
      : scratch(saved.k.present() ? AttentionProblem{} : ap, s),
        carry_scratch(saved.k.present() ? 0 : 2 * ema_carry_bytes(rp), s, false) {
    const bool kept = saved.k.present();
    kr = kept ? rows(saved.k) : scratch.kr;
    vr = kept ? rows(saved.v) : scratch.vr;
    carry = kept ? static_cast<float*>(saved.carry.data) : carry_scratch.as<float>();
  }
};

}  // namespace

void fastmka_fwd(const AttentionProblem& ap, const RouteProblem& route, const FastmkaFwd& a) {
  DeviceGuard guard(a.q.device_id);
  auto s = static_cast<cudaStream_t>(a.launch.stream);
  const RouteProblem rp = attn_chunk_route(route);
  Fused f(ap, rp, a.saved, s);
  route_fuse_fwd_rows(rp, a.k, a.v, a.route, f.kr, f.vr, state(a.k_state_out),
                      state(a.v_state_out), f.carry, s);
  attention_fwd_rows(ap, rows(a.q), f.kr, f.vr, rows(a.out), static_cast<float*>(a.lse.data), s);
}

void fastmka_bwd(const AttentionProblem& ap, const RouteProblem& route, const FastmkaBwd& a) {
  DeviceGuard guard(a.q.device_id);
  auto s = static_cast<cudaStream_t>(a.launch.stream);
  const RouteProblem rp = attn_chunk_route(route);
  const RouteGrads& g = a.grads;
  const bool add = a.accumulate;
  Fused f(ap, rp, a.saved, s);
  if (!a.saved.k.present())
    route_fuse_fwd_rows(rp, a.k, a.v, a.route, f.kr, f.vr, StateView{}, StateView{}, f.carry, s);
  Workspace dq_acc(size_t(ap.B * ap.Tq * ap.H * ap.d) * 4, s, false);  // zeroed by the delta kernel
  const Rows dq_rows = dense_rows(dq_acc.as<float>(), ap.Tq, ap.H, ap.d);
  const auto lse = static_cast<const float*>(a.lse.data);
  // Without level 3's gradients the scan's backward runs through the attention backward's
  // write-out, which then writes dk and dv themselves, and with L = 2 makes dlam too (from k,
  // v, staged in 16-byte pieces, and the forward's chunk start states; its walk divides by
  // 1 - beta, so not where beta rounds to 1 in float).
  const bool dlam = g.dlam.present();
  const bool dlam_through = rp.L == 2 && float(rp.beta) < 1.f && aligned16(rows(a.k)) &&
                            aligned16(rows(a.v));
  if (!g.dk3.present() && !g.dv3.present() && (!dlam || dlam_through) &&
      attention_bwd_can_scan(ap, {rows(a.q), f.kr, f.vr, rows(a.out), rows(a.dout), rows(a.dk),
                                  rows(a.dv)},
                             dlam)) {
    ScanThroughScratch through(ap, float(rp.beta), lam_level(a.route.lam, 0),
                               lam_level(a.route.lam, 1),
                               {state(a.dk_state_out), state(a.dv_state_out)},
                               {state(g.dk_state), state(g.dv_state)}, add, s);
    Workspace dlam_acc(dlam ? size_t(rp.B * rp.T * 2) * 4 : 0, s, true);
    if (dlam) {
      ScanThrough& sc = through.scan;
      sc.dlam = dlam_acc.as<float>();
      sc.x[0] = rows(a.k), sc.x[1] = rows(a.v);
      sc.carry[0] = f.carry, sc.carry[1] = f.carry + ema_carry_bytes(rp) / 4;
      sc.chunk = int(rp.chunk), sc.n_chunks = ceil_div(rp.T, rp.chunk);
      MKA_CHECK(sc.chunk == 8 || sc.chunk == 16, "ScanThrough dlam: chunk ", sc.chunk,
                " (ema_attn_chunk; the half blocks start on chunk boundaries)");
    }
    attention_bwd_rows(ap, rows(a.q), f.kr, f.vr, rows(a.out), lse, rows(a.dout), TokenScalar{},
                       dq_rows, rows(a.dk), rows(a.dv), add ? KVGrad::add_io : KVGrad::store_io,
                       s, nullptr, {}, through.scan, true);
    accumulate(dq_acc.as<float>(), a.dq, s, add);
    if (dlam) accumulate(dlam_acc.as<float>(), g.dlam, s, add);
    return;
  }
  // dK, dV of the fused keys/values: stored by the attention kernel in the inputs' dtype
  // (no float32 copy, no zero fill), read by the scan's backward.
  KVScratch df(ap, s);
  ScanSumsScratch sums(rp, a.route.lam, s);
  const bool made = attention_bwd_rows(ap, rows(a.q), f.kr, f.vr, rows(a.out), lse, rows(a.dout),
                                       TokenScalar{}, dq_rows, df.kr, df.vr, KVGrad::store_io, s,
                                       nullptr, sums.sums, {}, true);
  accumulate(dq_acc.as<float>(), a.dq, s, add);
  route_fuse_bwd_rows(rp, a.k, a.v, a.route, df.kr, df.vr, state(a.dk_state_out),
                      state(a.dv_state_out), a.dk, a.dv, g, add, f.carry, s,
                      made ? &sums.sums : nullptr);
}

}  // namespace mka::cuda
