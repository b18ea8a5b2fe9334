// Recall attention on the GPU (SPEC §7.2): each query row attends to the chunks chosen for it,
// read in place from k and v (no gathered copy).
//
// Tensor cores (16-bit inputs, d = 64 or 128; KernelOptions::recall picks the path):
//   chunk-major (default; recall_chunks.cuh): an inverse index of the chosen entries — one
//     64-bit key per valid entry, (((b G + g) nC + c) Tq + t) R + r, radix-sorted (CUB), and
//     the start of each chunk's run — then a forward that reads each chunk's K and V once per
//     kv head and writes a partial per (row, head, entry), and a combine per row;
//   row-major (recall_mma.cuh): a block per row block (recall_params.cuh) streams the merged
//     chunks of its rows.
// Else CUDA cores: a block per (b, row, kv head).
// Backward, deterministic (no floating-point atomics):
//   1. delta = rowsum(dO o O) per (b, h, t) into scratch;
//   2. the inverse index (sorted again: the forward's is scratch it does not keep);
//   3. a block per (b, g, chunk tile) walks its chunk's run in a fixed order and sums dK, dV,
//      writing each key once (zeros where no row chose it; the keys past the last whole chunk
//      are zeroed by a small kernel); chunk-major, the same block writes each pair's dQ over
//      its keys as a partial, summed per row in a fixed order by a small kernel;
//      row-major, dq per row as the forward (P recomputed from the saved lse).
// chosen lives on the device and is never read by the host (that would synchronise every
// call): a row with an invalid entry (neither -1 nor a chunk below Tk / C) never reads
// outside k and v and gets NaN output, lse and dq; the entry adds nothing to dk, dv.
#include <algorithm>
#include <cmath>
#include <cub/device/device_radix_sort.cuh>
#include <mutex>

#include "memory/recall_chunks.cuh"
#include "memory/recall_mma.cuh"
#include "mka/environment.h"
#include "mka/memory/recall_ops.h"

