// Attention dropout's mask (mka/dropout.h): Philox4x32-10 against Random123's known-answer
// vectors, and the mask's rate and independence of where it is evaluated.
#include <gtest/gtest.h>

#include <cmath>

#include "mka/dropout.h"

using mka::DropoutMask;
using mka::Philox4;
using mka::philox4x32_10;

TEST(Dropout, PhiloxMatchesKnownAnswers) {
  struct Case {
    Philox4 ctr;
    uint32_t k0, k1;
    Philox4 want;
  };
  const Case cases[] = {
      {{{0, 0, 0, 0}}, 0, 0, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu, 0xffffffffu,
       {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u,
       {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}},
  };
  for (const Case& c : cases) {
    const Philox4 got = philox4x32_10(c.ctr, c.k0, c.k1);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(got.x[i], c.want.x[i]) << "word " << i;
  }
}

TEST(Dropout, KeepsOneMinusPAndDependsOnEveryIndex) {
  DropoutMask m{0.25, 0x1234567890abcdefull, 0};
  EXPECT_EQ(m.threshold(), 3221225472u);  // 0.75 * 2^32
  int64_t kept = 0, n = 0;
  for (uint64_t i = 0; i < 64; ++i)
    for (uint64_t c = 0; c < 256; ++c) {
      const Philox4 w = m.words(3, i, c);
      for (uint32_t x : w.x) kept += x < m.threshold(), ++n;
    }
  EXPECT_NEAR(double(kept) / double(n), 0.75, 0.01);
  const Philox4 a = m.words(1, 2, 3);
  for (const Philox4& b : {m.words(0, 2, 3), m.words(1, 1, 3), m.words(1, 2, 4),
                           DropoutMask{0.25, m.seed + 1, 0}.words(1, 2, 3),
                           DropoutMask{0.25, m.seed, 1}.words(1, 2, 3)})
    EXPECT_NE(a.x[0], b.x[0]);
  const DropoutMask tiny{1e-12, 1, 0};
  EXPECT_EQ(tiny.threshold(), 0xFFFFFFFFu);
  EXPECT_FALSE(DropoutMask().active());
}
