// The DRAM tier's ChunkStore (mka/memory/chunk_store.h) without Python: exact round trips,
// the budget, eviction of the oldest chunk, selection by matching signature bits.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "mka/error.h"
#include "mka/memory/chunk_store.h"

using mka::memory::ChunkStore;

TEST(ChunkStore, RoundTripAndBudget) {
  ChunkStore s(16, 1, 64, 32);
  unsigned char a[16], b[16], out[16];
  for (int i = 0; i < 16; ++i) a[i] = (unsigned char)i, b[i] = (unsigned char)(255 - i);
  const uint64_t sig = 0;
  s.insert(1, 0, a, &sig);
  s.insert(1, 1, b, &sig);
  EXPECT_THROW(s.insert(1, 2, a, &sig), mka::Error);
  s.read(1, 1, out);
  EXPECT_EQ(std::memcmp(out, b, 16), 0);
  ChunkStore e(16, 1, 64, 32, ChunkStore::Full::evict_oldest);
  e.insert(1, 0, a, &sig);
  e.insert(1, 1, b, &sig);
  e.insert(1, 2, a, &sig);
  EXPECT_FALSE(e.contains(1, 0));
  EXPECT_TRUE(e.contains(1, 2));
}

TEST(ChunkStore, SelectsByMatchingBitsTiesToTheLater) {
  ChunkStore s(1, 1, 8, 8);
  const unsigned char x = 0;
  const uint64_t sigs[4] = {0b1111, 0b0111, 0b1111, 0b0000};  // matches with 0b1111: 8 7 8 4
  for (int i = 0; i < 4; ++i) s.insert(0, i, &x, &sigs[i]);
  const uint64_t q = 0b1111;
  int64_t out[3];
  s.select(0, 4, &q, 3, out);
  EXPECT_EQ(out[0], 2);
  EXPECT_EQ(out[1], 0);
  EXPECT_EQ(out[2], 1);
  s.select(0, 1, &q, 3, out);  // only index 0 is below the limit
  EXPECT_EQ(out[0], 0);
  EXPECT_EQ(out[1], -1);
}
