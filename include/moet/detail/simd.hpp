#pragma once
/// \file detail/simd.hpp
/// Compile-time choice of the vector instruction set used by moet's dense kernels
/// (detail/gemm.hpp), thin wrappers over its registers, and a vectorised SiLU.
///
/// The choice follows the compiler's target macros, so it is made when the including
/// translation unit is compiled (moet itself adds no `-march`; link `moet::native` to opt in):
///
/// | build                                           | `kSimdName`  | vector      |
/// |-------------------------------------------------|--------------|-------------|
/// | `__AVX512F__` (and no `MOET_SIMD_DISABLE_AVX512`) | `"avx512f"`  | 16 floats   |
/// | `__AVX2__` and `__FMA__`                         | `"avx2+fma"` | 8 floats    |
/// | anything else, or `MOET_SIMD_DISABLE` defined    | `"portable"` | plain loops |
///
/// bf16 weights (`WeightFormat::kBf16`) use AVX512-BF16 dot products when the build also has
/// `__AVX512BF16__` (`kHasBf16Simd`, namespace `simd_avx512_bf16`), portable loops otherwise.
///
/// The AVX-512 and AVX2 kernels share all their code (the register wrappers below differ);
/// tests/test_gemm.cpp runs on both (`test_gemm_native`). Define `MOET_SIMD_DISABLE_AVX512` to
/// run the AVX2 kernels on an AVX-512 machine (e.g. to compare them).
///
/// Everything whose layout depends on this choice lives in an inline namespace named after it
/// (`simd_avx2`, ...), so translation units compiled for different instruction sets cannot
/// silently share a packed matrix: mixing them is a link error, not wrong numbers.

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "moet/experts/activations.hpp"
#include "moet/tensor.hpp"

#if !defined(MOET_SIMD_DISABLE) && !defined(MOET_SIMD_DISABLE_AVX512) && defined(__AVX512F__)
#define MOET_SIMD_AVX512 1
#define MOET_SIMD_AVX2 0
#elif !defined(MOET_SIMD_DISABLE) && defined(__AVX2__) && defined(__FMA__)
#define MOET_SIMD_AVX512 0
#define MOET_SIMD_AVX2 1
#else
#define MOET_SIMD_AVX512 0
#define MOET_SIMD_AVX2 0
#endif

// bf16 dot products (`vdpbf16ps`) for bf16 expert weights, on top of AVX-512.
#if MOET_SIMD_AVX512 && defined(__AVX512BF16__) && !defined(MOET_SIMD_DISABLE_BF16)
#define MOET_SIMD_BF16 1
#else
#define MOET_SIMD_BF16 0
#endif

// The inline namespace of everything whose layout or code depends on the choice above.
#if MOET_SIMD_BF16
#define MOET_SIMD_NAMESPACE simd_avx512_bf16
#elif MOET_SIMD_AVX512
#define MOET_SIMD_NAMESPACE simd_avx512
#elif MOET_SIMD_AVX2
#define MOET_SIMD_NAMESPACE simd_avx2
#else
#define MOET_SIMD_NAMESPACE simd_portable
#endif

#if MOET_SIMD_AVX512 || MOET_SIMD_AVX2
#include <immintrin.h>
#endif

/// Forces inlining of the small helpers the micro-kernels are built from (register blocking
/// only works when every lambda and wrapper call disappears).
#if defined(__GNUC__)
#define MOET_ALWAYS_INLINE inline __attribute__((always_inline))
#define MOET_LAMBDA_INLINE __attribute__((always_inline))
#else
#define MOET_ALWAYS_INLINE inline
#define MOET_LAMBDA_INLINE
#endif

