// Level 3 by recall (SPEC §7.2): attention of each query row to the chunks chosen for it.
// q (B, Tq, H, d); k, v (B, Tk, G, d); chosen (B, Tq, G, R) int32: chunk c of row t and
// key/value head g holds keys [c C, (c + 1) C) of k, v, -1 = none (every query head of the
// group reads the same chunks). out (B, Tq, H, d); lse (B, H, Tq) in the statistics dtype,
// -inf for a row with no chunk (its out is 0). The selection is the caller's (discrete, no
// gradient); the backward gives dq, dk, dv (every element written).
#pragma once
#include <cstdint>
#include <optional>

#include "mka/op_args.h"
#include "mka/tensor.h"

namespace mka {

struct RecallFwd {
  TensorRef q, k, v, chosen;
  int64_t chunk = 0;
  std::optional<double> scale;
  TensorRef out, lse;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("q", q), f("k", k), f("v", v), f("chosen", chosen), f("chunk", chunk), f("scale", scale),
        f("out", out), f("lse", lse), launch.fields(f);
  }
};

struct RecallBwd {
  TensorRef q, k, v, chosen;
  int64_t chunk = 0;
  std::optional<double> scale;
  TensorRef out, lse, dout, dq, dk, dv;
  Launch launch;

  template <class F> void fields(F&& f) {
    f("q", q), f("k", k), f("v", v), f("chosen", chosen), f("chunk", chunk), f("scale", scale),
        f("out", out), f("lse", lse), f("dout", dout), f("dq", dq), f("dk", dk), f("dv", dv),
        launch.fields(f);
  }
};

// Shapes of a recall call, validated (memory/recall_ops.cpp).
struct RecallProblem {
  int64_t B = 0, Tq = 0, Tk = 0, H = 0, G = 0, d = 0, R = 0, C = 0;
  double scale = 1.0;
  DType dtype = DType::f32;

  int64_t group() const { return H / G; }
};

void recall_forward(const RecallFwd& a);
void recall_backward(const RecallBwd& a);

namespace cpu {
void recall_fwd(const RecallProblem& p, const RecallFwd& a);
void recall_bwd(const RecallProblem& p, const RecallBwd& a);
}  // namespace cpu

// Defined in builds with CUDA (MKA_WITH_CUDA): cuda/memory/recall_attention.cu. chosen is not
// read by the host: a row with an invalid entry gets NaN output, lse and dq (SPEC §7.2).
namespace cuda {
void recall_fwd(const RecallProblem& p, const RecallFwd& a);
void recall_bwd(const RecallProblem& p, const RecallBwd& a);
}  // namespace cuda

}  // namespace mka
