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

// Local pass, forward: the chunk's end state from a zero start.
template <class T> __global__ void ema_local_fwd(ScanArgs a) {
  int64_t g, c;
  if (!scan_channel(a, g, c)) return;
  const int64_t b = blockIdx.z, ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = min(a.T, t0 + a.chunk);
  float s = 0.f;
  for (int64_t t = t0; t < t1; ++t) s = a.beta * s + (1.f - a.beta) * to_f(a.x.at<const T>(b, t, g)[c]);
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
  float s = *carry_at(a, a.carry, b, ch);
  for (int64_t t = t0; t < t1; ++t) {
    const float x = to_f(a.x.at<const T>(b, t, g)[c]);
    s = a.beta * s + (1.f - a.beta) * x;
    float w0, w1, w2;
    a.w.load(b, t, w0, w1, w2);
    float y = w0 * x + w1 * s;
    if (a.L == 3 && a.x3.data) y += w2 * to_f(a.x3.at<const T>(b, t, g)[c]);
    a.y.at<T>(b, t, g)[c] = from_f<T>(y);
  }
}

// Backward, forward-time pass: dlam[t] += (<x_t, dy_t>, <s_t, dy_t>, <x3_t, dy_t>) summed over
// channels (warp sums, then one atomic per warp and level).
template <class T, class TG> __global__ void ema_route_dlam(ScanArgs a) {
  int64_t g, c;
  const bool active = scan_channel(a, g, c);
  const int64_t b = blockIdx.z, ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = min(a.T, t0 + a.chunk);
  float s = active ? *carry_at(a, a.carry, b, ch) : 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    float p0 = 0.f, p1 = 0.f, p2 = 0.f;
    if (active) {
      const float x = to_f(a.x.at<const T>(b, t, g)[c]);
      const float dy = to_f(a.dy.at<const TG>(b, t, g)[c]);
      s = a.beta * s + (1.f - a.beta) * x;
      p0 = x * dy;
      p1 = s * dy;
      if (a.L == 3 && a.x3.data) p2 = to_f(a.x3.at<const T>(b, t, g)[c]) * dy;
    }
    p0 = warp_sum(p0);
    p1 = warp_sum(p1);
    if (a.L == 3) p2 = warp_sum(p2);
    if ((threadIdx.x & 31) == 0) {
      float* dl = a.dlam + (b * a.T + t) * a.L;
      atomicAdd(dl + 0, p0);
      atomicAdd(dl + 1, p1);
      if (a.L == 3) atomicAdd(dl + 2, p2);
    }
  }
}

// Local pass, backward: u at the chunk's first token from a zero carry at its end.
template <class TG> __global__ void ema_local_bwd(ScanArgs a) {
  int64_t g, c;
  if (!scan_channel(a, g, c)) return;
  const int64_t b = blockIdx.z, ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = min(a.T, t0 + a.chunk);
  float u = 0.f;
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const float w1 = a.w.l1.load(b, t, 1.f);
    u = w1 * to_f(a.dy.at<const TG>(b, t, g)[c]) + a.beta * u;
  }
  *carry_at(a, a.rcarry, b, ch) = u;
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
  float carry = *carry_at(a, a.rcarry, b, ch);
  for (int64_t t = t1 - 1; t >= t0; --t) {
    float w0, w1, w2;
    a.w.load(b, t, w0, w1, w2);
    const float dy = to_f(a.dy.at<const TG>(b, t, g)[c]);
    const float u = w1 * dy + carry;
    TX* dx = a.dx.at<TX>(b, t, g) + c;
    *dx = from_f<TX>(to_f(*dx) + w0 * dy + (1.f - a.beta) * u);
    carry = a.beta * u;
    if (a.L == 3 && a.dx3.data) {
      TX* dx3 = a.dx3.at<TX>(b, t, g) + c;
      *dx3 = from_f<TX>(to_f(*dx3) + w2 * dy);
    }
  }
}

}  // namespace mka::cuda
