// The HBM tier's PageTable (mka/memory/page_table.h) on its own, without Python: pages
// handed out and reused, copy-on-write after fork, all-or-nothing errors, and concurrent use.
#include <gtest/gtest.h>

#include <thread>
#include <vector>

#include "mka/error.h"
#include "mka/memory/page_table.h"

using mka::memory::PageCopy;
using mka::memory::PageTable;

TEST(PageTable, ReserveTakesWholePagesAndFreeGivesThemBack) {
  PageTable t(6, 4, 3);
  const int64_t a = t.add_sequence();
  EXPECT_TRUE(t.reserve(a, 5).empty());
  EXPECT_EQ(t.pages(a), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(t.num_free_pages(), 4);
  t.free(a);
  EXPECT_EQ(t.num_free_pages(), 6);
  const int64_t b = t.add_sequence();
  t.reserve(b, 1);
  EXPECT_EQ(t.pages(b), (std::vector<int32_t>{1}));  // the most recently freed page first
}

TEST(PageTable, ForkSharesAndTheFirstWriteCopies) {
  PageTable t(8, 4, 4);
  const int64_t a = t.add_sequence();
  t.reserve(a, 6);
  const int64_t b = t.fork(a);
  EXPECT_EQ(t.refcount(1), 2);
  const std::vector<PageCopy> copies = t.reserve(b, 7);
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, 1);
  EXPECT_EQ(t.pages(a)[1], 1);
  EXPECT_EQ(t.pages(b)[1], copies[0].dst);
  EXPECT_EQ(t.refcount(0), 2);
  EXPECT_EQ(t.refcount(1), 1);
}

TEST(PageTable, ReleaseFrontGivesBackLeadingPagesOnly) {
  PageTable t(8, 4, 8);
  const int64_t a = t.add_sequence();
  t.reserve(a, 14);                        // pages 0..3
  const int64_t b = t.fork(a);             // shares all four
  t.release_front(a, 9);                   // pages wholly before token 9: 0 and 1
  EXPECT_EQ(t.pages(a), (std::vector<int32_t>{-1, -1, 2, 3}));
  EXPECT_EQ(t.released(a), 2);
  EXPECT_EQ(t.refcount(0), 1);             // still b's
  EXPECT_EQ(t.num_free_pages(), 4);
  t.release_front(b, 8);
  EXPECT_EQ(t.num_free_pages(), 6);        // 0 and 1 are free now
  t.release_front(a, 4);                   // behind the front: nothing changes
  EXPECT_EQ(t.released(a), 2);
  t.reserve(a, 20);                        // grows at the tail; the 3rd page is copied (shared)
  EXPECT_EQ(t.pages(a)[0], -1);
  EXPECT_THROW(t.truncate(a, 7), mka::Error);  // before the released front
  EXPECT_THROW(t.release_front(a, 21), mka::Error);
  const int64_t c = t.fork(a);             // a fork keeps the holes
  EXPECT_EQ(t.pages(c)[1], -1);
  t.free(a);
  t.free(b);
  t.free(c);
  EXPECT_EQ(t.num_free_pages(), 8);
}

TEST(PageTable, ErrorsChangeNothing) {
  PageTable t(3, 4, 2);
  const int64_t a = t.add_sequence(), b = t.add_sequence();
  t.reserve(a, 8);
  EXPECT_THROW(t.reserve({a, b}, {8, 5}), mka::Error);  // b needs 2 pages, 1 is free
  EXPECT_EQ(t.length(b), 0);
  EXPECT_EQ(t.num_free_pages(), 1);
  EXPECT_THROW(t.reserve(a, 9), mka::Error);  // beyond max_pages_per_seq
  EXPECT_THROW(t.reserve(7, 1), mka::Error);  // not a sequence
  EXPECT_THROW(t.truncate(a, 9), mka::Error);
  EXPECT_THROW(PageTable(0, 4, 4), mka::Error);
}

TEST(PageTable, ConcurrentSequencesNeverShareAPage) {
  PageTable t(4096, 16, 64);
  std::vector<std::thread> threads;
  std::vector<int64_t> ids(8);
  for (int i = 0; i < 8; ++i)
    threads.emplace_back([&, i] {
      ids[size_t(i)] = t.add_sequence();
      for (int n = 1; n <= 1024; n += 7) t.reserve(ids[size_t(i)], n);
    });
  for (std::thread& th : threads) th.join();
  std::vector<int> owner(4096, -1);
  for (int i = 0; i < 8; ++i)
    for (int32_t p : t.pages(ids[size_t(i)])) {
      EXPECT_EQ(owner[size_t(p)], -1);
      owner[size_t(p)] = i;
    }
  EXPECT_EQ(t.num_free_pages(), 4096 - 8 * 64);
}
