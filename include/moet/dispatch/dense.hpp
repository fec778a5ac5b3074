#pragma once
/// \file dispatch/dense.hpp
/// Dense experts: every token through every expert of a bank, weight 1 (DeepSeekMoE's shared
/// experts; `MoELayer` runs its shared bank with these), forward, training forward and
/// backward, each parallel over fixed row blocks so the bits do not depend on the thread count.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "moet/concepts.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gather_scatter.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/dispatch/backward_split.hpp"
#include "moet/dispatch/column_split.hpp"
#include "moet/errors.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// Workspace of `add_dense_expert`: per-thread expert scratch and output rows. Grow-only.
/// \tparam X the expert bank type.
template <class X>
struct DenseWorkspace {
  std::vector<detail::ExpertThreadScratch<X>> threads;
  /// Fewer row blocks than threads (decode): the hidden activations `(num_tokens, hidden_dim)`
  /// and the expert's output `(num_tokens, model_dim)` of the column-split forward
  /// (dispatch/column_split.hpp).
  detail::Buffer<typename X::Scalar> hidden;
  detail::Buffer<typename X::Scalar> out;
  /// Training only: every expert's cache on every token, `(num_experts * num_tokens,
  /// cache_width)` (expert `e`'s rows first at `e * num_tokens`).
  detail::Buffer<typename X::Scalar> cache;
  /// Training only: every expert's dL/dx, `(num_experts * num_tokens, model_dim)`.
  detail::Buffer<typename X::Scalar> din;
  /// Training only: tokens of the last `forward_train_dense_experts` (-1 before the first).
  Index train_tokens = -1;
  /// Training only: the split backward's buffers (dispatch/backward_split.hpp), and its view of
  /// the experts' rows (expert `e`'s at `e * num_tokens`).
  detail::BackwardSplitWorkspace<X> split;
  std::vector<Index> split_offsets;
  std::vector<std::int32_t> split_experts;
};

/// Rows per `add_dense_expert` task (fixed, independent of the thread count).
inline constexpr Index kDenseRowBlock = 128;

/// Runs expert `e` on every row of `x` and adds `weight * expert(x)` into `y`:
/// `y[t] += weight * E_e(x[t])` for every token. This is how shared experts (DeepSeekMoE) run:
/// every token passes through them with weight 1. Parallel over fixed row blocks of
/// `kDenseRowBlock`; with fewer blocks than threads (decode) the expert's columns are split
/// between the threads instead (dispatch/column_split.hpp). Either way the result is
/// bit-identical for any thread count.
///
/// Shapes: `x` `(num_tokens, model_dim)`, `y` `(num_tokens, model_dim)`. Throws `moet::Error`
/// naming `add_dense_expert` when the shapes disagree, `y` overlaps `x`, or `e` is out of range.
///
/// \tparam X an expert bank (`Experts` concept).
template <Experts X>
void add_dense_expert(const X& experts, Index e, typename X::Scalar weight,
                      const ConstRows<typename X::Scalar>& x, Rows<typename X::Scalar> y,
                      DenseWorkspace<X>& ws) {
  constexpr const char* kOp = "add_dense_expert";
  detail::require(e >= 0 && e < experts.num_experts(), kOp, "expert id ", e, " is outside [0, ",
                  experts.num_experts(), ")");
  detail::check_rows_in_out(kOp, experts.model_dim(), x, y);
  detail::check_experts_ready(experts, /*training=*/false);
  detail::prepare_thread_scratch(experts, ws.threads, std::min(kDenseRowBlock, x.rows()),
                                 /*gather=*/false, /*output=*/true);
  const Index model_dim = x.cols();
  const Index num_tokens = x.rows();
  // Fewer row blocks than threads: the expert's columns split between the threads.
  const Index num_blocks = (num_tokens + kDenseRowBlock - 1) / kDenseRowBlock;
  if (num_blocks < detail::max_threads()) {
    auto out = detail::aligned_matrix(ws.out, num_tokens, model_dim);  // (num_tokens, d)
    const bool split = detail::split_columns(
        experts, num_blocks, num_tokens, ws.hidden, ws.threads,
        [&](Index b) {
          const Index begin = b * kDenseRowBlock;
          return detail::SplitTask{e, begin, std::min(kDenseRowBlock, num_tokens - begin)};
        },
        [&](Index b, auto& /*scratch*/) {
          const Index begin = b * kDenseRowBlock;
          return x.middleRows(begin, std::min(kDenseRowBlock, num_tokens - begin));
        },
        out);
    if (split) {
      detail::parallel_blocks(num_tokens, kDenseRowBlock, [&](Index begin, Index end) {
        y.middleRows(begin, end - begin) += weight * out.middleRows(begin, end - begin);
      });
      return;
    }
  }
  detail::parallel_blocks(num_tokens, kDenseRowBlock, [&](Index begin, Index end) {
    const Index n = end - begin;
    auto& scratch = ws.threads[static_cast<std::size_t>(detail::thread_id())];
    auto out = detail::aligned_matrix(scratch.rows_out, n, model_dim);  // (n, model_dim)
    experts.forward(e, x.middleRows(begin, n), out, scratch.expert);
    y.middleRows(begin, n) += weight * out;
  });
}

