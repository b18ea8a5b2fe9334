// Pieces of the native module shared by its files: running an op without the GIL, an op's
// entry point as a keyword function, and the parts of the module defined elsewhere.
#pragma once
#include <nanobind/nanobind.h>

#include <exception>

#include "op_args.h"

namespace mka::bind {

namespace nb = nanobind;

// Runs f with the GIL released. An error leaves the released region as a value and is
// rethrown only once the GIL is back: unwinding through the release guard (what
// nb::call_guard does) crashed on Python 3.12 with torch tensors.
template <class F> void without_gil(F&& f) {
  std::exception_ptr err;
  {
    nb::gil_scoped_release release;
    try {
      f();
    } catch (...) {
      err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
}

// An op's entry point as a Python function of keyword arguments only: its descriptor is
// filled by name (the filler holds the arrays it points into until the op returns), then
// the op runs with the GIL released.
template <class Args> void def_op(nb::module_& m, const char* name, void (*op)(const Args&)) {
  m.def(name, [name, op](nb::kwargs kw) {
    mka::bind::ArgsFiller filler(kw, name);
    const Args args = filler.fill<Args>();
    without_gil([&] { op(args); });
  });
}


// memory.cpp: PageTable and the paged ops.
void bind_memory(nb::module_& m);

}  // namespace mka::bind
