// No include guard: included by detail/gemm.hpp once per x86 kernel level.
/// \file detail/kernels/level.inl
/// One x86 kernel level: its registers (vec_avx2.inl or vec_avx512.inl) and its kernel family
/// (family.inl) in namespace `moet::detail::MOET_KERNEL_NS`, every function of which (lambdas
/// and template instantiations included) carries the target attribute `MOET_KERNEL_TARGET`, so
/// the level compiles for its instruction set alone whatever `-march` the unit uses. The
/// includer defines:
///
/// | macro | meaning |
/// |---|---|
/// | `MOET_KERNEL_NS` | the level's namespace (`isa_avx2`, ...) |
/// | `MOET_KERNEL_TARGET` | the target string (`"avx2,fma"`, ...) |
/// | `MOET_KERNEL_WIDTH` | 256 (`Vec` of vec_avx2.inl) or 512 (vec_avx512.inl) |
/// | `MOET_KERNEL_BF16_DOT` | 1: `vdpbf16ps` for bf16 weights (512 only) |
/// | `MOET_KERNEL_I8_DOT` | 0: dequantise; 1: `vpdpbusd`; 2: `vpmaddubsw` + `vpmaddwd` |
/// | `MOET_KERNEL_QUANTIZED_ONLY` | defined: instantiate only the block formats' products |
///
/// and this file undefines them all.

#define MOET_KERNEL_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define MOET_KERNEL_TARGET_PUSH(t) \
  MOET_KERNEL_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
MOET_KERNEL_TARGET_PUSH(MOET_KERNEL_TARGET)
#else
#define MOET_KERNEL_TARGET_PUSH(t) MOET_KERNEL_PRAGMA(GCC target(t))
#pragma GCC push_options
MOET_KERNEL_TARGET_PUSH(MOET_KERNEL_TARGET)
#endif

#if MOET_KERNEL_WIDTH == 512
#include "moet/detail/kernels/vec_avx512.inl"
#elif MOET_KERNEL_WIDTH == 256
#include "moet/detail/kernels/vec_avx2.inl"
#else
#error "MOET_KERNEL_WIDTH must be 256 or 512"
#endif
namespace moet::detail::MOET_KERNEL_NS {
#include "moet/detail/kernels/family.inl"
}  // namespace moet::detail::MOET_KERNEL_NS

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef MOET_KERNEL_TARGET_PUSH
#undef MOET_KERNEL_PRAGMA
#undef MOET_KERNEL_NS
#undef MOET_KERNEL_TARGET
#undef MOET_KERNEL_WIDTH
#undef MOET_KERNEL_BF16_DOT
#undef MOET_KERNEL_I8_DOT
#undef MOET_KERNEL_QUANTIZED_ONLY
