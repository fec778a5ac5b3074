#pragma once
/// \file detail/kernels/blocking.hpp
/// How the packed products of detail/gemm.hpp block a call (the part that is the same for every
/// kernel level): the blocking constants, the operands of one call (`PackedProduct`), the
/// blocking of `n` rows (`packed_blocking`) and the scratch it needs.
///
/// ```
/// for each row block (<= 144 rows, equal sizes)   pack its rows of A (scratch)
///   for each column chunk (16 panels)              running sums of a chunk stay in L2
///     for each K block (kGemmKc = 256 rows)        the packed A block stays in L2
///       for each panel of the chunk                its weight block stays in L1 ...
///         for each row group (<= Mr rows)          ... while every row group reuses it
///           micro-kernel: acc (+)= A_group B_block in registers; prefetch the next panel's
///           block into L2 (and 1 KiB ahead into L1); a call that adds to the old C first
///           prefetches the next call's tile of C into L1
/// ```
/// Few rows (`n <= kGemmFewRows = 8`: decode, small batches) are one row block with no K
/// blocking: the weights stream from memory once, with software prefetch 16 KiB ahead. With
/// `n <= Mr` (one row group) a kernel call covers several panels (the level's
/// `few_row_panels`) so that enough independent FMA chains hide the FMA latency. Calls of more
/// rows take the level's `kManyMr`-row groups and `kManyPanels` panels per kernel call (the
/// AVX-512 float kernels: 6 rows, 2 panels, fewer loads per FMA than 8 rows of one panel).

#include <algorithm>
#include <cstddef>

#include "moet/detail/kernels/packed.hpp"
#include "moet/tensor.hpp"

/// Forces inlining of the small helpers the micro-kernels are built from (register blocking
/// only works when every lambda and wrapper call disappears).
#if defined(__GNUC__)
#define MOET_ALWAYS_INLINE inline __attribute__((always_inline))
#define MOET_LAMBDA_INLINE __attribute__((always_inline))
#define MOET_NOINLINE __attribute__((noinline))
#else
#define MOET_ALWAYS_INLINE inline
#define MOET_LAMBDA_INLINE
#define MOET_NOINLINE
#endif

