// Host-side building blocks the op launchers compose (attention/launch.cu, scan/launch.cu and
// the launchers in ops/): attention and the EMA-route scan on raw strided views, with
// float32 gradient accumulators, and the fold of an accumulator into a typed gradient.
#pragma once
#include <cuda_runtime.h>

#include "attention/params.cuh"
#include "common/device_utils.cuh"
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
// Adds into the dense float32 accumulator dq (B,Tq,H,d); hands dk, dv (B,Tk,G,d, strided
// views in p.dtype) over as kv_grad says. `w` weights each query
// row's incoming gradient (mka's routing); absent: weight 1. delta (optional, dense
// (B, H, Tq) float32): the rows' <dout, out>, computed by the caller (then out is not read).
// sums (optional): the EMA scan backward's chunk sums of dk, dv, made by the tensor-core
// kernels; returns whether they were made.
// scan (optional, where attention_bwd_can_scan): the EMA scan's backward run through the
// write-out; dk, dv are then the scan inputs' gradients.
// zero_dq (with delta absent): dq (dense float32) is zeroed by the delta kernel, so the
// caller's accumulator needs no memset of its own.
bool attention_bwd_rows(const AttentionProblem& p, Rows q, Rows k, Rows v, Rows out,
                        const float* lse, Rows dout, TokenScalar w, Rows dq, Rows dk, Rows dv,
                        KVGrad kv_grad, cudaStream_t stream, const float* delta = nullptr,
                        const ScanSums& sums = {}, const ScanThrough& scan = {},
                        bool zero_dq = false);
// Whether attention_bwd_rows can run ScanThrough for p with these views (q, k, v, dout, dk,
// dv; out unless delta is given): the wgmma kernel runs, and a sequence has no more key
// blocks than the GPU has SMs (a block waits on the blocks after it, which must start).
// The kernel choice's scan_through = false (or attention = mma) turns it off: the separate
// scan passes. dlam: with ScanThrough::dlam (the block needs wg_bwd_dlam_smem_bytes more
// shared memory).
bool attention_bwd_can_scan(const AttentionProblem& p, std::initializer_list<Rows> views,
                            bool dlam = false);
// ScanThrough's look-back buffer (kUnset) and parameters for keys and values of problem p:
// decay beta, routing weights l0, l1 (absent: a plain EMA, as mka's level 2), the final
// states' gradients in and the initial states' out (k, v; each optional), added into or not.
struct ScanThroughScratch {
  Workspace link;
  ScanThrough scan;
  ScanThroughScratch(const AttentionProblem& p, float beta, TokenScalar l0, TokenScalar l1,
                     const StateView (&dstate_out)[2], const StateView (&dstate_in)[2],
                     bool add_state, cudaStream_t stream);
};

// Both memories in one launch per pass: y_t = lam0 x_t + lam1 EMA(x)_t (+ lam2 x3_t); without
// lam, y = EMA(x).
void ema_route_fwd(const RouteProblem& p, const TensorRef& lam, ScanOperand k, ScanOperand v,
                   cudaStream_t stream);
size_t ema_carry_bytes(const RouteProblem& p);
// The backward of ema_route_fwd, both memories in one launch per pass: dx, dx3 added into
// (add) or overwritten, dstate_in likewise (add_state); dlam: dense (B, T, L) float32
// accumulator added into, or nullptr. sums (optional): the chunk sums of dy, made with it by
// the attention backward (ScanSums), which replace the scan's local pass.
void ema_route_bwd(const RouteProblem& p, const TensorRef& lam, ScanOperand k, ScanOperand v,
                   float* dlam, bool add, bool add_state, cudaStream_t stream,
                   const ScanSums* sums = nullptr);
// p with the scan chunk an attention backward can make the chunk sums of (ema_attn_chunk):
// fastmka's fusion in both directions (its backward reads the forward's start states), mka's
// level 2 backward.
inline RouteProblem attn_chunk_route(RouteProblem p) {
  p.chunk = ema_attn_chunk(p.B, p.T, p.G * p.d, p.kernels.scan);
  return p;
}
// Scratch for both memories' chunk sums, for an attention backward to make (ScanSums);
// p from attn_chunk_route.
struct ScanSumsScratch {
  Workspace k, v;
  ScanSums sums;
  ScanSumsScratch(const RouteProblem& p, const TensorRef& lam, cudaStream_t stream);
};

// route_fuse on views (route_fuse.cu; fastmka's fusion too). carry (optional,
// 2 * ema_carry_bytes): both scans' chunk start states, written forward, read backward.
void route_fuse_fwd_rows(const RouteProblem& p, const TensorRef& k, const TensorRef& v,
                         const RouteInputs& r, Rows k_fused, Rows v_fused, StateView k_state_out,
                         StateView v_state_out, float* carry, cudaStream_t stream);
// dk, dv, g as ema_route_bwd's dx: added into (add) or overwritten; sums as ema_route_bwd's.
void route_fuse_bwd_rows(const RouteProblem& p, const TensorRef& k, const TensorRef& v,
                         const RouteInputs& r, Rows dk_fused, Rows dv_fused,
                         StateView dk_state_out, StateView dv_state_out, const TensorRef& dk,
                         const TensorRef& dv, const RouteGrads& g, bool add, float* carry,
                         cudaStream_t stream, const ScanSums* sums = nullptr);

// dst += src (add) or dst = src, where src is a dense float32 tensor of dst's shape (dst
// strided, any dtype); src == nullptr reads as zeros.
void accumulate(const float* src, const TensorRef& dst, cudaStream_t stream, bool add = true);

}  // namespace mka::cuda
