// Problem descriptors for the four ops of SPEC §3 and the single validation routine
// every backend (CPU, CUDA) runs before touching memory.
#pragma once
#include <algorithm>
#include <initializer_list>
#include <optional>

#include "mka/dropout.h"
#include "mka/error.h"
#include "mka/kernel_options.h"
#include "mka/op_args.h"
#include "mka/tensor.h"

namespace mka {

// Shapes shared by all ops: q (B,Tq,H,d); k, v (B,Tk,G,d).
struct AttentionProblem {
  int64_t B = 0, Tq = 0, Tk = 0, H = 0, G = 0, d = 0;
  bool causal = true;
  double scale = 1.0;
  int64_t window = -1;  // -1: no window
  DropoutMask dropout;  // of the attention weights; inactive at p = 0
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int device_id = 0;
  KernelOptions kernels;  // the call's (Launch::kernels); the CPU kernels ignore it

  int64_t group() const { return H / G; }
  // Bottom-right alignment: query row i sees key j iff lo(i) <= j < hi(i).
  int64_t key_hi(int64_t i) const { return causal ? std::min(Tk, i + (Tk - Tq) + 1) : Tk; }
  int64_t key_lo(int64_t i) const {
    return window > 0 ? std::max<int64_t>(0, i + (Tk - Tq) - window + 1) : 0;
  }
};

// EMA + routing over key/value sequences (B,T,G,d), lam (B,T,L).
struct RouteProblem {
  int64_t B = 0, T = 0, G = 0, d = 0, L = 2;
  double beta = 0.0;
  bool has_state = false;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int device_id = 0;
  int64_t chunk = 0;  // tokens per chunk of the GPU's EMA scan; 0: ema_scan_chunk's
  KernelOptions kernels;  // the call's (Launch::kernels); the CPU kernels ignore it
};

// mka's attention problem of memory level l (0-based) over M memory tokens: level 2 (the
// EMA) has no window, level 3 (recalled memory) is not causal. Shared by CPU and CUDA.
AttentionProblem level_problem(const AttentionProblem& ap, int l, int64_t M);

// The largest |scale| of inputs below float64: their kernels compute in float32, the GPU ones
// with scale * log2(e), which must stay finite.
inline constexpr double kMaxFloatScale = 3.4028234663852886e38 / 1.4426950408889634;

// The dtype of EMA states and softmax statistics for a given input dtype:
// float32, or float64 when the inputs are float64.
DType stats_dtype(DType input);

// Tokens per chunk of the GPU's EMA scan over B sequences of T tokens and `channels`
// channels. The 3-pass scan's passes run B * (T / chunk) * channels / 8 threads and its
// carry pass walks T / chunk chunks one after another, so the 64-token chunk is halved while
// that leaves fewer than 2^17 threads (an eighth of what an H100 keeps in flight), as long
// as the walk stays within 256 chunks and chunks keep 8 tokens. The single-pass forward
// scans 32-token chunks and leaves start states per `chunk` for the 3-pass backward, so with
// it the chunk is at most 32. A forward and its backward must use the same `scan` (the
// backward reads the forward's chunk start states).
inline int64_t ema_scan_chunk(int64_t B, int64_t T, int64_t channels, ScanKernel scan) {
  const auto chunks = [T](int64_t c) { return (T + c - 1) / c; };
  int64_t chunk = 64;
  while (chunk > 8 && B * chunks(chunk) * channels / 8 < (int64_t(1) << 17) &&
         chunks(chunk / 2) <= 256)
    chunk /= 2;
  return scan == ScanKernel::three_pass ? chunk : std::min<int64_t>(chunk, 32);
}
// The chunk of a scan whose backward's chunk sums the attention backward makes (fastmka's
// fusion, mka's level 2): a Hopper attention-backward warp holds 16 key rows, one 16-token
// chunk or two 8-token ones.
inline int64_t ema_attn_chunk(int64_t B, int64_t T, int64_t channels, ScanKernel scan) {
  return std::min<int64_t>(ema_scan_chunk(B, T, channels, scan), 16);
}
// Floats of SavedKeys::carry for fastmka on `device` (k, v (B, Tk, G, d)): the chunk start
// states of both scans on CUDA, none on the CPU.
inline int64_t fastmka_carry_numel(int64_t B, int64_t Tk, int64_t G, int64_t d, Device device,
                                   ScanKernel scan) {
  if (device == Device::cpu) return 0;
  const int64_t chunk = ema_attn_chunk(B, Tk, G * d, scan);
  return 2 * B * ((Tk + chunk - 1) / chunk) * G * d;
}

// --- validation: shared by every backend ---------------------------------------------

AttentionProblem check_attention(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                                 const AttnOptions& o);

// EMA inputs of route_fuse / fastmka / mka over k, v (B,T,G,d). `lam_tokens` is the number of
// tokens lam must cover (Tk for key-side routing, Tq for mka's query side); `with_l3`
// says whether k3/v3 belong to this op (route_fuse, fastmka) or must be absent (mka).
RouteProblem check_route(const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                         int64_t lam_tokens, const char* lam_shape, bool with_l3);

// mka's memory tokens (B, M, G, d), required iff L == 3.
void check_memory(const AttentionProblem& p, const TensorRef& q, const TensorRef& mem_k,
                  const TensorRef& mem_v, int64_t L);

// Outputs are allocated by the caller; their shapes are checked too.
void check_output(const TensorRef& t, const char* name, std::initializer_list<int64_t> shape,
                  DType dtype, Device device, int device_id = 0);

}  // namespace mka
