#include "op_args.h"

#include <nanobind/stl/string.h>

#include <cstdint>
#include <cstring>

#include "mka/error.h"

namespace mka::bind {

namespace nb = nanobind;

namespace {

template <class T> T cast(nb::handle h, const char* op, const char* name, const char* expected) {
  T x;
  if (!nb::try_cast<T>(h, x)) fail(op, ": ", name, ": expected ", expected);
  return x;
}

// The enum value named `s` in `names` (enum order); `what` names the argument in the error.
template <class E, size_t N>
E choice(const std::string& s, const std::string& what, const char* const (&names)[N]) {
  for (size_t i = 0; i < N; ++i)
    if (s == names[i]) return E(i);
  std::string all;
  for (size_t i = 0; i < N; ++i) all += (i ? ", " : "") + std::string(names[i]);
  fail(what, ": expected one of ", all, ", got '", s, "'");
}

}  // namespace

ScanKernel scan_kernel(const std::string& name, const std::string& what) {
  return choice<ScanKernel>(name, what, kScanKernelNames);
}

void ArgsFiller::set(TensorRef& t, nb::handle h, const char* name) {
  if (h.is_none()) {
    t = TensorRef{};
    return;
  }
  keep_.push_back(cast<Array>(h, op_, name, "an array (DLPack) or None"));
  t = ref(keep_.back(), name);
}

void ArgsFiller::set(double& x, nb::handle h, const char* name) {
  x = cast<double>(h, op_, name, "a float");
}

void ArgsFiller::set(int64_t& x, nb::handle h, const char* name) {
  x = cast<int64_t>(h, op_, name, "an int");
}

void ArgsFiller::set(bool& x, nb::handle h, const char* name) {
  x = cast<bool>(h, op_, name, "a bool");
}

void ArgsFiller::set(std::optional<double>& x, nb::handle h, const char* name) {
  x = h.is_none() ? std::nullopt
                  : std::optional<double>(cast<double>(h, op_, name, "a float or None"));
}

void ArgsFiller::set(std::optional<int64_t>& x, nb::handle h, const char* name) {
  x = h.is_none() ? std::nullopt
                  : std::optional<int64_t>(cast<int64_t>(h, op_, name, "an int or None"));
}

void ArgsFiller::set(void*& stream, nb::handle h, const char* name) {
  stream = reinterpret_cast<void*>(cast<uintptr_t>(h, op_, name, "a stream handle (int)"));
}

void ArgsFiller::set(AttnKernel& k, nb::handle h, const char* name) {
  k = choice<AttnKernel>(cast<std::string>(h, op_, name, "a string"), what(name),
                         kAttnKernelNames);
}

void ArgsFiller::set(ScanKernel& k, nb::handle h, const char* name) {
  k = scan_kernel(cast<std::string>(h, op_, name, "a string"), what(name));
}

void ArgsFiller::set(RecallKernel& k, nanobind::handle h, const char* name) {
  k = choice<RecallKernel>(cast<std::string>(h, op_, name, "a string"), what(name),
                           kRecallKernelNames);
}

std::string ArgsFiller::what(const char* name) const { return std::string(op_) + ": " + name; }

void ArgsFiller::reject_unknown(const std::vector<std::string>& names) {
  for (auto [key, value] : kw_) {
    const std::string k = nb::cast<std::string>(key);
    bool known = false;
    for (const std::string& n : names) known = known || n == k;
    if (!known) fail(op_, ": unexpected argument '", k, "'");
  }
  fail(op_, ": unexpected arguments");
}

}  // namespace mka::bind
