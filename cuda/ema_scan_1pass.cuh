// The single-pass EMA-route scan (the default; ema_scan.cuh has the 3-pass scan it replaces
// and the shared arguments). The 3-pass scan reads x twice forward and dy twice backward;
// here every block keeps its chunk on chip, so each is read from memory once. The chunk is
// staged in shared memory with cp.async (16-32 KB per block) rather than registers: that
// keeps 8 blocks' loads in flight per SM (registers held 3-4 blocks' worth, too few to
// cover the memory latency between a block's phases).
//
// One block per (chunk, memory, batch, channel block), two channels per thread. Block ids run
// in scan order (forward: first chunk first; backward: last chunk first) and the GPU starts
// blocks in id order, so every chunk a block waits on has started (CUB's single-pass scan
// relies on the same). A block scans its chunk from
// a zero state, publishes that aggregate, walks back over its predecessors' published values
// to the nearest true end state (decoupled look-back), publishes its own end state, then
// writes its outputs from the registers.
//
// Values are published without flags or fences: the buffers start as kUnset bytes, a NaN
// pattern that float arithmetic never makes (GPU NaN results are 0x7fffffff), and a reader
// takes a float once it differs. 32-bit stores are single-copy atomic, so each float a
// reader sees set is the published one.
#pragma once
#include <type_traits>

#include "ema_scan.cuh"

namespace mka::cuda {

constexpr int kPassChunk = 32;  // tokens per block (the scan's chunk)
constexpr int kLookback = 4;    // predecessors polled at once
constexpr unsigned kUnset = 0xffffffffu;

struct PassArgs {
  int64_t items = 0;           // work items per memory (chunk, batch, channel block)
  float* agg[2] = {};          // per memory (B, n_chunks, G*d): chunk aggregates, kUnset
  float* end[2] = {};          // per memory, the same shape: published end states, kUnset
  int64_t n_cb = 0;            // channel blocks
};

// --- two channels per thread, as stored --------------------------------------------------
template <class T> using Pair = std::conditional_t<sizeof(T) == 4, float2, uint32_t>;
template <class T> __device__ __forceinline__ Pair<T> load_pair(const T* p) {
  return *reinterpret_cast<const Pair<T>*>(p);
}
template <class T> __device__ __forceinline__ float2 unpack(Pair<T> r) {
  if constexpr (sizeof(T) == 4) {
    return r;
  } else {
    const T* e = reinterpret_cast<const T*>(&r);
    return make_float2(to_f(e[0]), to_f(e[1]));
  }
}
template <class T> __device__ __forceinline__ void store_pair(T* p, float2 v) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float2*>(p) = v;
  } else {
    Pair<T> r;
    T* e = reinterpret_cast<T*>(&r);
    e[0] = from_f<T>(v.x), e[1] = from_f<T>(v.y);
    *reinterpret_cast<Pair<T>*>(p) = r;
  }
}
__device__ __forceinline__ float2 axpby(float a, float2 x, float b, float2 y) {
  return make_float2(a * x.x + b * y.x, a * x.y + b * y.y);
}
__device__ __forceinline__ float dot(float2 x, float2 y) { return x.x * y.x + x.y * y.y; }
__device__ __forceinline__ float2 load_state(const StateView& v, int64_t b, int64_t g,
                                             int64_t c) {
  if (!v.data) return make_float2(0.f, 0.f);
  const float* p = v.at(b, g) + c;
  return make_float2(p[0], p[1]);
}
__device__ __forceinline__ void store_state(const StateView& v, int64_t b, int64_t g,
                                            int64_t c, float2 x, bool add) {
  float* p = v.at(b, g) + c;
  p[0] = add ? p[0] + x.x : x.x;
  p[1] = add ? p[1] + x.y : x.y;
}

// --- publishing and looking back ---------------------------------------------------------
__device__ __forceinline__ void publish(float* p, float2 v) {
  __stcg(reinterpret_cast<float2*>(p), v);  // to L2, where readers poll
}
__device__ __forceinline__ float2 peek(const float* p) {
  return __ldcv(reinterpret_cast<const float2*>(p));  // never a stale L1 copy
}
__device__ __forceinline__ bool is_set(float2 v) {
  return __float_as_uint(v.x) != kUnset && __float_as_uint(v.y) != kUnset;
}

