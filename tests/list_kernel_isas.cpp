// Prints the kernel levels this CPU runs, lowest first, one per line (scripts/test.sh runs the
// unit tests once per level with MOET_ISA set to each).
#include <cstdio>

#include "moet/kernel_isa.hpp"

int main() {
  for (const moet::KernelIsa isa : moet::kAllKernelIsas) {
    if (moet::kernel_isa_supported(isa)) std::printf("%s\n", moet::kernel_isa_name(isa));
  }
  return 0;
}
