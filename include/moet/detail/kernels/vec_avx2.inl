// Included once, by detail/gemm.hpp, inside its AVX2 target region.
/// \file detail/kernels/vec_avx2.inl
/// The registers of the AVX2 + FMA kernel level (`KernelIsa::kAvx2`): one `__m256` holds 8
/// floats. Included by detail/gemm.hpp inside a `target("avx2,fma")` region only.

// (Every header it needs is included by detail/gemm.hpp before the target region.)

namespace moet::detail::isa_avx2 {

/// AVX2 + FMA: 8 floats per register.
struct Vec {
  using Reg = __m256;
  static constexpr int kWidth = 8;
  static constexpr bool kVectorSilu = true;
  static constexpr bool kDotBf16 = false;
  static constexpr bool kDotI8 = false;

  static MOET_ALWAYS_INLINE Reg zero() { return _mm256_setzero_ps(); }
  static MOET_ALWAYS_INLINE Reg set1(float v) { return _mm256_set1_ps(v); }
  static MOET_ALWAYS_INLINE Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static MOET_ALWAYS_INLINE void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static MOET_ALWAYS_INLINE Reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  /// `a * b + c` with one rounding.
  static MOET_ALWAYS_INLINE Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static MOET_ALWAYS_INLINE Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static MOET_ALWAYS_INLINE Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static MOET_ALWAYS_INLINE Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static MOET_ALWAYS_INLINE Reg div(Reg a, Reg b) { return _mm256_div_ps(a, b); }
  /// Correctly rounded square root (IEEE, like `std::sqrt`; no `errno`).
  static MOET_ALWAYS_INLINE Reg sqrt(Reg a) { return _mm256_sqrt_ps(a); }
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
  /// The 8 bf16 pairs at `p` as floats: `even` = first elements, `odd` = second elements.
  static MOET_ALWAYS_INLINE void bf16_pairs(const Bf16* p, Reg& even, Reg& odd) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    odd = _mm256_castsi256_ps(
        _mm256_and_si256(w, _mm256_set1_epi32(static_cast<std::int32_t>(0xffff0000U))));
  }
  /// `out[i] = to_bf16(p[i])` for the 8 floats at `p`, bit for bit.
  static MOET_ALWAYS_INLINE void to_bf16(const float* p, Bf16* out) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    // Signed compare: the magnitude bits are a non-negative int32.
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
    const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
    const __m256i bits = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
    // Each lane holds 0 .. 0xffff: unsigned saturation keeps it.
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(out),
        _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
  }
};

/// Blocking of the AVX2 level: 6 x 16 float tiles (12 accumulators, 2 of B, 1 broadcast of 16
/// ymm registers; 12 independent FMA chains cover the 4-cycle latency of two FMA pipes); bf16
/// tiles of 4 rows (8 accumulators, 4 split B registers, 2 broadcasts).
struct Traits {
  using V = Vec;
  static constexpr Index kNr = 2 * Vec::kWidth;
  template <class W>
  static constexpr int kMr = std::is_same_v<W, Bf16> ? 4 : 6;
  template <class W>
  static constexpr int few_row_panels(int m) {
    if constexpr (std::is_same_v<W, Bf16>) {
      return m == 1 ? 2 : 1;
    } else {
      return m == 1 ? 4 : m == 2 ? 3 : m == 3 ? 2 : 1;  // <= 12 accumulators
    }
  }
};

}  // namespace moet::detail::isa_avx2
