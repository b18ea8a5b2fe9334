// Model building blocks of a decode step, fused where the unfused form costs a kernel launch
// per layer for a few kilobytes of work (SPEC §3.7).
//
// add_layer_norm: residual += x (rounded to the residual's dtype, as the unfused add), then
// out = LayerNorm(residual) · weight + bias over the last dimension, statistics in float32
// (float64 for float64). x, residual, out: (N, C) rows with the last dim contiguous, one dtype;
// weight, bias: (C,) of that dtype, each optional. residual is updated in place.
#pragma once
#include <cstdint>

#include "mka/op_args.h"
#include "mka/tensor.h"

namespace mka {

struct AddLayerNorm {
  TensorRef x, residual, weight, bias, out;
  double eps = 1e-5;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("x", x), f("residual", residual), f("weight", weight), f("bias", bias), f("out", out),
        f("eps", eps), launch.fields(f);
  }
};

// Shapes of an add_layer_norm call, validated (layers/add_layer_norm.cpp).
struct NormProblem {
  int64_t N = 0, C = 0;
  double eps = 1e-5;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int device_id = 0;
};

void add_layer_norm(const AddLayerNorm& a);

namespace cuda {
void add_layer_norm(const NormProblem& p, const AddLayerNorm& a);
}  // namespace cuda

}  // namespace mka
