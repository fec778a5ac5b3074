#pragma once
/// \file detail/gemm.hpp
/// Packed-weight matrix products for the expert banks: `C = A B` (`gemm_packed`) and the fused
/// gated-linear-unit product `H = Act(A Wg) ⊙ (A Wu)` (`glu_packed`), single-threaded, float
/// activations, float or bf16 weights.
///
/// Split by role (as Eigen's products are): kernels/packed.hpp packs the weights and the rows,
/// kernels/blocking.hpp blocks a call, kernels/family.inl holds one kernel level's
/// micro-kernels and driver, and this file compiles that family once per level and dispatches.
///
/// Runtime selection: every level (`KernelIsa`: portable, AVX2 + FMA + F16C, AVX-512,
/// AVX-512 + BF16, and for the block formats AVX2 + AVX-VNNI and AVX-512 + VNNI) is compiled
/// into every translation unit through the compilers' target attributes (`#pragma GCC
/// target`, `#pragma clang attribute`), whatever `-march` the unit uses; nothing of a level
/// runs unless the CPU has it. Packed weights are laid out for one level (`kernel_isa()` when
/// packed) and each product runs the kernels of its weights' level, so packing and kernels
/// agree whichever translation unit did which.
///
/// Determinism: every output element is one sequential chain over `k = 0, 1, ..., K - 1` (pairs
/// of rows for bf16), starting from 0 (or from the old `C` in accumulate mode); K blocking only
/// parks the running sum in memory between blocks, which is exact. So the bits of an element
/// depend on neither the row count `n`, the other rows in the call, the row grouping, the
/// blocking parameters, nor the thread that runs the call: a row computed alone equals the
/// same row computed inside any block (tests/test_gemm.cpp checks this bit for bit, on every
/// level). Results do depend on the level: the x86 levels fuse each multiply-add, the portable
/// one rounds twice.
///
/// bf16 weights (`PackedMatrix<Bf16>`, `PackedGluMatrix<Bf16>`; `WeightFormat::kBf16` banks):
/// the same driver and blocking, rows of `K` packed in pairs (an odd `K` padded with a zero
/// row), the rows of `A` rounded to bf16 when they are packed, so every product is exact in
/// float and only the sums round. `kAvx512Bf16` multiplies a pair with one `vdpbf16ps`; the
/// other levels split each pair into two floats in registers (a shift and a mask) and use two
/// multiply-adds.

// Seen by moet/instantiate_kernels.hpp, which must come first to instantiate the kernels.
#define MOET_DETAIL_GEMM_HPP 1

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <new>
#include <type_traits>
#include <utility>

#include "moet/activations.hpp"
#include "moet/detail/bf16.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/kernels/blocking.hpp"
#include "moet/detail/kernels/elementwise.hpp"
#include "moet/detail/kernels/epilogue.hpp"
#include "moet/detail/kernels/packed.hpp"
#include "moet/detail/kernels/vec_portable.hpp"
#include "moet/errors.hpp"
#include "moet/kernel_isa.hpp"
#include "moet/tensor.hpp"

// --- the kernel levels ----------------------------------------------------------------------

namespace moet::detail::isa_portable {
#include "moet/detail/kernels/family.inl"
}  // namespace moet::detail::isa_portable

#if MOET_X86
// Each level's code is compiled for its instruction set alone (kernels/level.inl).
#define MOET_KERNEL_NS isa_avx2
#define MOET_KERNEL_TARGET "avx2,fma,f16c"
#define MOET_KERNEL_WIDTH 256
#define MOET_KERNEL_I8_DOT 2
#include "moet/detail/kernels/level.inl"

// AVX2 + AVX-VNNI: only the block formats' products run this level's own code (the float and
// bf16 products and the elementwise kernels of `kAvx2Vnni` are `kAvx2`'s, see
// MOET_DISPATCH_PRODUCT), so only those are instantiated here.
#define MOET_KERNEL_NS isa_avx2vnni
#define MOET_KERNEL_TARGET "avx2,fma,f16c,avxvnni"
#define MOET_KERNEL_WIDTH 256
#define MOET_KERNEL_I8_DOT 1
#define MOET_KERNEL_QUANTIZED_ONLY 1
#include "moet/detail/kernels/level.inl"

#define MOET_KERNEL_NS isa_avx512
#define MOET_KERNEL_TARGET "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl"
#define MOET_KERNEL_WIDTH 512
#define MOET_KERNEL_BF16_DOT 0
#define MOET_KERNEL_I8_DOT 2
#include "moet/detail/kernels/level.inl"

