// moet/instantiate_kernels.hpp after another moet header that already included the kernels
// would instantiate nothing (the kernel header is not read twice) and leave the program's
// MOET_EXTERN_KERNELS units without kernels at link time: a compile error instead.
// expect: moet/instantiate_kernels.hpp must come before every other moet header of its unit
#include "moet/experts/glu.hpp"
#include "moet/instantiate_kernels.hpp"