namespace mka::cuda {
namespace {

using namespace recall;

// --- CUDA cores: any dtype, d <= D (64, 128, 256), any strides -------------------------
constexpr int kSimtKeys = 32;  // keys per tile (one per lane in the softmax)

template <int D> struct SimtFwdSmem {
  static constexpr int kLd = D + 1;  // padded rows: lanes reading different keys miss banks
  static size_t bytes(int grp) {
    return (size_t(2) * grp * D + 2 * kSimtKeys * kLd + size_t(grp) * kSimtKeys + 3 * grp) * 4;
  }
};

// Rows [j0, j0 + n) of kv head g of x into a float tile (zeros past n and d).
template <class T, int D>
__device__ __forceinline__ void simt_rows(float* dst, const Rows& x, int64_t b, int64_t j0,
                                          int n, int64_t g, int d, int rows) {
  constexpr int kLd = D + 1;
  for (int e = threadIdx.x; e < rows * D; e += kThreads) {
    const int r = e / D, c = e % D;
    dst[r * kLd + c] = r < n && c < d ? to_f(x.at<const T>(b, j0 + r, g)[c]) : 0.f;
  }
}

__device__ __forceinline__ float dot_ld(const float* x, const float* y, int d) {
  float acc = 0.f;
  for (int c = 0; c < d; ++c) acc = fmaf(x[c], y[c], acc);
  return acc;
}

// The chunk of entry r of (b, t, g), -1 for none; sets bad for an invalid entry.
__device__ __forceinline__ int64_t valid_chunk(const Args& a, int64_t b, int64_t t, int64_t g,
                                               int64_t r, bool& bad) {
  const int32_t x = a.chosen_at(b, t, g, r);
  if (x >= 0 && x < a.nC) return x;
  bad = bad || x != -1;
  return -1;
}

// body(n) for each tile of kSimtKeys keys of the chunks chosen by (b, t, g), its n keys' K and
// V rows in sK, sV (every thread; a barrier before each tile's loads and after them). Returns
// whether (b, t, g) has an invalid entry.
template <class T, int D, class Body>
__device__ __forceinline__ bool simt_key_tiles(const Args& a, int64_t b, int64_t t, int64_t g,
                                               float* sK, float* sV, Body&& body) {
  bool bad = false;
  for (int64_t r = 0; r < a.R; ++r) {
    const int64_t c = valid_chunk(a, b, t, g, r, bad);
    if (c < 0) continue;
    for (int64_t j0 = c * a.C; j0 < (c + 1) * a.C; j0 += kSimtKeys) {
      const int n = int(min(int64_t(kSimtKeys), (c + 1) * a.C - j0));
      __syncthreads();  // the previous tile is consumed (and the block's setup written)
      simt_rows<T, D>(sK, a.k, b, j0, n, g, int(a.d), kSimtKeys);
      simt_rows<T, D>(sV, a.v, b, j0, n, g, int(a.d), kSimtKeys);
      __syncthreads();
      body(n);
    }
  }
  return bad;
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) recall_fwd_simt(const Args a) {
  using Sm = SimtFwdSmem<D>;
  constexpr int kLd = Sm::kLd;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int grp = int(a.grp), d = int(a.d), lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* sQ = reinterpret_cast<float*>(smem_raw);  // (grp, D), times scale log2e
  float* sO = sQ + grp * D;
  float* sK = sO + grp * D;  // (kSimtKeys, kLd)
  float* sV = sK + kSimtKeys * kLd;
  float* sS = sV + kSimtKeys * kLd;  // (grp, kSimtKeys)
  float* sM = sS + grp * kSimtKeys;
  float* sL = sM + grp;
  float* sA = sL + grp;
  const int64_t g = blockIdx.x % a.G, t = (blockIdx.x / a.G) % a.Tq, b = blockIdx.x / (a.G * a.Tq);
  for (int e = threadIdx.x; e < grp * D; e += kThreads) {
    const int h = e / D, c = e % D;
    sQ[e] = c < d ? to_f(a.q.at<const T>(b, t, g * grp + h)[c]) * a.scale_log2 : 0.f;
    sO[e] = 0.f;
  }
  for (int h = threadIdx.x; h < grp; h += kThreads) sM[h] = -INFINITY, sL[h] = 0.f;
  const bool bad = simt_key_tiles<T, D>(a, b, t, g, sK, sV, [&](int n) {
    for (int e = threadIdx.x; e < grp * kSimtKeys; e += kThreads) {
      const int h = e / kSimtKeys, jj = e % kSimtKeys;
      sS[e] = jj < n ? dot_ld(sQ + h * D, sK + jj * kLd, d) : -INFINITY;
    }
    __syncthreads();
    for (int h = warp; h < grp; h += kThreads / 32) {  // online softmax, a lane per key
      const float x = sS[h * kSimtKeys + lane];
      const float m_old = sM[h], m_new = fmaxf(m_old, warp_max(x));  // finite: n >= 1
      const float p = exp2f(x - m_new);
      sS[h * kSimtKeys + lane] = p;
      const float sum = warp_sum(p);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);
        sL[h] = sL[h] * alpha + sum, sM[h] = m_new, sA[h] = alpha;
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < grp * D; e += kThreads) {
      const int h = e / D, x = e % D;
      const float* p = sS + h * kSimtKeys;
      float acc = sO[e] * sA[h];
      for (int jj = 0; jj < n; ++jj) acc = fmaf(p[jj], sV[jj * kLd + x], acc);
      sO[e] = acc;
    }
  });
  __syncthreads();
  for (int e = threadIdx.x; e < grp * D; e += kThreads) {
    const int h = e / D, x = e % D;
    if (x >= d) continue;
    const float L = sL[h];
    const int64_t head = g * grp + h;
    a.out.at<T>(b, t, head)[x] = from_f<T>(bad ? qnan() : (L > 0.f ? sO[e] / L : 0.f));
    if (x == 0)
      a.lse[a.stat(b, head, t)] = bad ? qnan() : (L > 0.f ? (sM[h] + log2f(L)) / kLog2e : -INFINITY);
  }
}

template <int D> struct SimtDqSmem {
  static constexpr int kLd = D + 1;
  static size_t bytes(int grp) {
    return (size_t(3) * grp * D + 2 * kSimtKeys * kLd + size_t(grp) * kSimtKeys + 2 * grp) * 4;
  }
};

template <class T, int D>
__global__ void __launch_bounds__(kThreads) recall_dq_simt(const Args a) {
  constexpr int kLd = SimtDqSmem<D>::kLd;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int grp = int(a.grp), d = int(a.d);
  float* sQ = reinterpret_cast<float*>(smem_raw);  // (grp, D)
  float* sdO = sQ + grp * D;
  float* sdQ = sdO + grp * D;
  float* sK = sdQ + grp * D;  // (kSimtKeys, kLd)
  float* sV = sK + kSimtKeys * kLd;
  float* sS = sV + kSimtKeys * kLd;  // (grp, kSimtKeys): dS
  float* sLse2 = sS + grp * kSimtKeys;
  float* sDelta = sLse2 + grp;
  const int64_t g = blockIdx.x % a.G, t = (blockIdx.x / a.G) % a.Tq, b = blockIdx.x / (a.G * a.Tq);
  for (int e = threadIdx.x; e < grp * D; e += kThreads) {
    const int h = e / D, c = e % D;
    sQ[e] = c < d ? to_f(a.q.at<const T>(b, t, g * grp + h)[c]) : 0.f;
    sdO[e] = c < d ? to_f(a.dout.at<const T>(b, t, g * grp + h)[c]) : 0.f;
    sdQ[e] = 0.f;
  }
  for (int h = threadIdx.x; h < grp; h += kThreads) {
    sLse2[h] = lse2_of(a.lse[a.stat(b, g * grp + h, t)]);
    sDelta[h] = a.delta[a.stat(b, g * grp + h, t)];
  }
  const bool bad = simt_key_tiles<T, D>(a, b, t, g, sK, sV, [&](int n) {
    for (int e = threadIdx.x; e < grp * kSimtKeys; e += kThreads) {
      const int h = e / kSimtKeys, jj = e % kSimtKeys;
      float ds = 0.f;
      if (jj < n) {
        const float p = exp2f(dot_ld(sQ + h * D, sK + jj * kLd, d) * a.scale_log2 - sLse2[h]);
        ds = p * (dot_ld(sdO + h * D, sV + jj * kLd, d) - sDelta[h]);
      }
      sS[e] = ds;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < grp * D; e += kThreads) {
      const int h = e / D, x = e % D;
      const float* ds = sS + h * kSimtKeys;
      float acc = sdQ[e];
      for (int jj = 0; jj < n; ++jj) acc = fmaf(ds[jj], sK[jj * kLd + x], acc);
      sdQ[e] = acc;
    }
  });
  __syncthreads();
  for (int e = threadIdx.x; e < grp * D; e += kThreads) {
    const int h = e / D, x = e % D;
    if (x < d) a.dq.at<T>(b, t, g * grp + h)[x] = from_f<T>(bad ? qnan() : sdQ[e] * a.scale);
  }
}

constexpr int kSimtDkKeys = 16, kSimtPairs = 8;

template <int D> struct SimtDkdvSmem {
  static constexpr int kLd = D + 1;
  static constexpr size_t bytes() {
    return (size_t(2) * kSimtDkKeys * kLd + 2 * kSimtDkKeys * D + 2 * kSimtPairs * kLd +
            2 * kSimtPairs * kSimtDkKeys + 2 * kSimtPairs) * 4;
  }
};

template <class T, int D>
__global__ void __launch_bounds__(kThreads) recall_dkdv_simt(const Args a) {
  constexpr int kLd = SimtDkdvSmem<D>::kLd, NK = kSimtDkKeys, NP = kSimtPairs;
  static_assert(NK * NP == kThreads, "a thread per (pair, key)");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int d = int(a.d);
  float* sK = reinterpret_cast<float*>(smem_raw);  // (NK, kLd)
  float* sV = sK + NK * kLd;
  float* sdK = sV + NK * kLd;  // (NK, D)
  float* sdV = sdK + NK * D;
  float* sQ = sdV + NK * D;  // (NP, kLd)
  float* sdO = sQ + NP * kLd;
  float* sP = sdO + NP * kLd;  // (NP, NK)
  float* sdS = sP + NP * NK;
  float* sLse2 = sdS + NP * NK;
  float* sDelta = sLse2 + NP;
  const ChunkTile ct = chunk_tile(a, NK);
  const ChunkRows cr = chunk_rows(a, ct.bg, ct.c);
  const int64_t pairs = (cr.hi - cr.lo) * a.grp;
  simt_rows<T, D>(sK, a.k, ct.b, ct.j0, ct.n, ct.g, d, NK);
  simt_rows<T, D>(sV, a.v, ct.b, ct.j0, ct.n, ct.g, d, NK);
  for (int e = threadIdx.x; e < NK * D; e += kThreads) sdK[e] = sdV[e] = 0.f;
  for (int64_t f0 = 0; f0 < pairs; f0 += NP) {
    const int np = int(min(int64_t(NP), pairs - f0));
    __syncthreads();  // the previous pairs are consumed
    for (int e = threadIdx.x; e < NP * D; e += kThreads) {
      const int r = e / D, c = e % D;
      float q = 0.f, o = 0.f;
      if (r < np && c < d) {
        int64_t t, e, h;
        pair_of(a, cr, ct, f0 + r, t, e, h);
        q = to_f(a.q.at<const T>(ct.b, t, h)[c]);
        o = to_f(a.dout.at<const T>(ct.b, t, h)[c]);
      }
      sQ[r * kLd + c] = q, sdO[r * kLd + c] = o;
    }
    if (threadIdx.x < NP) {
      const int r = threadIdx.x;
      float lse2 = INFINITY, delta = 0.f;
      if (r < np) {
        int64_t t, e, h;
        pair_of(a, cr, ct, f0 + r, t, e, h);
        lse2 = lse2_of(a.lse[a.stat(ct.b, h, t)]);
        delta = a.delta[a.stat(ct.b, h, t)];
      }
      sLse2[r] = lse2, sDelta[r] = delta;
    }
    __syncthreads();
    {
      const int r = threadIdx.x / NK, j = threadIdx.x % NK;
      const float p = exp2f(dot_ld(sQ + r * kLd, sK + j * kLd, d) * a.scale_log2 - sLse2[r]);
      sP[r * NK + j] = p;
      sdS[r * NK + j] = p * (dot_ld(sdO + r * kLd, sV + j * kLd, d) - sDelta[r]);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < NK * D; e += kThreads) {
      const int j = e / D, x = e % D;
      float dk = sdK[e], dv = sdV[e];
      for (int r = 0; r < np; ++r) {
        dv = fmaf(sP[r * NK + j], sdO[r * kLd + x], dv);
        dk = fmaf(sdS[r * NK + j], sQ[r * kLd + x], dk);
      }
      sdK[e] = dk, sdV[e] = dv;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < NK * D; e += kThreads) {
    const int j = e / D, x = e % D;
    if (j >= ct.n || x >= d) continue;
    a.dk.at<T>(ct.b, ct.j0 + j, ct.g)[x] = from_f<T>(sdK[e] * a.scale);
    a.dv.at<T>(ct.b, ct.j0 + j, ct.g)[x] = from_f<T>(sdV[e]);
  }
}

// --- backward helpers ----------------------------------------------------------------
// delta[b, h, t] = sum_x dO[b, t, h, x] O[b, t, h, x], a warp per row.
template <class T>
__global__ void __launch_bounds__(kThreads) recall_delta(const Args a) {
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= a.B * a.Tq * a.H) return;
  const int64_t h = row % a.H, t = (row / a.H) % a.Tq, b = row / (a.H * a.Tq);
  const T* o = a.out.at<const T>(b, t, h);
  const T* g = a.dout.at<const T>(b, t, h);
  float acc = 0.f;
  for (int64_t x = lane; x < a.d; x += 32) acc = fmaf(to_f(o[x]), to_f(g[x]), acc);
  acc = warp_sum(acc);
  if (lane == 0) a.delta[a.stat(b, h, t)] = acc;
}

// The sort key of every chosen entry; -1 and invalid entries sort past every valid one.
__global__ void __launch_bounds__(kThreads) recall_entry_keys(const Args a) {
  const int64_t n = a.B * a.Tq * a.G * a.R;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e % a.R, g = (e / a.R) % a.G, t = (e / (a.R * a.G)) % a.Tq,
                  b = e / (a.R * a.G * a.Tq);
    const int32_t c = a.chosen_at(b, t, g, r);
    a.entry_keys[e] = c >= 0 && c < a.nC ? a.entry_key(b, g, c, t, r) : a.no_entry();
  }
}

