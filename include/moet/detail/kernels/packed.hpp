#pragma once
/// \file detail/kernels/packed.hpp
/// Packed weights for the kernels of detail/gemm.hpp (`PackedMatrix`, `PackedGluMatrix`), the
/// packing of the left-hand rows (`pack_row_groups`), and the layout rules both follow.
///
/// A packed matrix is laid out for one kernel level (`KernelIsa`), chosen when it is packed
/// (`kernel_isa()` by default) and kept with it: column panels of `panel_width(isa)` lanes (two
/// vector registers of that level), each panel holding all `K` rows contiguously. A product
/// runs the kernels of the level its weights were packed for, so the packing and the kernels
/// always agree, whichever translation unit packed and whichever runs. Nothing here depends on
/// the flags the including translation unit is compiled with.
///
/// bf16 weights (`Bf16`) pack rows of `K` in pairs (`kKGroup`), so that one 32-bit word holds
/// the pair `(k, k + 1)` of a lane (the operand layout of AVX512-BF16's `vdpbf16ps`; the other
/// levels split the word in registers).
///
/// Block-quantised weights (`Q8_0`, `Q4_0`, `Q4_1`, detail/quant.hpp) pack blocks of 32 rows:
/// per panel and block, the lanes' half scales (`nr` x 2 bytes; `Q4_1` then its `nr` half
/// minimums), then the codes as unsigned bytes, grouped by 4 consecutive rows per lane (the
/// operand layout of AVX512-VNNI's `vpdpbusd`): `Q8_0` stores `q + 128` as 8 groups
/// `[group][lane][4]`; the 4-bit formats store 4 words per lane `[w][lane][4]` whose byte `i`
/// holds row `4w + i` in its low nibble and row `16 + 4w + i` in its high nibble.

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>

#include "moet/detail/bf16.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/quant.hpp"
#include "moet/errors.hpp"
#include "moet/kernel_isa.hpp"
#include "moet/tensor.hpp"

#if MOET_X86
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

namespace moet::detail {

/// Lanes per column panel of level `isa`: two vector registers (portable: two 4-float vectors).
constexpr Index panel_width(KernelIsa isa) {
  switch (isa) {
    case KernelIsa::kAvx2:
    case KernelIsa::kAvx2Vnni:
      return 16;
    case KernelIsa::kAvx512:
    case KernelIsa::kAvx512Vnni:
    case KernelIsa::kAvx512Bf16:
      return 32;
    case KernelIsa::kPortable:
      break;
  }
  return 8;
}

/// The widest panel of any level (bounds the kernels' scratch).
inline constexpr Index kMaxPanelWidth = 32;

/// Bytes of alignment of packed weights (one cache line; the AVX-512 vector size).
inline constexpr std::size_t kPackAlignBytes = kBufferAlignBytes;

/// The storage of packed weights of element type `W` (`float`, `Bf16`, `Q8_0`, `Q4_0`,
/// `Q4_1`): `Storage` units, `kGroup` consecutive rows of `K` packed together, and
/// `kUnitsPerLane` storage units per group and lane.
template <class W>
struct PackFormat;
template <>
struct PackFormat<float> {
  using Storage = float;
  static constexpr Index kGroup = 1;
  static constexpr Index kUnitsPerLane = 1;
};
template <>
struct PackFormat<Bf16> {
  using Storage = Bf16;
  static constexpr Index kGroup = 2;
  static constexpr Index kUnitsPerLane = 2;
};
template <>
struct PackFormat<Q8_0> {
  using Storage = std::uint8_t;
  static constexpr Index kGroup = kQuantBlock;
  static constexpr Index kUnitsPerLane = 2 + kQuantBlock;  // scale, codes
  static constexpr int kCodeOffset = 128;                 // stored code = q + 128
};
template <>
struct PackFormat<Q4_0> {
  using Storage = std::uint8_t;
  static constexpr Index kGroup = kQuantBlock;
  static constexpr Index kUnitsPerLane = 2 + kQuantBlock / 2;  // scale, nibbles
  static constexpr int kCodeOffset = 8;                        // value = d (code - 8)
};
template <>
struct PackFormat<Q4_1> {
  using Storage = std::uint8_t;
  static constexpr Index kGroup = kQuantBlock;
  static constexpr Index kUnitsPerLane = 4 + kQuantBlock / 2;  // scale, minimum, nibbles
  static constexpr int kCodeOffset = 0;                        // value = d code + m
};

/// True for the element types packed weights can have.
template <class W>
inline constexpr bool kIsPackedElement =
    std::is_same_v<W, float> || std::is_same_v<W, Bf16> || std::is_same_v<W, Q8_0> ||
    std::is_same_v<W, Q4_0> || std::is_same_v<W, Q4_1>;

/// True for the block-quantised element types.
template <class W>
inline constexpr bool kIsQuantized =
    std::is_same_v<W, Q8_0> || std::is_same_v<W, Q4_0> || std::is_same_v<W, Q4_1>;

/// Consecutive rows of `K` packed together: 32 for the block formats, 2 for bf16, 1 for float.
template <class W>
inline constexpr Index kKGroup = PackFormat<W>::kGroup;

/// `k` rounded up to a multiple of `kKGroup<W>` (the pad rows are zero).
template <class W>
constexpr Index padded_depth(Index k) {
  return (k + kKGroup<W> - 1) / kKGroup<W> * kKGroup<W>;
}

/// Storage units of one panel of `nr` lanes from row 0 to row `k` (a multiple of `kKGroup`).
template <class W>
constexpr Index panel_units(Index k, Index nr) {
  return k / kKGroup<W> * nr * PackFormat<W>::kUnitsPerLane;
}

/// `v` as a packed element: itself for float, rounded to nearest even for bf16.
template <class W>
constexpr W to_packed(float v) {
  if constexpr (std::is_same_v<W, Bf16>) {
    return to_bf16(v);
  } else {
    return v;
  }
}

/// The float value of a packed element.
constexpr float packed_value(float v) { return v; }
constexpr float packed_value(Bf16 v) { return from_bf16(v); }

/// Offset, inside a panel of `nr` lanes, of row `k` and lane `lane`: `[k][lane]` for float,
/// `[k / 2][lane][k % 2]` for bf16.
template <class W>
constexpr Index panel_offset(Index k, Index lane, Index nr) {
  constexpr Index kG = kKGroup<W>;
  return (k / kG) * (nr * kG) + lane * kG + k % kG;
}

/// Where the parts of quantised block `b` of a panel of `nr` lanes start (in bytes from the
/// panel's start): the half scales, the half minimums (`Q4_1` only), and the codes.
template <class W>
struct QuantBlockLayout {
  static_assert(kIsQuantized<W>, "block formats only");
  static constexpr Index scales(Index b, Index nr) {
    return b * nr * PackFormat<W>::kUnitsPerLane;
  }
  static constexpr Index mins(Index b, Index nr) { return scales(b, nr) + 2 * nr; }
  static constexpr Index codes(Index b, Index nr) {
    return scales(b, nr) + (std::is_same_v<W, Q4_1> ? 4 : 2) * nr;
  }
};

/// Storage and shape shared by the two packed kinds: `num_panels` panels of `panel_stride()`
/// storage units each, laid out for `isa`, zero where no weight is (padding), 64-byte aligned,
/// allocated with `new` (never by Eigen) and reused by a later pack of a matrix no larger.
template <class W>
class PackedPanels {
  static_assert(kIsPackedElement<W>, "packed weights are float, Bf16, Q8_0, Q4_0 or Q4_1");

