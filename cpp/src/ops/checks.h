// Input checks shared by the validation of the dense ops (problem.cpp) and of the paged ops
// (memory/paged_ops.cpp): one message per kind of mistake, wherever it is made.
#pragma once
#include <cmath>
#include <initializer_list>
#include <string>

#include "mka/error.h"
#include "mka/op_args.h"
#include "mka/problem.h"
#include "mka/tensor.h"

namespace mka::checks {

inline std::string shape_str(const TensorRef& t) {
  std::string s = "(";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + ")";
}

inline bool dtype_supported(DType dt, Device dev) {
  if (dev == Device::cpu) return dt == DType::f32 || dt == DType::f64;
  return dt == DType::f16 || dt == DType::bf16 || dt == DType::f32;
}

// The dims of `shape` that are >= 0 match t's (t has at least as many dims).
inline void check_dims(const TensorRef& t, const char* name, std::initializer_list<int64_t> shape,
                       const char* layout) {
  int i = 0;
  for (int64_t s : shape) {
    MKA_CHECK(s < 0 || t.shape[i] == s, name, ": expected shape ", layout, " with dim ", i,
              " = ", s, ", got ", shape_str(t));
    ++i;
  }
}

// Present, `ndim`-d, last dim contiguous.
inline void check_layout(const TensorRef& t, const char* name, int ndim, const char* layout) {
  MKA_CHECK(t.present(), name, ": expected a tensor ", layout, ", got None");
  MKA_CHECK(t.ndim == ndim, name, ": expected a ", ndim, "-d tensor ", layout, ", got shape ",
            shape_str(t));
  MKA_CHECK(t.shape[ndim - 1] <= 1 || t.numel() == 0 || t.stride[ndim - 1] == 1, name,
            ": the last dimension must be contiguous (stride 1), got stride ",
            t.stride[ndim - 1]);
}

// Present, of `shape`'s rank and its dims (-1: any), last dim contiguous.
inline void check_shape(const TensorRef& t, const char* name, std::initializer_list<int64_t> shape,
                        const char* layout) {
  check_layout(t, name, int(shape.size()), layout);
  check_dims(t, name, shape, layout);
}

inline void check_dtype(const TensorRef& t, const char* name, DType dt) {
  MKA_CHECK(t.dtype == dt, name, ": dtype ", dtype_name(t.dtype), ", expected ", dtype_name(dt));
}

// t lives where `ref` (named ref_name) does.
inline void check_same_device(const TensorRef& t, const char* name, const TensorRef& ref,
                              const char* ref_name) {
  MKA_CHECK(t.device == ref.device && t.device_id == ref.device_id, name, ": is on ",
            device_name(t.device), ":", t.device_id, " but ", ref_name, " is on ",
            device_name(ref.device), ":", ref.device_id);
}

// window >= 1; a finite scale, within float32's range below float64 (the kernels compute
// in float32, the GPU ones with scale * log2(e)).
inline void check_attn_options(const AttnOptions& o, DType dtype) {
  if (o.window) MKA_CHECK(*o.window >= 1, "window: must be at least 1, got ", *o.window);
  MKA_CHECK(o.dropout_p >= 0.0 && o.dropout_p < 1.0, "dropout_p: must be in [0, 1), got ",
            o.dropout_p);
  MKA_CHECK(o.dropout_p == 0.0 || o.seed, "seed: required with dropout_p > 0 (the mask's key)");
  if (!o.scale) return;
  MKA_CHECK(std::isfinite(*o.scale), "scale: must be finite, got ", *o.scale);
  MKA_CHECK(dtype == DType::f64 || std::fabs(*o.scale) <= kMaxFloatScale, "scale: ", *o.scale,
            " is out of float32's range for ", dtype_name(dtype), " inputs (|scale| at most ",
            kMaxFloatScale, ")");
}

}  // namespace mka::checks