// The state entering a chunk from its predecessors j = first, first + step, ... (step -1
// forward, +1 backward; all full chunks, so each one crossed decays by D): the sum of their
// aggregates, decayed, up to the nearest one whose end state is published, which ends it.
// The scan's first chunk publishes its end state without waiting, so the walk terminates.
template <class EndAt, class AggAt>
__device__ float2 look_back(int64_t first, int step, int64_t n_chunks, float D, EndAt end_at,
                            AggAt agg_at) {
  float2 acc = make_float2(0.f, 0.f);
  float mult = 1.f;
  for (int64_t j = first;;) {
    float2 e[kLookback], g[kLookback];
    #pragma unroll
    for (int k = 0; k < kLookback; ++k) {  // one round trip for the whole window
      const int64_t jk = j + k * step;
      const bool in = jk >= 0 && jk < n_chunks;
      e[k] = in ? peek(end_at(jk)) : make_float2(__uint_as_float(kUnset), 0.f);
      g[k] = in ? peek(agg_at(jk)) : make_float2(__uint_as_float(kUnset), 0.f);
    }
    int used = 0;
    #pragma unroll
    for (int k = 0; k < kLookback; ++k) {
      if (is_set(e[k])) return axpby(1.f, acc, mult, e[k]);
      if (!is_set(g[k])) break;
      acc = axpby(1.f, acc, mult, g[k]);
      mult *= D;
      ++used;
    }
    if (used == 0) __nanosleep(64);  // the next predecessor has not published yet
    j += used * step;
  }
}

// A work item's place in its memory: chunk, batch entry, this thread's first channel. Items
// are numbered in scan order (`reverse`: chunks last to first), channel blocks fastest.
struct PassBlock {
  int64_t ch, b, g, c, gc, t0, n;  // n: the chunk's tokens (the last may be short)
  int64_t cb;                       // channel block
  bool active;
};
__device__ __forceinline__ PassBlock pass_block(const ScanArgs& a, const PassArgs& pa,
                                                int64_t id, bool reverse) {
  const int64_t per_chunk = pa.n_cb * a.B;
  const int64_t cb = id % pa.n_cb;
  PassBlock p;
  p.ch = reverse ? a.n_chunks - 1 - id / per_chunk : id / per_chunk;
  p.t0 = p.ch * kPassChunk;
  p.n = min(int64_t(kPassChunk), a.T - p.t0);
  p.b = id % per_chunk / pa.n_cb;
  p.cb = cb;
  p.gc = (cb * kScanThreads + threadIdx.x) * 2;
  p.active = p.gc < a.channels();
  p.g = p.gc / a.d, p.c = p.gc % a.d;
  return p;
}

// The chunk's routing weights into shared memory (every thread calls it, after issuing its
// chunk's loads: the latencies overlap; it ends in a barrier). Read once per block instead
// of per thread and token: loads the compiler cannot move above the outputs' stores (they
// might alias) would cost a memory latency per token.
// Every row of a chunk has its coefficients: y = w0 x + w1 s (+ w2 x3), s = b s + c x with
// (b, c) = (beta, 1 - beta). Rows past a short last chunk (staged as zeros) get w = 0 and
// (b, c) = (1, 0): the state passes through them unchanged in either direction, so the
// loops need no per-row bounds (branches that cost more than the arithmetic).
struct RowCoefs {
  float4 r[kPassChunk];  // (w0, w1, b, c)
  float w2[kPassChunk];
};
// Fetched into registers by the first kPassChunk threads (one row each) an item ahead, so
// the latency hides behind the current item; put into shared memory before its barrier.
struct RowWeights {
  float l0 = 0.f, l1 = 0.f, l2 = 0.f;
};
__device__ __forceinline__ RowWeights fetch_weights(const ScanArgs& a, const PassBlock& p) {
  RowWeights w;
  const int i = threadIdx.x;
  if (i < kPassChunk && i < p.n) {
    w.l0 = a.w.l0.load(p.b, p.t0 + i, 0.f);
    w.l1 = a.w.l1.load(p.b, p.t0 + i, 1.f);
    w.l2 = a.w.l2.load(p.b, p.t0 + i, 0.f);
  }
  return w;
}
__device__ __forceinline__ void put_coefs(const ScanArgs& a, const PassBlock& p,
                                          const RowWeights& w, RowCoefs& k) {
  const int i = threadIdx.x;
  if (i >= kPassChunk) return;
  const bool in = i < p.n;
  k.r[i] = in ? make_float4(w.l0, w.l1, a.beta, 1.f - a.beta) : make_float4(0.f, 0.f, 1.f, 0.f);
  k.w2[i] = in ? w.l2 : 0.f;
}

