// add_layer_norm (mka/layers/norm_ops.h): validation, the CPU kernel and the device switch.
#include <cmath>
#include <string>

#include "../ops/checks.h"
#include "../ops/on_device.h"
#include "mka/cpu/thread_pool.h"
#include "mka/error.h"
#include "mka/layers/norm_ops.h"

namespace mka {
namespace {

using checks::check_dtype;
using checks::check_same_device;
using checks::check_shape;

NormProblem check(const AddLayerNorm& a) {
  check_shape(a.x, "x", {-1, -1}, "(N, C)");
  NormProblem p;
  p.N = a.x.shape[0], p.C = a.x.shape[1], p.dtype = a.x.dtype, p.eps = a.eps;
  p.device = a.x.device, p.device_id = a.x.device_id;
  MKA_CHECK(checks::dtype_supported(p.dtype, p.device), "x: dtype ", dtype_name(p.dtype),
            " is not supported on ", device_name(p.device));
  MKA_CHECK(std::isfinite(a.eps) && a.eps >= 0, "eps: must be finite and >= 0, got ", a.eps);
  for (auto [t, name] : {std::pair{&a.residual, "residual"}, std::pair{&a.out, "out"}}) {
    check_shape(*t, name, {p.N, p.C}, "(N, C) like x");
    check_dtype(*t, name, p.dtype);
    check_same_device(*t, name, a.x, "x");
  }
  for (auto [t, name] : {std::pair{&a.weight, "weight"}, std::pair{&a.bias, "bias"}}) {
    if (!t->present()) continue;
    check_shape(*t, name, {p.C}, "(C,)");
    check_dtype(*t, name, p.dtype);
    check_same_device(*t, name, a.x, "x");
  }
  // The residual is written in place; an out or x sharing its memory would be read after
  // it changed.
  MKA_CHECK(p.N == 0 || p.C == 0 || (a.out.data != a.residual.data && a.x.data != a.residual.data),
            "residual: must not share memory with x or out");
  return p;
}

template <class T> void cpu_rows(const NormProblem& p, const AddLayerNorm& a) {
  const T* w = a.weight.present() ? ptr<const T>(a.weight) : nullptr;
  const T* b = a.bias.present() ? ptr<const T>(a.bias) : nullptr;
  parallel_for(p.N, [&](int64_t n) {
    {  // one row: the add, its mean and variance, the normalised row
      const T* x = ptr<const T>(a.x) + n * a.x.stride[0];
      T* r = ptr<T>(a.residual) + n * a.residual.stride[0];
      T* o = ptr<T>(a.out) + n * a.out.stride[0];
      T sum = 0;
      for (int64_t c = 0; c < p.C; ++c) sum += (r[c] += x[c]);
      const T mean = sum / T(p.C);
      T sq = 0;
      for (int64_t c = 0; c < p.C; ++c) sq += (r[c] - mean) * (r[c] - mean);
      const T rstd = T(1) / std::sqrt(sq / T(p.C) + T(p.eps));
      for (int64_t c = 0; c < p.C; ++c) {
        T y = (r[c] - mean) * rstd;
        if (w) y *= w[c];
        if (b) y += b[c];
        o[c] = y;
      }
    }
  }, 8.0 * p.N * p.C);
}

}  // namespace

void add_layer_norm(const AddLayerNorm& a) {
  const NormProblem p = check(a);
  if (p.N == 0) return;
  on_device(p.device, "add_layer_norm", [&] {
    if (p.dtype == DType::f64) cpu_rows<double>(p, a);
    else cpu_rows<float>(p, a);
  }, [&] { MKA_CUDA_CALL(cuda::add_layer_norm(p, a)); });
}

}  // namespace mka
