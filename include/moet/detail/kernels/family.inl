// No include guard: included once per kernel level (by detail/gemm.hpp for the portable one,
// by kernels/level.inl for the x86 ones), inside that level's namespace and target region,
// after the level's `Vec` and `Traits`.
/// \file detail/kernels/family.inl
/// One kernel level's packed products: the micro-kernels (register tiles over `Traits::V`),
/// the blocked driver, and the entry points detail/gemm.hpp dispatches to.
///
/// The micro-kernel contract (every level): for `r < M`, `c < P nr`,
/// ```
/// acc(r, c) = c_in ? c_in[r ldc_in + c] : 0
/// float:  for k in [0, kc):      acc(r, c) = fma(a[k M + r], B(k, c), acc(r, c))
/// bf16:   for k in [0, kc) by 2: acc(r, c) += a(r, k + 1) B(k + 1, c) + a(r, k) B(k, c)
/// ```
/// with `B(k, c)` the element `panel_offset(k, c % nr)` of panel `c / nr` (panels `b_stride`
/// elements apart, `b` already offset to the first row of the K block) and, for bf16,
/// `a(r, k)` element `k M + 2 r + k % 2` of the packed row group (`[k / 2][M][2]`; `kc` even;
/// float rows `[k][M]`, element `k M + r`, where `kFloatRowsForBf16`).
/// `fma` rounds once on the x86 levels and twice (multiply, add) on the portable one; the bf16
/// pair sum is one `vdpbf16ps` (exact products, the hardware's rounding) on `kAvx512Bf16` and
/// two multiply-adds, odd row first, elsewhere. Then the epilogue writes `out` (row stride
/// `ldo`): raw, or `Act(gate) * up` for the fused GLU. `c_in` may equal `out` (every accumulator
/// is loaded before any store). The kernels prefetch, at each step and for each panel, the
/// lines `pf_offset` elements past the current step into L2 (the weights needed next: every
/// line the step reads) and the line 1 KiB past it into L1; prefetches never fault, so the
/// targets may lie past the end.

using V = Traits::V;
using Reg = typename V::Reg;
/// The accumulator tile of an `M x P`-panel micro-kernel: two registers per panel and row.
template <int M, int P>
using Tile = Reg[static_cast<std::size_t>(M)][static_cast<std::size_t>(2 * P)];

#include "moet/detail/kernels/row_pack.inl"
#include "moet/detail/kernels/elementwise.inl"

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

/// Vectorised SiLU, `silu(x) = x * sigmoid(x)`, evaluated like `Silu::sigmoid` (no overflow for
/// either sign): with `e = exp(-|x|)`, `silu(x) = x * (x >= 0 ? 1 : e) / (1 + e)`.
///
/// `exp(t)`, `t = -|x|`: `n = round(t log2 e)`, `r = t - n ln 2` (Cody-Waite, `|r| <= ln2/2`),
/// `exp(r)` by its degree-7 Taylor polynomial (Horner, FMA), scaled by `2^n` from the exponent
/// bits. Error bound, measured by tests/test_gemm.cpp against a double-precision SiLU: relative
/// error at most 2.3e-7 (about 4 ulp) wherever `x >= -87` and `silu(x)` is a normal float (the
/// tests require below 1e-6); one subnormal ulp where it is subnormal; for `x < -87` the result
/// is `-0` while the true value has magnitude below `87 * exp(-87) < 1.5e-36`. `+inf` gives
/// `+inf`, `-inf` and NaN give NaN, like `Silu::apply`.
template <class Vv = V>
MOET_ALWAYS_INLINE typename Vv::Reg silu(typename Vv::Reg x) {
  // (Vv is a dependent name: only levels with a vectorised SiLU instantiate this.)
  using R = typename Vv::Reg;
  namespace c = exp_constants;
  const R t = Vv::neg_abs(x);                    // -|x| <= 0
  const R tc = Vv::max(t, Vv::set1(c::kMinArg));  // keeps 2^n normal
  const R n = Vv::round(Vv::mul(tc, Vv::set1(c::kLog2e)));
  R r = Vv::fma(n, Vv::set1(-c::kLn2Hi), tc);  // exact
  r = Vv::fma(n, Vv::set1(-c::kLn2Lo), r);
  R p = Vv::set1(c::kC7);
  p = Vv::fma(p, r, Vv::set1(c::kC6));
  p = Vv::fma(p, r, Vv::set1(c::kC5));
  p = Vv::fma(p, r, Vv::set1(c::kC4));
  p = Vv::fma(p, r, Vv::set1(c::kC3));
  p = Vv::fma(p, r, Vv::set1(c::kC2));
  p = Vv::fma(p, r, Vv::set1(1.0f));
  p = Vv::fma(p, r, Vv::set1(1.0f));                                      // exp(r)
  const R e = Vv::zero_if_less(t, c::kMinArg, Vv::mul(p, Vv::pow2(n)));  // exp(-|x|)
  const R one = Vv::set1(1.0f);
  const R numerator = Vv::select_negative(x, e, one);
  return Vv::div(Vv::mul(x, numerator), Vv::add(one, e));
}

