#pragma once
/// \file layer.hpp
/// `MoELayer`: the generic Mixture-of-Experts layer. Any gate, any expert bank, any dispatcher:
/// check the input, route, dispatch, add the shared experts, keep the routing statistics.

#include <cstddef>
#include <optional>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/gather_scatter.hpp"
#include "moet/detail/param_names.hpp"
#include "moet/detail/select.hpp"
#include "moet/dispatch/dense.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/dispatch/shared_gate.hpp"
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
/// **Training** (concepts.hpp's conventions; needs `TrainableGate<G>`, `TrainableExperts<X>`
/// and a training dispatcher, i.e. `GroupedDispatch`):
/// ```cpp
/// layer.zero_grad();
/// layer.forward_train(x, y, ctx, ws);              // keeps the activations backward needs
/// layer.backward(x, dy, ctx, ws, dx, loss_grad);   // writes dx, accumulates every gradient
/// opt.step(layer);                                 // visit_parameters + parameters_changed
/// ```
/// Gradient flow: `dy` reaches every assignment `a` of token `t` twice, as the combine-weight
/// gradient `d_weights[a] = dy_t · E_{e_a}(x_t)` (handed to the gate's backward, which turns
/// it, plus its auxiliary-loss inputs `loss_grad`, into router-parameter gradients and a dL/dx
/// term through the scores) and as `w_a dy_t` into expert `e_a`'s backward (weight gradients,
/// and dL/dx through the expert). The shared experts get `dy_t` itself on every token. The
/// selection is held fixed (each gate documents its surrogate, e.g. straight-through for
/// `TopAnyGate`); a dropped token (`k = 0`) passes gradient only through the router and the
/// shared experts; an idle expert gets no gradient.
///
/// Memory kept by `forward_train` in the `Workspace`, in scalars per token (`mean_k` routed
/// experts per token, `d = model_dim`, `c = experts.cache_width()`, e.g. `2 * hidden_dim` for
/// GLU experts and `hidden_dim` for FFN experts, `n_s` shared experts):
/// `mean_k * (d + c)` (every assignment's expert output and cache) `+ n_s * c` (the shared
/// experts' caches) plus the routing plan (`mean_k` ids and weights, the gate's
/// `num_experts` probabilities). `backward` adds `mean_k * (d + 1)` (per-assignment input and
/// weight gradients) `+ n_s * d`, and per-thread scratch of `block_rows` rows. The input `x` is
/// not copied: pass the same `x` to `backward`. For S2 (d = 1024, f = 3584, SwiGLU, top-2)
/// that is `2 * (1024 + 7168) = 16384` floats (64 KiB) per token from `forward_train`.
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
  static_assert(HookCheck<G>::kChecked && HookCheck<X>::kChecked,
                "the gate's and the experts' optional hooks pass HookCheck (concepts.hpp)");

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
    /// The gated shared experts' workspace (a layer with a `SharedExpertGate`).
    GatedSharedWorkspace<X> gated_shared;
    /// The statistics of the last call.
    RoutingStats stats;
    /// Training only: dL/d(combine weight) of every assignment, routing order.
    detail::Buffer<Scalar> d_weights;
    /// Training only: tokens of the last `forward_train` on this workspace, -1 when the last
    /// call was a plain `forward` (or none): `backward` needs a `forward_train` before it.
    Index train_tokens = -1;
  };

  /// The loss-gradient inputs of the gate's backward (`NoLossGrad` for gates without).
  using LossGrad = LossGradOf<G>;

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

  /// A layer whose shared experts' summed output is scaled per token by `shared_gate`
  /// (`sigmoid(x w)`, Qwen2-MoE's `shared_expert_gate`; dispatch/shared_gate.hpp). Throws like
  /// the constructor above, and when the gate's `model_dim` differs.
  MoELayer(G gate, X experts, X shared_experts, SharedExpertGate<Scalar> shared_gate,
           D dispatch = {})
      : gate_(std::move(gate)),
        experts_(std::move(experts)),
        shared_(std::move(shared_experts)),
        shared_gate_(std::move(shared_gate)),
        dispatch_(std::move(dispatch)) {
    check_banks();
  }

  /// Runs the layer on `x` `(num_tokens, model_dim)` and writes `y` `(num_tokens, model_dim)`
  /// (every row; `y` must not overlap `x`). Returns the routing statistics, a reference to
  /// `ws.stats` (valid until the workspace's next use; nothing is copied or allocated). Throws
  /// `moet::Error` naming `MoELayer` when `x` has the wrong width, `y` the wrong shape, or `x`
  /// holds a NaN or Inf; the gate and dispatcher may throw for their own inputs (`RouteContext`
  /// contents). An empty batch is a no-op with empty statistics.
  ///
  /// Thread-safe: concurrent calls with different workspaces are fine.
  const RoutingStats& forward(const ConstRows<Scalar>& x, Rows<Scalar> y, const RouteContext& ctx,
                              Workspace& ws) const {
    check_forward(x, y);
    ws.train_tokens = -1;  // the training state of this workspace is overwritten
    gate_.route(x, call_context(ctx), ws.routing);
    dispatch_.run(experts_, x, ws.routing, y, ws.dispatch);
    detail::add_shared_experts(shared_, shared_gate_, x, y, ws.shared, ws.gated_shared);
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

  // --- training ---------------------------------------------------------------------------

  /// Training forward: `forward`, plus everything `backward` needs, kept in `ws` (see the
  /// memory notes under "Training" in the class comment). After routing, calls the gate's
  /// `on_training_forward(x, ws.routing)` hook when it has one (DynMoE's recording and
  /// schedule), whatever `ctx.training` says; pass `ctx.training = true` for training-mode
  /// routing (noise, THOR's draw, DynMoE's token dropping). Not `const` (the hook may change the
  /// gate) and not for concurrent use on one layer. Throws like `forward`.
  const RoutingStats& forward_train(const ConstRows<Scalar>& x, Rows<Scalar> y,
                                    const RouteContext& ctx,
                                    Workspace& ws) requires TrainableExperts<X> {
    static_assert(TrainingDispatcher<D, X>,
                  "MoELayer training needs a dispatcher with forward_train and backward "
                  "(GroupedDispatch)");
    check_forward(x, y);
    ws.train_tokens = -1;
    gate_.route(x, call_context(ctx), ws.routing);
    if constexpr (HookCheck<G>::kTrainingForward) gate_.on_training_forward(x, ws.routing);
    dispatch_.forward_train(experts_, x, ws.routing, y, ws.dispatch);
    detail::add_shared_experts_train(shared_, shared_gate_, x, y, ws.shared, ws.gated_shared);
    compute_stats(ws.routing, ws.stats);
    ws.train_tokens = x.rows();
    return ws.stats;
  }

  /// Backward of the `forward_train` that filled `ws` (same `x` and `ctx`, nothing else run on
  /// `ws` in between), given `dy` = dL/dy `(num_tokens, model_dim)` and the gate's
  /// loss-gradient inputs `loss_grad` (auxiliary losses; default none). **Writes** `dx` =
  /// dL/dx `(num_tokens, model_dim)` and **accumulates** the gradients of the gate, the routed
  /// and the shared experts (call `zero_grad()` between steps):
  /// ```
  /// d_weights[a] = dy_t · E_{e_a}(x_t)                       (every assignment a of token t)
  /// dx_t  = sum over t's slots, in slot order, of dE_{e_a}/dx^T (w_a dy_t)
  ///       + gate.backward(x, ctx, routing, d_weights, loss_grad)    (router path, adds)
  ///       + sum over shared experts s of dS_s/dx^T dy_t             (weight 1, every token)
  /// ```
  /// A token routed nowhere (dropped, `k = 0`) gets only the router and shared-expert terms;
  /// an expert with no tokens gets no gradient. Deterministic: the same bits for any thread
  /// count (see `GroupedDispatch::backward`). May be called again on the same `ws` (each call
  /// accumulates once more). Throws `moet::Error` naming `MoELayer` when no `forward_train` of
  /// `x.rows()` tokens filled `ws`, or `x`, `dy`, `dx` have the wrong shapes or `dx` overlaps
  /// `x` or `dy`; the gate may throw for its own inputs.
  void backward(const ConstRows<Scalar>& x, const ConstRows<Scalar>& dy, const RouteContext& ctx,
                Workspace& ws, Rows<Scalar> dx,
                const LossGrad& loss_grad = {}) requires TrainableGate<G> && TrainableExperts<X> {
    detail::require(x.cols() == model_dim(), kOp, "x must have model_dim = ", model_dim(),
                    " columns, got (", x.rows(), ", ", x.cols(), ")");
    detail::require(ws.train_tokens >= 0 && ws.train_tokens == x.rows(), kOp,
                    "backward needs a forward_train of the same x on this workspace first (it saw ",
                    ws.train_tokens, " tokens, x has ", x.rows(), ")");
    detail::require(dy.rows() == x.rows() && dy.cols() == x.cols(), kOp, "dy must have x's shape (",
                    x.rows(), ", ", x.cols(), "), got (", dy.rows(), ", ", dy.cols(), ")");
    detail::require(dx.rows() == x.rows() && dx.cols() == x.cols(), kOp, "dx must have x's shape (",
                    x.rows(), ", ", x.cols(), "), got (", dx.rows(), ", ", dx.cols(), ")");
    detail::require(!detail::storage_overlaps(x, dx) && !detail::storage_overlaps(dy, dx), kOp,
                    "dx must not overlap x or dy");
    // An empty batch still reaches every part (each checks its inputs and allocates its
    // gradients), and changes nothing.
    const auto num_assignments = static_cast<std::size_t>(ws.routing.num_assignments());
    std::span<Scalar> d_weights(ws.d_weights.data(static_cast<Index>(num_assignments)),
                                num_assignments);
    dispatch_.backward(experts_, x, ws.routing, dy, ws.dispatch, d_weights, dx);
    gate_.backward(x, call_context(ctx), ws.routing, std::span<const Scalar>(d_weights), loss_grad,
                   dx);
    detail::backward_shared_experts(shared_, shared_gate_, x, dy, dx, ws.shared, ws.gated_shared);
  }

  /// The combine-weight gradients of the last `backward` on `ws` (one per assignment, routing
  /// order).
  std::span<const Scalar> weight_grads(const Workspace& ws) const {
    return {ws.d_weights.data(), static_cast<std::size_t>(ws.routing.num_assignments())};
  }

  /// Sets every gradient (gate, routed experts, shared experts) to zero, allocating them on
  /// first use.
  void zero_grad() requires TrainableGate<G> && TrainableExperts<X> {
    gate_.zero_grad();
    experts_.zero_grad();
    if (shared_) shared_->zero_grad();
    if (shared_gate_) shared_gate_->zero_grad();
  }

  /// Calls `f(name, value, grad)` for every parameter tensor: the gate's (names prefixed
  /// `gate.`), the routed experts' (`experts.`), then the shared experts' (`shared.`) and the
  /// shared-expert gate's (`shared_gate.weight`), each in its own fixed order
  /// (concepts.hpp). For the optimisers in train/optim.hpp.
  template <class F>
  void visit_parameters(F&& f) requires TrainableGate<G> && TrainableExperts<X> {
    // Names composed without allocating (detail/param_names.hpp): an optimiser step stays off
    // the heap.
    detail::ParamNamer namer;
    const auto prefixed = [&](std::string_view prefix) {
      return detail::prefixed_visitor<Scalar>(f, namer, prefix);
    };
    gate_.visit_parameters(prefixed("gate."));
    experts_.visit_parameters(prefixed("experts."));
    if (shared_) shared_->visit_parameters(prefixed("shared."));
    if (shared_gate_) shared_gate_->visit_parameters(prefixed("shared_gate."));
  }

  /// Tells the gate and the expert banks that their parameters changed in place (the
  /// optimisers call this after a step), for parts that keep derived copies.
  void parameters_changed() {
    notify_parameters_changed(gate_);
    notify_parameters_changed(experts_);
    if (shared_) notify_parameters_changed(*shared_);
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
  /// Whether the shared experts are gated (`SharedExpertGate`).
  bool has_shared_gate() const { return shared_gate_.has_value(); }
  /// The shared experts' gate; throws `moet::Error` when the layer has none.
  const SharedExpertGate<Scalar>& shared_gate() const {
    detail::require(shared_gate_.has_value(), kOp, "this layer has no shared-expert gate");
    return *shared_gate_;
  }
  SharedExpertGate<Scalar>& shared_gate() {
    detail::require(shared_gate_.has_value(), kOp, "this layer has no shared-expert gate");
    return *shared_gate_;
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

  /// Selection options for every call of this layer (`RoutingOverrides`: k, p, ...), as if the
  /// gate had been built with them; a field a call's `ctx.overrides` sets wins over the
  /// layer's. The gate validates them on each call (a `moet::Error` naming the gate for a
  /// field it does not take or a value its constructor would reject). Clear with `{}`.
  ///
  /// ```cpp
  /// layer.set_overrides({.k = 1});  // a top-2 model decodes with one expert per token
  /// ```
  void set_overrides(const RoutingOverrides& overrides) { overrides_ = overrides; }
  /// The layer's overrides (empty by default).
  const RoutingOverrides& overrides() const { return overrides_; }

 private:
  static constexpr const char* kOp = "MoELayer";

  // `ctx` with the layer's overrides in the fields ctx leaves unset.
  RouteContext call_context(const RouteContext& ctx) const {
    RouteContext c = ctx;
    if (overrides_.empty()) return c;
    auto& o = c.overrides;
    if (o.k == 0) o.k = overrides_.k;
    if (o.p == 0.0) o.p = overrides_.p;
    if (o.k_max == 0) o.k_max = overrides_.k_max;
    if (o.k_avg == 0.0) o.k_avg = overrides_.k_avg;
    return c;
  }

  // The input checks of forward and forward_train.
  void check_forward(const ConstRows<Scalar>& x, const Rows<Scalar>& y) const {
    detail::check_rows_in_out(kOp, model_dim(), x, y);
    detail::require(detail::all_finite(x), kOp, "x (", x.rows(), ", ", x.cols(),
                    ") must be finite, found a NaN or Inf");
  }

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
    if (shared_gate_) {
      detail::require(shared_gate_->model_dim() == experts_.model_dim(), kOp,
                      "the shared-expert gate's model_dim is ", shared_gate_->model_dim(),
                      " but the experts' is ", experts_.model_dim());
    }
  }

  G gate_;
  X experts_;
  std::optional<X> shared_;
  std::optional<SharedExpertGate<Scalar>> shared_gate_;
  D dispatch_;
  RoutingOverrides overrides_{};
  Workspace workspace_;
};

}  // namespace moet