/// Training: adds every expert of `experts` applied to every row of `x`, weight 1, into `y`
/// (`y[t] += sum_e E_e(x[t])`, the shared experts of a layer) and keeps their caches in
/// `ws.cache` for `backward_dense_experts`. Experts in id order, each parallel over fixed
/// row blocks of `kDenseRowBlock` (bit-identical for any thread count). Throws `moet::Error`
/// naming `add_dense_experts_train` when the shapes disagree or `y` overlaps `x`.
template <TrainableExperts X>
void add_dense_experts_train(const X& experts, const ConstRows<typename X::Scalar>& x,
                             Rows<typename X::Scalar> y, DenseWorkspace<X>& ws) {
  constexpr const char* kOp = "add_dense_experts_train";
  detail::check_rows_in_out(kOp, experts.model_dim(), x, y);
  detail::check_experts_ready(experts, /*training=*/true);
  const Index num_tokens = x.rows();
  const Index model_dim = x.cols();
  ws.train_tokens = num_tokens;
  if (num_tokens == 0) return;
  detail::prepare_thread_scratch(experts, ws.threads, std::min(kDenseRowBlock, num_tokens),
                                 /*gather=*/false, /*output=*/true);
  auto cache = ws.cache.matrix(experts.num_experts() * num_tokens,
                               experts.cache_width());  // (num_experts * T, cache_width)
  for (Index e = 0; e < experts.num_experts(); ++e) {
    detail::parallel_blocks(num_tokens, kDenseRowBlock, [&](Index begin, Index end) {
      auto& scratch = ws.threads[static_cast<std::size_t>(detail::thread_id())];
      const Index n = end - begin;
      auto out = detail::aligned_matrix(scratch.rows_out, n, model_dim);  // (n, model_dim)
      experts.forward_train(e, x.middleRows(begin, n), out,
                            cache.middleRows(e * num_tokens + begin, n), scratch.expert);
      y.middleRows(begin, n) += out;
    });
  }
}

