#pragma once
/// \file moet/instantiate_kernels.hpp
/// Compiles moet's kernels once per program instead of once per translation unit.
///
/// moet is header-only: every unit that runs a layer instantiates the kernel families it uses
/// (every kernel level, for each weight format and activation), most of a small unit's compile
/// time. To pay that once, compile **every** unit of the program with `MOET_EXTERN_KERNELS`
/// defined (the units then declare the kernels and compile none of them) and include this
/// header in **one** `.cpp` file, before any other moet header; that unit compiles all of them.
///
/// ```cmake
/// target_compile_definitions(my_model PRIVATE MOET_EXTERN_KERNELS)
/// target_sources(my_model PRIVATE moet_kernels.cpp)  # #include <moet/instantiate_kernels.hpp>
/// ```
///
/// A unit compiled without the macro still works beside them (it compiles its own copies of
/// the kernels it uses, as without this header); a program that defines the macro but never
/// includes this header fails to link (undefined `moet::detail::isa_*` kernels).

#if defined(MOET_DETAIL_GEMM_HPP)
#error "moet/instantiate_kernels.hpp must come before every other moet header of its unit"
#endif
#if !defined(MOET_INSTANTIATE_KERNELS)
#define MOET_INSTANTIATE_KERNELS
#endif
#include "moet/detail/gemm.hpp"