/// `out[i] = silu(in[i])` for `i < n` with this level's SiLU (`in` and `out` may be the same;
/// `Silu::apply` lane by lane on levels without a vectorised one).
template <class Vv = V>
void silu_array(const float* in, float* out, Index n) {
  if constexpr (Vv::kVectorSilu) {
    constexpr Index kW = V::kWidth;
    Index i = 0;
    for (; i + kW <= n; i += kW) V::store(out + i, silu<Vv>(V::load(in + i)));
    if (i < n) {
      float tail[V::kWidth] = {};
      for (Index j = i; j < n; ++j) tail[j - i] = in[j];
      V::store(tail, silu<Vv>(V::load(tail)));
      for (Index j = i; j < n; ++j) out[j] = tail[j - i];
    }
  } else {
    for (Index i = 0; i < n; ++i) out[i] = Silu::apply(in[i]);
  }
}

/// Loads the `M x 2P` accumulator registers from `c_in` (or zeroes them).
template <int M, int P>
MOET_ALWAYS_INLINE void load_tile(Tile<M, P>& acc, const float* c_in, Index ldc_in) {
  static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
    static_for<2 * P>([&](auto q) MOET_LAMBDA_INLINE {
      acc[r][q] = c_in != nullptr ? V::load(c_in + r * ldc_in + q * V::kWidth) : V::zero();
    });
  });
}

/// `dst[i] = Act(g[i]) * u[i]` for the `V::kWidth` lanes of one gate and one up register.
template <class Act, class Vv = V>
MOET_ALWAYS_INLINE void store_glu(Reg g, Reg u, float* dst) {
  constexpr int kW = V::kWidth;
  if constexpr (Vv::kVectorSilu && std::is_same_v<Act, Silu>) {
    Vv::store(dst, Vv::mul(silu<Vv>(g), u));
  } else {
    // Any other activation (and the portable level): its scalar `apply`, lane by lane.
    alignas(kPackAlignBytes) float gs[static_cast<std::size_t>(kW)];
    alignas(kPackAlignBytes) float us[static_cast<std::size_t>(kW)];
    V::store(gs, g);
    V::store(us, u);
    for (int i = 0; i < kW; ++i) dst[i] = Act::template apply<float>(gs[i]) * us[i];
  }
}

/// The epilogue: stores `acc` (raw) or `Act(gate) * up` to `out`.
template <int M, int P, class Epi, class Vv = V>
MOET_ALWAYS_INLINE void store_tile(Tile<M, P>& acc, float* out, Index ldo) {
  constexpr int kW = V::kWidth;
  if constexpr (kIsGluEpilogue<Epi>) {
    static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
      static_for<P>([&](auto p) MOET_LAMBDA_INLINE {
        store_glu<typename Epi::Activation, Vv>(acc[r][2 * p], acc[r][2 * p + 1],
                                                out + r * ldo + p * kW);
      });
    });
  } else {
    static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
      static_for<2 * P>([&](auto q)
                            MOET_LAMBDA_INLINE { V::store(out + r * ldo + q * kW, acc[r][q]); });
    });
  }
}

/// The GLU epilogue of `store_tile` applied to `m` rows of `p` panels of raw accumulators stored
/// at `raw` (row stride `ld`): the same operations on the same values, so the same bits. The
/// integer kernels run with the raw epilogue only and apply this afterwards, so that each tile
/// shape is compiled once instead of once per activation (their compile time, not their speed,
/// is what the activations multiplied).
template <class Act, class Vv = V>
void store_glu_rows(const float* raw, Index ld, int m, int p, float* out, Index ldo) {
  constexpr int kW = V::kWidth;
  for (int r = 0; r < m; ++r) {
    for (int q = 0; q < p; ++q) {
      store_glu<Act, Vv>(V::load(raw + r * ld + 2 * q * kW),
                         V::load(raw + r * ld + (2 * q + 1) * kW), out + r * ldo + q * kW);
    }
  }
}

/// Prefetches, for each of the `P` panel streams, the step `pf_offset` elements ahead into L2
/// (far) and the line 1 KiB ahead into L1 (near). A step reads `kStepBytes` of a panel: two
/// cache lines of float or bf16 on the AVX-512 levels, 9 or 17 for a block of q4_0 or q8_0; the
/// far prefetch fetches every one of them. Few-row calls stream their weights from memory once,
/// and on the Intel Xeon VM the hardware prefetcher alone left part of each step's lines to
/// demand misses that did not overlap the arithmetic (README, "Decode prefetch"); many-row
/// calls lost nothing measurable.
template <Index kStepBytes, int P, class W>
MOET_ALWAYS_INLINE void prefetch_panels(const W* const (&bp)[static_cast<std::size_t>(P)],
                                        Index pf_offset) {
  constexpr Index kNear = kGemmNearPrefetch * static_cast<Index>(sizeof(float) / sizeof(W));
  constexpr Index kLine = 64 / static_cast<Index>(sizeof(W));  // elements per cache line
  constexpr int kLines = static_cast<int>((kStepBytes + 63) / 64);
  static_for<P>([&](auto p) MOET_LAMBDA_INLINE {
    static_for<kLines>([&](auto l) MOET_LAMBDA_INLINE {
      __builtin_prefetch(bp[p] + pf_offset + l * kLine, 0, 2);
    });
    __builtin_prefetch(bp[p] + kNear, 0, 3);
  });
}

