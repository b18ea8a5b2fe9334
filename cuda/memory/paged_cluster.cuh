// The splits of one (row block, sequence, kv head) as one thread-block cluster (sm_90): with
// 2 to kMaxCluster splits, the tensor-core kernel is launched with clusters of (1, splits, 1)
// blocks, and at its end the blocks merge their partial softmaxes through distributed shared
// memory instead of writing them to a workspace for the combine kernel. That removes the
// partials' round trip through memory and the second kernel, a fixed cost that decides the
// small and mid-size caches (B 16, 4k keys, G 8: 2 splits, the combine ~7 us under ncu).
#pragma once
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#endif
#include "memory/paged_params.cuh"

namespace mka::cuda::paged {

constexpr int kMaxCluster = 8;  // the portable cluster size

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// The shared::cluster address of this block's `p` in block `rank` of the cluster (32 bits: a
// generic pointer per block would hold two registers each through the merge's loops).
__device__ __forceinline__ uint32_t cluster_addr(const void* p, int rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
               : "=r"(r) : "r"(uint32_t(__cvta_generic_to_shared(p))), "r"(rank));
  return r;
}
__device__ __forceinline__ float cluster_load(uint32_t addr) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}
#endif

// Merges the cluster's splits and writes the output rows (and lse). Each block holds its
// split's rows: merged row k (= at(l, r): level l of query row r) has the max rowM[k], the sum
// rowL[k] and unnormalised values sO[k * D, (k + 1) * D). The rows' statistics are combined
// once per block (threads < kMerged), the output elements are shared out among the cluster's
// blocks; as the combine kernel: a split with no keys (L = 0) weighs 0 and its values are
// not read, a bad page or length in any split makes the rows NaN. Ends with a cluster barrier: no block
// leaves while another may still read its shared memory.
template <class T, int D, int kLevels, int kMerged, class At>
__device__ __forceinline__ void cluster_merge(const PagedArgs& a, int b, int g, int f0, int R,
                                              float* sO, float* rowM, float* rowL, bool bad,
                                              At at) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  __shared__ float sE[kMerged][kMaxCluster];  // each split's weight exp2(m_c - m)
  __shared__ float sSum[kMerged], sMax[kMerged];
  __shared__ unsigned sHas[kMerged];  // splits with keys, one bit each
  cg::cluster_group cl = cg::this_cluster();
  const int C = int(cl.num_blocks()), me = int(cl.block_rank());
  const float nan = __int_as_float(0x7fc00000);
  // A split that met a bad page entry poisons every row, as its NaN partials do in the
  // combine kernel (bad differs between splits: a length past the table sets it in all).
  if (bad && threadIdx.x < kMerged) rowL[threadIdx.x] = nan;
  cl.sync();  // every split's rows are in its shared memory
  if (threadIdx.x < kMerged) {
    const int k = threadIdx.x;
    float M[kMaxCluster], L[kMaxCluster], m = -INFINITY, sum = 0.f;
    unsigned has = 0;
#pragma unroll
    for (int c = 0; c < kMaxCluster; ++c)
      if (c < C) {
        M[c] = cluster_load(cluster_addr(rowM + k, c));
        L[c] = cluster_load(cluster_addr(rowL + k, c));
      }
#pragma unroll
    for (int c = 0; c < kMaxCluster; ++c)
      if (c < C && L[c] != 0.f) m = fmaxf(m, M[c]), has |= 1u << c;
#pragma unroll
    for (int c = 0; c < kMaxCluster; ++c)
      if (c < C) {
        const float e = L[c] != 0.f ? exp2f(M[c] - m) : 0.f;
        sE[k][c] = e;
        sum += L[c] * e;  // a NaN sum propagates
      }
    sSum[k] = sum, sMax[k] = m, sHas[k] = has;
  }
  __syncthreads();
  uint32_t rO[kMaxCluster];  // each block's sO
#pragma unroll
  for (int c = 0; c < kMaxCluster; ++c) rO[c] = c < C ? cluster_addr(sO, c) : 0u;
  for (int e = me * kThreads + threadIdx.x; e < R * D; e += C * kThreads) {
    const int r = e / D, x = e % D;
    const int f = f0 + r, i = f / a.grp, h = g * a.grp + f % a.grp;
    float o = 0.f;
#pragma unroll
    for (int l = 0; l < kLevels; ++l) {
      const int k = at(l, r);
      float v[kMaxCluster], s = 0.f;
#pragma unroll
      for (int c = 0; c < kMaxCluster; ++c)
        if (c < C && (sHas[k] >> c & 1u)) v[c] = cluster_load(rO[c] + 4u * uint32_t(k * D + x));
#pragma unroll
      for (int c = 0; c < kMaxCluster; ++c)
        if (c < C && (sHas[k] >> c & 1u)) s += v[c] * sE[k][c];
      const float L = sSum[k];
      const float w = kLevels == 2 ? (l == 0 ? a.lam0 : a.lam1).load(b, i, 1.f) : 1.f;
      o += s * (L > 0.f ? w / L : (L != L ? L : 0.f));
    }
    static_cast<T*>(a.out)[b * a.os[0] + i * a.os[1] + h * a.os[2] + x] = from_f<T>(bad ? nan : o);
    if (a.lse && x == 0) {
      const float L = sSum[at(0, r)];
      a.lse[(int64_t(b) * a.H + h) * a.T + i] =
          bad ? nan : (L > 0.f ? (sMax[at(0, r)] + log2f(L)) / kLog2e : (L != L ? L : -INFINITY));
    }
  }
  cl.sync();  // the other blocks may still be reading this one's rows
#else
  __trap();  // the host launches clusters only for code compiled for sm_90 or later
#endif
}

}  // namespace mka::cuda::paged