 public:
  using Element = W;
  using Storage = typename PackFormat<W>::Storage;

  /// Rows `K` of the packed weights.
  Index rows() const { return rows_; }
  /// Columns of the original matrix (`N`, or `F` for a GLU pair).
  Index cols() const { return cols_; }
  /// Column panels.
  Index num_panels() const { return num_panels_; }
  /// Lanes per panel (`panel_width(isa())`).
  Index panel_width() const { return detail::panel_width(isa_); }
  /// Storage units between the starts of two consecutive panels.
  Index panel_stride() const { return panel_units<W>(padded_depth<W>(rows_), panel_width()); }
  /// The kernel level the layout is for (the products run that level's kernels).
  KernelIsa isa() const { return isa_; }
  /// Start of the packed storage (64-byte aligned; null when empty).
  const Storage* data() const { return data_.data(); }
  /// Bytes of packed storage (padding included).
  std::size_t bytes() const { return data_.size() * sizeof(Storage); }
  /// Grows the storage's capacity so that packing any matrix up to `(k, cols)` for `isa` does
  /// not allocate (the backward packs rows of activations per call).
  void reserve(Index k, Index cols, KernelIsa isa = kernel_isa()) {
    const Index nr = detail::panel_width(isa);
    data_.reserve(
        static_cast<std::size_t>((cols + nr - 1) / nr * panel_units<W>(padded_depth<W>(k), nr)));
  }

 protected:
  // Shapes the storage: `num_panels` panels for a (k, cols) matrix, every element zero. With
  // `keep`, storage already of this exact shape and level is left as it is (a full repack then
  // overwrites every weight, and the padding is still zero): repacking the same shape every
  // training step writes the weights once instead of zeroing them first.
  void shape(Index k, Index cols, Index num_panels, KernelIsa isa, bool keep = false) {
    if (keep && k == rows_ && cols == cols_ && num_panels == num_panels_ && isa == isa_ &&
        data_.size() == static_cast<std::size_t>(num_panels * panel_stride())) {
      return;
    }
    require(kernel_isa_supported(isa), "PackedMatrix", "kernel level ", kernel_isa_name(isa),
            " is not supported by this CPU (best: ", kernel_isa_name(cpu_kernel_isa()), ")");
    require(k >= 0 && cols >= 0, "PackedMatrix", "shape must not be negative, got (", k, ", ",
            cols, ")");
    rows_ = k;
    cols_ = cols;
    isa_ = isa;
    num_panels_ = num_panels;
    data_.assign(static_cast<std::size_t>(num_panels_ * panel_stride()), Storage{});
  }

