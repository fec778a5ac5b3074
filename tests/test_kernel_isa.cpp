// Runtime kernel selection (kernel_isa.hpp): the cpuid detection against the compiler's own
// CPU probe, MOET_ISA parsing and lowering, and packed weights running the level they were
// packed for whatever level is selected.
#include <cstdlib>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <string>

#include <catch2/catch.hpp>

#include "moet/detail/gemm.hpp"
#include "moet/errors.hpp"
#include "moet/kernel_isa.hpp"

#include "gemm_test_util.hpp"

namespace test_kernel_isa {  // one per file: the unity build puts several files in one TU

using moet::KernelIsa;
using namespace moet_test;  // NOLINT(google-build-using-namespace)

#if defined(__x86_64__) || defined(__i386__)
// Whether the kernel lists `flag` among the CPU's flags in /proc/cpuinfo (false elsewhere).
bool cpuinfo_has_flag(const std::string& flag) {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("flags", 0) == 0)
      return (line + " ").find(" " + flag + " ") != std::string::npos;
  }
  return false;
}

// AVX-VNNI and F16C, from oracles independent of moet's cpuid reading: GCC's
// __builtin_cpu_supports knows them, clang 14's does not (there: the kernel's flags in
// /proc/cpuinfo).
bool cpu_has_avx_vnni() {
#if defined(__clang__)
  return cpuinfo_has_flag("avx_vnni");
#else
  return __builtin_cpu_supports("avxvnni") != 0;
#endif
}
bool cpu_has_f16c() {
#if defined(__clang__)
  return cpuinfo_has_flag("f16c");
#else
  return __builtin_cpu_supports("f16c") != 0;
#endif
}
#endif

TEST_CASE("cpuid detection agrees with the compiler's CPU probe", "[isa]") {
  const KernelIsa cpu = moet::cpu_kernel_isa();
  INFO("detected " << moet::kernel_isa_name(cpu));
#if defined(__x86_64__) || defined(__i386__)
  // An independent oracle: libgcc / compiler-rt's __builtin_cpu_supports (it also checks that
  // the OS saves the registers).
  const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  const bool avx512_vnni = __builtin_cpu_supports("avx512vnni");
  const bool bf16 = __builtin_cpu_supports("avx512bf16") && avx512_vnni;
  const bool vnni = avx2 && cpu_has_avx_vnni();
  const KernelIsa want = avx2 && avx512 && bf16          ? KernelIsa::kAvx512Bf16
                         : avx2 && avx512 && avx512_vnni ? KernelIsa::kAvx512Vnni
                         : avx2 && avx512                ? KernelIsa::kAvx512
                         : vnni                          ? KernelIsa::kAvx2Vnni
                         : avx2                          ? KernelIsa::kAvx2
                                                         : KernelIsa::kPortable;
  CHECK(cpu == want);
  CHECK(moet::kernel_isa_supported(KernelIsa::kAvx2) == avx2);
  CHECK(moet::kernel_isa_supported(KernelIsa::kAvx2Vnni) == vnni);
  CHECK(moet::kernel_isa_supported(KernelIsa::kAvx512) == (avx2 && avx512));
  CHECK(moet::kernel_isa_supported(KernelIsa::kAvx512Vnni) == (avx2 && avx512 && avx512_vnni));
  CHECK(moet::kernel_isa_supported(KernelIsa::kAvx512Bf16) == (avx2 && avx512 && bf16));
  // The default level avoids vdpbf16ps on Intel CPUs (the compiler's vendor probe as oracle).
  CHECK(moet::detail::cpu_bf16_dot_is_slow() == (__builtin_cpu_is("intel") != 0));
  CHECK(
      moet::default_kernel_isa() ==
      (cpu == KernelIsa::kAvx512Bf16 && __builtin_cpu_is("intel") ? KernelIsa::kAvx512Vnni : cpu));
#else
  CHECK(cpu == KernelIsa::kPortable);
#endif
  CHECK(moet::kernel_isa_supported(KernelIsa::kPortable));
  CHECK(moet::kernel_isa_supported(cpu));
}

