#!/usr/bin/env bash
# Builds the native module with its CUDA kernels on a machine that has nvcc but no GPU, for a
# GPU machine's Python: the result is one file, mka/_C*.so, that `PREBUILT=FILE bash
# bench/gpu_suite.sh` (or a copy into python/mka/ with PYTHONPATH=python) runs there.
#
#   PYTHON=python3.12 bash scripts/build_cuda_extension.sh        # prints the module's path
#
# PYTHON: the interpreter whose version the GPU machine runs (its headers are needed; nanobind
# is installed into a venv of it under build/ if it lacks it). ARCHS: CMAKE_CUDA_ARCHITECTURES
# (default 90a: the Hopper kernels only, the fastest build). The build directory is
# build/cuda-<python version>-<archs>; rerun after a change to rebuild only what it touches.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "build_cuda_extension: $*" >&2; exit 1; }

py=${PYTHON:-python3}
archs=${ARCHS:-90a}
command -v nvcc >/dev/null || fail "needs nvcc (the CUDA toolkit) on the PATH"
command -v "$py" >/dev/null || fail "no interpreter '$py' (set PYTHON=...)"
command -v cmake >/dev/null || fail "needs CMake >= 3.24: pip install 'cmake>=3.24'"
version=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
build="build/cuda-$version-${archs//;/_}"
if ! "$py" -c 'import nanobind' 2>/dev/null; then
  # An interpreter without nanobind: a venv of it beside the build, with nanobind only.
  venv="build/venv-$version"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q nanobind
  py="$PWD/$venv/bin/python"
fi
case "$py" in  # CMake wants an absolute path (a venv's: not resolved to its base interpreter)
  */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;;
  *) py=$(command -v "$py") ;;
esac
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMKA_BUILD_PYTHON=ON \
  -DMKA_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$archs" "-DPython_EXECUTABLE=$py" \
  > "$build.configure.log" 2>&1 || { tail -20 "$build.configure.log"; fail "configure failed"; }
# Everything is rebuilt from the sources as they are when the build starts: edit sources only
# after it ends (a header edited mid-build can leave an object older than its inputs yet newer
# on disk, which the next build would keep).
rc=0
cmake --build "$build" --target _C -j "$(nproc)" > "$build.build.log" 2>&1 || rc=$?
grep -E "error|Registers are spilled" "$build.build.log" >&2 || true
[ "$rc" -eq 0 ] || fail "the build failed (log: $build.build.log)"
module=$(ls "$build"/_C*.so 2>/dev/null | head -n1)
[ -n "$module" ] || fail "no module in $build (log: $build.build.log)"
echo "$module"
