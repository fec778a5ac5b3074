#pragma once
/// \file detail/gemm.hpp
/// Packed-weight matrix products for the expert banks: `C = A B` (`gemm_packed`) and the fused
/// gated-linear-unit product `H = Act(A Wg) ⊙ (A Wu)` (`glu_packed`), single-threaded, float.
///
/// Weights are packed once (`PackedMatrix`, `PackedGluMatrix`) into column panels of width
/// `kGemmNr`, each panel holding all `K` rows contiguously (`[panel][k][kGemmNr]`, zero padded
/// on the right). A call packs the rows of `A` into the caller's scratch, groups them in row
/// groups of at most `kGemmMr` rows and runs a register-blocked micro-kernel (`m x kGemmNr`
/// accumulators, `m <= kGemmMr`; on AVX2 + FMA a 6 x 16 tile in 12 ymm registers):
/// ```
/// for each row block (<= 144 rows, equal sizes)   pack its rows of A (scratch)
///   for each column chunk (16 panels)              running sums of a chunk stay in L2
///     for each K block (kGemmKc = 256 rows)        the packed A block stays in L2
///       for each panel of the chunk                its 16 KiB weight block stays in L1 ...
///         for each row group                       ... while every row group reuses it
///           micro-kernel: acc (+)= A_group B_block in registers; prefetch the next panel's
///           block into L2 (and 1 KiB ahead into L1)
/// ```
/// Few rows (`n <= kGemmFewRows = 8`: decode, small batches) are one row block with no K
/// blocking: the weights stream from memory once, with software prefetch 16 KiB ahead. With
/// `n <= kGemmMr` (one row group) a kernel call covers several panels (`few_row_panels`) so that
/// enough independent FMA chains hide the FMA latency; with two groups the second one re-reads
/// the panel from L2 while prefetching the next panel.
///
/// Determinism: every output element is one sequential chain of fused multiply-adds over
/// `k = 0, 1, ..., K - 1`, starting from 0 (or from the old `C` in accumulate mode). K blocking
/// only parks the running sum in memory between blocks, which is exact, so the bits of an
/// element depend on neither the row count `n`, the other rows in the call, the row grouping,
/// the blocking parameters, nor the thread that runs the call: a row computed alone equals the
/// same row computed inside any block (tests/test_gemm.cpp checks this bit for bit). Results
/// do depend on the instruction set (`kSimdName`): FMA rounds once where the portable loops
/// may round twice.
///
/// bf16 weights (`PackedMatrix<Bf16>`, `PackedGluMatrix<Bf16>`; `WeightFormat::kBf16` banks):
/// the same driver and blocking, with rows of `K` packed in pairs (`kKGroup`, an odd `K` padded
/// with a zero row) and the rows of `A` rounded to bf16 when they are packed. With AVX512-BF16
/// the micro-kernel is one `vdpbf16ps` per accumulator and row pair (exact bf16 products, float
/// accumulation: twice the multiply-adds of an FMA per instruction, half the weight bytes);
/// other builds run portable loops with the same products. Each output element is one chain
/// over the row pairs `k = 0, 2, 4, ...`, so the determinism guarantee below holds for bf16 too.
///
/// The instruction set is chosen at compile time (detail/simd.hpp); the portable kernels are
/// plain loops the compiler can vectorise and are always compiled, so `KernelPath::kPortable`
/// can be requested (tests do) from any build.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <new>
#include <type_traits>
#include <vector>

#include "moet/detail/bf16.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/simd.hpp"
#include "moet/errors.hpp"
#include "moet/experts/activations.hpp"
#include "moet/tensor.hpp"

#if defined(__GNUC__)
#define MOET_NOINLINE __attribute__((noinline))
#else
#define MOET_NOINLINE
#endif

