// Prints the kernel levels this CPU runs, lowest first, one per line. With `--others`, leaves
// out the level the kernels run on now (moet::kernel_isa(): the default, or what MOET_ISA names):
// scripts/test.sh runs the unit tests once more per level it prints.
#include <cstdio>
#include <cstring>

#include "moet/kernel_isa.hpp"

int main(int argc, char** argv) {
  const bool others = argc > 1 && std::strcmp(argv[1], "--others") == 0;
  if (argc > 1 && !others) {
    std::fprintf(stderr, "usage: moet_list_kernel_isas [--others]\n");
    return 2;
  }
  for (const moet::KernelIsa isa : moet::kAllKernelIsas) {
    if (!moet::kernel_isa_supported(isa)) continue;
    if (others && isa == moet::kernel_isa()) continue;
    std::printf("%s\n", moet::kernel_isa_name(isa));
  }
  return 0;
}
