#pragma once
/// \file gates/expert_choice.hpp
/// `ExpertChoiceGate`: expert-choice routing (Zhou et al., NeurIPS 2022, arXiv 2202.09368): each
/// expert takes its `C` most probable tokens, so a token gets between 0 and `E` experts.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/errors.hpp"
#include "moet/gates/router.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

namespace detail {

/// Expert choice's capacity `C = round(capacity_factor * T / E)` (half to even, in double,
/// independent of the floating-point rounding mode), then `max(C, min_capacity)`, at most `T`.
inline Index expert_choice_capacity(Index num_tokens, Index num_experts, double capacity_factor,
                                    Index min_capacity) {
  const double v =
      capacity_factor * static_cast<double>(num_tokens) / static_cast<double>(num_experts);
  double r = std::floor(v);
  const double frac = v - r;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1.0;
  const double bounded = std::min(r, static_cast<double>(num_tokens));
  return std::min(std::max(static_cast<Index>(bounded), min_capacity), num_tokens);
}

}  // namespace detail

/// Expert-choice routing (docs/algorithms.md §15; Zhou et al. 2022, "Mixture-of-Experts with
/// Expert Choice Routing"; Google's flaxformer `ExpertsChooseMaskedRouter` is the reference
/// implementation): the experts choose the tokens, not the tokens the experts.
///
/// `P = softmax(x W_r)` per token in `S` (fp32 for float); expert `e` takes the `C` tokens with
/// the largest `P[:, e]` (equal probabilities to the lower token index), `C =
/// round(capacity_factor * T / E)` (half to even), raised to `min_capacity` and capped at `T`.
/// Token `t`'s slots are the experts that took it, in descending `P[t, :]` (ties to the lower
/// id), weighted by the raw `P[t, e]` (not renormalised, as the reference). So every expert
/// processes exactly `C` tokens (perfect load balance by construction, no auxiliary loss), and
/// a token gets 0 to `E` experts: mean k is `E C / T`, about `capacity_factor`.
///
/// **Not causal.** Whether a token gets an expert depends on every other token of the call:
/// the same token routes differently in another batch, a token may get no expert at all (its
/// output is then 0, the residual alone carries it), and at decode (`T = 1`) `C` is
/// `min(max(round(cf / E), min_capacity), 1)`: every expert takes the single token when
/// `min_capacity >= 1`, none when it is 0 and `cf <= E / 2`. A causal model cannot decode
/// with it as it trained; decode a model trained with it with `TopKGate` on the same router
/// weights (k about the trained mean k), and say so when comparing.
///
/// **Gradient** (`backward`): the selection is held fixed (piecewise constant); weights are the
/// raw `P_e`, so `dL/dP_e += dL/dw` on the kept slots, then through the softmax to `W_r` and `x`,
/// with `loss_grad.d_probs` and `loss_grad.d_logits` added, as `TopPGate`. There are no run-time
/// overrides (`ctx.overrides` set is an error).
///
/// \tparam S scalar of the router, the probabilities and the combine weights.
///
/// ```cpp
/// moet::ExpertChoiceGate<float> gate({.model_dim = 512, .num_experts = 16,
///                                     .capacity_factor = 2.0});
/// ```
template <class S>
class ExpertChoiceGate : public SoftmaxGateBase<S> {
 public:
  /// Construction options (validated by the constructor).
  struct Options {
    /// Columns of `x`; >= 1.
    Index model_dim = 0;
    /// Number of experts `E`; >= 1.
    Index num_experts = 0;
    /// Mean experts per token `c` of `C = round(c T / E)`: finite and > 0. 2 is the paper's
    /// EC-CF2.
    double capacity_factor = 2.0;
    /// Lower bound of `C`, >= 0 (4, as `TopKGate`'s; `C` never exceeds `T`).
    Index min_capacity = 4;
    /// Seed of the router initialisation.
    std::uint64_t init_seed = 0;
  };

  /// Validates `options` (throws `Error`) and initialises `W_r` normal with standard deviation
  /// `1 / sqrt(model_dim)` from `init_seed`.
  explicit ExpertChoiceGate(const Options& options)
      : SoftmaxGateBase<S>(
            SoftmaxRouter<S>(kOp, options.model_dim, options.num_experts, options.init_seed)),
        options_(validated(options)) {}

