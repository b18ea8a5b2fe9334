#include "mka/memory/page_table.h"

#include <algorithm>

#include "mka/error.h"

namespace mka::memory {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }  // no overflow
}  // namespace

PageTable::PageTable(int64_t num_pages, int64_t page_size, int64_t max_pages_per_seq)
    : num_pages_(num_pages), page_size_(page_size), max_pages_(max_pages_per_seq) {
  MKA_CHECK(num_pages >= 1 && num_pages <= INT32_MAX, "num_pages: must be in [1, 2^31 - 1], got ",
            num_pages);
  MKA_CHECK(page_size >= 1, "page_size: must be at least 1, got ", page_size);
  MKA_CHECK(max_pages_per_seq >= 1, "max_pages_per_seq: must be at least 1, got ",
            max_pages_per_seq);
  refcount_.assign(size_t(num_pages), 0);
  free_.reserve(size_t(num_pages));
  for (int64_t p = num_pages - 1; p >= 0; --p) free_.push_back(int32_t(p));  // page 0 first
}

const PageTable::Sequence& PageTable::live(int64_t seq) const {
  MKA_CHECK(seq >= 0 && seq < int64_t(seqs_.size()) && seqs_[size_t(seq)].live, "seq: ", seq,
            " is not a live sequence of this page table");
  return seqs_[size_t(seq)];
}

PageTable::Sequence& PageTable::live(int64_t seq) {
  return const_cast<Sequence&>(static_cast<const PageTable*>(this)->live(seq));
}

int64_t PageTable::new_id() {
  if (free_ids_.empty()) {
    seqs_.emplace_back();
    return int64_t(seqs_.size()) - 1;
  }
  const int64_t id = free_ids_.back();
  free_ids_.pop_back();
  return id;
}

int64_t PageTable::add_sequence() {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t id = new_id();
  seqs_[size_t(id)] = Sequence{true, 0, 0, {}};
  return id;
}

int64_t PageTable::new_pages(const Sequence& s, int64_t tokens) const {
  if (tokens <= s.length) return 0;
  return std::max<int64_t>(0, ceil_div(tokens, page_size_) - int64_t(s.pages.size()));
}

void PageTable::written_shared(const Sequence& s, int64_t tokens,
                               std::vector<int32_t>& pages) const {
  if (tokens <= s.length) return;
  for (size_t i = size_t(s.length / page_size_); i < s.pages.size(); ++i)
    if (refcount_[size_t(s.pages[i])] > 1) pages.push_back(s.pages[i]);
}

int32_t PageTable::take_page() {
  const int32_t p = free_.back();
  free_.pop_back();
  refcount_[size_t(p)] = 1;
  return p;
}

void PageTable::release(int32_t page) {
  if (--refcount_[size_t(page)] == 0) free_.push_back(page);
}

void PageTable::reserve_locked(int64_t seq, int64_t tokens, std::vector<PageCopy>& copies) {
  Sequence& s = seqs_[size_t(seq)];
  if (tokens <= s.length) return;
  for (size_t i = size_t(s.length / page_size_); i < s.pages.size(); ++i) {
    const int32_t src = s.pages[i];
    if (refcount_[size_t(src)] == 1) continue;
    const int32_t dst = take_page();
    copies.push_back({src, dst});
    release(src);
    s.pages[i] = dst;
  }
  while (int64_t(s.pages.size()) < ceil_div(tokens, page_size_)) s.pages.push_back(take_page());
  s.length = tokens;
}

std::vector<PageCopy> PageTable::reserve(int64_t seq, int64_t tokens) {
  return reserve(std::vector<int64_t>{seq}, std::vector<int64_t>{tokens});
}

