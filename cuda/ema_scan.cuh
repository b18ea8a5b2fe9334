// The EMA scan with routing (SPEC §2) on the GPU, for one memory (keys or values).
// Memory-bound and sequential in time, so time is cut into chunks scanned in parallel:
//   local pass: each (batch, chunk, channel) scans its chunk from a zero state;
//   carry pass: one thread per (batch, channel) walks the chunks, turning local end
//               states into each chunk's true start state (s_start' = beta^len s + local);
//   final pass: each chunk rescans from its true start and writes y (or dlam terms).
// The backward runs the same three passes in reverse time for u_t = l1_t dy_t + beta u_{t+1}.
#pragma once
#include "device_utils.cuh"

namespace mka::cuda {

// Routing weights of one token; without lam the scan outputs the EMA itself (0, 1, 0).
struct RouteWeights {
  TokenScalar l0, l1, l2;
  __device__ __forceinline__ void load(int64_t b, int64_t t, float& w0, float& w1, float& w2) const {
    w0 = l0.load(b, t, 0.f);
    w1 = l1.load(b, t, 1.f);
    w2 = l2.load(b, t, 0.f);
  }
};

struct ScanArgs {
  int64_t B = 0, T = 0, G = 0, d = 0, chunk = 0, n_chunks = 0;
  int L = 2;
  float beta = 0.f;
  RouteWeights w;
  Rows x, x3;               // inputs (x3 only with L == 3)
  StateView state_in;       // forward initial state (optional)
  float* carry = nullptr;   // (B, n_chunks, G*d): chunk end states, then chunk start states
  // forward
  Rows y;
  StateView state_out;
  // backward
  Rows dy, dx, dx3;
  StateView dstate_out, dstate_in;
  float* rcarry = nullptr;  // (B, n_chunks, G*d) for the reverse scan
  float* dlam = nullptr;    // (B, T, L) float32 accumulator, or nullptr

