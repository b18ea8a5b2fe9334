// Device-dispatching entry points of the four ops (SPEC §3). Each validates its inputs with
// the shared routine of problem.h, then runs the CPU kernel or the CUDA launcher.
// Outputs are allocated by the caller. Backward gradient outputs: with accumulate = true
// (the default) they are added into (so they must arrive zero-filled to get the gradient
// alone); with accumulate = false every element is overwritten, and they may arrive holding
// anything (the Python ops' choice: no zero fills, no reads of them).
#pragma once
#include <optional>

#include "mka/problem.h"

namespace mka {

void attention_forward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                       const AttnOptions& o, const TensorRef& out, const TensorRef& lse,
                       void* stream);
void attention_backward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                        const AttnOptions& o, const TensorRef& out, const TensorRef& lse,
                        const TensorRef& dout, const TensorRef& dq, const TensorRef& dk,
                        const TensorRef& dv, void* stream, bool accumulate = true);

void route_fuse_forward(const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                        const TensorRef& k_fused, const TensorRef& v_fused,
                        const TensorRef& k_state_out, const TensorRef& v_state_out,
                        void* stream);
// dk_state_out / dv_state_out: incoming gradients of the returned states (may be absent).
void route_fuse_backward(const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                         const TensorRef& dk_fused, const TensorRef& dv_fused,
                         const TensorRef& dk_state_out, const TensorRef& dv_state_out,
                         const TensorRef& dk, const TensorRef& dv, const RouteGrads& g,
                         void* stream, bool accumulate = true);

// saved (optional): the fused keys/values and the scan's carries (SavedKeys, problem.h),
// written by the forward, read by the backward.
void fastmka_forward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                     const RouteInputs& r, const AttnOptions& o, const TensorRef& out,
                     const TensorRef& lse, const TensorRef& k_state_out,
                     const TensorRef& v_state_out, void* stream, const SavedKeys& saved = {});
void fastmka_backward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                      const RouteInputs& r, const AttnOptions& o, const TensorRef& out,
                      const TensorRef& lse, const TensorRef& dout,
                      const TensorRef& dk_state_out, const TensorRef& dv_state_out,
                      const TensorRef& dq, const TensorRef& dk, const TensorRef& dv,
                      const RouteGrads& g, void* stream, const SavedKeys& saved = {},
                      bool accumulate = true);

// mka: r.k3/v3 unused; memory tokens mem_k/mem_v (B, M, G, d) iff L == 3.
// o_levels (L, B, Tq, H, d) and lse_levels (L, B, H, Tq), both in the statistics dtype
// (float32; float64 for float64 inputs), keep each level for backward;
// saved.k/v (optional) the EMA keys/values.
void mka_forward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                 const RouteInputs& r, const TensorRef& mem_k, const TensorRef& mem_v,
                 const AttnOptions& o, const TensorRef& out, const TensorRef& o_levels,
                 const TensorRef& lse_levels, const TensorRef& k_state_out,
                 const TensorRef& v_state_out, void* stream, const SavedKeys& saved = {});
void mka_backward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                  const RouteInputs& r, const TensorRef& mem_k, const TensorRef& mem_v,
                  const AttnOptions& o, const TensorRef& o_levels, const TensorRef& lse_levels,
                  const TensorRef& dout, const TensorRef& dk_state_out,
                  const TensorRef& dv_state_out, const TensorRef& dq, const TensorRef& dk,
                  const TensorRef& dv, const TensorRef& dmem_k, const TensorRef& dmem_v,
                  const RouteGrads& g, void* stream, const SavedKeys& saved = {},
                  bool accumulate = true);

bool built_with_cuda();

}  // namespace mka