// A chunk of one view staged in shared memory: [token][thread] channel pairs, the layout
// the scan reads (thread tid: its pair in every row). Rows move as 16-byte pieces: a thread
// copies the same piece column of every (kScanThreads / pieces)-th row, so its (g, c) is
// found once; rows past the chunk's end are zero-filled. A barrier separates copies from
// reads (threads read each other's copies).
template <class T> using Stage = Pair<T> (*)[kScanThreads];
template <class T> struct Pieces {
  static constexpr int kPerRow = kScanThreads * int(sizeof(Pair<T>)) / 16, kElems = 16 / sizeof(T);
  static constexpr int kRowStep = kScanThreads / kPerRow;
  int row0, col;      // this thread's first row and piece column
  int64_t g, c;       // the piece's first channel
  bool active;        // within the channels
  __device__ Pieces(const ScanArgs& a, int64_t cb) {
    row0 = threadIdx.x / kPerRow, col = threadIdx.x % kPerRow;
    const int64_t gc = cb * 2 * kScanThreads + int64_t(col) * kElems;
    active = gc < a.channels();
    g = gc / a.d, c = gc % a.d;
  }
  __device__ char* smem(Stage<T> st, int row) const {
    return reinterpret_cast<char*>(st[row]) + col * 16;
  }
};
template <class T>
__device__ __forceinline__ void stage_chunk(const Rows& x, const PassBlock& p,
                                            const Pieces<T>& pc, Stage<T> st) {
  if (!pc.active) return;
  const T* src = x.at<const T>(p.b, p.t0, pc.g) + pc.c;
  #pragma unroll
  for (int i = pc.row0; i < kPassChunk; i += Pieces<T>::kRowStep) {
    const auto dst = static_cast<unsigned>(__cvta_generic_to_shared(pc.smem(st, i)));
    const bool in = i < p.n;  // else no bytes read (from row 0's valid address), 16 zeros
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst),
                 "l"(src + (in ? i * x.st : 0)), "r"(in ? 16 : 0));
  }
}
__device__ __forceinline__ void stage_commit() { asm volatile("cp.async.commit_group;\n"); }
// Waits for the current item's copies (leaving the next item's, `ahead`, in flight).
__device__ __forceinline__ void stage_wait(bool ahead) {
  if (ahead) asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  else asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  __syncthreads();
}
// Rows of a staged chunk out to y (after a barrier: rows hold other threads' results).
template <class T>
__device__ __forceinline__ void unstage_chunk(const Rows& y, const PassBlock& p,
                                              const Pieces<T>& pc, Stage<T> st) {
  if (!pc.active) return;
  T* dst = y.at<T>(p.b, p.t0, pc.g) + pc.c;
  #pragma unroll
  for (int i = pc.row0; i < kPassChunk; i += Pieces<T>::kRowStep)
    if (i < p.n) *reinterpret_cast<uint4*>(dst + i * y.st) = *reinterpret_cast<const uint4*>(pc.smem(st, i));
}
// The dynamic shared memory of a kernel staging `views` chunks.
template <class T> constexpr size_t stage_bytes(int views) {
  return size_t(views) * kPassChunk * kScanThreads * sizeof(Pair<T>);
}
template <class T> __device__ __forceinline__ Stage<T> stage(int index) {
  extern __shared__ __align__(16) unsigned char pass_smem[];
  return reinterpret_cast<Stage<T>>(pass_smem) + index * kPassChunk;
}
// This thread's pair of row i: read, and overwritten with a result.
// (An opaque shared load: left to itself nvcc keeps every loaded row of a loop alive in
// registers for the next loop over the same rows, and the backward spilled.)
template <class T> __device__ __forceinline__ float2 get(Stage<T> st, int i) {
  const auto addr = static_cast<unsigned>(__cvta_generic_to_shared(&st[i][threadIdx.x]));
  Pair<T> r;
  if constexpr (sizeof(T) == 4) {
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(r.x), "=f"(r.y) : "r"(addr));
  } else {
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(r) : "r"(addr));
  }
  return unpack<T>(r);
}
template <class T> __device__ __forceinline__ void put(Stage<T> st, int i, float2 v) {
  store_pair(reinterpret_cast<T*>(&st[i][threadIdx.x]), v);
}

