// The ops' descriptors: one struct per op and direction holds every argument of a call, so
// adding an argument is one change here. Each struct lists its fields once, by the names
// the Python layer passes (`fields`, used by the binding to fill it from keyword arguments).
// Tensors are views (tensor.h); absent optional tensors have ndim == -1.
//
// Backward gradient outputs: with accumulate = true they are added into (they must arrive
// zero-filled to get the gradient alone); with accumulate = false every element is
// overwritten and they may arrive holding anything.
#pragma once
#include <cstdint>
#include <optional>

#include "mka/kernel_options.h"
#include "mka/tensor.h"

namespace mka {

// dropout_p > 0: attention dropout with the mask of `seed` (mka/dropout.h); 0: none.
struct AttnOptions {
  bool causal = true;
  std::optional<double> scale;
  std::optional<int64_t> window;
  double dropout_p = 0.0;
  std::optional<int64_t> seed;

  template <class F> void fields(F&& f) {
    f("causal", causal), f("scale", scale), f("window", window), f("dropout_p", dropout_p),
        f("seed", seed);
  }
};

// The routing inputs of route_fuse / fastmka (key side) and mka (query side).
struct RouteInputs {
  TensorRef lam;               // (B, T, L)
  double beta = 0.0;
  TensorRef k3, v3;            // route_fuse / fastmka: L3 vectors (B, Tk, G, d) iff L == 3
  TensorRef k_state, v_state;  // optional EMA states (B, G, d)

  template <class F> void fields(F&& f) {
    f("lam", lam), f("beta", beta), f("k3", k3), f("v3", v3), f("k_state", k_state),
        f("v_state", v_state);
  }
};

// Gradients of the routing inputs; absent entries are not computed.
struct RouteGrads {
  TensorRef dlam, dk3, dv3, dk_state, dv_state;

  template <class F> void fields(F&& f) {
    f("dlam", dlam), f("dk3", dk3), f("dv3", dv3), f("dk_state", dk_state),
        f("dv_state", dv_state);
  }
};

// Keys/values a forward derives from k/v and may keep for its backward, which then skips
// remaking them (each optional): fastmka's fused keys/values, mka's EMA keys/values (like k,
// v); `carry`: fastmka's EMA chunk start states on CUDA, an opaque float32 buffer of
// fastmka_carry_numel elements (none on the CPU).
struct SavedKeys {
  TensorRef k, v, carry;

  template <class F> void fields(F&& f) {
    f("saved_k", k), f("saved_v", v), f("saved_carry", carry);
  }
};

// Where and how a call runs: the stream (a cudaStream_t; null on the CPU) and the kernels.
struct Launch {
  void* stream = nullptr;
  KernelOptions kernels;

  template <class F> void fields(F&& f) {
    f("stream", stream), f("attention_kernel", kernels.attention), f("scan_kernel", kernels.scan),
        f("scan_through", kernels.scan_through), f("recall_kernel", kernels.recall);
  }
};

// --- attention ---------------------------------------------------------------------------
// q (B, Tq, H, d); k, v (B, Tk, G, d); out like q; lse (B, H, Tq) in the statistics dtype.

struct AttentionFwd {
  TensorRef q, k, v;
  AttnOptions opts;
  TensorRef out, lse;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("q", q), f("k", k), f("v", v), opts.fields(f), f("out", out), f("lse", lse),
        launch.fields(f);
  }
};

struct AttentionBwd {
  TensorRef q, k, v;
  AttnOptions opts;
  TensorRef out, lse, dout;
  TensorRef dq, dk, dv;
  bool accumulate = true;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("q", q), f("k", k), f("v", v), opts.fields(f), f("out", out), f("lse", lse),
        f("dout", dout), f("dq", dq), f("dk", dk), f("dv", dv), f("accumulate", accumulate),
        launch.fields(f);
  }
};

// --- route_fuse --------------------------------------------------------------------------

struct RouteFuseFwd {
  TensorRef k, v;
  RouteInputs route;
  TensorRef k_fused, v_fused, k_state_out, v_state_out;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("k", k), f("v", v), route.fields(f), f("k_fused", k_fused), f("v_fused", v_fused),
        f("k_state_out", k_state_out), f("v_state_out", v_state_out), launch.fields(f);
  }
};