// run_starts[u] for every unit u = (b G + g) nC + c and u = B G nC (the end of the valid
// keys): where its run starts in the sorted keys of all B Tq G R entries.
__global__ void __launch_bounds__(kThreads) recall_run_starts(const Args a) {
  const int64_t units = a.B * a.G * a.nC, n = a.B * a.Tq * a.G * a.R;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u <= units;
       u += int64_t(gridDim.x) * blockDim.x)
    a.run_starts[u] = lower_bound(a.sorted, n, a.unit_key(u));
}

// dK, dV of the keys past the last whole chunk: zeros (no chunk holds them).
template <class T>
__global__ void recall_zero_tail(const Args a) {
  const int64_t first = a.nC * a.C, rows = a.Tk - first, n = a.B * rows * a.G * a.d;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = e % a.d, g = (e / a.d) % a.G, j = first + (e / (a.d * a.G)) % rows,
                  b = e / (a.d * a.G * rows);
    a.dk.at<T>(b, j, g)[x] = from_f<T>(0.f);
    a.dv.at<T>(b, j, g)[x] = from_f<T>(0.f);
  }
}

// --- launch --------------------------------------------------------------------------
Args make_args(const RecallProblem& p, const TensorRef& q, const TensorRef& k,
               const TensorRef& v, const TensorRef& chosen, const TensorRef& out,
               const TensorRef& lse) {
  Args a;
  a.q = rows(q), a.k = rows(k), a.v = rows(v), a.out = rows(out);
  a.chosen = static_cast<const int32_t*>(chosen.data);
  for (int i = 0; i < 4; ++i) a.cs[i] = chosen.stride[i];
  a.lse = static_cast<float*>(lse.data);
  a.B = p.B, a.Tq = p.Tq, a.Tk = p.Tk, a.H = p.H, a.G = p.G, a.grp = p.group(), a.d = p.d;
  a.R = p.R, a.C = p.C, a.nC = p.Tk / p.C;
  a.fgrp = FastDiv(std::max<int64_t>(1, a.grp)), a.fR = FastDiv(std::max<int64_t>(1, a.R));
  a.scale = float(p.scale), a.scale_log2 = float(p.scale) * kLog2e;
  return a;
}

