// The EMA-route scan's parameters shared with its callers: one operand (keys or values) of
// the scan, and the two ways an attention backward takes part in the scan's backward (the
// chunk sums it makes, or the whole backward run through its write-out).
#pragma once
#include "common/device_utils.cuh"
#include "mka/problem.h"

namespace mka::cuda {

// One operand (keys or values) of the EMA-route scan (ema_scan.cuh): its views in p.dtype;
// absent views are neither read nor written.
struct ScanOperand {
  Rows x, x3;               // inputs (x3 only with L == 3)
  StateView state_in;       // initial state (optional)
  // (B, n_chunks, G*d) float32, ema_carry_bytes: the EMA state at every chunk's start. The
  // forward writes it where given (else scratch); a backward of the same x takes it (dlam
  // needs it) instead of recomputing it.
  float* carry = nullptr;
  Rows y;                   // forward output
  StateView state_out;      // forward final state (optional)
  Rows dy, dx, dx3;         // backward: incoming gradient, gradients of x and x3
  StateView dstate_out, dstate_in;  // backward: the final state's gradient in, state_in's out
  float* rcarry = nullptr;  // backward scratch (set by ema_route_bwd)
};

inline ScanOperand scan_operand(Rows x, Rows x3, StateView state_in) {
  ScanOperand m;
  m.x = x, m.x3 = x3, m.state_in = state_in;
  return m;
}

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

}  // namespace mka::cuda