/// The micro-kernel: an `M x P nr` tile over `kc` rows of `P` panels (see the file comment).
/// `A` is the element type of the packed rows: `W`, or float for bf16 weights on a level
/// without `vdpbf16ps` (`kFloatRowsForBf16`: the rows hold bf16-rounded values laid out
/// `[k][M]`, so each multiply-add's operand is one broadcast load instead of a scalar
/// conversion; the same values, so the same bits as bf16 rows).
template <int M, int P, class Epi, class W, class Vv = V, class A = W>
MOET_NOINLINE void micro_kernel(Index kc, const A* a, const W* b, Index b_stride, Index pf_offset,
                                const float* c_in, Index ldc_in, float* out, Index ldo) {
  constexpr int kW = V::kWidth;
  constexpr int kRegs = 2 * P;  // registers per row: two per panel
  static_assert(2 * kW == Traits::kNr, "a panel is two vector registers wide");

  constexpr auto kRegCount = static_cast<std::size_t>(kRegs);
  Tile<M, P> acc;
  load_tile<M, P>(acc, c_in, ldc_in);
  const W* bp[static_cast<std::size_t>(P)];
  static_for<P>([&](auto p) MOET_LAMBDA_INLINE { bp[p] = b + p * b_stride; });
  if constexpr (std::is_same_v<W, float>) {
    for (Index k = 0; k < kc; ++k) {
      prefetch_panels<Traits::kNr * Index{sizeof(float)}, P>(bp, pf_offset);
      Reg bv[kRegCount];
      static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE { bv[q] = V::load(bp[q / 2] + (q % 2) * kW); });
      static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
        const Reg av = V::broadcast(a + r);
        static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE { acc[r][q] = V::fma(av, bv[q], acc[r][q]); });
      });
      a += M;
      static_for<P>([&](auto p) MOET_LAMBDA_INLINE { bp[p] += Traits::kNr; });
    }
  } else {
    // A register of bf16 pairs covers kW lanes: 2 kW elements.
    constexpr Index kStep = 2 * Traits::kNr;  // elements of one row pair of a panel
    for (Index k = 0; k < kc; k += 2) {
      prefetch_panels<kStep * Index{sizeof(W)}, P>(bp, pf_offset);
      if constexpr (Vv::kDotBf16) {
        typename Vv::PairReg bv[kRegCount];
        static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE {
          bv[q] = Vv::load_pairs(bp[q / 2] + (q % 2) * 2 * kW);
        });
        static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
          const auto av = Vv::broadcast_pair(a + 2 * r);
          static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE { acc[r][q] = Vv::dot_pairs(acc[r][q], av, bv[q]); });
        });
      } else {
        Reg even[kRegCount];
        Reg odd[kRegCount];
        static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE {
          V::bf16_pairs(bp[q / 2] + (q % 2) * 2 * kW, even[q], odd[q]);
        });
        static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
          Reg a0;
          Reg a1;
          if constexpr (std::is_same_v<A, float>) {  // rows k and k + 1 of the [k][M] layout
            a0 = V::broadcast(a + r);
            a1 = V::broadcast(a + M + r);
          } else {
            a0 = V::set1(from_bf16(a[2 * r]));
            a1 = V::set1(from_bf16(a[2 * r + 1]));
          }
          static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE {
            acc[r][q] = V::fma(a0, even[q], V::fma(a1, odd[q], acc[r][q]));
          });
        });
      }
      a += 2 * M;
      static_for<P>([&](auto p) MOET_LAMBDA_INLINE { bp[p] += kStep; });
    }
  }
  store_tile<M, P, Epi>(acc, out, ldo);
}