// The tensor-core case: 16-bit, d = 64 or 128, 16-byte aligned rows of every tensor, and a
// row block's entries within kCap.
bool mma_case(const RecallProblem& p, std::initializer_list<const Rows*> xs) {
  if (p.dtype == DType::f32 || (p.d != 64 && p.d != 128) || p.R > kCap ||
      p.C * kCap >= (int64_t(1) << 31))
    return false;
  for (const Rows* x : xs)
    if (!aligned16(*x)) return false;
  return true;
}

// Row blocks of the tensor-core kernels: as many rows as fill 16 M rows within kCap entries.
int64_t plan_row_blocks(Args& a) {
  a.hp = int(std::min<int64_t>(a.grp, kMaxRows));
  a.mtiles = int(ceil_div(a.grp, kMaxRows));
  a.nt = int(std::max<int64_t>(1, std::min<int64_t>(kMaxRows / a.hp, a.R > 0 ? kCap / a.R : kMaxRows)));
  a.tblocks = ceil_div(a.Tq, a.nt);
  a.fC = FastDiv(a.C);
  return a.B * a.tblocks * a.G * a.mtiles;
}

template <class Kernel> void launch(Kernel k, int64_t blocks, size_t smem, cudaStream_t s,
                                    const char* name, const Args& a) {
  MKA_CHECK(blocks < (int64_t(1) << 31), name, ": too many blocks (", blocks, ")");
  if (blocks == 0) return;
  MKA_CHECK(smem <= 227 * 1024, name, ": needs ", smem, " bytes of shared memory (the query ",
            "heads per kv head x head dim are too many for the CUDA-core kernel)");
  // The kernels' static shared memory (a few KiB) counts against the 48 KiB a launch may take
  // without the opt-in, so large requests opt in below that line too (setting it is harmless).
  if (smem > 32 * 1024) set_smem(k, int(smem));
  k<<<unsigned(blocks), kThreads, smem, s>>>(a);
  check_launch(name);
}