namespace moet::detail {

inline namespace MOET_SIMD_NAMESPACE {

// --- blocking parameters --------------------------------------------------------------------

#if MOET_SIMD_AVX512
/// Rows of the largest micro-tile: 8 rows x 2 zmm = 16 of the 32 zmm registers accumulate.
inline constexpr int kGemmMr = 8;
/// Panel width: two 16-float zmm registers.
inline constexpr int kGemmNr = 32;
#elif MOET_SIMD_AVX2
/// Rows of the largest micro-tile: 6 rows x 2 ymm = 12 accumulators, plus 2 registers of B and
/// 1 broadcast of A out of 16; 12 independent FMA chains cover the 4-cycle FMA latency of two
/// FMA pipes (8 in flight needed).
inline constexpr int kGemmMr = 6;
/// Panel width: two 8-float ymm registers.
inline constexpr int kGemmNr = 16;
#else
/// Rows of the largest micro-tile (portable loops).
inline constexpr int kGemmMr = 6;
/// Panel width (portable loops): two SSE vectors.
inline constexpr int kGemmNr = 8;
#endif

/// Rows of `B` per K block: a `kGemmKc x kGemmNr` weight block is 16 KiB on AVX2 (256 x 16 x 4
/// bytes), half of a 32 KiB L1d, reused from L1 by every row group of a row block.
inline constexpr Index kGemmKc = 256;
/// Most rows per row block (24 groups of 6): each weight block fetched from memory serves up to
/// 24 micro-kernel calls, and a K block of the packed rows (144 x 256 x 4 bytes = 144 KiB)
/// stays in a 512 KiB L2.
inline constexpr Index kGemmMaxRowBlock = 144;
/// Panels per column chunk: the running sums of a chunk (`rows x kGemmChunkPanels kGemmNr`,
/// 144 KiB at most on AVX2) stay in L2 between K blocks; also bounds `glu_packed`'s scratch.
inline constexpr Index kGemmChunkPanels = 16;
/// Rows up to which a call is "few rows" (decode, small batches): one row block, no K blocking
/// (up to `kGemmFewRowsKc`), weights streamed once with software prefetch.
inline constexpr Index kGemmFewRows = 8;
/// K block of few-row calls with two row groups (7 or 8 rows): the second group re-reads a
/// `kGemmFewRowsKc x kGemmNr` weight block (256 KiB) from L2.
inline constexpr Index kGemmFewRowsKc = 4096;
/// Far prefetch (into L2) along the weight stream of few-row calls, in floats: 4096 floats =
/// 256 rows of a panel = 16 KiB ahead per panel stream, which covers the DRAM latency of a
/// loaded VM at ~40 GB/s (measured on the EPYC development machine: shorter distances lose
/// bandwidth, longer ones gain nothing).
inline constexpr Index kGemmStreamPrefetch = 4096;
/// Near prefetch (into L1) along every weight panel, in floats: 16 rows = 1 KiB ahead.
inline constexpr Index kGemmNearPrefetch = 256;

/// Panels a few-row call (`m <= kGemmMr` rows) processes at once: enough that `m * 2 * P`
/// accumulators give at least 8 independent FMA chains, within the register file.
constexpr int few_row_panels(int m) {
#if MOET_SIMD_AVX512
  return m == 1 ? 4 : m == 2 ? 4 : m <= 4 ? 2 : 1;  // <= 16 accumulators of 32 registers
#elif MOET_SIMD_AVX2
  return m == 1 ? 4 : m == 2 ? 3 : m == 3 ? 2 : 1;  // <= 12 accumulators of 16 registers
#else
  static_cast<void>(m);
  return 1;
#endif
}

/// Rows per row block for `n > kGemmMr` rows: `n` split into `ceil(n / kGemmMaxRowBlock)` blocks
/// of nearly equal size, rounded up to a multiple of `kGemmMr` (no short last block that would
/// stream the weights once more for a handful of rows).
inline Index gemm_row_block(Index n) {
  const Index blocks = (n + kGemmMaxRowBlock - 1) / kGemmMaxRowBlock;
  const Index even = (n + blocks - 1) / blocks;
  return (even + kGemmMr - 1) / kGemmMr * kGemmMr;
}

/// Bytes of alignment of packed weights (one cache line; AVX-512 vector size).
inline constexpr std::size_t kPackAlignBytes = kBufferAlignBytes;

// --- packed weights -------------------------------------------------------------------------

/// True for the element types packed weights can have: `float`, and `Bf16` (detail/bf16.hpp).
template <class W>
inline constexpr bool kIsPackedElement = std::is_same_v<W, float> || std::is_same_v<W, Bf16>;

/// Consecutive rows of `K` packed together: 2 for bf16, whose dot-product instruction
/// multiplies pairs (`k`, `k + 1`) of both operands; 1 for float.
template <class W>
inline constexpr Index kKGroup = std::is_same_v<W, Bf16> ? 2 : 1;

/// `k` rounded up to a multiple of `kKGroup<W>` (bf16 pads an odd `K` with a zero row).
template <class W>
constexpr Index padded_depth(Index k) {
  return (k + kKGroup<W> - 1) / kKGroup<W> * kKGroup<W>;
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

/// Offset, inside one panel, of row `k` and lane `lane` (`< kGemmNr`): `[k][lane]` for float,
/// `[k / 2][lane][k % 2]` for bf16 (each 32-bit word holds the pair one `vdpbf16ps` lane
/// multiplies).
template <class W>
constexpr Index panel_offset(Index k, Index lane) {
  constexpr Index kG = kKGroup<W>;
  return (k / kG) * (kGemmNr * kG) + lane * kG + k % kG;
}

/// A `(K, N)` right-hand matrix (expert weights) packed once for `gemm_packed`.
///
/// Layout: `num_panels() = ceil(N / kGemmNr)` column panels, panel `p` holding columns
/// `[p kGemmNr, (p + 1) kGemmNr)` for all `K` rows (`panel_offset` gives the order within a
/// panel: row after row for float, row pairs interleaved for bf16), columns past `N` and the
/// pad row of an odd `K` (bf16) zero. Storage is 64-byte aligned, allocated with `new` (never by
/// Eigen), and reused by a later `pack` of a matrix no larger. The layout depends on the
/// instruction set (`kGemmNr`), so pack and multiply in translation units built alike.
///
/// \tparam W element type: `float`, or `Bf16` (the float weights rounded to nearest even).
///
/// ```cpp
/// moet::detail::PackedMatrix<float> wd(experts.down_weights(e));  // (hidden_dim, model_dim)
/// ```
template <class W>
class PackedMatrix {
  static_assert(kIsPackedElement<W>, "PackedMatrix elements are float or Bf16");

 public:
  using Element = W;
  /// Columns per panel.
  static constexpr Index kPanelWidth = kGemmNr;

  /// An empty `(0, 0)` matrix.
  PackedMatrix() = default;
  /// Packs `b` `(K, N)`.
  explicit PackedMatrix(const ConstRows<float>& b) { pack(b); }

  /// Packs `b` `(K, N)` (any row-major view, e.g. a block with an outer stride), replacing the
  /// previous contents.
  void pack(const ConstRows<float>& b) {
    reset(b.rows(), b.cols());
    for (Index p = 0; p < num_panels_; ++p) {
      const Index j0 = p * kPanelWidth;
      const Index width = std::min<Index>(kPanelWidth, cols_ - j0);
      W* panel = data_.data() + p * panel_stride();
      for (Index k = 0; k < rows_; ++k) {
        const float* src = b.data() + k * b.outerStride() + j0;
        for (Index c = 0; c < width; ++c) panel[panel_offset<W>(k, c)] = to_packed<W>(src[c]);
      }
    }
  }

  /// Shapes the storage for a `(K, N)` matrix, every element zero (the reused storage is not
  /// released).
  void reset(Index k, Index n) {
    rows_ = k;
    cols_ = n;
    num_panels_ = (cols_ + kPanelWidth - 1) / kPanelWidth;
    data_.assign(static_cast<std::size_t>(num_panels_ * panel_stride()), W{});
  }

  /// Bytes of packed storage (padding included).
  std::size_t bytes() const { return data_.size() * sizeof(W); }

  /// Rows `K` of the packed matrix.
  Index rows() const { return rows_; }
  /// Columns `N` of the packed matrix.
  Index cols() const { return cols_; }
  /// Column panels, `ceil(N / kPanelWidth)`.
  Index num_panels() const { return num_panels_; }
  /// Elements between the starts of two consecutive panels, `padded_depth(K) * kPanelWidth`.
  Index panel_stride() const { return padded_depth<W>(rows_) * kPanelWidth; }
  /// Start of the packed storage (64-byte aligned; null when empty).
  const W* data() const { return data_.data(); }
  /// The packed value of entry `(k, j)` of the original matrix (for tests and debugging).
  float packed_coeff(Index k, Index j) const {
    return packed_value(data_[static_cast<std::size_t>((j / kPanelWidth) * panel_stride() +
                                                       panel_offset<W>(k, j % kPanelWidth))]);
  }

 private:
  Index rows_ = 0;
  Index cols_ = 0;
  Index num_panels_ = 0;
  AlignedVector<W> data_;  // num_panels panels of panel_stride() elements
};

/// The gate and up weights of one gated-linear-unit expert, `Wg` and `Wu` `(K, F)`, packed
/// together for `glu_packed` so that one packed row group of `A` feeds both products.
///
/// Layout: panels of `kGemmNr` lanes covering `kHalf = kGemmNr / 2` hidden columns each: lanes
/// `[0, kHalf)` of panel `p` hold `Wg` columns `[p kHalf, (p + 1) kHalf)`, lanes
/// `[kHalf, kGemmNr)` the same columns of `Wu` (on AVX2 one ymm of gate, one of up, so the
/// epilogue `Act(g) * u` pairs registers directly), each panel ordered by `panel_offset`. Zero
/// padded past `F` (and the pad row of an odd `K`, bf16); 64-byte aligned.
///
/// \tparam W element type: `float` or `Bf16`.
template <class W>
class PackedGluMatrix {
  static_assert(kIsPackedElement<W>, "PackedGluMatrix elements are float or Bf16");

 public:
  using Element = W;
  /// Lanes per panel.
  static constexpr Index kPanelWidth = kGemmNr;
  /// Hidden columns per panel.
  static constexpr Index kHalf = kGemmNr / 2;

  /// An empty `(0, 0)` pair.
  PackedGluMatrix() = default;
  /// Packs `gate` and `up`, both `(K, F)`.
  PackedGluMatrix(const ConstRows<float>& gate, const ConstRows<float>& up) { pack(gate, up); }

  /// Packs `gate` and `up`, both `(K, F)`, replacing the previous contents. Throws
  /// `moet::Error` when their shapes differ.
  void pack(const ConstRows<float>& gate, const ConstRows<float>& up) {
    require(gate.rows() == up.rows() && gate.cols() == up.cols(), "PackedGluMatrix",
            "gate and up weights must have the same shape, got (", gate.rows(), ", ", gate.cols(),
            ") and (", up.rows(), ", ", up.cols(), ")");
    reset(gate.rows(), gate.cols());
    pack_gate(gate);
    pack_up(up);
  }

  /// Shapes the storage for `(K, F)` gate and up weights, every element zero.
  void reset(Index k, Index f) {
    rows_ = k;
    cols_ = f;
    num_panels_ = (cols_ + kHalf - 1) / kHalf;
    data_.assign(static_cast<std::size_t>(num_panels_ * panel_stride()), W{});
  }

  /// Packs the gate weights `gate` `(K, F)` alone, leaving the up weights as they are (the
  /// shape must be the one of the last `reset` or `pack`; throws `moet::Error` otherwise).
  void pack_gate(const ConstRows<float>& gate) { pack_half(gate, 0, "gate"); }
  /// Packs the up weights `up` `(K, F)` alone (as `pack_gate`).
  void pack_up(const ConstRows<float>& up) { pack_half(up, kHalf, "up"); }

  /// Bytes of packed storage (padding included).
  std::size_t bytes() const { return data_.size() * sizeof(W); }

  /// Rows `K` (the model dimension of an expert).
  Index rows() const { return rows_; }
  /// Hidden columns `F` (the width of `H`).
  Index cols() const { return cols_; }
  /// Panels, `ceil(F / kHalf)`.
  Index num_panels() const { return num_panels_; }
  /// Elements between the starts of two consecutive panels, `padded_depth(K) * kPanelWidth`.
  Index panel_stride() const { return padded_depth<W>(rows_) * kPanelWidth; }
  /// Start of the packed storage (64-byte aligned; null when empty).
  const W* data() const { return data_.data(); }

 private:
  // Writes `src` (K, F) into the lanes [lane0, lane0 + kHalf) of every panel.
  void pack_half(const ConstRows<float>& src, Index lane0, const char* which) {
    require(src.rows() == rows_ && src.cols() == cols_, "PackedGluMatrix", which,
            " weights must be (", rows_, ", ", cols_, "), got (", src.rows(), ", ", src.cols(),
            ")");
    for (Index p = 0; p < num_panels_; ++p) {
      const Index j0 = p * kHalf;
      const Index width = std::min<Index>(kHalf, cols_ - j0);
      W* panel = data_.data() + p * panel_stride();
      for (Index k = 0; k < rows_; ++k) {
        const float* s = src.data() + k * src.outerStride() + j0;
        for (Index c = 0; c < width; ++c) panel[panel_offset<W>(k, lane0 + c)] = to_packed<W>(s[c]);
      }
    }
  }

  Index rows_ = 0;
  Index cols_ = 0;
  Index num_panels_ = 0;
  AlignedVector<W> data_;  // num_panels panels of panel_stride() elements
};

// --- micro-kernels ----------------------------------------------------------------------------

/// Which kernels a call runs: the best compiled ones (`kSimdName`), or the portable loops.
enum class KernelPath { kBest, kPortable };

/// True when `KernelPath::kBest` runs explicit vector code for weights of type `W`: float on
/// AVX2 or AVX-512, bf16 on AVX512-BF16 (`kHasBf16Simd`).
template <class W>
inline constexpr bool kSimdFor = std::is_same_v<W, Bf16> ? kHasBf16Simd : kHasSimd;

/// Epilogue: store the raw accumulators (`M x P kGemmNr`).
struct RawEpilogue {};
/// Epilogue: `out = Act(gate) * up` (`M x P kHalf`), gate and up being the two halves of each
/// panel's accumulators.
template <class Act>
struct GluEpilogue {
  using Activation = Act;
};

template <class E>
inline constexpr bool kIsGluEpilogue = false;
template <class Act>
inline constexpr bool kIsGluEpilogue<GluEpilogue<Act>> = true;

/// The micro-kernel contract (every implementation): for `r < M`, `c < P kGemmNr`,
/// ```
/// acc(r, c) = c_in ? c_in[r ldc_in + c] : 0
/// float:  for k in [0, kc):      acc(r, c) += a[k M + r] * B(k, c)
/// bf16:   for k in [0, kc) by 2: acc(r, c) += a(r, k + 1) B(k + 1, c) + a(r, k) B(k, c)
/// ```
/// with `B(k, c)` the element `panel_offset(k, c % kGemmNr)` of panel `c / kGemmNr` (panels
/// `b_stride` elements apart, `b` already offset to the first row of the K block) and, for
/// bf16, `a(r, k)` element `k M + 2 r + k % 2` of the packed row group (`[k / 2][M][2]`; `kc`
/// even). Float rounds once per step with FMA (maybe twice in the portable loops); bf16 sums
/// a pair as `vdpbf16ps` does (exact products; its rounding of the two additions is the
/// hardware's) or, in the portable loops, as two float additions. Then the epilogue writes
/// `out` (row stride `ldo`). `c_in` may equal `out` (every accumulator is loaded before any
/// store). The SIMD kernels also prefetch, at each step and for each panel, the line
/// `pf_offset` elements past the current row into L2 (the weights the caller needs next) and
/// the line `kGemmNearPrefetch` floats' worth of bytes past it into L1; prefetches never fault,
/// so the targets may lie past the end of the weights.
#if MOET_SIMD_AVX512 || MOET_SIMD_AVX2
/// Loads the `M x 2P` accumulator registers from `c_in` (or zeroes them).
template <int M, int P, class Reg>
MOET_ALWAYS_INLINE void simd_load_tile(
    Reg (&acc)[static_cast<std::size_t>(M)][static_cast<std::size_t>(2 * P)], const float* c_in,
    Index ldc_in) {
  using V = NativeVec;
  constexpr int kW = V::kWidth;
  static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
    static_for<2 * P>([&](auto q) MOET_LAMBDA_INLINE {
      acc[r][q] = c_in != nullptr ? V::load(c_in + r * ldc_in + q * kW) : V::zero();
    });
  });
}

/// The epilogue of the SIMD kernels: stores `acc` (raw) or `Act(gate) * up` to `out`.
template <int M, int P, class Epi, class Reg>
MOET_ALWAYS_INLINE void simd_store_tile(
    Reg (&acc)[static_cast<std::size_t>(M)][static_cast<std::size_t>(2 * P)], float* out,
    Index ldo) {
  using V = NativeVec;
  constexpr int kW = V::kWidth;
  if constexpr (kIsGluEpilogue<Epi>) {
    static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
      static_for<P>([&](auto p) MOET_LAMBDA_INLINE {
        const Reg g = acc[r][2 * p];
        const Reg u = acc[r][2 * p + 1];
        float* dst = out + r * ldo + p * kW;
        if constexpr (std::is_same_v<Epi, GluEpilogue<Silu>>) {
          V::store(dst, V::mul(silu<V>(g), u));
        } else {
          // Any other activation: its scalar `apply`, lane by lane.
          using Act = typename Epi::Activation;
          alignas(kPackAlignBytes) float gs[static_cast<std::size_t>(kW)];
          alignas(kPackAlignBytes) float us[static_cast<std::size_t>(kW)];
          V::store(gs, g);
          V::store(us, u);
          for (int i = 0; i < kW; ++i) dst[i] = Act::template apply<float>(gs[i]) * us[i];
        }
      });
    });
  } else {
    static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
      static_for<2 * P>([&](auto q)
                            MOET_LAMBDA_INLINE { V::store(out + r * ldo + q * kW, acc[r][q]); });
    });
  }
}

