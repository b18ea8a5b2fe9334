// The key splits of one (sequence, kv head, row block) merged inside the decode kernel (sm_90):
// the splits run as one thread-block cluster, each block keeps its merged rows in its shared
// memory, and after a cluster barrier every block reads all the cluster's rows through
// distributed shared memory and writes its share of the output. No partials go to global
// memory and no combine kernel runs: at small caches that kernel (its launch, its dependent
// loads of the partials) was a third of a decode step's time (docs/kernels.md §3.6).
#pragma once
#include <cooperative_groups.h>

#include "memory/paged_params.cuh"

namespace mka::cuda::paged {

// sO: this block's merged rows, row slot at(l, r) for level l of query row r, D float32
// columns each; mM, mL: each row slot's max (base 2) and sum; bad: this block met an invalid
// page or length; scratch: shared memory of this block's own (the merge's weights). As the
// combine kernel: a split without keys (L = 0) weighs 0, a NaN from a bad block or from values
// spreads, and lse is level 1's.
template <class T, int D, int kLevels, class At>
__device__ __forceinline__ void cluster_merge(const PagedArgs& a, const BlockKeys& bk,
                                              const float* sO, const float* mM, const float* mL,
                                              const int* bad, At at, float* scratch) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cl = cg::this_cluster();
  // fac: split c's weight in row r, w exp2(m_c - m) / L; has: split c has keys for row r.
  auto fac = reinterpret_cast<float (*)[16][kMaxCluster]>(scratch);
  auto has = reinterpret_cast<bool (*)[16][kMaxCluster]>(scratch + kLevels * 16 * kMaxCluster);
  cl.sync();  // every block's rows, statistics and flag are final
  const int C = int(cl.num_blocks()), me = int(cl.block_rank());
  const float nan = __int_as_float(0x7fc00000);
  if (threadIdx.x < kLevels * 16 && int(threadIdx.x % 16) < bk.R) {
    const int l = threadIdx.x / 16, r = threadIdx.x % 16, slot = at(l, r);
    const int f = bk.f0 + r, i = f / a.grp, h = bk.g * a.grp + f % a.grp;
    float m = -INFINITY, ms[kMaxCluster], ls[kMaxCluster];
    bool any_bad = false;
#pragma unroll
    for (int c = 0; c < kMaxCluster; ++c)
      if (c < C) {
        ms[c] = cl.map_shared_rank(mM, c)[slot];
        ls[c] = cl.map_shared_rank(mL, c)[slot];
        any_bad |= *cl.map_shared_rank(bad, c) != 0;
        if (ls[c] != 0.f) m = fmaxf(m, ms[c]);
      }
    float L = 0.f;
#pragma unroll
    for (int c = 0; c < kMaxCluster; ++c)
      if (c < C) {
        const float e = ls[c] != 0.f ? exp2f(ms[c] - m) : 0.f;
        ms[c] = e;
        L += ls[c] * e;
      }
    if (any_bad) L = nan;
    const float scale = merged_scale(L, level_weight(a, kLevels, l, bk.b, i));
#pragma unroll
    for (int c = 0; c < kMaxCluster; ++c)
      if (c < C) fac[l][r][c] = ms[c] * scale, has[l][r][c] = ls[c] != 0.f;
    if (l == 0 && me == 0 && a.lse) a.lse[(int64_t(bk.b) * a.H + h) * a.T + i] = merged_lse(m, L);
  }
  __syncthreads();
  for (int e = me * kThreads + threadIdx.x; e < bk.R * D; e += C * kThreads) {
    const int r = e / D, x = e % D;
    const int f = bk.f0 + r, i = f / a.grp, h = bk.g * a.grp + f % a.grp;
    float o = 0.f;
#pragma unroll
    for (int l = 0; l < kLevels; ++l) {
      float sum = 0.f;
      bool any = false;
      for (int c = 0; c < C; ++c)
        if (has[l][r][c]) sum += cl.map_shared_rank(sO, c)[at(l, r) * D + x] * fac[l][r][c], any = true;
      // No split with keys: 0, or NaN where a block was bad (its scale).
      o += any ? sum : (fac[l][r][0] != fac[l][r][0] ? fac[l][r][0] : 0.f);
    }
    static_cast<T*>(a.out)[bk.b * a.os[0] + i * a.os[1] + h * a.os[2] + x] = from_f<T>(o);
  }
  cl.sync();  // no block leaves while another still reads its shared memory
#else
  __trap();  // the host asks for clusters on sm_90 code only
#endif
}

}  // namespace mka::cuda::paged
