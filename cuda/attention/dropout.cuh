// Attention dropout in the CUDA kernels (SPEC §3.5): the multipliers of mka/dropout.h's mask
// (1 / (1 - p) where a weight is kept, else 0) for one element (the CUDA-core kernels: a lane
// per key or query: one evaluation per element, the four lanes of a key group evaluating it
// together) and for a warp's m16n8 mma accumulator fragments. One Philox evaluation gives the
// words of four aligned key columns; in a fragment a lane holds two columns (keys along
// columns: the forward) or two rows (keys along rows: the backward) of such a group, so the
// lanes that need the same evaluations each make one of them and swap the keep bits by one or
// two shuffles: every word is used, one evaluation per four elements. The kernels apply it
// under a template flag (kDrop), so their p = 0 instantiations are the code they were.
#pragma once
#include "mka/dropout.h"

namespace mka::cuda {

struct DropKeep {
  DropoutMask mask;
  uint32_t threshold;
  float scale;

  __device__ __forceinline__ explicit DropKeep(const DropoutMask& m)
      : mask(m), threshold(m.threshold()), scale(float(m.keep_scale())) {}

  // Bit w set iff key column 4 c + w of query row i of bh = b H + h is kept.
  __device__ __forceinline__ unsigned bits4(uint64_t bh, int64_t i, int64_t c) const {
    const Philox4 w = mask.words(bh, uint64_t(i), uint64_t(c));
    return unsigned(w.x[0] < threshold) | unsigned(w.x[1] < threshold) << 1 |
           unsigned(w.x[2] < threshold) << 2 | unsigned(w.x[3] < threshold) << 3;
  }
  // The multiplier of weight (bh, i, j).
  __device__ __forceinline__ float at(uint64_t bh, int64_t i, int64_t j) const {
    return bits4(bh, i, j >> 2) >> (j & 3) & 1u ? scale : 0.f;
  }
  // Element e of a fragment whose keep bits are `bits` (bit e: element e), times x.
  __device__ __forceinline__ float apply(unsigned bits, int e, float x) const {
    return bits >> e & 1u ? x * scale : 0.f;
  }

  // Keep bits of the m16n8 fragment with query rows i0 + lane / 4 (+ 8) and key columns
  // j0 + 2 (lane % 4) + {0, 1} (element e: row e / 2, column e % 2); j0 % 4 == 0. Lanes l and
  // l ^ 1 hold the two halves of one key group: each evaluates it for one of the two rows.
  // The whole warp calls it.
  __device__ __forceinline__ unsigned frag_query_rows(uint64_t bh, int64_t i0, int64_t j0) const {
    const int lane = threadIdx.x % 32, half = lane & 1;
    const unsigned mine = bits4(bh, i0 + lane / 4 + 8 * half, (j0 >> 2) + (lane % 4) / 2)
                          << (4 * half);
    const unsigned x = (mine | __shfl_xor_sync(0xffffffffu, mine, 1)) >> (2 * half);
    return (x & 3u) | (x >> 2 & 0xCu);  // bit 4 r + w of row r, word w -> this lane's words
  }

  // Keep bits of the m16n8 fragment with key rows j0 + lane / 4 (+ 8) and query columns
  // i0 + 2 (lane % 4) + {0, 1} (element e: key row e / 2, query column e % 2); j0 % 4 == 0.
  // Lanes l, l ^ 4, l ^ 8, l ^ 12 hold the four keys of the same key groups for the same
  // queries: each evaluates one of the four (query, group) pairs of its elements (pair e for
  // lane k = (l / 4) % 4) and they gather all four. The whole warp calls it.
  __device__ __forceinline__ unsigned frag_key_rows(uint64_t bh, int64_t i0, int64_t j0) const {
    const int lane = threadIdx.x % 32, k = (lane >> 2) & 3;
    unsigned all = bits4(bh, i0 + 2 * (lane % 4) + (k & 1), (j0 >> 2) + (lane >> 4) + 2 * (k >> 1))
                   << (4 * k);
    all |= __shfl_xor_sync(0xffffffffu, all, 4);
    all |= __shfl_xor_sync(0xffffffffu, all, 8);  // bit 4 e + w: pair e's word w
    const unsigned x = all >> k;                  // this lane's key is word k of its group
    return (x & 1u) | (x >> 3 & 2u) | (x >> 6 & 4u) | (x >> 9 & 8u);
  }
};

}  // namespace mka::cuda
