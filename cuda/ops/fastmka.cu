// FastMKA on the GPU: route fusion in one memory-bound pass (the chunked EMA-route scan)
// into the fused keys/values, then the attention kernels. The fusion pass moves ~3 bytes per
// key/value byte against attention's O(T) reuse of each key, so it costs a few percent of
// the attention at training lengths (bench/PERF_NOTES.md). The forward keeps the fused
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

void fastmka_fwd(const AttentionProblem& ap, const RouteProblem& route, const TensorRef& q,
                 const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                 const TensorRef& out, const TensorRef& lse, const TensorRef& k_state_out,
                 const TensorRef& v_state_out, const SavedKeys& saved, void* stream) {
  DeviceGuard guard(q.device_id);
  auto s = static_cast<cudaStream_t>(stream);
  const RouteProblem rp = attn_chunk_route(route);
  Fused f(ap, rp, saved, s);
  route_fuse_fwd_rows(rp, k, v, r, f.kr, f.vr, state(k_state_out), state(v_state_out), f.carry,
                      s);
  attention_fwd_rows(ap, rows(q), f.kr, f.vr, rows(out), static_cast<float*>(lse.data), s);
}

void fastmka_bwd(const AttentionProblem& ap, const RouteProblem& route, const TensorRef& q,
                 const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                 const TensorRef& out, const TensorRef& lse, const TensorRef& dout,
                 const TensorRef& dk_state_out, const TensorRef& dv_state_out,
                 const TensorRef& dq, const TensorRef& dk, const TensorRef& dv,
                 const RouteGrads& g, const SavedKeys& saved, void* stream, bool add) {
  DeviceGuard guard(q.device_id);
  auto s = static_cast<cudaStream_t>(stream);
  const RouteProblem rp = attn_chunk_route(route);
  Fused f(ap, rp, saved, s);
  if (!saved.k.present())
    route_fuse_fwd_rows(rp, k, v, r, f.kr, f.vr, StateView{}, StateView{}, f.carry, s);
  Workspace dq_acc(size_t(ap.B * ap.Tq * ap.H * ap.d) * 4, s, true);
  const Rows dq_rows = dense_rows(dq_acc.as<float>(), ap.Tq, ap.H, ap.d);
  // Without level 3's gradients the scan's backward runs through the attention backward's
  // write-out, which then writes dk and dv themselves, and with L = 2 makes dlam too (from k,
  // v, staged in 16-byte pieces, and the forward's chunk start states; its walk divides by
  // 1 - beta, so not where beta rounds to 1 in float).
  const bool dlam = g.dlam.present();
  const bool dlam_through = rp.L == 2 && float(rp.beta) < 1.f && aligned16(rows(k)) &&
                            aligned16(rows(v));
  if (!g.dk3.present() && !g.dv3.present() && (!dlam || dlam_through) &&
      attention_bwd_can_scan(ap, {rows(q), f.kr, f.vr, rows(out), rows(dout), rows(dk), rows(dv)},
                             dlam)) {
    ScanThroughScratch through(ap, float(rp.beta), lam_level(r.lam, 0), lam_level(r.lam, 1),
                               {state(dk_state_out), state(dv_state_out)},
                               {state(g.dk_state), state(g.dv_state)}, add, s);
    Workspace dlam_acc(dlam ? size_t(rp.B * rp.T * 2) * 4 : 0, s, true);
    if (dlam) {
      ScanThrough& sc = through.scan;
      sc.dlam = dlam_acc.as<float>();
      sc.x[0] = rows(k), sc.x[1] = rows(v);
      sc.carry[0] = f.carry, sc.carry[1] = f.carry + ema_carry_bytes(rp) / 4;
      sc.chunk = int(rp.chunk), sc.n_chunks = ceil_div(rp.T, rp.chunk);
      MKA_CHECK(sc.chunk == 8 || sc.chunk == 16, "ScanThrough dlam: chunk ", sc.chunk,
                " (ema_attn_chunk; the half blocks start on chunk boundaries)");
    }
    attention_bwd_rows(ap, rows(q), f.kr, f.vr, rows(out), static_cast<const float*>(lse.data),
                       rows(dout), TokenScalar{}, dq_rows, rows(dk), rows(dv),
                       add ? KVGrad::add_io : KVGrad::store_io, s, nullptr, {}, through.scan);
    accumulate(dq_acc.as<float>(), dq, s, add);
    if (dlam) accumulate(dlam_acc.as<float>(), g.dlam, s, add);
    return;
  }
  // dK, dV of the fused keys/values: stored by the attention kernel in the inputs' dtype
  // (no float32 copy, no zero fill), read by the scan's backward.
  KVScratch df(ap, s);
  ScanSumsScratch sums(rp, r.lam, s);
  const bool made = attention_bwd_rows(
      ap, rows(q), f.kr, f.vr, rows(out), static_cast<const float*>(lse.data), rows(dout),
      TokenScalar{}, dq_rows, df.kr, df.vr, KVGrad::store_io, s, nullptr, sums.sums);
  accumulate(dq_acc.as<float>(), dq, s, add);
  route_fuse_bwd_rows(rp, k, v, r, df.kr, df.vr, state(dk_state_out), state(dv_state_out), dk,
                      dv, g, add, f.carry, s, made ? &sums.sums : nullptr);
}

}  // namespace mka::cuda