  // Writes `src` (K, width) into lanes [lane0, lane0 + lanes) of consecutive panels: panel p
  // takes columns [p lanes, (p + 1) lanes) of `src`. Block formats quantise each column's
  // blocks of 32 rows (the rows past K count as zeros).
  bool write_lanes(const ConstRows<float>& src, Index lane0, Index lanes) {
    return write_lanes(src.data(), src.outerStride(), 1, src.cols(), lane0, lanes);
  }
  // The same from any strided source: entry (k, j) at `src[k k_stride + j j_stride]`, `cols`
  // columns (a row-major matrix: (outer stride, 1); its transpose: (1, outer stride)). Returns
  // whether every value read was finite: float and bf16 pack a NaN or Inf as it is (the bank's
  // `parameters_changed` checks finiteness in this pass instead of reading the weights twice),
  // the block formats throw.
  bool write_lanes(const float* src, Index k_stride, Index j_stride, Index cols, Index lane0,
                   Index lanes) {
    const auto at = [&](Index k, Index j) { return src[k * k_stride + j * j_stride]; };
    const auto non_finite = [](float v) {
      return non_finite_bits(std::bit_cast<std::uint32_t>(v));
    };
    std::atomic<bool> finite{true};
    const Index nr = panel_width();
    if constexpr (!kIsQuantized<W>) {
      if (j_stride == 1) {
        // A row-major source, float or bf16: one contiguous range of rows per thread, row by
        // row across every panel, so that reads run along the source rows and each panel gets
        // consecutive lines. For an S2 bank's three tensors on 2 threads (float): a task per
        // panel walking down K, 35-47 ms; tiles of 16 rows by 64 panels handed out
        // dynamically, 26-29 ms; this, 17-21 ms (a plain copy of the bytes: 11-13 ms). Ranges
        // start on even rows: a bf16 row pair never straddles two threads.
        // Float panels of 8 MiB or more (an S2 weight tensor: 14.7 MB; the backward's
        // activation rows, 128 per block by default, only from d_ff 16384 on) are written with
        // streaming stores, whole 64-byte lines that skip the cache and the read-for-ownership:
        // what the next product reads from memory anyway.
        // Repacking an S2 bank (2 threads, 8 runs of each alternated): 27-33 ms, median 29,
        // with plain stores; 14-25 ms, median 20, with these. bf16 packing gained nothing
        // (bound by its rounding), so it keeps plain stores.
        const bool stream = std::is_same_v<W, float> && MOET_X86 != 0 && lane0 % 4 == 0 &&
                            nr % 4 == 0 && data_.size() * sizeof(Storage) >= (std::size_t{8} << 20);
        parallel_ranges(rows_, kKGroup<W> == 2 ? 2 : 1, [&](Index k0, Index k1) {
          std::uint32_t bad = 0;
          // bf16 takes rows two at a time (a lane's pair of rows is one 32-bit word).
          for (Index k = k0; k < k1; k += kKGroup<W>) {
            const float* row = src + k * k_stride;
            for (Index p = 0; p < num_panels_; ++p) {
              const Index j0 = p * lanes;
              const Index width = std::min<Index>(lanes, cols - j0);
              Storage* panel = data_.data() + p * panel_stride();
              const float* s = row + j0;
              if constexpr (std::is_same_v<W, float>) {
                // A whole panel row has a width known here (a call to memmove and a check
                // loop per 64-128 bytes cost 3x the time of a plain copy; per 32 bytes, the
                // halves of an AVX2 GLU panel, an S2 bank's float repack took 277-328 ms
                // against 181-205 with the fixed width: bench_train BM_Repack, MOET_ISA=avx2).
                float* out = panel + k * nr + lane0;
                if (width == 32 && stream) {
                  bad |= copy_checked<32, true>(s, out);
                } else if (width == 32) {
                  bad |= copy_checked<32>(s, out);
                } else if (width == 16 && stream) {
                  bad |= copy_checked<16, true>(s, out);
                } else if (width == 16) {
                  bad |= copy_checked<16>(s, out);
                } else if (width == 8) {  // half a panel of an AVX2 GLU pair
                  bad |= copy_checked<8>(s, out);
                } else {
                  std::copy(s, s + width, out);
                  for (Index c = 0; c < width; ++c) bad |= non_finite(s[c]);
                }
              } else {
                Storage* out = panel + panel_offset<W>(k, lane0, nr);  // stride 2 per lane
                const bool pair = k + 1 < rows_;                       // else: the last, odd row
                Index c0 = 0;
#if MOET_X86
                if (pair) {
                  // 4 lanes' pairs rounded and interleaved per SSE store (the scalar loop
                  // stores 16 bits at a time).
                  c0 = width / 4 * 4;
                  bad |= interleave_bf16_rows(s, s + k_stride, c0, out);
                }
#endif
                for (Index c = c0; c < width; ++c) {
                  out[2 * c] = to_packed<W>(s[c]);
                  bad |= non_finite(s[c]);
                  if (pair) {
                    out[2 * c + 1] = to_packed<W>(s[k_stride + c]);
                    bad |= non_finite(s[k_stride + c]);
                  }
                }
              }
            }
          }
#if MOET_X86
          if (stream) _mm_sfence();
#endif
          if (bad != 0) finite.store(false, std::memory_order_relaxed);
        });
        return finite.load(std::memory_order_relaxed);
      }
    }
    if constexpr (kIsQuantized<W>) {
      // Checked before the parallel region (nothing may throw inside it).
      for (Index k = 0; k < rows_; ++k) {
        for (Index j = 0; j < cols; ++j) {
          require(std::isfinite(at(k, j)), "PackedMatrix", W::kName,
                  " weights must be finite, got ", at(k, j), " at row ", k, ", column ", j);
        }
      }
    }
    // Panels are independent: packed in parallel (the bytes do not depend on the split). A
    // block-format panel records its first block whose scale overflows half precision (only
    // they allocate the record: the backward packs float activations on every call).
    std::vector<Index> overflow(kIsQuantized<W> ? static_cast<std::size_t>(num_panels_) : 0, -1);
    const auto pack_panel = [&](Index p) {
      const Index j0 = p * lanes;
      const Index width = std::min<Index>(lanes, cols - j0);
      Storage* panel = data_.data() + p * panel_stride();
      std::uint32_t bad = 0;
      if constexpr (kIsQuantized<W>) {
        float x[kQuantBlock];
        typename W::Block block{};
        for (Index c = 0; c < width; ++c) {
          for (Index b0 = 0; b0 < rows_; b0 += kQuantBlock) {
            for (Index i = 0; i < kQuantBlock; ++i) {
              x[i] = b0 + i < rows_ ? at(b0 + i, j0 + c) : 0.0f;
            }
            quantize_block(x, block);
            bool fits = std::isfinite(from_f16(block.d));
            if constexpr (std::is_same_v<W, Q4_1>) fits = fits && std::isfinite(from_f16(block.m));
            if (!fits && overflow[static_cast<std::size_t>(p)] < 0) {
              overflow[static_cast<std::size_t>(p)] = c * rows_ + b0;
            }
            write_block(panel, b0 / kQuantBlock, lane0 + c, block);
          }
        }
      } else {
        // A transposed source, float or bf16 (a row-major one took the path above).
        Index k_done = 0;  // rows [0, k_done) of columns [0, c_done) written by the SSE path
        Index c_done = 0;
#if MOET_X86
        if (k_stride == 1) {
          // Blocks transposed in SSE registers (any x86-64): the scalar loop below costs a
          // load, a store and a check per value, each from another source row (float: 54 of a
          // 360 ms training step on S2; bf16: with it, a bf16 bank's bf16 backward was no faster
          // than the float one, 186-197 ms, and 135 ms with this and the paired row-major
          // path). Float: 4 x 4 blocks; bf16: a lane's pair of rows (k, k + 1) is two adjacent
          // source values, so 4 lanes x 8 rows are rounded and transposed as 32-bit pairs.
          c_done = width / 4 * 4;
          if constexpr (std::is_same_v<W, float>) {
            k_done = rows_ / 4 * 4;
            bad |=
                transpose_blocks(src + j0 * j_stride, j_stride, k_done, c_done, panel + lane0, nr);
          } else {
            k_done = rows_ / 8 * 8;
            bad |= transpose_bf16_blocks(src + j0 * j_stride, j_stride, k_done, c_done,
                                         panel + lane0 * kKGroup<W>, nr);
          }
        }
#endif
        // The rest (every value off x86), in tiles of kTile rows, so that the tile's panel lines
        // stay in L1 while each column's run of kTile contiguous source values is copied.
        constexpr Index kTile = 16;
        for (Index k0 = 0; k0 < rows_; k0 += kTile) {
          const Index k1 = std::min(rows_, k0 + kTile);
          for (Index c = 0; c < width; ++c) {
            for (Index k = c < c_done ? std::max(k0, k_done) : k0; k < k1; ++k) {
              const float v = at(k, j0 + c);
              panel[panel_offset<W>(k, lane0 + c, nr)] = to_packed<W>(v);
              bad |= non_finite(v);
            }
          }
        }
      }
      if (bad != 0) finite.store(false, std::memory_order_relaxed);
    };
    // One contiguous range of panels per thread (see parallel_ranges).
    parallel_ranges(num_panels_, 1, [&](Index first, Index last) {
      for (Index p = first; p < last; ++p) pack_panel(p);
    });
    if constexpr (kIsQuantized<W>) {
      for (Index p = 0; p < num_panels_; ++p) {
        const Index first_bad = overflow[static_cast<std::size_t>(p)];
        if (first_bad < 0) continue;
        const Index b0 = first_bad % rows_;
        fail("PackedMatrix", W::kName, " block of rows [", b0, ", ", b0 + kQuantBlock,
             "), column ", p * lanes + first_bad / rows_,
             ": its scale does not fit half precision (weights up to 6e4 times the largest "
             "code)");
      }
    }
    return finite.load(std::memory_order_relaxed);
  }

