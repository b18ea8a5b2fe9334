// Input errors: thrown where an input enters, with the argument's name and what was expected.
// Derives from std::invalid_argument so the binding surfaces it as a Python ValueError.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace mka {

struct Error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

template <class... Args>
[[noreturn]] void fail(const Args&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Error(os.str());
}

#define MKA_CHECK(cond, ...) \
  do {                       \
    if (!(cond)) ::mka::fail(__VA_ARGS__); \
  } while (0)

}  // namespace mka
