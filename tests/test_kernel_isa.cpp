// Runtime kernel selection (kernel_isa.hpp): the cpuid detection against the compiler's own
// CPU probe, MOET_ISA parsing and lowering, and packed weights running the level they were
// packed for whatever level is selected.
#include <cstdlib>
#include <string>

#include <catch2/catch.hpp>

#include "moet/detail/gemm.hpp"
#include "moet/errors.hpp"
#include "moet/kernel_isa.hpp"

#include "gemm_test_util.hpp"

namespace test_kernel_isa {  // one per file: the unity build puts several files in one TU

using moet::KernelIsa;
using namespace moet_test;  // NOLINT(google-build-using-namespace)

TEST_CASE("cpuid detection agrees with the compiler's CPU probe", "[isa]") {
  const KernelIsa cpu = moet::cpu_kernel_isa();
  INFO("detected " << moet::kernel_isa_name(cpu));
#if defined(__x86_64__) || defined(__i386__)
  // An independent oracle: libgcc / compiler-rt's __builtin_cpu_supports (it also checks that
  // the OS saves the registers).
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  const bool bf16 = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
  const KernelIsa want = avx2 && avx512 && bf16 ? KernelIsa::kAvx512Bf16
                         : avx2 && avx512       ? KernelIsa::kAvx512
                         : avx2                 ? KernelIsa::kAvx2
                                                : KernelIsa::kPortable;
  CHECK(cpu == want);
#else
  CHECK(cpu == KernelIsa::kPortable);
#endif
  CHECK(moet::kernel_isa_supported(KernelIsa::kPortable));
  CHECK(moet::kernel_isa_supported(cpu));
}

TEST_CASE("MOET_ISA lowers the level, never raises it, and rejects unknown names", "[isa]") {
  using moet::detail::select_kernel_isa;
  for (const KernelIsa cpu : moet::kAllKernelIsas) {
    CHECK(select_kernel_isa(cpu, nullptr) == cpu);
    CHECK(select_kernel_isa(cpu, "") == cpu);
    for (const KernelIsa wanted : moet::kAllKernelIsas) {
      const KernelIsa got = select_kernel_isa(cpu, moet::kernel_isa_name(wanted));
      CHECK(got == (wanted < cpu ? wanted : cpu));
    }
  }
  CHECK_THROWS_AS(select_kernel_isa(KernelIsa::kAvx2, "avx3"), moet::Error);
  CHECK_THROWS_WITH(select_kernel_isa(KernelIsa::kAvx2, "AVX2"),
                    Catch::Contains("MOET_ISA") && Catch::Contains("'AVX2'") &&
                        Catch::Contains("portable, avx2, avx512, avx512bf16"));
  // What this process runs: the CPU's level lowered by the environment it was started with.
  CHECK(moet::kernel_isa() == select_kernel_isa(moet::cpu_kernel_isa(), std::getenv("MOET_ISA")));
  CHECK(moet::kernel_isa() <= moet::cpu_kernel_isa());
}

TEST_CASE("Names round-trip", "[isa]") {
  for (const KernelIsa isa : moet::kAllKernelIsas) {
    CHECK(moet::detail::parse_kernel_isa(moet::kernel_isa_name(isa), "test") == isa);
  }
  CHECK(std::string(moet::kernel_isa_name(KernelIsa::kAvx512Bf16)) == "avx512bf16");
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
