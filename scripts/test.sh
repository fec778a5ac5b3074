#!/usr/bin/env bash
# moet's test suite, as CI runs it:
#
#   bash scripts/test.sh
#
# Installs missing build dependencies (Debian/Ubuntu, apt-get) first, configures build/ci
# (RelWithDebInfo, warnings as errors), builds everything -- tests, the header self-containment
# check, examples, benchmarks -- and runs ctest: unit tests, packaging tests (install +
# find_package / add_subdirectory consumers), examples and benchmark smoke runs. Exits non-zero
# when anything fails. Safe to re-run: an up-to-date build is not rebuilt.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# shellcheck source=scripts/ensure-packages.sh
source "$root/scripts/ensure-packages.sh"
moet_ensure_packages g++ cmake ninja-build libeigen3-dev catch2 libbenchmark-dev libopenblas-dev

build_dir=build/ci
jobs="$(nproc)"

cmake -S . -B "$build_dir" -G Ninja \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMOET_WERROR=ON \
  -DMOET_BUILD_TESTS=ON \
  -DMOET_BUILD_EXAMPLES=ON \
  -DMOET_BUILD_BENCHMARKS=ON
cmake --build "$build_dir" -j "$jobs"
ctest --test-dir "$build_dir" --output-on-failure -j "$jobs"

# Sanitizer runs (a later CI step; they need clang and libomp-dev for tsan):
#   moet_ensure_packages clang libomp-dev
#   cmake --preset asan && cmake --build --preset asan && ctest --preset asan
#   cmake --preset tsan && cmake --build --preset tsan && ctest --preset tsan
