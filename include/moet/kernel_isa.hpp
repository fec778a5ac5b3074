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
/// The default is the CPU's best level, except on Intel CPUs with AVX512-BF16, which run
/// `avx512vnni`: there one `vdpbf16ps` takes the issue time of four FMAs, and bf16 products on
/// FMAs (bf16 weights split into floats in registers) ran 1.6x faster (`default_kernel_isa`).
///
/// `MOET_ISA=portable|avx2|avx2vnni|avx512|avx512vnni|avx512bf16` in the environment, read at
/// the first call, picks the level instead (for tests, benchmarks and bug reports): the best
/// level the CPU has at or below the one named; a level above the CPU's best cannot be forced.
/// Any other value is a `moet::Error` at the first use.
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
/// | level         | instructions               | float / bf16 weights      | block formats       |
/// |---------------|----------------------------|---------------------------|---------------------|
/// | `kPortable`   | none (C++ vector types)    | 4-wide / pairs split      | dequantised         |
/// | `kAvx2`       | AVX2, FMA, F16C            | 8-wide FMA / pairs split  | 8-lane `vpmaddubsw` |
/// | `kAvx2Vnni`   | `kAvx2`, AVX-VNNI          | `kAvx2`'s                 | 8-lane `vpdpbusd`   |
/// | `kAvx512`     | AVX-512 F, BW, DQ, VL      | 16-wide FMA / pairs split | 16-lane `vpmaddubsw`|
/// | `kAvx512Vnni` | `kAvx512`, AVX512-VNNI     | `kAvx512`'s               | 16-lane `vpdpbusd`  |
/// | `kAvx512Bf16` | `kAvx512Vnni`, AVX512-BF16 | 16-wide FMA / `vdpbf16ps` | 16-lane `vpdpbusd`  |
///
/// Block-quantised weights (`Q8_0`, `Q4_0`, `Q4_1`) run 8-bit integer dot products where the
/// level has them (`vpdpbusd`; on `kAvx2` and `kAvx512` `vpmaddubsw` + `vpmaddwd`, exact like it:
/// the AVX2 CPUs without VNNI such as Haswell to Skylake and Zen 1-3, and Skylake-X) and are
/// dequantised to float K block by K block on `kPortable`. Every AVX2 CPU has
/// F16C (Ivy Bridge and Piledriver brought it before AVX2); `kAvx2` requires it for the block
/// formats' half-precision scales.
///
/// The levels are not a chain: `kAvx2Vnni` (AVX-VNNI, the VEX form of the 8-bit dot product:
/// Alder Lake and later Intel cores, AMD Zen 5) is not implied by the AVX-512 levels (Skylake-X,
/// Cascade Lake, Ice Lake and Zen 4 have AVX-512 without it). `kAvx512Vnni` is Cascade Lake,
/// Ice Lake, Tiger Lake and Rocket Lake's level; every CPU of `kAvx512Bf16` has it. A CPU
/// supports a set of levels (`kernel_isa_supported`); `cpu_kernel_isa()` is the highest of
/// them.
enum class KernelIsa : std::uint8_t {
  kPortable = 0,
  kAvx2 = 1,
  kAvx2Vnni = 2,
  kAvx512 = 3,
  kAvx512Vnni = 4,
  kAvx512Bf16 = 5
};

/// Every level, lowest first.
inline constexpr KernelIsa kAllKernelIsas[] = {KernelIsa::kPortable,   KernelIsa::kAvx2,
                                               KernelIsa::kAvx2Vnni,   KernelIsa::kAvx512,
                                               KernelIsa::kAvx512Vnni, KernelIsa::kAvx512Bf16};

