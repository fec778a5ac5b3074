#pragma once
/// \file dispatch/reference.hpp
/// `ReferenceDispatch`: the per-token oracle every faster dispatcher is tested against.

#include <vector>

#include "moet/concepts.hpp"
#include "moet/detail/gather_scatter.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// The obviously-correct dispatcher: for each token, for each of its slots in order, runs the
/// slot's expert on that one row and accumulates `weight * expert(x_t)` into `y_t` (the first
/// slot assigns, later slots add; a token with `k = 0` gets `y_t = 0`). Tokens are independent,
/// so the loop runs in parallel over fixed token blocks; every token's arithmetic is the same
/// for any thread count.
///
/// Slow by design (one matrix-vector product per assignment): use it as the oracle in tests
/// and `GroupedDispatch` everywhere else.
///
/// ```cpp
/// moet::ReferenceDispatch::Workspace<Experts> ws;
/// moet::ReferenceDispatch{}.run(experts, x, routing, y, ws);
/// ```
struct ReferenceDispatch {
  /// Tokens per task (fixed, so the split never depends on the thread count).
  static constexpr Index kTokenBlock = 16;

  /// Reused between calls: per-thread expert scratch and a one-row output buffer. Grow-only.
  /// \tparam X the expert bank type.
  template <class X>
  struct Workspace {
    std::vector<detail::ExpertThreadScratch<X>> threads;
  };

  /// Writes `y[t] = sum over t's slots j of weights(t)[j] * experts(t)[j](x[t])`.
  ///
  /// Shapes: `x` `(num_tokens, model_dim)`, `y` `(num_tokens, model_dim)` (every row written),
  /// `routing` over `num_tokens` tokens and `experts.num_experts()` experts. Throws
  /// `moet::Error` naming `ReferenceDispatch` and the shapes when they disagree, when `y`
  /// overlaps `x`, or when an expert id is out of range.
  ///
  /// \tparam X an expert bank (`Experts` concept).
  template <Experts X>
  void run(const X& experts, const ConstRows<typename X::Scalar>& x,
           const Routing<typename X::Scalar>& routing, Rows<typename X::Scalar> y,
           Workspace<X>& ws) const {
    detail::check_dispatch("ReferenceDispatch", experts, x, routing, y);
    detail::prepare_thread_scratch(experts, ws.threads, 1, /*gather=*/false, /*output=*/true);
    const Index model_dim = x.cols();
    detail::parallel_blocks(x.rows(), kTokenBlock, [&](Index begin, Index end) {
      auto& scratch = ws.threads[static_cast<std::size_t>(detail::thread_id())];
      auto row_out = detail::aligned_matrix(scratch.rows_out, 1, model_dim);  // (1, model_dim)
      for (Index t = begin; t < end; ++t) {
        const auto ids = routing.experts(t);
        const auto weights = routing.weights(t);
        if (ids.empty()) {
          y.row(t).setZero();
          continue;
        }
        for (std::size_t j = 0; j < ids.size(); ++j) {
          experts.forward(ids[j], x.middleRows(t, 1), row_out, scratch.expert);
          if (j == 0) {
            y.row(t) = weights[j] * row_out.row(0);
          } else {
            y.row(t) += weights[j] * row_out.row(0);
          }
        }
      }
    });
  }
};

}  // namespace moet
