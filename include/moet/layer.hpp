#pragma once
/// \file layer.hpp
/// `MoELayer`: the generic Mixture-of-Experts layer. Any gate, any expert bank, any dispatcher:
/// check the input, route, dispatch, add the shared experts, keep the routing statistics.

#include <optional>
#include <type_traits>
#include <utility>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/gather_scatter.hpp"
#include "moet/detail/select.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/stats.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// A Mixture-of-Experts layer:
/// ```
/// y_t = sum over t's slots j of w_{t,j} E_{e_{t,j}}(x_t)  +  sum over shared experts s of S_s(x_t)
/// ```
/// The gate `G` chooses each token's experts and weights (any number per token, 0 included:
/// such a token gets only the shared experts' output, or 0), the dispatcher `D` runs the
/// routed experts `X` and combines them, and the optional shared experts (DeepSeekMoE's
/// always-on experts, the same bank type as the routed ones) see every token with weight 1.
/// The output excludes the residual connection.
///
/// `forward(x, y, ctx, ws)` is `const` and keeps all per-call state in the caller's
/// `Workspace`: one layer may run several batches at once from different threads, each with
/// its own workspace. The convenience `forward(x, ctx)` uses an internal workspace instead
/// (not thread-safe) and keeps the last `stats()`.
///
/// \tparam G the gate (`Gate` concept).
/// \tparam X the expert bank (`Experts` concept), same `Scalar` as the gate.
/// \tparam D the dispatcher (`Dispatcher<D, X>`), `GroupedDispatch` by default.
///
/// ```cpp
/// moet::MoELayer layer(moet::TopKGate<float>({.model_dim = 512, .num_experts = 8, .k = 2}),
///                      moet::SwiGluExperts<float>({.model_dim = 512, .hidden_dim = 1024,
///                                                  .num_experts = 8}));
/// moet::RowMatrix<float> y = layer.forward(x);
/// ```
template <Gate G, Experts X, class D = GroupedDispatch>
requires Dispatcher<D, X>
class MoELayer {
  static_assert(std::is_same_v<typename G::Scalar, typename X::Scalar>,
                "MoELayer needs the gate and the experts to use the same Scalar type "
                "(for example TopKGate<float> with SwiGluExperts<float>)");

 public:
  using Scalar = typename X::Scalar;
  using GateType = G;
  using ExpertsType = X;
  using DispatchType = D;

  /// Everything one `forward` call writes besides `y`; reuse it across calls so that its
  /// storage is not reallocated once it has seen the largest batch (the `RoutingStats` copy
  /// that `forward` returns does allocate; `ws.stats` holds the same values in place).
  struct Workspace {
    /// The routing plan of the last call.
    Routing<Scalar> routing;
    /// The dispatcher's workspace.
    typename D::template Workspace<X> dispatch;
    /// The shared experts' workspace.
    DenseWorkspace<X> shared;
    /// The statistics of the last call.
    RoutingStats stats;
  };

  /// A layer with routed experts only. Throws `moet::Error` when the gate and the experts
  /// disagree on `num_experts` or `model_dim`.
  MoELayer(G gate, X experts, D dispatch = {})
      : gate_(std::move(gate)), experts_(std::move(experts)), dispatch_(std::move(dispatch)) {
    check_banks();
  }

  /// A layer with routed experts plus `shared_experts.num_experts()` shared experts that every
  /// token passes through with weight 1. Throws `moet::Error` when the gate and the experts
  /// disagree on `num_experts` or `model_dim`, or the shared experts' `model_dim` differs.
  MoELayer(G gate, X experts, X shared_experts, D dispatch = {})
      : gate_(std::move(gate)),
        experts_(std::move(experts)),
        shared_(std::move(shared_experts)),
        dispatch_(std::move(dispatch)) {
    check_banks();
  }