// AVX-512 + AVX512-VNNI: as for AVX2 + AVX-VNNI, only the block formats' products.
#define MOET_KERNEL_NS isa_avx512vnni
#define MOET_KERNEL_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni"
#define MOET_KERNEL_WIDTH 512
#define MOET_KERNEL_BF16_DOT 0
#define MOET_KERNEL_I8_DOT 1
#define MOET_KERNEL_QUANTIZED_ONLY 1
#include "moet/detail/kernels/level.inl"

#define MOET_KERNEL_NS isa_avx512bf16
#define MOET_KERNEL_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vnni"
#define MOET_KERNEL_WIDTH 512
#define MOET_KERNEL_BF16_DOT 1
#define MOET_KERNEL_I8_DOT 1
#include "moet/detail/kernels/level.inl"
#endif  // MOET_X86

namespace moet::detail {

/// Returns `call` (an entry point of kernels/family.inl) of the kernel level `isa`; `kAvx2Vnni`
/// and `kAvx512Vnni` run `kAvx2`'s and `kAvx512`'s (their own code is only the block formats'
/// products).
#if MOET_X86
#define MOET_DISPATCH_ISA(isa, call)               \
  switch (isa) {                                   \
    case ::moet::KernelIsa::kAvx512Bf16:           \
      return ::moet::detail::isa_avx512bf16::call; \
    case ::moet::KernelIsa::kAvx512Vnni:           \
    case ::moet::KernelIsa::kAvx512:               \
      return ::moet::detail::isa_avx512::call;     \
    case ::moet::KernelIsa::kAvx2Vnni:             \
    case ::moet::KernelIsa::kAvx2:                 \
      return ::moet::detail::isa_avx2::call;       \
    case ::moet::KernelIsa::kPortable:             \
      break;                                       \
  }                                                \
  return ::moet::detail::isa_portable::call
/// The same for a product on packed weights of type `W` (a template parameter of the caller):
/// the VNNI levels run their own kernels for the block formats and their base level's for float
/// and bf16.
#define MOET_DISPATCH_PRODUCT(isa, W, call)        \
  if constexpr (::moet::detail::kIsQuantized<W>) { \
    if ((isa) == ::moet::KernelIsa::kAvx2Vnni) {   \
      return ::moet::detail::isa_avx2vnni::call;   \
    }                                              \
    if ((isa) == ::moet::KernelIsa::kAvx512Vnni) { \
      return ::moet::detail::isa_avx512vnni::call; \
    }                                              \
  }                                                \
  MOET_DISPATCH_ISA(isa, call)
#else
#define MOET_DISPATCH_ISA(isa, call) \
  static_cast<void>(isa);            \
  return ::moet::detail::isa_portable::call
#define MOET_DISPATCH_PRODUCT(isa, W, call) MOET_DISPATCH_ISA(isa, call)
#endif

/// True when the storage spans of two row-major views overlap.
template <class A, class B>
bool views_overlap(const A& a, const B& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const float* a_end = a.data() + (a.rows() - 1) * a.outerStride() + a.cols();
  const float* b_end = b.data() + (b.rows() - 1) * b.outerStride() + b.cols();
  const std::less<const float*> before;
  return before(a.data(), b_end) && before(b.data(), a_end);
}

/// A range of column panels `[begin, end)` of a packed matrix: a product restricted to it
/// computes only the output columns of those panels (`[begin w, min(end w, cols))`, `w` the
/// output columns per panel) and leaves the others untouched. `end < 0` means "to the last
/// panel". Every output element is the same chain whichever range computes it, so splitting a
/// product's panels between threads (few rows, decode) keeps the bits.
using PanelRange = ::moet::PanelRange;  // tensor.hpp

/// The panels of `range` within `[0, num_panels)`, as `(first, count)`; throws `moet::Error`
/// naming `op` for a range outside it.
inline std::pair<Index, Index> panel_span(const char* op, PanelRange range, Index num_panels) {
  const Index end = range.end < 0 ? num_panels : range.end;
  require(range.begin >= 0 && range.begin <= end && end <= num_panels, op, "panel range [",
          range.begin, ", ", range.end, ") is outside [0, ", num_panels, ")");
  return {range.begin, end - range.begin};
}

/// The `B` and `C` side of a product on `b`'s panels `panels` (after the shape checks): the
/// panels' start, count and stride, `C`'s matching columns; the caller fills in `A`.
template <class W>
PackedProduct<W> panel_product(const char* op, const PackedMatrix<W>& b, Rows<float> c,
                               PanelRange panels, bool accumulate) {
  const auto [first, count] = panel_span(op, panels, b.num_panels());
  const Index width = b.panel_width();
  PackedProduct<W> product;
  product.b = b.data() + first * b.panel_stride();
  product.b_stride = b.panel_stride();
  product.num_panels = count;
  product.out = c.data() + first * width;
  product.ldo = c.outerStride();
  product.out_cols = std::min(c.cols() - std::min(c.cols(), first * width), count * width);
  product.accumulate = accumulate;
  return product;
}

/// `C = A B` (or `C += A B` with `accumulate`) for a packed right-hand side, single-threaded
/// (callers parallelise over independent tasks; no OpenMP inside), on the kernels of the level
/// `b` was packed for.
///
/// \param a `(n, K)` row-major view (any outer stride).
/// \param b the packed `(K, N)` matrix, float or bf16 (then `a`'s rows are rounded to bf16 as
///   they are packed; the products are exact, the sums float).
/// \param c `(n, N)` row-major view, must not overlap `a`.
/// \param accumulate add to `c` instead of overwriting it.
/// \param scratch grow-only workspace (`reserve_packed_scratch` pre-sizes it).
/// \param panels the column panels of `b` to compute (default: all); see `PanelRange`.
///
/// Throws `moet::Error` on mismatched shapes, overlapping `a` and `c`, or a panel range outside
/// `b`. Deterministic: see the
/// file comment (a row's bits do not depend on the other rows of the call).
///
/// ```cpp
/// moet::detail::gemm_packed(h, packed_down, y, /*accumulate=*/false, scratch);
/// ```
template <class W>
void gemm_packed(const ConstRows<float>& a, const PackedMatrix<W>& b, Rows<float> c,
                 bool accumulate, Buffer<float>& scratch, PanelRange panels = {}) {
  constexpr const char* kOp = "gemm_packed";
  require(a.cols() == b.rows(), kOp, "A has ", a.cols(), " columns but B has ", b.rows(), " rows");
  require(c.rows() == a.rows() && c.cols() == b.cols(), kOp, "C must be (", a.rows(), ", ",
          b.cols(), "), got (", c.rows(), ", ", c.cols(), ")");
  require(!views_overlap(a, c), kOp, "C must not overlap A");
  PackedProduct<W> product = panel_product(kOp, b, c, panels, accumulate);
  product.a = a.data();
  product.lda = a.outerStride();
  product.n = a.rows();
  product.k = a.cols();
  MOET_DISPATCH_PRODUCT(b.isa(), W, gemm(product, scratch));
}

/// `C = A B` (or `C += A B`) with `A` given as its transpose: `a_t` `(K, n)` row-major, so
/// `A = a_t^T` `(n, K)` (the weight-gradient products of training, `dW = X^T dY`, take the
/// activations `X` `(tokens, in)` as `a_t`: `K` is the token count). Otherwise as
/// `gemm_packed`: each output is one chain over `k = 0 .. K - 1` in order, whatever the row
/// blocking, so splitting the `n` rows of `A` (columns of `a_t`) between threads keeps the bits;
/// `panels` splits the columns of `B` and `C` (see `PanelRange`) as in `gemm_packed`.
template <class W>
void gemm_packed_at(const ConstRows<float>& a_t, const PackedMatrix<W>& b, Rows<float> c,
                    bool accumulate, Buffer<float>& scratch, PanelRange panels = {}) {
  constexpr const char* kOp = "gemm_packed_at";
  require(a_t.rows() == b.rows(), kOp, "A^T has ", a_t.rows(), " rows but B has ", b.rows(),
          " rows");
  require(c.rows() == a_t.cols() && c.cols() == b.cols(), kOp, "C must be (", a_t.cols(), ", ",
          b.cols(), "), got (", c.rows(), ", ", c.cols(), ")");
  require(!views_overlap(a_t, c), kOp, "C must not overlap A^T");
  PackedProduct<W> product = panel_product(kOp, b, c, panels, accumulate);
  product.a = a_t.data();
  product.lda = 1;
  product.a_k_stride = a_t.outerStride();
  product.n = a_t.cols();
  product.k = a_t.rows();
  MOET_DISPATCH_PRODUCT(b.isa(), W, gemm(product, scratch));
}

/// The fused gated-linear-unit product `H = Act(A Wg) ⊙ (A Wu)`: both products share each
/// packed row group of `A`, and the epilogue applies `Act` and the product in registers before
/// the only store of `H`. Single-threaded, deterministic like `gemm_packed`, on the kernels of
/// the level `w` was packed for.
///
/// With `Act = Silu` the x86 levels use the vectorised SiLU of kernels/family.inl (relative
/// error below 1e-6 of the exact SiLU); other activations, and the portable level, call
/// `Act::apply` per element.
///
/// \tparam Act the gate activation (`Silu` for SwiGLU, `Gelu` for GeGLU, ...).
/// \param a `(n, K)` row-major view.
/// \param w the packed gate and up weights, `(K, F)` each, float or bf16 (as in `gemm_packed`).
/// \param h `(n, F)` output view, must not overlap `a`.
/// \param scratch grow-only workspace (`reserve_packed_scratch` pre-sizes it).
/// \param panels the column panels of `w` to compute (default: all; `w.panel_width() / 2`
///   columns of `h` each); see `PanelRange`.
///
/// ```cpp
/// moet::detail::glu_packed<moet::Silu>(x_rows, packed_gate_up, h, scratch);
/// ```
template <class Act = Silu, class W = float>
void glu_packed(const ConstRows<float>& a, const PackedGluMatrix<W>& w, Rows<float> h,
                Buffer<float>& scratch, PanelRange panels = {}) {
  constexpr const char* kOp = "glu_packed";
  require(a.cols() == w.rows(), kOp, "A has ", a.cols(), " columns but the weights have ", w.rows(),
          " rows");
  require(h.rows() == a.rows() && h.cols() == w.cols(), kOp, "H must be (", a.rows(), ", ",
          w.cols(), "), got (", h.rows(), ", ", h.cols(), ")");
  require(!views_overlap(a, h), kOp, "H must not overlap A");
  const auto [first, count] = panel_span(kOp, panels, w.num_panels());
  const Index width = w.panel_width() / 2;  // gate and up lanes interleaved: half are outputs
  const PackedProduct<W> product{
      .a = a.data(),
      .lda = a.outerStride(),
      .n = a.rows(),
      .k = a.cols(),
      .b = w.data() + first * w.panel_stride(),
      .b_stride = w.panel_stride(),
      .num_panels = count,
      .out = h.data() + first * width,
      .ldo = h.outerStride(),
      .out_cols = std::min(h.cols() - std::min(h.cols(), first * width), count * width),
      .accumulate = false};
  MOET_DISPATCH_PRODUCT(w.isa(), W, template glu<Act>(product, scratch));
}

/// The raw products `A Wg` and `A Wu` of a packed gated-linear-unit matrix, in its packed
/// column order (training keeps them for the backward): `wide` `(n, w.num_panels() *
/// w.panel_width())`, panel `p`'s first `w.panel_width() / 2` columns hold gate columns
/// `[p h, p h + h)` and its last `h` the same up columns (`h = w.panel_width() / 2`; columns past
/// `F` are zero). Every element is the accumulator `glu_packed` applies `Act` to, bit for bit.
template <class W>
void glu_packed_raw(const ConstRows<float>& a, const PackedGluMatrix<W>& w, Rows<float> wide,
                    Buffer<float>& scratch) {
  constexpr const char* kOp = "glu_packed_raw";
  const Index cols = w.num_panels() * w.panel_width();
  require(a.cols() == w.rows(), kOp, "A has ", a.cols(), " columns but the weights have ", w.rows(),
          " rows");
  require(wide.rows() == a.rows() && wide.cols() == cols, kOp, "the output must be (", a.rows(),
          ", ", cols, "), got (", wide.rows(), ", ", wide.cols(), ")");
  require(!views_overlap(a, wide), kOp, "the output must not overlap A");
  const PackedProduct<W> product{.a = a.data(),
                                 .lda = a.outerStride(),
                                 .n = a.rows(),
                                 .k = a.cols(),
                                 .b = w.data(),
                                 .b_stride = w.panel_stride(),
                                 .num_panels = w.num_panels(),
                                 .out = wide.data(),
                                 .ldo = wide.outerStride(),
                                 .out_cols = cols,
                                 .accumulate = false};
  MOET_DISPATCH_PRODUCT(w.isa(), W, gemm(product, scratch));
}

/// `out[i] = silu(in[i])` for `i < n` with the SiLU of level `isa`'s kernels (the vectorised
/// one on x86 levels, `Silu::apply` on the portable one). `in` and `out` may be the same array.
inline void silu_array(const float* in, float* out, Index n, KernelIsa isa = kernel_isa()) {
  MOET_DISPATCH_ISA(isa, silu_array<>(in, out, n));
}

/// AdamW's update of `n` float parameters on level `isa`'s vectors (`adamw_one` for each
/// value; the arrays must not overlap): see kernels/elementwise.inl.
inline void adamw_update(const AdamWCoefficients<float>& c, float* p, const float* g, float* m,
                         float* v, Index n, KernelIsa isa = kernel_isa()) {
  MOET_DISPATCH_ISA(isa, adamw_update(c, p, g, m, v, n));
}

}  // namespace moet::detail
