#!/usr/bin/env bash
# Builds moet's router comparison in Release and runs it:
#
#   bash scripts/compare.sh [moet-compare arguments...]
#
# Installs missing build dependencies (Debian/Ubuntu, apt-get) first, builds only the
# `moet-compare` target in build/release, and passes every argument to it. Safe to re-run:
# an up-to-date build does nothing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# shellcheck source=scripts/ensure-packages.sh
source "$root/scripts/ensure-packages.sh"
moet_ensure_packages g++ cmake ninja-build libeigen3-dev libbenchmark-dev libopenblas-dev \
  libcli11-dev nlohmann-json3-dev

build_dir=build/release
jobs="$(nproc)"

cmake -S . -B "$build_dir" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DMOET_BUILD_TESTS=OFF \
  -DMOET_BUILD_EXAMPLES=OFF \
  -DMOET_BUILD_BENCHMARKS=ON \
  -DMOET_BENCH_NATIVE=OFF
cmake --build "$build_dir" --target moet-compare -j "$jobs"

# The environment may pin OpenBLAS to AVX2 kernels; let it pick the machine's best ones.
unset OPENBLAS_CORETYPE
exec "$build_dir/bench/moet-compare" "$@"
