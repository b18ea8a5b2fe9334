// The EMA scan with routing (SPEC §2) on the GPU, for one operand (keys or values).
// Memory-bound and sequential in time, so time is cut into chunks scanned in parallel:
//   local pass: each (batch, chunk, channel) scans its chunk from a zero state;
//   carry pass: one thread per (batch, channel) walks the chunks, turning local end
//               states into each chunk's true start state (s_start' = beta^len s + local);
//   final pass: each chunk rescans from its true start and writes y (or dlam terms).
// The backward runs the same three passes in reverse time for u_t = l1_t dy_t + beta u_{t+1};
// with lam, its local pass also makes dlam (which needs the forward EMA, in forward time).
// Where the attention backward that made dy also made the local pass's chunk sums (ScanSums:
// fastmka, mka's level 2), only the carry pass and a staged final pass remain, the latter
// making dlam too (ema_route_dx_staged).
#pragma once
#include "scan/params.cuh"
#include "mma/mma_tile.cuh"

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
  ScanOperand m[2];          // keys and values: one launch scans both (grid z: 2 * B)
  float* dlam = nullptr;    // (B, T, L) float32 accumulator, or nullptr
  bool add = true;          // dx, dx3: add into them, or overwrite them
  bool add_state = true;    // dstate_in: the same

  __host__ __device__ int64_t channels() const { return G * d; }
};

// This block's operand (a copy: indexing the parameter array would spill it to the stack)
// and batch entry.
__device__ __forceinline__ ScanOperand operand(const ScanArgs& a) {
  return blockIdx.z < a.B ? a.m[0] : a.m[1];
}
__device__ __forceinline__ int64_t batch(const ScanArgs& a) { return blockIdx.z % a.B; }

constexpr int kScanThreads = 128, kCarryBatch = 32;

// --- V consecutive channels per thread ------------------------------------------------
// The chunk passes are memory-bound: with V = 8 a thread moves 16 bytes per load
// (load_v/store_v, device_utils.cuh) and runs 8 independent recurrences. V = 1 serves head
// dims not a multiple of 8 and unaligned views.

// First channel (g, c) of this thread's V within (G, d); false past the end (the thread
// still joins warp reductions with zeros). d % V == 0, so the V channels share a head.
template <int V>
__device__ __forceinline__ bool scan_channel(const ScanArgs& a, int64_t& g, int64_t& c) {
  const int64_t gc = (int64_t(blockIdx.x) * kScanThreads + threadIdx.x) * V;
  g = gc / a.d;
  c = gc % a.d;
  return gc < a.channels();
}
// This thread's V carry slots of (batch b, chunk) in a (B, n_chunks, G*d) buffer.
template <int V>
__device__ __forceinline__ float* carry_at(const ScanArgs& a, float* base, int64_t b,
                                           int64_t chunk) {
  return base + (b * a.n_chunks + chunk) * a.channels() +
         (int64_t(blockIdx.x) * kScanThreads + threadIdx.x) * V;
}

// Local pass, forward: the chunk's end state from a zero start.
template <class T, int V> __global__ void ema_local_fwd(ScanArgs a) {
  int64_t g, c;
  if (!scan_channel<V>(a, g, c)) return;
  const ScanOperand m = operand(a);
  const int64_t b = batch(a), ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = min(a.T, t0 + a.chunk);
  float s[V] = {}, x[V];
  #pragma unroll 4
  for (int64_t t = t0; t < t1; ++t) {
    load_v<V>(m.x.at<const T>(b, t, g) + c, x);
    #pragma unroll
    for (int i = 0; i < V; ++i) s[i] = a.beta * s[i] + (1.f - a.beta) * x[i];
  }
  store_v<V>(carry_at<V>(a, m.carry, b, ch), s);
}

