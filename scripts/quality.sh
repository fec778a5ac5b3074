#!/usr/bin/env bash
# The quality comparison of issues 4 and 16: trains the real-data examples once per router
# and seed and writes markdown tables (mean and spread over the seeds) plus SVG plots:
#
#   bash scripts/quality.sh [output directory, default results/quality]
#
# Installs what is missing (compiler, CMake, Eigen, zlib, nlohmann-json (example 04 saves its
# parameters with moet::io) and the Debian data packages
# dataset-fashion-mnist and fortunes) with apt-get, builds the examples in Release with
# -march=native in build/quality, then runs, for the seeds in SEEDS (default 1,2,3)
#   example_04_fashion_mnist   (Fashion-MNIST classifier, every router, EPOCHS epochs: 3)
#   example_06_char_lm         (character-level language model on the fortunes corpus, every
#                               router for STEPS steps (1000), then the k sweep of each seed's
#                               trained top_k:k=2 model)
# and writes <out>/quality.md (the summaries over the seeds, the k sweep, and seed 1's full
# tables) with the plots under <out>/fashion_mnist and <out>/char_lm. The examples' own
# defaults (8 epochs, 2000 steps) are halved or more so that 3 seeds fit the 15-minute budget
# on the 2-core development VM.
set -euo pipefail

script_start=$(date +%s)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-results/quality}"

# shellcheck source=scripts/ensure-packages.sh
source "$root/scripts/ensure-packages.sh"
moet_ensure_packages g++ cmake ninja-build libeigen3-dev zlib1g-dev nlohmann-json3-dev \
  dataset-fashion-mnist fortunes

build_dir=build/quality
cmake -S . -B "$build_dir" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_FLAGS=-march=native \
  -DMOET_BUILD_TESTS=OFF \
  -DMOET_BUILD_EXAMPLES=ON \
  -DMOET_BUILD_BENCHMARKS=OFF
cmake --build "$build_dir" --target example_04_fashion_mnist example_06_char_lm -j "$(nproc)"

seeds="${SEEDS:-1,2,3}"
epochs="${EPOCHS:-3}"
steps="${STEPS:-1000}"
first_seed="${seeds%%,*}"
mkdir -p "$out"
start=$(date +%s)
"$build_dir/examples/example_04_fashion_mnist" --seeds "$seeds" --epochs "$epochs" \
  --out "$out/fashion_mnist"
"$build_dir/examples/example_06_char_lm" --seeds "$seeds" --steps "$steps" --out "$out/char_lm"
seconds=$(( $(date +%s) - start ))
total=$(( $(date +%s) - script_start ))

{
  echo "# moet quality comparison"
  echo
  echo "\`bash scripts/quality.sh\`, $(date -u +%Y-%m-%d), $(nproc) threads, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs): seeds ${seeds}, ${epochs} epochs of Fashion-MNIST, ${steps} LM steps; ${seconds} s of training, ${total} s in all with the build."
  echo
  echo "## Fashion-MNIST classifier (example 04)"
  echo
  cat "$out/fashion_mnist/summary.md"
  echo
  echo "Plot: fashion_mnist/summary.svg (one point per seed)."
  echo
  echo "## Character-level language model on fortunes (example 06)"
  echo
  cat "$out/char_lm/summary.md"
  echo
  echo "Plots: char_lm/summary.svg (one point per seed), char_lm/seed_${first_seed}/k_sweep.svg."
  echo
  echo "## Seed ${first_seed} in full"
  echo
  echo "### Fashion-MNIST"
  echo
  cat "$out/fashion_mnist/seed_${first_seed}/results.md"
  echo
  echo "Plots: fashion_mnist/seed_${first_seed}/loss.svg, accuracy_vs_params.svg, mean_k.svg, dynmoe_experts.svg"
  echo
  echo "### Character LM"
  echo
  cat "$out/char_lm/seed_${first_seed}/results.md"
  echo
  echo "Plots: char_lm/seed_${first_seed}/loss.svg, bpc_vs_k.svg"
} > "$out/quality.md"
echo "wrote $out/quality.md (${seconds} s of training, ${total} s in all)"