TEST_CASE("MOET_ISA picks the best level the CPU has at or below the one named", "[isa]") {
  using moet::detail::kernel_isa_bit;
  using moet::detail::KernelIsaSet;
  using moet::detail::select_kernel_isa;
  const auto set = [](std::initializer_list<KernelIsa> levels) {
    KernelIsaSet s = kernel_isa_bit(KernelIsa::kPortable);
    for (const KernelIsa isa : levels) s |= kernel_isa_bit(isa);
    return s;
  };
  // CPUs as they exist: Haswell, Alder Lake (AVX-VNNI, no AVX-512), Skylake-X, Ice Lake
  // (AVX512-VNNI), Zen 4 (AVX-512 and BF16 without AVX-VNNI), Zen 5 / Sapphire Rapids
  // (everything).
  const KernelIsaSet haswell = set({KernelIsa::kAvx2});
  const KernelIsaSet alder_lake = set({KernelIsa::kAvx2, KernelIsa::kAvx2Vnni});
  const KernelIsaSet skylake_x = set({KernelIsa::kAvx2, KernelIsa::kAvx512});
  const KernelIsaSet ice_lake = set({KernelIsa::kAvx2, KernelIsa::kAvx512, KernelIsa::kAvx512Vnni});
  const KernelIsaSet zen4 =
      set({KernelIsa::kAvx2, KernelIsa::kAvx512, KernelIsa::kAvx512Vnni, KernelIsa::kAvx512Bf16});
  const KernelIsaSet zen5 = set({KernelIsa::kAvx2, KernelIsa::kAvx2Vnni, KernelIsa::kAvx512,
                                 KernelIsa::kAvx512Vnni, KernelIsa::kAvx512Bf16});
  // Unset: the highest level.
  CHECK(select_kernel_isa(haswell, nullptr) == KernelIsa::kAvx2);
  CHECK(select_kernel_isa(alder_lake, "") == KernelIsa::kAvx2Vnni);
  CHECK(select_kernel_isa(skylake_x, nullptr) == KernelIsa::kAvx512);
  CHECK(select_kernel_isa(ice_lake, nullptr) == KernelIsa::kAvx512Vnni);
  CHECK(select_kernel_isa(zen4, nullptr) == KernelIsa::kAvx512Bf16);
  CHECK(select_kernel_isa(zen5, nullptr) == KernelIsa::kAvx512Bf16);
  // Unset on a CPU whose vdpbf16ps is slow (Intel): the best level below kAvx512Bf16; named:
  // as on any CPU, kAvx512Bf16 included.
  CHECK(select_kernel_isa(zen5, nullptr, true) == KernelIsa::kAvx512Vnni);
  CHECK(select_kernel_isa(zen4, "", true) == KernelIsa::kAvx512Vnni);
  CHECK(select_kernel_isa(ice_lake, nullptr, true) == KernelIsa::kAvx512Vnni);
  CHECK(select_kernel_isa(skylake_x, nullptr, true) == KernelIsa::kAvx512);
  CHECK(select_kernel_isa(alder_lake, nullptr, true) == KernelIsa::kAvx2Vnni);
  CHECK(select_kernel_isa(zen5, "avx512bf16", true) == KernelIsa::kAvx512Bf16);
  CHECK(select_kernel_isa(zen5, "avx512", true) == KernelIsa::kAvx512);
  // Named: that level where the CPU has it, else the best one below it; never a higher one.
  CHECK(select_kernel_isa(zen5, "avx2vnni") == KernelIsa::kAvx2Vnni);
  CHECK(select_kernel_isa(zen4, "avx2vnni") == KernelIsa::kAvx2);
  CHECK(select_kernel_isa(skylake_x, "avx2vnni") == KernelIsa::kAvx2);
  CHECK(select_kernel_isa(alder_lake, "avx512") == KernelIsa::kAvx2Vnni);
  CHECK(select_kernel_isa(alder_lake, "avx512bf16") == KernelIsa::kAvx2Vnni);
  CHECK(select_kernel_isa(haswell, "avx2vnni") == KernelIsa::kAvx2);
  CHECK(select_kernel_isa(skylake_x, "avx512bf16") == KernelIsa::kAvx512);
  CHECK(select_kernel_isa(skylake_x, "avx512vnni") == KernelIsa::kAvx512);
  CHECK(select_kernel_isa(ice_lake, "avx512bf16") == KernelIsa::kAvx512Vnni);
  CHECK(select_kernel_isa(ice_lake, "avx2vnni") == KernelIsa::kAvx2);
  CHECK(select_kernel_isa(zen5, "avx512vnni") == KernelIsa::kAvx512Vnni);
  CHECK(select_kernel_isa(zen4, "portable") == KernelIsa::kPortable);
  CHECK(select_kernel_isa(kernel_isa_bit(KernelIsa::kPortable), "avx2") == KernelIsa::kPortable);
  // Every set and every name: a level of the set, at or below the one named, with no level of
  // the set strictly between the two.
  const auto max_set = static_cast<KernelIsaSet>((1U << std::size(moet::kAllKernelIsas)) - 1U);
  for (KernelIsaSet s = 1; s <= max_set; s += 2) {  // odd: every CPU has the portable level
    for (const KernelIsa wanted : moet::kAllKernelIsas) {
      const KernelIsa got = select_kernel_isa(s, moet::kernel_isa_name(wanted));
      CHECK((s & kernel_isa_bit(got)) != 0);
      CHECK(got <= wanted);
      for (const KernelIsa between : moet::kAllKernelIsas) {
        if (got < between && between <= wanted) CHECK((s & kernel_isa_bit(between)) == 0);
      }
    }
  }
  CHECK_THROWS_AS(select_kernel_isa(haswell, "avx3"), moet::Error);
  CHECK_THROWS_WITH(
      select_kernel_isa(haswell, "AVX2"),
      Catch::Contains("MOET_ISA") && Catch::Contains("'AVX2'") &&
          Catch::Contains("portable, avx2, avx2vnni, avx512, avx512vnni, avx512bf16"));
  // What this process runs: the CPU's levels filtered by the environment it was started with.
  CHECK(moet::kernel_isa() == select_kernel_isa(moet::detail::cpu_kernel_isas(),
                                                std::getenv("MOET_ISA"),
                                                moet::detail::cpu_bf16_dot_is_slow()));
  CHECK(moet::default_kernel_isa() == select_kernel_isa(moet::detail::cpu_kernel_isas(), nullptr,
                                                        moet::detail::cpu_bf16_dot_is_slow()));
  CHECK(moet::default_kernel_isa() <= moet::cpu_kernel_isa());
  CHECK(moet::kernel_isa_supported(moet::kernel_isa()));
  CHECK(moet::kernel_isa() <= moet::cpu_kernel_isa());
}

