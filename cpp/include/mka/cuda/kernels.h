// CUDA kernels of the four ops on validated problems (see problem.h): the same argument
// lists as mka/cpu_kernels.h plus the CUDA stream (a cudaStream_t passed as void*).
// Inputs are float16, bfloat16 or float32 with head dims 64 or 128; softmax statistics and
// EMA states are float32. Backward kernels add into their gradient buffers, or overwrite
// them (accumulate = false). Only
// declared when the build has CUDA (MKA_WITH_CUDA); this header needs no CUDA headers.
#pragma once
#include "mka/problem.h"
#include "mka/tensor.h"

namespace mka::cuda {

void attention_fwd(const AttentionProblem& p, const TensorRef& q, const TensorRef& k,
                   const TensorRef& v, const TensorRef& out, const TensorRef& lse, void* stream);
void attention_bwd(const AttentionProblem& p, const TensorRef& q, const TensorRef& k,
                   const TensorRef& v, const TensorRef& out, const TensorRef& lse,
                   const TensorRef& dout, const TensorRef& dq, const TensorRef& dk,
                   const TensorRef& dv, void* stream, bool accumulate);

void route_fuse_fwd(const RouteProblem& p, const TensorRef& k, const TensorRef& v,
                    const RouteInputs& r, const TensorRef& k_fused, const TensorRef& v_fused,
                    const TensorRef& k_state_out, const TensorRef& v_state_out, void* stream);
void route_fuse_bwd(const RouteProblem& p, const TensorRef& k, const TensorRef& v,
                    const RouteInputs& r, const TensorRef& dk_fused, const TensorRef& dv_fused,
                    const TensorRef& dk_state_out, const TensorRef& dv_state_out,
                    const TensorRef& dk, const TensorRef& dv, const RouteGrads& g, void* stream,
                    bool accumulate);

void fastmka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const TensorRef& q,
                 const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                 const TensorRef& out, const TensorRef& lse, const TensorRef& k_state_out,
                 const TensorRef& v_state_out, const SavedKeys& saved, void* stream);
void fastmka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const TensorRef& q,
                 const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                 const TensorRef& out, const TensorRef& lse, const TensorRef& dout,
                 const TensorRef& dk_state_out, const TensorRef& dv_state_out,
                 const TensorRef& dq, const TensorRef& dk, const TensorRef& dv,
                 const RouteGrads& g, const SavedKeys& saved, void* stream, bool accumulate);

void mka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const TensorRef& q,
             const TensorRef& k, const TensorRef& v, const RouteInputs& r,
             const TensorRef& mem_k, const TensorRef& mem_v, const TensorRef& out,
             const TensorRef& o_levels, const TensorRef& lse_levels,
             const TensorRef& k_state_out, const TensorRef& v_state_out, const SavedKeys& saved,
             void* stream);
void mka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const TensorRef& q,
             const TensorRef& k, const TensorRef& v, const RouteInputs& r,
             const TensorRef& mem_k, const TensorRef& mem_v, const TensorRef& o_levels,
             const TensorRef& lse_levels, const TensorRef& dout,
             const TensorRef& dk_state_out, const TensorRef& dv_state_out,
             const TensorRef& dq, const TensorRef& dk, const TensorRef& dv,
             const TensorRef& dmem_k, const TensorRef& dmem_v, const RouteGrads& g,
             const SavedKeys& saved, void* stream, bool accumulate);

}  // namespace mka::cuda
