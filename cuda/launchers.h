// Host-side building blocks the op launchers compose (attention.cu, route_fuse.cu,
// fastmka.cu, mka.cu): attention and the EMA-route scan on raw strided views, with
// float32 gradient accumulators, and the fold of an accumulator into a typed gradient.
#pragma once
#include <cuda_runtime.h>

#include <optional>

#include "attention_params.cuh"
#include "device_utils.cuh"
#include "mka/problem.h"

namespace mka::cuda {

// A dense (B, T, H, d) view of scratch memory.
inline Rows dense_rows(void* data, int64_t T, int64_t H, int64_t d) {
  return {data, T * H * d, H * d, d};
}

// Scratch keys and values (B, Tk, G, d) in the inputs' dtype: fastmka's fused k/v, mka's
// EMA keys/values.
struct KVScratch {
  Workspace k, v;
  Rows kr, vr;
  KVScratch(const AttentionProblem& ap, cudaStream_t s)
      : k(size_t(ap.B * ap.Tk * ap.G * ap.d) * dtype_bytes(ap.dtype), s, false),
        v(size_t(ap.B * ap.Tk * ap.G * ap.d) * dtype_bytes(ap.dtype), s, false),
        kr(dense_rows(k.as<void>(), ap.Tk, ap.G, ap.d)),
        vr(dense_rows(v.as<void>(), ap.Tk, ap.G, ap.d)) {}
};

// out, lse (dense (B, H, Tq) float32) from q, k, v in p.dtype; out in p.dtype, or float32
// (out_f32).
void attention_fwd_rows(const AttentionProblem& p, Rows q, Rows k, Rows v, Rows out, float* lse,
                        cudaStream_t stream, bool out_f32 = false);
// Adds into the dense float32 accumulator dq (B,Tq,H,d); hands dk, dv (B,Tk,G,d) over as
// kv_grad says (float32 accumulators, or strided views in p.dtype). `w` weights each query
// row's incoming gradient (mka's routing); absent: weight 1. delta (optional, dense
// (B, H, Tq) float32): the rows' <dout, out>, computed by the caller (then out is not read).
void attention_bwd_rows(const AttentionProblem& p, Rows q, Rows k, Rows v, Rows out,
                        const float* lse, Rows dout, TokenScalar w, Rows dq, Rows dk, Rows dv,
                        KVGrad kv_grad, cudaStream_t stream, const float* delta = nullptr);

// y_t = lam0 x_t + lam1 EMA(x)_t (+ lam2 x3_t), y in p.dtype; without lam, y = EMA(x).
// carry_out (ema_carry_bytes(p), optional) keeps the EMA state at every chunk's start, which
// a later ema_route_bwd of the same x can take as fwd_carry instead of recomputing it.
void ema_route_fwd(const RouteProblem& p, const TensorRef& lam, Rows x, Rows x3,
                   StateView state_in, Rows y, StateView state_out, cudaStream_t stream,
                   float* carry_out = nullptr);
size_t ema_carry_bytes(const RouteProblem& p);
// The backward of ema_route_fwd: dy in p.dtype; dx, dx3 (p.dtype) added into (add) or
// overwritten, dstate_in likewise (add_state, default: add); dlam: dense (B, T, L) float32
// accumulator added into, or nullptr.
void ema_route_bwd(const RouteProblem& p, const TensorRef& lam, Rows x, Rows x3,
                   StateView state_in, Rows dy, StateView dstate_out, Rows dx, Rows dx3,
                   float* dlam, StateView dstate_in, bool add, cudaStream_t stream,
                   const float* fwd_carry = nullptr, std::optional<bool> add_state = {});

// dst += src (add) or dst = src, where src is a dense float32 tensor of dst's shape (dst
// strided, any dtype); src == nullptr reads as zeros.
void accumulate(const float* src, const TensorRef& dst, cudaStream_t stream, bool add = true);

}  // namespace mka::cuda
