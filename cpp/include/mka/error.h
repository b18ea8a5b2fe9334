// Input errors: thrown where an input enters, with the argument's name and what was expected.
// Derives from std::invalid_argument so the binding surfaces it as a Python ValueError.
#pragma once
#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace mka {

struct Error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Message pieces are appended without iostreams: with torch imported first (Python 3.12,
// torch 2.11) formatting an integer through std::ostream inside the module can segfault
// (basic_ostream::_M_insert<long> -> codecvt), which would turn every error into a crash.
namespace detail {
inline void append(std::string& s, const char* x) { s += x; }  // before bool for literals
inline void append(std::string& s, const std::string& x) { s += x; }
inline void append(std::string& s, std::string_view x) { s += x; }
inline void append(std::string& s, char x) { s += x; }
inline void append(std::string& s, bool x) { s += x ? "true" : "false"; }
template <class T>
std::enable_if_t<std::is_integral_v<T>> append(std::string& s, T x) {
  s += std::to_string(x);
}
template <class T>
std::enable_if_t<std::is_floating_point_v<T>> append(std::string& s, T x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", double(x));
  s += buf;
}
}  // namespace detail

template <class... Args>
[[noreturn]] void fail(const Args&... parts) {
  std::string msg;
  (detail::append(msg, parts), ...);
  throw Error(msg);
}

#define MKA_CHECK(cond, ...) \
  do {                       \
    if (!(cond)) ::mka::fail(__VA_ARGS__); \
  } while (0)

}  // namespace mka
