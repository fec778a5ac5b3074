#pragma once
/// \file gates/top_p.hpp
/// `TopPGate`: top-p (nucleus) routing, "Harder Tasks Need More Experts" (Huang et al., ACL
/// 2024, arXiv 2403.07652).

#include <algorithm>
#include <cstdint>
#include <span>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/errors.hpp"
#include "moet/gates/router.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

namespace detail {

/// How many experts top-p keeps, given the `n` probabilities `values` and their descending
/// order `order` (ids, best first): sorted position `j` (0-based) is kept iff the inclusive
/// cumulative sum of the sorted values up to position `j - 1` is `<= p` (`inclusive = false`,
/// the original's strict `c > p` stop) or `< p` (`inclusive = true`, the `c >= p` variant),
/// the empty prefix summing to 0; so the expert that crosses `p` is kept, and so is the first
/// expert. When no prefix passes `p`, all `n` are kept. The cumulative sum runs sequentially in
/// `S`, so rounding decides the boundary cases exactly as a sequential float32 `cumsum` does.
template <class S>
Index top_p_count(const S* values, const std::int32_t* order, Index n, S p, bool inclusive) {
  S cumsum = S(0);
  for (Index j = 0; j < n; ++j) {
    const bool stop = inclusive ? !(cumsum < p) : cumsum > p;
    if (stop) return j;
    cumsum += values[order[j]];
  }
  return n;
}

}  // namespace detail

/// Top-p routing (docs/algorithms.md §5): each token takes the most probable experts until their
/// cumulative probability exceeds `p` (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic
/// Routing in MoE Models"; the original `top_p_sampling_batched_all_sequence` applied to `P`).
///
/// `P = softmax(x W_r)` in `S` (fp32 for float); the experts are sorted by descending `P` (ties
/// to the lower id) and sorted position `j` is kept iff the cumulative sum `c_{j-1} <= p`
/// (`c_0 = 0`; strict variant, the original's `cumsum > p`), or `c_{j-1} < p` with
/// `inclusive = true` (the `>=` variant of some write-ups). The expert that crosses `p` is
/// included; if no prefix exceeds `p`, every expert is kept. The cumulative sum and the
/// comparison run in `S` against `p` rounded to `S`, so fp32 edge cases match the original:
/// `P = [0.4, 0.4, 0.2]` with `p = 0.4` keeps 2 experts (`0.4f > 0.4f` is false); a uniform `P`
/// keeps `ceil(p E)` experts except where `p E` is (in floating point) an integer, where the
/// strict rule keeps one more; and `p = 1` keeps every expert unless the fp32 cumulative sum
/// overshoots 1 before the last one (the fp32 softmax of `log [0.5, 0.3, 0.2]` and a very
/// negative logit is `[0.50000006, 0.3, 0.20000002, 0]`, whose sum passes 1 after three experts,
/// so 3 are kept).
///
/// Weights are the raw `P_e` (not renormalised), as in the original combine. There is no
/// capacity and no dropping; `max_k` (an extension, off by default) caps the experts per token
/// after the top-p rule. `p` must lie in `(0, 1]`: the original's `p = 0` (which means top-1)
/// is rejected as a likely mistake; use `TopKGate` with `k = 1`.
///
/// **Gradient** (`backward`, docs/algorithms.md §5.2): the kept set (and so `k` per token) is held
/// fixed, since the selection is piecewise constant; the weights are the raw `P_e`, so
/// `dL/dP_e += dL/dw` on the kept experts, then through `P = softmax(z)`, `z = x W_r`, to `W_r`
/// and `x`. `loss_grad.d_probs` (the entropy "dynamic" loss and load balance act on every
/// expert's `P`) and `loss_grad.d_logits` (z-loss) are added. `visit_parameters` visits
/// `router.weight`.
///
/// \tparam S scalar of the router, the probabilities and the combine weights.
///
/// ```cpp
/// moet::TopPGate<float> gate({.model_dim = 512, .num_experts = 16, .p = 0.4});
/// ```
template <class S>
class TopPGate : public SoftmaxGateBase<S> {
 public:
  /// Construction options (validated by the constructor).
  struct Options {
    /// Columns of `x`; >= 1.
    Index model_dim = 0;
    /// Number of experts `E`; >= 1.
    Index num_experts = 0;
    /// Cumulative-probability threshold, in `(0, 1]`; 0.4 is the original's default.
    double p = 0.4;
    /// Stop at `c >= p` instead of the original's `c > p`.
    bool inclusive = false;
    /// At most this many experts per token; 0 = no cap (the original), else in
    /// `[1, num_experts]`.
    Index max_k = 0;
    /// Seed of the router initialisation.
    std::uint64_t init_seed = 0;
  };

