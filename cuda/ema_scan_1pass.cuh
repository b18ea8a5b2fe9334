// The single-pass forward EMA-route scan (the default forward; ema_scan.cuh has the
// chunked 3-pass scan, which still serves every backward, and the shared arguments). The
// 3-pass forward reads x twice; here each block keeps its chunk on chip and reads it once.
//
// One block per (32-token chunk, memory, batch, channel block), two channels per thread; the
// start states it leaves for the backward may be finer (ScanArgs::chunk). Block ids run
// in chunk order and the GPU starts blocks in id order, so every chunk a block waits on has
// started (CUB's single-pass scan relies on the same). A block stages its chunk in shared
// memory (16-byte cp.async pieces), scans it from a zero state, publishes that aggregate,
// walks back over its predecessors' published values to the nearest true end state
// (decoupled look-back), publishes its own end state, writes y over x in shared memory and
// stores it in 16-byte pieces.
//
// Publishing and the look-back: lookback.cuh.
//
// Measured (bench/PERF_NOTES.md, session 5): the forward scan 165 -> 130 us at G = 16, 2k.
// Single-pass backwards built the same way (dy and x staged, dlam by a halving warp
// exchange, look-back in reverse) stayed slower than the 3-pass backward (281-338 us
// against 216): instruction-bound at the occupancy their staging allows.
#pragma once
#include <type_traits>

#include "ema_scan.cuh"
#include "lookback.cuh"

