// CUDA launchers of the four ops on validated problems (problem.h) and their descriptors
// (op_args.h; the stream is Launch::stream, a cudaStream_t passed as void*, and the kernels
// are the problems' `kernels`). Inputs are float16, bfloat16 or float32 with head dims 64 or
// 128; softmax statistics and EMA states are float32. Only declared when the build has CUDA
// (MKA_WITH_CUDA); this header needs no CUDA headers.
#pragma once
#include "mka/op_args.h"
#include "mka/problem.h"

namespace mka::cuda {

void attention_fwd(const AttentionProblem& p, const AttentionFwd& a);
// Few query rows per key/value head against many keys (decoding, verification): the paged
// decode kernel (cuda/memory/) with sequence b as its one page; attention_fwd takes it for
// the shapes decode_shaped accepts.
bool decode_shaped(const AttentionProblem& p);
void decode_attention(const AttentionProblem& p, const AttentionFwd& a);
void attention_bwd(const AttentionProblem& p, const AttentionBwd& a);

void route_fuse_fwd(const RouteProblem& p, const RouteFuseFwd& a);
void route_fuse_bwd(const RouteProblem& p, const RouteFuseBwd& a);

void fastmka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const FastmkaFwd& a);
void fastmka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const FastmkaBwd& a);

void mka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const MkaFwd& a);
void mka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const MkaBwd& a);

}  // namespace mka::cuda
