// FastMKA on the CPU: route fusion into the fused keys/values (the caller's saved buffers,
// or scratch), then one tiled attention. Backward takes the saved fused keys/values, or
// recomputes the (memory-bound) fusion when none were kept.
#include "buffer.h"
#include "mka/cpu/kernels.h"

namespace mka::cpu {

void fastmka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const FastmkaFwd& a) {
  const DerivedKeys f(ap, a.saved);
  route_fuse_fwd(rp, {a.k, a.v, a.route, f.k, f.v, a.k_state_out, a.v_state_out, a.launch});
  attention_fwd(ap, a.q, f.k, f.v, a.out, a.lse);
}

void fastmka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const FastmkaBwd& a) {
  const DerivedKeys f(ap, a.saved);
  if (!a.saved.k.present())
    route_fuse_fwd(rp, {a.k, a.v, a.route, f.k, f.v, TensorRef{}, TensorRef{}, a.launch});
  Buffer dkf(ap.dtype, {ap.B, ap.Tk, ap.G, ap.d}), dvf(ap.dtype, {ap.B, ap.Tk, ap.G, ap.d});
  attention_bwd(ap, a.q, f.k, f.v, a.out, a.lse, a.dout, RowWeight{}, a.dq, dkf, dvf);
  route_fuse_bwd(rp, {a.k, a.v, a.route, dkf, dvf, a.dk_state_out, a.dv_state_out, a.dk, a.dv,
                      a.grads, true, a.launch});
}

}  // namespace mka::cpu