namespace moet::detail {

inline namespace MOET_SIMD_NAMESPACE {

/// Name of the instruction set the kernels of this translation unit use.
#if MOET_SIMD_AVX512
inline constexpr const char* kSimdName = "avx512f";
#elif MOET_SIMD_AVX2
inline constexpr const char* kSimdName = "avx2+fma";
#else
inline constexpr const char* kSimdName = "portable";
#endif

/// True when the kernels use explicit vector instructions (AVX2 or AVX-512).
inline constexpr bool kHasSimd = MOET_SIMD_AVX512 || MOET_SIMD_AVX2;

/// True when bf16 weights run on AVX512-BF16 dot products (`vdpbf16ps`); otherwise they run
/// on the portable bf16 loops (define `MOET_SIMD_DISABLE_BF16` to force that).
inline constexpr bool kHasBf16Simd = MOET_SIMD_BF16;

/// Calls `f(std::integral_constant<int, I>{})` for `I = 0, ..., N - 1`, fully unrolled: the
/// register arrays of the micro-kernels are indexed only by such constants, so the compiler
/// keeps them in registers.
template <int N, class F>
MOET_ALWAYS_INLINE void static_for(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) MOET_LAMBDA_INLINE {
    (f(std::integral_constant<int, I>{}), ...);
  }
  (std::make_integer_sequence<int, N>{});
}

/// Constants of the vectorised `exp(t)` for `t <= 0` used by `silu` (derivations inline).
namespace exp_constants {
/// Below this argument `exp` returns 0: `exp(-87) = 1.6e-38` is still a normal float, and
/// `round(-87 * log2(e)) = -126` keeps the scale `2^n` normal.
inline constexpr float kMinArg = -87.0f;
/// `log2(e)`, turns `t` into the power of two `n = round(t log2(e))`.
inline constexpr float kLog2e = 1.44269504088896341f;
/// `ln 2 = kLn2Hi + kLn2Lo` (Cody-Waite split): `kLn2Hi = 0.693359375` has 9 significant bits,
/// so `n * kLn2Hi` is exact for `|n| <= 2^15` and `t - n ln 2` loses no bits.
inline constexpr float kLn2Hi = 0.693359375f;
inline constexpr float kLn2Lo = -2.12194440054690583e-4f;
/// Taylor coefficients `1 / i!` of `exp(r)` on `|r| <= ln(2) / 2`: the degree-7 truncation
/// error is at most `(ln 2 / 2)^8 / 8! * sqrt(2) = 7.3e-9`, far below float rounding.
inline constexpr float kC2 = 1.0f / 2.0f;
inline constexpr float kC3 = 1.0f / 6.0f;
inline constexpr float kC4 = 1.0f / 24.0f;
inline constexpr float kC5 = 1.0f / 120.0f;
inline constexpr float kC6 = 1.0f / 720.0f;
inline constexpr float kC7 = 1.0f / 5040.0f;
}  // namespace exp_constants

#if MOET_SIMD_AVX2
/// AVX2 + FMA: one `__m256` holds 8 floats.
struct Avx2 {
  using Reg = __m256;
  static constexpr int kWidth = 8;

  static MOET_ALWAYS_INLINE Reg zero() { return _mm256_setzero_ps(); }
  static MOET_ALWAYS_INLINE Reg set1(float v) { return _mm256_set1_ps(v); }
  static MOET_ALWAYS_INLINE Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static MOET_ALWAYS_INLINE void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static MOET_ALWAYS_INLINE Reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  /// `a * b + c` with one rounding.
  static MOET_ALWAYS_INLINE Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static MOET_ALWAYS_INLINE Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static MOET_ALWAYS_INLINE Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static MOET_ALWAYS_INLINE Reg div(Reg a, Reg b) { return _mm256_div_ps(a, b); }
  static MOET_ALWAYS_INLINE Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  /// `-|x|` (sets the sign bit).
  static MOET_ALWAYS_INLINE Reg neg_abs(Reg x) { return _mm256_or_ps(x, _mm256_set1_ps(-0.0f)); }
  /// Round to the nearest integer, ties to even.
  static MOET_ALWAYS_INLINE Reg round(Reg x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  /// `2^n` for integral `n` in `[-126, 127]`, built from the exponent bits.
  static MOET_ALWAYS_INLINE Reg pow2(Reg n) {
    const __m256i bits =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(bits);
  }
  /// `t < bound ? 0 : v`.
  static MOET_ALWAYS_INLINE Reg zero_if_less(Reg t, float bound, Reg v) {
    return _mm256_andnot_ps(_mm256_cmp_ps(t, _mm256_set1_ps(bound), _CMP_LT_OQ), v);
  }
  /// `x < 0 ? if_negative : otherwise` (decided by the sign bit, so `-0` picks `if_negative`).
  static MOET_ALWAYS_INLINE Reg select_negative(Reg x, Reg if_negative, Reg otherwise) {
    return _mm256_blendv_ps(otherwise, if_negative, x);
  }
};
using NativeVec = Avx2;
#endif

#if MOET_SIMD_AVX512
/// AVX-512F: one `__m512` holds 16 floats. Only AVX512F instructions are used (bitwise float
/// operations go through the integer unit because `_mm512_or_ps` needs AVX512DQ).
struct Avx512 {
  using Reg = __m512;
  static constexpr int kWidth = 16;
  /// Every lane. The zero-masked forms of some intrinsics are used with it because GCC 12's
  /// unmasked ones pass `_mm512_undefined_ps()` through and trip `-Wmaybe-uninitialized`.
  static constexpr __mmask16 kAll = 0xFFFF;

