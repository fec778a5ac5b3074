// No include guard: included once per AVX2 level, in that level's namespace.
/// \file detail/kernels/vec_avx2.inl
/// The registers of the AVX2 + FMA kernel levels (`KernelIsa::kAvx2`, and `kAvx2Vnni`, which
/// adds AVX-VNNI's 256-bit `vpdpbusd` for block-quantised weights): one `__m256` holds 8
/// floats. Included by kernels/level.inl inside `target("avx2,fma,...")` regions only;
/// `MOET_KERNEL_I8_DOT` selects the 8-bit dot product of the level: 1 for `kAvx2Vnni`
/// (`vpdpbusd`), 2 for `kAvx2` (`vpmaddubsw` + `vpmaddwd`, exact while each pair of byte
/// products fits int16; see `dot_u8s8` and `dot_signed`).

// (Every header it needs is included by detail/gemm.hpp before the target region.)

namespace moet::detail::MOET_KERNEL_NS {

/// AVX2 + FMA: 8 floats per register.
struct Vec {
  using Reg = __m256;
  static constexpr int kWidth = 8;
  static constexpr bool kVectorSilu = true;
  static constexpr bool kDotBf16 = false;
  static constexpr bool kDotI8 = MOET_KERNEL_I8_DOT != 0;
  /// The 8-bit dot product is `vpmaddubsw` + `vpmaddwd` (no VNNI): 8-bit codes run signed
  /// (`dot_signed`), since an unsigned code times an activation can overflow int16 in pairs.
  static constexpr bool kDotI8Madd = MOET_KERNEL_I8_DOT == 2;

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
#if MOET_KERNEL_I8_DOT
  /// One block of 32 floats at `x` quantised as `pack_quantized_row_groups` does, bit for bit:
  /// codes `q[i] = round(x[i] / d)` (half away from zero) with `d = max|x| / 127` (NaN ignored
  /// in the maximum, as `std::max` ignores a NaN second argument); returns `d` and sets `sum`.
  static MOET_ALWAYS_INLINE float quantize_block(const float* x, std::int8_t* q,
                                                 std::int32_t& sum) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    Reg v[4];
    // max(|x|, acc) keeps acc where |x| is NaN (the second operand is returned).
    Reg amax = zero();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      amax = max(_mm256_and_ps(v[i], abs_mask), amax);
    }
    // The largest lane (no NaN lanes left).
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    __m256i c[4];
    __m256i total = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      const Reg s = _mm256_mul_ps(v[i], _mm256_set1_ps(id));
      const Reg t = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      // |s - t| >= 1/2 (exact: |s| < 2^23): one step away from zero.
      const Reg away =
          _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(s, t), abs_mask), set1(0.5f), _CMP_GE_OQ);
      const Reg step = _mm256_or_ps(_mm256_andnot_ps(abs_mask, s), set1(1.0f));  // copysign(1, s)
      c[i] = _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(away, step)));
      total = _mm256_add_epi32(total, c[i]);
    }
    // int32 -> int8 (every code is in [-127, 127]: no saturation); the packs interleave the
    // 128-bit halves, the permutation restores the order.
    const __m256i bytes =
        _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(q),
        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    sum = _mm_cvtsi128_si32(s4);
    return d;
  }

  /// 8 int32 lanes (the integer kernels of the block formats).
  using IReg = __m256i;
  static MOET_ALWAYS_INLINE IReg izero() { return _mm256_setzero_si256(); }
  static MOET_ALWAYS_INLINE IReg iset1(std::int32_t v) { return _mm256_set1_epi32(v); }
  static MOET_ALWAYS_INLINE IReg isub(IReg a, IReg b) { return _mm256_sub_epi32(a, b); }
  static MOET_ALWAYS_INLINE Reg to_float(IReg v) { return _mm256_cvtepi32_ps(v); }
  /// 32 bytes at `p`.
  static MOET_ALWAYS_INLINE IReg load_bytes(const std::uint8_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  /// The 32-bit word at `p` (4 signed codes) in every lane.
  static MOET_ALWAYS_INLINE IReg broadcast_word(const std::int8_t* p) {
    std::int32_t word = 0;
    std::memcpy(&word, p, sizeof word);
    return _mm256_set1_epi32(word);
  }
#if MOET_KERNEL_I8_DOT == 1
  /// Per lane, `acc + sum_i u[i] s[i]` over its 4 bytes: unsigned `u`, signed `s` (exact).
  static MOET_ALWAYS_INLINE IReg dot_u8s8(IReg acc, IReg u, IReg s) {
    return _mm256_dpbusd_avx_epi32(acc, u, s);
  }
#else
  /// Per lane, `acc + sum_i u[i] s[i]` over its 4 bytes: unsigned `u`, signed `s`, exact when
  /// every pair sum `u[2i] s[2i] + u[2i+1] s[2i+1]` fits int16 (`vpmaddubsw` saturates it):
  /// `u <= 128` with `s` in `[-127, 127]` (4-bit codes, `dot_signed`'s magnitudes).
  static MOET_ALWAYS_INLINE IReg dot_u8s8(IReg acc, IReg u, IReg s) {
    return _mm256_add_epi32(acc, widen_pairs(pair_sums(u, s)));
  }
  /// The 16 int16 pair sums `u[2i] s[2i] + u[2i+1] s[2i+1]` (saturating: see `dot_u8s8`).
  static MOET_ALWAYS_INLINE IReg pair_sums(IReg u, IReg s) { return _mm256_maddubs_epi16(u, s); }
  /// Lanewise int16 sum (wrapping: the caller bounds it).
  static MOET_ALWAYS_INLINE IReg add_pairs(IReg a, IReg b) { return _mm256_add_epi16(a, b); }
  /// Per 32-bit lane, the sum of its two int16 halves, exactly.
  static MOET_ALWAYS_INLINE IReg widen_pairs(IReg p) {
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
  }
  /// The stored 8-bit codes `q + 128` as the signed values `q` (flips each byte's top bit).
  static MOET_ALWAYS_INLINE IReg signed_codes(IReg codes) {
    return _mm256_xor_si256(codes, _mm256_set1_epi8(static_cast<char>(0x80)));
  }
  /// `|w|` of signed bytes, read as unsigned (`-128` gives `0x80`, which is 128).
  static MOET_ALWAYS_INLINE IReg abs_bytes(IReg w) { return _mm256_sign_epi8(w, w); }
  /// Per lane, `acc + sum_i w[i] x[i]` over its 4 bytes of signed `w` (`w_abs = abs_bytes(w)`)
  /// and signed `x` in `[-127, 127]` (the quantised activations), exact: as
  /// `|w[i]| (sign(w[i]) x[i])`, each pair at most `2 * 128 * 127 = 32512` in magnitude.
  static MOET_ALWAYS_INLINE IReg dot_signed(IReg acc, IReg w_abs, IReg w, IReg x) {
    return dot_u8s8(acc, w_abs, _mm256_sign_epi8(x, w));
  }
#endif
  /// The low and high nibble of every byte, as bytes.
  static MOET_ALWAYS_INLINE IReg low_nibbles(IReg v) {
    return _mm256_and_si256(v, _mm256_set1_epi32(0x0f0f0f0f));
  }
  static MOET_ALWAYS_INLINE IReg high_nibbles(IReg v) {
    return _mm256_and_si256(_mm256_srli_epi32(v, 4), _mm256_set1_epi32(0x0f0f0f0f));
  }
  /// 8 half floats at `p` as floats.
  static MOET_ALWAYS_INLINE Reg load_halves(const std::uint8_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
#endif
};

/// Blocking of the AVX2 levels: 6 x 16 float tiles (12 accumulators, 2 of B, 1 broadcast of 16
/// ymm registers; 12 independent FMA chains cover the 4-cycle latency of two FMA pipes); bf16
/// tiles of 4 rows (8 accumulators, 4 split B registers, 2 broadcasts); the integer kernels of
/// the block formats 4 x 16 tiles (8 int32 sums live through a block, 2 registers of codes and
/// 1 broadcast, 4 more for the nibbles of the 4-bit formats or, on `kAvx2`, for the signed
/// 8-bit codes and their magnitudes; the 8 float accumulators are touched once per block of 32
/// rows). Few-row calls take 2 panels of `Q8_0` (up to 2 rows with `vpdpbusd`, 1 row with
/// `vpmaddubsw`, whose signed codes take twice the registers), 1 of the 4-bit formats (one
/// sequential stream, as on the AVX-512 levels).
struct Traits {
  using V = Vec;
  static constexpr Index kNr = 2 * Vec::kWidth;
  template <class W>
  static constexpr int kMr = std::is_same_v<W, Bf16> ? 4
                             : kIsQuantized<W>       ? 4
                                                     : 6;
  /// Rows and panels per tile of calls with several row groups: the same tiles.
  template <class W>
  static constexpr int kManyMr = kMr<W>;
  template <class W>
  static constexpr int kManyPanels = 1;
  template <class W>
  static constexpr int few_row_panels(int m) {
    if constexpr (std::is_same_v<W, Q4_0> || std::is_same_v<W, Q4_1>) {
      return 1;
    } else if constexpr (kIsQuantized<W>) {
      // Two panels for one or two rows with VNNI; one without it (vpmaddubsw + vpmaddwd): decode
      // (S2 top-2 q8_0, T = 1, Zen 5, 4 rounds alternated) avx2 0.85-0.92 -> 0.50-0.66 ms with one
      // panel; with VNNI one and two panels time the same within noise.
      return !Vec::kDotI8Madd && m <= 2 ? 2 : 1;
    } else if constexpr (std::is_same_v<W, Bf16>) {
      return m == 1 ? 2 : 1;
    } else {
      return m == 1 ? 4 : m == 2 ? 3 : m == 3 ? 2 : 1;  // <= 12 accumulators
    }
  }
};

}  // namespace moet::detail::MOET_KERNEL_NS