// Calls f with std::integral_constant D = 64, 128 or 256 covering d.
template <class F> void with_dim(int64_t d, F&& f) {
  if (d <= 64) f(std::integral_constant<int, 64>{});
  else if (d <= 128) f(std::integral_constant<int, 128>{});
  else if (d <= 256) f(std::integral_constant<int, 256>{});
  else fail("recall: head dim ", d, " has no CUDA kernel (at most 256)");
}

// The inverse index of the chosen entries (recall_params.cuh): the entry keys, their sorted
// copy, the run starts and CUB's temporary storage, in scratch of bytes() bytes (build()).
struct InverseIndex {
  int64_t entries = 0, units = 0;
  int end_bit = 1;  // the sort looks at the bits in use only
  size_t cub_bytes = 0;

  // What must stay below 2^31: the entries (CUB's item count is an int) and one chunk's run of
  // (entry, query head) pairs, at most Tq R grp (32-bit divisions by grp and R in the kernels).
  static bool fits(const Args& a) {
    return a.B * a.Tq * a.G * a.R < (int64_t(1) << 31) && a.Tq * a.R * a.grp < (int64_t(1) << 31);
  }

  InverseIndex(const Args& a, cudaStream_t s)
      : entries(a.B * a.Tq * a.G * a.R), units(a.B * a.G * a.nC) {
    MKA_CHECK(fits(a), "chosen: too many entries for the CUDA kernel (", entries,
              " entries, runs of up to ", a.Tq * a.R * a.grp, " pairs)");
    int64_t keys = 1;  // B G nC Tq R: past every key
    for (int64_t x : {a.B * a.G, a.nC, a.Tq, a.R})
      MKA_CHECK(!__builtin_mul_overflow(keys, std::max<int64_t>(x, 1), &keys),
                "recall: the chosen entries' sort keys overflow 64 bits");
    while (end_bit < 64 && (a.no_entry() >> end_bit) != 0) ++end_bit;
    if (entries > 0)
      check_cuda(cub::DeviceRadixSort::SortKeys(nullptr, cub_bytes, static_cast<uint64_t*>(nullptr),
                                                static_cast<uint64_t*>(nullptr), int(entries), 0,
                                                end_bit, s),
                 "cub::DeviceRadixSort (temporary storage)");
  }
  static size_t round(size_t x) { return (x + 255) / 256 * 256; }
  size_t bytes() const {
    return 2 * round(size_t(entries) * 8) + round(size_t(units + 1) * 8) + cub_bytes;
  }
  void build(Args& a, char* at, cudaStream_t s) {
    const size_t key_bytes = round(size_t(entries) * 8);
    a.entry_keys = reinterpret_cast<uint64_t*>(at);
    uint64_t* sorted = reinterpret_cast<uint64_t*>(at + key_bytes);
    a.sorted = sorted;
    a.run_starts = reinterpret_cast<int64_t*>(at + 2 * key_bytes);
    if (entries > 0) {
      launch(recall_entry_keys, std::min<int64_t>(ceil_div(entries, kThreads), 65536), 0, s,
             "recall_entry_keys", a);
      check_cuda(cub::DeviceRadixSort::SortKeys(at + 2 * key_bytes + round(size_t(units + 1) * 8),
                                                cub_bytes, a.entry_keys,
                                                sorted, int(entries), 0, end_bit, s),
                 "cub::DeviceRadixSort");
    }
    launch(recall_run_starts, std::min<int64_t>(ceil_div(units + 1, kThreads), 65536), 0, s,
           "recall_run_starts", a);
  }
};

