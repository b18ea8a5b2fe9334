// linear_small (mka/layers/linear_ops.h): validation, the CPU loops and the device switch.
#include <algorithm>
#include <cmath>

#include "../cpu/simd.h"
#include "../ops/checks.h"
#include "../ops/on_device.h"
#include "mka/cpu/thread_pool.h"
#include "mka/error.h"
#include "mka/layers/linear_ops.h"

namespace mka {
namespace {

using checks::check_dtype;
using checks::check_same_device;
using checks::check_shape;

LinearProblem check(const LinearSmall& a) {
  check_shape(a.x, "x", {-1, -1}, "(M, K)");
  LinearProblem p;
  p.M = a.x.shape[0], p.K = a.x.shape[1], p.dtype = a.x.dtype;
  p.device = a.x.device, p.device_id = a.x.device_id;
  MKA_CHECK(checks::dtype_supported(p.dtype, p.device), "x: dtype ", dtype_name(p.dtype),
            " is not supported on ", device_name(p.device));
  MKA_CHECK(p.M <= kLinearMaxRows, "x: linear_small takes at most ", kLinearMaxRows,
            " rows, got ", p.M);
  check_shape(a.weight, "weight", {-1, p.K}, "(N, K) with x's K");
  p.N = a.weight.shape[0];
  check_dtype(a.weight, "weight", p.dtype);
  check_same_device(a.weight, "weight", a.x, "x");
  if (a.bias.present()) {
    check_shape(a.bias, "bias", {p.N}, "(N,)");
    check_dtype(a.bias, "bias", p.dtype);
    check_same_device(a.bias, "bias", a.x, "x");
  }
  check_shape(a.out, "out", {p.M, p.N}, "(M, N)");
  check_dtype(a.out, "out", p.dtype);
  check_same_device(a.out, "out", a.x, "x");
  MKA_CHECK(a.activation == 0 || a.activation == 1, "activation: 0 (none) or 1 (gelu), got ",
            a.activation);
  p.activation = int(a.activation);
  return p;
}

// x . w over K: four 16-byte vector accumulators (SSE2/NEON width, every build has it), so a
// row of W streams at a few GB/s per core instead of one multiply-add per element.
template <class T> T dot(const T* x, const T* w, int64_t K) {
  using V = typename cpu::VecOf<T, 16>::type;
  constexpr int64_t L = 16 / sizeof(T);
  V a0{}, a1{}, a2{}, a3{};
  int64_t k = 0;
  for (; k + 4 * L <= K; k += 4 * L) {
    a0 += cpu::load_vec<V>(x + k) * cpu::load_vec<V>(w + k);
    a1 += cpu::load_vec<V>(x + k + L) * cpu::load_vec<V>(w + k + L);
    a2 += cpu::load_vec<V>(x + k + 2 * L) * cpu::load_vec<V>(w + k + 2 * L);
    a3 += cpu::load_vec<V>(x + k + 3 * L) * cpu::load_vec<V>(w + k + 3 * L);
  }
  for (; k + L <= K; k += L) a0 += cpu::load_vec<V>(x + k) * cpu::load_vec<V>(w + k);
  T s = cpu::reduce_add((a0 + a1) + (a2 + a3));
  for (; k < K; ++k) s += x[k] * w[k];
  return s;
}

template <class T> void cpu_linear(const LinearProblem& p, const LinearSmall& a) {
  const T* b = a.bias.present() ? ptr<const T>(a.bias) : nullptr;
  constexpr int64_t kFeatures = 64;  // output features per task: a task is ~64 rows of W
  parallel_for((p.N + kFeatures - 1) / kFeatures, [&](int64_t task) {
    const int64_t end = std::min(p.N, (task + 1) * kFeatures);
    for (int64_t n = task * kFeatures; n < end; ++n) {
      const T* w = ptr<const T>(a.weight) + n * a.weight.stride[0];
      for (int64_t m = 0; m < p.M; ++m) {
        const T* x = ptr<const T>(a.x) + m * a.x.stride[0];
        T acc = dot(x, w, p.K);
        if (b) acc += b[n];
        if (p.activation == 1) acc = T(0.5) * acc * (T(1) + std::erf(acc / std::sqrt(T(2))));
        ptr<T>(a.out)[m * a.out.stride[0] + n] = acc;
      }
    }
  }, double(p.M) * p.N * p.K);
}

}  // namespace

void linear_small(const LinearSmall& a) {
  const LinearProblem p = check(a);
  if (p.M == 0 || p.N == 0) return;
  on_device(p.device, "linear_small", [&] {
    if (p.dtype == DType::f64) cpu_linear<double>(p, a);
    else cpu_linear<float>(p, a);
  }, [&] { MKA_CUDA_CALL(cuda::linear_small(p, a)); });
}

}  // namespace mka
