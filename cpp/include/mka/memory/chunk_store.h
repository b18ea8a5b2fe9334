// The DRAM tier (SPEC §7.2): older chunks of context kept in host memory with their SimHash
// signatures, recalled by signature agreement. Framework-free: payloads are opaque bytes (a
// chunk's keys and values as the caller lays them out), signatures bit-packed 64 to a word,
// one signature per key/value head.
//
// The arena is allocated once (pinned, page-locked memory in CUDA builds where asked, so
// copies to the GPU can run asynchronously) and holds budget / chunk_bytes chunks. Full:
// either an error (Full::error) or the oldest chunk is dropped for the new one
// (Full::evict_oldest). Reads return exactly the stored bytes. Insertion, selection and reads
// may run concurrently from several threads (a shared lock for readers).
#pragma once
#include <cstdint>
#include <map>
#include <shared_mutex>
#include <utility>
#include <vector>

namespace mka::memory {

class ChunkStore {
 public:
  enum class Full : int { error, evict_oldest };

  ChunkStore(int64_t chunk_bytes, int64_t kv_heads, int64_t signature_bits, int64_t budget_bytes,
             Full when_full = Full::error, bool pinned = false);
  ~ChunkStore();
  ChunkStore(const ChunkStore&) = delete;
  ChunkStore& operator=(const ChunkStore&) = delete;

  // Stores chunk `index` of sequence `seq`: chunk_bytes of payload and kv_heads signatures of
  // words() words each. Replaces an earlier chunk of the same (seq, index).
  void insert(int64_t seq, int64_t index, const void* payload, const uint64_t* signatures);
  // insert() of n chunks under one lock: payloads n x chunk_bytes, signatures n x kv_heads x
  // words(). All or nothing: an Error (a full store, a negative index) changes nothing.
  void insert_many(int64_t n, const int64_t* seqs, const int64_t* indices, const void* payloads,
                   const uint64_t* signatures);
  // Copies chunk (seq, index)'s payload into dst; an Error if it is not stored.
  void read(int64_t seq, int64_t index, void* dst) const;
  // read() of n chunks under one lock into dst, n x chunk_bytes (a decode step's recall is
  // one call, not one per chunk); an Error naming the first chunk not stored, before any copy.
  void read_many(int64_t n, const int64_t* seqs, const int64_t* indices, void* dst) const;
  // For each kv head, the `top` stored chunks of `seq` with index < limit whose signatures
  // agree most with `query` (kv_heads x words()), best first, ties to the later index; -1
  // pads. out: kv_heads x top chunk indices.
  void select(int64_t seq, int64_t limit, const uint64_t* query, int64_t top, int64_t* out) const;
  bool contains(int64_t seq, int64_t index) const;
  void drop_sequence(int64_t seq);

  int64_t words() const { return (bits_ + 63) / 64; }
  int64_t kv_heads() const { return heads_; }
  int64_t chunk_bytes() const { return chunk_bytes_; }
  int64_t capacity() const { return slots_; }  // chunks the budget holds
  int64_t size() const;                         // chunks stored
  int64_t bytes_used() const { return size() * chunk_bytes_; }
  bool pinned() const { return pinned_; }

 private:
  struct Entry {
    int64_t slot;
    uint64_t age;  // insertion order, for eviction
    std::vector<uint64_t> sig;
  };
  using Key = std::pair<int64_t, int64_t>;  // (seq, index)

  int64_t take_slot();  // a free slot, evicting the oldest chunk if allowed (lock held)
  // Stores or replaces (seq, index) (lock held; the signature masked already).
  void put(int64_t seq, int64_t index, const void* payload, std::vector<uint64_t>&& sig);
  // The signature words with the bits past signature_bits cleared (they must not rank).
  std::vector<uint64_t> masked(const uint64_t* words) const;

  const int64_t chunk_bytes_, heads_, bits_, slots_;
  const Full when_full_;
  bool pinned_ = false;
  unsigned char* arena_ = nullptr;
  std::map<Key, Entry> entries_;
  std::map<uint64_t, Key> by_age_;  // insertion order: the oldest chunk in O(log n)
  std::vector<int64_t> free_slots_;
  uint64_t clock_ = 0;
  mutable std::shared_mutex mu_;
};

}  // namespace mka::memory