// The chunk-major kernels' float32 partials run in slabs of whole (b, kv head) units within
// this budget (the scratch is one stream-ordered allocation, cached by the memory pool after
// the call): 8.7 GB for all of B = 1, Tq = 64k, H = 32, R = 8, d = 128 would sit in the pool.
// MKA_CUDA_RECALL_SCRATCH overrides it (tests run many slabs with a small one).
// Without it, 4 GiB or a quarter of the device memory free at the first call, whichever is
// smaller (the pool keeps the scratch after the call, out of PyTorch's allocator's reach).
int64_t partial_budget() {
  static const int64_t budget = recall_scratch_from_environment().value_or([] {
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) {
      (void)cudaGetLastError();
      return int64_t(1) << 30;
    }
    return std::min<int64_t>(int64_t(4) << 30, int64_t(free / 4));
  }());
  return budget;
}

// Units per slab when each needs unit_bytes of partials: all of them for none, 0 (the
// row-major kernels) when one alone is over the budget.
int64_t slab_units(int64_t unit_bytes, int64_t units) {
  return unit_bytes == 0 ? units : std::min(units, partial_budget() / unit_bytes);
}

// Runs body() for each slab of `per` units: a.bg0, a.bg1 set; the whole range after.
template <class Body> void for_each_slab(Args& a, int64_t per, Body&& body) {
  const int64_t units = a.B * a.G;
  for (a.bg0 = 0; a.bg0 < units; a.bg0 = a.bg1) {
    a.bg1 = std::min(units, a.bg0 + per);
    body();
  }
  a.bg0 = 0, a.bg1 = units;
}