std::vector<PageCopy> PageTable::reserve(const std::vector<int64_t>& seqs,
                                         const std::vector<int64_t>& tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  MKA_CHECK(seqs.size() == tokens.size(), "tokens: expected one count per sequence (",
            seqs.size(), "), got ", tokens.size());
  // Pages taken: new pages, plus a copy per write into a shared page — except that when
  // every sharer of a page writes into it in this call, the last one writes in place.
  int64_t need = 0;
  std::vector<int32_t> shared;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& s = live(seqs[i]);
    MKA_CHECK(tokens[i] >= 0, "tokens: must be >= 0, got ", tokens[i]);
    for (size_t j = 0; j < i; ++j)
      MKA_CHECK(seqs[j] != seqs[i], "seqs: sequence ", seqs[i], " is listed twice");
    MKA_CHECK(ceil_div(tokens[i], page_size_) <= max_pages_, "seq ", seqs[i], ": ", tokens[i],
              " tokens need ", ceil_div(tokens[i], page_size_), " pages of ", page_size_,
              " tokens, more than max_pages_per_seq = ", max_pages_, " (the block table's width)");
    need += new_pages(s, tokens[i]);
    written_shared(s, tokens[i], shared);
  }
  std::sort(shared.begin(), shared.end());
  for (size_t i = 0; i < shared.size();) {
    size_t j = i;
    while (j < shared.size() && shared[j] == shared[i]) ++j;
    const int64_t writers = int64_t(j - i);
    need += writers - (writers == refcount_[size_t(shared[i])]);
    i = j;
  }
  MKA_CHECK(need <= int64_t(free_.size()), "page pool: out of pages: ", need, " more needed, ",
            free_.size(), " free of ", num_pages_, " (", page_size_,
            " tokens each); free sequences or make a larger pool");
  std::vector<PageCopy> copies;
  for (size_t i = 0; i < seqs.size(); ++i) reserve_locked(seqs[i], tokens[i], copies);
  return copies;
}

int64_t PageTable::fork(int64_t seq) {
  std::lock_guard<std::mutex> lock(mu_);
  const Sequence src = live(seq);  // a copy: seqs_ may grow below
  const int64_t id = new_id();
  for (int32_t p : src.pages)
    if (p >= 0) ++refcount_[size_t(p)];
  seqs_[size_t(id)] = src;
  return id;
}

void PageTable::truncate(int64_t seq, int64_t tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  Sequence& s = live(seq);
  MKA_CHECK(tokens >= s.released * page_size_ && tokens <= s.length, "tokens: must be in [",
            s.released * page_size_, ", ", s.length, "] (the released front and the length of seq ",
            seq, "), got ", tokens);
  const size_t keep = size_t(ceil_div(tokens, page_size_));
  for (size_t i = keep; i < s.pages.size(); ++i) release(s.pages[i]);
  s.pages.resize(keep);
  s.length = tokens;
}

void PageTable::release_front(int64_t seq, int64_t tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  Sequence& s = live(seq);
  MKA_CHECK(tokens >= 0 && tokens <= s.length, "tokens: must be in [0, ", s.length,
            "] (the length of seq ", seq, "), got ", tokens);
  const int64_t front = tokens / page_size_;  // pages wholly before `tokens`
  for (int64_t i = s.released; i < front; ++i) {
    release(s.pages[size_t(i)]);
    s.pages[size_t(i)] = -1;
  }
  s.released = std::max(s.released, front);
}

void PageTable::free(int64_t seq) {
  std::lock_guard<std::mutex> lock(mu_);
  Sequence& s = live(seq);
  for (int32_t p : s.pages)
    if (p >= 0) release(p);
  s = Sequence{};
  free_ids_.push_back(seq);
}

int64_t PageTable::length(int64_t seq) const {
  std::lock_guard<std::mutex> lock(mu_);
  return live(seq).length;
}

std::vector<int32_t> PageTable::pages(int64_t seq) const {
  std::lock_guard<std::mutex> lock(mu_);
  return live(seq).pages;
}

int64_t PageTable::released(int64_t seq) const {
  std::lock_guard<std::mutex> lock(mu_);
  return live(seq).released;
}

int32_t PageTable::refcount(int32_t page) const {
  std::lock_guard<std::mutex> lock(mu_);
  MKA_CHECK(page >= 0 && page < num_pages_, "page: ", page, " is out of range [0, ", num_pages_,
            ")");
  return refcount_[size_t(page)];
}

void PageTable::fill_block_table(const std::vector<int64_t>& seqs, int32_t* out, int64_t ld,
                                 int64_t width) const {
  std::lock_guard<std::mutex> lock(mu_);
  MKA_CHECK(width >= max_pages_ && ld >= width, "block_table: rows of ", width,
            " entries (", ld, " apart) cannot hold max_pages_per_seq = ", max_pages_);
  for (int64_t s : seqs) live(s);  // all checked before anything is written
  for (size_t i = 0; i < seqs.size(); ++i) {
    const std::vector<int32_t>& p = seqs_[size_t(seqs[i])].pages;
    int32_t* row = out + int64_t(i) * ld;
    std::copy(p.begin(), p.end(), row);
    std::fill(row + p.size(), row + width, -1);
  }
}

int64_t PageTable::num_free_pages() const {
  std::lock_guard<std::mutex> lock(mu_);
  return int64_t(free_.size());
}

int64_t PageTable::num_sequences() const {
  std::lock_guard<std::mutex> lock(mu_);
  return int64_t(seqs_.size() - free_ids_.size());
}

}  // namespace mka::memory
