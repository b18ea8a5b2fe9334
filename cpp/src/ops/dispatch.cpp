// The ops' entry points: validate once (problem.cpp), check the caller's output buffers,
// then run the kernels of the inputs' device on the op's descriptor.
#include <cstring>
#include <tuple>

#include "mka/cpu/kernels.h"
#include "mka/error.h"
#include "mka/ops.h"
#include "on_device.h"
#ifdef MKA_WITH_CUDA
#include "mka/cuda/kernels.h"
#endif

namespace mka {
namespace {


// Softmax statistics are addressed as dense (B, H, Tq) rows.
void check_contiguous(const TensorRef& t, const char* name) {
  MKA_CHECK(is_contiguous(t), name, ": must be contiguous");
}

// The CPU kernels read lam in the inputs' dtype (the Python layer casts it).
void check_cpu_lam(const TensorRef& lam, DType dtype) {
  MKA_CHECK(lam.device != Device::cpu || lam.dtype == dtype, "lam: the CPU kernels take lam in ",
            dtype_name(dtype), ", got ", dtype_name(lam.dtype));
}

void check_attention_outputs(const AttentionProblem& p, const TensorRef& out,
                             const TensorRef& lse) {
  check_output(out, "out", {p.B, p.Tq, p.H, p.d}, p.dtype, p.device, p.device_id);
  check_output(lse, "lse", {p.B, p.H, p.Tq}, stats_dtype(p.dtype), p.device, p.device_id);
  check_contiguous(lse, "lse");
}

void check_state_outputs(const RouteProblem& p, const TensorRef& ks, const TensorRef& vs) {
  for (auto [t, name] : {std::pair{&ks, "k_state_out"}, std::pair{&vs, "v_state_out"}})
    if (t->present())
      check_output(*t, name, {p.B, p.G, p.d}, stats_dtype(p.dtype), p.device, p.device_id);
}

void check_grads_like(const TensorRef& dx, const char* name, const TensorRef& x) {
  if (!x.present()) return;
  MKA_CHECK(dx.present(), name, ": gradient buffer missing");
  check_output(dx, name, {x.shape[0], x.shape[1], x.shape[2], x.shape[3]}, x.dtype, x.device,
               x.device_id);
}

void check_route_grads(const RouteInputs& r, const RouteGrads& g) {
  if (g.dlam.present()) check_output(g.dlam, "dlam", {r.lam.shape[0], r.lam.shape[1], r.lam.shape[2]},
                                     r.lam.dtype, r.lam.device, r.lam.device_id);
  if (g.dk3.present()) check_grads_like(g.dk3, "dk3", r.k3);
  if (g.dv3.present()) check_grads_like(g.dv3, "dv3", r.v3);
  for (auto [gt, t, name] : {std::tuple{&g.dk_state, &r.k_state, "dk_state"},
                             std::tuple{&g.dv_state, &r.v_state, "dv_state"}})
    if (gt->present()) {
      MKA_CHECK(t->present(), name, ": gradient requested for a state that was not given");
      check_output(*gt, name, {t->shape[0], t->shape[1], t->shape[2]}, t->dtype, t->device,
                   t->device_id);
    }
}

// Zeros a CPU tensor's elements (any strides; the bits of 0.0 are zeros in every dtype): one
// memset per run of contiguous innermost elements, one for the whole of a dense tensor.
void zero_fill_cpu(const TensorRef& t) {
  const int64_t n = t.numel();
  if (n == 0) return;
  const int64_t elem = int64_t(dtype_bytes(t.dtype));
  const int last = t.ndim - 1;
  const int64_t run = is_contiguous(t) ? n : last >= 0 && t.stride[last] == 1 ? t.shape[last] : 1;
  for (int64_t i = 0; i < n; i += run) {
    int64_t rest = i, off = 0;
    for (int dim = last; dim >= 0; --dim) {
      off += (rest % t.shape[dim]) * t.stride[dim];
      rest /= t.shape[dim];
    }
    std::memset(static_cast<char*>(t.data) + off * elem, 0, size_t(run * elem));
  }
}

// Gradient buffers are overwritten (accumulate = false): the CPU kernels add, so zero them
// first; absent buffers are skipped.
void zero_fill_cpu(std::initializer_list<const TensorRef*> ts) {
  for (const TensorRef* t : ts)
    if (t->present()) zero_fill_cpu(*t);
}
void zero_fill_cpu(const RouteGrads& g) {
  zero_fill_cpu({&g.dlam, &g.dk3, &g.dv3, &g.dk_state, &g.dv_state});
}

// Saved keys/values are like k and v; fastmka's carry (CUDA) is fastmka_carry_numel floats.
void check_saved(const SavedKeys& s, const TensorRef& k, const TensorRef& v, bool with_carry,
                 ScanKernel scan, const char* op) {
  MKA_CHECK(s.k.present() == s.v.present(), op, ": saved keys and values go together");
  if (!s.k.present()) {
    MKA_CHECK(!s.carry.present(), op, ": saved carry without saved keys");
    return;
  }
  check_grads_like(s.k, "saved k", k);
  check_grads_like(s.v, "saved v", v);
  const int64_t n = with_carry ? fastmka_carry_numel(k.shape[0], k.shape[1], k.shape[2],
                                                     k.shape[3], k.device, scan)
                               : 0;
  if (n == 0) {
    MKA_CHECK(!s.carry.present() || s.carry.numel() == 0, op, ": unexpected saved carry");
    return;
  }
  MKA_CHECK(s.carry.present() && s.carry.numel() == n && is_contiguous(s.carry) &&
                s.carry.dtype == DType::f32 && s.carry.device == k.device &&
                s.carry.device_id == k.device_id,
            op, ": saved carry must be a contiguous float32 buffer of ", n,
            " elements on the inputs' device");
}

// mka's per-level outputs and statistics kept for the backward.
void check_level_stats(const AttentionProblem& ap, int64_t L, const TensorRef& o_levels,
                       const TensorRef& lse_levels) {
  check_output(o_levels, "o_levels", {L, ap.B, ap.Tq, ap.H, ap.d}, stats_dtype(ap.dtype),
               ap.device, ap.device_id);
  check_output(lse_levels, "lse_levels", {L, ap.B, ap.H, ap.Tq}, stats_dtype(ap.dtype),
               ap.device, ap.device_id);
  check_contiguous(lse_levels, "lse_levels");
}

// The validated problems of a call, with the call's kernel choice.
AttentionProblem attention_problem(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                                   const AttnOptions& o, const Launch& launch) {
  AttentionProblem p = check_attention(q, k, v, o);
  p.kernels = launch.kernels;
  return p;
}
// lam_tokens: Tk for key-side routing (route_fuse, fastmka), Tq for mka's query side.
RouteProblem route_problem(const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                           int64_t lam_tokens, bool key_side, const Launch& launch) {
  RouteProblem p = check_route(k, v, r, lam_tokens, key_side ? "(B, Tk, L)" : "(B, Tq, L)",
                               key_side);
  p.kernels = launch.kernels;
  check_cpu_lam(r.lam, p.dtype);
  return p;
}

}  // namespace

void attention_forward(const AttentionFwd& a) {
  const AttentionProblem p = attention_problem(a.q, a.k, a.v, a.opts, a.launch);
  check_attention_outputs(p, a.out, a.lse);
  on_device(p.device, "attention", [&] { cpu::attention_fwd(p, a.q, a.k, a.v, a.out, a.lse); },
            [&] { MKA_CUDA_CALL(cuda::attention_fwd(p, a)); });
}

void attention_backward(const AttentionBwd& a) {
  const AttentionProblem p = attention_problem(a.q, a.k, a.v, a.opts, a.launch);
  check_attention_outputs(p, a.out, a.lse);
  check_grads_like(a.dout, "dout", a.q);
  check_grads_like(a.dq, "dq", a.q);
  check_grads_like(a.dk, "dk", a.k);
  check_grads_like(a.dv, "dv", a.v);
  on_device(p.device, "attention backward", [&] {
    if (!a.accumulate) zero_fill_cpu({&a.dq, &a.dk, &a.dv});
    cpu::attention_bwd(p, a.q, a.k, a.v, a.out, a.lse, a.dout, cpu::RowWeight{}, a.dq, a.dk,
                       a.dv);
  }, [&] { MKA_CUDA_CALL(cuda::attention_bwd(p, a)); });
}

void route_fuse_forward(const RouteFuseFwd& a) {
  const RouteProblem p = route_problem(a.k, a.v, a.route, a.k.shape[1], true, a.launch);
  check_grads_like(a.k_fused, "k_fused", a.k);
  check_grads_like(a.v_fused, "v_fused", a.v);
  check_state_outputs(p, a.k_state_out, a.v_state_out);
  on_device(p.device, "route_fuse", [&] { cpu::route_fuse_fwd(p, a); },
            [&] { MKA_CUDA_CALL(cuda::route_fuse_fwd(p, a)); });
}

void route_fuse_backward(const RouteFuseBwd& a) {
  const RouteProblem p = route_problem(a.k, a.v, a.route, a.k.shape[1], true, a.launch);
  check_grads_like(a.dk_fused, "dk_fused", a.k);
  check_grads_like(a.dv_fused, "dv_fused", a.v);
  check_state_outputs(p, a.dk_state_out, a.dv_state_out);
  check_grads_like(a.dk, "dk", a.k);
  check_grads_like(a.dv, "dv", a.v);
  check_route_grads(a.route, a.grads);
  on_device(p.device, "route_fuse backward", [&] {
    if (!a.accumulate) {
      zero_fill_cpu({&a.dk, &a.dv});
      zero_fill_cpu(a.grads);
    }
    cpu::route_fuse_bwd(p, a);
  }, [&] { MKA_CUDA_CALL(cuda::route_fuse_bwd(p, a)); });
}

void fastmka_forward(const FastmkaFwd& a) {
  const AttentionProblem ap = attention_problem(a.q, a.k, a.v, a.opts, a.launch);
  const RouteProblem rp = route_problem(a.k, a.v, a.route, ap.Tk, true, a.launch);
  check_attention_outputs(ap, a.out, a.lse);
  check_state_outputs(rp, a.k_state_out, a.v_state_out);
  check_saved(a.saved, a.k, a.v, true, rp.kernels.scan, "fastmka");
  on_device(ap.device, "fastmka", [&] { cpu::fastmka_fwd(ap, rp, a); },
            [&] { MKA_CUDA_CALL(cuda::fastmka_fwd(ap, rp, a)); });
}

void fastmka_backward(const FastmkaBwd& a) {
  const AttentionProblem ap = attention_problem(a.q, a.k, a.v, a.opts, a.launch);
  const RouteProblem rp = route_problem(a.k, a.v, a.route, ap.Tk, true, a.launch);
  check_saved(a.saved, a.k, a.v, true, rp.kernels.scan, "fastmka backward");
  check_attention_outputs(ap, a.out, a.lse);
  check_grads_like(a.dout, "dout", a.q);
  check_state_outputs(rp, a.dk_state_out, a.dv_state_out);
  check_grads_like(a.dq, "dq", a.q);
  check_grads_like(a.dk, "dk", a.k);
  check_grads_like(a.dv, "dv", a.v);
  check_route_grads(a.route, a.grads);
  on_device(ap.device, "fastmka backward", [&] {
    if (!a.accumulate) {
      zero_fill_cpu({&a.dq, &a.dk, &a.dv});
      zero_fill_cpu(a.grads);
    }
    cpu::fastmka_bwd(ap, rp, a);
  }, [&] { MKA_CUDA_CALL(cuda::fastmka_bwd(ap, rp, a)); });
}

void mka_forward(const MkaFwd& a) {
  const AttentionProblem ap = attention_problem(a.q, a.k, a.v, a.opts, a.launch);
  const RouteProblem rp = route_problem(a.k, a.v, a.route, ap.Tq, false, a.launch);
  check_saved(a.saved, a.k, a.v, false, rp.kernels.scan, "mka");
  check_memory(ap, a.q, a.mem_k, a.mem_v, rp.L);
  check_output(a.out, "out", {ap.B, ap.Tq, ap.H, ap.d}, ap.dtype, ap.device, ap.device_id);
  check_level_stats(ap, rp.L, a.o_levels, a.lse_levels);
  check_state_outputs(rp, a.k_state_out, a.v_state_out);
  on_device(ap.device, "mka", [&] { cpu::mka_fwd(ap, rp, a); },
            [&] { MKA_CUDA_CALL(cuda::mka_fwd(ap, rp, a)); });
}

void mka_backward(const MkaBwd& a) {
  const AttentionProblem ap = attention_problem(a.q, a.k, a.v, a.opts, a.launch);
  const RouteProblem rp = route_problem(a.k, a.v, a.route, ap.Tq, false, a.launch);
  check_saved(a.saved, a.k, a.v, false, rp.kernels.scan, "mka backward");
  check_memory(ap, a.q, a.mem_k, a.mem_v, rp.L);
  check_level_stats(ap, rp.L, a.o_levels, a.lse_levels);
  check_grads_like(a.dout, "dout", a.q);
  check_state_outputs(rp, a.dk_state_out, a.dv_state_out);
  check_grads_like(a.dq, "dq", a.q);
  check_grads_like(a.dk, "dk", a.k);
  check_grads_like(a.dv, "dv", a.v);
  check_grads_like(a.dmem_k, "dmem_k", a.mem_k);
  check_grads_like(a.dmem_v, "dmem_v", a.mem_v);
  check_route_grads(a.route, a.grads);
  on_device(ap.device, "mka backward", [&] {
    if (!a.accumulate) {
      zero_fill_cpu({&a.dq, &a.dk, &a.dv, &a.dmem_k, &a.dmem_v});
      zero_fill_cpu(a.grads);
    }
    cpu::mka_bwd(ap, rp, a);
  }, [&] { MKA_CUDA_CALL(cuda::mka_bwd(ap, rp, a)); });
}

bool built_with_cuda() {
#ifdef MKA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace mka