TEST_CASE("Names round-trip", "[isa]") {
  for (const KernelIsa isa : moet::kAllKernelIsas) {
    CHECK(moet::detail::parse_kernel_isa(moet::kernel_isa_name(isa), "test") == isa);
  }
  CHECK(std::string(moet::kernel_isa_name(KernelIsa::kAvx512Bf16)) == "avx512bf16");
  CHECK(std::string(moet::kernel_isa_name(KernelIsa::kAvx2Vnni)) == "avx2vnni");
  CHECK(std::string(moet::kernel_isa_name(KernelIsa::kAvx512Vnni)) == "avx512vnni");
}

TEST_CASE("Packed weights run the level they were packed for", "[isa][gemm]") {
  // The layout (panel width) is the level's, and a product on weights packed for a lower level
  // than kernel_isa() computes the same values as on that level's own packing.
  const Matrix b = random_matrix(70, 45, 1);
  const Matrix a = random_matrix(9, 70, 2);
  moet::detail::Buffer<float> scratch;
  for (const KernelIsa isa : supported_isas()) {
    const moet::detail::PackedMatrix<float> packed(b, isa);
    INFO(moet::kernel_isa_name(isa));
    CHECK(packed.isa() == isa);
    CHECK(packed.panel_width() == moet::detail::panel_width(isa));
    Matrix c(9, 45);
    moet::detail::gemm_packed(a, packed, c, false, scratch);
    CHECK(scaled_error(c, naive_product(a, b), a, b) <= 1e-5);
  }
  // Packing for a level this CPU lacks is refused (nothing to test on a CPU that has them all).
  for (const KernelIsa isa : moet::kAllKernelIsas) {
    if (moet::kernel_isa_supported(isa)) continue;
    CHECK_THROWS_WITH(moet::detail::PackedMatrix<float>(b, isa),
                      Catch::Contains("not supported by this CPU"));
  }
}

}  // namespace test_kernel_isa