/// The float SIMD micro-kernel (AVX2 + FMA or AVX-512F).
template <int M, int P, class Epi>
MOET_NOINLINE void simd_kernel(Index kc, const float* a, const float* b, Index b_stride,
                               Index pf_offset, const float* c_in, Index ldc_in, float* out,
                               Index ldo) {
  using V = NativeVec;
  using Reg = typename V::Reg;
  constexpr int kW = V::kWidth;
  constexpr int kRegs = 2 * P;  // registers per row: two per panel
  static_assert(2 * kW == kGemmNr, "a panel is two vector registers wide");

  Reg acc[static_cast<std::size_t>(M)][static_cast<std::size_t>(kRegs)];
  simd_load_tile<M, P>(acc, c_in, ldc_in);
  const float* bp[static_cast<std::size_t>(P)];
  static_for<P>([&](auto p) MOET_LAMBDA_INLINE { bp[p] = b + p * b_stride; });
  for (Index k = 0; k < kc; ++k) {
    static_for<P>([&](auto p) MOET_LAMBDA_INLINE {
      _mm_prefetch(reinterpret_cast<const char*>(bp[p] + pf_offset), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(bp[p] + kGemmNearPrefetch), _MM_HINT_T0);
    });
    Reg bv[static_cast<std::size_t>(kRegs)];
    static_for<kRegs>([&](auto q)
                          MOET_LAMBDA_INLINE { bv[q] = V::load(bp[q / 2] + (q % 2) * kW); });
    static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
      const Reg av = V::broadcast(a + r);
      static_for<kRegs>([&](auto q)
                            MOET_LAMBDA_INLINE { acc[r][q] = V::fma(av, bv[q], acc[r][q]); });
    });
    a += M;
    static_for<P>([&](auto p) MOET_LAMBDA_INLINE { bp[p] += kGemmNr; });
  }
  simd_store_tile<M, P, Epi>(acc, out, ldo);
}
#endif

