#pragma once
/// \file gates/null_experts.hpp
/// `NullExpertGate`: top-k over real plus null experts (AdaMoE, arXiv 2406.13233; MoE++'s zero
/// experts, arXiv 2410.07348): a pick of a null expert costs nothing, so a token uses between 0
/// and k real experts.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/select.hpp"
#include "moet/detail/softmax_router.hpp"
#include "moet/errors.hpp"
#include "moet/gates/router.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// Null experts (docs/algorithms.md §17; AdaMoE, "AdaMoE: Token-Adaptive Routing with Null
/// Experts for Mixture-of-Experts Language Models", official code CengZihao/AdaMoE):
///
/// ```
/// z = x [W_r | W_null]              (T, E + N): N null slots after the E real experts
/// P = softmax(z)                    over all E + N slots, in S
/// S_t = top-k slots of P[t]         (ties to the lower slot, so a real expert before a null)
/// token t's slots: the real experts of S_t in rank order, w_e = P_e / Σ_{real j in S_t} P_j
/// ```
///
/// (`renormalize = false`: `w_e = P_e`.) A token whose k picks are all null gets no expert and
/// output 0. Null experts cost nothing: the plan holds only real experts and `mean_k` counts
/// them. `Routing::probs()` holds the real columns `P[:, :E]` (not a distribution);
/// `all_probabilities` gives all `E + N`, the input of `null_expert_balance_loss`.
///
/// Parameters: `router()` is `[W_r | W_null]` `(model_dim, E + N)` (`router.weight`), set with
/// `set_router` in either layout; `num_experts()` is `E`, the bank's size, and
/// `num_slots()` is `E + N`.
///
/// **Gradient** (`backward`): the picks are held fixed. Renormalised weights are a softmax over
/// the real picks' logits alone; raw weights go through the softmax over all `E + N` slots, as
/// do `loss_grad.d_probs` and `loss_grad.d_logits`, each empty or `(T, E + N)` values (not
/// `(T, E)`: the balance loss acts on the null slots, whose router columns get gradient).
/// `ctx.overrides.k` routes one call as a gate built with that `k` would.
///
/// \tparam S scalar of the router, the probabilities and the combine weights.
///
/// ```cpp
/// moet::NullExpertGate<float> gate({.model_dim = 512, .num_experts = 8, .num_null = 8, .k = 2});
/// ```
template <class S>
class NullExpertGate : public SoftmaxGateBase<S> {
 public:
  /// Construction options (validated by the constructor).
  struct Options {
    /// Columns of `x`; >= 1.
    Index model_dim = 0;
    /// Real experts `E` (the bank's size); >= 1.
    Index num_experts = 0;
    /// Null experts `N`; >= 1.
    Index num_null = 1;
    /// Picks per token among the `E + N` slots, in `[1, E + N]`.
    Index k = 2;
    /// Divide the real picks' probabilities by their sum (AdaMoE).
    bool renormalize = true;
    /// Seed of the router initialisation (all `E + N` columns).
    std::uint64_t init_seed = 0;
  };

  /// Validates `options` (throws `Error`) and initialises `[W_r | W_null]` normal with standard
  /// deviation `1 / sqrt(model_dim)` from `init_seed`.
  explicit NullExpertGate(const Options& options)
      : SoftmaxGateBase<S>(
            SoftmaxRouter<S>(kOp, options.model_dim, slots_of(options), options.init_seed)),
        options_(validated(options)) {}

