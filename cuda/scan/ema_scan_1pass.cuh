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
// Single-pass backwards built the same way (dy and x staged, dlam by a halving warp
// exchange, look-back in reverse) are slower than the 3-pass backward: instruction-bound at
// the occupancy their staging allows (docs/kernels.md has the measurements).
#pragma once
#include <type_traits>

#include "scan/ema_scan.cuh"
#include "common/lookback.cuh"

namespace mka::cuda {

constexpr int kPassChunk = 32;  // tokens per block (the scan's chunk)

struct PassArgs {
  float* agg[2] = {};          // per memory, (B, blocks per sequence, G*d): aggregates, kUnset
  int64_t n_cb = 0;            // channel blocks
  int64_t n_blocks = 0;        // blocks (chunks of kPassChunk) per sequence
  FastDiv per_chunk, cb, d;    // by n_cb * 2 * B, n_cb and d: a block's place, a channel's head
  float decay = 0.f;           // beta^kPassChunk (a whole block)
  float c = 0.f, inv_c = 0.f;  // 1 - beta and its reciprocal (the sigma form below)
};

// --- two channels per thread, as stored --------------------------------------------------
template <class T> using Pair = std::conditional_t<sizeof(T) == 4, float2, uint32_t>;
template <class T> __device__ __forceinline__ float2 unpack(Pair<T> r) {
  if constexpr (sizeof(T) == 4) {
    return r;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // one integer op per channel
    return make_float2(__uint_as_float(r << 16), __uint_as_float(r & 0xffff0000u));
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
__device__ __forceinline__ float2 scale(float a, float2 x) { return make_float2(a * x.x, a * x.y); }

// This block's place: chunk, memory, batch entry, this thread's first channel. Block ids run
// chunk-major: id = (chunk * 2B + memory * B + batch) * n_cb + channel block.
struct PassBlock {
  int64_t ch, b, g, c, gc, t0;
  int n;  // the chunk's tokens (the last may be short)
  uint32_t cb;
  int mi;
  bool active;
};
__device__ __forceinline__ PassBlock pass_block(const ScanArgs& a, const PassArgs& pa) {
  const uint32_t id = blockIdx.x, ch = pa.per_chunk.div(id);
  const uint32_t rest = id - ch * pa.per_chunk.d, z = pa.cb.div(rest);
  PassBlock p;
  p.ch = ch;
  p.cb = rest - z * pa.cb.d;
  p.t0 = p.ch * kPassChunk;
  p.n = int(min(int64_t(kPassChunk), a.T - p.t0));
  p.mi = z < uint32_t(a.B) ? 0 : 1;
  p.b = z - uint32_t(p.mi * a.B);
  const uint32_t gc = (p.cb * kScanThreads + threadIdx.x) * 2, g = pa.d.div(gc);
  p.gc = gc;
  p.active = p.gc < a.channels();
  p.g = g, p.c = gc - g * pa.d.d;
  return p;
}

// The scan in sigma form: sigma_t = b sigma_{t-1} + x_t, s_t = (1 - beta) sigma_t, so the
// state's update is one FMA per channel and token (beta < 1 in float: the host's check).
// Every row of a chunk has its coefficients: y = w0 x + w1' sigma (+ w2 x3), w1' = (1 - beta)
// w1; e = beta^(n - 1 - row) weighs the row in the chunk's own share (from a zero state),
// one independent FMA per row. Rows past a short last chunk (staged as zeros) get w = e = 0
// and b = 1: the state passes through them unchanged, so the loops need no per-row bounds.
// Warp 0 reads the routing weights once per block (after the chunk's copies are issued, so
// the latencies overlap); the staging's barrier publishes them.
struct RowCoefs {
  float4 r[kPassChunk];  // (w0, w1', b, w2)
  float e[kPassChunk];
};
__device__ __forceinline__ void load_coefs(const ScanArgs& a, const PassArgs& pa,
                                           const PassBlock& p, RowCoefs& k) {
  static_assert(kPassChunk == 32, "warp 0 loads one row per lane");
  const int i = threadIdx.x;
  if (i >= kPassChunk) return;
  const int64_t t = p.t0 + i;
  const bool in = i < p.n;
  k.r[i] = in ? make_float4(a.w.l0.load(p.b, t, 0.f), pa.c * a.w.l1.load(p.b, t, 1.f), a.beta,
                            a.w.l2.load(p.b, t, 0.f))
              : make_float4(0.f, 0.f, 1.f, 0.f);
  k.e[i] = in ? powf(a.beta, float(p.n - 1 - i)) : 0.f;
}

// A chunk of one view staged in shared memory: [token][thread] channel pairs, the layout
// the scan reads (thread tid: its pair in every row). Rows move as 16-byte pieces: a thread
// copies the same piece column of every (kScanThreads / pieces)-th row, so its (g, c) is
// found once; rows past the chunk's end are zero-filled. A barrier separates copies from
// reads (threads read each other's copies).
template <class T> using Stage = Pair<T> (*)[kScanThreads];
template <class T> struct Pieces {
  static constexpr int kPerRow = kScanThreads * int(sizeof(Pair<T>)) / 16, kElems = 16 / sizeof(T);
  static constexpr int kRowStep = kScanThreads / kPerRow, kRows = kPassChunk / kRowStep;
  static constexpr unsigned kSmemStep = kRowStep * kScanThreads * sizeof(Pair<T>);
  int row0, col;      // this thread's first row and piece column
  int64_t g, c;       // the piece's first channel
  bool active;        // within the channels
  __device__ Pieces(const ScanArgs& a, const PassArgs& pa, uint32_t cb) {
    row0 = threadIdx.x / kPerRow, col = threadIdx.x % kPerRow;
    const uint32_t gc = cb * 2 * kScanThreads + uint32_t(col) * kElems, gi = pa.d.div(gc);
    active = gc < a.channels();
    g = gi, c = gc - gi * pa.d.d;
  }
  __device__ unsigned smem(Stage<T> st) const {  // this thread's piece of its first row
    return unsigned(__cvta_generic_to_shared(reinterpret_cast<char*>(st[row0]) + col * 16));
  }
};
// Full chunks (all but a sequence's last) take the copy loop without bounds.
template <class T>
__device__ __forceinline__ void stage_chunk(const Rows& x, const PassBlock& p,
                                            const Pieces<T>& pc, Stage<T> st) {
  if (!pc.active) return;
  using P = Pieces<T>;
  const T* first = x.at<const T>(p.b, p.t0, pc.g) + pc.c;  // row 0: valid in any chunk
  const T* src = first + pc.row0 * x.st;
  const int64_t step = P::kRowStep * x.st;
  const unsigned dst = pc.smem(st);
  if (p.n == kPassChunk) {
    #pragma unroll
    for (int r = 0; r < P::kRows; ++r, src += step)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst + r * P::kSmemStep),
                   "l"(src));
  } else {
    #pragma unroll
    for (int r = 0; r < P::kRows; ++r, src += step) {
      const bool in = pc.row0 + r * P::kRowStep < p.n;  // else 16 zeros, no bytes read
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst + r * P::kSmemStep),
                   "l"(in ? src : first), "r"(in ? 16 : 0));
    }
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
  using P = Pieces<T>;
  T* dst = y.at<T>(p.b, p.t0 + pc.row0, pc.g) + pc.c;
  const int64_t step = P::kRowStep * y.st;
  const char* src = reinterpret_cast<const char*>(st[pc.row0]) + pc.col * 16;
  const int rows = p.n == kPassChunk ? P::kRows : (p.n - pc.row0 + P::kRowStep - 1) / P::kRowStep;
  #pragma unroll
  for (int r = 0; r < P::kRows; ++r, dst += step)
    if (r < rows)
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src + r * P::kSmemStep);
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
                                          const PassBlock& p, const ScanOperand& m, float* agg) {
  __shared__ RowCoefs k;
  const Pieces<T> pc(a, pa, p.cb);
  // Start states go out per a.chunk tokens (8, 16 or 32: the 3-pass backward's chunk),
  // `sub` per block; the look-back polls block boundaries only.
  const int sub = kPassChunk >> (__ffs(int(a.chunk)) - 1);
  const auto slot = [&](int64_t j) { return (p.b * a.n_chunks + j) * a.channels() + p.gc; };
  const auto agg_slot = [&](int64_t j) { return (p.b * pa.n_blocks + j) * a.channels() + p.gc; };

  const Stage<T> xs = stage<T>(0), x3s = stage<T>(1);  // x3s: kHas3 only
  stage_chunk<T>(m.x, p, pc, xs);
  if constexpr (kHas3) {
    stage_chunk<T>(m.x3, p, pc, x3s);
  }
  load_coefs(a, pa, p, k);
  stage_wait();

  float2 start = make_float2(0.f, 0.f);
  if (p.active) {
    // The chunk's share from a zero state, sum_i e_i x_i, in two independent chains.
    float2 part[2] = {make_float2(0.f, 0.f), make_float2(0.f, 0.f)};
    #pragma unroll
    for (int i = 0; i < kPassChunk; i += 4) {
      const float4 e = *reinterpret_cast<const float4*>(&k.e[i]);
      const float ei[4] = {e.x, e.y, e.z, e.w};
      #pragma unroll
      for (int j = 0; j < 4; ++j) part[j % 2] = axpby(1.f, part[j % 2], ei[j], get<T>(xs, i + j));
    }
    const float2 loc = scale(pa.c, axpby(1.f, part[0], 1.f, part[1]));
    const bool last = p.t0 + kPassChunk >= a.T;  // the sequence's last block
    if (p.ch == 0) {
      start = load_state(m.state_in, p.b, p.g, p.c);
      *reinterpret_cast<float2*>(m.carry + slot(0)) = start;
    } else {
      if (!last) publish(agg + agg_slot(p.ch), loc);
      start = look_back<float2>(p.ch, pa.decay,
                        [&](int64_t j) { return m.carry + slot((j + 1) * sub); },
                        [&](int64_t j) { return agg + agg_slot(j); });
    }
    const float decay = p.n == kPassChunk ? pa.decay : powf(a.beta, float(p.n));
    const float2 end = axpby(decay, start, 1.f, loc);
    if (!last) publish(m.carry + slot((p.ch + 1) * sub), end);
    else if (m.state_out.data) store_state(m.state_out, p.b, p.g, p.c, end);

    float2 sg = scale(pa.inv_c, start);
    float2 mid[kPassChunk / 8 - 1];  // the states at tokens 8, 16, 24 (kept in registers:
                                     // a global store in this loop serialized it, -20 %)
    #pragma unroll
    for (int i = 0; i < kPassChunk; ++i) {
      if (i > 0 && i % 8 == 0) mid[i / 8 - 1] = sg;
      const float4 r = k.r[i];
      const float2 x = get<T>(xs, i);
      sg = axpby(r.z, sg, 1.f, x);
      float2 y = axpby(r.x, x, r.y, sg);
      if constexpr (kHas3) y = axpby(1.f, y, r.w, get<T>(x3s, i));
      put<T>(xs, i, y);
    }
    const int chunk_log2 = __ffs(int(a.chunk)) - 1;  // a.chunk: 8, 16 or 32
    #pragma unroll
    for (int q = 1; q < kPassChunk / 8; ++q) {  // the sub-chunk start states among them
      const int tok = q * 8;
      if ((tok & (int(a.chunk) - 1)) == 0 && tok < p.n)
        *reinterpret_cast<float2*>(m.carry + slot(p.ch * sub + (tok >> chunk_log2))) =
            scale(pa.c, mid[q - 1]);
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