  // The one test for NaN or Inf of every pack: exponent bits all ones. 1 or 0, branch-free so
  // that or-ing it over a run vectorises.
  static constexpr std::uint32_t non_finite_bits(std::uint32_t bits) {
    return static_cast<std::uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
#if MOET_X86
  // The same for four floats (as bits) in an SSE register: ors all-ones lanes into `bad`.
  static void mark_non_finite(__m128i bits, __m128i& bad) {
    const __m128i exponent = _mm_set1_epi32(0x7f800000);
    bad = _mm_or_si128(bad, _mm_cmpeq_epi32(_mm_and_si128(bits, exponent), exponent));
  }
#endif

  // Copies `N` floats; returns 1 when one is NaN or Inf, 0 otherwise. `kStream`: with
  // non-temporal stores (`dst` 16-byte aligned; the writer fences before the data is read).
  // Fixed-size and branch-free: on x86 in SSE registers (any x86-64), elsewhere a loop the
  // compilers vectorise.
  template <std::size_t N, bool kStream = false>
  static std::uint32_t copy_checked(const float* src, float* dst) {
#if MOET_X86
    __m128i bad = _mm_setzero_si128();
    for (std::size_t i = 0; i < N; i += 4) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      if constexpr (kStream) {
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), v);
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), v);
      }
      mark_non_finite(v, bad);
    }
    return _mm_movemask_epi8(bad) != 0 ? 1U : 0U;
#else
    std::uint32_t bits[N];
    std::memcpy(bits, src, sizeof bits);
    std::memcpy(dst, bits, sizeof bits);
    std::uint32_t bad = 0;
    for (std::size_t i = 0; i < N; ++i) bad |= non_finite_bits(bits[i]);
    return bad;
#endif
  }

