#pragma once
/// \file kernel_isa.hpp
/// Which instruction set moet's dense kernels run on: chosen once, at first use, from what the
/// CPU reports (cpuid), whatever flags the program was compiled with.
///
/// moet compiles each kernel family for every instruction set it knows (with the compilers'
/// target attributes, so no `-march` is needed) and runs the best one the CPU has. Packed
/// weights remember the level they were packed for, so a bank packed in one translation unit
/// runs the same kernels from any other, whatever `-march` either was compiled with.
///
/// `MOET_ISA=portable|avx2|avx512|avx512bf16` in the environment, read at the first call, lowers
/// the level (for tests, benchmarks and bug reports); a level above what the CPU has cannot be
/// forced and runs the CPU's best. Any other value is a `moet::Error` at the first use.
///
/// ```cpp
/// std::printf("moet kernels: %s\n", moet::kernel_isa_name(moet::kernel_isa()));
/// ```

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "moet/errors.hpp"

// MOET_X86: whether the x86 kernel levels, cpuid and the SSE packing paths are compiled. Defining
// MOET_DISABLE_X86 (every translation unit of a program alike: the inline functions differ)
// compiles an x86 build as one for another CPU: portable kernels and scalar packing only. The
// tests build test_gemm* that way (test_portable_build), so the branches every non-x86 build
// takes are compiled and run by CI, not only on such machines.
#if (defined(__x86_64__) || defined(__i386__)) && !defined(MOET_DISABLE_X86)
#include <cpuid.h>
#define MOET_X86 1
#else
#define MOET_X86 0
#endif

namespace moet {

/// A level of the dense kernels, from the portable loops up. Each level's CPU requirements:
///
/// | level          | instructions                                    | float kernels | bf16 weights          |
/// |----------------|-------------------------------------------------|---------------|-----------------------|
/// | `kPortable`    | none (plain C++ vector types)                   | 4-wide        | converted in registers|
/// | `kAvx2`        | AVX2, FMA                                       | 8-wide FMA    | converted in registers|
/// | `kAvx512`      | AVX-512 F, BW, DQ, VL                           | 16-wide FMA   | converted in registers|
/// | `kAvx512Bf16`  | `kAvx512`, AVX512-BF16 and AVX512-VNNI          | 16-wide FMA   | `vdpbf16ps`           |
///
/// Block-quantised weights (`Q8_0`, `Q4_0`, `Q4_1`) run 8-bit integer dot products
/// (`vpdpbusd`) on `kAvx512Bf16` and are dequantised to float in registers elsewhere.
enum class KernelIsa : std::uint8_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

/// Every level, lowest first.
inline constexpr KernelIsa kAllKernelIsas[] = {KernelIsa::kPortable, KernelIsa::kAvx2,
                                               KernelIsa::kAvx512, KernelIsa::kAvx512Bf16};

/// `"portable"`, `"avx2"`, `"avx512"` or `"avx512bf16"` (the `MOET_ISA` spelling).
constexpr const char* kernel_isa_name(KernelIsa isa) {
  switch (isa) {
    case KernelIsa::kAvx2:
      return "avx2";
    case KernelIsa::kAvx512:
      return "avx512";
    case KernelIsa::kAvx512Bf16:
      return "avx512bf16";
    case KernelIsa::kPortable:
      break;
  }
  return "portable";
}

namespace detail {

#if MOET_X86
/// The OS-enabled state components (XCR0); only called once cpuid reports OSXSAVE.
inline std::uint64_t read_xcr0() {
  std::uint32_t lo = 0;
  std::uint32_t hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<std::uint64_t>(hi) << 32) | lo;
}
#endif

/// The best level this CPU (and its operating system, which must save the vector registers)
/// supports.
inline KernelIsa detect_cpu_kernel_isa() {
#if MOET_X86
  unsigned a = 0;
  unsigned b = 0;
  unsigned c = 0;
  unsigned d = 0;
  if (__get_cpuid(1, &a, &b, &c, &d) == 0) return KernelIsa::kPortable;
  const bool fma = (c >> 12) & 1U;
  const bool osxsave = (c >> 27) & 1U;
  const bool avx = (c >> 28) & 1U;
  if (!(osxsave && avx && fma)) return KernelIsa::kPortable;
  const std::uint64_t xcr0 = read_xcr0();
  const bool ymm_state = (xcr0 & 0x6U) == 0x6U;     // SSE and AVX state
  const bool zmm_state = (xcr0 & 0xe6U) == 0xe6U;   // and opmask, ZMM_Hi256, Hi16_ZMM
  if (!ymm_state || __get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return KernelIsa::kPortable;
  const bool avx2 = (b >> 5) & 1U;
  const bool avx512 = ((b >> 16) & 1U) && ((b >> 17) & 1U) && ((b >> 30) & 1U) &&
                      ((b >> 31) & 1U);  // F, DQ, BW, VL
  if (!avx2) return KernelIsa::kPortable;
  if (!(avx512 && zmm_state)) return KernelIsa::kAvx2;
  // The top level also needs AVX512-VNNI (leaf 7, ECX bit 11; every CPU with BF16 has it) and
  // AVX512-BF16 (leaf 7, sub-leaf 1, EAX bit 5).
  const bool vnni = (c >> 11) & 1U;
  if (vnni && __get_cpuid_count(7, 1, &a, &b, &c, &d) != 0 && ((a >> 5) & 1U)) {
    return KernelIsa::kAvx512Bf16;
  }
  return KernelIsa::kAvx512;
#else
  return KernelIsa::kPortable;
#endif
}

/// The level named `name` (the `MOET_ISA` spelling); throws `moet::Error` naming `what` and the
/// valid names otherwise.
inline KernelIsa parse_kernel_isa(std::string_view name, const char* what) {
  for (const KernelIsa isa : kAllKernelIsas) {
    if (name == kernel_isa_name(isa)) return isa;
  }
  fail("kernel_isa", what, " must be one of portable, avx2, avx512, avx512bf16; got '", name,
       "'");
}

/// `cpu` lowered to the level `MOET_ISA` names, if set (never raised above `cpu`).
inline KernelIsa select_kernel_isa(KernelIsa cpu, const char* env) {
  if (env == nullptr || *env == '\0') return cpu;
  const KernelIsa wanted = parse_kernel_isa(env, "MOET_ISA");
  return wanted < cpu ? wanted : cpu;
}

}  // namespace detail

/// The best level this CPU supports (ignores `MOET_ISA`). Detected once.
inline KernelIsa cpu_kernel_isa() {
  static const KernelIsa isa = detail::detect_cpu_kernel_isa();
  return isa;
}

/// The level moet's kernels run on: `cpu_kernel_isa()`, lowered by `MOET_ISA` when set. Chosen
/// once, at the first call (thread-safe); throws `moet::Error` when `MOET_ISA` holds an unknown
/// name.
inline KernelIsa kernel_isa() {
  static const KernelIsa isa =
      detail::select_kernel_isa(cpu_kernel_isa(), std::getenv("MOET_ISA"));  // NOLINT(concurrency-mt-unsafe)
  return isa;
}

/// True when this CPU can run kernels of level `isa`.
inline bool kernel_isa_supported(KernelIsa isa) { return isa <= cpu_kernel_isa(); }

}  // namespace moet
