// The one validation routine of every op: shapes, dtypes, devices, strides and options are
// checked here, for every backend, before any kernel touches memory.
#include "mka/problem.h"

#include <cmath>

#include "checks.h"
#include "mka/error.h"

namespace mka {

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::i32: return "int32";
  }
  return "?";
}

const char* device_name(Device dev) { return dev == Device::cpu ? "cpu" : "cuda"; }

DType stats_dtype(DType input) { return input == DType::f64 ? DType::f64 : DType::f32; }

namespace {

using checks::check_dims;
using checks::dtype_supported;

// Present, `ndim`-d, last dim contiguous, on `ref`'s device.
void check_tensor(const TensorRef& t, const char* name, int ndim, const char* layout,
                  const TensorRef& ref, const char* ref_name) {
  checks::check_layout(t, name, ndim, layout);
  checks::check_same_device(t, name, ref, ref_name);
}

void check_same_dtype(const TensorRef& t, const char* name, const TensorRef& ref,
                      const char* ref_name) {
  MKA_CHECK(t.dtype == ref.dtype, name, ": dtype ", dtype_name(t.dtype), " does not match ",
            ref_name, "'s ", dtype_name(ref.dtype));
}

}  // namespace

AttentionProblem check_attention(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                                 const AttnOptions& o) {
  check_tensor(q, "q", 4, "(B, Tq, H, d)", q, "q");
  check_tensor(k, "k", 4, "(B, Tk, G, d)", q, "q");
  check_tensor(v, "v", 4, "(B, Tk, G, d)", q, "q");
  MKA_CHECK(dtype_supported(q.dtype, q.device), "q: dtype ", dtype_name(q.dtype),
            " is not supported on ", device_name(q.device),
            q.device == Device::cpu ? " (float32, float64)" : " (float16, bfloat16, float32)");
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  AttentionProblem p;
  p.B = q.shape[0], p.Tq = q.shape[1], p.H = q.shape[2], p.d = q.shape[3];
  p.Tk = k.shape[1], p.G = k.shape[2];
  check_dims(k, "k", {p.B, -1, -1, p.d}, "(B, Tk, G, d) matching q's B and d");
  check_dims(v, "v", {k.shape[0], k.shape[1], k.shape[2], k.shape[3]}, "equal to k's");
  MKA_CHECK(p.G >= 1, "k: needs at least one key/value head, got G = ", p.G);
  MKA_CHECK(p.H % p.G == 0, "q: the number of query heads H = ", p.H,
            " must be a multiple of the key/value heads G = ", p.G);
  MKA_CHECK(p.d >= 1, "q: head dim must be at least 1, got ", p.d);
  if (q.device == Device::cpu)
    MKA_CHECK(p.d <= 256, "q: head dim ", p.d, " is not supported on cpu (at most 256)");
  else
    MKA_CHECK(p.d == 64 || p.d == 128, "q: head dim ", p.d,
              " is not supported on cuda (64 or 128)");
  checks::check_attn_options(o, q.dtype);
  p.causal = o.causal;
  p.scale = o.scale ? *o.scale : 1.0 / std::sqrt(double(p.d));
  // A window of Tk keys or more hides none: no window, which also keeps the visibility
  // bounds' arithmetic (i + (Tk - Tq) - window) far from overflow.
  p.window = o.window && *o.window < p.Tk ? *o.window : -1;
  p.dropout = DropoutMask{o.dropout_p, uint64_t(o.seed.value_or(0)), 0};
  p.dtype = q.dtype;
  p.device = q.device;
  p.device_id = q.device_id;
  return p;
}

