// The HBM tier's bookkeeping (SPEC §7.1): a pool of fixed-size pages and one block table per
// sequence. Framework-free and storage-free: it hands out page indices; the page tensors
// themselves (one pair per layer) are allocated once by the caller and indexed by them, so
// every layer of a model shares one table.
//
// Pages are reference-counted: fork() shares a sequence's pages with a new sequence, and a
// write into a shared page first copies it (copy-on-write) — reserve() returns those copies
// for the caller to apply to every layer's storage before writing. A freed page goes back to
// the free list and is handed out again, most recently freed first. Every call is atomic
// (it changes nothing when it throws) and thread-safe.
#pragma once
#include <cstdint>
#include <mutex>
#include <vector>

namespace mka::memory {

struct PageCopy {
  int32_t src, dst;  // copy page src into page dst (every layer's storage)
};

class PageTable {
 public:
  // num_pages pages of page_size tokens; a sequence holds at most max_pages_per_seq pages.
  PageTable(int64_t num_pages, int64_t page_size, int64_t max_pages_per_seq);

  // A new empty sequence; returns its id (ids of freed sequences are reused).
  int64_t add_sequence();
  // Makes room for `tokens` tokens in sequence `seq` (its length becomes max(length, tokens)):
  // allocates the pages the new positions need, and copies a shared page that new positions
  // fall into (returned, src -> dst). Out of pages or beyond max_pages_per_seq: an Error.
  std::vector<PageCopy> reserve(int64_t seq, int64_t tokens);
  // The same for several sequences at once, all or nothing.
  std::vector<PageCopy> reserve(const std::vector<int64_t>& seqs,
                                const std::vector<int64_t>& tokens);
  // A new sequence sharing every page of `seq` (beam search, parallel sampling, a prefix).
  int64_t fork(int64_t seq);
  // Drops the tokens from position `tokens` on (speculative decoding's rejected tail);
  // pages left empty are released.
  void truncate(int64_t seq, int64_t tokens);
  // Releases the pages wholly before position `tokens` (the DRAM tier spilled them): their
  // block-table entries become -1, the length stays. Already released pages are skipped; a
  // page shared with another sequence stays with it. Positions before the released front can
  // no longer be written or truncated to.
  void release_front(int64_t seq, int64_t tokens);
  // Releases the sequence's pages and its id.
  void free(int64_t seq);

  int64_t length(int64_t seq) const;
  // The block table entries of `seq` (-1 for released pages).
  std::vector<int32_t> pages(int64_t seq) const;
  // Leading pages of `seq` released by release_front.
  int64_t released(int64_t seq) const;
  int32_t refcount(int32_t page) const;
  // Writes the tables of `seqs` as rows of `width` >= max_pages_per_seq entries of `out`,
  // `ld` apart, unused entries -1.
  void fill_block_table(const std::vector<int64_t>& seqs, int32_t* out, int64_t ld,
                        int64_t width) const;

  int64_t num_pages() const { return num_pages_; }
  int64_t page_size() const { return page_size_; }
  int64_t max_pages_per_seq() const { return max_pages_; }
  int64_t num_free_pages() const;
  int64_t num_sequences() const;  // live sequences

 private:
  struct Sequence {
    bool live = false;
    int64_t length = 0;
    int64_t released = 0;  // leading pages given back by release_front (entries -1)
    std::vector<int32_t> pages;
  };
  const Sequence& live(int64_t seq) const;
  Sequence& live(int64_t seq);
  // Pages reserving `tokens` in s appends, and the shared pages it would write into.
  int64_t new_pages(const Sequence& s, int64_t tokens) const;
  void written_shared(const Sequence& s, int64_t tokens, std::vector<int32_t>& pages) const;
  void reserve_locked(int64_t seq, int64_t tokens, std::vector<PageCopy>& copies);
  int64_t new_id();  // a free sequence id (a reused one first)
  int32_t take_page();
  void release(int32_t page);

  const int64_t num_pages_, page_size_, max_pages_;
  std::vector<int32_t> refcount_;
  std::vector<int32_t> free_;  // a stack: the most recently freed page is reused first
  std::vector<Sequence> seqs_;
  std::vector<int64_t> free_ids_;
  mutable std::mutex mu_;
};

}  // namespace mka::memory