// v[i] of every lane -> lane i holds the warp's sum of v[i] in v[0]: 31 shuffles for 32
// sums (halving exchange) instead of 5 per sum. Lanes with bit W set keep v[W..2W) and send
// v[0..W) to their partner, the others the reverse. (Recursion, not a loop: nvcc does not
// unroll the inner loop of a nested one, and v would go to local memory.)
template <int W = kPassChunk / 2>
__device__ __forceinline__ void transpose_sum(float (&v)[kPassChunk], int lane) {
  static_assert(kPassChunk == 32, "one token per lane");
  const bool upper = lane & W;
  #pragma unroll
  for (int i = 0; i < W; ++i) {
    const float keep = upper ? v[i + W] : v[i], send = upper ? v[i] : v[i + W];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, W);
  }
  if constexpr (W > 1) transpose_sum<W / 2>(v, lane);
}

// --- the kernels: persistent blocks, one item ahead --------------------------------------
// A block takes items blockIdx.x, + gridDim.x, ... (the grid is what fits on the GPU at
// once, so every block runs and an item's predecessors are all taken), and stages the next
// item's chunk (double-buffered) while it scans the current one, so memory latency hides
// behind the scan and the look-back.

// Forward: y_t = l0 x_t + l1 s_t (+ l2 x3_t); the chunk start states into m.carry (chunk 0:
// state_in; chunk ch > 0: published by chunk ch - 1), the final state into state_out. With
// m.y absent only the start states are made (a backward without saved ones). y overwrites
// x in shared memory, then leaves in 16-byte pieces.
template <class T, bool kHas3> constexpr int kFwdViews = kHas3 ? 2 : 1;

template <class T, bool kHas3>
__device__ __forceinline__ void fwd_stage(const ScanArgs& a, const PassBlock& p,
                                          const ScanMemory& m, int buf) {
  const Pieces<T> pc(a, p.cb);
  constexpr int V = kFwdViews<T, kHas3>;
  stage_chunk<T>(m.x, p, pc, stage<T>(buf * V));
  if constexpr (kHas3) {
    if (m.y.data) stage_chunk<T>(m.x3, p, pc, stage<T>(buf * V + 1));
  }
}

