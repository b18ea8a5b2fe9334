// Device-dispatching entry points of the four ops (SPEC §3), one per op and direction, each
// taking the op's descriptor (op_args.h). Each validates its inputs with the shared routine
// of problem.h, checks the caller's output buffers, then runs the CPU kernels or the CUDA
// launchers of the inputs' device. Outputs are allocated by the caller.
#pragma once
#include "mka/op_args.h"
#include "mka/problem.h"

namespace mka {

void attention_forward(const AttentionFwd& a);
void attention_backward(const AttentionBwd& a);

void route_fuse_forward(const RouteFuseFwd& a);
void route_fuse_backward(const RouteFuseBwd& a);

void fastmka_forward(const FastmkaFwd& a);
void fastmka_backward(const FastmkaBwd& a);

void mka_forward(const MkaFwd& a);
void mka_backward(const MkaBwd& a);

bool built_with_cuda();

}  // namespace mka