/// The integer micro-kernel of the block formats (levels with 8-bit dot products,
/// `Vv::kDotI8`: `vpdpbusd`, or `vpmaddubsw` + `vpmaddwd` on `kAvx2` and `kAvx512`): an `M x P nr`
/// tile over `kc` rows (whole blocks of 32) of `P` panels. Per block `b`, lane `c` and row `r`:
/// `isum = sum_i code(c, i) qx(r, i)` exactly in int32 (the stored codes are unsigned,
/// `q + offset`; `kAvx2` and `kAvx512` take the 8-bit codes as the signed `q` and `offset` as 0,
/// the same difference `isum - offset sx(r)` exactly, so the same bits as `vpdpbusd`), then
/// ```
/// acc(r, c) = fma(float(isum - offset sx(r)), d(c) dx(r), acc(r, c))
/// acc(r, c) = fma(m(c), dx(r) sx(r), acc(r, c))                       (then, for Q4_1 only)
/// ```
/// with `qx`, `dx`, `sx` the row's quantised values, scale and code sum (`a`, `ad`, `as`: the
/// group's arrays from `pack_quantized_row_groups`, already offset to the first block), and
/// `d`, `m` the lanes' half scale and minimum. One chain per output over the blocks, in order.
template <int M, int P, class Epi, class W, class Vv = V>
MOET_NOINLINE void quantized_micro_kernel(Index kc, const std::int8_t* a, const float* ad,
                                          const std::int32_t* as, const std::uint8_t* b,
                                          Index b_stride, Index pf_offset, const float* c_in,
                                          Index ldc_in, float* out, Index ldo) {
  using IReg = typename Vv::IReg;
  using L = QuantBlockLayout<W>;
  constexpr int kW = Vv::kWidth;
  constexpr int kRegs = 2 * P;
  constexpr auto kRegCount = static_cast<std::size_t>(kRegs);
  constexpr Index kNr = Traits::kNr;
  constexpr Index kBlockUnits = kNr * PackFormat<W>::kUnitsPerLane;  // one block row of a panel
  // 8-bit codes as signed values (`vpmaddubsw` levels: `Vv::dot_signed`), so no offset.
  constexpr bool kSignedQ8 = std::is_same_v<W, Q8_0> && Vv::kDotI8Madd;
  constexpr int kOffset = kSignedQ8 ? 0 : PackFormat<W>::kCodeOffset;

  Tile<M, P> acc;
  load_tile<M, P>(acc, c_in, ldc_in);
  const std::uint8_t* bp[static_cast<std::size_t>(P)];
  static_for<P>([&](auto p) MOET_LAMBDA_INLINE { bp[p] = b + p * b_stride; });
  for (Index k = 0; k < kc; k += kQuantBlock) {
    prefetch_panels<kBlockUnits, P>(bp, pf_offset);  // a block is 9-17 lines of a panel
    IReg isum[static_cast<std::size_t>(M)][kRegCount];
    static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
      static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE { isum[r][q] = Vv::izero(); });
    });
    if constexpr (kSignedQ8) {
      for (int grp = 0; grp < 8; ++grp) {
        IReg ws[kRegCount];  // the codes as signed q
        IReg wa[kRegCount];  // |q|
        static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE {
          ws[q] = Vv::signed_codes(
              Vv::load_bytes(bp[q / 2] + L::codes(0, kNr) + grp * 4 * kNr + (q % 2) * 4 * kW));
          wa[q] = Vv::abs_bytes(ws[q]);
        });
        static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
          const IReg xv = Vv::broadcast_word(a + grp * 4 * M + 4 * r);
          static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE {
            isum[r][q] = Vv::dot_signed(isum[r][q], wa[q], ws[q], xv);
          });
        });
      }
    } else if constexpr (std::is_same_v<W, Q8_0>) {
      for (int grp = 0; grp < 8; ++grp) {
        IReg wv[kRegCount];
        static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE {
          wv[q] = Vv::load_bytes(bp[q / 2] + L::codes(0, kNr) + grp * 4 * kNr + (q % 2) * 4 * kW);
        });
        static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
          const IReg xv = Vv::broadcast_word(a + grp * 4 * M + 4 * r);
          static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE {
            isum[r][q] = Vv::dot_u8s8(isum[r][q], wv[q], xv);
          });
        });
      }
    } else {
      for (int w = 0; w < 4; ++w) {
        IReg lo[kRegCount];
        IReg hi[kRegCount];
        static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE {
          const IReg v =
              Vv::load_bytes(bp[q / 2] + L::codes(0, kNr) + w * 4 * kNr + (q % 2) * 4 * kW);
          lo[q] = Vv::low_nibbles(v);
          hi[q] = Vv::high_nibbles(v);
        });
        static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
          const IReg x_lo = Vv::broadcast_word(a + w * 4 * M + 4 * r);
          const IReg x_hi = Vv::broadcast_word(a + (w + 4) * 4 * M + 4 * r);
          static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE {
            if constexpr (Vv::kDotI8Madd) {
              // int16 pair sums (4-bit codes: at most 2 * 15 * 127 = 3810 each; the 8 of a
              // block at most 30480): widened to int32 once per block, below.
              isum[r][q] = Vv::add_pairs(isum[r][q], Vv::add_pairs(Vv::pair_sums(lo[q], x_lo),
                                                                   Vv::pair_sums(hi[q], x_hi)));
            } else {
              isum[r][q] = Vv::dot_u8s8(Vv::dot_u8s8(isum[r][q], lo[q], x_lo), hi[q], x_hi);
            }
          });
        });
      }
      if constexpr (Vv::kDotI8Madd) {
        static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
          static_for<kRegs>([&](auto q)
                                MOET_LAMBDA_INLINE { isum[r][q] = Vv::widen_pairs(isum[r][q]); });
        });
      }
    }
    Reg dw[kRegCount];
    Reg mw[kRegCount]{};  // (Q4_1 only)
    static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE {
      dw[q] = Vv::load_halves(bp[q / 2] + L::scales(0, kNr) + (q % 2) * 2 * kW);
      if constexpr (std::is_same_v<W, Q4_1>) {
        mw[q] = Vv::load_halves(bp[q / 2] + L::mins(0, kNr) + (q % 2) * 2 * kW);
      }
    });
    static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
      const Reg dx = Vv::set1(ad[r]);
      const IReg correction = Vv::iset1(kOffset * as[r]);
      static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE {
        const Reg sum = Vv::to_float(Vv::isub(isum[r][q], correction));
        acc[r][q] = Vv::fma(sum, Vv::mul(dw[q], dx), acc[r][q]);
        if constexpr (std::is_same_v<W, Q4_1>) {
          acc[r][q] = Vv::fma(mw[q], Vv::set1(ad[r] * static_cast<float>(as[r])), acc[r][q]);
        }
      });
    });
    a += kQuantBlock * M;
    ad += M;
    as += M;
    static_for<P>([&](auto p) MOET_LAMBDA_INLINE { bp[p] += kBlockUnits; });
  }
  store_tile<M, P, Epi>(acc, out, ldo);
}

