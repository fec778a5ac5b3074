#pragma once
/// \file train/grad.hpp
/// The training protocol: what a gate and an expert bank add to be trainable, how parameters
/// and their gradients are visited, and the loss-gradient inputs a gate's backward accepts.
///
/// Conventions (every trainable component follows them):
/// - Gradients live next to the parameters, inside the component, allocated lazily by the first
///   `zero_grad()` or `backward` (an inference-only user never pays for them). They have the
///   parameters' shapes.
/// - `backward` **accumulates** (`+=`) into the gradients, so several backward calls between two
///   `zero_grad()` calls sum their gradients (gradient accumulation over micro-batches).
/// - `backward` **adds** its contribution to the input gradient `dx`; the caller zeroes `dx`.
/// - `visit_parameters(f)` calls `f(name, value, grad)` once per parameter tensor, in a fixed
///   order, with `value` and `grad` as `Eigen::Map<RowMatrix<S>>` of the same shape (vectors are
///   `(1, n)`). Names are dotted, lower case: `router.weight`, `experts.gate`, `thresholds`...;
///   the layer prefixes its parts with `gate.`, `experts.` and `shared.`.
/// - Every backward is deterministic: the same bits for any thread count.

#include <concepts>
#include <span>
#include <string_view>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// A parameter tensor and its gradient, as handed to a visitor.
template <class S>
using ParamMap = Eigen::Map<RowMatrix<S>>;

/// Loss-gradient inputs of the softmax-router gates (`TopKGate`, `TopPGate`, `ImportanceGate`)
/// besides the task's combine-weight gradient. Each span is empty (no such loss) or holds the
/// values below, row-major:
/// - `d_probs` `(num_tokens * num_experts)`: dL/dP on the full clean softmax probabilities
///   `P = softmax(x W_r)`, aligned with `Routing::probs()` (load balance, top-p entropy);
/// - `d_logits` `(num_tokens * num_experts)`: dL/dz on the router logits `z = x W_r` (router
///   z-loss, the `z` part of the noisy load loss);
/// - `d_weights` `(num_assignments)`, routing order: dL/dw from losses on the combine weights
///   (`importance_loss`), added to the task's combine-weight gradient;
/// - `d_noise_logits` `(num_tokens * num_experts)`: dL/dn on the noise logits `n = x W_noise`
///   (`noisy_load_loss`); only a noisy `TopKGate` accepts it.
template <class S>
struct SoftmaxLossGrad {
  std::span<const S> d_probs{};
  std::span<const S> d_logits{};
  std::span<const S> d_weights{};
  std::span<const S> d_noise_logits{};
};

/// No loss-gradient inputs (gates without trainable scores, such as `StochasticGate`).
struct NoLossGrad {};

namespace detail {
/// The visitor signature used in the concepts below.
template <class S>
struct ParamVisitorArchetype {
  void operator()(std::string_view, ParamMap<S>, ParamMap<S>) const {}
};
}  // namespace detail

/// A gate that can be trained. `backward(x, ctx, routing, d_weights, loss_grad, dx)` takes the
/// same `x` and `ctx` as the `route` call that produced `routing` (random choices are keyed on
/// `ctx.seed`/`ctx.step`, so they repeat exactly), the gradient of the loss with respect to every
/// combine weight (`d_weights[a]` for assignment `a`, routing order) and the gate's own
/// loss-gradient inputs, accumulates the gradients of its parameters and adds dL/dx into `dx`
/// `(num_tokens, model_dim)`. The selection itself is piecewise constant: it is held fixed,
/// except where ALGORITHMS.md prescribes a surrogate (straight-through for `TopAnyGate`).
template <class G>
concept TrainableGate =
    Gate<G> && requires(G& g, const ConstRows<typename G::Scalar>& x, const RouteContext& ctx,
                        const Routing<typename G::Scalar>& routing,
                        std::span<const typename G::Scalar> d_weights,
                        const typename G::LossGrad& loss_grad, Rows<typename G::Scalar> dx,
                        detail::ParamVisitorArchetype<typename G::Scalar> visitor) {
      typename G::LossGrad;
      g.backward(x, ctx, routing, d_weights, loss_grad, dx);
      g.zero_grad();
      g.visit_parameters(visitor);
    };

/// An expert bank that can be trained.
/// - `cache_width()`: scalars kept per routed row by `forward_train` (the activations backward
///   needs, e.g. `2 * hidden_dim` pre-activations for a GLU expert).
/// - `forward_train(e, in, out, cache, scratch)` (const): `forward`, plus the row cache
///   `(n, cache_width())`.
/// - `backward(e, in, cache, dout, din, scratch)`: given `in` and `cache` from `forward_train`
///   and `dout` = dL/dout `(n, model_dim)`, accumulates expert `e`'s weight gradients and
///   **writes** `din` = dL/din `(n, model_dim)`. Calls for different experts may run
///   concurrently; calls for the same expert must not.
template <class X>
concept TrainableExperts =
    Experts<X> &&
    requires(X& mx, const X& x, Index e, const ConstRows<typename X::Scalar>& in,
             const ConstRows<typename X::Scalar>& cin, Rows<typename X::Scalar> rows,
             typename X::Scratch& scratch,
             detail::ParamVisitorArchetype<typename X::Scalar> visitor) {
      { x.cache_width() } -> std::convertible_to<Index>;
      x.forward_train(e, in, rows, rows, scratch);
      mx.backward(e, in, cin, in, rows, scratch);
      mx.zero_grad();
      mx.visit_parameters(visitor);
    };

}  // namespace moet
