// The HBM tier's classes and ops in mka._C: PageTable (mka/memory/page_table.h) as a Python
// class, and the paged ops (mka/memory/paged_ops.h) as keyword functions like the others.
#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "mka/error.h"
#include "mka/memory/chunk_store.h"
#include "mka/memory/page_table.h"
#include "mka/memory/paged_ops.h"
#include "mka/memory/recall_ops.h"
#include "module_parts.h"
#include "tensor_ref.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace mka::bind {

void bind_memory(nb::module_& m) {
  using memory::PageTable;
  nb::class_<PageTable>(m, "PageTable",
                        "Pages and per-sequence block tables of the paged KV cache (SPEC §7.1)")
      .def(nb::init<int64_t, int64_t, int64_t>(), "num_pages"_a, "page_size"_a,
           "max_pages_per_seq"_a)
      .def("add_sequence", &PageTable::add_sequence)
      .def("reserve",
           [](PageTable& t, const std::vector<int64_t>& seqs, const std::vector<int64_t>& tokens) {
             nb::list copies;
             for (const memory::PageCopy& c : t.reserve(seqs, tokens))
               copies.append(nb::make_tuple(c.src, c.dst));
             return copies;
           },
           "seqs"_a, "tokens"_a,
           "Room for tokens[i] tokens in seqs[i]; returns the page copies (src, dst) to apply")
      .def("fork", &PageTable::fork, "seq"_a)
      .def("truncate", &PageTable::truncate, "seq"_a, "tokens"_a)
      .def("release_front", &PageTable::release_front, "seq"_a, "tokens"_a,
           "Gives back the pages wholly before position `tokens` (their entries become -1)")
      .def("released", &PageTable::released, "seq"_a)
      .def("free", &PageTable::free, "seq"_a)
      .def("length", &PageTable::length, "seq"_a)
      .def("pages", &PageTable::pages, "seq"_a)
      .def("refcount", &PageTable::refcount, "page"_a)
      .def("fill_block_table",
           [](const PageTable& t, const std::vector<int64_t>& seqs, const Array& out) {
             const TensorRef r = ref(out, "out");
             MKA_CHECK(r.device == Device::cpu && r.dtype == DType::i32 && r.ndim == 2 &&
                           r.shape[0] == int64_t(seqs.size()) && r.stride[1] == 1 &&
                           (r.shape[0] <= 1 || r.stride[0] >= r.shape[1]),
                       "out: expected a CPU int32 (len(seqs), W) array with contiguous rows");
             t.fill_block_table(seqs, ptr<int32_t>(r), r.stride[0], r.shape[1]);
           },
           "seqs"_a, "out"_a)
      .def_prop_ro("num_pages", &PageTable::num_pages)
      .def_prop_ro("page_size", &PageTable::page_size)
      .def_prop_ro("max_pages_per_seq", &PageTable::max_pages_per_seq)
      .def_prop_ro("num_free_pages", &PageTable::num_free_pages)
      .def_prop_ro("num_sequences", &PageTable::num_sequences);

  using memory::ChunkStore;
  using Bytes = nb::ndarray<nb::c_contig, nb::device::cpu>;
  using Words = nb::ndarray<int64_t, nb::c_contig, nb::device::cpu>;  // uint64 bit patterns
  nb::class_<ChunkStore>(m, "ChunkStore",
                         "Host-memory chunks with SimHash signatures (the DRAM tier, SPEC §7.2)")
      .def("__init__",
           [](ChunkStore* self, int64_t chunk_bytes, int64_t kv_heads, int64_t signature_bits,
              int64_t budget_bytes, bool evict_oldest, bool pinned) {
             new (self) ChunkStore(chunk_bytes, kv_heads, signature_bits, budget_bytes,
                                   evict_oldest ? ChunkStore::Full::evict_oldest
                                                : ChunkStore::Full::error, pinned);
           },
           "chunk_bytes"_a, "kv_heads"_a, "signature_bits"_a, "budget_bytes"_a,
           "evict_oldest"_a = false, "pinned"_a = false)
      .def("insert",
           [](ChunkStore& s, int64_t seq, int64_t index, const Bytes& payload, const Words& sig) {
             MKA_CHECK(int64_t(payload.nbytes()) == s.chunk_bytes(), "payload: expected ",
                       s.chunk_bytes(), " contiguous bytes, got ", int64_t(payload.nbytes()));
             MKA_CHECK(int64_t(sig.size()) == s.kv_heads() * s.words(), "signatures: expected ",
                       s.kv_heads(), " x ", s.words(), " int64 words, got ", int64_t(sig.size()));
             const void* p = payload.data();
             const auto* w = reinterpret_cast<const uint64_t*>(sig.data());
             without_gil([&] { s.insert(seq, index, p, w); });
           },
           "seq"_a, "index"_a, "payload"_a, "signatures"_a)
      .def("insert_many",
           [](ChunkStore& s, const Words& seqs, const Words& indices, const Bytes& payloads,
              const Words& sigs) {
             const int64_t n = int64_t(seqs.size());
             MKA_CHECK(int64_t(indices.size()) == n, "indices: expected ", n,
                       " entries (one per seqs entry), got ", int64_t(indices.size()));
             MKA_CHECK(int64_t(payloads.nbytes()) == n * s.chunk_bytes(), "payloads: expected ",
                       n, " x ", s.chunk_bytes(), " contiguous bytes, got ",
                       int64_t(payloads.nbytes()));
             MKA_CHECK(int64_t(sigs.size()) == n * s.kv_heads() * s.words(), "signatures: expected ",
                       n, " x ", s.kv_heads(), " x ", s.words(), " int64 words, got ",
                       int64_t(sigs.size()));
             const int64_t* q = seqs.data();
             const int64_t* i = indices.data();
             const void* p = payloads.data();
             const auto* w = reinterpret_cast<const uint64_t*>(sigs.data());
             without_gil([&] { s.insert_many(n, q, i, p, w); });
           },
           "seqs"_a, "indices"_a, "payloads"_a, "signatures"_a)
      .def("read_many",
           [](const ChunkStore& s, const Words& seqs, const Words& indices, Bytes& out) {
             const int64_t n = int64_t(seqs.size());
             MKA_CHECK(int64_t(indices.size()) == n, "indices: expected ", n,
                       " entries (one per seqs entry), got ", int64_t(indices.size()));
             MKA_CHECK(int64_t(out.nbytes()) == n * s.chunk_bytes(), "out: expected ", n, " x ",
                       s.chunk_bytes(), " contiguous bytes, got ", int64_t(out.nbytes()));
             const int64_t* q = seqs.data();
             const int64_t* i = indices.data();
             void* p = out.data();
             without_gil([&] { s.read_many(n, q, i, p); });
           },
           "seqs"_a, "indices"_a, "out"_a.noconvert())
      .def("read",
           [](const ChunkStore& s, int64_t seq, int64_t index, Bytes& out) {
             MKA_CHECK(int64_t(out.nbytes()) == s.chunk_bytes(), "out: expected ",
                       s.chunk_bytes(), " contiguous bytes, got ", int64_t(out.nbytes()));
             void* p = out.data();
             without_gil([&] { s.read(seq, index, p); });
           },
           "seq"_a, "index"_a, "out"_a.noconvert())
      .def("select",
           [](const ChunkStore& s, int64_t seq, int64_t limit, const Words& query, int64_t top,
              Words& out) {
             MKA_CHECK(int64_t(query.size()) == s.kv_heads() * s.words(), "query: expected ",
                       s.kv_heads(), " x ", s.words(), " int64 words, got ", int64_t(query.size()));
             MKA_CHECK(top >= 0 && int64_t(out.size()) == s.kv_heads() * top, "out: expected ",
                       s.kv_heads(), " x top int64 entries, got ", int64_t(out.size()));
             const auto* q = reinterpret_cast<const uint64_t*>(query.data());
             int64_t* o = out.data();
             without_gil([&] { s.select(seq, limit, q, top, o); });
           },
           "seq"_a, "limit"_a, "query"_a, "top"_a, "out"_a.noconvert())
      .def("contains", &ChunkStore::contains, "seq"_a, "index"_a)
      .def("drop_sequence", &ChunkStore::drop_sequence, "seq"_a)
      .def_prop_ro("words", &ChunkStore::words)
      .def_prop_ro("kv_heads", &ChunkStore::kv_heads)
      .def_prop_ro("chunk_bytes", &ChunkStore::chunk_bytes)
      .def_prop_ro("capacity", &ChunkStore::capacity)
      .def_prop_ro("size", &ChunkStore::size)
      .def_prop_ro("bytes_used", &ChunkStore::bytes_used)
      .def_prop_ro("pinned", &ChunkStore::pinned);

  def_op(m, "paged_write", &mka::paged_write);
  def_op(m, "paged_write_fused", &mka::paged_write_fused);
  def_op(m, "paged_attention", &mka::paged_attention);
  def_op(m, "recall_forward", &mka::recall_forward);
  def_op(m, "recall_backward", &mka::recall_backward);
}

}  // namespace mka::bind
