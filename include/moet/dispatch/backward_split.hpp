#pragma once
/// \file dispatch/backward_split.hpp
/// The experts' backward in pieces that do not depend on the thread count. One task per expert
/// keeps each weight gradient one sum over the expert's rows in order, but it leaves cores idle
/// whenever fewer experts than threads got rows (a layer with two experts, one hot expert under
/// a skewed load). A bank with the split backward (`BackwardSplitHook`) lets the dispatcher cut
/// the work into fixed pieces instead, run in three parallel passes:
///
/// 1. `backward_prepare` per expert with rows (its transposed weights, whether its gradients
///    accumulate);
/// 2. per (expert, row block): gather the rows, `backward_rows` (each row's input gradient and
///    the activations the weight gradients need, kept per row), then `backward_pack` of every
///    product's right operand for the block, while its rows are in cache;
/// 3. per (expert, product, slice of gradient rows): `backward_weights` over the expert's blocks
///    in order, so that every gradient element is one chain over the expert's rows in order.
///
/// Every element's chain is fixed by the rows, the block size and the slice size, never by the
/// threads, so the results are bit-identical for any thread count (test_backward_split.cpp).
/// The workspace holds the gathered rows, the kept rows and one packed operand per (block,
/// product), each reserved for a whole block when made: after a warm-up, calls with no more
/// assignments and no larger blocks do not allocate.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "moet/concepts.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gather_scatter.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/tensor.hpp"