  const Options& options() const { return options_; }

  /// Each expert's capacity `C` for a call of `num_tokens` tokens.
  Index capacity(Index num_tokens) const {
    return detail::expert_choice_capacity(num_tokens, options_.num_experts,
                                          options_.capacity_factor, options_.min_capacity);
  }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out`. Throws `Error` when `x` has
  /// the wrong width or a NaN/Inf, a router logit is not finite, `num_tokens` exceeds
  /// `INT32_MAX`, or `ctx.overrides` is set. The same plan for any thread count.
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    if (!ctx.overrides.empty()) detail::check_override_fields(kOp, ctx.overrides, {});
    detail::require(x.rows() <= std::numeric_limits<std::int32_t>::max(), kOp,
                    "at most INT32_MAX tokens per call, got ", x.rows());
    const auto probs = this->router_.probabilities(x, out);  // (num_tokens, num_experts)
    const Index num_tokens = x.rows();
    const Index num_experts = options_.num_experts;
    const Index c = capacity(num_tokens);
    // Scratch after the rankings: each expert's token order (num_experts * num_tokens), then
    // each expert's last taken token (num_experts; -1 when C = 0).
    RankedSelection<S> select(out, num_experts * num_tokens + num_experts);
    std::int32_t* order = select.extra_ids();
    std::int32_t* last = order + num_experts * num_tokens;
    detail::parallel_for(num_experts, [&](Index e) {
      last[e] = -1;
      if (c == 0) return;
      std::int32_t* idx = order + e * num_tokens;
      for (Index t = 0; t < num_tokens; ++t) idx[t] = static_cast<std::int32_t>(t);
      const S* column = probs.data() + e;
      // A strict total order (probability descending, then token ascending): the C-th token
      // is unique, so the choice is independent of the algorithm and the thread count.
      const auto before = [&](std::int32_t a, std::int32_t b) {
        const S pa = column[a * num_experts];
        const S pb = column[b * num_experts];
        return pa > pb || (pa == pb && a < b);
      };
      std::nth_element(idx, idx + (c - 1), idx + num_tokens, before);
      last[e] = idx[c - 1];
    });
    // Token t is taken by e iff (P[t,e], t) ranks at or before e's C-th token.
    const auto taken = [&](Index t, std::int32_t e) {
      const std::int32_t l = last[e];
      if (l < 0) return false;
      const S p = probs(t, e);
      const S pl = probs(l, e);
      return p > pl || (p == pl && t <= l);
    };
    select.rank(probs, num_experts, [&](Index t, std::span<const std::int32_t> ranked) {
      Index k = 0;
      for (const std::int32_t e : ranked) k += taken(t, e) ? 1 : 0;
      return k;
    });
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        for (std::int32_t& e : select.ranking(t)) {
          if (!taken(t, e)) e = -1;
        }
      }
    });
    select.write(probs, /*renormalize=*/false);
  }

  /// Backward of `route(x, ctx, routing)` with the selection held fixed (see the class notes):
  /// `d_weights` holds dL/dw per assignment (routing order), `loss_grad` the optional auxiliary
  /// inputs. Accumulates into the gradient of `W_r` and adds dL/dx into `dx`. The same bits for
  /// any thread count. Throws `Error` naming `ExpertChoiceGate::backward` on a size mismatch or a
  /// plan that is not from this gate and this `x`.
  void backward(const ConstRows<S>& x, const RouteContext& /*ctx*/, const Routing<S>& routing,
                std::span<const S> d_weights, const SoftmaxLossGrad<S>& loss_grad, Rows<S> dx) {
    this->router_.backward(x, routing, d_weights, /*renormalize=*/false, loss_grad, dx);
  }

 private:
  static constexpr const char* kOp = "ExpertChoiceGate";

  static Options validated(const Options& o) {
    detail::require(std::isfinite(o.capacity_factor) && o.capacity_factor > 0.0, kOp,
                    "capacity_factor must be finite and > 0, got ", o.capacity_factor);
    detail::require(o.min_capacity >= 0, kOp, "min_capacity must be >= 0, got ", o.min_capacity);
    return o;
  }

  Options options_;
};

}  // namespace moet