namespace moet::detail {

/// Rows of `B` per K block: a `kGemmKc x nr` weight block is 16 KiB at `nr = 16` (256 x 16 x 4
/// bytes), reused from L1 by every row group of a row block.
inline constexpr Index kGemmKc = 256;
/// Most rows per row block (24 groups of 6): each weight block fetched from memory serves up to
/// 24 micro-kernel calls, and a K block of the packed rows (144 x 256 x 4 bytes = 144 KiB)
/// stays in a 512 KiB L2.
inline constexpr Index kGemmMaxRowBlock = 144;
/// Panels per column chunk: the running sums of a chunk stay in L2 between K blocks; also
/// bounds the scratch.
inline constexpr Index kGemmChunkPanels = 16;
/// Rows up to which a call is "few rows" (decode, small batches): one row block, no K blocking
/// (up to `kGemmFewRowsKc`), weights streamed once with software prefetch.
inline constexpr Index kGemmFewRows = 8;
/// K block of few-row calls with two row groups: the second group re-reads a
/// `kGemmFewRowsKc x nr` weight block from L2.
inline constexpr Index kGemmFewRowsKc = 4096;
/// Far prefetch (into L2) along the weight stream of few-row calls, in floats' worth of bytes:
/// 4096 floats = 16 KiB ahead per panel stream, which covers the DRAM latency of a loaded VM at
/// ~40 GB/s (measured on the EPYC development machine: shorter distances lose bandwidth,
/// longer ones gain nothing; on the Xeon VM, with every line of a step prefetched, 8 KiB gained
/// nothing and 32 KiB was slower).
inline constexpr Index kGemmStreamPrefetch = 4096;
/// Near prefetch (into L1) along every weight panel, in floats' worth of bytes: 1 KiB ahead.
inline constexpr Index kGemmNearPrefetch = 256;
/// The most panels any level's micro-kernel covers in one call.
inline constexpr Index kGemmMaxFewPanels = 4;

/// Operands of one packed product, as raw pointers (shapes already checked); `W` is the
/// element type of the packed weights.
template <class W>
struct PackedProduct {
  const float* a = nullptr;  // (n, k): row i, column kk at a[i lda + kk a_k_stride]
  Index lda = 0;
  Index a_k_stride = 1;  // 1, or the transpose's leading dimension (gemm_packed_at)
  Index n = 0;
  Index k = 0;
  const typename PackFormat<W>::Storage* b = nullptr;  // packed panels
  Index b_stride = 0;                                   // storage units between panels
  Index num_panels = 0;
  float* out = nullptr;  // (n, out_cols), row stride ldo
  Index ldo = 0;
  Index out_cols = 0;
  bool accumulate = false;  // gemm only: out += A B
};

/// How a call of `n` rows is blocked (see the file comment).
struct PackedBlocking {
  bool few = false;     // n <= kGemmFewRows: one row block, streamed weights
  Index row_block = 0;  // rows per row block
  Index kc = 0;         // rows of B per K block
  Index chunk = 0;      // panels per column chunk
  Index mr = 0;         // most rows per row group
  int panels = 1;       // panels per micro-kernel call
};

/// Rows per row block for `n > mr` rows: `n` split into `ceil(n / kGemmMaxRowBlock)` blocks of
/// nearly equal size, rounded up to a multiple of `mr` (no short last block that would stream
/// the weights once more for a handful of rows).
inline Index gemm_row_block(Index n, Index mr) {
  const Index blocks = (n + kGemmMaxRowBlock - 1) / kGemmMaxRowBlock;
  const Index even = (n + blocks - 1) / blocks;
  return (even + mr - 1) / mr * mr;
}

/// The blocking of `n` rows of depth `k` (padded) over `num_panels` panels, for a level whose
/// few-row calls take row groups of at most `mr` rows (one-group calls covering
/// `one_group_panels` panels) and whose other calls take groups of at most `many_mr` rows and
/// `many_panels` panels per micro-kernel call.
inline PackedBlocking packed_blocking(Index n, Index k, Index num_panels, Index mr,
                                      int one_group_panels, Index many_mr, int many_panels) {
  PackedBlocking b;
  b.few = n <= kGemmFewRows;
  if (b.few) {
    b.row_block = n;
    b.mr = mr;
    const bool one_group = n <= mr;
    // One group uses each weight once: no K blocking. Two groups share blocks through L2.
    b.kc = one_group || k <= kGemmFewRowsKc ? std::max<Index>(k, 1) : kGemmFewRowsKc;
    b.panels = one_group ? one_group_panels : 1;
  } else {
    b.mr = many_mr;
    b.row_block = gemm_row_block(n, many_mr);
    b.kc = kGemmKc;
    b.panels = many_panels;
  }
  b.chunk = b.kc >= k ? std::max<Index>(num_panels, 1) : kGemmChunkPanels;
  return b;
}

/// Floats of scratch `gemm_packed` and `glu_packed` need for `rows` rows and inner dimension `k`
/// (a 64-byte alignment pad included), at any level; the largest over every row count up to
/// `rows`.
inline Index packed_scratch_floats(Index rows, Index k) {
  if (rows <= 0) return 0;
  // Packed rows of one row block over all of K (a block has at most kGemmMaxRowBlock rows: every
  // level's row-group size divides it), with the pad of the widest row group (a block of 32)
  // and, for the quantised rows, a scale and a sum per block.
  const Index block = std::min<Index>(rows, kGemmMaxRowBlock);
  const Index packed_a = (block * (k + kQuantBlock + 1) + 15) / 16 * 16;
  // Running sums of one column chunk between K blocks: K is blocked only with several row
  // groups (rows > Mr) and k > kGemmKc.
  const Index partial = k > kGemmKc ? block * kGemmChunkPanels * kMaxPanelWidth : 0;
  // Block formats on levels without integer dot products: one K block of the widest call's
  // panels, dequantised to float.
  const Index tile = kGemmKc * kMaxPanelWidth * kGemmMaxFewPanels;
  return packed_a + partial + tile + 2 * static_cast<Index>(kPackAlignBytes / sizeof(float));
}

/// Grows `scratch` so that `gemm_packed` and `glu_packed` on up to `max_rows` rows with inner
/// dimension `k` do not allocate.
inline void reserve_packed_scratch(Buffer<float>& scratch, Index max_rows, Index k) {
  scratch.reserve(packed_scratch_floats(max_rows, k));
}

}  // namespace moet::detail
