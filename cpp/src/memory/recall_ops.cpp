// Validation and dispatch of recall attention (mka/memory/recall_ops.h): shapes, dtypes and
// devices of every tensor, and on the CPU every chosen chunk index, before any key is read.
// CUDA tensors' chosen indices stay on the device (reading them here would synchronise every
// call): the kernels check each entry and write NaN rows for invalid ones (SPEC §7.2).
#include "mka/memory/recall_ops.h"

#include <cmath>

#include "../ops/checks.h"
#include "../ops/on_device.h"
#include "mka/error.h"
#include "mka/problem.h"

namespace mka {
namespace {

using checks::check_dtype;
using checks::check_shape;

void check_like_q(const TensorRef& t, const char* name, const TensorRef& q) {
  checks::check_same_device(t, name, q, "q");
}

RecallProblem check_recall(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                           const TensorRef& chosen, int64_t chunk,
                           const std::optional<double>& scale) {
  check_shape(q, "q", {-1, -1, -1, -1}, "(B, Tq, H, d)");
  MKA_CHECK(checks::dtype_supported(q.dtype, q.device), "q: dtype ", dtype_name(q.dtype),
            " is not supported on ", device_name(q.device));
  RecallProblem p;
  p.B = q.shape[0], p.Tq = q.shape[1], p.H = q.shape[2], p.d = q.shape[3], p.dtype = q.dtype;
  check_shape(k, "k", {p.B, -1, -1, p.d}, "(B, Tk, G, d) matching q's B and d");
  check_shape(v, "v", {p.B, k.shape[1], k.shape[2], p.d}, "(B, Tk, G, d) equal to k's");
  p.Tk = k.shape[1], p.G = k.shape[2];
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_like_q(*t, name, q);
    check_dtype(*t, name, q.dtype);
  }
  MKA_CHECK(p.G >= 1 && p.H % p.G == 0, "q: the query heads H = ", p.H,
            " must be a multiple of the key/value heads G = ", p.G);
  MKA_CHECK(chunk >= 1, "chunk: must be at least 1, got ", chunk);
  p.C = chunk;
  check_shape(chosen, "chosen", {p.B, p.Tq, p.G, -1}, "(B, Tq, G, R) int32");
  check_dtype(chosen, "chosen", DType::i32);
  check_like_q(chosen, "chosen", q);
  p.R = chosen.shape[3];
  if (scale) MKA_CHECK(std::isfinite(*scale), "scale: must be finite, got ", *scale);
  p.scale = scale ? *scale : 1.0 / std::sqrt(double(p.d));
  if (q.device != Device::cpu) return p;
  // every index the kernels follow: -1 or a whole chunk of the keys
  const int64_t chunks = p.Tk / p.C;
  const int32_t* c = ptr<const int32_t>(chosen);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t t = 0; t < p.Tq; ++t)
      for (int64_t g = 0; g < p.G; ++g)
        for (int64_t r = 0; r < p.R; ++r) {
          const int64_t x = c[b * chosen.stride[0] + t * chosen.stride[1] +
                              g * chosen.stride[2] + r * chosen.stride[3]];
          MKA_CHECK(x >= -1 && x < chunks, "chosen: entry [", b, ", ", t, ", ", g, ", ", r,
                    "] = ", x, " is neither -1 nor a whole chunk of the ", p.Tk, " keys (",
                    chunks, " chunks of ", p.C, ")");
        }
  return p;
}

void check_out(const TensorRef& t, const char* name, std::initializer_list<int64_t> shape,
               DType dt, const TensorRef& q) {
  check_shape(t, name, shape, "(output)");
  check_dtype(t, name, dt);
  check_like_q(t, name, q);
}

}  // namespace

void recall_forward(const RecallFwd& a) {
  const RecallProblem p = check_recall(a.q, a.k, a.v, a.chosen, a.chunk, a.scale);
  check_out(a.out, "out", {p.B, p.Tq, p.H, p.d}, p.dtype, a.q);
  check_out(a.lse, "lse", {p.B, p.H, p.Tq}, stats_dtype(p.dtype), a.q);
  MKA_CHECK(is_contiguous(a.lse), "lse: must be contiguous");
  on_device(a.q.device, "recall_forward", [&] { cpu::recall_fwd(p, a); },
            [&] { MKA_CUDA_CALL(cuda::recall_fwd(p, a)); });
}

void recall_backward(const RecallBwd& a) {
  const RecallProblem p = check_recall(a.q, a.k, a.v, a.chosen, a.chunk, a.scale);
  check_out(a.out, "out", {p.B, p.Tq, p.H, p.d}, p.dtype, a.q);
  check_out(a.dout, "dout", {p.B, p.Tq, p.H, p.d}, p.dtype, a.q);
  check_out(a.lse, "lse", {p.B, p.H, p.Tq}, stats_dtype(p.dtype), a.q);
  MKA_CHECK(is_contiguous(a.lse), "lse: must be contiguous");
  check_out(a.dq, "dq", {p.B, p.Tq, p.H, p.d}, p.dtype, a.q);
  check_out(a.dk, "dk", {p.B, p.Tk, p.G, p.d}, p.dtype, a.q);
  check_out(a.dv, "dv", {p.B, p.Tk, p.G, p.d}, p.dtype, a.q);
  on_device(a.q.device, "recall_backward", [&] { cpu::recall_bwd(p, a); },
            [&] { MKA_CUDA_CALL(cuda::recall_bwd(p, a)); });
}

}  // namespace mka