template <class T, bool kHas3>
__device__ __forceinline__ void fwd_item(const ScanArgs& a, const PassBlock& p,
                                         const ScanMemory& m, float* agg, const RowCoefs& k,
                                         int buf) {
  constexpr int V = kFwdViews<T, kHas3>;
  const Stage<T> xs = stage<T>(buf * V), x3s = stage<T>(buf * V + 1);  // x3s: kHas3 only
  const auto slot = [&](int64_t j) { return (p.b * a.n_chunks + j) * a.channels() + p.gc; };
  float2 start = make_float2(0.f, 0.f);
  if (p.active) {
    float2 loc = make_float2(0.f, 0.f);
    #pragma unroll
    for (int i = 0; i < kPassChunk; ++i) loc = axpby(k.r[i].z, loc, k.r[i].w, get<T>(xs, i));
    const bool last = p.ch + 1 == a.n_chunks;
    if (p.ch == 0) {
      start = load_state(m.state_in, p.b, p.g, p.c);
      *reinterpret_cast<float2*>(m.carry + slot(0)) = start;
    } else {
      if (!last) publish(agg + slot(p.ch), loc);
      start = look_back(p.ch - 1, -1, a.n_chunks, powf(a.beta, float(kPassChunk)),
                        [&](int64_t j) { return m.carry + slot(j + 1); },
                        [&](int64_t j) { return agg + slot(j); });
    }
    const float2 end = axpby(powf(a.beta, float(p.n)), start, 1.f, loc);
    if (!last) publish(m.carry + slot(p.ch + 1), end);
    else if (m.state_out.data) store_state(m.state_out, p.b, p.g, p.c, end, false);
  }
  if (!m.y.data) return;
  if (p.active) {
    float2 s = start;
    #pragma unroll
    for (int i = 0; i < kPassChunk; ++i) {
      const float4 r = k.r[i];
      const float2 x = get<T>(xs, i);
      s = axpby(r.z, s, r.w, x);
      float2 y = axpby(r.x, x, r.y, s);
      if constexpr (kHas3) y = axpby(1.f, y, k.w2[i], get<T>(x3s, i));
      put<T>(xs, i, y);
    }
  }
  __syncthreads();
  unstage_chunk<T>(m.y, p, Pieces<T>(a, p.cb), xs);
}

// One block's items of one memory (blockIdx.y), the next one staged while the current one
// is scanned. Only the item number and the next row weights carry over: a carried PassBlock
// pushed the backward into spills.
template <class T, bool kHas3>
__device__ __forceinline__ void fwd_loop(const ScanArgs& a, const PassArgs& pa,
                                         const ScanMemory& m, float* agg) {
  __shared__ RowCoefs k;
  int64_t item = blockIdx.x;
  if (item >= pa.items) return;
  RowWeights w;
  {
    const PassBlock p = pass_block(a, pa, item, false);
    w = fetch_weights(a, p);
    fwd_stage<T, kHas3>(a, p, m, 0);
    stage_commit();
  }
  for (int it = 0; item < pa.items; ++it, item += gridDim.x) {
    const PassBlock p = pass_block(a, pa, item, false);
    put_coefs(a, p, w, k);
    const bool ahead = item + gridDim.x < pa.items;
    if (ahead) {
      const PassBlock pn = pass_block(a, pa, item + gridDim.x, false);
      fwd_stage<T, kHas3>(a, pn, m, (it + 1) & 1);
      stage_commit();
      w = fetch_weights(a, pn);
    }
    stage_wait(ahead);
    fwd_item<T, kHas3>(a, p, m, agg, k, it & 1);
    __syncthreads();  // this item's buffer and coefficients are free
  }
}
// Registers capped for the blocks shared memory allows (bf16, level 2: 6 forward, 3
// backward per SM). Each memory's loop reads its views straight from the kernel parameters
// (a selected copy, or a.m[blockIdx.y], would live on the stack).
template <class T, bool kHas3> __global__ void __launch_bounds__(kScanThreads, 6)
ema_route_fwd_1pass(ScanArgs a, PassArgs pa) {
  if (blockIdx.y == 0) fwd_loop<T, kHas3>(a, pa, a.m[0], pa.agg[0]);
  else fwd_loop<T, kHas3>(a, pa, a.m[1], pa.agg[1]);
}

// Backward, chunks last to first. For u_t = l1_t dy_t + beta u_{t+1} (u past the end:
// dstate_out / beta), the state carried into chunk ch from above is c_ch = beta u_{t1}; the
// chunk passes c_{ch-1} = beta A + beta^n c_ch down, A = sum_t beta^(t - t0) l1_t dy_t (its
// aggregate, beta A). Then dx_t (+)= l0 dy_t + (1 - beta) u_t, dx3_t (+)= l2 dy_t, and
// dstate_in (+)= c_{-1}. With dlam, first (<x, dy>, <s, dy>, <x3, dy>) per token, s from
// the chunk's start state in m.carry: per-thread partials, summed over the warp
// (transpose_sum), the block (shared atomics), then one global atomic per token and level.
// dx overwrites dy in shared memory, dx3 x3's slots; both leave in 16-byte pieces.
// Staged per item: dy; x for dlam, then the old dx where adding (at once without dlam);
// x3, then the old dx3, likewise.
template <class T, bool kHas3> constexpr int kBwdViews = kHas3 ? 3 : 2;

