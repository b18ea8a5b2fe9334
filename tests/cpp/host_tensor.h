// Test-side tensors: HostTensor owns host memory and hands out mka::TensorRef views, with
// optional padding between rows so the kernels' stride handling is exercised too.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "mka/tensor.h"

namespace mka::test {

using Vec = std::vector<double>;

inline size_t elem_bytes(DType dt) {
  return dt == DType::f64 ? 8 : dt == DType::f32 ? 4 : 2;
}

// A tensor in host memory. `pad` extra elements follow every row of every dimension except
// the last (stride[i] = shape[i+1] * stride[i+1] + pad), so pad > 0 gives a strided view
// whose gaps hold NaN: a kernel reading them poisons its result, one writing them is caught
// by padding_intact().
class HostTensor {
 public:
  HostTensor() = default;  // absent optional argument: ref().present() is false
  HostTensor(DType dtype, std::vector<int64_t> shape, int64_t pad = 0)
      : dtype_(dtype), shape_(std::move(shape)), pad_(pad) {
    const int nd = int(shape_.size());
    stride_.assign(nd, 1);
    for (int i = nd - 2; i >= 0; --i) stride_[i] = shape_[i + 1] * stride_[i + 1] + pad;
    int64_t count = 1;
    for (int64_t s : shape_) count *= s;
    span_ = count == 0 ? 0 : 1;  // one past the farthest element
    for (int i = 0; i < nd && count > 0; ++i) span_ += (shape_[i] - 1) * stride_[i];
    storage_.assign((size_t(span_) * elem_bytes(dtype_) + 7) / 8 + 1, 0.0);
    if (pad > 0) fill_storage_with_nan();
    for (int64_t i = 0; i < numel(); ++i) set(i, 0.0);
  }

  // Uniform values in [lo, hi) from `rng`, stored in this tensor's dtype.
  static HostTensor random(DType dtype, std::vector<int64_t> shape, std::mt19937_64& rng,
                           int64_t pad = 0, double lo = -1.0, double hi = 1.0) {
    HostTensor t(dtype, std::move(shape), pad);
    std::uniform_real_distribution<double> u(lo, hi);
    for (int64_t i = 0; i < t.numel(); ++i) t.set(i, u(rng));
    return t;
  }

  TensorRef ref() const {
    TensorRef r;
    if (!present()) return r;
    r.data = const_cast<double*>(storage_.data());
    r.ndim = int(shape_.size());
    for (int i = 0; i < r.ndim; ++i) {
      r.shape[i] = shape_[i];
      r.stride[i] = stride_[i];
    }
    r.dtype = dtype_;
    return r;
  }
  operator TensorRef() const { return ref(); }

  bool present() const { return !storage_.empty(); }
  int64_t numel() const {
    if (!present()) return 0;
    int64_t n = 1;
    for (int64_t s : shape_) n *= s;
    return n;
  }
  const std::vector<int64_t>& shape() const { return shape_; }

  // Zero the logical elements (padding keeps its NaN): a fresh gradient buffer.
  void zero() {
    if (pad_ == 0) std::memset(storage_.data(), 0, storage_.size() * sizeof(double));
    else
      for (int64_t i = 0; i < numel(); ++i) set(i, 0.0);
  }

  // Element `i` of the logical row-major order.
  double get(int64_t i) const {
    const int64_t o = offset(i);
    if (dtype_ == DType::f64) return reinterpret_cast<const double*>(storage_.data())[o];
    return reinterpret_cast<const float*>(storage_.data())[o];
  }
  void set(int64_t i, double x) {
    const int64_t o = offset(i);
    if (dtype_ == DType::f64) reinterpret_cast<double*>(storage_.data())[o] = x;
    else if (dtype_ == DType::f32) reinterpret_cast<float*>(storage_.data())[o] = float(x);
    // f16/bf16 tensors only feed validation tests, which never read the data.
  }
  Vec values() const {
    Vec v(static_cast<size_t>(numel()));
    for (int64_t i = 0; i < numel(); ++i) v[size_t(i)] = get(i);
    return v;
  }

  // True while every storage element outside the logical view still holds its NaN.
  bool padding_intact() const {
    std::vector<bool> inside(size_t(span_), false);
    for (int64_t i = 0; i < numel(); ++i) inside[size_t(offset(i))] = true;
    for (int64_t o = 0; o < span_; ++o)
      if (!inside[size_t(o)] && !std::isnan(raw(o))) return false;
    return true;
  }

 private:
  int64_t offset(int64_t i) const {
    int64_t o = 0;
    for (int d = int(shape_.size()) - 1; d >= 0; --d) {
      o += (i % shape_[d]) * stride_[d];
      i /= shape_[d];
    }
    return o;
  }
  double raw(int64_t o) const {
    if (dtype_ == DType::f64) return reinterpret_cast<const double*>(storage_.data())[o];
    return reinterpret_cast<const float*>(storage_.data())[o];
  }
  void fill_storage_with_nan() {
    const int64_t n = int64_t(storage_.size() * 8 / elem_bytes(dtype_));
    for (int64_t o = 0; o < n; ++o) {
      if (dtype_ == DType::f64)
        reinterpret_cast<double*>(storage_.data())[o] = std::numeric_limits<double>::quiet_NaN();
      else if (dtype_ == DType::f32)
        reinterpret_cast<float*>(storage_.data())[o] = std::numeric_limits<float>::quiet_NaN();
    }
  }

  DType dtype_ = DType::f32;
  std::vector<int64_t> shape_, stride_;
  int64_t pad_ = 0;
  int64_t span_ = 0;
  std::vector<double> storage_;  // 8-byte aligned storage for any dtype
};

// ||got - ref|| / ||ref||; for an all-zero reference, ||got|| itself. NaN stays NaN.
inline double rel_err(const Vec& got, const Vec& ref) {
  if (got.size() != ref.size()) return std::numeric_limits<double>::quiet_NaN();
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// The accuracy bar of SPEC §5 for a kernel's dtype.
inline double tolerance(DType dt) { return dt == DType::f64 ? 1e-10 : 1e-5; }

}  // namespace mka::test
