// Building blocks of the CPU kernels: a register-blocked GEMM micro-kernel and a
// vectorisable exp. Everything here is always_inline so that it is compiled for the
// instruction set of the kernel that calls it (see MKA_ISA_VARIANTS).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "mka/cpu/isa.h"
#include "mka/cpu/thread_pool.h"

#define MKA_INLINE [[gnu::always_inline]] inline
#define MKA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MKA_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))

namespace mka::cpu {

// Native vector of the instruction set: 16 bytes (SSE2) for generic, 32 for AVX2, 64 for
// AVX-512. GCC/Clang vector extensions: the compiler maps them to whole registers, which
// plain loops over a C array did not get (it shuffled scalars through xmm registers).
template <Isa I> inline constexpr int kVecBytes = I == Isa::avx512 ? 64 : I == Isa::avx2 ? 32 : 16;
template <class T, int Bytes> struct VecOf;  // spelled out: GCC drops vector_size on alias templates
typedef float f32x4 __attribute__((vector_size(16), aligned(4)));
typedef float f32x8 __attribute__((vector_size(32), aligned(4)));
typedef float f32x16 __attribute__((vector_size(64), aligned(4)));
typedef double f64x2 __attribute__((vector_size(16), aligned(8)));
typedef double f64x4 __attribute__((vector_size(32), aligned(8)));
typedef double f64x8 __attribute__((vector_size(64), aligned(8)));
template <> struct VecOf<float, 16> { using type = f32x4; };
template <> struct VecOf<float, 32> { using type = f32x8; };
template <> struct VecOf<float, 64> { using type = f32x16; };
template <> struct VecOf<double, 16> { using type = f64x2; };
template <> struct VecOf<double, 32> { using type = f64x4; };
template <> struct VecOf<double, 64> { using type = f64x8; };
template <class T, Isa I> using Vec = typename VecOf<T, kVecBytes<I>>::type;
template <class T, Isa I> inline constexpr int kLanesOf = kVecBytes<I> / int(sizeof(T));
static_assert(sizeof(Vec<float, Isa::avx2>) == 32 && sizeof(Vec<double, Isa::generic>) == 16);

// Register tile of the GEMM micro-kernel: MR rows of C by two vectors (NR = 2 * lanes);
// MR*2 accumulators plus the B vectors fit the register file (16 or 32 registers).
template <class T, Isa I> struct Tile {
  static constexpr int NV = 2, NR = NV * kLanesOf<T, I>;
  static constexpr int MR = I == Isa::avx512 ? 12 : I == Isa::avx2 ? 6 : 4;
};

template <class V, class T> MKA_INLINE V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V, class T> MKA_INLINE void store_vec(T* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}
// All lanes = x. (GCC turns a per-lane store loop into slow inserts; the vector-scalar
// add becomes one vbroadcastss plus an add, which measured faster.)
template <class V, class T> MKA_INLINE V broadcast(T x) { return V{} + x; }

// R rows of C (+)= A * B over columns [j, j + NV * lanes): one strip held in registers.
template <class T, Isa I, int R, int NV>
MKA_INLINE void gemm_strip(int64_t j, int64_t K, const T* __restrict A, int64_t lda,
                           const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc,
                           bool accumulate) {
  using V = Vec<T, I>;
  constexpr int W = kLanesOf<T, I>;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c)
      acc[r][c] = accumulate ? load_vec<V>(C + r * ldc + j + c * W) : V{};
  for (int64_t kk = 0; kk < K; ++kk) {
    const T* b = B + kk * ldb + j;
    V bv[NV];
    for (int c = 0; c < NV; ++c) bv[c] = load_vec<V>(b + c * W);
    for (int r = 0; r < R; ++r) {
      const V a = broadcast<V>(A[r * lda + kk]);
      for (int c = 0; c < NV; ++c) acc[r][c] += a * bv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) store_vec(C + r * ldc + j + c * W, acc[r][c]);
}

// R rows of C (+)= A * B, in strips of NR columns held in registers, then strips of one
// vector (with AVX-512, N = 16 — a head dim of 16 — or the last 16 columns of N = 48, 80, ...
// would otherwise take the scalar loop, which reads B down columns), then the scalar rest.
template <class T, Isa I, int R>
MKA_INLINE void gemm_rows(int64_t N, int64_t K, const T* __restrict A, int64_t lda,
                          const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc,
                          bool accumulate) {
  constexpr int NV = Tile<T, I>::NV, W = kLanesOf<T, I>, NR = NV * W;
  int64_t j = 0;
  for (; j + NR <= N; j += NR)
    gemm_strip<T, I, R, NV>(j, K, A, lda, B, ldb, C, ldc, accumulate);
  for (; j + W <= N; j += W)
    gemm_strip<T, I, R, 1>(j, K, A, lda, B, ldb, C, ldc, accumulate);
  for (int r = 0; r < R && j < N; ++r) {  // column remainder
    T* crow = C + r * ldc;
    for (int64_t c = j; c < N; ++c) {
      T s = accumulate ? crow[c] : T(0);
      for (int64_t kk = 0; kk < K; ++kk) s += A[r * lda + kk] * B[kk * ldb + c];
      crow[c] = s;
    }
  }
}

// C[M x N] (+)= A[M x K] * B[K x N]; all row-major with leading dimensions.
// A is broadcast element by element, B rows are read as vectors.
template <class T, Isa I>
MKA_INLINE void gemm_nn(int64_t M, int64_t N, int64_t K, const T* __restrict A, int64_t lda,
                        const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc,
                        bool accumulate) {
  constexpr int MR = Tile<T, I>::MR;
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    gemm_rows<T, I, MR>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  // Remainder rows in blocks of 4, 2, 1 (tiles of 64 rows leave 4 when MR = 6 or 12).
  for (; i + 4 <= M; i += 4)
    gemm_rows<T, I, 4>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  for (; i + 2 <= M; i += 2)
    gemm_rows<T, I, 2>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  for (; i < M; ++i)
    gemm_rows<T, I, 1>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
}

// exp(x) for float with ~2 ulp error, written so the compiler vectorises it; exp(-inf)
// and anything below the float range is exactly 0 (masked scores must weigh nothing).
MKA_INLINE float exp_approx(float x) {
  const float t = std::max(x, -126.0f) * 1.44269504088896341f;  // x * log2(e)
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float f = t - n;  // in [-0.5, 0.5]
  // 2^f, degree-6 Taylor in f*ln2 (max rel. error ~2e-8 on [-0.5, 0.5]).
  float p = 1.5403530393381609e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;
  float r;
  std::memcpy(&r, &bits, sizeof r);
  return x < -87.0f ? 0.0f : r;
}
MKA_INLINE double exp_approx(double x) { return std::exp(x); }

// Sum of a vector's lanes as a tree of halvings (log2 lanes adds, not a chain of one add
// per lane), where the compiler has __builtin_shufflevector (GCC 12, Clang).
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define MKA_HAS_SHUFFLEVECTOR 1
#endif
#endif
#ifdef MKA_HAS_SHUFFLEVECTOR
template <class V, size_t... I>
MKA_INLINE auto add_halves(V v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, I...) + __builtin_shufflevector(v, v, (I + sizeof...(I))...);
}
#endif
template <class V> MKA_INLINE auto reduce_add(V v) {
  constexpr size_t N = sizeof(V) / sizeof(v[0]);
  if constexpr (N == 2) {
    return v[0] + v[1];
  } else {
#ifdef MKA_HAS_SHUFFLEVECTOR
    return reduce_add(add_halves(v, std::make_index_sequence<N / 2>{}));
#else
    auto s = v[0];
    for (size_t i = 1; i < N; ++i) s += v[i];
    return s;
#endif
  }
}