template <class T, bool kHas3>
__device__ __forceinline__ void bwd_stage(const ScanArgs& a, const PassBlock& p,
                                          const ScanMemory& m, int buf) {
  const Pieces<T> pc(a, p.cb);
  constexpr int V = kBwdViews<T, kHas3>;
  stage_chunk<T>(m.dy, p, pc, stage<T>(buf * V));
  if (a.dlam) {
    stage_chunk<T>(m.x, p, pc, stage<T>(buf * V + 1));
    if constexpr (kHas3) stage_chunk<T>(m.x3, p, pc, stage<T>(buf * V + 2));
  } else if (a.add) {
    stage_chunk<T>(m.dx, p, pc, stage<T>(buf * V + 1));
    if constexpr (kHas3) {
      if (m.dx3.data) stage_chunk<T>(m.dx3, p, pc, stage<T>(buf * V + 2));
    }
  }
}

template <class T, bool kHas3>
__device__ __forceinline__ void bwd_item(const ScanArgs& a, const PassBlock& p,
                                         const ScanMemory& m, float* agg, float* ends,
                                         const RowCoefs& k, float (&s_dlam)[kPassChunk][3],
                                         int buf) {
  constexpr int V = kBwdViews<T, kHas3>;
  const Stage<T> dys = stage<T>(buf * V), xs = stage<T>(buf * V + 1), x3s = stage<T>(buf * V + 2);
  const auto slot = [&](int64_t j) { return (p.b * a.n_chunks + j) * a.channels() + p.gc; };
  const bool dx3 = kHas3 && m.dx3.data;

  float2 A = make_float2(0.f, 0.f);
  float decay = 1.f;  // beta^(t - t0)
  if (p.active) {
    #pragma unroll
    for (int i = 0; i < kPassChunk; ++i) {
      A = axpby(1.f, A, decay * k.r[i].y, get<T>(dys, i));
      decay *= a.beta;
    }
  }
  if (a.dlam) {  // every thread joins the sums (inactive ones with zeros)
    // One level at a time, so one array of partials is alive (registers).
    const int lane = threadIdx.x & 31;
    const bool on = p.active;
    float2 s = on ? *reinterpret_cast<const float2*>(m.carry + slot(p.ch)) : make_float2(0.f, 0.f);
    float v[kPassChunk];
    #pragma unroll
    for (int i = 0; i < kPassChunk; ++i) v[i] = on ? dot(get<T>(xs, i), get<T>(dys, i)) : 0.f;
    transpose_sum(v, lane);
    const float sum0 = v[0];
    #pragma unroll
    for (int i = 0; i < kPassChunk; ++i) {
      s = axpby(k.r[i].z, s, k.r[i].w, get<T>(xs, i));
      v[i] = on ? dot(s, get<T>(dys, i)) : 0.f;
    }
    transpose_sum(v, lane);
    const float sum1 = v[0];
    float sum2 = 0.f;
    if constexpr (kHas3) {
      #pragma unroll
      for (int i = 0; i < kPassChunk; ++i)
        v[i] = on ? dot(get<T>(x3s, i), get<T>(dys, i)) : 0.f;
      transpose_sum(v, lane);
      sum2 = v[0];
    }
    if (threadIdx.x < kPassChunk * 3) s_dlam[threadIdx.x / 3][threadIdx.x % 3] = 0.f;
    __syncthreads();
    if (lane < p.n) {
      atomicAdd(&s_dlam[lane][0], sum0);
      atomicAdd(&s_dlam[lane][1], sum1);
      if constexpr (kHas3) atomicAdd(&s_dlam[lane][2], sum2);
    }
    __syncthreads();  // (also: x and x3 are read, their slots free)
    for (int i = threadIdx.x; i < p.n * a.L; i += kScanThreads)
      atomicAdd(a.dlam + (p.b * a.T + p.t0 + i / a.L) * a.L + i % a.L, s_dlam[i / a.L][i % a.L]);
    if (a.add) {  // (rare: route_fuse accumulating; waits for the next item's copies too)
      const Pieces<T> pc(a, p.cb);
      stage_chunk<T>(m.dx, p, pc, xs);
      if (dx3) stage_chunk<T>(m.dx3, p, pc, x3s);
      stage_commit();
      stage_wait(false);
    }
  }

  if (p.active) {
    float2 c_in;  // c_ch
    if (p.ch + 1 == a.n_chunks) {
      c_in = load_state(m.dstate_out, p.b, p.g, p.c);
    } else {
      if (p.ch > 0) publish(agg + slot(p.ch), make_float2(a.beta * A.x, a.beta * A.y));
      c_in = look_back(p.ch + 1, 1, a.n_chunks, powf(a.beta, float(kPassChunk)),
                       [&](int64_t j) { return ends + slot(j - 1); },
                       [&](int64_t j) { return agg + slot(j); });
    }
    const float2 c_out = axpby(a.beta, A, powf(a.beta, float(p.n)), c_in);
    if (p.ch > 0) publish(ends + slot(p.ch - 1), c_out);
    else if (m.dstate_in.data) store_state(m.dstate_in, p.b, p.g, p.c, c_out, a.add_state);

    float2 carry = c_in;
    #pragma unroll
    for (int i = kPassChunk - 1; i >= 0; --i) {
      const float4 r = k.r[i];
      const float2 dy = get<T>(dys, i);
      const float2 u = axpby(r.y, dy, 1.f, carry);
      float2 dx = axpby(r.x, dy, r.w, u);
      if (a.add) dx = axpby(1.f, dx, 1.f, get<T>(xs, i));
      put<T>(dys, i, dx);
      carry = make_float2(r.z * u.x, r.z * u.y);
      if (dx3) {
        float2 g3 = make_float2(k.w2[i] * dy.x, k.w2[i] * dy.y);
        if (a.add) g3 = axpby(1.f, g3, 1.f, get<T>(x3s, i));
        put<T>(x3s, i, g3);
      }
    }
  }
  __syncthreads();
  const Pieces<T> pc(a, p.cb);
  unstage_chunk<T>(m.dx, p, pc, dys);
  if (dx3) unstage_chunk<T>(m.dx3, p, pc, x3s);
}

