// FastMKA on the CPU: route fusion into the fused keys/values (the caller's saved buffers,
// or scratch), then one tiled attention. Backward takes the saved fused keys/values, or
// recomputes the (memory-bound) fusion when none were kept.
#include "buffer.h"
#include "mka/cpu/kernels.h"

namespace mka::cpu {

void fastmka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const TensorRef& q,
                 const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                 const TensorRef& out, const TensorRef& lse, const TensorRef& k_state_out,
                 const TensorRef& v_state_out, const SavedKeys& saved) {
  const bool keep = saved.k.present();
  Buffer kb(ap.dtype, {keep ? 0 : ap.B, ap.Tk, ap.G, ap.d});
  Buffer vb(ap.dtype, {keep ? 0 : ap.B, ap.Tk, ap.G, ap.d});
  const TensorRef kf = keep ? saved.k : TensorRef(kb), vf = keep ? saved.v : TensorRef(vb);
  route_fuse_fwd(rp, k, v, r, kf, vf, k_state_out, v_state_out);
  attention_fwd(ap, q, kf, vf, out, lse);
}

void fastmka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const TensorRef& q,
                 const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                 const TensorRef& out, const TensorRef& lse, const TensorRef& dout,
                 const TensorRef& dk_state_out, const TensorRef& dv_state_out,
                 const TensorRef& dq, const TensorRef& dk, const TensorRef& dv,
                 const RouteGrads& g, const SavedKeys& saved) {
  const bool kept = saved.k.present();
  Buffer kb(ap.dtype, {kept ? 0 : ap.B, ap.Tk, ap.G, ap.d});
  Buffer vb(ap.dtype, {kept ? 0 : ap.B, ap.Tk, ap.G, ap.d});
  const TensorRef kf = kept ? saved.k : TensorRef(kb), vf = kept ? saved.v : TensorRef(vb);
  if (!kept) route_fuse_fwd(rp, k, v, r, kf, vf, TensorRef{}, TensorRef{});
  Buffer dkf(ap.dtype, {ap.B, ap.Tk, ap.G, ap.d}), dvf(ap.dtype, {ap.B, ap.Tk, ap.G, ap.d});
  attention_bwd(ap, q, kf, vf, out, lse, dout, RowWeight{}, dq, dkf, dvf);
  route_fuse_bwd(rp, k, v, r, dkf, dvf, dk_state_out, dv_state_out, dk, dv, g);
}

}  // namespace mka::cpu