namespace moet::detail {

/// Gradient rows per piece of pass 3: wide enough for the kernels' row blocks, small enough that
/// one expert's largest product (hidden_dim rows) gives every core several pieces.
inline constexpr Index kSplitGradRows = 256;

/// What the split backward reuses between calls (grows only); empty for banks without the
/// hook.
template <class X>
struct BackwardSplitWorkspace {};

template <class X>
requires(HookCheck<X>::kBackwardSplit) struct BackwardSplitWorkspace<X> {
  using S = typename X::Scalar;
  /// Every assignment's input rows and dL/dout rows `(num_rows, model_dim)` each, and the rows
  /// `backward_rows` keeps `(num_rows, backward_split_width())`, at the assignments' positions.
  Buffer<S> in;
  Buffer<S> dout;
  Buffer<S> rows;
  /// One packed operand per (row piece, product).
  std::vector<typename X::BackwardPack> packs;
  /// The rows every pack is reserved for (the largest piece when they were made).
  Index pack_rows = 0;
  /// Per expert: whether its gradients accumulate (`backward_prepare`), its rows, and where its
  /// pieces start in `by_expert` (`num_experts + 1` entries).
  std::vector<unsigned char> accumulate;
  std::vector<Index> expert_rows;
  std::vector<Index> first_piece;
  std::vector<Index> cursor;
  /// Pass 2's row pieces (expert, first row, rows), in the caller's order (a pack slot per
  /// piece); their indices grouped by expert, each expert's in that order; pass 3's (expert,
  /// product, first gradient row).
  std::vector<std::array<Index, 3>> row_pieces;
  std::vector<Index> by_expert;
  std::vector<std::array<Index, 3>> grad_pieces;
  /// The experts with rows, ascending, and most rows first (pass 3 starts the longest pieces
  /// first).
  std::vector<std::int32_t> active;
  std::vector<std::int32_t> order;
};

/// The split backward over row pieces the caller put in `ws.row_pieces`: (expert, first row,
/// rows) with at most `block` rows each, every expert's pieces in the order its gradient sums
/// them (they may interleave with other experts' pieces: the expert-parallel layer's rows are
/// rank-major). Rows are positions in `[0, num_rows)`: `fill(begin, n, in, dout)` writes the
/// input rows and dL/dout rows at `[begin, begin + n)` into the given `(n, model_dim)` views;
/// `cache` is `forward_train`'s at those positions, `din` `(num_rows, model_dim)` gets every
/// row's input gradient. `max_pieces` is the most pieces a later call of as many rows can
/// have: the packs are reserved for it, so that such a call does not allocate. `threads`
/// prepared (`prepare_thread_scratch`) for the largest piece's rows. Returns false, having done
/// nothing, when the bank cannot split now (the caller then runs `experts.backward` per expert).
template <class X, class Fill>
bool split_backward_pieces(X& experts, Index num_rows, Index max_pieces, Index block,
                           const ConstRows<typename X::Scalar>& cache, Rows<typename X::Scalar> din,
                           BackwardSplitWorkspace<X>& ws,
                           std::vector<ExpertThreadScratch<X>>& threads, Fill&& fill) {
  if constexpr (!HookCheck<X>::kBackwardSplit) {
    return false;
  } else {
    const int num_products = experts.backward_split_products();
    if (num_products <= 0) return false;
    const Index model_dim = experts.model_dim();
    const Index width = experts.backward_split_width();
    const Index num_experts = experts.num_experts();
    const auto num_experts_z = static_cast<std::size_t>(num_experts);
    auto in = aligned_matrix(ws.in, num_rows, model_dim);
    auto dout = aligned_matrix(ws.dout, num_rows, model_dim);
    auto rows = aligned_matrix(ws.rows, num_rows, width);
    const std::size_t num_pieces = ws.row_pieces.size();
    max_pieces = std::max(max_pieces, static_cast<Index>(num_pieces));

    // The pieces grouped by expert (a stable counting sort), the experts with rows.
    ws.accumulate.resize(std::max(ws.accumulate.size(), num_experts_z));
    ws.expert_rows.assign(num_experts_z, 0);
    ws.first_piece.assign(num_experts_z + 1, 0);
    for (const auto& [e, begin, n] : ws.row_pieces) {
      ws.expert_rows[static_cast<std::size_t>(e)] += n;
      ++ws.first_piece[static_cast<std::size_t>(e) + 1];
    }
    for (std::size_t e = 0; e < num_experts_z; ++e) ws.first_piece[e + 1] += ws.first_piece[e];
    ws.by_expert.reserve(static_cast<std::size_t>(max_pieces));
    ws.by_expert.resize(num_pieces);
    ws.cursor.assign(ws.first_piece.begin(), ws.first_piece.end() - 1);
    for (std::size_t i = 0; i < num_pieces; ++i) {
      const auto e = static_cast<std::size_t>(ws.row_pieces[i][0]);
      ws.by_expert[static_cast<std::size_t>(ws.cursor[e]++)] = static_cast<Index>(i);
    }
    ws.active.reserve(num_experts_z);
    ws.active.clear();
    for (std::size_t e = 0; e < num_experts_z; ++e) {
      if (ws.expert_rows[e] > 0) ws.active.push_back(static_cast<std::int32_t>(e));
    }
    ws.order.reserve(num_experts_z);
    ws.order.assign(ws.active.begin(), ws.active.end());
    std::sort(ws.order.begin(), ws.order.end(), [&](std::int32_t a, std::int32_t b) {
      const Index load_a = ws.expert_rows[static_cast<std::size_t>(a)];
      const Index load_b = ws.expert_rows[static_cast<std::size_t>(b)];
      return load_a != load_b ? load_a > load_b : a < b;  // a total order: no allocation
    });

    // A pack slot per (piece, product), each reserved for `block` rows when made.
    const auto slots = static_cast<std::size_t>(max_pieces * num_products);
    if (ws.packs.size() < slots || ws.pack_rows < block) {
      const std::size_t old = ws.pack_rows < block ? 0 : ws.packs.size();
      ws.packs.resize(std::max(slots, ws.packs.size()));
      for (std::size_t i = old; i < ws.packs.size(); ++i) {
        experts.backward_reserve_pack(static_cast<int>(i % static_cast<std::size_t>(num_products)),
                                      block, ws.packs[i]);
      }
      ws.pack_rows = block;
    }
    ws.grad_pieces.clear();
    Index slices = 0;
    for (int p = 0; p < num_products; ++p) {
      slices += (experts.backward_grad_rows(p) + kSplitGradRows - 1) / kSplitGradRows;
    }
    ws.grad_pieces.reserve(static_cast<std::size_t>(std::min(num_rows, num_experts) * slices));
    for (const std::int32_t e : ws.order) {
      for (int p = 0; p < num_products; ++p) {
        const Index grad_rows = experts.backward_grad_rows(p);
        for (Index g = 0; g < grad_rows; g += kSplitGradRows) ws.grad_pieces.push_back({e, p, g});
      }
    }

    // 1. Per expert: transposed weights, accumulate or write.
    parallel_for(static_cast<Index>(ws.active.size()), [&](Index i) {
      const std::int32_t e = ws.active[static_cast<std::size_t>(i)];
      ws.accumulate[static_cast<std::size_t>(e)] = experts.backward_prepare(e) ? 1 : 0;
    });
    // 2. Row pieces: gather, the rows' gradients and kept activations, the packed operands.
    parallel_for(static_cast<Index>(num_pieces), [&](Index i) {
      const auto [e, begin, n] = ws.row_pieces[static_cast<std::size_t>(i)];
      auto& scratch = threads[static_cast<std::size_t>(thread_id())];
      fill(begin, n, in.middleRows(begin, n), dout.middleRows(begin, n));
      experts.backward_rows(e, in.middleRows(begin, n), cache.middleRows(begin, n),
                            dout.middleRows(begin, n), din.middleRows(begin, n),
                            rows.middleRows(begin, n), scratch.expert);
      for (int p = 0; p < num_products; ++p) {
        experts.backward_pack(e, p, dout.middleRows(begin, n), rows.middleRows(begin, n),
                              ws.packs[static_cast<std::size_t>(i * num_products + p)]);
      }
    });
    // 3. Slices of every weight gradient, each over the expert's pieces in order.
    parallel_for(static_cast<Index>(ws.grad_pieces.size()), [&](Index i) {
      const auto [e, p_index, g] = ws.grad_pieces[static_cast<std::size_t>(i)];
      const auto p = static_cast<int>(p_index);
      auto& scratch = threads[static_cast<std::size_t>(thread_id())];
      const Index end = std::min(g + kSplitGradRows, experts.backward_grad_rows(p));
      bool accumulate = ws.accumulate[static_cast<std::size_t>(e)] != 0;
      const auto e_z = static_cast<std::size_t>(e);
      for (Index j = ws.first_piece[e_z]; j < ws.first_piece[e_z + 1]; ++j) {
        const Index piece = ws.by_expert[static_cast<std::size_t>(j)];
        const auto [pe, begin, n] = ws.row_pieces[static_cast<std::size_t>(piece)];
        experts.backward_weights(e, p, in.middleRows(begin, n), dout.middleRows(begin, n),
                                 rows.middleRows(begin, n),
                                 ws.packs[static_cast<std::size_t>(piece * num_products + p)], g,
                                 end, accumulate, scratch.expert);
        accumulate = true;
      }
    });
    return true;
  }
}

/// The split backward over expert-major assignments (expert `e`'s rows `[offsets[e],
/// offsets[e + 1])`, the experts with rows in `active`, ascending), in row blocks of `block`
/// rows: `split_backward_pieces` with the blocks as pieces.
template <class X, class Fill>
bool split_backward(X& experts, std::span<const Index> offsets,
                    std::span<const std::int32_t> active, Index block,
                    const ConstRows<typename X::Scalar>& cache, Rows<typename X::Scalar> din,
                    BackwardSplitWorkspace<X>& ws, std::vector<ExpertThreadScratch<X>>& threads,
                    Fill&& fill) {
  if constexpr (!HookCheck<X>::kBackwardSplit) {
    return false;
  } else {
    if (experts.backward_split_products() <= 0) return false;
    const Index num_rows = offsets.back();
    // The most blocks any plan of this many assignments can have (each expert's last block
    // may be partial): the pieces and packs are sized for it, so that no plan of as many
    // assignments allocates.
    const Index max_blocks =
        (num_rows + block - 1) / block + std::min(num_rows, experts.num_experts());
    ws.row_pieces.reserve(static_cast<std::size_t>(max_blocks));
    ws.row_pieces.clear();
    for (const std::int32_t e : active) {
      const Index end = offsets[static_cast<std::size_t>(e) + 1];
      for (Index r = offsets[static_cast<std::size_t>(e)]; r < end; r += block) {
        ws.row_pieces.push_back({e, r, std::min(block, end - r)});
      }
    }
    return split_backward_pieces(experts, num_rows, max_blocks, block, cache, din, ws, threads,
                                 std::forward<Fill>(fill));
  }
}

}  // namespace moet::detail
