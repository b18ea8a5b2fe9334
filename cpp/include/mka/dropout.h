// Attention dropout's mask as a pure function (SPEC §3.5): whether attention weight
// (b, h, i, j) — batch, query head, query row, key column — of one call is kept depends only
// on the call's seed, the memory level, those four indices and p; never on tiling, threads or
// which kernel runs. So a forward and its backward regenerate the same mask, and no mask is
// ever stored. Host and device code share this header.
//
// The bits come from Philox4x32-10 (Salmon et al., SC'11; the counter-based generator of
// Random123, cuRAND and PyTorch): key = the 64-bit seed, counter = (j / 4, i, b * H + h,
// level). One evaluation gives four 32-bit words, one per key column of an aligned group of
// four: a thread holding neighbouring columns (the CPU's rows, an mma fragment's column
// pairs) evaluates it once per four columns. Weight (b, h, i, j) is kept iff word j % 4 is
// below keep_threshold(p) = round((1 - p) 2^32): P(keep) = 1 - p to 2^-32.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MKA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MKA_HOST_DEVICE inline
#endif

namespace mka {

struct Philox4 {
  uint32_t x[4];
};

// Philox4x32 with 10 rounds of (counter, key).
MKA_HOST_DEVICE Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c.x[0];
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c.x[2];
    c = Philox4{{uint32_t(p1 >> 32) ^ c.x[1] ^ k0, uint32_t(p1), uint32_t(p0 >> 32) ^ c.x[3] ^ k1,
                 uint32_t(p0)}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// The mask of one call: p = 0 keeps everything (no generator runs).
struct DropoutMask {
  double p = 0.0;
  uint64_t seed = 0;
  uint32_t level = 0;  // mka's memory level: each level's weights get their own mask

  MKA_HOST_DEVICE bool active() const { return p > 0.0; }
  // Kept iff the word is below this: round((1 - p) 2^32), at most 2^32 - 1.
  MKA_HOST_DEVICE uint32_t threshold() const {
    const double t = std::floor((1.0 - p) * 4294967296.0 + 0.5);
    return t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
  }
  MKA_HOST_DEVICE double keep_scale() const { return 1.0 / (1.0 - p); }
  // The words of key columns 4 c .. 4 c + 3 of row i of (batch * H + head) bh.
  MKA_HOST_DEVICE Philox4 words(uint64_t bh, uint64_t i, uint64_t c) const {
    return philox4x32_10(Philox4{{uint32_t(c), uint32_t(i), uint32_t(bh), level}},
                         uint32_t(seed), uint32_t(seed >> 32));
  }
};

}  // namespace mka