/// Dequantises rows `[0, k_len)` (whole blocks) of `p` panels of block-format weights (`b`,
/// already offset to the first block; panels `b_stride` units apart) into float panels in
/// `tile` (panel `q` at `tile + q k_len nr`, laid out `[k][nr]` like packed float weights): the
/// block formats' path on levels without integer dot products.
template <class W>
void dequantize_panels(const std::uint8_t* b, Index b_stride, int p, Index k_len, float* tile) {
  using L = QuantBlockLayout<W>;
  constexpr Index kNr = Traits::kNr;
  constexpr int kOffset = PackFormat<W>::kCodeOffset;
  for (int q = 0; q < p; ++q) {
    const std::uint8_t* panel = b + q * b_stride;
    float* dst = tile + q * k_len * kNr;
    for (Index blk = 0; blk < k_len / kQuantBlock; ++blk) {
      float d[kNr];
      float m[kNr] = {};
      for (Index c = 0; c < kNr; ++c) {
        std::uint16_t h = 0;
        std::memcpy(&h, panel + L::scales(blk, kNr) + 2 * c, 2);
        d[c] = from_f16(h);
        if constexpr (std::is_same_v<W, Q4_1>) {
          std::memcpy(&h, panel + L::mins(blk, kNr) + 2 * c, 2);
          m[c] = from_f16(h);
        }
      }
      const std::uint8_t* codes = panel + L::codes(blk, kNr);
      float* rows = dst + blk * kQuantBlock * kNr;
      for (Index i = 0; i < kQuantBlock; ++i) {
        const Index j = std::is_same_v<W, Q8_0> ? i : i % (kQuantBlock / 2);
        const std::uint8_t* word = codes + (j / 4) * 4 * kNr + j % 4;
        for (Index c = 0; c < kNr; ++c) {
          const int byte = word[4 * c];
          const int code = std::is_same_v<W, Q8_0> ? byte
                           : i < kQuantBlock / 2   ? (byte & 0xf)
                                                   : (byte >> 4);
          rows[i * kNr + c] = d[c] * static_cast<float>(code - kOffset) + m[c];
        }
      }
    }
  }
}

/// Runs the `m`-row micro-kernel over `p` panels: `p` is 1, `few_row_panels(m)`, or
/// `Traits::kManyPanels` (calls with several row groups, `m <= kManyMr`).
template <class Epi, class W, class A>
MOET_ALWAYS_INLINE void run_micro_kernel(int m, int p, Index kc, const A* a, const W* b,
                                         Index b_stride, Index pf_offset, const float* c_in,
                                         Index ldc_in, float* out, Index ldo) {
  static_for<Traits::template kMr<W>>([&](auto i) MOET_LAMBDA_INLINE {
    constexpr int kRows = i + 1;
    constexpr int kPanels = Traits::template few_row_panels<W>(kRows);
    constexpr int kMany = Traits::template kManyPanels<W>;
    constexpr bool kHasMany = kMany > 1 && kMany != kPanels && kRows <= Traits::template kManyMr<W>;
    if (m != kRows) return;
    if (p == 1) {
      micro_kernel<kRows, 1, Epi>(kc, a, b, b_stride, pf_offset, c_in, ldc_in, out, ldo);
      return;
    }
    if constexpr (kPanels > 1) {
      if (p == kPanels) {
        micro_kernel<kRows, kPanels, Epi>(kc, a, b, b_stride, pf_offset, c_in, ldc_in, out, ldo);
        return;
      }
    }
    if constexpr (kHasMany) {
      if (p == kMany) {
        micro_kernel<kRows, kMany, Epi>(kc, a, b, b_stride, pf_offset, c_in, ldc_in, out, ldo);
        return;
      }
    }
    MOET_ASSERT(false, "no micro-kernel of this shape");
  });
}

/// The same for the integer kernels of block format `W`.
template <class Epi, class W>
MOET_ALWAYS_INLINE void run_quantized_micro_kernel(int m, int p, Index kc, const std::int8_t* a,
                                                   const float* ad, const std::int32_t* as,
                                                   const std::uint8_t* b, Index b_stride,
                                                   Index pf_offset, const float* c_in,
                                                   Index ldc_in, float* out, Index ldo) {
  static_for<Traits::template kMr<W>>([&](auto i) MOET_LAMBDA_INLINE {
    constexpr int kRows = i + 1;
    constexpr int kPanels = Traits::template few_row_panels<W>(kRows);
    if (m != kRows) return;
    if (p == 1) {
      quantized_micro_kernel<kRows, 1, Epi, W>(kc, a, ad, as, b, b_stride, pf_offset, c_in,
                                               ldc_in, out, ldo);
    } else if constexpr (kPanels > 1) {
      quantized_micro_kernel<kRows, kPanels, Epi, W>(kc, a, ad, as, b, b_stride, pf_offset, c_in,
                                                     ldc_in, out, ldo);
    }
  });
}

