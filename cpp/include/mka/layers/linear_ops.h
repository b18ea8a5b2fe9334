// A decode step's linear layers (SPEC §3.7): few rows against a weight read once.
//
// linear_small: out = act(x W^T + bias) for x (M, K) with M <= 8 rows, W (N, K) (torch's
// nn.Linear layout), bias (N,) optional, out (M, N); act: none, or GELU (erf form) of the
// product rounded to the dtype (as torch's linear followed by gelu). One dtype throughout;
// the last dims contiguous. On CUDA a warp per output feature reads its row of W once with
// 16-byte loads: at decode sizes the layer is a read of W, and cuBLAS's kernels for one row
// (split-K and a reduction) reach a third of the bandwidth.
#pragma once
#include <cstdint>

#include "mka/op_args.h"
#include "mka/tensor.h"

namespace mka {

constexpr int64_t kLinearMaxRows = 8;

struct LinearSmall {
  TensorRef x, weight, bias, out;
  int64_t activation = 0;  // 0: none, 1: GELU (erf)
  Launch launch;

  template <class F> void fields(F&& f) {
    f("x", x), f("weight", weight), f("bias", bias), f("out", out), f("activation", activation),
        launch.fields(f);
  }
};

struct LinearProblem {
  int64_t M = 0, N = 0, K = 0;
  int activation = 0;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int device_id = 0;
};

void linear_small(const LinearSmall& a);

namespace cuda {
void linear_small(const LinearProblem& p, const LinearSmall& a);
}  // namespace cuda

}  // namespace mka
