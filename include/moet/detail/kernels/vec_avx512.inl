// No include guard: included once per AVX-512 level, in that level's namespace.
/// \file detail/kernels/vec_avx512.inl
/// The registers of the AVX-512 kernel levels (`KernelIsa::kAvx512`, whose 8-bit dot product
/// is `vpmaddubsw` + `vpmaddwd`; `kAvx512Vnni`, which adds `vpdpbusd` for block-quantised weights;
/// `kAvx512Bf16`, which adds `vdpbf16ps` for bf16 weights too): one `__m512` holds 16 floats.
/// Included by kernels/level.inl inside `target("avx512f,...")` regions only; `MOET_KERNEL_I8_DOT`
/// and `MOET_KERNEL_BF16_DOT` select the level.

// (Every header it needs is included by detail/gemm.hpp before the target region.)

namespace moet::detail::MOET_KERNEL_NS {

/// AVX-512: 16 floats per register.
struct Vec {
  using Reg = __m512;
  static constexpr int kWidth = 16;
  static constexpr bool kVectorSilu = true;
  /// `vdpbf16ps` for bf16 weights and `vpdpbusd` for block-quantised ones (the top level).
  static constexpr bool kDotBf16 = MOET_KERNEL_BF16_DOT;
  static constexpr bool kDotI8 = MOET_KERNEL_I8_DOT != 0;
  /// `kAvx512` (no VNNI): the 8-bit dot product is `vpmaddubsw` + `vpmaddwd` as on `kAvx2`,
  /// 8-bit codes signed (`dot_signed`); the VNNI levels use `vpdpbusd`.
  static constexpr bool kDotI8Madd = MOET_KERNEL_I8_DOT == 2;
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
  static MOET_ALWAYS_INLINE Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static MOET_ALWAYS_INLINE Reg div(Reg a, Reg b) { return _mm512_div_ps(a, b); }
  /// Correctly rounded square root (IEEE, like `std::sqrt`; no `errno`).
  static MOET_ALWAYS_INLINE Reg sqrt(Reg a) { return _mm512_maskz_sqrt_ps(kAll, a); }
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
  /// The 16 bf16 pairs at `p` as floats: `even` = first elements, `odd` = second elements.
  static MOET_ALWAYS_INLINE void bf16_pairs(const Bf16* p, Reg& even, Reg& odd) {
    const __m512i w = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, w, 16));
    odd = _mm512_castsi512_ps(
        _mm512_and_si512(w, _mm512_set1_epi32(static_cast<std::int32_t>(0xffff0000U))));
  }
  /// `out[i] = to_bf16(p[i])` for the 16 floats at `p`, bit for bit (integer arithmetic, not
  /// `vcvtneps2bf16`, which flushes subnormal inputs to zero).
  static MOET_ALWAYS_INLINE void to_bf16(const float* p, Bf16* out) {
    const __m512i u = _mm512_loadu_si512(p);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    const __m512i lsb =
        _mm512_and_si512(_mm512_maskz_srli_epi32(kAll, u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    const __m512i quiet = _mm512_or_si512(u, _mm512_set1_epi32(0x00400000));
    const __m512i bits =
        _mm512_maskz_srli_epi32(kAll, _mm512_mask_blend_epi32(nan, rounded, quiet), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_maskz_cvtepi32_epi16(kAll, bits));
  }
  /// One block of 32 floats at `x` quantised as `pack_quantized_row_groups` does, bit for bit:
  /// codes `q[i] = round(x[i] / d)` (half away from zero) with `d = max|x| / 127` (NaN ignored
  /// in the maximum, as `std::max` ignores a NaN second argument); returns `d` and sets `sum`.
  static MOET_ALWAYS_INLINE float quantize_block(const float* x, std::int8_t* q,
                                                 std::int32_t& sum) {
    const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff);
    const __m512 lo = _mm512_loadu_ps(x);
    const __m512 hi = _mm512_loadu_ps(x + 16);
    const auto magnitude = [&](__m512 v) MOET_LAMBDA_INLINE {
      return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_bits));
    };
    // max(|x|, acc) keeps acc where |x| is NaN (the second operand is returned).
    const __m512 amax = max(magnitude(hi), max(magnitude(lo), zero()));
    const float d = hmax(amax) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const auto codes = [&](__m512 v) MOET_LAMBDA_INLINE {
      const __m512 s = _mm512_mul_ps(v, _mm512_set1_ps(id));
      const __m512 t = trunc(s);
      // |s - t| >= 1/2 (exact: |s| < 2^23): one step away from zero.
      const __mmask16 away =
          _mm512_cmp_ps_mask(magnitude(_mm512_sub_ps(s, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
      const __m512i sign = _mm512_and_si512(_mm512_castps_si512(s), _mm512_set1_epi32(INT32_MIN));
      const __m512 step =
          _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_castps_si512(_mm512_set1_ps(1.0f))));
      return _mm512_maskz_cvttps_epi32(kAll, _mm512_mask_add_ps(t, away, t, step));
    };
    const __m512i c_lo = codes(lo);
    const __m512i c_hi = codes(hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_maskz_cvtepi32_epi8(kAll, c_lo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_maskz_cvtepi32_epi8(kAll, c_hi));
    sum = hsum(_mm512_add_epi32(c_lo, c_hi));
    return d;
  }
  /// The largest lane of `x` (no NaN lanes), and the sum of `v`'s lanes (the `_mm512_reduce_*`
  /// helpers of GCC 12 trip `-Wmaybe-uninitialized`).
  static MOET_ALWAYS_INLINE float hmax(Reg x) {
    x = max(x, _mm512_maskz_shuffle_f32x4(kAll, x, x, 0x4E));  // swap 256-bit halves
    x = max(x, _mm512_maskz_shuffle_f32x4(kAll, x, x, 0xB1));  // swap 128-bit quarters
    x = max(x, _mm512_maskz_permute_ps(kAll, x, 0x4E));        // swap 64-bit pairs
    x = max(x, _mm512_maskz_permute_ps(kAll, x, 0xB1));        // swap neighbours
    return _mm512_cvtss_f32(x);
  }
  static MOET_ALWAYS_INLINE std::int32_t hsum(__m512i v) {
    v = _mm512_add_epi32(v, _mm512_maskz_shuffle_i32x4(kAll, v, v, 0x4E));
    v = _mm512_add_epi32(v, _mm512_maskz_shuffle_i32x4(kAll, v, v, 0xB1));
    v = _mm512_add_epi32(v, _mm512_maskz_shuffle_epi32(kAll, v, _MM_PERM_BADC));
    v = _mm512_add_epi32(v, _mm512_maskz_shuffle_epi32(kAll, v, _MM_PERM_CDAB));
    return _mm_cvtsi128_si32(_mm512_maskz_extracti32x4_epi32(0xF, v, 0));
  }
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-conversion"  // GCC 12's -O0 macro casts the mask to short
  static MOET_ALWAYS_INLINE Reg trunc(Reg x) {
    return _mm512_maskz_roundscale_ps(kAll, x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  }
#pragma GCC diagnostic pop
#if MOET_KERNEL_BF16_DOT
  /// The 16 bf16 pairs at `p`, as `vdpbf16ps` takes them.
  using PairReg = __m512bh;
  static MOET_ALWAYS_INLINE PairReg load_pairs(const Bf16* p) {
    return __builtin_bit_cast(__m512bh, _mm512_loadu_si512(p));
  }
  /// Broadcasts the 32-bit pair at `p` (two bf16) to every lane.
  static MOET_ALWAYS_INLINE PairReg broadcast_pair(const Bf16* p) {
    std::int32_t pair = 0;
    std::memcpy(&pair, p, sizeof pair);
    return __builtin_bit_cast(__m512bh, _mm512_set1_epi32(pair));
  }
  /// `acc + a.hi b.hi + a.lo b.lo` per lane (exact products, the hardware's sum rounding).
  static MOET_ALWAYS_INLINE Reg dot_pairs(Reg acc, PairReg a, PairReg b) {
    return _mm512_dpbf16_ps(acc, a, b);
  }
#endif
#if MOET_KERNEL_I8_DOT
  /// 16 int32 lanes (the integer kernels of the block formats).
  using IReg = __m512i;
  static MOET_ALWAYS_INLINE IReg izero() { return _mm512_setzero_si512(); }
  static MOET_ALWAYS_INLINE IReg iset1(std::int32_t v) { return _mm512_set1_epi32(v); }
  static MOET_ALWAYS_INLINE IReg isub(IReg a, IReg b) { return _mm512_sub_epi32(a, b); }
  static MOET_ALWAYS_INLINE Reg to_float(IReg v) { return _mm512_maskz_cvtepi32_ps(kAll, v); }
  /// 64 bytes at `p`.
  static MOET_ALWAYS_INLINE IReg load_bytes(const std::uint8_t* p) { return _mm512_loadu_si512(p); }
  /// The 32-bit word at `p` (4 signed codes) in every lane.
  static MOET_ALWAYS_INLINE IReg broadcast_word(const std::int8_t* p) {
    std::int32_t word = 0;
    std::memcpy(&word, p, sizeof word);
    return _mm512_set1_epi32(word);
  }
#if MOET_KERNEL_I8_DOT == 1
  /// Per lane, `acc + sum_i u[i] s[i]` over its 4 bytes: unsigned `u`, signed `s` (exact).
  static MOET_ALWAYS_INLINE IReg dot_u8s8(IReg acc, IReg u, IReg s) {
    return _mm512_dpbusd_epi32(acc, u, s);
  }
#else
  /// Per lane, `acc + sum_i u[i] s[i]` over its 4 bytes: unsigned `u`, signed `s`, exact when
  /// every pair sum `u[2i] s[2i] + u[2i+1] s[2i+1]` fits int16 (`vpmaddubsw` saturates it):
  /// `u <= 128` with `s` in `[-127, 127]` (4-bit codes, `dot_signed`'s magnitudes).
  static MOET_ALWAYS_INLINE IReg dot_u8s8(IReg acc, IReg u, IReg s) {
    return _mm512_add_epi32(acc, widen_pairs(pair_sums(u, s)));
  }
  /// The 32 int16 pair sums `u[2i] s[2i] + u[2i+1] s[2i+1]` (saturating: see `dot_u8s8`).
  static MOET_ALWAYS_INLINE IReg pair_sums(IReg u, IReg s) { return _mm512_maddubs_epi16(u, s); }
  /// Lanewise int16 sum (wrapping: the caller bounds it).
  static MOET_ALWAYS_INLINE IReg add_pairs(IReg a, IReg b) { return _mm512_add_epi16(a, b); }
  /// Per 32-bit lane, the sum of its two int16 halves, exactly.
  static MOET_ALWAYS_INLINE IReg widen_pairs(IReg p) {
    return _mm512_madd_epi16(p, _mm512_set1_epi16(1));
  }
  /// The stored 8-bit codes `q + 128` as the signed values `q` (flips each byte's top bit).
  static MOET_ALWAYS_INLINE IReg signed_codes(IReg codes) {
    return _mm512_xor_si512(codes, _mm512_set1_epi8(static_cast<char>(0x80)));
  }
  /// `|w|` of signed bytes, read as unsigned (`-128` gives `0x80`, which is 128).
  static MOET_ALWAYS_INLINE IReg abs_bytes(IReg w) { return _mm512_abs_epi8(w); }
  /// Per lane, `acc + sum_i w[i] x[i]` over its 4 bytes of signed `w` (`w_abs = abs_bytes(w)`)
  /// and signed `x` in `[-127, 127]` (the quantised activations), exact: as
  /// `|w[i]| (sign(w[i]) x[i])`, each pair at most `2 * 128 * 127 = 32512` in magnitude.
  /// AVX-512 has no `vpsignb`: `x` is negated (`0 - x`, exact in `[-127, 127]`) where `w` is
  /// negative; where `w` is 0, `|w|` makes the product 0 whatever `x` holds.
  static MOET_ALWAYS_INLINE IReg dot_signed(IReg acc, IReg w_abs, IReg w, IReg x) {
    const IReg x_signed =
        _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
    return dot_u8s8(acc, w_abs, x_signed);
  }
#endif
  /// The low and high nibble of every byte, as bytes.
  static MOET_ALWAYS_INLINE IReg low_nibbles(IReg v) {
    return _mm512_and_si512(v, _mm512_set1_epi32(0x0f0f0f0f));
  }
  static MOET_ALWAYS_INLINE IReg high_nibbles(IReg v) {
    return _mm512_and_si512(_mm512_maskz_srli_epi32(kAll, v, 4), _mm512_set1_epi32(0x0f0f0f0f));
  }
  /// 16 half floats at `p` as floats.
  static MOET_ALWAYS_INLINE Reg load_halves(const std::uint8_t* p) {
    return _mm512_maskz_cvtph_ps(kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
#endif
};

/// Blocking of the AVX-512 levels: float calls of several row groups take 6 x 64 tiles (two
/// panels: 24 accumulators of 32 zmm registers, 4 of B, 1 broadcast), other float calls and
/// `vdpbf16ps` 8 x 32 tiles (16 accumulators); with bf16 pairs split in registers, 8 rows take 16
/// accumulators, 4 split B registers and 2 broadcasts; the integer kernels take 6 x 32 tiles (24
/// accumulators, 4 registers of codes, 2 of scales). One- and two-row calls (decode) of the
/// 4-bit formats run one panel per call (q8_0 two): a 4-bit panel is short (32 columns x 1024
/// rows: 18 KiB), and two read side by side are two streams of which the second starts cold at
/// every call; one panel at a time reads the weights as one sequential stream. Decode is bound by
/// those bytes, not by the dot products (S2 q4_0 at T = 1 runs 5x faster from L3 than from
/// DRAM). Measured at T = 1 (S2, 2 threads, caches flushed, q8_0 in the same run as control):
/// q4_0 time / q8_0 time 0.74 -> 0.65 for top-2, 0.74 -> 0.72 for top-1; one panel per call for
/// q8_0 measured slower.
struct Traits {
  using V = Vec;
  static constexpr Index kNr = 2 * Vec::kWidth;
  /// Rows per tile: 8; 6 for the integer kernels of the block formats (per row two float and
  /// two int32 accumulators per panel).
  template <class W>
  static constexpr int kMr = kIsQuantized<W> ? 6 : 8;
  /// Rows and panels per tile of calls with several row groups (`n > kGemmFewRows`): 6 x 64
  /// for float, 10 loads per 24 FMAs where 8 x 32 issues 10 per 16 (measured on a Xeon with
  /// AVX512-BF16, one core, S2: the float products at 128 and 512 rows 1.09-1.26x faster, medians
  /// of 6 runs side by side with the 8 x 32 build). The other types keep their `kMr x 32`
  /// tiles: one `vdpbf16ps` takes the issue time of four FMAs there, so loads do not set its
  /// speed (0.94-1.05x with 6 x 64); the split-pair bf16 and integer kernels have no registers
  /// left for a second panel.
  template <class W>
  static constexpr int kManyMr = std::is_same_v<W, float> ? 6 : kMr<W>;
  template <class W>
  static constexpr int kManyPanels = std::is_same_v<W, float> ? 2 : 1;
  template <class W>
  static constexpr int few_row_panels(int m) {
    if constexpr (std::is_same_v<W, Q4_0> || std::is_same_v<W, Q4_1>) {
      return 1;
    } else if constexpr (kIsQuantized<W>) {
      // Two panels for one or two rows with VNNI; one without it (vpmaddubsw + vpmaddwd): decode
      // (S2 top-2 q8_0, T = 1, Zen 5, 4 rounds alternated) avx512 0.63-0.82 -> 0.61-0.68 ms with
      // one panel; with VNNI one and two panels time the same within noise.
      return !Vec::kDotI8Madd && m <= 2 ? 2 : 1;
    } else if constexpr (std::is_same_v<W, Bf16> && !Vec::kDotBf16) {
      return m == 1 ? 4 : m == 2 ? 3 : m <= 4 ? 2 : 1;  // accumulators + 4 P split registers
    } else {
      return m == 1 ? 4 : m == 2 ? 4 : m <= 4 ? 2 : 1;  // <= 16 accumulators
    }
  }
};

}  // namespace moet::detail::MOET_KERNEL_NS