/// How a level runs weights of type `W`: float and bf16 natively; the block formats with
/// integer dot products where the level has them, else dequantised to float K block by K
/// block (then the float kernels run, on float rows of `A`).
enum class ProductMode { kNative, kIntegerDot, kDequantize };
template <class W, class Vv = V>
inline constexpr ProductMode kProductMode =
    !kIsQuantized<W> ? ProductMode::kNative
    : Vv::kDotI8     ? ProductMode::kIntegerDot
                     : ProductMode::kDequantize;

/// Whether this level packs the rows of `A` for bf16 weights as floats holding the bf16-rounded
/// values (levels without `vdpbf16ps`: see `micro_kernel`) rather than as bf16 pairs.
template <class W, class Vv = V>
inline constexpr bool kFloatRowsForBf16 = std::is_same_v<W, Bf16> && !Vv::kDotBf16;

/// The blocked loop nest shared by `gemm` (`Glu = false`) and `glu`, for weights of any packed
/// type (`W`): bf16 packs `A` as bf16 (as bf16-rounded floats where `kFloatRowsForBf16`); the block
/// formats quantise `A` per block for the integer kernels or dequantise the weights (see
/// `ProductMode`); the reduction runs over `padded_depth(k)` rows.
template <bool Glu, class Act, class W>
void run_packed_product(const PackedProduct<W>& op, Buffer<float>& scratch) {
  constexpr ProductMode kMode = kProductMode<W>;
  // The element type the rows of A are packed as, and the kernels' view of the weights.
  using KernelW = std::conditional_t<kMode == ProductMode::kDequantize, float, W>;
  // The element type of the packed rows of A.
  using RowW = std::conditional_t<kFloatRowsForBf16<W>, float, KernelW>;
  using Storage = typename PackFormat<W>::Storage;
  constexpr Index kNr = Traits::kNr;
  constexpr Index kMr = Traits::template kMr<KernelW>;
  constexpr Index kOutWidth = Glu ? kNr / 2 : kNr;  // output columns per panel
  using Final = std::conditional_t<Glu, GluEpilogue<Act>, RawEpilogue>;
  const Index n = op.n;
  const Index k = padded_depth<W>(op.k);  // rows of the packed weights
  if (n == 0 || op.num_panels == 0) return;

  const int one_group_panels = Traits::template few_row_panels<KernelW>(
      static_cast<int>(std::min<Index>(std::max<Index>(n, 1), kMr)));
  PackedBlocking blk =
      packed_blocking(n, k, op.num_panels, kMr, one_group_panels, Traits::template kManyMr<KernelW>,
                      Traits::template kManyPanels<KernelW>);
  if constexpr (kMode == ProductMode::kDequantize) {
    // The dequantised K block lives in the scratch tile: at most kGemmKc rows.
    if (blk.kc > kGemmKc) {
      blk.kc = kGemmKc;
      blk.chunk = kGemmChunkPanels;
    }
  }
  const Index block_rows = std::min(blk.row_block, n);
  const Index nb = k / kQuantBlock;  // blocks per row (block formats)
  // Floats of scratch taken by the packed rows, 64-byte multiple: float or bf16 elements, or
  // the quantised codes with a float scale and an int32 sum per row and block.
  const Index a_bytes = kMode == ProductMode::kIntegerDot
                            ? block_rows * (k + 8 * nb)
                            : block_rows * k * static_cast<Index>(sizeof(RowW));
  const Index packed_a = (a_bytes / static_cast<Index>(sizeof(float)) + 15) / 16 * 16;
  const Index part_ld = blk.chunk * kNr;  // running sums: (block_rows, chunk * kNr)
  const bool blocked = blk.kc < k;        // K blocks > 1: running sums go through scratch

  // packed_scratch_floats(n, op.k) covers every level and element type.
  float* base = scratch.data(packed_scratch_floats(n, op.k));
  const auto misalign = reinterpret_cast<std::uintptr_t>(base) % kPackAlignBytes;
  if (misalign != 0) base += (kPackAlignBytes - misalign) / sizeof(float);
  // (block_rows, k) as packed row groups; bf16 rows and quantised codes start their lifetime
  // in the float storage.
  RowW* a_pack = nullptr;
  std::int8_t* a_codes = nullptr;
  float* a_scales = nullptr;
  std::int32_t* a_sums = nullptr;
  if constexpr (kMode == ProductMode::kIntegerDot) {
    a_codes = ::new (static_cast<void*>(base)) std::int8_t[static_cast<std::size_t>(block_rows * k)];
    a_scales = base + (block_rows * k + 3) / 4;
    a_sums = ::new (static_cast<void*>(a_scales + block_rows * nb))
        std::int32_t[static_cast<std::size_t>(block_rows * nb)];
  } else if constexpr (std::is_same_v<RowW, float>) {
    a_pack = base;
  } else {
    a_pack = ::new (static_cast<void*>(base)) RowW[static_cast<std::size_t>(block_rows * k)];
  }
  float* partial = base + packed_a;  // running sums of one column chunk (when blocked)
  // The dequantised weights of the current K block (kDequantize).
  float* tile = partial + (blocked ? block_rows * part_ld : 0);
  {
    const auto tile_misalign = reinterpret_cast<std::uintptr_t>(tile) % kPackAlignBytes;
    if (tile_misalign != 0) tile += (kPackAlignBytes - tile_misalign) / sizeof(float);
  }
  // Far prefetch distance along a streamed panel, in storage units (the same bytes for every
  // type).
  constexpr Index kStreamPrefetch =
      kGemmStreamPrefetch * static_cast<Index>(sizeof(float) / sizeof(Storage));

  // Panels whose every output column exists; only the last panel can be partial.
  const Index full_panels = op.out_cols / kOutWidth;

  for (Index i0 = 0; i0 < n; i0 += blk.row_block) {
    const Index rows = std::min(blk.row_block, n - i0);
    const Index groups = (rows + blk.mr - 1) / blk.mr;
    if constexpr (kMode == ProductMode::kIntegerDot) {
      pack_quantized_rows(op.a + i0 * op.lda, op.lda, rows, op.k, groups, a_codes, a_scales,
                          a_sums, op.a_k_stride);
    } else if constexpr (kMode == ProductMode::kDequantize) {
      pack_row_groups(op.a + i0 * op.lda, op.lda, rows, op.k, groups, a_pack, k,  // zero pad
                      op.a_k_stride);
    } else if constexpr (kFloatRowsForBf16<W>) {
      pack_bf16_float_row_groups(op.a + i0 * op.lda, op.lda, rows, op.k, groups, a_pack,
                                 op.a_k_stride);
    } else if constexpr (std::is_same_v<KernelW, Bf16>) {
      pack_bf16_row_groups(op.a + i0 * op.lda, op.lda, rows, op.k, groups, a_pack, op.a_k_stride);
    } else {
      pack_row_groups(op.a + i0 * op.lda, op.lda, rows, op.k, groups, a_pack, -1,
                      op.a_k_stride);
    }

    for (Index j0 = 0; j0 < op.num_panels; j0 += blk.chunk) {
      const Index j1 = std::min(op.num_panels, j0 + blk.chunk);
      for (Index k0 = 0;; k0 += blk.kc) {
        const Index k_len = std::min(blk.kc, k - k0);
        const bool first = k0 == 0;
        const bool last = k0 + k_len >= k;
        for (Index j = j0; j < j1;) {
          const int p =
              (blk.panels > 1 && j + blk.panels <= std::min(j1, full_panels)) ? blk.panels : 1;
          const bool edge = j >= full_panels;  // the partial last panel (then p == 1)
          const Storage* b_block = op.b + j * op.b_stride + panel_units<W>(k0, kNr);
          if constexpr (kMode == ProductMode::kDequantize) {
            dequantize_panels<W>(b_block, op.b_stride, p, k_len, tile);
          }
          for (Index g = 0; g < groups; ++g) {
            Index g0 = 0;
            Index gm = 0;
            row_group(rows, groups, g, g0, gm);
            const int m = static_cast<int>(gm);
            // Far prefetch: the first group of a few-row call runs ahead along its own stream;
            // every other call fetches the same K block of the panels needed next.
            const Index pf_offset = blk.few && g == 0 ? kStreamPrefetch : p * op.b_stride;
            // Where the running sums come from: zero, the old C (accumulate), or the scratch.
            float* out_tile = op.out + (i0 + g0) * op.ldo + j * kOutWidth;  // (gm, p * width)
            float* part =
                blocked ? partial + g0 * part_ld + (j - j0) * kNr : nullptr;  // (gm, p kNr)
            const float* c_in = nullptr;
            Index ld_in = 0;
            const Index valid = std::min(op.out_cols - j * kOutWidth, p * kOutWidth);
            alignas(kPackAlignBytes) float in_tile[static_cast<std::size_t>(kMr * kNr)];
            // The integer kernels' raw sums before the GLU epilogue: at most 2 panels.
            static_assert(kMode != ProductMode::kIntegerDot ||
                          Traits::template few_row_panels<KernelW>(1) <= 2);
            alignas(kPackAlignBytes) float raw_tile[static_cast<std::size_t>(
                Glu && kMode == ProductMode::kIntegerDot ? kMr * 2 * kNr : 1)];
            if (!first) {
              c_in = part;
              ld_in = part_ld;
            } else if (!Glu && op.accumulate) {
              c_in = out_tile;
              ld_in = op.ldo;
              if (edge) {  // the old C of a partial panel: its existing columns only
                std::fill(in_tile, in_tile + gm * kNr, 0.0f);
                for (Index r = 0; r < gm; ++r) {
                  std::copy(c_in + r * ld_in, c_in + r * ld_in + valid, in_tile + r * kNr);
                }
                c_in = in_tile;
                ld_in = kNr;
              }
            }
            // An accumulating call starts by loading its tile of the old C: the next call's
            // tile (the next row group of these panels, or the first of the next panels) is
            // fetched into L1 for writing while this one runs. The weight gradients' products
            // (`gemm_packed_at`, K = one row block of 128) otherwise waited for every tile from
            // memory: 140 -> 170 GFLOP/s on one Zen 5 core. Prefetching the tiles that the last
            // K block only stores gained nothing measurable.
            if (c_in == out_tile) {
              Index nf = 0;
              Index nm = 0;
              const float* next = nullptr;
              if (g + 1 < groups) {
                row_group(rows, groups, g + 1, nf, nm);
                next = out_tile + (nf - g0) * op.ldo;
              } else if (j + p < j1) {
                row_group(rows, groups, 0, nf, nm);
                next = op.out + (i0 + nf) * op.ldo + (j + p) * kOutWidth;
              }
              const Index lines = valid * Index{sizeof(float)} / 64;
              for (Index r = 0; next != nullptr && r < nm; ++r) {
                for (Index l = 0; l < lines; ++l) {
                  __builtin_prefetch(next + r * op.ldo + l * (64 / Index{sizeof(float)}), 1, 3);
                }
              }
            }
            // One micro-kernel call of this mode: `pp` panels into `o` (row stride `ldo_out`).
            const auto kernel = [&]<class Epi>(Epi /*tag*/, int pp, float* o, Index ldo_out) {
              if constexpr (kMode == ProductMode::kIntegerDot) {
                const Index b_off = (g0 * nb) + (k0 / kQuantBlock) * gm;
                const auto run = [&](float* dst, Index ld) {
                  run_quantized_micro_kernel<RawEpilogue, W>(
                      m, pp, k_len, a_codes + g0 * k + k0 * gm, a_scales + b_off, a_sums + b_off,
                      b_block, op.b_stride, pf_offset, c_in, ld_in, dst, ld);
                };
                if constexpr (kIsGluEpilogue<Epi>) {  // raw sums, then the GLU (store_glu_rows)
                  run(raw_tile, pp * kNr);
                  store_glu_rows<typename Epi::Activation>(raw_tile, pp * kNr, m, pp, o, ldo_out);
                } else {
                  run(o, ldo_out);
                }
              } else if constexpr (kMode == ProductMode::kDequantize) {
                run_micro_kernel<Epi>(m, pp, k_len, a_pack + g0 * k + k0 * gm, tile,
                                      k_len * kNr, k_len * kNr, c_in, ld_in, o, ldo_out);
              } else {
                run_micro_kernel<Epi>(m, pp, k_len, a_pack + g0 * k + k0 * gm, b_block,
                                      op.b_stride, pf_offset, c_in, ld_in, o, ldo_out);
              }
            };
            if (!last) {
              kernel(RawEpilogue{}, p, part, part_ld);
            } else if (!edge) {
              kernel(Final{}, p, out_tile, op.ldo);
            } else {
              // Partial last panel: run on a full-width tile, copy the existing columns.
              alignas(kPackAlignBytes) float tile_out[static_cast<std::size_t>(kMr * kNr)];
              kernel(Final{}, 1, tile_out, kOutWidth);
              for (Index r = 0; r < gm; ++r) {
                std::copy(tile_out + r * kOutWidth, tile_out + r * kOutWidth + valid,
                          out_tile + r * op.ldo);
              }
            }
          }
          j += p;
        }
        if (last) break;
      }
    }
  }
}

