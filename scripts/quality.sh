#!/usr/bin/env bash
# The quality comparison of issue 4: trains the real-data examples once per router and writes
# markdown tables plus SVG plots:
#
#   bash scripts/quality.sh [output directory, default results/quality]
#
# Installs what is missing (compiler, CMake, Eigen, zlib and the Debian data packages
# dataset-fashion-mnist and fortunes) with apt-get, builds the examples in Release with
# -march=native in build/quality, then runs
#   example_04_fashion_mnist   (Fashion-MNIST classifier, every router)
#   example_06_char_lm         (character-level language model on the fortunes corpus, every
#                               router, then the k sweep of the trained top_k:k=2 model)
# with their default budgets (9 routers each: 524 s with the build on the idle 2-core
# development VM; the budget is 15 minutes), and writes <out>/quality.md (both tables and the
# k sweep) with <out>/fashion_mnist/*.svg and <out>/char_lm/*.svg.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-results/quality}"

# shellcheck source=scripts/ensure-packages.sh
source "$root/scripts/ensure-packages.sh"
moet_ensure_packages g++ cmake ninja-build libeigen3-dev zlib1g-dev dataset-fashion-mnist fortunes

build_dir=build/quality
cmake -S . -B "$build_dir" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_FLAGS=-march=native \
  -DMOET_BUILD_TESTS=OFF \
  -DMOET_BUILD_EXAMPLES=ON \
  -DMOET_BUILD_BENCHMARKS=OFF
cmake --build "$build_dir" --target example_04_fashion_mnist example_06_char_lm -j "$(nproc)"

mkdir -p "$out"
start=$(date +%s)
"$build_dir/examples/example_04_fashion_mnist" --out "$out/fashion_mnist"
"$build_dir/examples/example_06_char_lm" --out "$out/char_lm"
seconds=$(( $(date +%s) - start ))

{
  echo "# moet quality comparison"
  echo
  echo "\`bash scripts/quality.sh\`, $(date -u +%Y-%m-%d), $(nproc) threads, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), ${seconds} s in all."
  echo
  echo "## Fashion-MNIST classifier (example 04)"
  echo
  cat "$out/fashion_mnist/results.md"
  echo
  echo "Plots: fashion_mnist/loss.svg, accuracy_vs_params.svg, mean_k.svg, dynmoe_experts.svg"
  echo
  echo "## Character-level language model on fortunes (example 06)"
  echo
  cat "$out/char_lm/results.md"
  echo
  echo "Plots: char_lm/loss.svg, bpc_vs_k.svg"
  echo
  echo "## k sweep: one trained model, other routing at evaluation (example 06)"
  echo
  cat "$out/char_lm/k_sweep.md"
  echo
  echo "Plot: char_lm/k_sweep.svg"
} > "$out/quality.md"
echo "wrote $out/quality.md (${seconds} s)"
