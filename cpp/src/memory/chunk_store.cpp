#include "mka/memory/chunk_store.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "mka/cpu/thread_pool.h"
#include "mka/error.h"
#ifdef MKA_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace mka::memory {

ChunkStore::ChunkStore(int64_t chunk_bytes, int64_t kv_heads, int64_t signature_bits,
                       int64_t budget_bytes, Full when_full, bool pinned)
    : chunk_bytes_(chunk_bytes), heads_(kv_heads), bits_(signature_bits),
      slots_(chunk_bytes > 0 ? budget_bytes / chunk_bytes : 0), when_full_(when_full) {
  MKA_CHECK(chunk_bytes >= 1, "chunk_bytes: must be at least 1, got ", chunk_bytes);
  MKA_CHECK(kv_heads >= 1, "kv_heads: must be at least 1, got ", kv_heads);
  MKA_CHECK(signature_bits >= 1, "signature_bits: must be at least 1, got ", signature_bits);
  MKA_CHECK(slots_ >= 1, "budget_bytes: ", budget_bytes, " holds no chunk of ", chunk_bytes,
            " bytes");
  const size_t bytes = size_t(slots_) * size_t(chunk_bytes_);
  if (pinned) {
#ifdef MKA_WITH_CUDA
    void* p = nullptr;
    MKA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocDefault) == cudaSuccess,
              "pinned: cudaHostAlloc of ", bytes, " bytes failed");
    arena_ = static_cast<unsigned char*>(p);
    pinned_ = true;
#else
    fail("pinned: this build of mka has no CUDA (pinned host memory needs it)");
#endif
  } else {
    arena_ = static_cast<unsigned char*>(std::malloc(bytes));
    MKA_CHECK(arena_ != nullptr, "budget_bytes: could not allocate ", bytes, " bytes");
  }
  free_slots_.reserve(size_t(slots_));
  for (int64_t s = slots_ - 1; s >= 0; --s) free_slots_.push_back(s);
}

ChunkStore::~ChunkStore() {
#ifdef MKA_WITH_CUDA
  if (pinned_) {
    cudaFreeHost(arena_);
    return;
  }
#endif
  std::free(arena_);
}

int64_t ChunkStore::take_slot() {
  if (free_slots_.empty()) {
    MKA_CHECK(when_full_ == Full::evict_oldest, "chunk store: full (", slots_, " chunks of ",
              chunk_bytes_, " bytes: the byte budget); drop sequences, raise the budget, or "
              "let it evict the oldest chunks");
    const auto oldest = by_age_.begin();
    auto it = entries_.find(oldest->second);
    free_slots_.push_back(it->second.slot);
    entries_.erase(it);
    by_age_.erase(oldest);
  }
  const int64_t s = free_slots_.back();
  free_slots_.pop_back();
  return s;
}

std::vector<uint64_t> ChunkStore::masked(const uint64_t* words_in) const {
  const int64_t W = words();
  std::vector<uint64_t> out(words_in, words_in + heads_ * W);
  const int64_t spare = W * 64 - bits_;
  if (spare > 0)
    for (int64_t g = 0; g < heads_; ++g) out[size_t(g * W + W - 1)] &= ~uint64_t(0) >> spare;
  return out;
}

void ChunkStore::put(int64_t seq, int64_t index, const void* payload,
                     std::vector<uint64_t>&& sig) {
  auto it = entries_.find({seq, index});
  int64_t slot;
  if (it != entries_.end()) {
    slot = it->second.slot;
    by_age_.erase(it->second.age);
  } else {
    slot = take_slot();
  }
  std::memcpy(arena_ + slot * chunk_bytes_, payload, size_t(chunk_bytes_));
  const uint64_t age = clock_++;
  by_age_[age] = {seq, index};
  entries_[{seq, index}] = Entry{slot, age, std::move(sig)};
}

void ChunkStore::insert(int64_t seq, int64_t index, const void* payload,
                        const uint64_t* signatures) {
  MKA_CHECK(index >= 0, "index: must be >= 0, got ", index);
  std::vector<uint64_t> sig = masked(signatures);  // allocations before any change
  std::unique_lock lock(mu_);
  put(seq, index, payload, std::move(sig));
}