// Carry pass, forward: chunk end states -> chunk start states; writes the final state.
__global__ void ema_carry_fwd(ScanArgs a) {
  const int64_t gc = int64_t(blockIdx.x) * kScanThreads + threadIdx.x;
  if (gc >= a.channels()) return;
  const ScanOperand m = operand(a);
  const int64_t b = batch(a), g = gc / a.d, c = gc % a.d;
  float s = m.state_in.data ? m.state_in.at(b, g)[c] : 0.f;
  float* slots = m.carry + b * a.n_chunks * a.channels() + gc;
  const float decay = powf(a.beta, float(a.chunk));  // over a whole chunk; the last may be short
  const float last_decay = powf(a.beta, float(a.T - (a.n_chunks - 1) * a.chunk));
  // The walk is a chain of dependent steps over n_chunks; loading kCarryBatch local states
  // at once keeps that many loads in flight instead of one memory latency per chunk.
  for (int64_t ch0 = 0; ch0 < a.n_chunks; ch0 += kCarryBatch) {
    float local_end[kCarryBatch];
    #pragma unroll
    for (int j = 0; j < kCarryBatch; ++j)
      local_end[j] = ch0 + j < a.n_chunks ? slots[(ch0 + j) * a.channels()] : 0.f;
    #pragma unroll
    for (int j = 0; j < kCarryBatch; ++j) {
      const int64_t ch = ch0 + j;
      if (ch >= a.n_chunks) break;
      slots[ch * a.channels()] = s;
      s = (ch + 1 < a.n_chunks ? decay : last_decay) * s + local_end[j];
    }
  }
  if (m.state_out.data) m.state_out.at(b, g)[c] = s;
}

// Final pass, forward: y_t = l0 x_t + l1 s_t (+ l2 x3_t).
template <class T, int V> __global__ void ema_route_out(ScanArgs a) {
  int64_t g, c;
  if (!scan_channel<V>(a, g, c)) return;
  const ScanOperand m = operand(a);
  const int64_t b = batch(a), ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = min(a.T, t0 + a.chunk);
  float s[V], x[V], y[V], x3[V];
  load_v<V>(carry_at<V>(a, m.carry, b, ch), s);
  const bool has3 = a.L == 3 && m.x3.data;
  for (int64_t t = t0; t < t1; ++t) {
    load_v<V>(m.x.at<const T>(b, t, g) + c, x);
    if (has3) load_v<V>(m.x3.at<const T>(b, t, g) + c, x3);
    float w0, w1, w2;
    a.w.load(b, t, w0, w1, w2);
    #pragma unroll
    for (int i = 0; i < V; ++i) {
      s[i] = a.beta * s[i] + (1.f - a.beta) * x[i];
      y[i] = w0 * x[i] + w1 * s[i] + (has3 ? w2 * x3[i] : 0.f);
    }
    store_v<V>(m.y.at<T>(b, t, g) + c, y);
  }
}

