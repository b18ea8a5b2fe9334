#include "tensor_ref.h"

#include "mka/error.h"

namespace mka::bind {

namespace nb = nanobind;

TensorRef ref(const Array& a, const char* name) {
  TensorRef t;
  MKA_CHECK(a.ndim() <= size_t(kMaxDims), name, ": at most ", kMaxDims, " dims supported");
  t.data = a.data();
  t.ndim = int(a.ndim());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = int64_t(a.shape(i));
    t.stride[i] = a.stride(i);
  }
  const nb::dlpack::dtype dt = a.dtype();
  const auto code = nb::dlpack::dtype_code(dt.code);
  if (code == nb::dlpack::dtype_code::Float && dt.bits == 16) t.dtype = DType::f16;
  else if (code == nb::dlpack::dtype_code::Bfloat && dt.bits == 16) t.dtype = DType::bf16;
  else if (code == nb::dlpack::dtype_code::Float && dt.bits == 32) t.dtype = DType::f32;
  else if (code == nb::dlpack::dtype_code::Float && dt.bits == 64) t.dtype = DType::f64;
  else if (code == nb::dlpack::dtype_code::Int && dt.bits == 32) t.dtype = DType::i32;
  else fail(name, ": unsupported dtype (DLPack code ", int(dt.code), ", ", int(dt.bits), " bits)");
  const int dev = a.device_type();
  if (dev == nb::device::cpu::value) t.device = Device::cpu;
  else if (dev == nb::device::cuda::value) t.device = Device::cuda;
  else fail(name, ": unsupported device type ", dev);
  t.device_id = a.device_id();
  return t;
}

TensorRef ref(const OptArray& a, const char* name) { return a ? ref(*a, name) : TensorRef{}; }

}  // namespace mka::bind