// Scores of RR query rows Q (RR x d, row-major) against one key row k: S[r * ldS] = Q_r . k.
// For few rows (decode) this beats a GEMM, which would need the keys transposed first.
template <class T, Isa I, int RR>
MKA_INLINE void dot_rows(const T* __restrict Q, int64_t d, const T* __restrict k, T* S,
                         int64_t ldS) {
  using V = Vec<T, I>;
  constexpr int W = kLanesOf<T, I>;
  V acc[RR];
  for (int r = 0; r < RR; ++r) acc[r] = V{};
  int64_t x = 0;
  for (; x + W <= d; x += W) {
    const V kv = load_vec<V>(k + x);
    for (int r = 0; r < RR; ++r) acc[r] += kv * load_vec<V>(Q + r * d + x);
  }
  for (int r = 0; r < RR; ++r) {
    T s = reduce_add(acc[r]);
    for (int64_t xx = x; xx < d; ++xx) s += Q[r * d + xx] * k[xx];
    S[r * ldS] = s;
  }
}

// dot_rows for any R, in groups of at most 8 rows.
template <class T, Isa I>
MKA_INLINE void dot_many(int64_t R, const T* Q, int64_t d, const T* k, T* S, int64_t ldS) {
  for (int64_t r0 = 0; r0 < R; r0 += 8) {
    const T* q = Q + r0 * d;
    T* s = S + r0 * ldS;
    switch (std::min<int64_t>(8, R - r0)) {
      case 8: dot_rows<T, I, 8>(q, d, k, s, ldS); break;
      case 7: dot_rows<T, I, 7>(q, d, k, s, ldS); break;
      case 6: dot_rows<T, I, 6>(q, d, k, s, ldS); break;
      case 5: dot_rows<T, I, 5>(q, d, k, s, ldS); break;
      case 4: dot_rows<T, I, 4>(q, d, k, s, ldS); break;
      case 3: dot_rows<T, I, 3>(q, d, k, s, ldS); break;
      case 2: dot_rows<T, I, 2>(q, d, k, s, ldS); break;
      default: dot_rows<T, I, 1>(q, d, k, s, ldS); break;
    }
  }
}

