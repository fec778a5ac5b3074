#pragma once
/// \file detail/kernels/vec_portable.hpp
/// The register type of the portable kernel level (`KernelIsa::kPortable`): four floats in a
/// compiler vector type (GCC/Clang `vector_size`), which every target lowers to its own
/// vectors (SSE2 on any x86-64, NEON on Arm) without instruction-set flags. Written with
/// explicit vector operations rather than loops left to the auto-vectoriser: GCC 12.2 at `-O3`
/// (a plain Release build) vectorised moet 0.1's plain-loop bf16 kernel across the `k` loop as
/// an SLP reduction chain and double-counted a term (`[1 1 1] x [1 2 4]^T` gave 8), with no
/// undefined behaviour in the source (UBSan clean; `-O2`, `-fno-tree-loop-vectorize` and clang
/// gave 7). tests/test_gemm_bf16.cpp keeps that case.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "moet/detail/bf16.hpp"
#include "moet/detail/kernels/blocking.hpp"

namespace moet::detail::isa_portable {

/// Four floats.
struct Vec {
  using Reg = float __attribute__((vector_size(16)));
  using Words = std::uint32_t __attribute__((vector_size(16)));
  static constexpr int kWidth = 4;
  /// No vectorised SiLU: the epilogue applies `Act::apply` lane by lane.
  static constexpr bool kVectorSilu = false;
  /// No bf16 dot-product instruction: bf16 pairs are split into floats in registers.
  static constexpr bool kDotBf16 = false;
  /// No 8-bit integer dot products: block-quantised weights are dequantised to float.
  static constexpr bool kDotI8 = false;
  static constexpr bool kDotI8Madd = false;

  static MOET_ALWAYS_INLINE Reg zero() { return Reg{}; }
  static MOET_ALWAYS_INLINE Reg set1(float v) { return Reg{v, v, v, v}; }
  static MOET_ALWAYS_INLINE Reg load(const float* p) {
    Reg r;
    std::memcpy(&r, p, sizeof r);
    return r;
  }
  static MOET_ALWAYS_INLINE void store(float* p, Reg v) { std::memcpy(p, &v, sizeof v); }
  static MOET_ALWAYS_INLINE Reg broadcast(const float* p) { return set1(*p); }
  /// `a * b + c`, rounded twice (a multiply, then an add).
  static MOET_ALWAYS_INLINE Reg fma(Reg a, Reg b, Reg c) { return a * b + c; }
  static MOET_ALWAYS_INLINE Reg mul(Reg a, Reg b) { return a * b; }
  static MOET_ALWAYS_INLINE Reg add(Reg a, Reg b) { return a + b; }
  static MOET_ALWAYS_INLINE Reg sub(Reg a, Reg b) { return a - b; }
  static MOET_ALWAYS_INLINE Reg div(Reg a, Reg b) { return a / b; }
  /// Lane by lane `std::sqrt` (no portable vector square root).
  static MOET_ALWAYS_INLINE Reg sqrt(Reg a) {
    return Reg{std::sqrt(a[0]), std::sqrt(a[1]), std::sqrt(a[2]), std::sqrt(a[3])};
  }
  /// The `kWidth` bf16 pairs at `p` as floats: `even` holds each pair's first element (row `k`),
  /// `odd` its second (row `k + 1`).
  static MOET_ALWAYS_INLINE void bf16_pairs(const Bf16* p, Reg& even, Reg& odd) {
    Words w;
    std::memcpy(&w, p, sizeof w);
    const Words lo = w << 16U;
    const Words hi = w & 0xffff0000U;
    std::memcpy(&even, &lo, sizeof even);
    std::memcpy(&odd, &hi, sizeof odd);
  }
};

/// Blocking of the portable level: 6 x 8 float tiles (12 accumulators of 4 floats, plus two
/// of B and a broadcast: 15 of SSE2's 16 registers); bf16 tiles of 4 rows (8 accumulators, 4
/// registers of split B pairs, 2 broadcasts).
struct Traits {
  using V = Vec;
  static constexpr Index kNr = 2 * Vec::kWidth;
  template <class W>
  static constexpr int kMr = std::is_same_v<W, Bf16> ? 4 : 6;
  /// Rows and panels per tile of calls with several row groups: the same tiles.
  template <class W>
  static constexpr int kManyMr = kMr<W>;
  template <class W>
  static constexpr int kManyPanels = 1;
  /// Panels a one-group call (`m <= kMr` rows) covers: at least 8 independent chains.
  template <class W>
  static constexpr int few_row_panels(int m) {
    if constexpr (std::is_same_v<W, Bf16>) {
      return m == 1 ? 2 : 1;
    } else {
      return m == 1 ? 4 : m == 2 ? 3 : m == 3 ? 2 : 1;
    }
  }
};

}  // namespace moet::detail::isa_portable