RouteProblem check_route(const TensorRef& k, const TensorRef& v, const RouteInputs& r,
                         int64_t lam_tokens, const char* lam_shape, bool with_l3) {
  check_tensor(k, "k", 4, "(B, T, G, d)", k, "k");
  check_tensor(v, "v", 4, "(B, T, G, d)", k, "k");
  MKA_CHECK(dtype_supported(k.dtype, k.device), "k: dtype ", dtype_name(k.dtype),
            " is not supported on ", device_name(k.device));
  check_same_dtype(v, "v", k, "k");
  check_dims(v, "v", {k.shape[0], k.shape[1], k.shape[2], k.shape[3]}, "equal to k's");
  RouteProblem p;
  p.B = k.shape[0], p.T = k.shape[1], p.G = k.shape[2], p.d = k.shape[3];
  p.dtype = k.dtype;
  p.device = k.device;
  p.device_id = k.device_id;
  MKA_CHECK(std::isfinite(r.beta) && r.beta >= 0.0 && r.beta < 1.0,
            "beta: must be in [0, 1), got ", r.beta);
  p.beta = r.beta;

  check_tensor(r.lam, "lam", 3, lam_shape, k, "k");
  MKA_CHECK(r.lam.dtype == k.dtype || r.lam.dtype == DType::f32, "lam: dtype ",
            dtype_name(r.lam.dtype), " must be float32 or the inputs' ", dtype_name(k.dtype));
  check_dims(r.lam, "lam", {p.B, lam_tokens, -1}, lam_shape);
  p.L = r.lam.shape[2];
  MKA_CHECK(p.L == 2 || p.L == 3, "lam: expected L = 2 or 3 levels in its last dim, got ", p.L);

  if (with_l3) {
    for (auto [t, name] : {std::pair{&r.k3, "k3"}, std::pair{&r.v3, "v3"}}) {
      MKA_CHECK(t->present() == (p.L == 3), name,
                p.L == 3 ? ": required when lam has L = 3 levels"
                         : ": given, but lam has L = 2 levels (pass L = 3 to use it)");
      if (!t->present()) continue;
      check_tensor(*t, name, 4, "(B, Tk, G, d)", k, "k");
      check_same_dtype(*t, name, k, "k");
      check_dims(*t, name, {p.B, p.T, p.G, p.d}, "(B, Tk, G, d) equal to k's");
    }
  } else {
    MKA_CHECK(!r.k3.present(), "k3: not an input of this op (its level 3 is mem_k/mem_v)");
    MKA_CHECK(!r.v3.present(), "v3: not an input of this op (its level 3 is mem_k/mem_v)");
  }
  for (auto [t, name] : {std::pair{&r.k_state, "k_state"}, std::pair{&r.v_state, "v_state"}}) {
    if (!t->present()) continue;
    check_tensor(*t, name, 3, "(B, G, d)", k, "k");
    MKA_CHECK(t->dtype == stats_dtype(k.dtype), name, ": dtype ", dtype_name(t->dtype),
              " must be ", dtype_name(stats_dtype(k.dtype)), " for ", dtype_name(k.dtype),
              " inputs");
    check_dims(*t, name, {p.B, p.G, p.d}, "(B, G, d)");
  }
  p.has_state = r.k_state.present() || r.v_state.present();
  return p;
}

void check_memory(const AttentionProblem& p, const TensorRef& q, const TensorRef& mem_k,
                  const TensorRef& mem_v, int64_t L) {
  for (auto [t, name] : {std::pair{&mem_k, "mem_k"}, std::pair{&mem_v, "mem_v"}}) {
    MKA_CHECK(t->present() == (L == 3), name,
              L == 3 ? ": required when lam has L = 3 levels (it may hold M = 0 tokens)"
                     : ": given, but lam has L = 2 levels (pass L = 3 to use it)");
    if (!t->present()) continue;
    check_tensor(*t, name, 4, "(B, M, G, d)", q, "q");
    check_same_dtype(*t, name, q, "q");
    check_dims(*t, name, {p.B, mem_k.shape[1], p.G, p.d}, "(B, M, G, d) matching k");
  }
}

AttentionProblem level_problem(const AttentionProblem& ap, int l, int64_t M) {
  AttentionProblem p = ap;
  p.dropout.level = uint32_t(l);  // each level's weights: a mask of their own
  if (l >= 1) p.window = -1;
  if (l == 2) {
    p.Tk = M;
    p.causal = false;
  }
  return p;
}

void check_output(const TensorRef& t, const char* name, std::initializer_list<int64_t> shape,
                  DType dtype, Device device, int device_id) {
  MKA_CHECK(t.present() && t.ndim == int(shape.size()), name,
            ": output buffer has the wrong rank");
  check_dims(t, name, shape, "(output)");
  MKA_CHECK(t.dtype == dtype, name, ": output dtype ", dtype_name(t.dtype), ", expected ",
            dtype_name(dtype));
  MKA_CHECK(t.device == device && t.device_id == device_id, name, ": output on device ",
            device_name(t.device), ":", t.device_id, ", expected ", device_name(device), ":",
            device_id);
  MKA_CHECK(t.shape[t.ndim - 1] <= 1 || t.numel() == 0 || t.stride[t.ndim - 1] == 1, name,
            ": output's last dimension must be contiguous");
}

}  // namespace mka