  const Options& options() const { return options_; }
  /// Real experts `E`.
  Index num_experts() const { return options_.num_experts; }
  /// Real plus null slots `E + N`, the columns of `router()`.
  Index num_slots() const { return options_.num_experts + options_.num_null; }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out` (see the class notes). Throws
  /// `Error` when `x` has the wrong width or a NaN/Inf, a router logit is not finite, or an
  /// override is not `k` or is out of range. The same plan for any thread count.
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    const Index k = call_k(ctx);
    const Index n = num_slots();
    const Index num_real = options_.num_experts;
    const Index num_tokens = x.rows();
    const auto all = this->router_.probabilities(x, out);  // (T, E + N), in out for now
    auto p = out.scratch_values.matrix(num_tokens, n);
    p = all;
    out.reset(num_tokens, num_real);
    std::int32_t* ranks = out.scratch_ids.data(num_tokens * n);
    const auto counts = out.counts();
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        std::int32_t* r = ranks + t * n;
        detail::top_k_descending(p.data() + t * n, n, k, r);
        Index real = 0;
        for (Index j = 0; j < k; ++j) real += r[j] < num_real ? 1 : 0;
        counts[static_cast<std::size_t>(t)] = real;
      }
    });
    out.commit_counts();
    auto probs = out.probs_mut();  // (T, E): the real columns
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        const S* row = p.data() + t * n;
        const std::int32_t* r = ranks + t * n;
        const auto experts = out.experts(t);
        const auto weights = out.weights(t);
        S sum = S(0);
        std::size_t a = 0;
        for (Index j = 0; j < k; ++j) {
          if (r[j] >= num_real) continue;
          experts[a] = r[j];
          weights[a] = row[r[j]];
          sum += weights[a];
          ++a;
        }
        if (options_.renormalize && sum > S(0)) {
          for (auto& w : weights) w /= sum;
        }
        for (Index e = 0; e < num_real; ++e) probs(t, e) = row[e];
      }
    });
  }

  /// Writes `P = softmax(x [W_r | W_null])` over all `E + N` slots into `p` `(num_tokens, E +
  /// N)`, with the bits `route` uses. Throws `Error` on a bad `x`, a `p` of the wrong shape or
  /// a non-finite logit.
  void all_probabilities(const ConstRows<S>& x, Rows<S> p) const {
    this->router_.logits(x, p);
    for (Index t = 0; t < p.rows(); ++t) {
      detail::require(p.row(t).allFinite(), kOp,
                      "router logits must be finite, got NaN or Inf for token ", t);
    }
    detail::parallel_blocks(p.rows(), detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) detail::softmax_row(p.data() + t * p.cols(), p.cols());
    });
  }

  /// Backward of `route(x, ctx, routing)` with the picks fixed (see the class notes):
  /// `d_weights` dL/dw per assignment, `loss_grad.d_probs` and `d_logits` empty or `(T, E + N)`
  /// values, `loss_grad.d_weights` empty or per assignment. Accumulates into the gradient of
  /// `[W_r | W_null]` and adds dL/dx into `dx`. Throws `Error` naming `NullExpertGate::backward`
  /// on a size mismatch or a plan not from this gate and this `x`.
  void backward(const ConstRows<S>& x, const RouteContext& /*ctx*/, const Routing<S>& routing,
                std::span<const S> d_weights, const SoftmaxLossGrad<S>& loss_grad, Rows<S> dx) {
    constexpr const char* op = "NullExpertGate::backward";
    const Index n = num_slots();
    const Index num_tokens = x.rows();
    detail::require(loss_grad.d_noise_logits.empty(), op, "takes no d_noise_logits");
    for (const auto* g : {&loss_grad.d_probs, &loss_grad.d_logits}) {
      detail::require(g->empty() || static_cast<Index>(g->size()) == num_tokens * n, op,
                      "loss_grad.d_probs and d_logits must be empty or num_tokens * (E + N) = ",
                      num_tokens, " * ", n, " values, got ", g->size());
    }
    SoftmaxLossGrad<S> plan_part;
    plan_part.d_weights = loss_grad.d_weights;
    detail::check_softmax_backward(op, x, this->model_dim(), options_.num_experts, routing,
                                   d_weights, plan_part, dx);
    this->router_.allocate_grad();
    if (num_tokens == 0) return;
    auto p = p_.matrix(num_tokens, n);
    all_probabilities(x, p);
    auto dz = dz_.matrix(num_tokens, n);
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        const S* q = p.data() + t * n;
        S* dz_row = dz.data() + t * n;
        detail::plan_weights_backward_row(routing, t, q, n, d_weights, loss_grad.d_weights,
                                          options_.renormalize, dz_row);
        detail::score_losses_backward_row(loss_grad, t, q, n, dz_row);
      }
    });
    this->router_.backward_logits(x, dz, dx);
  }

 private:
  static constexpr const char* kOp = "NullExpertGate";

  static Index slots_of(const Options& o) {
    detail::require(o.num_null >= 1, kOp, "num_null must be >= 1, got ", o.num_null);
    detail::require(o.num_experts >= 1, kOp, "num_experts must be >= 1, got ", o.num_experts);
    // The slot count is a routing-plan index (int32 expert ids; the router's columns).
    constexpr Index kMaxSlots = std::numeric_limits<std::int32_t>::max();
    detail::require(o.num_experts <= kMaxSlots - o.num_null, kOp,
                    "num_experts + num_null must be at most ", kMaxSlots, ", got ", o.num_experts,
                    " + ", o.num_null);
    return o.num_experts + o.num_null;
  }

  Index call_k(const RouteContext& ctx) const {
    const auto apply = [](Options& o, const RoutingOverrides& v) { o.k = v.k != 0 ? v.k : o.k; };
    return detail::call_options(kOp, ctx.overrides, {.k = true}, options_, apply, validated).k;
  }

  static Options validated(const Options& o) {
    const Index n = slots_of(o);
    detail::require(o.k >= 1 && o.k <= n, kOp, "k must be in [1, num_experts + num_null = ", n,
                    "], got ", o.k);
    return o;
  }

  Options options_;
  detail::Buffer<S> p_;   // backward scratch: P over all slots (T, E + N), grow-only
  detail::Buffer<S> dz_;  // backward scratch: dL/dz (T, E + N), grow-only
};

}  // namespace moet
