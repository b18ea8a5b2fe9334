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

TEST(ChunkStore, BatchedInsertAndReadAreAllOrNothing) {
  ChunkStore s(4, 1, 64, 12);  // room for three chunks
  unsigned char payloads[12], out[12];
  for (int i = 0; i < 12; ++i) payloads[i] = (unsigned char)(7 * i);
  const uint64_t sigs[3] = {1, 2, 3};
  const int64_t seqs[3] = {5, 5, 6}, idx[3] = {0, 1, 0};
  s.insert_many(2, seqs, idx, payloads, sigs);
  const int64_t over_seqs[2] = {6, 7}, over_idx[2] = {0, 0};  // two new chunks, one free slot
  EXPECT_THROW(s.insert_many(2, over_seqs, over_idx, payloads, sigs), mka::Error);
  EXPECT_EQ(s.size(), 2);  // nothing of the refused batch was stored
  s.insert_many(3, seqs, idx, payloads, sigs);  // two replaced, one new: fits
  const int64_t rs[3] = {6, 5, 5}, ri[3] = {0, 1, 0};
  s.read_many(3, rs, ri, out);
  EXPECT_EQ(std::memcmp(out, payloads + 8, 4), 0);
  EXPECT_EQ(std::memcmp(out + 4, payloads + 4, 4), 0);
  EXPECT_EQ(std::memcmp(out + 8, payloads, 4), 0);
  const int64_t miss_s[2] = {5, 9}, miss_i[2] = {0, 0};
  std::memset(out, 0xAB, sizeof out);
  EXPECT_THROW(s.read_many(2, miss_s, miss_i, out), mka::Error);
  EXPECT_EQ(out[0], 0xAB);  // checked before any copy
}
