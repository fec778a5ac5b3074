#!/usr/bin/env bash
# The same comparison from two builds of moet-compare, interleaved: build/release (the default
# flags, what linking moet::moet gives) and build/release-native (-march=native everywhere).
# Runs them alternately ROUNDS times (default 4; an odd count is rounded up so that each runs
# first equally often), then prints, per token count, weight format and gate, the median over
# the rounds of each build's median time and their ratio:
#
#   bash scripts/compare_builds.sh [moet-compare arguments...]
#   ROUNDS=6 bash scripts/compare_builds.sh --tokens 1,32,512 --weights f32,bf16
#
# Each round runs both programs back to back in the same conditions (same flush, same inputs);
# alternating the order (A B, B A, ...) keeps either from always running second. Besides the
# ratio of the medians, each row shows the median and the range of the per-round ratios (each
# round's two runs are neighbours in time, so a slow drift of the machine cancels in them).
#
# CONTROL=1 times the default build against a copy of itself the same way (an A/A run): what
# the method reads on this machine when nothing differs. Run it right after the real comparison.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/ensure-packages.sh
source "$root/scripts/ensure-packages.sh"
moet_ensure_packages g++ cmake ninja-build libeigen3-dev libbenchmark-dev libopenblas-dev \
  libcli11-dev nlohmann-json3-dev python3

rounds="${ROUNDS:-4}"
if ((rounds % 2 == 1)); then  # each program runs first in as many rounds as the other
  rounds=$((rounds + 1))
  echo "ROUNDS rounded up to $rounds so that each build runs first equally often" >&2
fi
jobs="$(nproc)"
variants=(release:OFF release-native:ON)
if [[ "${CONTROL:-0}" == 1 ]]; then variants=(release:OFF); fi  # A/A: the default build only
for variant in "${variants[@]}"; do
  dir="build/${variant%%:*}"
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOET_BUILD_TESTS=OFF \
    -DMOET_BUILD_EXAMPLES=OFF -DMOET_BUILD_BENCHMARKS=ON -DMOET_BENCH_NATIVE="${variant##*:}" >/dev/null
  cmake --build "$dir" --target moet-compare -j "$jobs"
done

unset OPENBLAS_CORETYPE
out="$(mktemp -d)"
declare -A program=([release]=build/release/bench/moet-compare
                    [release-native]=build/release-native/bench/moet-compare)
second=release-native
second_label="-march=native"
if [[ "${CONTROL:-0}" == 1 ]]; then
  cp build/release/bench/moet-compare "$out/moet-compare-copy"
  program[release-copy]="$out/moet-compare-copy"
  second=release-copy
  second_label="default (copy)"
fi
for ((r = 0; r < rounds; ++r)); do
  order=(release "$second")
  if ((r % 2 == 1)); then order=("$second" release); fi
  for b in "${order[@]}"; do
    "${program[$b]}" "$@" --json "$out/$b.$r.json" >"$out/$b.$r.txt"
    echo "round $((r + 1))/$rounds: $b done" >&2
  done
done

python3 - "$out" "$rounds" "$second" "$second_label" <<'PY'
import json, statistics, sys
out, rounds, second, label = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def rows(build):
    table = {}
    for r in range(rounds):
        doc = json.load(open(f"{out}/{build}.{r}.json"))
        for row in doc["results"] if isinstance(doc, dict) else doc:
            gate = row["gate"] + (":" + row["params"] if row.get("params") else "")
            key = (row["tokens"], row["threads"], row.get("weights", "f32"), gate)
            table.setdefault(key, []).append(row["ms_median"])
    return table
a, b = rows("release"), rows(second)
print(f"| T | threads | weights | gate | default ms | {label} ms | ratio of medians "
      "| per-round ratios: median (min-max) |")
print("|---|---|---|---|---|---|---|---|")
for key in sorted(a):
    ma, mb = statistics.median(a[key]), statistics.median(b[key])
    per_round = [x / y for x, y in zip(a[key], b[key])]
    print(f"| {key[0]} | {key[1]} | {key[2]} | `{key[3]}` | {ma:.3f} | {mb:.3f} | {ma / mb:.3f} "
          f"| {statistics.median(per_round):.3f} ({min(per_round):.3f}-{max(per_round):.3f}) |")
PY
echo "raw outputs: $out" >&2