// The tensor-core paths (16-bit inputs, d = 64 or 128, aligned rows): chunk-major
// (recall_chunks.cuh, and the dK/dV kernel's dQ partials in the backward) unless the caller
// asks for the row-major kernels (KernelOptions::recall, MKA_CUDA_RECALL=rows) or one
// (b, kv head)'s partials are over partial_budget() (Tq·group·R·(d + 1)·4 bytes: Tq past
// ~256k at group 4, R 8, d 128), where the row-major kernels take it.
//
// Why chunk-major: a row-major block (recall_mma.cuh) reads the K and V of every chunk its
// rows chose, so with no reuse between neighbouring rows (a random or diverse selection) the
// forward reads R·C·d·2·2 bytes per (row, kv head) — 137 GB at B = 1, Tq = 64k, G = 8, R = 8,
// C = 64, d = 128 — and dq the same again. Chunk-major reads each chunk's K and V once per kv
// head (268 MB there) and pays instead a gather of Q per (row, head, entry) (4.3 GB) and a
// float32 partial per (row, head, entry) written and read back (8.7 GB each way) plus the sort
// of the entries (~0.2 ms): ~22 GB in the forward. Row-major wins only where neighbouring rows
// share most of their chunks (a row block reads a shared chunk once) and Tq·R is small
// against the keys (a few rows, as in decoding, where the sort, the partials and the extra
// launches are overhead).
template <class T, int D>
bool forward_chunks(const RecallProblem& p, Args& a, cudaStream_t s) {
  a.kts = ceil_div(p.C, kFwdMaxKeys);
  a.tile_keys = ceil_div(p.C, a.kts);  // <= kFwdMaxKeys, and kts - 1 tiles stay below C
  const int64_t P = p.R * a.kts, row_parts = a.grp * P;  // a row t's partials in a unit
  const int64_t per = slab_units(p.Tq * row_parts * (D + 1) * 4, p.B * p.G);
  if (per == 0 || !InverseIndex::fits(a)) return false;  // the row-major kernels need no index
  InverseIndex index(a, s);
  const size_t part_bytes = InverseIndex::round(size_t(per * p.Tq * row_parts) * D * 4);
  const size_t lse_bytes = InverseIndex::round(size_t(per * p.Tq * row_parts) * 4);
  Workspace ws(part_bytes + lse_bytes + index.bytes(), s, false);
  char* base = ws.as<char>();
  a.part = reinterpret_cast<float*>(base);
  a.part_lse = reinterpret_cast<float*>(base + part_bytes);
  index.build(a, base + part_bytes + lse_bytes, s);
  a.stripe = std::max<int64_t>(1, kStripePairs / a.grp);
  for_each_slab(a, per, [&] {
    const int64_t rows = (a.bg1 - a.bg0) * p.Tq;
    if (index.entries > 0)
      launch(recall_fwd_chunks<T, D>, ceil_div(rows * p.R, a.stripe) * a.kts,
             fwd_chunks_smem<D>(a.tile_keys), s, "recall_fwd_chunks", a);
    launch(recall_merge_partials<T, D, true>, ceil_div(rows * a.grp, kMergeWarps), 0, s,
           "recall_combine", a);
  });
  return true;
}

template <class T> void forward(const RecallProblem& p, Args& a, bool chunks, cudaStream_t s) {
  with_dim(p.d, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    if constexpr (sizeof(T) == 2 && D <= 128) {
      if (p.d == D && mma_case(p, {&a.q, &a.k, &a.v, &a.out})) {
        if (chunks && forward_chunks<T, D>(p, a, s)) return;
        const int64_t blocks = plan_row_blocks(a);
        return launch(recall_fwd_mma<T, D>, blocks, rows_mma_smem<D>(1), s, "recall_fwd_mma", a);
      }
    }
    launch(recall_fwd_simt<T, D>, p.B * p.Tq * p.G, SimtFwdSmem<D>::bytes(int(p.group())), s,
           "recall_fwd_simt", a);
  });
}