// Backward, local pass with lam (forward time): dlam[t] += (<x_t, dy_t>, <s_t, dy_t>,
// <x3_t, dy_t>) summed over channels (warp sums, one atomic per warp and level), s from the
// chunk's true start state; and, as ema_local_bwd, u at the chunk's first token from a zero
// carry at its end, summed forward as sum_t beta^(t - t0) l1_t dy_t (one read of dy for both).
template <class T, int V> __global__ void ema_route_dlam(ScanArgs a) {
  int64_t g, c;
  const bool active = scan_channel<V>(a, g, c);
  const ScanOperand m = operand(a);
  const int64_t b = batch(a), ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = min(a.T, t0 + a.chunk);
  const bool has3 = a.L == 3 && m.x3.data;
  float s[V] = {}, u[V] = {}, x[V], dy[V], x3[V];
  float decay = 1.f;  // beta^(t - t0)
  if (active) load_v<V>(carry_at<V>(a, m.carry, b, ch), s);
  for (int64_t t = t0; t < t1; ++t) {
    float p0 = 0.f, p1 = 0.f, p2 = 0.f;
    if (active) {
      load_v<V>(m.x.at<const T>(b, t, g) + c, x);
      load_v<V>(m.dy.at<const T>(b, t, g) + c, dy);
      if (has3) load_v<V>(m.x3.at<const T>(b, t, g) + c, x3);
      const float w1 = decay * a.w.l1.load(b, t, 1.f);
      #pragma unroll
      for (int i = 0; i < V; ++i) {
        s[i] = a.beta * s[i] + (1.f - a.beta) * x[i];
        p0 += x[i] * dy[i];
        p1 += s[i] * dy[i];
        if (has3) p2 += x3[i] * dy[i];
        u[i] += w1 * dy[i];
      }
      decay *= a.beta;
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
  if (active) store_v<V>(carry_at<V>(a, m.rcarry, b, ch), u);
}

// Local pass, backward, without dlam: u at the chunk's first token from a zero carry at its
// end.
template <class T, int V> __global__ void ema_local_bwd(ScanArgs a) {
  int64_t g, c;
  if (!scan_channel<V>(a, g, c)) return;
  const ScanOperand m = operand(a);
  const int64_t b = batch(a), ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = min(a.T, t0 + a.chunk);
  float u[V] = {}, dy[V];
  #pragma unroll 4
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const float w1 = a.w.l1.load(b, t, 1.f);
    load_v<V>(m.dy.at<const T>(b, t, g) + c, dy);
    #pragma unroll
    for (int i = 0; i < V; ++i) u[i] = w1 * dy[i] + a.beta * u[i];
  }
  store_v<V>(carry_at<V>(a, m.rcarry, b, ch), u);
}

// Carry pass, backward: each chunk's incoming carry c (= beta u of the next chunk's first
// token, or dstate_out for the last chunk); the carry left over is the initial state's grad.
__global__ void ema_carry_bwd(ScanArgs a) {
  const int64_t gc = int64_t(blockIdx.x) * kScanThreads + threadIdx.x;
  if (gc >= a.channels()) return;
  const ScanOperand m = operand(a);
  const int64_t b = batch(a), g = gc / a.d, c = gc % a.d;
  float carry = m.dstate_out.data ? m.dstate_out.at(b, g)[c] : 0.f;
  float* slots = m.rcarry + b * a.n_chunks * a.channels() + gc;
  const float decay = powf(a.beta, float(a.chunk - 1));  // as forward, one step fewer
  const float last_decay = powf(a.beta, float(a.T - (a.n_chunks - 1) * a.chunk - 1));
  for (int64_t ch0 = a.n_chunks - 1; ch0 >= 0; ch0 -= kCarryBatch) {  // batched as forward
    float u_local[kCarryBatch];
    #pragma unroll
    for (int j = 0; j < kCarryBatch; ++j)
      u_local[j] = ch0 - j >= 0 ? slots[(ch0 - j) * a.channels()] : 0.f;
    #pragma unroll
    for (int j = 0; j < kCarryBatch; ++j) {
      const int64_t ch = ch0 - j;
      if (ch < 0) break;
      slots[ch * a.channels()] = carry;
      carry = a.beta * (u_local[j] + (ch + 1 < a.n_chunks ? decay : last_decay) * carry);
    }
  }
  if (m.dstate_in.data) {
    float* ds = m.dstate_in.at(b, g) + c;
    *ds = a.add_state ? *ds + carry : carry;
  }
}

// One token of the backward's final pass: dx_t = dx + l0 dy_t + (1 - beta) u_t with
// u_t = l1 dy_t + carry (dx: zeros, or the gradient added onto), dx3_t (+)= l2 dy_t (has3);
// then carry = beta u_t. The caller loads the token's weights and dx: here they would wait
// behind the previous token's stores (which may alias them).
template <class T, int V>
__device__ __forceinline__ void dx_token(const ScanArgs& a, const ScanOperand& m, int64_t b,
                                         int64_t t, int64_t g, int64_t c, bool has3,
                                         const float (&w)[3], const float (&dy)[V],
                                         float (&dx)[V], float (&carry)[V]) {
  #pragma unroll
  for (int i = 0; i < V; ++i) {
    const float u = w[1] * dy[i] + carry[i];
    dx[i] += w[0] * dy[i] + (1.f - a.beta) * u;
    carry[i] = a.beta * u;
  }
  store_v<V>(m.dx.at<T>(b, t, g) + c, dx);
  if (has3) {
    float dx3[V] = {};
    T* dx3p = m.dx3.at<T>(b, t, g) + c;
    if (a.add) load_v<V>(dx3p, dx3);
    #pragma unroll
    for (int i = 0; i < V; ++i) dx3[i] += w[2] * dy[i];
    store_v<V>(dx3p, dx3);
  }
}

// Final pass, backward: dx_token over the chunk in reverse time from its carry.
template <class T, int V> __global__ void ema_route_dx(ScanArgs a) {
  int64_t g, c;
  if (!scan_channel<V>(a, g, c)) return;
  const ScanOperand m = operand(a);
  const int64_t b = batch(a), ch = blockIdx.y;
  const int64_t t0 = ch * a.chunk, t1 = min(a.T, t0 + a.chunk);
  const bool has3 = a.L == 3 && m.dx3.data;
  float carry[V], dy[V];
  load_v<V>(carry_at<V>(a, m.rcarry, b, ch), carry);
  for (int64_t t = t1 - 1; t >= t0; --t) {
    float w[3], dx[V] = {};
    a.w.load(b, t, w[0], w[1], w[2]);
    load_v<V>(m.dy.at<const T>(b, t, g) + c, dy);
    if (a.add) load_v<V>(m.dx.at<const T>(b, t, g) + c, dx);
    dx_token<T, V>(a, m, b, t, g, c, has3, w, dy, dx, carry);
  }
}

// Adds one warp's per-token partial dlam terms p[level * C + r] (token t0 + r, r < n) into
// dlam: one reduce-scatter, then one atomic per lane that holds a sum.
template <int C, int LEVELS>
__device__ __forceinline__ void add_dlam_terms(const ScanArgs& a, int64_t b, int64_t t0, int n,
                                               int level0, float (&p)[LEVELS * C]) {
  constexpr int N = LEVELS * C, per = 32 / N;
  const float sum = warp_reduce_scatter<N>(p);
  const int lane = threadIdx.x & 31, i = lane / per, r = i % C;
  if (lane % per == 0 && r < n) atomicAdd(a.dlam + (b * a.T + t0 + r) * a.L + level0 + i / C, sum);
}

// The forward sweep of ema_route_dx_staged with dlam over one chunk's staged dy and x: the
// EMA s from the chunk's forward start state (loaded by the caller), and dlam's terms as
// ema_route_dlam makes them.
template <class T, int C, bool L3>
__device__ __forceinline__ void dlam_sweep(const ScanArgs& a, const ScanOperand& m, bool active,
                                           int64_t b, int64_t g, int64_t c, int64_t ch, int n,
                                           const uint4* dys, const uint4* xs, float (&s)[8]) {
  constexpr int V = 8;
  const int64_t t0 = ch * C;
  const bool has3 = L3 && m.x3.data;
  float p[2 * C], p3[L3 ? C : 1];
  #pragma unroll
  for (int r = 0; r < C; ++r) {
    p[r] = p[C + r] = p3[L3 ? r : 0] = 0.f;
    if (!active || r >= n) continue;
    const uint4 dr = dys[r * kScanThreads], xr = xs[r * kScanThreads];
    const T* dy = reinterpret_cast<const T*>(&dr);
    const T* x = reinterpret_cast<const T*>(&xr);
    float x3[V];
    if (has3) load_v<V>(m.x3.at<const T>(b, t0 + r, g) + c, x3);
    #pragma unroll
    for (int i = 0; i < V; ++i) {
      const float dyi = to_f(dy[i]), xi = to_f(x[i]);
      s[i] = a.beta * s[i] + (1.f - a.beta) * xi;
      p[r] += xi * dyi;
      p[C + r] += s[i] * dyi;
      if (has3) p3[L3 ? r : 0] += x3[i] * dyi;
    }
  }
  add_dlam_terms<C, 2>(a, b, t0, n, 0, p);
  if constexpr (L3) add_dlam_terms<C, 1>(a, b, t0, n, 2, p3);
}

// Final pass, backward, where the chunk sums came with dy (ScanSums: no local pass), per
// chunk of C tokens: each thread copies its 8 channels of dy (with dlam, of x; with add, of
// dx) for the chunk into shared memory at once (16-byte cp.async: every load in flight, no
// registers held) and the chunk's routing weights go to shared memory; with dlam it sweeps
// forward in time (dlam_sweep); then backward making dx as ema_route_dx. One read of dy (and
// x) and one write of dx, where the dlam pass and the dx pass read dy twice. L3: L == 3
// (level 3's terms take registers only then); dynamic shared memory: dx_staged_smem_bytes.
constexpr size_t dx_staged_smem_bytes(int C, bool dlam, bool add) {
  return size_t(1 + dlam + add) * C * kScanThreads * 16;
}

template <class T, int C, bool kDlam, bool L3>
__global__ void ema_route_dx_staged(ScanArgs a) {
  static_assert(sizeof(T) == 2 && C <= 16, "a 16-byte piece holds 8 channels");
  constexpr int V = 8;
  extern __shared__ uint4 staged[];  // [C][threads] of dy, then x (dlam), then dx (add)
  __shared__ float weights[C][3];
  uint4* const dys = staged + threadIdx.x;
  uint4* const xs = dys + C * kScanThreads;
  uint4* const dxs = dys + (kDlam ? 2 : 1) * C * kScanThreads;
  int64_t g, c;
  const bool active = scan_channel<V>(a, g, c);
  const ScanOperand m = operand(a);
  const int64_t b = batch(a), ch = blockIdx.y, t0 = ch * C;
  const int n = int(min(int64_t(C), a.T - t0));
  float carry[V], s[V] = {};
  if (active) {
    #pragma unroll
    for (int r = 0; r < C; ++r) {  // rows past T: zero-filled, never read
      const int64_t t = min(t0 + r, a.T - 1);
      mma::cp_async16(dys + r * kScanThreads, m.dy.at<const T>(b, t, g) + c, r < n);
      if (kDlam) mma::cp_async16(xs + r * kScanThreads, m.x.at<const T>(b, t, g) + c, r < n);
      if (a.add) mma::cp_async16(dxs + r * kScanThreads, m.dx.at<const T>(b, t, g) + c, r < n);
    }
    mma::cp_async_commit();
    load_v<V>(carry_at<V>(a, m.rcarry, b, ch), carry);  // in flight with the copies
    if (kDlam) load_v<V>(carry_at<V>(a, m.carry, b, ch), s);
  }
  if (threadIdx.x < n) {
    float* w = weights[threadIdx.x];
    a.w.load(b, t0 + threadIdx.x, w[0], w[1], w[2]);
  }
  mma::cp_async_wait<0>();
  __syncthreads();  // the weights (each thread reads only its own copies)
  if constexpr (kDlam) dlam_sweep<T, C, L3>(a, m, active, b, g, c, ch, n, dys, xs, s);
  if (!active) return;
  const bool has_dx3 = L3 && m.dx3.data;
  #pragma unroll
  for (int r = C - 1; r >= 0; --r) {
    if (r >= n) continue;
    float dy[V], dx[V] = {}, w[3] = {weights[r][0], weights[r][1], weights[r][2]};
    load_v<V>(reinterpret_cast<const T*>(dys + r * kScanThreads), dy);
    if (a.add) load_v<V>(reinterpret_cast<const T*>(dxs + r * kScanThreads), dx);
    dx_token<T, V>(a, m, b, t0 + r, g, c, has_dx3, w, dy, dx, carry);
  }
}

}  // namespace mka::cuda