#if MOET_X86
  // The transposing packs' walk: `block(k, c)` for every block of 4 columns `c` (of the
  // destination: source rows) by `kStep` rows `k`, in tiles of 128 rows (see
  // `transpose_blocks`); `rows` a multiple of `kStep`, `cols` of 4.
  template <Index kStep, class Block>
  static void for_each_tile_block(Index rows, Index cols, Block&& block) {
    constexpr Index kTile = 128;
    for (Index k0 = 0; k0 < rows; k0 += kTile) {
      const Index k1 = std::min(rows, k0 + kTile);
      for (Index c = 0; c < cols; c += 4) {
        for (Index k = k0; k < k1; k += kStep) block(k, c);
      }
    }
  }

  // `dst[k ld_dst + c] = src[c ld_src + k]` for `k < rows`, `c < cols` (both multiples of 4),
  // in 4 x 4 blocks through SSE registers, tiles of 128 rows at a time (the tile's 16 KiB of
  // destination lines stay in L1 while each source row gives 512 contiguous bytes; for an S2
  // bank's three tensors on 2 threads, tiles of 16 rows took 35 ms, 64 rows 24-32, 128 to 256
  // rows 23, 512 rows 29); returns 1 when a value read is NaN or Inf (exponent bits all ones).
  static std::uint32_t transpose_blocks(const float* src, Index ld_src, Index rows, Index cols,
                                        float* dst, Index ld_dst) {
    __m128i bad = _mm_setzero_si128();
    const auto check = [&](__m128 v) { mark_non_finite(_mm_castps_si128(v), bad); };
    for_each_tile_block<4>(rows, cols, [&](Index k, Index c) {
      const float* s = src + c * ld_src + k;
      __m128 r0 = _mm_loadu_ps(s);
      __m128 r1 = _mm_loadu_ps(s + ld_src);
      __m128 r2 = _mm_loadu_ps(s + 2 * ld_src);
      __m128 r3 = _mm_loadu_ps(s + 3 * ld_src);
      check(r0);
      check(r1);
      check(r2);
      check(r3);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      float* d = dst + k * ld_dst + c;
      _mm_storeu_ps(d, r0);
      _mm_storeu_ps(d + ld_dst, r1);
      _mm_storeu_ps(d + 2 * ld_dst, r2);
      _mm_storeu_ps(d + 3 * ld_dst, r3);
    });
    return _mm_movemask_epi8(bad) != 0 ? 1U : 0U;
  }

  // bf16: rows `a` and `b` (rows k and k + 1 of K) of `cols` lanes (a multiple of 4) into
  // their pair row `dst` (lane c's pair at `dst[2 c]`, `dst[2 c + 1]`), rounded as `to_bf16`
  // does. Returns 1 when a value read is NaN or Inf.
  static std::uint32_t interleave_bf16_rows(const float* a, const float* b, Index cols, Bf16* dst) {
    __m128i bad = _mm_setzero_si128();
    for (Index c = 0; c < cols; c += 4) {
      const __m128i ra = bf16_round(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + c)), bad);
      const __m128i rb = bf16_round(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + c)), bad);
      // Upper halves: an arithmetic shift keeps them in int16's range, so the saturating pack
      // copies their bits; then a's and b's bf16 alternate.
      const __m128i ha = _mm_packs_epi32(_mm_srai_epi32(ra, 16), _mm_setzero_si128());
      const __m128i hb = _mm_packs_epi32(_mm_srai_epi32(rb, 16), _mm_setzero_si128());
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * c), _mm_unpacklo_epi16(ha, hb));
    }
    return _mm_movemask_epi8(bad) != 0 ? 1U : 0U;
  }

  // Four floats (as bits) rounded to bf16 as `to_bf16` does (nearest even; NaN quietened),
  // each in the upper half of its 32-bit lane; ors into `bad` the lanes that are NaN or Inf.
  static __m128i bf16_round(__m128i u, __m128i& bad) {
    mark_non_finite(u, bad);
    const __m128i exponent = _mm_set1_epi32(0x7f800000);
    const __m128i nan = _mm_cmpgt_epi32(_mm_and_si128(u, _mm_set1_epi32(0x7fffffff)), exponent);
    const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
    const __m128i rounded = _mm_add_epi32(_mm_add_epi32(u, _mm_set1_epi32(0x7fff)), lsb);
    return _mm_or_si128(_mm_and_si128(nan, _mm_or_si128(u, _mm_set1_epi32(0x00400000))),
                        _mm_andnot_si128(nan, rounded));
  }

  // bf16: `dst[panel_offset(k, c, nr)] = to_bf16(src[c ld_src + k])` for `k < rows` (a
  // multiple of 8), `c < cols` (a multiple of 4), `dst` at lane 0 of the lanes written. Each of
  // 4 source rows gives 8 values (4 pairs of rows of K) rounded as `to_bf16` does (NaN
  // quietened); the 4 x 4 pairs are transposed as 32-bit words, so that each store is one
  // pair row of 4 lanes. Tiles of 128 rows as `transpose_blocks`. Returns 1 when a value read
  // is NaN or Inf.
  static std::uint32_t transpose_bf16_blocks(const float* src, Index ld_src, Index rows, Index cols,
                                             Bf16* dst, Index nr) {
    __m128i bad = _mm_setzero_si128();
    // The 8 bf16 of a source row's values k .. k + 7, in order (4 pairs (k, k + 1) as 32-bit
    // words): the arithmetic shift keeps each half in int16's range, so the saturating pack
    // copies its bits.
    const auto pairs = [&](const float* s) {
      const __m128i lo = bf16_round(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)), bad);
      const __m128i hi = bf16_round(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 4)), bad);
      return _mm_castsi128_ps(_mm_packs_epi32(_mm_srai_epi32(lo, 16), _mm_srai_epi32(hi, 16)));
    };
    for_each_tile_block<8>(rows, cols, [&](Index k, Index c) {
      const float* s = src + c * ld_src + k;
      __m128 r0 = pairs(s);
      __m128 r1 = pairs(s + ld_src);
      __m128 r2 = pairs(s + 2 * ld_src);
      __m128 r3 = pairs(s + 3 * ld_src);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_i: pair row k / 2 + i of lanes c .. c + 3
      Bf16* d = dst + (k / 2) * 2 * nr + 2 * c;
      _mm_storeu_ps(reinterpret_cast<float*>(d), r0);
      _mm_storeu_ps(reinterpret_cast<float*>(d + 2 * nr), r1);
      _mm_storeu_ps(reinterpret_cast<float*>(d + 4 * nr), r2);
      _mm_storeu_ps(reinterpret_cast<float*>(d + 6 * nr), r3);
    });
    return _mm_movemask_epi8(bad) != 0 ? 1U : 0U;
  }
