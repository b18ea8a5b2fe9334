// The HBM tier's classes and ops in mka._C: PageTable (mka/memory/page_table.h) as a Python
// class, and the paged ops (mka/memory/paged_ops.h) as keyword functions like the others.
#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "mka/error.h"
#include "mka/memory/page_table.h"
#include "mka/memory/paged_ops.h"
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
      .def("free", &PageTable::free, "seq"_a)
      .def("length", &PageTable::length, "seq"_a)
      .def("pages", &PageTable::pages, "seq"_a)
      .def("refcount", &PageTable::refcount, "page"_a)
      .def("fill_block_table",
           [](const PageTable& t, const std::vector<int64_t>& seqs, const Array& out) {
             const TensorRef r = ref(out, "out");
             MKA_CHECK(r.device == Device::cpu && r.dtype == DType::i32 && r.ndim == 2 &&
                           r.shape[0] == int64_t(seqs.size()) && r.stride[1] == 1,
                       "out: expected a CPU int32 (len(seqs), W) array with contiguous rows");
             t.fill_block_table(seqs, ptr<int32_t>(r), r.stride[0]);
           },
           "seqs"_a, "out"_a)
      .def_prop_ro("num_pages", &PageTable::num_pages)
      .def_prop_ro("page_size", &PageTable::page_size)
      .def_prop_ro("max_pages_per_seq", &PageTable::max_pages_per_seq)
      .def_prop_ro("num_free_pages", &PageTable::num_free_pages)
      .def_prop_ro("num_sequences", &PageTable::num_sequences);

  def_op(m, "paged_write", &mka::paged_write);
  def_op(m, "paged_attention", &mka::paged_attention);
}

}  // namespace mka::bind
