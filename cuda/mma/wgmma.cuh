// Hopper warpgroup MMA (wgmma, sm_90a) building blocks: 128-byte-swizzled shared tiles and
// their matrix descriptors, the fences and commit/wait of the asynchronous MMA, and
// m64nNk16 products with float32 accumulators, A from shared memory (SS) or registers (RS).
// The accumulator layout per warp equals mma.sync's m16n8 layout stacked along N, and the
// RS A operand equals mma.sync's m16n8k16 A fragment, so mma_tile.cuh's softmax helpers and
// acc_to_a apply unchanged.
#pragma once
#include "mma/mma_tile.cuh"

namespace mka::cuda::wgmma {

// --- 128B-swizzled tiles ------------------------------------------------------------
// An R x D tile of 16-bit elements is stored as D/64 panels of R rows x 128 bytes; 16-byte
// chunk c of a row r sits at chunk c ^ (r % 8). That is the hardware's 128B swizzle (address
// bits 4-6 XOR bits 7-9), so panels must start 1024-byte aligned (one 8-row atom).
template <int R> __device__ __forceinline__ int sw128(int row, int chunk) {  // in elements
  return (chunk >> 3) * R * 64 + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
}

// The first 1024-byte aligned address of a dynamic shared-memory buffer (its panels' start).
__device__ __forceinline__ unsigned char* align1024(unsigned char* smem) {
  return smem + (1024u - unsigned(__cvta_generic_to_shared(smem)) % 1024u) % 1024u;
}

// Rows [r0, r0 + R) of head h of x (batch b) into a swizzled tile with cp.async; zeros past
// row n. Each thread copies one fixed 16-byte column chunk of every (THREADS / chunks)-th row.
template <int R, int D, int THREADS, class T>
__device__ __forceinline__ void load_tile(T* tile, const Rows& x, int64_t b, int64_t r0,
                                          int64_t n, int64_t h) {
  constexpr int kChunks = D / 8, kRowStep = THREADS / kChunks;
  static_assert(THREADS % kChunks == 0 && R % kRowStep == 0, "whole rows per pass");
  const int c = threadIdx.x % kChunks, r_first = threadIdx.x / kChunks;
  const T* src = x.at<const T>(b, r0 + r_first, h) + c * 8;
  const int64_t step = kRowStep * x.st;
  #pragma unroll
  for (int r = r_first; r < R; r += kRowStep, src += step) {
    const bool in = r0 + r < n;
    mma::cp_async16(tile + sw128<R>(r, c), in ? src : static_cast<const T*>(x.data), in);
  }
}

// --- descriptors ----------------------------------------------------------------------
// Start address, leading and stride byte offsets (16-byte units) and the 128B swizzle mode.
__device__ __forceinline__ uint64_t desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  const uint32_t a = unsigned(__cvta_generic_to_shared(smem));
  return uint64_t((a & 0x3FFFF) >> 4) | uint64_t(lbo >> 4) << 16 | uint64_t(sbo >> 4) << 32 |
         uint64_t(1) << 62;
}
// The descriptor of the tile `elems` 16-bit elements (a multiple of 8) past d's start: only
// the start address moves. The k-steps and stages of a tile are constant offsets from one
// descriptor made once, not a shared-address conversion and masking per product.
__device__ __forceinline__ uint64_t desc_at(uint64_t d, int elems) { return d + uint64_t(elems >> 3); }
// Operand whose reduction dim is contiguous (Q, K for Q K^T): 8-row atoms 1024 B apart; a
// k16 step inside a panel advances the start by 32 bytes (the swizzle follows the address).
__device__ __forceinline__ uint64_t desc_k(const void* smem) { return desc(smem, 16, 1024); }
// Operand whose M/N dim is contiguous (V for P V): 64-column panels panel_bytes apart along
// N, 8-row atoms 1024 B apart along the reduction dim.
__device__ __forceinline__ uint64_t desc_mn(const void* smem, uint32_t panel_bytes) {
  return desc(smem, panel_bytes, 1024);
}