#if MOET_SIMD_BF16
/// The bf16 SIMD micro-kernel (AVX512-BF16): per row pair step, two 64-byte loads of each
/// panel (16 lanes x 2 rows each) and one `vdpbf16ps` per accumulator with the broadcast
/// 32-bit pair of the row's packed `A`.
template <int M, int P, class Epi>
MOET_NOINLINE void simd_kernel(Index kc, const Bf16* a, const Bf16* b, Index b_stride,
                               Index pf_offset, const float* c_in, Index ldc_in, float* out,
                               Index ldo) {
  using Reg = __m512;
  constexpr int kRegs = 2 * P;
  constexpr Index kStep = 2 * kGemmNr;  // elements of one row pair of a panel (128 bytes)
  static_assert(kGemmNr == 32, "a bf16 panel row pair is two 64-byte registers");

  Reg acc[static_cast<std::size_t>(M)][static_cast<std::size_t>(kRegs)];
  simd_load_tile<M, P>(acc, c_in, ldc_in);
  const Bf16* bp[static_cast<std::size_t>(P)];
  static_for<P>([&](auto p) MOET_LAMBDA_INLINE { bp[p] = b + p * b_stride; });
  for (Index k = 0; k < kc; k += 2) {
    static_for<P>([&](auto p) MOET_LAMBDA_INLINE {
      _mm_prefetch(reinterpret_cast<const char*>(bp[p] + pf_offset), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(bp[p] + 2 * kGemmNearPrefetch), _MM_HINT_T0);
    });
    __m512bh bv[static_cast<std::size_t>(kRegs)];
    static_for<kRegs>([&](auto q) MOET_LAMBDA_INLINE {
      bv[q] = std::bit_cast<__m512bh>(_mm512_loadu_si512(bp[q / 2] + (q % 2) * kGemmNr));
    });
    static_for<M>([&](auto r) MOET_LAMBDA_INLINE {
      std::int32_t pair = 0;
      std::memcpy(&pair, a + 2 * r, sizeof pair);
      const __m512bh av = std::bit_cast<__m512bh>(_mm512_set1_epi32(pair));
      static_for<kRegs>(
          [&](auto q) MOET_LAMBDA_INLINE { acc[r][q] = _mm512_dpbf16_ps(acc[r][q], av, bv[q]); });
    });
    a += 2 * M;
    static_for<P>([&](auto p) MOET_LAMBDA_INLINE { bp[p] += kStep; });
  }
  simd_store_tile<M, P, Epi>(acc, out, ldo);
}
#endif

