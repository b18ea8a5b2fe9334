// Ops on the HBM tier's pages (SPEC §7.1): writing new keys/values into a layer's pages and
// attention of Tq >= 1 new query tokens per sequence against that sequence's pages (decode,
// chunked prefill, speculative verification). Inference only: no backward.
//
// Layout ("NHD", as flash-attn's flash_attn_with_kvcache and FlashInfer's paged caches):
// k_pages (P, S, G, dk), v_pages (P, S, G, dv) — P pages of S tokens; block_table (B, W)
// int32: entry [b, i] is the page holding tokens [i S, (i + 1) S) of sequence b.
#pragma once
#include <cstdint>

#include "mka/op_args.h"
#include "mka/problem.h"
#include "mka/tensor.h"

namespace mka {

// One layer's pages and the tables addressing them.
struct PagedKV {
  TensorRef k_pages, v_pages, block_table;

  template <class F> void fields(F&& f) {
    f("k_pages", k_pages), f("v_pages", v_pages), f("block_table", block_table);
  }
};

// MKA's level 2 over pages: the EMA state of k and v before each page's first token
// ((P, G, d), the statistics dtype), so a reader rebuilds EMA(k), EMA(v) of any token from
// its page's checkpoint without scanning the sequence. Absent: no level 2.
struct PagedEma {
  double beta = 0.0;
  TensorRef k_page_states, v_page_states;

  template <class F> void fields(F&& f) {
    f("beta", beta), f("k_page_states", k_page_states), f("v_page_states", v_page_states);
  }
};

// Writes k, v (B, T, G, dk / dv) at positions [cache_seqlens[b], cache_seqlens[b] + T) of
// each sequence. With ema: also the page checkpoints of the pages whose first token is
// written, from the running states k_state, v_state (B, G, d; absent = zeros) before the
// new tokens; k_state_out, v_state_out get the states after them.
struct PagedWrite {
  TensorRef k, v;
  PagedKV pages;
  TensorRef cache_seqlens;
  PagedEma ema;
  TensorRef k_state, v_state, k_state_out, v_state_out;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("k", k), f("v", v), pages.fields(f), f("cache_seqlens", cache_seqlens), ema.fields(f),
        f("k_state", k_state), f("v_state", v_state), f("k_state_out", k_state_out),
        f("v_state_out", v_state_out), launch.fields(f);
  }
};

// FastMKA's write (SPEC §7.1): route_fuse (§3.2) of the new tokens k, v (B, T, G, d) with
// route.lam (B, T, L) and route.k3, route.v3 (B, T, G, d) iff L == 3, its EMA carried from
// the running states route.k_state, route.v_state (B, G, d; statistics dtype, required), and
// the fused rows written where paged_write writes k, v. The states are then overwritten with
// the states after the new tokens (in place: what a cache keeps). No fused tensors in memory:
// a decode step's fusion, write and state update are one kernel.
struct PagedWriteFused {
  TensorRef k, v;
  PagedKV pages;
  TensorRef cache_seqlens;
  RouteInputs route;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("k", k), f("v", v), pages.fields(f), f("cache_seqlens", cache_seqlens), route.fields(f),
        launch.fields(f);
  }
};

// out (B, Tq, H, dv) = attention of q (B, Tq, H, dk) over the first seqlens[b] tokens of
// sequence b's pages (its new tokens included; bottom-right causal per sequence). With ema
// and lam (B, Tq, L >= 2): out = lam[..., 0] O1 + lam[..., 1] O2 — MKA's levels 1 and 2,
// O2 attending (without window) to the EMA keys/values rebuilt from the page checkpoints.
// lse (B, H, Tq; optional, plain attention only) gets the softmax logsumexp.
struct PagedAttentionFwd {
  TensorRef q;
  PagedKV pages;
  TensorRef seqlens;
  AttnOptions opts;
  PagedEma ema;
  TensorRef lam;
  TensorRef out, lse;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("q", q), pages.fields(f), f("seqlens", seqlens), opts.fields(f), ema.fields(f),
        f("lam", lam), f("out", out), f("lse", lse), launch.fields(f);
  }
};

// Shapes of a paged call, validated (memory/paged_ops.cpp).
struct PagedProblem {
  int64_t B = 0, T = 0, H = 0, G = 0, dk = 0, dv = 0;  // T: new tokens (write) or Tq
  int64_t P = 0, S = 0, W = 0;                          // pages, page size, table width
  bool causal = true;
  double scale = 1.0;
  int64_t window = -1;  // -1: none
  bool ema = false;
  double beta = 0.0;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int device_id = 0;

  int64_t group() const { return H / G; }
  // Query row i of a sequence with n keys sees keys [key_lo, key_hi) (SPEC §1, bottom-right).
  int64_t key_hi(int64_t i, int64_t n) const {
    return causal ? std::clamp<int64_t>(i + (n - T) + 1, 0, n) : n;
  }
  int64_t key_lo(int64_t i, int64_t n) const {
    return window > 0 ? std::clamp<int64_t>(i + (n - T) - window + 1, 0, n) : 0;
  }
};

void paged_write(const PagedWrite& a);
void paged_write_fused(const PagedWriteFused& a);
void paged_attention(const PagedAttentionFwd& a);

namespace cpu {
void paged_write(const PagedProblem& p, const PagedWrite& a);
void paged_write_fused(const PagedProblem& p, int64_t L, const PagedWriteFused& a);
void paged_attention(const PagedProblem& p, const PagedAttentionFwd& a);
}  // namespace cpu

// Defined in builds with CUDA (MKA_WITH_CUDA): cuda/memory/.
namespace cuda {
void paged_write(const PagedProblem& p, const PagedWrite& a);
void paged_write_fused(const PagedProblem& p, int64_t L, const PagedWriteFused& a);
void paged_attention(const PagedProblem& p, const PagedAttentionFwd& a);
}  // namespace cuda

}  // namespace mka
