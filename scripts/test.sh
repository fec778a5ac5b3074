#!/usr/bin/env bash
# moet's test suite, as CI runs it:
#
#   bash scripts/test.sh
#
# Installs missing build dependencies (Debian/Ubuntu, apt-get) first, then runs these steps and
# exits non-zero when any of them fails:
#
#   1. main   configure build/ci: a plain Release build (-O3, no -march: what a user gets by
#             default), warnings as errors, MOET_WITH_MPI; build everything -- unit tests, the
#             header self-containment check, examples, benchmarks -- and run ctest: unit tests
#             (test_portable_build among them: the kernel tests compiled as for a CPU that is not
#             x86, MOET_DISABLE_X86; test_mixed_isa: g++'s -march=native code in one program with
#             the plain code), the expert-parallel tests under mpirun with 2, 3 and 4 ranks and
#             their no-allocation check with 2 and 3 (label `mpi`), packaging tests (install +
#             find_package / add_subdirectory consumers), examples and benchmark smoke runs; then
#             the unit tests again once per further kernel level the CPU has (MOET_ISA=portable,
#             avx2, ...; ctest ran them at the level moet picks by default; the kernel tests, label
#             `kernel`, run every level by themselves and are not repeated);
#   2. clang  the unit tests built by clang++ in Release (-O3) linked with moet::native
#             (-march=native; build/ci-clang): the clang Release and the native builds in one;
#   3. relwithdebinfo
#             the unit tests built by g++ with RelWithDebInfo's code generation (-O2 -DNDEBUG;
#             build/ci-o2): -O2, between main's -O3 and the sanitizers' -O1. Without -g, which
#             only costs compile time here: GCC generates the same code with and without it
#             (what -fcompare-debug checks);
#   4. asan   clang++ with AddressSanitizer + UndefinedBehaviorSanitizer (without UBSan's vptr and
#             null checks; preset `asan`, build/asan, here with MOET_WITH_MPI and
#             MOET_BUILD_FUZZERS): the unit tests, the expert-parallel tests under mpirun (label
#             `mpi`; leak checks on, Open MPI's own allocations suppressed by
#             tests/mpi/lsan_openmpi.supp) and every libFuzzer target for MOET_FUZZ_SECONDS (here
#             10 by default) from its seed corpus in tests/fuzz/corpus (label `fuzz`; the fuzzers
#             link the same sanitized kernel instances as the tests); any report fails the run;
#   5. tsan   the unit tests built by clang++ 14 with ThreadSanitizer against LLVM's libomp,
#             whose Archer tool tells TSan about OpenMP's synchronisation (preset `tsan`,
#             build/tsan; g++'s libgomp is not instrumented and gives false reports).
#
# Environment: MOET_TEST_STEPS="main clang relwithdebinfo asan tsan" (the default) selects steps, e.g.
# MOET_TEST_STEPS=main for the quick run. Each step prints its wall time. Safe to re-run: an
# up-to-date build is not rebuilt.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

steps="${MOET_TEST_STEPS:-main clang relwithdebinfo asan tsan}"
for step in $steps; do
  case "$step" in
    main | clang | relwithdebinfo | asan | tsan) ;;
    *)
      echo "moet: unknown step '$step' in MOET_TEST_STEPS (steps: main clang relwithdebinfo" \
        "asan tsan; the" \
        "per-level unit-test runs are part of main, the fuzzers part of asan)" >&2
      exit 2
      ;;
  esac
done
jobs="$(nproc)"
export MOET_FUZZ_SECONDS="${MOET_FUZZ_SECONDS:-10}"

# shellcheck source=scripts/ensure-packages.sh
source "$root/scripts/ensure-packages.sh"
packages=(g++ cmake ninja-build libeigen3-dev catch2 libbenchmark-dev libopenblas-dev libcli11-dev
  nlohmann-json3-dev zlib1g-dev dataset-fashion-mnist fortunes)
case " $steps " in
  *" main "* | *" asan "*) packages+=(libopenmpi-dev openmpi-bin) ;;
