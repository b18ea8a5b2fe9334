// The parameters every attention kernel reads: shapes, mask, raw strided views.
#pragma once
#include "device_utils.cuh"
#include "mka/problem.h"

namespace mka::cuda {

// How a backward kernel hands over a key block's dK and dV in the inputs' dtype T (each key
// block belongs to one thread block, so neither needs atomics): added to the gradients (an
// accumulating backward), or stored (overwritten gradients, and fastmka's and mka's scratch:
// no zero fill, no float32 copy, memset or fold pass).
enum class KVGrad : int { add_io, store_io };

// The EMA scan backward's chunk sums (ema_scan.cuh's local pass), made instead by the
// Hopper attention backward from the dK, dV it still holds (fastmka's fused keys, mka's
// level 2): per chunk of `chunk` keys from t0, sum_t beta^(t - t0) l1_t dY_t in float32.
struct ScanSums {
  float* k = nullptr;  // (B, n_chunks, G*d) each; k == nullptr: not asked for
  float* v = nullptr;
  TokenScalar l1;      // level 2's routing weight per key; absent: 1
  float beta = 0.f;
  int chunk = 16;      // 8 or 16
  int64_t n_chunks = 0;
};

// The EMA scan's backward run through the Hopper attention backward's write-out, where no
// level 3 is asked for (fastmka's fused keys, mka's level 2): each key block turns the dK,
// dV it holds (the gradients dY of the scan's outputs) into the gradients of the scan's
// inputs before it writes them,
//   u_t = l1_t dY_t + beta u_{t+1},   dX_t = l0_t dY_t + (1 - beta) u_t,
// u entering the sequence's last key from dstate_out; block 0's beta u_0 is dstate_in; and,
// where dlam is asked for (L = 2), the routing weights' gradient
//   dlam_t += (<x_t, dY_t>, <s_t, dY_t>)   over both memories' channels,
// with x the scan's inputs, staged by the kernel behind its first tiles, and s their forward
// EMA, remade per half block from the forward's chunk start states. The
// blocks of a (batch, kv head) chain through a decoupled look-back (lookback.cuh): a block
// waits only on the blocks after it, which start after it, so it is used only where a
// sequence has no more key blocks than the GPU has SMs (attention_bwd_can_scan), and it
// assumes the kernel has the GPU to itself (kernels holding SMs beside it, as under MPS or
// a concurrent stream, could keep those blocks from starting).
struct ScanThrough {
  // [2: aggregates, end values][B][n_blocks][2: k, v][G*d] float32, starting kUnset;
  // nullptr: off.
  float* link = nullptr;
  int64_t n_blocks = 0;
  TokenScalar l0, l1;  // routing weights per key; absent: 0 and 1
  float beta = 0.f;
  StateView dstate_out[2], dstate_in[2];  // per memory (k, v); optional
  bool add_state = false;                 // dstate_in: add into it, or overwrite it
  float* dlam = nullptr;                  // (B, Tk, 2) float32 accumulator; nullptr: none
  Rows x[2];                              // with dlam: the inputs k, v
  const float* carry[2] = {};             // with dlam: their (B, n_chunks, G*d) start states
  int chunk = 16;                         // the start states' chunk: 8 or 16
  int64_t n_chunks = 0;
};

struct AttnParams {
  int64_t B = 0, Tq = 0, Tk = 0, H = 0, G = 0, d = 0, group = 1;
  bool causal = true;
  int64_t window = -1;  // -1: none
  float scale = 1.f;
  Rows q, k, v, out;
  bool out_f32 = false;  // out in float32 instead of T (mka's levels, kept for the backward)
  float* lse = nullptr;  // (B, H, Tq)
  // backward
  Rows dout, dq, dk, dv;   // dq: dense float32 accumulator; dk, dv: as kv_grad says
  KVGrad kv_grad = KVGrad::store_io;
  float* delta = nullptr;  // (B, H, Tq): rowsum(dout * out), unweighted
  TokenScalar w;           // per query row weight on dout (mka); absent: 1
  ScanSums sums;           // made where asked for (the tensor-core kernels only)
  ScanThrough scan;        // run where asked for (the wgmma kernel only)

  // Bottom-right alignment (SPEC §1): row i sees key j iff key_lo(i) <= j < key_hi(i).
  __host__ __device__ int64_t key_hi(int64_t i) const {
    return causal ? min(Tk, i + (Tk - Tq) + 1) : Tk;
  }
  __host__ __device__ int64_t key_lo(int64_t i) const {
    return window > 0 ? max(int64_t(0), i + (Tk - Tq) - window + 1) : 0;
  }
  // The query rows that see key j: query_lo(j) <= i < query_hi(j).
  __host__ __device__ int64_t query_lo(int64_t j) const {
    return causal ? max(int64_t(0), j - (Tk - Tq)) : 0;
  }
  __host__ __device__ int64_t query_hi(int64_t j) const {
    return window > 0 ? min(Tq, j - (Tk - Tq) + window) : Tq;
  }
  __host__ __device__ float* lse_at(int64_t b, int64_t h) const { return lse + (b * H + h) * Tq; }
  __host__ __device__ float* delta_at(int64_t b, int64_t h) const {
    return delta + (b * H + h) * Tq;
  }
};

inline AttnParams attn_params(const AttentionProblem& p) {
  AttnParams a;
  a.B = p.B, a.Tq = p.Tq, a.Tk = p.Tk, a.H = p.H, a.G = p.G, a.d = p.d, a.group = p.group();
  a.causal = p.causal;
  a.window = p.window;
  a.scale = float(p.scale);
  return a;
}

}  // namespace mka::cuda
