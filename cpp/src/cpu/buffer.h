// A zero-filled, contiguous scratch tensor owned by a CPU composition (fused keys, EMA
// keys, their gradients). The CPU side may allocate; GPU launchers take workspace instead.
#pragma once
#include <vector>

#include "mka/problem.h"
#include "mka/tensor.h"

namespace mka::cpu {

class Buffer {
 public:
  Buffer(DType dtype, std::initializer_list<int64_t> shape) {
    ref_.ndim = int(shape.size());
    ref_.dtype = dtype;
    int i = 0;
    for (int64_t s : shape) ref_.shape[i++] = s;
    int64_t stride = 1;
    for (int d = ref_.ndim - 1; d >= 0; --d) {
      ref_.stride[d] = stride;
      stride *= ref_.shape[d];
    }
    const size_t elem = dtype == DType::f64 ? 8 : 4;
    storage_.assign((size_t(stride) * elem + 7) / 8, 0.0);
    ref_.data = storage_.data();
  }
  const TensorRef& ref() const { return ref_; }
  operator const TensorRef&() const { return ref_; }

 private:
  std::vector<double> storage_;  // 8-byte aligned storage for float or double
  TensorRef ref_;
};

// Keys/values (B, Tk, G, d) a composition derives from k, v (fastmka's fused ones, mka's EMA
// ones): the caller's saved buffers where given (SavedKeys), else scratch.
struct DerivedKeys {
  Buffer kb, vb;
  TensorRef k, v;
  DerivedKeys(const AttentionProblem& ap, const SavedKeys& saved)
      : kb(ap.dtype, {saved.k.present() ? 0 : ap.B, ap.Tk, ap.G, ap.d}),
        vb(ap.dtype, {saved.k.present() ? 0 : ap.B, ap.Tk, ap.G, ap.d}),
        k(saved.k.present() ? saved.k : TensorRef(kb)),
        v(saved.k.present() ? saved.v : TensorRef(vb)) {}
};

// Slice `i` of the leading dimension of t.
inline TensorRef select0(const TensorRef& t, int64_t i) {
  TensorRef s = t;
  s.ndim = t.ndim - 1;
  const size_t elem = dtype_bytes(t.dtype);
  s.data = static_cast<char*>(t.data) + i * t.stride[0] * int64_t(elem);
  for (int d = 0; d < s.ndim; ++d) {
    s.shape[d] = t.shape[d + 1];
    s.stride[d] = t.stride[d + 1];
  }
  return s;
}

}  // namespace mka::cpu
