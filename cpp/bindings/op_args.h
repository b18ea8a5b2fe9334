// Fills an op's descriptor (mka/op_args.h) from Python keyword arguments, by the names its
// `fields` lists: arrays (DLPack capsules or objects) or None for tensors, numbers, bools,
// the stream as an integer handle and kernel choices by name. Absent names keep the
// descriptor's defaults; unknown names raise, so a misspelt argument is never dropped.
#pragma once
#include <nanobind/nanobind.h>

#include <string>
#include <vector>

#include "mka/op_args.h"
#include "tensor_ref.h"

namespace mka::bind {

// A scan kernel by its name (kScanKernelNames); ValueError naming `what` otherwise.
ScanKernel scan_kernel(const std::string& name, const std::string& what);

class ArgsFiller {
 public:
  ArgsFiller(const nanobind::kwargs& kw, const char* op) : kw_(kw), op_(op) {}

  template <class Args> Args fill() {
    Args a;
    a.fields(*this);
    if (used_ != kw_.size()) reject_unknown(Args{});
    return a;
  }

  template <class T> void operator()(const char* name, T& field) {
    PyObject* value = PyDict_GetItemString(kw_.ptr(), name);  // borrowed
    if (!value) return;
    ++used_;
    set(field, nanobind::handle(value), name);
  }

 private:
  void set(TensorRef& t, nanobind::handle h, const char* name);
  void set(double& x, nanobind::handle h, const char* name);
  void set(bool& x, nanobind::handle h, const char* name);
  void set(int64_t& x, nanobind::handle h, const char* name);
  void set(std::optional<double>& x, nanobind::handle h, const char* name);
  void set(std::optional<int64_t>& x, nanobind::handle h, const char* name);
  void set(void*& stream, nanobind::handle h, const char* name);
  void set(AttnKernel& k, nanobind::handle h, const char* name);
  void set(ScanKernel& k, nanobind::handle h, const char* name);
  void set(RecallKernel& k, nanobind::handle h, const char* name);

  // Raises naming the first keyword that is none of Args' fields.
  template <class Args> [[noreturn]] void reject_unknown(Args a) {
    std::vector<std::string> names;
    a.fields([&](const char* name, auto&) { names.emplace_back(name); });
    reject_unknown(names);
  }
  [[noreturn]] void reject_unknown(const std::vector<std::string>& names);
  std::string what(const char* name) const;  // "op: name", for error messages

  const nanobind::kwargs& kw_;
  const char* op_;
  size_t used_ = 0;
  std::vector<Array> keep_;  // the arrays whose memory the descriptor points into
};

}  // namespace mka::bind