  /// Validates `options` (throws `Error`) and initialises `W_r` normal with standard deviation
  /// `1 / sqrt(model_dim)` from `init_seed`.
  explicit TopPGate(const Options& options)
      : SoftmaxGateBase<S>(
            SoftmaxRouter<S>(kOp, options.model_dim, options.num_experts, options.init_seed)),
        options_(validated(options)) {}

  const Options& options() const { return options_; }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out`. Throws `Error` when `x` has
  /// the wrong width or a NaN/Inf, or when a router logit is not finite.
  ///
  /// `ctx.overrides.p` (when set) routes this call as a gate built with that `p` would
  /// (validated alike: in `(0, 1]`); other override fields are errors.
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    const auto p = static_cast<S>(call_p(ctx));
    const auto probs = this->router_.probabilities(x, out);  // (num_tokens, num_experts)
    const Index num_experts = options_.num_experts;
    const Index max_k = options_.max_k == 0 ? num_experts : options_.max_k;
    RankedSelection<S> select(out);
    select.rank(probs, num_experts, [&](Index t, std::span<const std::int32_t> ranked) {
      const S* row = probs.data() + t * num_experts;
      return std::min(detail::top_p_count(row, ranked.data(), num_experts, p, options_.inclusive),
                      max_k);
    });
    select.write(probs, /*renormalize=*/false);
  }

  /// Backward of `route(x, ctx, routing)` (see the class notes for the gradient treatment):
  /// `x` and `ctx` are those of the `route` call, `d_weights` holds dL/dw per assignment
  /// (routing order, `routing.num_assignments()` values), `loss_grad` the optional auxiliary
  /// inputs (`SoftmaxLossGrad`). Accumulates into the gradient of `W_r` and adds dL/dx into `dx`
  /// `(num_tokens, model_dim)`. The same bits for any thread count. Throws `Error` naming
  /// `TopPGate::backward` on any size mismatch or a plan that is not from this gate and this
  /// `x`.
  void backward(const ConstRows<S>& x, const RouteContext& /*ctx*/, const Routing<S>& routing,
                std::span<const S> d_weights, const SoftmaxLossGrad<S>& loss_grad, Rows<S> dx) {
    this->router_.backward(x, routing, d_weights, /*renormalize=*/false, loss_grad, dx);
  }

 private:
  static constexpr const char* kOp = "TopPGate";

  /// The `p` of this call: `ctx.overrides.p` when set (checked as the constructor checks `p`).
  double call_p(const RouteContext& ctx) const {
    const auto apply = [](Options& o, const RoutingOverrides& v) { o.p = v.p != 0.0 ? v.p : o.p; };
    return detail::call_options(kOp, ctx.overrides, {.p = true}, options_, apply, validated).p;
  }

  static Options validated(const Options& o) {
    detail::require(o.p > 0.0 && o.p <= 1.0, kOp, "p must be in (0, 1], got ", o.p);
    detail::require(o.max_k >= 0 && o.max_k <= o.num_experts, kOp,
                    "max_k must be 0 (no cap) or in [1, num_experts = ", o.num_experts, "], got ",
                    o.max_k);
    return o;
  }

  Options options_;
};

}  // namespace moet
