// A strided tensor view handed over by the binding: raw pointer, shape and strides
// (in elements), dtype and device. The core never owns or allocates tensor memory.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace mka {

// i32: index tensors (block tables, sequence lengths); every other argument is floating.
enum class DType : int { f16, bf16, f32, f64, i32 };
enum class Device : int { cpu, cuda };

const char* dtype_name(DType dt);
const char* device_name(Device dev);

inline constexpr int kMaxDims = 5;

struct TensorRef {
  void* data = nullptr;
  int ndim = -1;  // -1: the optional argument was not given
  int64_t shape[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int device_id = 0;

  bool present() const { return ndim >= 0; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
};

template <class T> T* ptr(const TensorRef& t) { return static_cast<T*>(t.data); }

inline size_t dtype_bytes(DType dt) {
  return dt == DType::f64 ? 8 : (dt == DType::f32 || dt == DType::i32) ? 4 : 2;
}

// Row-major dense (dimensions of size 0 or 1 may have any stride); an empty tensor is.
inline bool is_contiguous(const TensorRef& t) {
  if (t.numel() == 0) return true;
  int64_t expect = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.shape[d] > 1 && t.stride[d] != expect) return false;
    expect *= t.shape[d];
  }
  return true;
}

}  // namespace mka