/// The epilogue of the portable kernels (`acc` is `M x P kGemmNr`, row stride `P kGemmNr`).
template <int M, int P, class Epi>
void portable_store_tile(const float* acc, float* out, Index ldo) {
  constexpr int kNr = kGemmNr;
  constexpr int kCols = P * kNr;
  if constexpr (kIsGluEpilogue<Epi>) {
    using Act = typename Epi::Activation;
    constexpr int kHalfNr = kNr / 2;
    for (int r = 0; r < M; ++r) {
      for (int p = 0; p < P; ++p) {
        const float* g = acc + r * kCols + p * kNr;
        const float* u = g + kHalfNr;
        float* dst = out + r * ldo + static_cast<Index>(p) * kHalfNr;
        for (int c = 0; c < kHalfNr; ++c) dst[c] = Act::template apply<float>(g[c]) * u[c];
      }
    }
  } else {
    for (int r = 0; r < M; ++r) {
      for (int c = 0; c < kCols; ++c) out[r * ldo + c] = acc[r * kCols + c];
    }
  }
}

/// The portable micro-kernel: the same contract in plain loops over `kGemmNr` contiguous lanes
/// (the compiler vectorises the innermost loop), for float or bf16 weights.
template <int M, int P, class Epi, class W>
MOET_NOINLINE void portable_kernel(Index kc, const W* a, const W* b, Index b_stride,
                                   const float* c_in, Index ldc_in, float* out, Index ldo) {
  // (No explicit prefetch: the portable build leaves that to the hardware.)
  constexpr int kNr = kGemmNr;
  constexpr int kCols = P * kNr;
  float acc[static_cast<std::size_t>(M) * static_cast<std::size_t>(kCols)];
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < kCols; ++c) {
      acc[r * kCols + c] = c_in != nullptr ? c_in[r * ldc_in + c] : 0.0f;
    }
  }
  for (Index k = 0; k < kc; k += kKGroup<W>) {
    for (int p = 0; p < P; ++p) {
      const W* bk = b + p * b_stride + k * kNr;
      for (int r = 0; r < M; ++r) {
        float* row = acc + r * kCols + p * kNr;
        if constexpr (std::is_same_v<W, Bf16>) {
          const float a0 = from_bf16(a[k * M + 2 * r]);
          const float a1 = from_bf16(a[k * M + 2 * r + 1]);
          for (int c = 0; c < kNr; ++c) {
            row[c] += a1 * from_bf16(bk[2 * c + 1]);
            row[c] += a0 * from_bf16(bk[2 * c]);
          }
        } else {
          const float av = a[k * M + r];
          for (int c = 0; c < kNr; ++c) row[c] += av * bk[c];
        }
      }
    }
  }
  portable_store_tile<M, P, Epi>(acc, out, ldo);
}