/// `"portable"`, `"avx2"`, `"avx2vnni"`, `"avx512"`, `"avx512vnni"` or `"avx512bf16"` (the
/// `MOET_ISA` spelling).
constexpr const char* kernel_isa_name(KernelIsa isa) {
  switch (isa) {
    case KernelIsa::kAvx2:
      return "avx2";
    case KernelIsa::kAvx2Vnni:
      return "avx2vnni";
    case KernelIsa::kAvx512:
      return "avx512";
    case KernelIsa::kAvx512Vnni:
      return "avx512vnni";
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

/// A set of levels, bit `1 << level`.
using KernelIsaSet = std::uint32_t;

/// The set holding `isa`.
constexpr KernelIsaSet kernel_isa_bit(KernelIsa isa) {
  return KernelIsaSet{1} << static_cast<unsigned>(isa);
}

/// The levels this CPU (and its operating system, which must save the vector registers)
/// supports; always holds `kPortable`.
inline KernelIsaSet detect_cpu_kernel_isas() {
  KernelIsaSet set = kernel_isa_bit(KernelIsa::kPortable);
#if MOET_X86
  unsigned a = 0;
  unsigned b = 0;
  unsigned c = 0;
  unsigned d = 0;
  if (__get_cpuid(1, &a, &b, &c, &d) == 0) return set;
  const bool fma = (c >> 12) & 1U;
  const bool osxsave = (c >> 27) & 1U;
  const bool avx = (c >> 28) & 1U;
  const bool f16c = (c >> 29) & 1U;
  if (!(osxsave && avx && fma)) return set;
  const std::uint64_t xcr0 = read_xcr0();
  const bool ymm_state = (xcr0 & 0x6U) == 0x6U;     // SSE and AVX state
  const bool zmm_state = (xcr0 & 0xe6U) == 0xe6U;   // and opmask, ZMM_Hi256, Hi16_ZMM
  if (!ymm_state || __get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return set;
  const bool avx2 = (b >> 5) & 1U;
  const bool avx512 = ((b >> 16) & 1U) && ((b >> 17) & 1U) && ((b >> 30) & 1U) &&
                      ((b >> 31) & 1U);  // F, DQ, BW, VL
  // AVX512-VNNI: leaf 7, ECX bit 11 (every CPU with AVX512-BF16 has it).
  const bool avx512_vnni = (c >> 11) & 1U;
  if (!(avx2 && f16c)) return set;
  set |= kernel_isa_bit(KernelIsa::kAvx2);
  // Leaf 7, sub-leaf 1, EAX: bit 4 AVX-VNNI, bit 5 AVX512-BF16.
  unsigned leaf71 = 0;
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d) != 0) leaf71 = a;
  if ((leaf71 >> 4) & 1U) set |= kernel_isa_bit(KernelIsa::kAvx2Vnni);
  if (!(avx512 && zmm_state)) return set;
  set |= kernel_isa_bit(KernelIsa::kAvx512);
  if (!avx512_vnni) return set;
  set |= kernel_isa_bit(KernelIsa::kAvx512Vnni);
  if ((leaf71 >> 5) & 1U) set |= kernel_isa_bit(KernelIsa::kAvx512Bf16);
#endif
  return set;
}

/// The highest level of `set` at or below `limit` (`kPortable` when none is).
constexpr KernelIsa best_kernel_isa(KernelIsaSet set, KernelIsa limit = KernelIsa::kAvx512Bf16) {
  for (auto level = static_cast<int>(limit); level > 0; --level) {
    const auto isa = static_cast<KernelIsa>(level);
    if ((set & kernel_isa_bit(isa)) != 0) return isa;
  }
  return KernelIsa::kPortable;
}

/// The level named `name` (the `MOET_ISA` spelling); throws `moet::Error` naming `what` and the
/// valid names otherwise.
inline KernelIsa parse_kernel_isa(std::string_view name, const char* what) {
  for (const KernelIsa isa : kAllKernelIsas) {
    if (name == kernel_isa_name(isa)) return isa;
  }
  fail("kernel_isa", what,
       " must be one of portable, avx2, avx2vnni, avx512, avx512vnni, avx512bf16; got '", name,
       "'");
}

/// The level to run given the CPU's levels `cpu` and `MOET_ISA` (`env`, may be null): the
/// highest level of `cpu` at or below the one `env` names; when unset, the highest of all, or
/// the highest below `kAvx512Bf16` when `slow_bf16_dot` (see `cpu_bf16_dot_is_slow`).
inline KernelIsa select_kernel_isa(KernelIsaSet cpu, const char* env, bool slow_bf16_dot = false) {
  if (env == nullptr || *env == '\0') {
    return best_kernel_isa(cpu, slow_bf16_dot ? KernelIsa::kAvx512Vnni : KernelIsa::kAvx512Bf16);
  }
  return best_kernel_isa(cpu, parse_kernel_isa(env, "MOET_ISA"));
}

/// Whether this CPU's `vdpbf16ps` is too slow to prefer over FMAs on split bf16 pairs: true on
/// Intel (cpuid vendor "GenuineIntel"). Measured on a Xeon of family 6, model 207 (AVX512-BF16,
/// AMX): one `vdpbf16ps` took the issue time of four `vfmadd231ps` (0.77 against 0.19 ns per
/// instruction, 24 independent chains), so its 32 multiply-adds run at half the FMA rate, and
/// S2 bf16 products of 128 and 512 rows ran 1.6x faster on the `avx512vnni` level's split
/// pairs (medians 131-134 against 80-82 GFLOP/s, one core). AMD CPUs keep `vdpbf16ps`: on a
/// Zen 5 EPYC bf16 layers ran 1.8x f32 at T = 512 (Zen 4 not measured; README, bf16 expert
/// weights).
inline bool detect_slow_bf16_dot() {
#if MOET_X86
  unsigned a = 0;
  unsigned b = 0;
  unsigned c = 0;
  unsigned d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d) == 0) return false;
  // The vendor string is EBX, EDX, ECX: "Genu" "ineI" "ntel".
  return b == 0x756e6547U && d == 0x49656e69U && c == 0x6c65746eU;