  static MOET_ALWAYS_INLINE Reg zero() { return _mm512_setzero_ps(); }
  static MOET_ALWAYS_INLINE Reg set1(float v) { return _mm512_set1_ps(v); }
  static MOET_ALWAYS_INLINE Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static MOET_ALWAYS_INLINE void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  static MOET_ALWAYS_INLINE Reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static MOET_ALWAYS_INLINE Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static MOET_ALWAYS_INLINE Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static MOET_ALWAYS_INLINE Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static MOET_ALWAYS_INLINE Reg div(Reg a, Reg b) { return _mm512_div_ps(a, b); }
  static MOET_ALWAYS_INLINE Reg max(Reg a, Reg b) { return _mm512_maskz_max_ps(kAll, a, b); }
  static MOET_ALWAYS_INLINE Reg neg_abs(Reg x) {
    return _mm512_castsi512_ps(
        _mm512_or_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
  }
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-conversion"  // GCC 12's -O0 macro casts the mask to short
  static MOET_ALWAYS_INLINE Reg round(Reg x) {
    return _mm512_maskz_roundscale_ps(kAll, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
#pragma GCC diagnostic pop
  static MOET_ALWAYS_INLINE Reg pow2(Reg n) {
    const __m512i bits = _mm512_maskz_slli_epi32(
        kAll, _mm512_add_epi32(_mm512_maskz_cvttps_epi32(kAll, n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(bits);
  }
  static MOET_ALWAYS_INLINE Reg zero_if_less(Reg t, float bound, Reg v) {
    const __mmask16 less = _mm512_cmp_ps_mask(t, _mm512_set1_ps(bound), _CMP_LT_OQ);
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~less), v);
  }
  static MOET_ALWAYS_INLINE Reg select_negative(Reg x, Reg if_negative, Reg otherwise) {
    // Sign bit set <=> the integer view is negative.
    const __mmask16 negative =
        _mm512_cmplt_epi32_mask(_mm512_castps_si512(x), _mm512_setzero_si512());
    return _mm512_mask_blend_ps(negative, otherwise, if_negative);
  }
};
using NativeVec = Avx512;
#endif

#if MOET_SIMD_AVX512 || MOET_SIMD_AVX2
/// Vectorised SiLU, `silu(x) = x * sigmoid(x)`, evaluated like `Silu::sigmoid` (no overflow for
/// either sign): with `e = exp(-|x|)`, `silu(x) = x * (x >= 0 ? 1 : e) / (1 + e)`.
///
/// `exp(t)`, `t = -|x|`: `n = round(t log2 e)`, `r = t - n ln 2` (Cody-Waite, `|r| <= ln2/2`),
/// `exp(r)` by its degree-7 Taylor polynomial (Horner, FMA), scaled by `2^n` from the exponent
/// bits. Error bound, measured by tests/test_gemm.cpp against a double-precision SiLU over
/// every float in `[-90, 90]` (AVX2): relative error at most 2.3e-7 (about 4 ulp) wherever
/// `x >= -87` and `silu(x)` is a normal float (the tests require below 1e-6); one subnormal ulp
/// where it is subnormal (`|x| < 2.4e-38`); for `x < -87` the result is `-0` while the true
/// value has magnitude below `87 * exp(-87) < 1.5e-36`. `+inf` gives `+inf`, `-inf` and NaN
/// give NaN, like `Silu::apply`.
template <class V>
MOET_ALWAYS_INLINE typename V::Reg silu(typename V::Reg x) {
  using Reg = typename V::Reg;
  namespace c = exp_constants;
  const Reg t = V::neg_abs(x);                    // -|x| <= 0
  const Reg tc = V::max(t, V::set1(c::kMinArg));  // keeps 2^n normal
  const Reg n = V::round(V::mul(tc, V::set1(c::kLog2e)));
  Reg r = V::fma(n, V::set1(-c::kLn2Hi), tc);  // exact
  r = V::fma(n, V::set1(-c::kLn2Lo), r);
  Reg p = V::set1(c::kC7);
  p = V::fma(p, r, V::set1(c::kC6));
  p = V::fma(p, r, V::set1(c::kC5));
  p = V::fma(p, r, V::set1(c::kC4));
  p = V::fma(p, r, V::set1(c::kC3));
  p = V::fma(p, r, V::set1(c::kC2));
  p = V::fma(p, r, V::set1(1.0f));
  p = V::fma(p, r, V::set1(1.0f));                                      // exp(r)
  const Reg e = V::zero_if_less(t, c::kMinArg, V::mul(p, V::pow2(n)));  // exp(-|x|)
  const Reg one = V::set1(1.0f);
  const Reg numerator = V::select_negative(x, e, one);
  return V::div(V::mul(x, numerator), V::add(one, e));
}
#endif

/// Writes `silu(in[i])` to `out[i]` for `i < n` with the kernels' SiLU: the vectorised `silu`
/// above on SIMD builds (the tail through a padded vector), `Silu::apply` otherwise. `in` and
/// `out` may be the same array.
inline void silu_array(const float* in, float* out, Index n) {
#if MOET_SIMD_AVX512 || MOET_SIMD_AVX2
  using V = NativeVec;
  constexpr Index kW = V::kWidth;
  Index i = 0;
  for (; i + kW <= n; i += kW) V::store(out + i, silu<V>(V::load(in + i)));
  if (i < n) {
    float tail[V::kWidth] = {};
    for (Index j = i; j < n; ++j) tail[j - i] = in[j];
    V::store(tail, silu<V>(V::load(tail)));
    for (Index j = i; j < n; ++j) out[j] = tail[j - i];
  }
#else
  for (Index i = 0; i < n; ++i) out[i] = Silu::apply(in[i]);
#endif
}

}  // namespace MOET_SIMD_NAMESPACE
}  // namespace moet::detail