/// `C (+)= A B` on this level's kernels (shapes already checked by `detail::gemm_packed`).
template <class W>
void gemm(const PackedProduct<W>& op, Buffer<float>& scratch) {
  run_packed_product<false, Silu>(op, scratch);
}

/// `H = Act(A Wg) ⊙ (A Wu)` on this level's kernels (shapes already checked).
template <class Act, class W>
void glu(const PackedProduct<W>& op, Buffer<float>& scratch) {
  run_packed_product<true, Act>(op, scratch);
}

// Explicit instantiation of this level's entry points for every element type and shipped
// activation: declarations (`MOET_EXTERN_KERNELS`: the including translation unit compiles none
// of these kernels and links them from a unit that defines `MOET_INSTANTIATE_KERNELS`, as
// moet's own tests do to compile the kernel families once instead of once per test) or
// definitions. Without either macro (the default) every unit instantiates what it uses.
#if defined(MOET_EXTERN_KERNELS) || defined(MOET_INSTANTIATE_KERNELS)
#if defined(MOET_INSTANTIATE_KERNELS)
#define MOET_KERNEL_INSTANCE template
#else
#define MOET_KERNEL_INSTANCE extern template
#endif
#define MOET_KERNEL_INSTANCES_FOR(W)                                                   \
  MOET_KERNEL_INSTANCE void gemm<W>(const PackedProduct<W>&, Buffer<float>&);          \
  MOET_KERNEL_INSTANCE void glu<Silu, W>(const PackedProduct<W>&, Buffer<float>&);     \
  MOET_KERNEL_INSTANCE void glu<Gelu, W>(const PackedProduct<W>&, Buffer<float>&);     \
  MOET_KERNEL_INSTANCE void glu<GeluTanh, W>(const PackedProduct<W>&, Buffer<float>&); \
  MOET_KERNEL_INSTANCE void glu<Relu, W>(const PackedProduct<W>&, Buffer<float>&);
#if !defined(MOET_KERNEL_QUANTIZED_ONLY)  // (a level that runs only the block formats' products)
MOET_KERNEL_INSTANCES_FOR(float)
MOET_KERNEL_INSTANCES_FOR(Bf16)
MOET_KERNEL_INSTANCE void silu_array<V>(const float*, float*, Index);
#endif
MOET_KERNEL_INSTANCES_FOR(Q8_0)
MOET_KERNEL_INSTANCES_FOR(Q4_0)
MOET_KERNEL_INSTANCES_FOR(Q4_1)
#undef MOET_KERNEL_INSTANCES_FOR
#undef MOET_KERNEL_INSTANCE
#endif
