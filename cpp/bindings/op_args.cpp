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

template <class E, size_t N>
E choice(nb::handle h, const char* op, const char* name, const char* const (&names)[N]) {
  const std::string s = cast<std::string>(h, op, name, "a string");
  for (size_t i = 0; i < N; ++i)
    if (s == names[i]) return E(i);
  std::string all;
  for (size_t i = 0; i < N; ++i) all += (i ? ", " : "") + std::string(names[i]);
  fail(op, ": ", name, ": expected one of ", all, ", got '", s, "'");
}

}  // namespace

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

void ArgsFiller::set(bool& x, nb::handle h, const char* name) {
  x = cast<bool>(h, op_, name, "a bool");
}

void ArgsFiller::set(std::optional<double>& x, nb::handle h, const char* name) {
  x = h.is_none() ? std::nullopt : std::optional<double>(cast<double>(h, op_, name, "a float or None"));
}

void ArgsFiller::set(std::optional<int64_t>& x, nb::handle h, const char* name) {
  x = h.is_none() ? std::nullopt
                  : std::optional<int64_t>(cast<int64_t>(h, op_, name, "an int or None"));
}

void ArgsFiller::set(void*& stream, nb::handle h, const char* name) {
  stream = reinterpret_cast<void*>(cast<uintptr_t>(h, op_, name, "a stream handle (int)"));
}

void ArgsFiller::set(AttnKernel& k, nb::handle h, const char* name) {
  k = choice<AttnKernel>(h, op_, name, kAttnKernelNames);
}

void ArgsFiller::set(ScanKernel& k, nb::handle h, const char* name) {
  k = choice<ScanKernel>(h, op_, name, kScanKernelNames);
}

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
