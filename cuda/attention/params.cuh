// The parameters every attention kernel reads: shapes, mask, raw strided views.
#pragma once
#include "common/device_utils.cuh"
#include "mka/problem.h"
#include "scan/params.cuh"

namespace mka::cuda {

// How a backward kernel hands over a key block's dK and dV in the inputs' dtype T (each key
// block belongs to one thread block, so neither needs atomics): added to the gradients (an
// accumulating backward), or stored (overwritten gradients, and fastmka's and mka's scratch:
// no zero fill, no float32 copy, memset or fold pass).
enum class KVGrad : int { add_io, store_io };

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
  bool zero_dq = false;    // the delta kernel also zeroes dq's rows (no memset launch)
  TokenScalar w;           // per query row weight on dout (mka); absent: 1
  ScanSums sums;           // made where asked for (the tensor-core kernels only)
  ScanThrough scan;        // run where asked for (the wgmma kernels only)
  DropoutMask dropout;     // of the attention weights (attention/dropout.cuh applies it)

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
  a.dropout = p.dropout;
  return a;
}

}  // namespace mka::cuda
