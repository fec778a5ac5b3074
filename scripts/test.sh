#!/usr/bin/env bash
# moet's test suite, as CI runs it:
#
#   bash scripts/test.sh
#
# Installs missing build dependencies (Debian/Ubuntu, apt-get) first, then runs these steps and
# exits non-zero when any of them fails:
#
#   1. main     configure build/ci (RelWithDebInfo, warnings as errors, MOET_WITH_MPI; line-table
#               debug information, -g1, instead of CMake's -g: the same code, compiled in about
#               0.6 of the time), build
#               everything -- tests, the header self-containment check, examples, benchmarks --
#               and run ctest: unit tests, the expert-parallel tests under mpirun with 2, 3 and 4
#               ranks and their no-allocation check with 2 and 3 (label `mpi`), packaging tests
#               (install + find_package / add_subdirectory consumers), examples and benchmark
#               smoke runs;
#   2. release  the unit tests (ctest label `unit`) in a plain Release build (-O3, no -march:
#               what a user gets by default; build/ci-release), run once per kernel level the
#               CPU has (MOET_ISA=portable, avx2, ...: every level against the naive references;
#               test_gemm, test_gemm_bf16 and test_row_pack, label `kernel`, run every level
#               by themselves and run once; test_portable_build, the kernel tests compiled
#               as for a CPU that is not x86, MOET_DISABLE_X86, runs in the main and clang
#               steps, not here);
#   3. clang    the unit tests built by clang++ in Release linked with moet::native
#               (-march=native; build/ci-clang): the clang build and the native build in one
#               (the g++ -march=native code is also compiled and run by test_mixed_isa);
#   4. asan     the unit tests built by g++ with AddressSanitizer + UndefinedBehaviorSanitizer
#               (without UBSan's vptr and null checks; preset `asan`, build/asan, here with MOET_WITH_MPI), and the expert-parallel
#               tests under mpirun (label `mpi`) in that build (leak checks on, Open
#               MPI's own allocations suppressed by tests/mpi/lsan_openmpi.supp); any report
#               fails the run;
#   5. tsan     the unit tests built by clang++ 14 with ThreadSanitizer against LLVM's libomp,
#               whose Archer tool tells TSan about OpenMP's synchronisation (preset `tsan`,
#               build/tsan; g++'s libgomp is not instrumented and gives false reports);
#   6. fuzz     the libFuzzer targets (preset `fuzz`, build/fuzz), each run for
#               MOET_FUZZ_SECONDS (here 10 by default; the preset's own default is 15) seconds
#               from its seed corpus in tests/fuzz/corpus.
#
# Environment: MOET_TEST_STEPS="main release clang asan tsan fuzz" (the default) selects
# steps, e.g. MOET_TEST_STEPS=main for the quick run. Each step prints its wall time. Safe to
# re-run: an up-to-date build is not rebuilt.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

steps="${MOET_TEST_STEPS:-main release clang asan tsan fuzz}"
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
  *" tsan "* | *" fuzz "* | *" clang "*) packages+=(clang libomp-dev libclang-rt-14-dev) ;;
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
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG" \
    -DMOET_WERROR=ON \
    -DMOET_BUILD_TESTS=ON \
    -DMOET_BUILD_EXAMPLES=ON \
    -DMOET_BUILD_BENCHMARKS=ON \
    -DMOET_WITH_MPI=ON
  cmake --build "$build_dir" -j "$jobs"
  ctest --test-dir "$build_dir" --output-on-failure -j "$jobs"
}

# The unit tests (target moet_unit_tests, ctest label `unit`) in another configuration: $1 is the
# build directory, the other arguments go to cmake.
unit_tests_in() {
  local build_dir="$1"
  shift
  cmake -S . -B "$build_dir" -G Ninja -DMOET_WERROR=ON -DMOET_BUILD_TESTS=ON \
    -DMOET_BUILD_EXAMPLES=OFF -DMOET_BUILD_BENCHMARKS=OFF -DMOET_INSTALL=OFF "$@"
  cmake --build "$build_dir" -j "$jobs" --target moet_unit_tests
}

step_release() {
  local build_dir=build/ci-release
  unit_tests_in "$build_dir" -DCMAKE_BUILD_TYPE=Release -DMOET_TEST_PORTABLE_BUILD=OFF
  # Every kernel level the CPU has, each against the naive references (the kernel tests also
  # cover every level in any one run; this runs the banks, dispatchers and layers on each).
  local isa exclude=()
  for isa in $("$build_dir/tests/moet_list_kernel_isas"); do
    echo "moet: unit tests with MOET_ISA=$isa" >&2
    MOET_ISA="$isa" ctest --test-dir "$build_dir" -L unit "${exclude[@]}" --output-on-failure \
      -j "$jobs"
    exclude=(-LE kernel)  # the kernel tests ran every level in the first run
  done
}

step_clang() {
  local build_dir=build/ci-clang
  unit_tests_in "$build_dir" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ \
    -DMOET_TEST_NATIVE=ON
  ctest --test-dir "$build_dir" -L unit --output-on-failure -j "$jobs"
}

# The sanitizer presets build only the unit tests (target moet_unit_tests) and run only the
# tests labelled `unit` (asan also `mpi`: built with them when MOET_WITH_MPI is on); their
# options (CMakePresets.json) make every report fatal: ASan/UBSan abort (halt_on_error,
# -fno-sanitize-recover=all), TSan exits 66 at the first race.
step_asan() {
  cmake --preset asan -DMOET_WITH_MPI=ON
  cmake --build --preset asan -j "$jobs"
  # The unit tests and, built with them here, the expert-parallel tests (labels unit, mpi).
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

step_fuzz() {
  cmake --preset fuzz -DMOET_FUZZ_SECONDS="$MOET_FUZZ_SECONDS"
  cmake --build --preset fuzz -j "$jobs"
  # Each fuzzer runs on one core for MOET_FUZZ_SECONDS; ctest runs one per core.
  ctest --preset fuzz -j "$jobs"
}

for step in main release clang asan tsan fuzz; do
  if has_step "$step"; then
    run_step "$step" "step_$step"
  fi
done
echo "moet: all steps passed: ${timings[*]}" >&2