#endif

  // Block formats: writes ready blocks into lanes [lane0, lane0 + lanes) of consecutive
  // panels. `blocks` holds one row of ceil(K / 32) blocks per output column (GGUF's layout of a
  // weight `[out, in]`, `in` = K): column j's block b at `blocks[j * nb + b]`. Refuses blocks
  // whose scale (or minimum) is not finite.
  template <class Block>
  void write_lanes_from_blocks(std::span<const Block> blocks, Index lane0, Index lanes,
                               const char* what) {
    const Index nb = (rows_ + kQuantBlock - 1) / kQuantBlock;
    const Index cols = cols_;
    require(static_cast<Index>(blocks.size()) == nb * cols, "PackedMatrix", what, ": ", cols,
            " columns of ", nb, " blocks need ", nb * cols, " ", W::kName, " blocks, got ",
            blocks.size());
    for (Index p = 0; p < num_panels_; ++p) {
      const Index j0 = p * lanes;
      const Index width = std::min<Index>(lanes, cols - j0);
      Storage* panel = data_.data() + p * panel_stride();
      for (Index c = 0; c < width; ++c) {
        for (Index b = 0; b < nb; ++b) {
          const Block& block = blocks[static_cast<std::size_t>((j0 + c) * nb + b)];
          bool fits = std::isfinite(from_f16(block.d));
          if constexpr (std::is_same_v<Block, BlockQ4_1>) fits = fits && std::isfinite(from_f16(block.m));
          require(fits, "PackedMatrix", what, ": ", W::kName, " block ", b, " of column ", j0 + c,
                  " has a non-finite scale");
          write_block(panel, b, lane0 + c, block);
        }
      }
    }
  }

  // Block formats: writes `block` as block `b` of lane `lane` of `panel`.
  template <class Block>
  void write_block(Storage* panel, Index b, Index lane, const Block& block) {
    using L = QuantBlockLayout<W>;
    const Index nr = panel_width();
    std::memcpy(panel + L::scales(b, nr) + 2 * lane, &block.d, 2);
    std::uint8_t* codes = panel + L::codes(b, nr);
    if constexpr (std::is_same_v<W, Q8_0>) {
      for (Index i = 0; i < kQuantBlock; ++i) {
        codes[(i / 4) * 4 * nr + 4 * lane + i % 4] =
            static_cast<std::uint8_t>(block_code(block, i) + PackFormat<W>::kCodeOffset);
      }
    } else {
      if constexpr (std::is_same_v<W, Q4_1>) std::memcpy(panel + L::mins(b, nr) + 2 * lane, &block.m, 2);
      for (Index i = 0; i < kQuantBlock / 2; ++i) {
        const auto lo = static_cast<unsigned>(block_code(block, i));
        const auto hi = static_cast<unsigned>(block_code(block, i + kQuantBlock / 2));
        codes[(i / 4) * 4 * nr + 4 * lane + i % 4] = static_cast<std::uint8_t>(lo | (hi << 4));
      }
    }
  }

  // The packed value at row k, lane `lane` of panel p.
  float value(Index p, Index k, Index lane) const {
    const Index nr = panel_width();
    const Storage* panel = data_.data() + p * panel_stride();
    if constexpr (kIsQuantized<W>) {
      using L = QuantBlockLayout<W>;
      const Index b = k / kQuantBlock;
      const Index i = k % kQuantBlock;
      std::uint16_t d = 0;
      std::memcpy(&d, panel + L::scales(b, nr) + 2 * lane, 2);
      const std::uint8_t* codes = panel + L::codes(b, nr);
      if constexpr (std::is_same_v<W, Q8_0>) {
        const int q = codes[(i / 4) * 4 * nr + 4 * lane + i % 4] - PackFormat<W>::kCodeOffset;
        return from_f16(d) * static_cast<float>(q);
      } else {
        const Index j = i % (kQuantBlock / 2);
        const std::uint8_t byte = codes[(j / 4) * 4 * nr + 4 * lane + j % 4];
        const int q = i < kQuantBlock / 2 ? (byte & 0xf) : (byte >> 4);
        if constexpr (std::is_same_v<W, Q4_1>) {
          std::uint16_t m = 0;
          std::memcpy(&m, panel + L::mins(b, nr) + 2 * lane, 2);
          return from_f16(d) * static_cast<float>(q) + from_f16(m);
        } else {
          return from_f16(d) * static_cast<float>(q - PackFormat<W>::kCodeOffset);
        }
      }
    } else {
      return packed_value(panel[panel_offset<W>(k, lane, nr)]);
    }
  }

 private:
  Index rows_ = 0;
  Index cols_ = 0;
  Index num_panels_ = 0;
  KernelIsa isa_ = KernelIsa::kPortable;
  AlignedVector<Storage> data_;  // num_panels panels of panel_stride() units
};

/// A `(K, N)` right-hand matrix (expert weights) packed once for `gemm_packed`: panel `p` holds
/// columns `[p nr, (p + 1) nr)` (`nr = panel_width()`) for all `K` rows, ordered by
/// `panel_offset`; columns past `N` and the pad row of an odd `K` (bf16) are zero.
///
/// \tparam W element type: `float`, `Bf16` (the float weights rounded to nearest even), or a
///   block format (`Q8_0`, `Q4_0`, `Q4_1`: each column's blocks of 32 rows quantised).
///
/// ```cpp
/// moet::detail::PackedMatrix<float> wd(experts.down_weights(e));  // (hidden_dim, model_dim)
/// ```
template <class W>
class PackedMatrix : public PackedPanels<W> {
 public:
  /// An empty `(0, 0)` matrix.
  PackedMatrix() = default;
  /// Packs `b` `(K, N)` for level `isa`.
  explicit PackedMatrix(const ConstRows<float>& b, KernelIsa isa = kernel_isa()) { pack(b, isa); }

  /// Packs `b` `(K, N)` (any row-major view, e.g. a block with an outer stride) for level `isa`,
  /// replacing the previous contents. Throws `moet::Error` when `isa` is above what the CPU has.
  /// Returns whether every value of `b` is finite (float and bf16 pack a NaN or Inf as it is;
  /// the block formats throw on one).
  bool pack(const ConstRows<float>& b, KernelIsa isa = kernel_isa()) {
    const Index nr = detail::panel_width(isa);
    this->shape(b.rows(), b.cols(), (b.cols() + nr - 1) / nr, isa, /*keep=*/true);
    return this->write_lanes(b, 0, this->panel_width());
  }

