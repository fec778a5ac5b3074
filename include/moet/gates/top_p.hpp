#pragma once
/// \file gates/top_p.hpp
/// `TopPGate`: top-p (nucleus) routing, "Harder Tasks Need More Experts" (Huang et al., ACL
/// 2024, arXiv 2403.07652).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>

#include "moet/context.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/select.hpp"
#include "moet/detail/softmax_router.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"
#include "moet/concepts.hpp"

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

/// Top-p routing: each token takes the most probable experts until their cumulative
/// probability exceeds `p` (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing
/// in MoE Models"; the original `top_p_sampling_batched_all_sequence` applied to `P`).
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
/// **Gradient** (`backward`, ALGORITHMS.md §2.3): the kept set (and so `k` per token) is held
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
class TopPGate {
 public:
  using Scalar = S;
  /// Loss-gradient inputs of `backward`: dL/dP and dL/dz.
  using LossGrad = SoftmaxLossGrad<S>;

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
      : options_(validated(options)),
        router_(options_.model_dim, options_.num_experts, options_.init_seed) {}

  Index num_experts() const { return options_.num_experts; }
  Index model_dim() const { return options_.model_dim; }
  const Options& options() const { return options_; }
  /// Router weights `W_r` `(model_dim, num_experts)`, a read-only view (write with
  /// `set_router`).
  Eigen::Map<const RowMatrix<S>> router() const { return router_.view(); }
  /// Replaces `W_r` by `w`: `(model_dim, num_experts)` with `WeightLayout::kInOut`,
  /// `[num_experts, model_dim]` with `kOutIn` (PyTorch's `nn.Linear(model_dim,
  /// num_experts).weight`). Throws `moet::Error` (nothing changed) on another shape ("looks
  /// transposed" for the other layout's) or a NaN/Inf entry.
  void set_router(const ConstRows<S>& w, WeightLayout layout) {
    router_.set(kOp, "set_router", "router", w, layout, options_.model_dim, options_.num_experts);
  }

  /// Gradient of `W_r` `(model_dim, num_experts)`; `(0, 0)` before the first `zero_grad()` or
  /// `backward`.
  const RowMatrix<S>& router_grad() const { return router_.grad(); }

  /// Writes the router logits `z = x W_r` `(num_tokens, num_experts)` into `z` (the input of
  /// `router_z_loss`), with the same bits as `route` computes them. Throws `Error` on a bad `x`
  /// or a `z` of the wrong shape.
  void logits(const ConstRows<S>& x, Rows<S> z) const { router_.logits(kOp, x, z); }

  /// Sets the router gradient to zero (allocating it on first use).
  void zero_grad() { router_.zero_grad(); }

  /// Calls `f(name, value, grad)` for `router.weight` `(model_dim, num_experts)`, allocating
  /// the gradient on first use.
  template <class F>
  void visit_parameters(F&& f) {
    router_.visit(f);
  }

  /// Backward of `route(x, ctx, routing)` (see the class notes for the gradient treatment):
  /// `x` and `ctx` are those of the `route` call, `d_weights` holds dL/dw per assignment
  /// (routing order, `routing.num_assignments()` values), `loss_grad` the optional dL/dP and
  /// dL/dz `(num_tokens * num_experts)` each. Accumulates into the gradient of `W_r` and adds
  /// dL/dx into `dx` `(num_tokens, model_dim)`. The same bits for any thread count. Throws
  /// `Error` naming `TopPGate::backward` on any size mismatch or a plan that is not from this
  /// gate and this `x`.
  void backward(const ConstRows<S>& x, const RouteContext& ctx, const Routing<S>& routing,
                std::span<const S> d_weights, const LossGrad& loss_grad, Rows<S> dx) {
    static_cast<void>(ctx);  // the selection is held fixed; no random draws
    router_.check_backward(kBackwardOp, x, routing, d_weights, loss_grad, dx);
    router_.backward_plan(x, routing, d_weights, false, loss_grad, dx);
  }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out`. Throws `Error` when `x` has
  /// the wrong width or a NaN/Inf, or when a router logit is not finite.
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    static_cast<void>(ctx);  // top-p uses no context
    detail::check_gate_input(kOp, x, options_.model_dim);
    const Index num_tokens = x.rows();
    const Index num_experts = options_.num_experts;
    // Per-token sort order (num_tokens, num_experts), sized before the parallel regions.
    std::int32_t* order = out.scratch_ids.data(num_tokens * num_experts);
    const auto probs = router_.probabilities(kOp, x, out);  // (num_tokens, num_experts)
    if (num_tokens == 0) return;

    const auto p = static_cast<S>(options_.p);
    const Index max_k = options_.max_k == 0 ? num_experts : options_.max_k;
    const auto counts = out.counts();
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        const S* row = probs.data() + t * num_experts;
        std::int32_t* row_order = order + t * num_experts;
        detail::sort_descending(row, num_experts, row_order);
        const Index kept = detail::top_p_count(row, row_order, num_experts, p, options_.inclusive);
        counts[static_cast<std::size_t>(t)] = std::min(kept, max_k);
      }
    });
    out.commit_counts();
    detail::write_ranked_slots(probs.data(), order, num_experts, false, out);
  }

 private:
  static constexpr const char* kOp = "TopPGate";
  static constexpr const char* kBackwardOp = "TopPGate::backward";

  static Options validated(const Options& o) {
    detail::check_router_shape(kOp, o.model_dim, o.num_experts);
    detail::require(o.p > 0.0 && o.p <= 1.0, kOp, "p must be in (0, 1], got ", o.p);
    detail::require(o.max_k >= 0 && o.max_k <= o.num_experts, kOp,
                    "max_k must be 0 (no cap) or in [1, num_experts = ", o.num_experts, "], got ",
                    o.max_k);
    return o;
  }

  Options options_;
  detail::SoftmaxRouter<S> router_;
};

}  // namespace moet