// The calling thread's warpgroup, read from lane 0 so the compiler knows it is warp-uniform:
// the shared addresses and descriptors made from it then live in uniform registers, computed
// once per warp rather than by every thread (from threadIdx.x / 128 the compiler makes them
// per thread).
__device__ __forceinline__ int warpgroup() {
  return __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0);
}

// --- ordering ---------------------------------------------------------------------------
// Before a wgmma whose accumulators or A registers were written by ordinary instructions.
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// The compiler sees wgmma outputs as ready at issue; pin every read after the wait.
template <int N> __device__ __forceinline__ void fence_regs(float (&x)[N]) {
  #pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(x[i])::"memory");
}
// cp.async writes (generic proxy) made visible to wgmma's reads (async proxy).
__device__ __forceinline__ void fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// 2^x as one MUFU op (ex2.approx.ftz): exp2f adds denormal fix-ups that the softmax of
// attention scores never needs, and they lengthened the latency-bound softmax.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// --- products ---------------------------------------------------------------------------
// Mma<T, N>::ss<TA, TB>(d, a, b, acc): d (64 x N, N/2 floats per thread) = a * b (+ d if
// acc), A and B by descriptor; TA = 1 reads A M-major, TB = 1 reads B N-major (0: the
// reduction dim is contiguous). rs<TB>: A (64 x 16) from four registers.
template <class T, int N> struct Mma;

#define MKA_D8(o) "+f"(d[o]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), \
                  "+f"(d[o + 4]), "+f"(d[o + 5]), "+f"(d[o + 6]), "+f"(d[o + 7])
#define MKA_D32 MKA_D8(0), MKA_D8(8), MKA_D8(16), MKA_D8(24)
#define MKA_D64 MKA_D32, MKA_D8(32), MKA_D8(40), MKA_D8(48), MKA_D8(56)
#define MKA_R32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, " \
                "%17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MKA_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, " \
                "%17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
                "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, "  \
                "%47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "  \
                "%62, %63}"

#define MKA_DEFINE_WGMMA(CT, TY)                                                              \
  template <> struct Mma<CT, 64> {                                                            \
    template <int TA, int TB>                                                                 \
    static __device__ __forceinline__ void ss(float (&d)[32], uint64_t a, uint64_t b, int acc) { \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                               \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " MKA_R32        \
                   ", %32, %33, p, 1, 1, %35, %36;\n}\n"                                      \
                   : MKA_D32                                                                  \
                   : "l"(a), "l"(b), "r"(acc), "n"(TA), "n"(TB));                             \
    }                                                                                         \
    template <int TB>                                                                         \
    static __device__ __forceinline__ void rs(float (&d)[32], const unsigned (&a)[4], uint64_t b, \
                                              int acc) {                                      \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                               \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " MKA_R32        \
                   ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                          \
                   : MKA_D32                                                                  \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(acc), "n"(TB));  \
    }                                                                                         \
  };                                                                                          \
  template <> struct Mma<CT, 128> {                                                           \
    template <int TA, int TB>                                                                 \
    static __device__ __forceinline__ void ss(float (&d)[64], uint64_t a, uint64_t b, int acc) { \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                               \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " MKA_R64       \
                   ", %64, %65, p, 1, 1, %67, %68;\n}\n"                                      \
                   : MKA_D64                                                                  \
                   : "l"(a), "l"(b), "r"(acc), "n"(TA), "n"(TB));                             \
    }                                                                                         \
    template <int TB>                                                                         \
    static __device__ __forceinline__ void rs(float (&d)[64], const unsigned (&a)[4], uint64_t b, \
                                              int acc) {                                      \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                               \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " MKA_R64       \
                   ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                          \
                   : MKA_D64                                                                  \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(acc), "n"(TB));  \
    }                                                                                         \
  };

MKA_DEFINE_WGMMA(__half, "f16")
MKA_DEFINE_WGMMA(__nv_bfloat16, "bf16")

#undef MKA_DEFINE_WGMMA
#undef MKA_R64
#undef MKA_R32
#undef MKA_D64
#undef MKA_D32
#undef MKA_D8

}  // namespace mka::cuda::wgmma
