// CPU kernels on validated problems (see problem.h). Block-tiled with online softmax; no
// Tq x Tk matrix is ever materialised. float32 and float64; every tensor in the problem's
// dtype. Backward kernels add into zero-filled gradient buffers.
#pragma once
#include "mka/op_args.h"
#include "mka/problem.h"
#include "mka/tensor.h"

namespace mka::cpu {

// A per-query-row weight on the incoming gradient (mka's query-side routing): row (b, t)
// of dout is scaled by data[b * stride_b + t * stride_t]. data == nullptr: weight 1.
struct RowWeight {
  const void* data = nullptr;
  int64_t stride_b = 0, stride_t = 0;
};

void attention_fwd(const AttentionProblem& p, const TensorRef& q, const TensorRef& k,
                   const TensorRef& v, const TensorRef& out, const TensorRef& lse);
void attention_bwd(const AttentionProblem& p, const TensorRef& q, const TensorRef& k,
                   const TensorRef& v, const TensorRef& out, const TensorRef& lse,
                   const TensorRef& dout, RowWeight w, const TensorRef& dq,
                   const TensorRef& dk, const TensorRef& dv);

// Few query rows against many keys (decode through mka.attention): the paged decode kernel
// (paged_attention.cpp) over the contiguous cache, split over keys. attention_fwd takes it
// for the shapes decode_shaped accepts.
bool decode_shaped(const AttentionProblem& p);
void decode_attention(const AttentionProblem& p, const TensorRef& q, const TensorRef& k,
                      const TensorRef& v, const TensorRef& out, const TensorRef& lse);

// One memory's EMA scan with routing, for k or v (x: (B,T,G,d)):
//   y_t = lam[t,0] x_t + lam[t,1] EMA(x)_t (+ lam[t,2] x3_t); with lam absent, y_t = EMA(x)_t.
void ema_route_fwd(const RouteProblem& p, const TensorRef& x, const TensorRef& lam,
                   const TensorRef& x3, const TensorRef& state_in, const TensorRef& y,
                   const TensorRef& state_out);
// Adds dx, dlam (if present), dx3 (if present), dstate_in (if present).
void ema_route_bwd(const RouteProblem& p, const TensorRef& x, const TensorRef& lam,
                   const TensorRef& x3, const TensorRef& state_in, const TensorRef& dy, const TensorRef& dstate_out,
                   const TensorRef& dx, const TensorRef& dlam, const TensorRef& dx3,
                   const TensorRef& dstate_in);

// The ops composed of the primitives above (route_fuse.cpp, fastmka.cpp, mka.cpp), on their
// descriptors (op_args.h).
void route_fuse_fwd(const RouteProblem& p, const RouteFuseFwd& a);
void route_fuse_bwd(const RouteProblem& p, const RouteFuseBwd& a);

void fastmka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const FastmkaFwd& a);
void fastmka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const FastmkaBwd& a);

void mka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const MkaFwd& a);
void mka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const MkaBwd& a);

}  // namespace mka::cpu
