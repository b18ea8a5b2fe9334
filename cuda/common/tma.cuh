// Tensor Memory Access (sm_90): a (B, T, heads, d) view described once on the host as a
// tensor map, and bulk copies of row tiles into 128-byte-swizzled shared memory that
// complete on an mbarrier (by bytes, not by arrivals), and float32 tiles added from shared
// memory onto a view (bulk reductions). One thread issues a whole tile, so the threads that
// compute never spend issue slots or registers on addresses.
#pragma once
#include <cuda.h>  // CUtensorMap and cuTensorMapEncodeTiled's signature; the entry point
                   // itself comes from the runtime, so nothing links libcuda

#include "common/device_utils.cuh"
#include "common/mbarrier.cuh"

namespace mka::cuda {

// --- host: a view's tensor map ------------------------------------------------------------

using EncodeTiledFn = decltype(&cuTensorMapEncodeTiled);

// The driver's encoder, or null where the driver lacks it (then the callers keep to the
// kernels that load with cp.async).
inline EncodeTiledFn tensor_map_encoder() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                          cudaEnableDefault, &found);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f,
                                                  cudaEnableDefault, &found);
#endif
    if (e != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return EncodeTiledFn(nullptr);
    }
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// The map of a (B, T, heads, D) view whose boxes are `rows` consecutive rows of one head and
// one 128-byte panel of columns (a sw128 tile's panel: 64 16-bit or 32 float32 columns): dims
// innermost first (d, heads, T, B), coordinates (column, head, row, batch). Rows past T read
// as zeros and are not written by reductions. False where the view cannot be described (the
// driver refuses it): the caller takes another kernel.
inline bool panel_tensor_map(CUtensorMap* map, const Rows& x, int elem_bytes, int64_t B,
                             int64_t T, int64_t heads, int64_t D, int rows) {
  const EncodeTiledFn encode = tensor_map_encoder();
  if (!encode || B < 1 || T < 1 || heads < 1 || rows > 256) return false;
  // A dimension of extent 1 is never stepped over; give it a stride the encoder accepts.
  auto stride = [&](int64_t elems, int64_t extent, uint64_t fallback) -> uint64_t {
    return extent == 1 ? fallback : uint64_t(elems) * uint64_t(elem_bytes);
  };
  const uint64_t sh = stride(x.sh, heads, uint64_t(D) * elem_bytes);
  const uint64_t st = stride(x.st, T, sh * uint64_t(heads));
  const uint64_t sb = stride(x.sb, B, st * uint64_t(T));
  const cuuint64_t dims[4] = {cuuint64_t(D), cuuint64_t(heads), cuuint64_t(T), cuuint64_t(B)};
  const cuuint64_t strides[3] = {sh, st, sb};
  const cuuint32_t box[4] = {cuuint32_t(128 / elem_bytes), 1, cuuint32_t(rows), 1};
  const cuuint32_t one[4] = {1, 1, 1, 1};
  return encode(map, elem_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
                4, x.data, dims, strides, box, one, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}
// A 16-bit view's map (64-column boxes).
inline bool rows_tensor_map(CUtensorMap* map, const Rows& x, int64_t B, int64_t T,
                            int64_t heads, int64_t D, int rows) {
  return panel_tensor_map(map, x, 2, B, T, heads, D, rows);
}
// A float32 view's map (32-column boxes): the target of the backward's dQ reductions.
inline bool rows_tensor_map_f32(CUtensorMap* map, const Rows& x, int64_t B, int64_t T,
                                int64_t heads, int64_t D, int rows) {
  return panel_tensor_map(map, x, 4, B, T, heads, D, rows);
}

// The map of a dense float32 array of n elements read in boxes of `box` consecutive elements
// (`box` a multiple of 4; a box starts at a multiple of 4 elements: 16 bytes, or the copy
// traps); elements past n read as zeros. False where the driver refuses it (the caller takes
// another kernel).
inline bool floats_tensor_map(CUtensorMap* map, const float* x, int64_t n, int box) {
  const EncodeTiledFn encode = tensor_map_encoder();
  if (!encode || n < 1 || n >= (int64_t(1) << 31) || box > 256) return false;
  const cuuint64_t dims[1] = {cuuint64_t(n)};
  const cuuint64_t strides[1] = {4};  // unused at rank 1
  const cuuint32_t boxes[1] = {cuuint32_t(box)}, one[1] = {1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 1, const_cast<float*>(x), dims, strides,
                boxes, one, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// --- device -------------------------------------------------------------------------------

namespace mbar {
// Arrives (count 1) and adds `bytes` to the transaction count the phase waits for.
__device__ __forceinline__ void arrive_expect_tx(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(addr(bar)),
               "r"(bytes)
               : "memory");
}
// Makes initialised barriers visible to the asynchronous proxy (the TMA unit) before use.
__device__ __forceinline__ void fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
}  // namespace mbar

namespace tma {
// Box (col, head, row, batch) of `map` into shared memory at `dst`; completes `bytes` on bar.
__device__ __forceinline__ void load(void* dst, const CUtensorMap& map, int col, int head,
                                     int row, int batch, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(unsigned(__cvta_generic_to_shared(dst))),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(col), "r"(head), "r"(row), "r"(batch),
      "r"(mbar::addr(bar))
      : "memory");
}
// The box of a floats_tensor_map starting at element `at` into shared memory at `dst` (128-byte
// aligned); completes its bytes on bar.
__device__ __forceinline__ void load_floats(void* dst, const CUtensorMap& map, int at, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.1d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2}], [%3];\n" ::"r"(unsigned(__cvta_generic_to_shared(dst))),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(at), "r"(mbar::addr(bar))
      : "memory");
}
// Rows [row, row + R) of head `head` into an R x D sw128 tile (D / 64 panels, one box each).
template <int R, int D>
__device__ __forceinline__ void load_tile(void* tile, const CUtensorMap& map, int64_t b,
                                          int64_t row, int64_t head, uint64_t* bar) {
  #pragma unroll
  for (int c = 0; c < D / 64; ++c)
    load(static_cast<char*>(tile) + c * R * 128, map, c * 64, int(head), int(row), int(b), bar);
}
// Adds a float32 sw128 panel (`rows` x 32, at `src`, 1024-byte aligned) onto box (col, head,
// row, batch) of `map` in global memory, element-wise (rows past T are dropped). The threads
// that wrote `src` must have fenced their writes for the async proxy (fence.proxy.async) and
// met the issuing thread at a barrier. Joins the issuing thread's open bulk group.
__device__ __forceinline__ void reduce_add(const CUtensorMap& map, const void* src, int col,
                                           int head, int row, int batch) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group"
      " [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(reinterpret_cast<uint64_t>(&map)),
      "r"(col), "r"(head), "r"(row), "r"(batch), "r"(unsigned(__cvta_generic_to_shared(src)))
      : "memory");
}
// Closes the issuing thread's open bulk group.
__device__ __forceinline__ void commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most N of the issuing thread's bulk groups still read shared memory.
template <int N> __device__ __forceinline__ void wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// Waits until at most N of the issuing thread's bulk groups are incomplete (writes visible).
template <int N> __device__ __forceinline__ void wait_done() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void prefetch(const CUtensorMap& map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map)) : "memory");
}
}  // namespace tma

// Register budget of the calling warpgroup (all its threads execute it): producers give
// registers back, consumers take them.
template <int N> __device__ __forceinline__ void regs_down() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void regs_up() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace mka::cuda
