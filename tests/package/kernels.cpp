// The one unit of the kernels consumer that compiles moet's kernels (see kernels_main.cpp).
#include <moet/instantiate_kernels.hpp>
