#pragma once
// Which OpenBLAS kernels the benchmarks compare against (moet-compare's ceiling, bench_kernels'
// openblas rows): Debian 12's OpenBLAS picks its kernels from the CPU model when it loads.
#include <cstdio>
#include <cstdlib>
#include <string>

#include <unistd.h>  // execv

#if defined(MOET_BENCH_OPENBLAS)
#include <cblas.h>
#endif

namespace moet::bench {

/// OpenBLAS's kernels for this CPU, and whether this program chose them (see
/// `choose_openblas_core`); "n/a" without OpenBLAS.
inline std::string openblas_core() {
#if defined(MOET_BENCH_OPENBLAS)
  std::string core = openblas_get_corename();
  const char* forced = std::getenv("MOET_BENCH_OPENBLAS_CORE");
  if (forced != nullptr) core += " (set by this benchmark: OpenBLAS detected Prescott)";
  return core;
#else
  return "n/a";
#endif
}

/// OpenBLAS 0.3.21 (Debian 12) does not recognise some newer CPUs -- the Intel Xeon with model
/// number 207 (AVX-512, AVX512-BF16, AMX) of this project's VM among them -- and then runs its
/// SSE3 `Prescott` kernels: moet-compare's ceiling came out near 40 GFLOP/s where moet ran
/// 180. When
/// OpenBLAS reports Prescott on a CPU with AVX-512 (AVX2 + FMA) and the user set no
/// `OPENBLAS_CORETYPE`, this re-runs the program with `OPENBLAS_CORETYPE=SkylakeX` (`Haswell`):
/// OpenBLAS reads that variable only when it loads. Returns when nothing needs to change or the
/// re-run failed.
inline void choose_openblas_core(char** argv) {
#if defined(MOET_BENCH_OPENBLAS) && (defined(__x86_64__) || defined(__i386__))
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  if (std::string(openblas_get_corename()) != "Prescott") return;
  const char* core = __builtin_cpu_supports("avx512f")                                 ? "SkylakeX"
                     : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? "Haswell"
                                                                                       : nullptr;
  if (core == nullptr) return;
  setenv("OPENBLAS_CORETYPE", core, 1);
  setenv("MOET_BENCH_OPENBLAS_CORE", core, 1);
  execv("/proc/self/exe", argv);
  std::fprintf(stderr, "moet benchmark: could not re-run with OPENBLAS_CORETYPE=%s\n", core);
  unsetenv("OPENBLAS_CORETYPE");
  unsetenv("MOET_BENCH_OPENBLAS_CORE");
#else
  static_cast<void>(argv);
#endif
}

}  // namespace moet::bench