// dk_state_out / dv_state_out: incoming gradients of the returned states (may be absent).
struct RouteFuseBwd {
  TensorRef k, v;
  RouteInputs route;
  TensorRef dk_fused, dv_fused, dk_state_out, dv_state_out;
  TensorRef dk, dv;
  RouteGrads grads;
  bool accumulate = true;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("k", k), f("v", v), route.fields(f), f("dk_fused", dk_fused), f("dv_fused", dv_fused),
        f("dk_state_out", dk_state_out), f("dv_state_out", dv_state_out), f("dk", dk),
        f("dv", dv), grads.fields(f), f("accumulate", accumulate), launch.fields(f);
  }
};

// --- fastmka: route fusion (key-side lam) and one attention --------------------------------
// saved (optional): the fused keys/values and the scan's carries, written by the forward,
// read by the backward.

struct FastmkaFwd {
  TensorRef q, k, v;
  RouteInputs route;
  AttnOptions opts;
  TensorRef out, lse, k_state_out, v_state_out;
  SavedKeys saved;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("q", q), f("k", k), f("v", v), route.fields(f), opts.fields(f), f("out", out),
        f("lse", lse), f("k_state_out", k_state_out), f("v_state_out", v_state_out),
        saved.fields(f), launch.fields(f);
  }
};

struct FastmkaBwd {
  TensorRef q, k, v;
  RouteInputs route;
  AttnOptions opts;
  TensorRef out, lse, dout, dk_state_out, dv_state_out;
  TensorRef dq, dk, dv;
  RouteGrads grads;
  SavedKeys saved;
  bool accumulate = true;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("q", q), f("k", k), f("v", v), route.fields(f), opts.fields(f), f("out", out),
        f("lse", lse), f("dout", dout), f("dk_state_out", dk_state_out),
        f("dv_state_out", dv_state_out), f("dq", dq), f("dk", dk), f("dv", dv),
        grads.fields(f), saved.fields(f), f("accumulate", accumulate), launch.fields(f);
  }
};

// --- mka: one attention per level, mixed by query-side lam ---------------------------------
// route.k3/v3 unused; memory tokens mem_k/mem_v (B, M, G, d) iff L == 3. o_levels
// (L, B, Tq, H, d) and lse_levels (L, B, H, Tq), both in the statistics dtype, keep each
// level for the backward; saved.k/v (optional) the EMA keys/values.

struct MkaFwd {
  TensorRef q, k, v;
  RouteInputs route;
  TensorRef mem_k, mem_v;
  AttnOptions opts;
  TensorRef out, o_levels, lse_levels, k_state_out, v_state_out;
  SavedKeys saved;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("q", q), f("k", k), f("v", v), route.fields(f), f("mem_k", mem_k), f("mem_v", mem_v),
        opts.fields(f), f("out", out), f("o_levels", o_levels), f("lse_levels", lse_levels),
        f("k_state_out", k_state_out), f("v_state_out", v_state_out), saved.fields(f),
        launch.fields(f);
  }
};

struct MkaBwd {
  TensorRef q, k, v;
  RouteInputs route;
  TensorRef mem_k, mem_v;
  AttnOptions opts;
  TensorRef o_levels, lse_levels, dout, dk_state_out, dv_state_out;
  TensorRef dq, dk, dv, dmem_k, dmem_v;
  RouteGrads grads;
  SavedKeys saved;
  bool accumulate = true;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("q", q), f("k", k), f("v", v), route.fields(f), f("mem_k", mem_k), f("mem_v", mem_v),
        opts.fields(f), f("o_levels", o_levels), f("lse_levels", lse_levels), f("dout", dout),
        f("dk_state_out", dk_state_out), f("dv_state_out", dv_state_out), f("dq", dq),
        f("dk", dk), f("dv", dv), f("dmem_k", dmem_k), f("dmem_v", dmem_v), grads.fields(f),
        saved.fields(f), f("accumulate", accumulate), launch.fields(f);
  }
};

}  // namespace mka