esac
case " $steps " in
  *" tsan "* | *" asan "* | *" clang "*) packages+=(clang libomp-dev libclang-rt-14-dev) ;;
esac
moet_ensure_packages "${packages[@]}"

has_step() { case " $steps " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# Runs "$@" as step $1's body and reports its wall time.
timings=()
run_step() {
  local name="$1"
  shift
  local start end
  start="$(date +%s)"
  echo "moet: === step $name ===" >&2
  "$@"
  end="$(date +%s)"
  timings+=("$name $((end - start))s")
  echo "moet: === step $name passed in $((end - start)) s ===" >&2
}

step_main() {
  local build_dir=build/ci
  cmake -S . -B "$build_dir" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DMOET_WERROR=ON \
    -DMOET_BUILD_TESTS=ON \
    -DMOET_BUILD_EXAMPLES=ON \
    -DMOET_BUILD_BENCHMARKS=ON \
    -DMOET_WITH_MPI=ON
  cmake --build "$build_dir" -j "$jobs"
  ctest --test-dir "$build_dir" --output-on-failure -j "$jobs"
  # The unit tests once per further kernel level the CPU has (the run above used the level
  # moet picks by default): the banks, dispatchers and layers on each level against the naive
  # references. The kernel tests (label `kernel`) covered every level in that run.
  local isa
  for isa in $("$build_dir/tests/moet_list_kernel_isas" --others); do
    echo "moet: unit tests with MOET_ISA=$isa" >&2
    MOET_ISA="$isa" ctest --test-dir "$build_dir" -L unit -LE kernel --output-on-failure \
      -j "$jobs"
  done
}

# Builds the unit tests in $1 with the further CMake arguments and runs them.
unit_tests_build() {
  local build_dir="$1"
  shift
  cmake -S . -B "$build_dir" -G Ninja -DMOET_WERROR=ON -DMOET_BUILD_TESTS=ON \
    -DMOET_BUILD_EXAMPLES=OFF -DMOET_BUILD_BENCHMARKS=OFF -DMOET_INSTALL=OFF \
    -DMOET_TEST_PORTABLE_BUILD=OFF -DMOET_TEST_MIXED_ISA=OFF "$@"
  cmake --build "$build_dir" -j "$jobs" --target moet_unit_tests
  ctest --test-dir "$build_dir" -L unit --output-on-failure -j "$jobs"
}

step_clang() {
  unit_tests_build build/ci-clang -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ \
    -DMOET_TEST_NATIVE=ON
}

step_relwithdebinfo() {
  unit_tests_build build/ci-o2 -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -DNDEBUG"
}

# The sanitizer presets build the unit tests (target moet_unit_tests; asan here also the
# expert-parallel tests and the fuzzers, target moet_fuzzers) and run the tests labelled `unit`
# (asan also `mpi` and `fuzz`); their options (CMakePresets.json) make every report fatal:
# ASan/UBSan abort (halt_on_error, -fno-sanitize-recover=all), TSan exits 66 at the first race.
step_asan() {
  cmake --preset asan -DMOET_WITH_MPI=ON -DMOET_BUILD_FUZZERS=ON \
    -DMOET_FUZZ_SECONDS="$MOET_FUZZ_SECONDS"
  cmake --build build/asan -j "$jobs" --target moet_unit_tests moet_fuzzers
  # Each fuzzer runs on one core for MOET_FUZZ_SECONDS; ctest runs one test per core.
  ctest --preset asan -j "$jobs"
}

step_tsan() {
  # Archer ships with libomp (/usr/lib/llvm-14/lib on Debian); the preset names that path.
  local archer=/usr/lib/llvm-14/lib/libarcher.so
  if [ ! -f "$archer" ]; then
    echo "moet: $archer not found (install libomp-dev for clang 14)" >&2
    return 1
  fi
  cmake --preset tsan
  cmake --build --preset tsan -j "$jobs"
  ctest --preset tsan -j "$jobs"
}

for step in main clang relwithdebinfo asan tsan; do
  if has_step "$step"; then
    run_step "$step" "step_$step"
  fi
done
echo "moet: all steps passed: ${timings[*]}" >&2