// Row reductions of the online softmax, shared by the attention kernels.
inline constexpr int kLanes = 16;  // partial accumulators that let row reductions vectorise

template <class T> MKA_INLINE T row_max(const T* s, int64_t n) {
  T acc[kLanes];
  for (int u = 0; u < kLanes; ++u) acc[u] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int u = 0; u < kLanes; ++u) acc[u] = s[j + u] > acc[u] ? s[j + u] : acc[u];
  T m = -std::numeric_limits<T>::infinity();
  for (int u = 0; u < kLanes; ++u) m = acc[u] > m ? acc[u] : m;
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s <- exp(s - m) in place; returns the sum.
template <class T> MKA_INLINE T row_exp_sum(T* s, int64_t n, T m) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int u = 0; u < kLanes; ++u) {
      s[j + u] = exp_approx(s[j + u] - m);
      acc[u] += s[j + u];
    }
  T sum = 0;
  for (int u = 0; u < kLanes; ++u) sum += acc[u];
  for (; j < n; ++j) {
    s[j] = exp_approx(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// Thread-local scratch, grown on demand and reused across calls.
template <class T> T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Runs a kernel's tasks on the thread pool, each compiled for the best instruction set
// this CPU has. K is a struct with `using Ctx = ...;` and an always_inline
// `template <Isa I> static void run(const Ctx&, int64_t task)`; the wrappers below carry
// the target attribute, so everything K::run inlines is vectorised for that ISA.
template <class K> MKA_TARGET_AVX512 void task_avx512(const typename K::Ctx& c, int64_t i) {
  K::template run<Isa::avx512>(c, i);
}
template <class K> MKA_TARGET_AVX2 void task_avx2(const typename K::Ctx& c, int64_t i) {
  K::template run<Isa::avx2>(c, i);
}
template <class K> void task_generic(const typename K::Ctx& c, int64_t i) {
  K::template run<Isa::generic>(c, i);
}

template <class K> void run_tasks(int64_t n, const typename K::Ctx& c, double work = kInlineWork) {
  void (*fn)(const typename K::Ctx&, int64_t) = &task_generic<K>;
  if (cpu_isa() == Isa::avx512) fn = &task_avx512<K>;
  else if (cpu_isa() == Isa::avx2) fn = &task_avx2<K>;
  parallel_for(n, [&](int64_t i) { fn(c, i); }, work);
}

}  // namespace mka::cpu
