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
  /// Every assignment's input rows and dL/dout rows, expert-major `(num_assignments,
  /// model_dim)` each, and the rows `backward_rows` keeps `(num_assignments,
  /// backward_split_width())`.
  Buffer<S> in;
  Buffer<S> dout;
  Buffer<S> rows;
  /// One packed operand per (row block, product), and each active expert's first block.
  std::vector<typename X::BackwardPack> packs;
  std::vector<Index> first_piece;
  /// The rows every pack is reserved for (the block size when they were made).
  Index pack_rows = 0;
  /// Per expert: whether its gradients accumulate (`backward_prepare`).
  std::vector<unsigned char> accumulate;
  /// Pass 2's (expert, first row) pieces and pass 3's (expert, product, first gradient row).
  std::vector<std::array<Index, 2>> row_pieces;
  std::vector<std::array<Index, 3>> grad_pieces;
  /// The experts with rows, most rows first (pass 3 starts the longest pieces first).
  std::vector<std::int32_t> order;
};

/// The split backward of the experts with rows (`active`, ascending ids) over expert-major
/// assignments (expert `e`'s rows `[offsets[e], offsets[e + 1])`): `fill(begin, n, in, dout)`
/// writes the input rows and dL/dout rows of assignments `[begin, begin + n)` into the given
/// `(n, model_dim)` views; the rows' `cache` is `forward_train`'s, `din` `(num_assignments,
/// model_dim)` gets every assignment's input gradient. Row blocks of `block` rows; `threads`
/// prepared (`prepare_thread_scratch`) for `min(block, largest load)` rows. Returns false,
/// having done nothing, when the bank cannot split now (the caller then runs
/// `experts.backward` per expert).
template <class X, class Fill>
bool split_backward(X& experts, std::span<const Index> offsets,
                    std::span<const std::int32_t> active, Index block,
                    const ConstRows<typename X::Scalar>& cache, Rows<typename X::Scalar> din,
                    BackwardSplitWorkspace<X>& ws, std::vector<ExpertThreadScratch<X>>& threads,
                    Fill&& fill) {
  if constexpr (!HookCheck<X>::kBackwardSplit) {
    return false;
  } else {
    const int num_products = experts.backward_split_products();
    if (num_products <= 0) return false;
    const Index num_rows = offsets.back();
    const Index model_dim = experts.model_dim();
    const Index width = experts.backward_split_width();
    const Index num_experts = experts.num_experts();
    auto in = aligned_matrix(ws.in, num_rows, model_dim);
    auto dout = aligned_matrix(ws.dout, num_rows, model_dim);
    auto rows = aligned_matrix(ws.rows, num_rows, width);
    if (ws.accumulate.size() < static_cast<std::size_t>(num_experts)) {
      ws.accumulate.resize(static_cast<std::size_t>(num_experts));
    }
    const auto begin_of = [&](Index e) { return offsets[static_cast<std::size_t>(e)]; };
    const auto end_of = [&](Index e) { return offsets[static_cast<std::size_t>(e) + 1]; };

    // The most blocks any plan of this many assignments can have (each expert's last block
    // may be partial): the pieces and packs are sized for it, so that no plan of as many
    // assignments allocates.
    const Index max_blocks = (num_rows + block - 1) / block + std::min(num_rows, num_experts);
    // The pieces: (expert, first row, pack slot) blocks in expert order (an expert's blocks
    // consecutive), gradient slices of the experts with the most rows first.
    ws.row_pieces.clear();
    ws.row_pieces.reserve(static_cast<std::size_t>(max_blocks));
    ws.first_piece.resize(static_cast<std::size_t>(num_experts) + 1);
    for (const std::int32_t e : active) {
      ws.first_piece[static_cast<std::size_t>(e)] = static_cast<Index>(ws.row_pieces.size());
      for (Index r = begin_of(e); r < end_of(e); r += block) ws.row_pieces.push_back({e, r});
    }
    // A pack slot per (block, product), each reserved for a whole block when made.
    const auto slots = static_cast<std::size_t>(max_blocks * num_products);
    if (ws.packs.size() < slots || ws.pack_rows < block) {
      const std::size_t old = ws.pack_rows < block ? 0 : ws.packs.size();
      ws.packs.resize(std::max(slots, ws.packs.size()));
      for (std::size_t i = old; i < ws.packs.size(); ++i) {
        experts.backward_reserve_pack(static_cast<int>(i % static_cast<std::size_t>(num_products)),
                                      block, ws.packs[i]);
      }
      ws.pack_rows = block;
    }
    ws.order.reserve(static_cast<std::size_t>(num_experts));
    ws.order.assign(active.begin(), active.end());
    std::sort(ws.order.begin(), ws.order.end(), [&](std::int32_t a, std::int32_t b) {
      const Index load_a = end_of(a) - begin_of(a);
      const Index load_b = end_of(b) - begin_of(b);
      return load_a != load_b ? load_a > load_b : a < b;  // a total order: no allocation
    });
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
    parallel_for(static_cast<Index>(active.size()), [&](Index i) {
      const std::int32_t e = active[static_cast<std::size_t>(i)];
      ws.accumulate[static_cast<std::size_t>(e)] = experts.backward_prepare(e) ? 1 : 0;
    });
    // 2. Row blocks: gather, the rows' gradients and kept activations, the packed operands.
    parallel_for(static_cast<Index>(ws.row_pieces.size()), [&](Index i) {
      const auto [e, begin] = ws.row_pieces[static_cast<std::size_t>(i)];
      const Index n = std::min(block, end_of(e) - begin);
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
    // 3. Slices of every weight gradient, each over the expert's blocks in order.
    parallel_for(static_cast<Index>(ws.grad_pieces.size()), [&](Index i) {
      const auto [e, p_index, g] = ws.grad_pieces[static_cast<std::size_t>(i)];
      const auto p = static_cast<int>(p_index);
      auto& scratch = threads[static_cast<std::size_t>(thread_id())];
      const Index end = std::min(g + kSplitGradRows, experts.backward_grad_rows(p));
      bool accumulate = ws.accumulate[static_cast<std::size_t>(e)] != 0;
      Index piece = ws.first_piece[static_cast<std::size_t>(e)];
      for (Index begin = begin_of(e); begin < end_of(e); begin += block, ++piece) {
        const Index n = std::min(block, end_of(e) - begin);
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

}  // namespace moet::detail