#else
  return false;
#endif
}
inline bool cpu_bf16_dot_is_slow() {
  static const bool slow = detect_slow_bf16_dot();
  return slow;
}

/// The levels this CPU supports. Detected once.
inline KernelIsaSet cpu_kernel_isas() {
  static const KernelIsaSet set = detect_cpu_kernel_isas();
  return set;
}
}  // namespace detail

/// The best level this CPU supports (ignores `MOET_ISA`).
inline KernelIsa cpu_kernel_isa() { return detail::best_kernel_isa(detail::cpu_kernel_isas()); }

/// The level moet runs on this CPU when `MOET_ISA` is unset: `cpu_kernel_isa()`, or
/// `kAvx512Vnni` on Intel CPUs with AVX512-BF16 (see the file comment).
inline KernelIsa default_kernel_isa() {
  return detail::select_kernel_isa(detail::cpu_kernel_isas(), nullptr,
                                   detail::cpu_bf16_dot_is_slow());
}

/// The level moet's kernels run on: `default_kernel_isa()`, or the best supported level at or
/// below the one `MOET_ISA` names when set. Chosen once, at the first call (thread-safe); throws
/// `moet::Error` when `MOET_ISA` holds an unknown name.
inline KernelIsa kernel_isa() {
  static const KernelIsa isa =
      detail::select_kernel_isa(detail::cpu_kernel_isas(),
                                std::getenv("MOET_ISA"),  // NOLINT(concurrency-mt-unsafe)
                                detail::cpu_bf16_dot_is_slow());
  return isa;
}

/// True when this CPU can run kernels of level `isa` (not implied by a higher level: see
/// `KernelIsa`).
inline bool kernel_isa_supported(KernelIsa isa) {
  return (detail::cpu_kernel_isas() & detail::kernel_isa_bit(isa)) != 0;
}

}  // namespace moet