namespace mka::cuda {

constexpr int kPassChunk = 32;  // tokens per block (the scan's chunk)

struct PassArgs {
  float* agg[2] = {};          // per memory, (B, blocks per sequence, G*d): aggregates, kUnset
  int64_t n_cb = 0;            // channel blocks
  int64_t n_blocks = 0;        // blocks (chunks of kPassChunk) per sequence
};

// --- two channels per thread, as stored --------------------------------------------------
template <class T> using Pair = std::conditional_t<sizeof(T) == 4, float2, uint32_t>;
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
__device__ __forceinline__ float2 load_state(const StateView& v, int64_t b, int64_t g,
                                             int64_t c) {
  if (!v.data) return make_float2(0.f, 0.f);
  const float* p = v.at(b, g) + c;
  return make_float2(p[0], p[1]);
}
__device__ __forceinline__ void store_state(const StateView& v, int64_t b, int64_t g,
                                            int64_t c, float2 x) {
  float* p = v.at(b, g) + c;
  p[0] = x.x, p[1] = x.y;
}

// This block's place: chunk, memory, batch entry, this thread's first channel.
struct PassBlock {
  int64_t ch, b, g, c, gc, t0, n;  // n: the chunk's tokens (the last may be short)
  int mi;
  bool active;
};
__device__ __forceinline__ PassBlock pass_block(const ScanArgs& a, const PassArgs& pa) {
  const int64_t id = blockIdx.x, per_chunk = pa.n_cb * 2 * a.B;
  const int64_t z = id % per_chunk / pa.n_cb, cb = id % pa.n_cb;
  PassBlock p;
  p.ch = id / per_chunk;
  p.t0 = p.ch * kPassChunk;
  p.n = min(int64_t(kPassChunk), a.T - p.t0);
  p.mi = z < a.B ? 0 : 1;
  p.b = z % a.B;
  p.gc = (cb * kScanThreads + threadIdx.x) * 2;
  p.active = p.gc < a.channels();
  p.g = p.gc / a.d, p.c = p.gc % a.d;
  return p;
}

// Every row of a chunk has its coefficients: y = w0 x + w1 s (+ w2 x3), s = b s + c x with
// (b, c) = (beta, 1 - beta). Rows past a short last chunk (staged as zeros) get w = 0 and
// (b, c) = (1, 0): the state passes through them unchanged, so the loops need no per-row
// bounds (branches that cost more than the arithmetic). load_coefs reads the routing weights
// once per block into shared memory (every thread calls it, after issuing its chunk's
// copies, so the latencies overlap; it ends in a barrier): per thread and token they were
// loads the compiler could not move above the outputs' stores, a memory latency each.
struct RowCoefs {
  float4 r[kPassChunk];  // (w0, w1, b, c)
  float w2[kPassChunk];
};
__device__ __forceinline__ void load_coefs(const ScanArgs& a, const PassBlock& p, RowCoefs& k) {
  for (int i = threadIdx.x; i < kPassChunk; i += kScanThreads) {
    const int64_t t = p.t0 + i;
    const bool in = i < p.n;
    k.r[i] = in ? make_float4(a.w.l0.load(p.b, t, 0.f), a.w.l1.load(p.b, t, 1.f), a.beta,
                              1.f - a.beta)
                : make_float4(0.f, 0.f, 1.f, 0.f);
    k.w2[i] = in ? a.w.l2.load(p.b, t, 0.f) : 0.f;
  }
  __syncthreads();
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
__device__ __forceinline__ void stage_wait() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
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
    if (i < p.n)
      *reinterpret_cast<uint4*>(dst + i * y.st) = *reinterpret_cast<const uint4*>(pc.smem(st, i));
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
template <class T> __device__ __forceinline__ float2 get(Stage<T> st, int i) {
  return unpack<T>(st[i][threadIdx.x]);
}
template <class T> __device__ __forceinline__ void put(Stage<T> st, int i, float2 v) {
  store_pair(reinterpret_cast<T*>(&st[i][threadIdx.x]), v);
}

// Forward: y_t = l0 x_t + l1 s_t (+ l2 x3_t); the chunk start states into m.carry (chunk 0:
// state_in; chunk ch > 0: published by chunk ch - 1), the final state into state_out. y
// overwrites x in shared memory, then leaves in 16-byte pieces.
template <class T, bool kHas3>
__device__ __forceinline__ void fwd_1pass(const ScanArgs& a, const PassArgs& pa,
                                          const PassBlock& p, const ScanMemory& m, float* agg) {
  __shared__ RowCoefs k;
  const Pieces<T> pc(a, blockIdx.x % pa.n_cb);
  // Start states go out per a.chunk tokens (8, 16 or 32: the 3-pass backward's chunk),
  // `sub` per block; the look-back polls block boundaries only.
  const int sub = kPassChunk / int(a.chunk);
  const auto slot = [&](int64_t j) { return (p.b * a.n_chunks + j) * a.channels() + p.gc; };
  const auto agg_slot = [&](int64_t j) { return (p.b * pa.n_blocks + j) * a.channels() + p.gc; };

  const Stage<T> xs = stage<T>(0), x3s = stage<T>(1);  // x3s: kHas3 only
  stage_chunk<T>(m.x, p, pc, xs);
  if constexpr (kHas3) {
    stage_chunk<T>(m.x3, p, pc, x3s);
  }
  load_coefs(a, p, k);
  stage_wait();

  float2 start = make_float2(0.f, 0.f);
  if (p.active) {
    float2 loc = make_float2(0.f, 0.f);
    #pragma unroll
    for (int i = 0; i < kPassChunk; ++i) loc = axpby(k.r[i].z, loc, k.r[i].w, get<T>(xs, i));
    const bool last = p.t0 + kPassChunk >= a.T;  // the sequence's last block
    if (p.ch == 0) {
      start = load_state(m.state_in, p.b, p.g, p.c);
      *reinterpret_cast<float2*>(m.carry + slot(0)) = start;
    } else {
      if (!last) publish(agg + agg_slot(p.ch), loc);
      start = look_back<float2>(p.ch, powf(a.beta, float(kPassChunk)),
                        [&](int64_t j) { return m.carry + slot((j + 1) * sub); },
                        [&](int64_t j) { return agg + agg_slot(j); });
    }
    const float2 end = axpby(powf(a.beta, float(p.n)), start, 1.f, loc);
    if (!last) publish(m.carry + slot((p.ch + 1) * sub), end);
    else if (m.state_out.data) store_state(m.state_out, p.b, p.g, p.c, end);

    float2 s = start;
    float2 mid[kPassChunk / 8 - 1];  // the states at tokens 8, 16, 24 (kept in registers:
                                     // a global store in this loop serialized it, -20 %)
    #pragma unroll
    for (int i = 0; i < kPassChunk; ++i) {
      if (i > 0 && i % 8 == 0) mid[i / 8 - 1] = s;
      const float4 r = k.r[i];
      const float2 x = get<T>(xs, i);
      s = axpby(r.z, s, r.w, x);
      float2 y = axpby(r.x, x, r.y, s);
      if constexpr (kHas3) y = axpby(1.f, y, k.w2[i], get<T>(x3s, i));
      put<T>(xs, i, y);
    }
    #pragma unroll
    for (int q = 1; q < kPassChunk / 8; ++q) {  // the sub-chunk start states among them
      const int tok = q * 8;
      if ((tok & (int(a.chunk) - 1)) == 0 && tok < p.n)
        *reinterpret_cast<float2*>(m.carry + slot(p.ch * sub + tok / int(a.chunk))) = mid[q - 1];
    }
  }
  __syncthreads();
  unstage_chunk<T>(m.y, p, pc, xs);
}
// One body per memory, each reading its views straight from the kernel parameters (a
// selected copy, or a.m[p.mi], would live on the stack).
template <class T, bool kHas3> __global__ void __launch_bounds__(kScanThreads, 8)
ema_route_fwd_1pass(ScanArgs a, PassArgs pa) {
  const PassBlock p = pass_block(a, pa);
  if (p.mi == 0) fwd_1pass<T, kHas3>(a, pa, p, a.m[0], pa.agg[0]);
  else fwd_1pass<T, kHas3>(a, pa, p, a.m[1], pa.agg[1]);
}

}  // namespace mka::cuda
