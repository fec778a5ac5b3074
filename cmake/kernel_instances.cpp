// moet's kernel families (every level, element type and shipped activation), compiled once for
// moet's own tests, examples and benchmark suites, which compile with MOET_EXTERN_KERNELS and so
// instantiate none of them themselves (see detail/kernels/family.inl). Users' programs can do
// the same (moet/instantiate_kernels.hpp); without the macro every unit instantiates what it
// uses.
#include "moet/instantiate_kernels.hpp"