  /// Runs the layer on `x` `(num_tokens, model_dim)` and writes `y` `(num_tokens, model_dim)`
  /// (every row; `y` must not overlap `x`). Returns the routing statistics, a reference to
  /// `ws.stats` (valid until the workspace's next use; nothing is copied or allocated). Throws `moet::Error` naming `MoELayer` when `x` has the wrong width, `y` the
  /// wrong shape, or `x` holds a NaN or Inf; the gate and dispatcher may throw for their own
  /// inputs (`RouteContext` contents). An empty batch is a no-op with empty statistics.
  ///
  /// Thread-safe: concurrent calls with different workspaces are fine.
  const RoutingStats& forward(const ConstRows<Scalar>& x, Rows<Scalar> y,
                              const RouteContext& ctx, Workspace& ws) const {
    detail::require(x.cols() == model_dim(), kOp, "x must have model_dim = ", model_dim(),
                    " columns, got (", x.rows(), ", ", x.cols(), ")");
    detail::require(y.rows() == x.rows() && y.cols() == x.cols(), kOp, "y must have x's shape (",
                    x.rows(), ", ", x.cols(), "), got (", y.rows(), ", ", y.cols(), ")");
    detail::require(!detail::storage_overlaps(x, y), kOp, "y must not overlap x");
    detail::require(detail::all_finite(x), kOp, "x (", x.rows(), ", ", x.cols(),
                    ") must be finite, found a NaN or Inf");
    gate_.route(x, ctx, ws.routing);
    dispatch_.run(experts_, x, ws.routing, y, ws.dispatch);
    if (shared_) {
      for (Index s = 0; s < shared_->num_experts(); ++s) {
        add_dense_expert(*shared_, s, Scalar(1), x, y, ws.shared);
      }
    }
    compute_stats(ws.routing, ws.stats);
    return ws.stats;
  }

  /// Convenience: runs the layer on `x` `(num_tokens, model_dim)` with an internal workspace
  /// and returns `y` `(num_tokens, model_dim)`; `stats()` then holds the statistics. Not
  /// thread-safe (use the workspace overload for that). Throws like the workspace overload.
  RowMatrix<Scalar> forward(const ConstRows<Scalar>& x, const RouteContext& ctx = {}) {
    RowMatrix<Scalar> y(x.rows(), x.cols());  // (num_tokens, model_dim)
    forward(x, y, ctx, workspace_);
    return y;
  }

  /// The statistics of the last convenience `forward(x, ctx)` (empty before the first).
  const RoutingStats& stats() const { return workspace_.stats; }

  /// The gate.
  const G& gate() const { return gate_; }
  G& gate() { return gate_; }
  /// The routed experts.
  const X& experts() const { return experts_; }
  X& experts() { return experts_; }
  /// Whether the layer has shared experts.
  bool has_shared_experts() const { return shared_.has_value(); }
  /// The shared experts; throws `moet::Error` when the layer has none.
  const X& shared_experts() const {
    detail::require(shared_.has_value(), kOp, "this layer has no shared experts");
    return *shared_;
  }
  X& shared_experts() {
    detail::require(shared_.has_value(), kOp, "this layer has no shared experts");
    return *shared_;
  }
  /// The dispatcher.
  const D& dispatch() const { return dispatch_; }

  /// Routed experts (the gate's `num_experts`).
  Index num_experts() const { return experts_.num_experts(); }
  /// Shared experts (0 without).
  Index num_shared_experts() const { return shared_ ? shared_->num_experts() : 0; }
  /// Width of a token.
  Index model_dim() const { return experts_.model_dim(); }

  /// Expert parameters one token activates on average in the batch `stats` describes:
  /// `mean_k * params_per_expert` plus every shared expert's parameters (the router's are
  /// not counted).
  double activated_params_per_token(const RoutingStats& stats) const {
    double shared = 0.0;
    if (shared_) {
      shared = static_cast<double>(shared_->num_experts()) *
               static_cast<double>(shared_->params_per_expert());
    }
    return stats.mean_k * static_cast<double>(experts_.params_per_expert()) + shared;
  }

  /// Expert FLOPs per token on average in the batch `stats` describes: `mean_k *
  /// flops_per_token` plus every shared expert's (the router's are not counted).
  double activated_flops_per_token(const RoutingStats& stats) const {
    double shared = 0.0;
    if (shared_) {
      shared = static_cast<double>(shared_->num_experts()) * shared_->flops_per_token();
    }
    return stats.mean_k * experts_.flops_per_token() + shared;
  }

 private:
  static constexpr const char* kOp = "MoELayer";

  void check_banks() const {
    detail::require(static_cast<Index>(gate_.num_experts()) == experts_.num_experts(), kOp,
                    "the gate routes to ", gate_.num_experts(), " experts but the expert bank has ",
                    experts_.num_experts());
    detail::require(static_cast<Index>(gate_.model_dim()) == experts_.model_dim(), kOp,
                    "the gate's model_dim is ", gate_.model_dim(), " but the experts' is ",
                    experts_.model_dim());
    if (shared_) {
      detail::require(shared_->model_dim() == experts_.model_dim(), kOp,
                      "the shared experts' model_dim is ", shared_->model_dim(),
                      " but the routed experts' is ", experts_.model_dim());
    }
  }

  G gate_;
  X experts_;
  std::optional<X> shared_;
  D dispatch_;
  Workspace workspace_;
};

}  // namespace moet
