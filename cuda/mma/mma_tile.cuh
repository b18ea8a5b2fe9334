// Tensor-core tile building blocks (sm_80+): cp.async copies into swizzled shared-memory
// tiles, ldmatrix fragment loads and the m16n8k16 mma with float32 accumulators. Kernels
// built from these read like the algorithm: load tile, mma, softmax update, store.
#pragma once
#include "common/device_utils.cuh"

namespace mka::cuda::mma {

// --- shared-memory tiles ------------------------------------------------------------
// A tile is rows x D elements, row-major, in 16-byte chunks; chunk c of row r is stored at
// chunk c ^ (r & 7) so that the 8 rows an ldmatrix reads hit 8 different bank groups.
template <int D> __device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(valid ? 16 : 0));  // size 0: zero-fill (rows past the end)
}
// One 4-byte element (a row statistic); .ca: .cg takes 16 bytes only.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// Double buffering: issues the next stage's copies (when there is one) as their own group,
// then waits until the older groups, the current stage's, have landed.
template <class Issue>
__device__ __forceinline__ void cp_async_next_stage(bool more, Issue&& issue) {
  if (more) {
    issue();
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
}

// Rows [r0, r0 + R) of head `h` of x (batch b) into a swizzled tile; zeros past row n.
template <int R, int D, int THREADS, class T>
__device__ __forceinline__ void load_tile(T* tile, const Rows& x, int64_t b, int64_t r0,
                                          int64_t n, int64_t h) {
  constexpr int kChunks = D / 8;
  for (int e = threadIdx.x; e < R * kChunks; e += THREADS) {
    const int r = e / kChunks, c = e % kChunks;
    const bool in = r0 + r < n;
    const T* src = in ? x.at<const T>(b, r0 + r, h) + c * 8 : static_cast<const T*>(x.data);
    cp_async16(tile + swz<D>(r, c), src, in);
  }
}

// --- fragments ----------------------------------------------------------------------
// ldmatrix.x4: lane l gives the address of row (l % 8) of matrix l / 8.
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* p) {
  const unsigned s = unsigned(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], const void* p) {
  const unsigned s = unsigned(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// A operand (16 x 16, rows m0.., cols k-chunk pair 2kk) of a row-major tile.
template <int D, class T>
__device__ __forceinline__ void load_a(unsigned (&a)[4], const T* tile, int m0, int kk) {
  const int l = threadIdx.x & 31;
  ldsm_x4(a, tile + swz<D>(m0 + (l & 7) + ((l >> 3) & 1) * 8, 2 * kk + (l >> 4)));
}
// A operand (16 x 16) of the transpose of a row-major tile: A[m][k] = tile[k0 + k][m-chunk].
template <int D, class T>
__device__ __forceinline__ void load_a_trans(unsigned (&a)[4], const T* tile, int k0, int mc) {
  const int l = threadIdx.x & 31;
  ldsm_x4_trans(a, tile + swz<D>(k0 + (l & 7) + (l >> 4) * 8, 2 * mc + ((l >> 3) & 1)));
}
// B operands of two n-tiles (n0..n0+15) over k-chunk pair 2kk where B[k][n] = tile[n][k]
// (keys as rows: the QK^T case). b[0..1]: n-tile n0, b[2..3]: n-tile n0 + 8.
template <int D, class T>
__device__ __forceinline__ void load_b(unsigned (&b)[4], const T* tile, int n0, int kk) {
  const int l = threadIdx.x & 31;
  ldsm_x4(b, tile + swz<D>(n0 + (l & 7) + (l >> 4) * 8, 2 * kk + ((l >> 3) & 1)));
}
// B operands of two n-tiles (column chunks 2np, 2np+1) over k rows k0..k0+15 where
// B[k][n] = tile[k][n] (the PV case): transposed ldmatrix.
template <int D, class T>
__device__ __forceinline__ void load_b_trans(unsigned (&b)[4], const T* tile, int k0, int np) {
  const int l = threadIdx.x & 31;
  ldsm_x4_trans(b, tile + swz<D>(k0 + (l & 7) + ((l >> 3) & 1) * 8, 2 * np + (l >> 4)));
}

// d += a * b, 16x8x16, float32 accumulators.
template <class T> __device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4],
                                                          unsigned b0, unsigned b1);
template <> __device__ __forceinline__ void mma16816<__half>(float (&d)[4], const unsigned (&a)[4],
                                                            unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4],
                                                                   const unsigned (&a)[4],
                                                                   unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one register of two 16-bit values (the lower column in the low half).
template <class T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

// Output columns c, c + 1 of row (b, i, h): in T, or float32 where p.out_f32 (p: AttnParams).
template <class T, class P>
__device__ __forceinline__ void store_out2(const P& p, int64_t b, int64_t i, int64_t h, int c,
                                           float lo, float hi) {
  if (p.out_f32)
    *reinterpret_cast<float2*>(p.out.template at<float>(b, i, h) + c) = make_float2(lo, hi);
  else
    *reinterpret_cast<unsigned*>(p.out.template at<T>(b, i, h) + c) = pack2<T>(lo, hi);
}

// The A operand of k-step kk from accumulator tiles 2kk, 2kk+1 (P or dS reused in registers).
template <class T, int NT>
__device__ __forceinline__ void acc_to_a(unsigned (&a)[4], const float (&c)[NT][4], int kk) {
  a[0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// acc += A B over k = 0..BK-1 for the warp's 16 rows: A[m][k] = at[k][16 mc + m] (the
// transpose of a row-major tile with LDA columns: dS^T, keys as rows) and B[k][n] = bt[k][n]
// (rows of a D-wide tile: K), NT 8-column n-tiles from column 16 np0. The dQ = dS K step.
template <class T, int LDA, int D, int BK, int NT>
__device__ __forceinline__ void mma_at_rows(float (&acc)[NT][4], const T* at, int mc, const T* bt,
                                            int np0) {
#pragma unroll
  for (int kk = 0; kk < BK / 16; ++kk) {
    unsigned a[4];
    load_a_trans<LDA>(a, at, kk * 16, mc);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      unsigned b[4];
      load_b_trans<D>(b, bt, kk * 16, np0 + np);
      mma16816<T>(acc[2 * np], a, b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// Max and sum over the 4 lanes of a quad (they share an accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace mka::cuda::mma