void ChunkStore::insert_many(int64_t n, const int64_t* seqs, const int64_t* indices,
                             const void* payloads, const uint64_t* signatures) {
  MKA_CHECK(n >= 0, "n: must be >= 0, got ", n);
  const int64_t W = words();
  std::vector<std::vector<uint64_t>> sigs;  // allocations before any change
  sigs.reserve(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    MKA_CHECK(indices[i] >= 0, "indices: must be >= 0, got ", indices[i], " at ", i);
    sigs.push_back(masked(signatures + i * heads_ * W));
  }
  std::unique_lock lock(mu_);
  if (when_full_ == Full::error) {  // room for the chunks not stored yet, counted once each
    std::vector<Key> fresh;
    for (int64_t i = 0; i < n; ++i)
      if (!entries_.count({seqs[i], indices[i]})) fresh.push_back({seqs[i], indices[i]});
    std::sort(fresh.begin(), fresh.end());
    const auto need = int64_t(std::unique(fresh.begin(), fresh.end()) - fresh.begin());
    MKA_CHECK(need <= int64_t(free_slots_.size()), "chunk store: full (", slots_, " chunks of ",
              chunk_bytes_, " bytes: the byte budget; ", need, " new chunks, ",
              int64_t(free_slots_.size()), " free); drop sequences, raise the budget, or let it "
              "evict the oldest chunks");
  }
  const auto* bytes = static_cast<const unsigned char*>(payloads);
  for (int64_t i = 0; i < n; ++i)
    put(seqs[i], indices[i], bytes + i * chunk_bytes_, std::move(sigs[size_t(i)]));
}

void ChunkStore::read_many(int64_t n, const int64_t* seqs, const int64_t* indices,
                           void* dst) const {
  MKA_CHECK(n >= 0, "n: must be >= 0, got ", n);
  std::shared_lock lock(mu_);
  std::vector<int64_t> slots(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    auto it = entries_.find({seqs[i], indices[i]});
    MKA_CHECK(it != entries_.end(), "chunk store: no chunk ", indices[i], " of sequence ",
              seqs[i], " (entry ", i, ")");
    slots[size_t(i)] = it->second.slot;
  }
  auto* out = static_cast<unsigned char*>(dst);
  // A prefill step's recall reads thousands of chunks (tens of MB): one thread's memcpy is
  // far below the host's memory bandwidth, so the pool's threads share them. The shared lock
  // stays held through the copies: an insert that evicts would reuse these slots.
  parallel_for(n, [&](int64_t i) {
    std::memcpy(out + i * chunk_bytes_, arena_ + slots[size_t(i)] * chunk_bytes_,
                size_t(chunk_bytes_));
  }, double(n) * double(chunk_bytes_));
}

void ChunkStore::read(int64_t seq, int64_t index, void* dst) const {
  std::shared_lock lock(mu_);
  auto it = entries_.find({seq, index});
  MKA_CHECK(it != entries_.end(), "chunk store: no chunk ", index, " of sequence ", seq);
  std::memcpy(dst, arena_ + it->second.slot * chunk_bytes_, size_t(chunk_bytes_));
}

bool ChunkStore::contains(int64_t seq, int64_t index) const {
  std::shared_lock lock(mu_);
  return entries_.count({seq, index}) > 0;
}

void ChunkStore::select(int64_t seq, int64_t limit, const uint64_t* query, int64_t top,
                        int64_t* out) const {
  MKA_CHECK(top >= 0, "top: must be >= 0, got ", top);
  const std::vector<uint64_t> qs = masked(query);
  std::shared_lock lock(mu_);
  const int64_t W = words();
  // (matching bits, index) per candidate and head; the chunks of seq sit together in the map
  std::vector<std::pair<int64_t, int64_t>> ranked;
  for (int64_t g = 0; g < heads_; ++g) {
    ranked.clear();
    for (auto it = entries_.lower_bound({seq, 0}); it != entries_.end() && it->first.first == seq &&
                                                    it->first.second < limit; ++it) {
      const uint64_t* k = it->second.sig.data() + g * W;
      int64_t mismatch = 0;
      for (int64_t w = 0; w < W; ++w) mismatch += __builtin_popcountll(qs[size_t(g * W + w)] ^ k[w]);
      ranked.emplace_back(bits_ - mismatch, it->first.second);
    }
    const size_t n = std::min<size_t>(size_t(top), ranked.size());
    std::partial_sort(ranked.begin(), ranked.begin() + long(n), ranked.end(),
                      [](auto& a, auto& b) { return a > b; });  // more matches, then later
    for (int64_t r = 0; r < top; ++r)
      out[g * top + r] = size_t(r) < n ? ranked[size_t(r)].second : -1;
  }
}

void ChunkStore::drop_sequence(int64_t seq) {
  std::unique_lock lock(mu_);
  for (auto it = entries_.lower_bound({seq, 0}); it != entries_.end() && it->first.first == seq;) {
    free_slots_.push_back(it->second.slot);
    by_age_.erase(it->second.age);
    it = entries_.erase(it);
  }
}

int64_t ChunkStore::size() const {
  std::shared_lock lock(mu_);
  return int64_t(entries_.size());
}

}  // namespace mka::memory