/// Backward of `add_dense_experts_train` (same `experts`, `x` and `ws`): accumulates every
/// expert's weight gradients for `dL/dy = dy` `(num_tokens, model_dim)` and **adds** dL/dx into
/// `dx` `(num_tokens, model_dim)`. Banks with the split backward (`BackwardSplitHook`) run it
/// in pieces over every expert's row blocks (dispatch/backward_split.hpp: every core busy for
/// one shared expert); others one task per expert over its row blocks in order. Either way the
/// weight gradients are bit-identical for any thread count; each expert writes its own dL/dx
/// rows, then `dx += sum_e din_e` in expert order per token block. Throws `moet::Error` naming
/// `backward_dense_experts` when the shapes disagree, `dx` overlaps `x` or `dy`, or `ws` holds
/// no `add_dense_experts_train` of `x.rows()` tokens.
template <TrainableExperts X>
void backward_dense_experts(X& experts, const ConstRows<typename X::Scalar>& x,
                            const ConstRows<typename X::Scalar>& dy, Rows<typename X::Scalar> dx,
                            DenseWorkspace<X>& ws) {
  constexpr const char* kOp = "backward_dense_experts";
  detail::require(x.cols() == experts.model_dim(), kOp,
                  "x must have model_dim = ", experts.model_dim(), " columns, got (", x.rows(),
                  ", ", x.cols(), ")");
  detail::require(dy.rows() == x.rows() && dy.cols() == x.cols() && dx.rows() == x.rows() &&
                      dx.cols() == x.cols(),
                  kOp, "dy and dx must have x's shape (", x.rows(), ", ", x.cols(), "), got (",
                  dy.rows(), ", ", dy.cols(), ") and (", dx.rows(), ", ", dx.cols(), ")");
  detail::require(!detail::storage_overlaps(x, dx) && !detail::storage_overlaps(dy, dx), kOp,
                  "dx must not overlap x or dy");
  detail::require(ws.train_tokens == x.rows(), kOp,
                  "backward needs an add_dense_experts_train of the same x first (it saw ",
                  ws.train_tokens, " tokens, x has ", x.rows(), ")");
  detail::check_experts_ready(experts, /*training=*/true);
  const Index num_tokens = x.rows();
  const Index model_dim = x.cols();
  const Index num_experts = experts.num_experts();
  if (num_tokens == 0) return;
  detail::prepare_thread_scratch(experts, ws.threads, std::min(kDenseRowBlock, num_tokens),
                                 /*gather=*/false, /*output=*/false);
  if constexpr (HookCheck<X>::kEnsureGrad) experts.ensure_grad();
  auto cache = ws.cache.matrix(num_experts * num_tokens, experts.cache_width());
  auto din = detail::aligned_matrix(ws.din, num_experts * num_tokens, model_dim);
  ws.split_offsets.resize(static_cast<std::size_t>(num_experts) + 1);
  ws.split_experts.resize(static_cast<std::size_t>(num_experts));
  for (Index e = 0; e <= num_experts; ++e) {
    ws.split_offsets[static_cast<std::size_t>(e)] = e * num_tokens;
    if (e < num_experts) {
      ws.split_experts[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(e);
    }
  }
  const auto rows_of = [&](Index begin, Index n, auto&& in, auto&& dout) {
    const Index t = begin % num_tokens;  // blocks never cross experts
    in = x.middleRows(t, n);
    dout = dy.middleRows(t, n);
  };
  if (!detail::split_backward(experts, std::span<const Index>(ws.split_offsets),
                              std::span<const std::int32_t>(ws.split_experts), kDenseRowBlock,
                              ConstRows<typename X::Scalar>(cache), din, ws.split, ws.threads,
                              rows_of)) {
    detail::parallel_for(num_experts, [&](Index e) {
      auto& scratch = ws.threads[static_cast<std::size_t>(detail::thread_id())];
      for (Index begin = 0; begin < num_tokens; begin += kDenseRowBlock) {
        const Index n = std::min(kDenseRowBlock, num_tokens - begin);
        experts.backward(e, x.middleRows(begin, n), cache.middleRows(e * num_tokens + begin, n),
                         dy.middleRows(begin, n), din.middleRows(e * num_tokens + begin, n),
                         scratch.expert);
      }
    });
  }
  detail::parallel_blocks(num_tokens, kDenseRowBlock, [&](Index begin, Index end) {
    for (Index e = 0; e < num_experts; ++e) {
      dx.middleRows(begin, end - begin) += din.middleRows(e * num_tokens + begin, end - begin);
    }
  });
}

}  // namespace moet
