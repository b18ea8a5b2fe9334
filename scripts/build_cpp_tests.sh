#!/usr/bin/env bash
# Builds the C++ unit tests (GoogleTest) into build/ctest, for `ctest --test-dir build/ctest`.
# Checks the prerequisites first (CMake >= 3.24, a C++17 compiler) and says what to install.
# GoogleTest: an installed one if CMake finds it, else the pinned release downloaded by CMake;
# where neither works and this runs as root with apt-get (containers, CI), it installs
# libgtest-dev. MKA_GTEST=SYSTEM|FETCH forces one source (CMake option of the same name).
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/ctest
fail() { echo "build_cpp_tests: $*" >&2; exit 1; }

command -v cmake >/dev/null ||
  fail "needs CMake >= 3.24: pip install 'cmake>=3.24' (or your system's package)"
version=$(cmake --version | head -n1 | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n1)
printf '%s\n' 3.24 "$version" | sort -V -C ||
  fail "needs CMake >= 3.24, $(command -v cmake) is $version: pip install 'cmake>=3.24'"

cxx=${CXX:-$(command -v c++ || command -v g++ || command -v clang++ || true)}
[ -n "$cxx" ] || fail "needs a C++17 compiler: apt-get install g++ (Debian/Ubuntu), xcode-select --install (macOS)"
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
printf '#include <optional>\nint main() { if constexpr (true) { return std::optional<int>(0).value(); } }\n' \
  > "$probe/probe.cpp"
"$cxx" -std=c++17 "$probe/probe.cpp" -o "$probe/probe" 2>"$probe/log" ||
  fail "$cxx does not compile C++17 ($(head -n1 "$probe/log")): install g++ >= 8 or clang >= 7"

configure() {
  cmake -S . -B "$build" -DMKA_BUILD_TESTS=ON -DMKA_CUDA=OFF -DMKA_GTEST="${MKA_GTEST:-AUTO}" \
    2>&1 | tee "$probe/configure.log"
  return "${PIPESTATUS[0]}"
}
if ! configure; then
  grep -q "GoogleTest is not installed" "$probe/configure.log" || exit 1
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${MKA_GTEST:-AUTO}" = AUTO ]; then
    echo "build_cpp_tests: installing GoogleTest with apt-get (libgtest-dev)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev
    rm -f "$build/CMakeCache.txt"
    configure
  else
    exit 1
  fi
fi
cmake --build "$build" -j "$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)"