  /// Packs `B = bt^T` from `bt` `(N, K)` row-major (e.g. a weight `W` `(K', K)` packed as `W^T`
  /// for the backward product `dX = dY W^T`), replacing the previous contents.
  bool pack_transposed(const ConstRows<float>& bt, KernelIsa isa = kernel_isa()) {
    const Index nr = detail::panel_width(isa);
    this->shape(bt.cols(), bt.rows(), (bt.rows() + nr - 1) / nr, isa, /*keep=*/true);
    return this->write_lanes(bt.data(), 1, bt.outerStride(), bt.rows(), 0, this->panel_width());
  }

  /// Shapes the storage for a `(K, N)` matrix laid out for `isa`, every element zero.
  void reset(Index k, Index n, KernelIsa isa = kernel_isa()) {
    const Index nr = detail::panel_width(isa);
    this->shape(k, n, (n + nr - 1) / nr, isa);
  }

  /// Block formats: packs a `(K, N)` matrix from ready blocks without re-quantising them (a GGUF
  /// tensor `[N][K]`: `N` rows of `ceil(K / 32)` blocks). Throws `moet::Error` on a wrong block
  /// count or a non-finite scale.
  template <class Block>
  void pack_blocks(std::span<const Block> blocks, Index k, Index n, KernelIsa isa = kernel_isa()) {
    static_assert(std::is_same_v<Block, typename W::Block>, "blocks of the matrix's format");
    reset(k, n, isa);
    this->write_lanes_from_blocks(blocks, 0, this->panel_width(), "pack_blocks");
  }

  /// The packed value of entry `(k, j)` of the original matrix (for tests and debugging).
  float packed_coeff(Index k, Index j) const {
    const Index nr = this->panel_width();
    return this->value(j / nr, k, j % nr);
  }
};

/// The gate and up weights of one gated-linear-unit expert, `Wg` and `Wu` `(K, F)`, packed
/// together for `glu_packed` so that one packed row group of `A` feeds both products: lanes
/// `[0, nr / 2)` of panel `p` hold `Wg` columns `[p nr / 2, (p + 1) nr / 2)`, lanes
/// `[nr / 2, nr)` the same columns of `Wu` (one register of gate, one of up, so the epilogue
/// `Act(g) * u` pairs registers directly). Zero padded past `F` and in the pad row of an odd
/// `K` (bf16).
///
/// \tparam W element type (as `PackedMatrix`).
template <class W>
class PackedGluMatrix : public PackedPanels<W> {
 public:
  /// An empty `(0, 0)` pair.
  PackedGluMatrix() = default;
  /// Packs `gate` and `up`, both `(K, F)`, for level `isa`.
  PackedGluMatrix(const ConstRows<float>& gate, const ConstRows<float>& up,
                  KernelIsa isa = kernel_isa()) {
    pack(gate, up, isa);
  }

  /// Packs `gate` and `up`, both `(K, F)`, replacing the previous contents. Throws
  /// `moet::Error` when their shapes differ. Returns whether every value is finite (as
  /// `PackedMatrix::pack`).
  bool pack(const ConstRows<float>& gate, const ConstRows<float>& up,
            KernelIsa isa = kernel_isa()) {
    require(gate.rows() == up.rows() && gate.cols() == up.cols(), "PackedGluMatrix",
            "gate and up weights must have the same shape, got (", gate.rows(), ", ", gate.cols(),
            ") and (", up.rows(), ", ", up.cols(), ")");
    const Index half = detail::panel_width(isa) / 2;
    this->shape(gate.rows(), gate.cols(), (gate.cols() + half - 1) / half, isa, /*keep=*/true);
    const bool gate_finite = pack_gate(gate);
    return pack_up(up) && gate_finite;
  }

  /// Shapes the storage for `(K, F)` gate and up weights laid out for `isa`, every element zero.
  void reset(Index k, Index f, KernelIsa isa = kernel_isa()) {
    const Index half = detail::panel_width(isa) / 2;
    this->shape(k, f, (f + half - 1) / half, isa);
  }

  /// Block formats: packs the gate (or up) weights from ready blocks (`F` rows of
  /// `ceil(K / 32)` blocks, GGUF's `[F][K]`), without re-quantising, into the shape of the last
  /// `reset`.
  template <class Block>
  void pack_gate_blocks(std::span<const Block> blocks) {
    static_assert(std::is_same_v<Block, typename W::Block>, "blocks of the matrix's format");
    this->write_lanes_from_blocks(blocks, 0, this->panel_width() / 2, "pack_gate_blocks");
  }
  template <class Block>
  void pack_up_blocks(std::span<const Block> blocks) {
    static_assert(std::is_same_v<Block, typename W::Block>, "blocks of the matrix's format");
    const Index half = this->panel_width() / 2;
    this->write_lanes_from_blocks(blocks, half, half, "pack_up_blocks");
  }

  /// Packs the gate weights `gate` `(K, F)` alone, leaving the up weights as they are (the
  /// shape must be the one of the last `reset` or `pack`; throws `moet::Error` otherwise).
  bool pack_gate(const ConstRows<float>& gate) { return pack_half(gate, 0, "gate"); }
  /// Packs the up weights `up` `(K, F)` alone (as `pack_gate`).
  bool pack_up(const ConstRows<float>& up) { return pack_half(up, this->panel_width() / 2, "up"); }

  /// The packed gate (`up = false`) or up weight at `(k, j)` (for tests and debugging).
  float packed_coeff(Index k, Index j, bool up) const {
    const Index half = this->panel_width() / 2;
    return this->value(j / half, k, j % half + (up ? half : 0));
  }

 private:
  bool pack_half(const ConstRows<float>& src, Index lane0, const char* which) {
    require(src.rows() == this->rows() && src.cols() == this->cols(), "PackedGluMatrix", which,
            " weights must be (", this->rows(), ", ", this->cols(), "), got (", src.rows(), ", ",
            src.cols(), ")");
    return this->write_lanes(src, lane0, this->panel_width() / 2);
  }
};

