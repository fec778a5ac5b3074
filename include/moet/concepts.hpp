#pragma once
/// \file concepts.hpp
/// The three extension points: `Gate`, `Experts` and `Dispatcher`. A new gate, expert bank or
/// dispatcher satisfies its concept and plugs into `MoELayer` without touching the others.

#include <concepts>

#include "moet/context.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// A routing policy: scores the rows of `x` `(num_tokens, model_dim)` and fills a `Routing`.
/// `route` is `const` and keeps no per-call state in the gate, so one gate may route several
/// batches at once from different threads (each with its own `Routing`).
template <class G>
concept Gate = requires(const G& g, const ConstRows<typename G::Scalar>& x,
                        const RouteContext& ctx, Routing<typename G::Scalar>& out) {
  typename G::Scalar;
  { g.num_experts() } -> std::convertible_to<Index>;
  { g.model_dim() } -> std::convertible_to<Index>;
  g.route(x, ctx, out);
};

/// A bank of `num_experts` networks with the same shape. `forward(e, in, out, scratch)` writes
/// expert `e` applied to every row of `in` `(n, model_dim)` into `out` `(n, model_dim)`;
/// `Scratch` is per-thread workspace the caller keeps alive and reuses.
template <class X>
concept Experts = requires(const X& experts, Index e, const ConstRows<typename X::Scalar>& in,
                           Rows<typename X::Scalar>& out, typename X::Scratch& scratch) {
  typename X::Scalar;
  typename X::Scratch;
  { experts.num_experts() } -> std::convertible_to<Index>;
  { experts.model_dim() } -> std::convertible_to<Index>;
  { experts.hidden_dim() } -> std::convertible_to<Index>;
  /// Parameters of one expert (what one activation of it touches).
  { experts.params_per_expert() } -> std::convertible_to<Index>;
  /// Floating-point operations of one expert on one token (multiply and add count as 2).
  { experts.flops_per_token() } -> std::convertible_to<double>;
  experts.forward(e, in, out, scratch);
};

/// Runs the experts a routing plan asks for and combines their outputs:
/// `y[t] = sum over t's slots of weight * expert(x[t])`, in slot order, and `y[t] = 0` for a
/// token routed nowhere. `Workspace<X>` holds everything reused between calls.
template <class D, class X>
concept Dispatcher =
    Experts<X> && requires(const D& d, const X& experts, const ConstRows<typename X::Scalar>& x,
                           const Routing<typename X::Scalar>& routing,
                           Rows<typename X::Scalar>& y, typename D::template Workspace<X>& ws) {
      d.run(experts, x, routing, y, ws);
    };

}  // namespace moet