/// Runs the `m`-row micro-kernel over `p` panels (`p` is 1 or `few_row_panels(m)`) of the
/// chosen implementation (`Simd` only where `kSimdFor<W>`).
template <bool Simd, class Epi, class W>
MOET_ALWAYS_INLINE void run_micro_kernel(int m, int p, Index kc, const W* a, const W* b,
                                         Index b_stride, Index pf_offset, const float* c_in,
                                         Index ldc_in, float* out, Index ldo) {
  static_assert(!Simd || kSimdFor<W>, "no SIMD kernel for this weight type in this build");
  static_for<kGemmMr>([&](auto i) MOET_LAMBDA_INLINE {
    constexpr int kRows = i + 1;
    constexpr int kPanels = few_row_panels(kRows);
    if (m != kRows) return;
    if constexpr (Simd) {
#if MOET_SIMD_AVX512 || MOET_SIMD_AVX2
      if (p == 1) {
        simd_kernel<kRows, 1, Epi>(kc, a, b, b_stride, pf_offset, c_in, ldc_in, out, ldo);
      } else if constexpr (kPanels > 1) {
        simd_kernel<kRows, kPanels, Epi>(kc, a, b, b_stride, pf_offset, c_in, ldc_in, out, ldo);
      }
#endif
    } else {
      static_cast<void>(pf_offset);
      if (p == 1) {
        portable_kernel<kRows, 1, Epi>(kc, a, b, b_stride, c_in, ldc_in, out, ldo);
      } else if constexpr (kPanels > 1) {
        portable_kernel<kRows, kPanels, Epi>(kc, a, b, b_stride, c_in, ldc_in, out, ldo);
      }
    }
  });
}

// --- driver -----------------------------------------------------------------------------------

/// Operands of one packed product, as raw pointers (shapes already checked); `W` is the
/// element type of the packed weights.
template <class W>
struct PackedProduct {
  const float* a = nullptr;  // (n, k), row stride lda
  Index lda = 0;
  Index n = 0;
  Index k = 0;
  const W* b = nullptr;  // packed panels
  Index b_stride = 0;    // elements between panels
  Index num_panels = 0;
  float* out = nullptr;  // (n, out_cols), row stride ldo
  Index ldo = 0;
  Index out_cols = 0;
  bool accumulate = false;  // gemm only: out += A B
};

/// Rows of row group `g` of `groups` groups splitting `rows` rows as evenly as possible (the
/// first `rows % groups` groups get one more row), and the group's first row.
inline void row_group(Index rows, Index groups, Index g, Index& first, Index& size) {
  const Index base = rows / groups;
  const Index extra = rows % groups;
  size = base + (g < extra ? 1 : 0);
  first = g * base + std::min(g, extra);
}

/// Copies `rows` rows of `a` (row stride `lda`, `k` columns) into `dst` as `groups` packed row
/// groups: group `g` (rows `first .. first + m`) at `dst + first k`, laid out `[k][m]`.
inline void pack_row_groups(const float* a, Index lda, Index rows, Index k, Index groups,
                            float* dst) {
  for (Index g = 0; g < groups; ++g) {
    Index first = 0;
    Index m = 0;
    row_group(rows, groups, g, first, m);
    float* group = dst + first * k;
    for (Index r = 0; r < m; ++r) {
      const float* src = a + (first + r) * lda;
      for (Index kk = 0; kk < k; ++kk) group[kk * m + r] = src[kk];
    }
  }
}

/// The bf16 form of `pack_row_groups`: rows rounded to bf16, group `g` at
/// `dst + first padded_depth(k)`, laid out `[k / 2][m][2]` (the 32-bit pairs the bf16 kernel
/// broadcasts), an odd `k` padded with a zero column.
inline void pack_row_groups(const float* a, Index lda, Index rows, Index k, Index groups,
                            Bf16* dst) {
  const Index kp = padded_depth<Bf16>(k);
  for (Index g = 0; g < groups; ++g) {
    Index first = 0;
    Index m = 0;
    row_group(rows, groups, g, first, m);
    Bf16* group = dst + first * kp;
    for (Index r = 0; r < m; ++r) {
      const float* src = a + (first + r) * lda;
      for (Index kk = 0; kk < k; ++kk) group[(kk / 2) * 2 * m + 2 * r + kk % 2] = to_bf16(src[kk]);
      if (kp != k) group[(k / 2) * 2 * m + 2 * r + 1] = Bf16{};
    }
  }
}

/// How a call of `n` rows is blocked (see the file comment).
struct PackedBlocking {
  bool few = false;     // n <= kGemmFewRows: one row block, streamed weights
  Index row_block = 0;  // rows per row block
  Index kc = 0;         // rows of B per K block
  Index chunk = 0;      // panels per column chunk
  int panels = 1;       // panels per micro-kernel call
};

inline PackedBlocking packed_blocking(Index n, Index k, Index num_panels) {
  PackedBlocking b;
  b.few = n <= kGemmFewRows;
  if (b.few) {
    b.row_block = n;
    const bool one_group = n <= kGemmMr;
    // One group uses each weight once: no K blocking. Two groups share blocks through L2.
    b.kc = one_group || k <= kGemmFewRowsKc ? std::max<Index>(k, 1) : kGemmFewRowsKc;
    b.panels = one_group ? few_row_panels(static_cast<int>(std::max<Index>(n, 1))) : 1;
  } else {
    b.row_block = gemm_row_block(n);
    b.kc = kGemmKc;
  }
  b.chunk = b.kc >= k ? std::max<Index>(num_panels, 1) : kGemmChunkPanels;
  return b;
}

