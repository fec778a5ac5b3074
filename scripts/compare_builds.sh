#!/usr/bin/env bash
# The same comparison from two builds of moet-compare, interleaved: build/release (the default
# flags, what linking moet::moet gives) and build/release-native (-march=native everywhere).
# Runs them alternately ROUNDS times (default 3), then prints, per token count, weight format
# and gate, the median over the rounds of each build's median time and their ratio:
#
#   bash scripts/compare_builds.sh [moet-compare arguments...]
#   ROUNDS=5 bash scripts/compare_builds.sh --tokens 1,32,512 --weights f32,bf16
#
# Each round runs both programs back to back in the same conditions (same flush, same inputs);
# alternating the order (A B, B A, ...) keeps either from always running second.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/ensure-packages.sh
source "$root/scripts/ensure-packages.sh"
moet_ensure_packages g++ cmake ninja-build libeigen3-dev libbenchmark-dev libopenblas-dev \
  libcli11-dev nlohmann-json3-dev python3

rounds="${ROUNDS:-3}"
jobs="$(nproc)"
for variant in release:OFF release-native:ON; do
  dir="build/${variant%%:*}"
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOET_BUILD_TESTS=OFF \
    -DMOET_BUILD_EXAMPLES=OFF -DMOET_BUILD_BENCHMARKS=ON -DMOET_BENCH_NATIVE="${variant##*:}" >/dev/null
  cmake --build "$dir" --target moet-compare -j "$jobs"
done

unset OPENBLAS_CORETYPE
out="$(mktemp -d)"
for ((r = 0; r < rounds; ++r)); do
  order=(release release-native)
  if ((r % 2 == 1)); then order=(release-native release); fi
  for b in "${order[@]}"; do
    "build/$b/bench/moet-compare" "$@" --json "$out/$b.$r.json" >"$out/$b.$r.txt"
    echo "round $((r + 1))/$rounds: $b done" >&2
  done
done

python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def rows(build):
    table = {}
    for r in range(rounds):
        doc = json.load(open(f"{out}/{build}.{r}.json"))
        for row in doc["results"] if isinstance(doc, dict) else doc:
            gate = row["gate"] + (":" + row["params"] if row.get("params") else "")
            key = (row["tokens"], row["threads"], row.get("weights", "f32"), gate)
            table.setdefault(key, []).append(row["ms_median"])
    return table
a, b = rows("release"), rows("release-native")
print("| T | threads | weights | gate | default ms | -march=native ms | default / native |")
print("|---|---|---|---|---|---|---|")
for key in sorted(a):
    ma, mb = statistics.median(a[key]), statistics.median(b[key])
    print(f"| {key[0]} | {key[1]} | {key[2]} | `{key[3]}` | {ma:.3f} | {mb:.3f} | {ma / mb:.3f} |")
PY
echo "raw outputs: $out" >&2