// Backward: delta, the inverse index, then dK/dV per chunk tile and dq — chunk-major, dq from
// the dK/dV kernel's partials (recall_dkdv_mma<..., true> and recall_merge_partials, slab by
// slab), or row-major (recall_dq_mma / recall_dq_simt).
template <class T> void backward(const RecallProblem& p, Args& a, bool chunks, cudaStream_t s) {
  const int64_t rows_n = p.B * p.Tq * p.H, units = p.B * p.G;
  a.bg0 = 0, a.bg1 = units;
  with_dim(p.d, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    bool mma = false;
    if constexpr (sizeof(T) == 2 && D <= 128)
      mma = p.d == D && mma_case(p, {&a.q, &a.k, &a.v, &a.out, &a.dout, &a.dq, &a.dk, &a.dv});
    int64_t per = 0;  // units per slab of dQ partials; 0: the row-major dq kernel
    if (mma && chunks) {
      a.kts = ceil_div(p.C, kTile), a.tile_keys = kTile;
      per = slab_units(p.Tq * a.grp * p.R * a.kts * D * 4, units);
    }
    // Scratch: delta, the dQ partials, the inverse index.
    InverseIndex index(a, s);
    const size_t delta_bytes = InverseIndex::round(size_t(rows_n) * 4);
    const size_t part_bytes =
        per > 0 ? InverseIndex::round(size_t(per * p.Tq * a.grp * p.R * a.kts) * D * 4) : 0;
    Workspace ws(delta_bytes + part_bytes + index.bytes(), s, false);
    char* base = ws.as<char>();
    a.delta = reinterpret_cast<float*>(base);
    a.part = per > 0 ? reinterpret_cast<float*>(base + delta_bytes) : nullptr;

    launch(recall_delta<T>, ceil_div(rows_n, kThreads / 32), 0, s, "recall_delta", a);
    index.build(a, base + delta_bytes + part_bytes, s);
    const int64_t tail = (p.Tk - a.nC * p.C) * p.B * p.G * p.d;
    if (tail > 0)
      launch(recall_zero_tail<T>, std::min<int64_t>(ceil_div(tail, kThreads), 65536), 0, s,
             "recall_zero_tail", a);
    const int64_t tiles = a.nC * ceil_div(p.C, kTile);  // dK/dV blocks per unit
    if constexpr (sizeof(T) == 2 && D <= 128) {
      if (mma && per > 0) {
        return for_each_slab(a, per, [&] {
          launch(recall_dkdv_mma<T, D, true>, (a.bg1 - a.bg0) * tiles, dkdv_mma_smem<D>(true),
                 s, "recall_dkdv_mma", a);
          launch(recall_merge_partials<T, D, false>,
                 ceil_div((a.bg1 - a.bg0) * p.Tq * a.grp, kMergeWarps), 0, s, "recall_dq_reduce", a);
        });
      }
      if (mma) {
        launch(recall_dq_mma<T, D>, plan_row_blocks(a), rows_mma_smem<D>(2), s, "recall_dq_mma", a);
        return launch(recall_dkdv_mma<T, D, false>, units * tiles, dkdv_mma_smem<D>(false), s,
                      "recall_dkdv_mma", a);
      }
    }
    launch(recall_dq_simt<T, D>, p.B * p.Tq * p.G, SimtDqSmem<D>::bytes(int(p.group())), s,
           "recall_dq_simt", a);
    launch(recall_dkdv_simt<T, D>, units * a.nC * ceil_div(p.C, kSimtDkKeys),
           SimtDkdvSmem<D>::bytes(), s, "recall_dkdv_simt", a);
  });
}

}  // namespace

void recall_fwd(const RecallProblem& p, const RecallFwd& f) {
  if (p.B == 0 || p.Tq == 0 || p.H == 0) return;
  DeviceGuard guard(f.q.device_id);
  Args a = make_args(p, f.q, f.k, f.v, f.chosen, f.out, f.lse);
  const bool chunks = f.launch.kernels.recall == RecallKernel::chunks;
  dispatch_dtype(p.dtype, "recall", [&](auto* t) {
    forward<std::remove_pointer_t<decltype(t)>>(p, a, chunks,
                                                static_cast<cudaStream_t>(f.launch.stream));
  });
}

void recall_bwd(const RecallProblem& p, const RecallBwd& f) {
  if (p.B == 0 || p.G == 0 || p.d == 0 || (p.Tq == 0 && p.Tk == 0)) return;
  DeviceGuard guard(f.q.device_id);
  Args a = make_args(p, f.q, f.k, f.v, f.chosen, f.out, f.lse);
  a.dout = rows(f.dout), a.dq = rows(f.dq), a.dk = rows(f.dk), a.dv = rows(f.dv);
  const bool chunks = f.launch.kernels.recall == RecallKernel::chunks;
  dispatch_dtype(p.dtype, "recall", [&](auto* t) {
    backward<std::remove_pointer_t<decltype(t)>>(p, a, chunks,
                                                 static_cast<cudaStream_t>(f.launch.stream));
  });
}

}  // namespace mka::cuda