/// Floats of scratch `gemm_packed` and `glu_packed` need for `rows` rows and inner dimension `k`
/// (a 64-byte alignment pad included); the largest over every row count up to `rows`.
inline Index packed_scratch_floats(Index rows, Index k) {
  if (rows <= 0) return 0;
  // Packed rows of one row block over all of K (a block has at most kGemmMaxRowBlock rows).
  const Index block = std::min<Index>(rows, std::max<Index>(kGemmMaxRowBlock, kGemmFewRows));
  const Index packed_a = (block * k + 15) / 16 * 16;
  // Running sums of one column chunk between K blocks: K is blocked only with several row
  // groups (rows > kGemmMr) and k > kGemmKc.
  const Index partial = rows > kGemmMr && k > kGemmKc ? block * kGemmChunkPanels * kGemmNr : 0;
  return packed_a + partial + static_cast<Index>(kPackAlignBytes / sizeof(float));
}

/// Grows `scratch` so that `gemm_packed` and `glu_packed` on up to `max_rows` rows with inner
/// dimension `k` do not allocate.
inline void reserve_packed_scratch(Buffer<float>& scratch, Index max_rows, Index k) {
  scratch.reserve(packed_scratch_floats(max_rows, k));
}

/// The blocked loop nest shared by `gemm_packed` (`Glu = false`) and `glu_packed`, for float
/// or bf16 weights (`W`; bf16 also packs `A` as bf16, and runs over `padded_depth(k)` rows).
template <bool Simd, bool Glu, class Act, class W>
void run_packed_product(const PackedProduct<W>& op, Buffer<float>& scratch) {
  constexpr Index kNr = kGemmNr;
  constexpr Index kOutWidth = Glu ? kNr / 2 : kNr;  // output columns per panel
  using Final = std::conditional_t<Glu, GluEpilogue<Act>, RawEpilogue>;
  const Index n = op.n;
  const Index k = padded_depth<W>(op.k);  // rows of the packed weights
  if (n == 0 || op.num_panels == 0) return;

  const PackedBlocking blk = packed_blocking(n, k, op.num_panels);
  const Index block_rows = std::min(blk.row_block, n);
  // Floats of scratch taken by the packed rows (bf16 ones take half as many), 64-byte multiple.
  const Index a_elements = block_rows * k;
  const Index packed_a =
      (a_elements * static_cast<Index>(sizeof(W)) / static_cast<Index>(sizeof(float)) + 15) / 16 *
      16;
  const Index part_ld = blk.chunk * kNr;  // running sums: (block_rows, chunk * kNr)
  const bool blocked = blk.kc < k;        // K blocks > 1: running sums go through scratch

  // packed_scratch_floats(n, op.k) covers the float case, so also the smaller bf16 rows.
  float* base = scratch.data(packed_scratch_floats(n, op.k));
  const auto misalign = reinterpret_cast<std::uintptr_t>(base) % kPackAlignBytes;
  if (misalign != 0) base += (kPackAlignBytes - misalign) / sizeof(float);
  // (block_rows, k) as packed row groups; bf16 rows start their lifetime in the float storage.
  W* a_pack = nullptr;
  if constexpr (std::is_same_v<W, float>) {
    a_pack = base;
  } else {
    a_pack = ::new (static_cast<void*>(base)) W[static_cast<std::size_t>(a_elements)];
  }
  float* partial = base + packed_a;  // running sums of one column chunk (when blocked)
  // Far prefetch distance along a streamed panel, in elements (the same bytes for both types).
  constexpr Index kStreamPrefetch =
      kGemmStreamPrefetch * static_cast<Index>(sizeof(float) / sizeof(W));

  // Panels whose every output column exists; only the last panel can be partial.
  const Index full_panels = op.out_cols / kOutWidth;

  for (Index i0 = 0; i0 < n; i0 += blk.row_block) {
    const Index rows = std::min(blk.row_block, n - i0);
    const Index groups = (rows + kGemmMr - 1) / kGemmMr;
    pack_row_groups(op.a + i0 * op.lda, op.lda, rows, op.k, groups, a_pack);

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
          const W* b_block = op.b + j * op.b_stride + k0 * kNr;
          for (Index g = 0; g < groups; ++g) {
            Index g0 = 0;
            Index gm = 0;
            row_group(rows, groups, g, g0, gm);
            const int m = static_cast<int>(gm);
            const W* a_block = a_pack + g0 * k + k0 * gm;
            // Far prefetch: the first group of a few-row call runs ahead along its own stream;
            // every other call fetches the same K block of the next panel, needed next.
            const Index pf_offset = blk.few && g == 0 ? kStreamPrefetch : op.b_stride;
            // Where the running sums come from: zero, the old C (accumulate), or the scratch.
            float* out_tile = op.out + (i0 + g0) * op.ldo + j * kOutWidth;  // (gm, p * width)
            float* part =
                blocked ? partial + g0 * part_ld + (j - j0) * kNr : nullptr;  // (gm, p kNr)
            const float* c_in = nullptr;
            Index ld_in = 0;
            const Index valid = std::min(op.out_cols - j * kOutWidth, p * kOutWidth);
            alignas(kPackAlignBytes) float in_tile[kGemmMr * kGemmNr];
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
            if (!last) {
              run_micro_kernel<Simd, RawEpilogue>(m, p, k_len, a_block, b_block, op.b_stride,
                                                  pf_offset, c_in, ld_in, part, part_ld);
            } else if (!edge) {
              run_micro_kernel<Simd, Final>(m, p, k_len, a_block, b_block, op.b_stride, pf_offset,
                                            c_in, ld_in, out_tile, op.ldo);
            } else {
              // Partial last panel: run on a full-width tile, copy the existing columns.
              alignas(kPackAlignBytes) float tile[kGemmMr * kGemmNr];
              run_micro_kernel<Simd, Final>(m, 1, k_len, a_block, b_block, op.b_stride, pf_offset,
                                            c_in, ld_in, tile, kOutWidth);
              for (Index r = 0; r < gm; ++r) {
                std::copy(tile + r * kOutWidth, tile + r * kOutWidth + valid,
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

/// True when the storage spans of two row-major views overlap.
template <class A, class B>
bool views_overlap(const A& a, const B& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const float* a_end = a.data() + (a.rows() - 1) * a.outerStride() + a.cols();
  const float* b_end = b.data() + (b.rows() - 1) * b.outerStride() + b.cols();
  const std::less<const float*> before;
  return before(a.data(), b_end) && before(b.data(), a_end);
}

// --- entry points -----------------------------------------------------------------------------

/// `C = A B` (or `C += A B` with `accumulate`) for a packed right-hand side, single-threaded
/// (callers parallelise over independent tasks; no OpenMP inside).
///
/// \param a `(n, K)` row-major view (any outer stride).
/// \param b the packed `(K, N)` matrix, float or bf16 (then `a`'s rows are rounded to bf16 as
///   they are packed; the products are exact, the sums float).
/// \param c `(n, N)` row-major view, must not overlap `a`.
/// \param accumulate add to `c` instead of overwriting it.
/// \param scratch grow-only workspace (`reserve_packed_scratch` pre-sizes it).
/// \param path `KernelPath::kPortable` forces the portable loops (tests).
///
/// Throws `moet::Error` on mismatched shapes or overlapping `a` and `c`. Deterministic: see the
/// file comment (a row's bits do not depend on the other rows of the call).
///
/// ```cpp
/// moet::detail::gemm_packed(h, packed_down, y, /*accumulate=*/false, scratch);
/// ```
template <class W>
void gemm_packed(const ConstRows<float>& a, const PackedMatrix<W>& b, Rows<float> c,
                 bool accumulate, Buffer<float>& scratch, KernelPath path = KernelPath::kBest) {
  constexpr const char* kOp = "gemm_packed";
  require(a.cols() == b.rows(), kOp, "A has ", a.cols(), " columns but B has ", b.rows(), " rows");
  require(c.rows() == a.rows() && c.cols() == b.cols(), kOp, "C must be (", a.rows(), ", ",
          b.cols(), "), got (", c.rows(), ", ", c.cols(), ")");
  require(!views_overlap(a, c), kOp, "C must not overlap A");
  const PackedProduct<W> product{.a = a.data(),
                                 .lda = a.outerStride(),
                                 .n = a.rows(),
                                 .k = a.cols(),
                                 .b = b.data(),
                                 .b_stride = b.panel_stride(),
                                 .num_panels = b.num_panels(),
                                 .out = c.data(),
                                 .ldo = c.outerStride(),
                                 .out_cols = c.cols(),
                                 .accumulate = accumulate};
  if constexpr (kSimdFor<W>) {
    if (path == KernelPath::kBest) return run_packed_product<true, false, Silu>(product, scratch);
  }
  run_packed_product<false, false, Silu>(product, scratch);
}

/// The fused gated-linear-unit product `H = Act(A Wg) ⊙ (A Wu)`: both products share each
/// packed row group of `A`, and the epilogue applies `Act` and the product in registers before
/// the only store of `H`. Single-threaded, deterministic like `gemm_packed`.
///
/// With `Act = Silu` the SIMD builds use the vectorised `silu` of detail/simd.hpp (relative
/// error below 1e-6 of the exact SiLU, see there); other activations, and the portable path,
/// call `Act::apply` per element.
///
/// \tparam Act the gate activation (`Silu` for SwiGLU, `Gelu` for GeGLU, ...).
/// \param a `(n, K)` row-major view.
/// \param w the packed gate and up weights, `(K, F)` each, float or bf16 (as in `gemm_packed`).
/// \param h `(n, F)` output view, must not overlap `a`.
/// \param scratch grow-only workspace (`reserve_packed_scratch` pre-sizes it).
/// \param path `KernelPath::kPortable` forces the portable loops (tests).
///
/// ```cpp
/// moet::detail::glu_packed<moet::Silu>(x_rows, packed_gate_up, h, scratch);
/// ```
template <class Act = Silu, class W = float>
void glu_packed(const ConstRows<float>& a, const PackedGluMatrix<W>& w, Rows<float> h,
                Buffer<float>& scratch, KernelPath path = KernelPath::kBest) {
  constexpr const char* kOp = "glu_packed";
  require(a.cols() == w.rows(), kOp, "A has ", a.cols(), " columns but the weights have ", w.rows(),
          " rows");
  require(h.rows() == a.rows() && h.cols() == w.cols(), kOp, "H must be (", a.rows(), ", ",
          w.cols(), "), got (", h.rows(), ", ", h.cols(), ")");
  require(!views_overlap(a, h), kOp, "H must not overlap A");
  const PackedProduct<W> product{.a = a.data(),
                                 .lda = a.outerStride(),
                                 .n = a.rows(),
                                 .k = a.cols(),
                                 .b = w.data(),
                                 .b_stride = w.panel_stride(),
                                 .num_panels = w.num_panels(),
                                 .out = h.data(),
                                 .ldo = h.outerStride(),
                                 .out_cols = h.cols(),
                                 .accumulate = false};
  if constexpr (kSimdFor<W>) {
    if (path == KernelPath::kBest) return run_packed_product<true, true, Act>(product, scratch);
  }
  run_packed_product<false, true, Act>(product, scratch);
}

}  // namespace MOET_SIMD_NAMESPACE
}  // namespace moet::detail