  __host__ __device__ int64_t channels() const { return G * d; }
};

constexpr int kScanThreads = 128;

// Channel index of this thread within (G, d); false past the end (the thread still joins
// warp reductions with zeros).
__device__ __forceinline__ bool scan_channel(const ScanArgs& a, int64_t& g, int64_t& c) {
  const int64_t gc = int64_t(blockIdx.x) * kScanThreads + threadIdx.x;
  g = gc / a.d;
  c = gc % a.d;
  return gc < a.channels();
}
__device__ __forceinline__ float* carry_at(const ScanArgs& a, float* base, int64_t b,
                                           int64_t chunk) {
  return base + (b * a.n_chunks + chunk) * a.channels() + int64_t(blockIdx.x) * kScanThreads +
         threadIdx.x;
}

// Tokens whose loads a thread issues before it scans them: the scan is a dependent chain,
// the loads are not, and eight in flight per thread keep HBM busy.
constexpr int kScanUnroll = 8;

// The inputs of tokens t..t+U-1 (zeros past t1) of this thread's channel.
template <class T> struct TokenGroup {
  float x[kScanUnroll], x3[kScanUnroll], w0[kScanUnroll], w1[kScanUnroll], w2[kScanUnroll];
  __device__ __forceinline__ void load(const ScanArgs& a, int64_t b, int64_t t, int64_t t1,
                                       int64_t g, int64_t c, bool weights, bool l3) {
#pragma unroll
    for (int u = 0; u < kScanUnroll; ++u) {
      const bool in = t + u < t1;
      x[u] = in ? to_f(a.x.at<const T>(b, t + u, g)[c]) : 0.f;
      x3[u] = in && l3 ? to_f(a.x3.at<const T>(b, t + u, g)[c]) : 0.f;
      if (weights) {
        if (in) a.w.load(b, t + u, w0[u], w1[u], w2[u]);
        else w0[u] = w1[u] = w2[u] = 0.f;
      }
    }
  }
};
template <class TG> __device__ __forceinline__ void load_grads(float (&dy)[kScanUnroll],
                                                               const ScanArgs& a, int64_t b,
                                                               int64_t t, int64_t t1, int64_t g,
                                                               int64_t c) {
#pragma unroll
  for (int u = 0; u < kScanUnroll; ++u)
    dy[u] = t + u < t1 ? to_f(a.dy.at<const TG>(b, t + u, g)[c]) : 0.f;
}

// Local pass, forward: the chunk's end state from a zero start.
template <class T> __global__ void ema_local_fwd(ScanArgs a) {
  int64_t g, c;
  if (!scan_channel(a, g, c)) return;
  const int64_t b = blockIdx.z, ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = min(a.T, t0 + a.chunk);
  float s = 0.f;
  for (int64_t t = t0; t < t1; t += kScanUnroll) {
    TokenGroup<T> in;
    in.load(a, b, t, t1, g, c, false, false);
#pragma unroll
    for (int u = 0; u < kScanUnroll; ++u)
      if (t + u < t1) s = a.beta * s + (1.f - a.beta) * in.x[u];
  }
  *carry_at(a, a.carry, b, ch) = s;
}

// Carry pass, forward: chunk end states -> chunk start states; writes the final state.
__global__ void ema_carry_fwd(ScanArgs a) {
  const int64_t gc = int64_t(blockIdx.x) * kScanThreads + threadIdx.x;
  if (gc >= a.channels()) return;
  const int64_t b = blockIdx.z, g = gc / a.d, c = gc % a.d;
  float s = a.state_in.data ? a.state_in.at(b, g)[c] : 0.f;
  for (int64_t ch = 0; ch < a.n_chunks; ++ch) {
    const int64_t len = min(a.chunk, a.T - ch * a.chunk);
    float* slot = a.carry + (b * a.n_chunks + ch) * a.channels() + gc;
    const float local_end = *slot;
    *slot = s;
    s = powf(a.beta, float(len)) * s + local_end;
  }
  if (a.state_out.data) a.state_out.at(b, g)[c] = s;
}

// Final pass, forward: y_t = l0 x_t + l1 s_t (+ l2 x3_t).
template <class T> __global__ void ema_route_out(ScanArgs a) {
  int64_t g, c;
  if (!scan_channel(a, g, c)) return;
  const int64_t b = blockIdx.z, ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = min(a.T, t0 + a.chunk);
  const bool l3 = a.L == 3 && a.x3.data;
  float s = *carry_at(a, a.carry, b, ch);
  for (int64_t t = t0; t < t1; t += kScanUnroll) {
    TokenGroup<T> in;
    in.load(a, b, t, t1, g, c, true, l3);
#pragma unroll
    for (int u = 0; u < kScanUnroll; ++u) {
      if (t + u >= t1) break;
      s = a.beta * s + (1.f - a.beta) * in.x[u];
      a.y.at<T>(b, t + u, g)[c] = from_f<T>(in.w0[u] * in.x[u] + in.w1[u] * s + in.w2[u] * in.x3[u]);
    }
  }
}

// Backward, forward-time pass: dlam[t] += (<x_t, dy_t>, <s_t, dy_t>, <x3_t, dy_t>) summed over
// channels (warp sums, then one atomic per warp and level).
template <class T, class TG> __global__ void ema_route_dlam(ScanArgs a) {
  int64_t g, c;
  const bool active = scan_channel(a, g, c);
  const int64_t b = blockIdx.z, ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = active ? min(a.T, t0 + a.chunk) : t0;
  const int64_t t_end = min(a.T, t0 + a.chunk);  // every lane runs the same token loop
  const bool l3 = a.L == 3 && a.x3.data;
  float s = active ? *carry_at(a, a.carry, b, ch) : 0.f;
  for (int64_t t = t0; t < t_end; t += kScanUnroll) {
    TokenGroup<T> in;
    in.load(a, b, t, t1, g, c, false, l3);
    float dy[kScanUnroll];
    load_grads<TG>(dy, a, b, t, t1, g, c);
#pragma unroll
    for (int u = 0; u < kScanUnroll; ++u) {
      if (t + u >= t_end) break;
      s = a.beta * s + (1.f - a.beta) * in.x[u];
      const float p0 = warp_sum(in.x[u] * dy[u]);
      const float p1 = warp_sum(s * dy[u]);
      const float p2 = a.L == 3 ? warp_sum(in.x3[u] * dy[u]) : 0.f;
      if ((threadIdx.x & 31) == 0) {
        float* dl = a.dlam + (b * a.T + t + u) * a.L;
        atomicAdd(dl + 0, p0);
        atomicAdd(dl + 1, p1);
        if (a.L == 3) atomicAdd(dl + 2, p2);
      }
    }
  }
}

// Local pass, backward: u at the chunk's first token from a zero carry at its end.
template <class T, class TG> __global__ void ema_local_bwd(ScanArgs a) {
  int64_t g, c;
  if (!scan_channel(a, g, c)) return;
  const int64_t b = blockIdx.z, ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = min(a.T, t0 + a.chunk);
  float u_acc = 0.f;
  // Groups from the chunk's end; within a group, tokens in reverse.
  for (int64_t te = t1; te > t0; te -= kScanUnroll) {
    const int64_t t = max(t0, te - kScanUnroll);
    float dy[kScanUnroll], w1[kScanUnroll];
    load_grads<TG>(dy, a, b, t, te, g, c);
#pragma unroll
    for (int u = 0; u < kScanUnroll; ++u) w1[u] = t + u < te ? a.w.l1.load(b, t + u, 1.f) : 0.f;
#pragma unroll
    for (int u = kScanUnroll - 1; u >= 0; --u)
      if (t + u < te) u_acc = w1[u] * dy[u] + a.beta * u_acc;
  }
  *carry_at(a, a.rcarry, b, ch) = u_acc;
}

// Carry pass, backward: each chunk's incoming carry c (= beta u of the next chunk's first
// token, or dstate_out for the last chunk); the carry left over is the initial state's grad.
__global__ void ema_carry_bwd(ScanArgs a) {
  const int64_t gc = int64_t(blockIdx.x) * kScanThreads + threadIdx.x;
  if (gc >= a.channels()) return;
  const int64_t b = blockIdx.z, g = gc / a.d, c = gc % a.d;
  float carry = a.dstate_out.data ? a.dstate_out.at(b, g)[c] : 0.f;
  for (int64_t ch = a.n_chunks - 1; ch >= 0; --ch) {
    const int64_t len = min(a.chunk, a.T - ch * a.chunk);
    float* slot = a.rcarry + (b * a.n_chunks + ch) * a.channels() + gc;
    const float u_local = *slot;
    *slot = carry;
    carry = a.beta * (u_local + powf(a.beta, float(len - 1)) * carry);
  }
  if (a.dstate_in.data) a.dstate_in.at(b, g)[c] += carry;
}

// Final pass, backward: dx_t += l0 dy_t + (1 - beta) u_t, dx3_t += l2 dy_t (dx, dx3 of type TX).
template <class T, class TG, class TX> __global__ void ema_route_dx(ScanArgs a) {
  int64_t g, c;
  if (!scan_channel(a, g, c)) return;
  const int64_t b = blockIdx.z, ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = min(a.T, t0 + a.chunk);
  const bool l3 = a.L == 3 && a.dx3.data;
  float carry = *carry_at(a, a.rcarry, b, ch);
  for (int64_t te = t1; te > t0; te -= kScanUnroll) {
    const int64_t t = max(t0, te - kScanUnroll);
    float dy[kScanUnroll], w0[kScanUnroll], w1[kScanUnroll], w2[kScanUnroll];
    load_grads<TG>(dy, a, b, t, te, g, c);
#pragma unroll
    for (int u = 0; u < kScanUnroll; ++u) {
      if (t + u < te) a.w.load(b, t + u, w0[u], w1[u], w2[u]);
      else w0[u] = w1[u] = w2[u] = 0.f;
    }
#pragma unroll
    for (int u = kScanUnroll - 1; u >= 0; --u) {
      if (t + u >= te) continue;
      const float uu = w1[u] * dy[u] + carry;
      TX* dx = a.dx.at<TX>(b, t + u, g) + c;
      *dx = from_f<TX>(to_f(*dx) + w0[u] * dy[u] + (1.f - a.beta) * uu);
      carry = a.beta * uu;
      if (l3) {
        TX* dx3 = a.dx3.at<TX>(b, t + u, g) + c;
        *dx3 = from_f<TX>(to_f(*dx3) + w2[u] * dy[u]);
      }
    }
  }
}

}  // namespace mka::cuda
