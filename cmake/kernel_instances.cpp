// moet's kernel families (every level, element type and shipped activation), compiled once for
// moet's own tests, examples and benchmark suites, which compile with MOET_EXTERN_KERNELS and so
// instantiate none of them themselves (see detail/kernels/family.inl). Users' programs do not
// need this: without the macro every translation unit instantiates what it uses.
#define MOET_INSTANTIATE_KERNELS
#include "moet/detail/gemm.hpp"