/// Rows of row group `g` of `groups` groups splitting `rows` rows as evenly as possible (the
/// first `rows % groups` groups get one more row), and the group's first row.
inline void row_group(Index rows, Index groups, Index g, Index& first, Index& size) {
  const Index base = rows / groups;
  const Index extra = rows % groups;
  size = base + (g < extra ? 1 : 0);
  first = g * base + std::min(g, extra);
}

/// Copies `rows` rows of `a` (row stride `lda`, `k` columns `k_stride` apart: 1 for a row-major
/// `A`, the leading dimension for `A` given as its row-major transpose) into `dst` as `groups` packed row
/// groups: group `g` (rows `first .. first + m`) at `dst + first kp`, laid out `[kp][m]`, the
/// columns `[k, kp)` zero (`kp >= k`: the padded depth of block-format weights; `k` by default).
inline void pack_row_groups(const float* a, Index lda, Index rows, Index k, Index groups,
                            float* dst, Index kp = -1, Index k_stride = 1) {
  if (kp < k) kp = k;
  for (Index g = 0; g < groups; ++g) {
    Index first = 0;
    Index m = 0;
    row_group(rows, groups, g, first, m);
    float* group = dst + first * kp;
    if (k_stride != 1) {
      // A given as its transpose: each column kk of the group is `m` values along row kk of
      // the transpose, read in order. (Walking a row of A instead reads one value per row of
      // the transpose: every load in another line, those lines 4 KiB apart in the weight
      // gradients' products, evicting each other from L1: 2.1 ns per value against 0.5 now,
      // and 0.2 for a row-major A, on one Zen 5 core.)
      for (Index kk = 0; kk < k; ++kk) {
        const float* src = a + first * lda + kk * k_stride;
        for (Index r = 0; r < m; ++r) group[kk * m + r] = src[r * lda];
      }
      std::fill(group + k * m, group + kp * m, 0.0f);
      continue;
    }
    for (Index r = 0; r < m; ++r) {
      const float* src = a + (first + r) * lda;
      for (Index kk = 0; kk < k; ++kk) group[kk * m + r] = src[kk];
      for (Index kk = k; kk < kp; ++kk) group[kk * m + r] = 0.0f;
    }
  }
}

/// The bf16 form of `pack_row_groups`: rows rounded to bf16, group `g` at
/// `dst + first padded_depth(k)`, laid out `[k / 2][m][2]` (the 32-bit pairs the bf16 kernels
/// broadcast), an odd `k` padded with a zero column.
inline void pack_row_groups(const float* a, Index lda, Index rows, Index k, Index groups,
                            Bf16* dst, Index /*kp*/ = -1, Index k_stride = 1) {
  const Index kp = padded_depth<Bf16>(k);
  for (Index g = 0; g < groups; ++g) {
    Index first = 0;
    Index m = 0;
    row_group(rows, groups, g, first, m);
    Bf16* group = dst + first * kp;
    if (k_stride != 1) {  // A given as its transpose: along its rows (see the float form)
      for (Index kk = 0; kk < k; ++kk) {
        const float* src = a + first * lda + kk * k_stride;
        Bf16* col = group + (kk / 2) * 2 * m + kk % 2;
        for (Index r = 0; r < m; ++r) col[2 * r] = to_bf16(src[r * lda]);
      }
      if (kp != k) {
        for (Index r = 0; r < m; ++r) group[(k / 2) * 2 * m + 2 * r + 1] = Bf16{};
      }
      continue;
    }
    for (Index r = 0; r < m; ++r) {
      const float* src = a + (first + r) * lda;
      for (Index kk = 0; kk < k; ++kk) group[(kk / 2) * 2 * m + 2 * r + kk % 2] = to_bf16(src[kk]);
      if (kp != k) group[(k / 2) * 2 * m + 2 * r + 1] = Bf16{};
    }
  }
}

/// The rows of `A` quantised for the integer kernels (block formats on levels with
/// `vpdpbusd`): each row's blocks of 32 values become 8-bit codes `qx = round(x / dx)` with
/// `dx = max|x| / 127` (as ggml's `Q8_0`, with a float scale; rows past `k` are zero), stored
/// per group `g` (rows `first .. first + m`, `kp = padded_depth(k)`, `nb = kp / 32`):
/// - codes at `codes + first kp`, laid out `[block][4-row group][m][4]` (one 32-bit word per
///   row and 4 consecutive values, the broadcast operand of `vpdpbusd`);
/// - `dx` at `scales + first nb` and `sum(qx)` at `sums + first nb`, laid out `[block][m]`.
inline void pack_quantized_row_groups(const float* a, Index lda, Index rows, Index k, Index groups,
                                      std::int8_t* codes, float* scales, std::int32_t* sums,
                                      Index k_stride = 1) {
  const Index kp = (k + kQuantBlock - 1) / kQuantBlock * kQuantBlock;
  const Index nb = kp / kQuantBlock;
  for (Index g = 0; g < groups; ++g) {
    Index first = 0;
    Index m = 0;
    row_group(rows, groups, g, first, m);
    std::int8_t* group = codes + first * kp;
    for (Index r = 0; r < m; ++r) {
      const float* src = a + (first + r) * lda;
      for (Index b = 0; b < nb; ++b) {
        float amax = 0.0f;
        const Index len = std::min<Index>(kQuantBlock, k - b * kQuantBlock);
        for (Index i = 0; i < len; ++i) {
          amax = std::max(amax, std::abs(src[(b * kQuantBlock + i) * k_stride]));
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        std::int32_t sum = 0;
        std::int8_t* block = group + b * kQuantBlock * m;
        for (Index i = 0; i < kQuantBlock; ++i) {
          const auto q = i < len ? static_cast<std::int8_t>(
                                       std::round(src[(b * kQuantBlock + i) * k_stride] * id))
                                 : std::int8_t{0};
          block[(i / 4) * 4 * m + 4 * r + i % 4] = q;
          sum += q;
        }
        scales[(first * nb) + b * m + r] = d;
        sums[(first * nb) + b * m + r] = sum;
      }
    }
  }
}

}  // namespace moet::detail