template <class T, bool kHas3>
__device__ __forceinline__ void bwd_loop(const ScanArgs& a, const PassArgs& pa,
                                         const ScanMemory& m, float* agg, float* ends) {
  __shared__ RowCoefs k;
  __shared__ float s_dlam[kPassChunk][3];
  int64_t item = blockIdx.x;
  if (item >= pa.items) return;
  RowWeights w;
  {
    const PassBlock p = pass_block(a, pa, item, true);
    w = fetch_weights(a, p);
    bwd_stage<T, kHas3>(a, p, m, 0);
    stage_commit();
  }
  for (int it = 0; item < pa.items; ++it, item += gridDim.x) {
    const PassBlock p = pass_block(a, pa, item, true);
    put_coefs(a, p, w, k);
    const bool ahead = item + gridDim.x < pa.items;
    if (ahead) {
      const PassBlock pn = pass_block(a, pa, item + gridDim.x, true);
      bwd_stage<T, kHas3>(a, pn, m, (it + 1) & 1);
      stage_commit();
      w = fetch_weights(a, pn);
    }
    stage_wait(ahead);
    bwd_item<T, kHas3>(a, p, m, agg, ends, k, s_dlam, it & 1);
    __syncthreads();  // this item's buffer and coefficients are free
  }
}
template <class T, bool kHas3> __global__ void __launch_bounds__(kScanThreads, 3)
ema_route_bwd_1pass(ScanArgs a, PassArgs pa) {
  if (blockIdx.y == 0) bwd_loop<T, kHas3>(a, pa, a.m[0], pa.agg[0], pa.end[0]);
  else bwd_loop<T, kHas3>(a, pa, a.m[1], pa.agg[1], pa.end[1]);
}

}  // namespace mka::cuda
