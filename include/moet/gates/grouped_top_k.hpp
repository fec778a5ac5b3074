#pragma once
/// \file gates/grouped_top_k.hpp
/// `GroupedTopKGate`: top-k routing inside the best groups of experts, with softmax or sigmoid
/// scores, a selection-only score bias and scaled weights: DeepSeek-V2's `group_limited_greedy`
/// and DeepSeek-V3's `noaux_tc` routers (and, with one group, plain softmax top-k).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/select.hpp"
#include "moet/detail/softmax_router.hpp"
#include "moet/detail/weights.hpp"
#include "moet/errors.hpp"
#include "moet/gates/router.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// The score function of `GroupedTopKGate` (DeepSeek's `scoring_func`).
enum class ExpertScoring {
  /// `s = softmax(x W_r)` over all experts (DeepSeek-V2, Mixtral, Qwen-MoE, OLMoE).
  kSoftmax,
  /// `s_e = sigmoid((x W_r)_e)`, each expert on its own (DeepSeek-V3).
  kSigmoid,
};

/// How `GroupedTopKGate` ranks a group of experts.
enum class GroupScore {
  /// The group's best selection score (DeepSeek-V2's `group_limited_greedy`).
  kMax,
  /// The sum of the group's two best selection scores (DeepSeek-V3's `noaux_tc`).
  kTopTwoSum,
};

/// When `GroupedTopKGate` multiplies the weights by `scaling_factor`.
enum class WeightScaling {
  /// Always, after the optional renormalisation (DeepSeek-V3's `MoEGate` and llama.cpp).
  kAfterNormalization,
  /// Only when the weights are not renormalised, i.e. unless `renormalize` and `k > 1`
  /// (DeepSeek-V2's `MoEGate`: `if top_k > 1 and norm_topk_prob: normalise, else: scale`).
  kInsteadOfNormalization,
};

/// Group-limited top-k routing with a selection-only score bias (DeepSeek-V2, arXiv 2405.04434,
/// §2.1.3 "device-limited routing", and DeepSeek-V3, arXiv 2412.19437, §2.1.2, as their
/// released `modeling_deepseek.py` computes it). Per token:
/// ```
/// s   = softmax(x W_r)  or  sigmoid(x W_r)        scores              (ExpertScoring)
/// c   = s + b                                      selection scores (b: score bias, not trained)
/// G_g = max_{e in g} c_e  or  top-2 sum over g     group scores        (GroupScore)
/// keep the groups_kept best groups; E_t = top-k of c over the experts of the kept groups
/// w_e = s_e for e in E_t (the unbiased scores)
///       / (sum_{E_t} s + 1e-20)                   if renormalize      (see WeightScaling)
///       * scaling_factor                          (see WeightScaling)
/// ```
/// The experts are split into `num_groups` equal groups of consecutive ids. With one group (or
/// `groups_kept = num_groups`) the group step keeps everything, and with `kSoftmax`, no bias,
/// `renormalize` and scale 1 the gate is Mixtral's renormalised softmax top-k. Slots are ordered
/// by descending selection score `c`, ties to the lower id (groups too). `Routing::probs()` holds
/// `s` (a distribution only for `kSoftmax`).
///
/// **Where implementations disagree** (docs/algorithms.md, "Grouped top-k"):
/// - *Scaling*: DeepSeek-V2's code multiplies by `routed_scaling_factor` only when it does not
///   renormalise (`kInsteadOfNormalization`), DeepSeek-V3's after renormalising
///   (`kAfterNormalization`); `deepseek_v2_options` and `deepseek_v3_options` follow each.
/// - *Masked experts*: the reference code sets the selection scores of experts outside the kept
///   groups to 0 and then takes the top-k; vLLM and SGLang set them to `-inf`. moet excludes
///   them (`-inf`): with 0, an expert of a removed group outranks a kept expert whose biased
///   score is negative and is selected although its group was removed. The two agree whenever
///   the kept groups hold at least `k` experts with a positive selection score, which is always
///   the case without a bias (softmax and sigmoid scores are positive). The options must keep
///   at least `k` experts (`groups_kept * group size >= k`).
///
/// **Gradient** (`backward`, docs/algorithms.md): the selection (groups and experts) is held
/// fixed and the bias gets none (DeepSeek-V3 adjusts it outside the gradient, by the load). The
/// weights' gradient reaches `s`: `dL/ds_e = a dw_e` (not renormalised, `a` the scale) or
/// `(a / D) (dw_e - sum_j dw_j s_j / D)` with `D = sum_{E_t} s + 1e-20` on the selected experts,
/// plus `loss_grad.d_probs` (on `s`) everywhere; then through the softmax (`dz = s (g - <s, g>)`)
/// or the sigmoid (`dz = g s (1 - s)`), plus `loss_grad.d_logits`, to `W_r` and `x`.
/// `visit_parameters` visits `router.weight`.
///
/// \tparam S scalar of the router, the scores and the combine weights.
///
/// ```cpp
/// moet::GroupedTopKGate<float> gate(
///     moet::GroupedTopKGate<float>::deepseek_v3_options(7168, 256, 8, 8, 4, 2.5));
/// gate.set_router(hf_gate_weight, moet::WeightLayout::kOutIn);   // mlp.gate.weight [256, 7168]
/// gate.set_score_bias(e_score_correction_bias);                  //
/// mlp.gate.e_score_correction_bias
/// ```
template <class S>
class GroupedTopKGate : public SoftmaxGateBase<S> {
 public:
  using Scalar = S;
  /// Loss-gradient inputs of `backward`: dL/ds (on `Routing::probs()`), dL/dz, dL/dw.
  using LossGrad = SoftmaxLossGrad<S>;
  // From SoftmaxGateBase: model_dim(), num_experts(), router(), set_router(w, layout) (DeepSeek's
  // `mlp.gate.weight` is `[num_experts, model_dim]`: WeightLayout::kOutIn), router_grad(),
  // logits(x, z), zero_grad(), visit_parameters(f) (`router.weight`; the score bias is not a
  // trained parameter).

  /// Construction options (validated by the constructor).
  struct Options {
    /// Columns of `x`; >= 1.
    Index model_dim = 0;
    /// Number of experts `E`; >= 1, a multiple of `num_groups`.
    Index num_experts = 0;
    /// Experts per token, `1 <= k <= groups_kept * E / num_groups`.
    Index k = 1;
    /// Softmax or sigmoid scores (`scoring_func`).
    ExpertScoring scoring = ExpertScoring::kSoftmax;
    /// Groups of consecutive experts (`n_group`), >= 1, dividing `num_experts`.
    Index num_groups = 1;
    /// Groups kept per token (`topk_group`), in `[1, num_groups]`.
    Index groups_kept = 1;
    /// How a group is ranked (`topk_method`); `kTopTwoSum` needs groups of >= 2 experts unless
    /// `num_groups == 1` (one group: nothing is ranked).
    GroupScore group_score = GroupScore::kMax;
    /// Divide the selected scores by their sum (`norm_topk_prob`).
    bool renormalize = false;
    /// `routed_scaling_factor`, > 0 and finite in `S` (a double past `S`'s range, or one that
    /// rounds to 0 in `S`, is rejected).
    double scaling_factor = 1.0;
    /// When the factor applies (V3's rule by default).
    WeightScaling scaling = WeightScaling::kAfterNormalization;
    /// Seed of the router initialisation.
    std::uint64_t init_seed = 0;
  };

  /// DeepSeek-V2 (`group_limited_greedy`): softmax scores, groups ranked by their best score,
  /// weights renormalised when `renormalize` and `k > 1`, else scaled.
  static Options deepseek_v2_options(Index model_dim, Index num_experts, Index k, Index num_groups,
                                     Index groups_kept, bool renormalize, double scaling_factor) {
    return {.model_dim = model_dim,
            .num_experts = num_experts,
            .k = k,
            .scoring = ExpertScoring::kSoftmax,
            .num_groups = num_groups,
            .groups_kept = groups_kept,
            .group_score = GroupScore::kMax,
            .renormalize = renormalize,
            .scaling_factor = scaling_factor,
            .scaling = WeightScaling::kInsteadOfNormalization};
  }
  /// DeepSeek-V3 (`noaux_tc`): sigmoid scores, groups ranked by their top-2 sum, weights
  /// renormalised, then scaled (set the bias with `set_score_bias`).
  static Options deepseek_v3_options(Index model_dim, Index num_experts, Index k, Index num_groups,
                                     Index groups_kept, double scaling_factor) {
    return {.model_dim = model_dim,
            .num_experts = num_experts,
            .k = k,
            .scoring = ExpertScoring::kSigmoid,
            .num_groups = num_groups,
            .groups_kept = groups_kept,
            .group_score = GroupScore::kTopTwoSum,
            .renormalize = true,
            .scaling_factor = scaling_factor,
            .scaling = WeightScaling::kAfterNormalization};
  }
  /// Softmax top-k over all experts (Mixtral, Qwen-MoE, OLMoE), renormalised or not.
  static Options softmax_top_k_options(Index model_dim, Index num_experts, Index k,
                                       bool renormalize) {
    return {.model_dim = model_dim, .num_experts = num_experts, .k = k, .renormalize = renormalize};
  }

  /// Validates `options` (throws `Error`) and initialises `W_r` normal with standard deviation
  /// `1 / sqrt(model_dim)` from `init_seed`; the score bias starts at 0.
  explicit GroupedTopKGate(const Options& options)
      : SoftmaxGateBase<S>(SoftmaxRouter<S>(kOp, validated(options).model_dim,
                                            options.num_experts, options.init_seed)),
        options_(options),
        bias_(RowMatrix<S>::Zero(1, options_.num_experts)) {}

  const Options& options() const { return options_; }
  /// Experts per group.
  Index group_size() const { return options_.num_experts / options_.num_groups; }

  /// The selection-only score bias `b` `(1, num_experts)` (DeepSeek-V3's
  /// `e_score_correction_bias`), read-only.
  Eigen::Map<const RowMatrix<S>> score_bias() const {
    return Eigen::Map<const RowMatrix<S>>(bias_.data(), 1, bias_.cols());
  }
  /// Sets the score bias from `num_experts` values. Throws `moet::Error` (nothing changed) for
  /// another count or a NaN/Inf.
  void set_score_bias(std::span<const S> bias) {
    detail::require(static_cast<Index>(bias.size()) == options_.num_experts, kOp,
                    "set_score_bias: the bias needs num_experts = ", options_.num_experts,
                    " values, got ", bias.size());
    for (std::size_t e = 0; e < bias.size(); ++e) {
      detail::require(std::isfinite(bias[e]), kOp, "set_score_bias: the bias must be finite, got ",
                      bias[e], " for expert ", e);
    }
    std::copy(bias.begin(), bias.end(), bias_.data());
  }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out`. Throws `Error` when `x` has
  /// the wrong width or a NaN/Inf, or when a router logit is not finite.
  ///
  /// `ctx.overrides.k` (when set) routes this call as a gate built with that `k` would
  /// (validated alike); other override fields are errors. Pass the same `ctx` to `backward`.
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    detail::check_gate_input(kOp, x, options_.model_dim);
    const Index k = call_k(ctx);
    const Index num_tokens = x.rows();
    const Index num_experts = options_.num_experts;
    const Index num_groups = options_.num_groups;
    // Scratch, sized before the parallel regions: per token the selection scores and the group
    // scores (num_experts + num_groups values), the expert order and the group order.
    const Index width = num_experts + num_groups;
    S* choice = out.scratch_values.data(num_tokens * width);
    std::int32_t* order = out.scratch_ids.data(num_tokens * width);
    scores(x, out);
    if (num_tokens == 0) return;
    const auto probs = out.probs_mut();  // s (num_tokens, num_experts)
    const auto counts = out.counts();
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        select(probs.data() + t * num_experts, choice + t * width, order + t * width, k);
        counts[static_cast<std::size_t>(t)] = k;
      }
    });
    out.commit_counts();
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        const S* s = probs.data() + t * num_experts;
        const std::int32_t* row_order = order + t * width;
        const auto experts = out.experts(t);
        const auto weights = out.weights(t);
        S sum = S(0);
        for (Index j = 0; j < k; ++j) {
          const auto slot = static_cast<std::size_t>(j);
          experts[slot] = row_order[j];
          weights[slot] = s[row_order[j]];
          sum += weights[slot];
        }
        const S denominator = sum + kNormEpsilon;
        for (auto& w : weights) {
          if (normalizes(k)) w /= denominator;
          w *= scale(k);
        }
      }
    });
  }

  /// Backward of `route(x, ctx, routing)` (see the class notes for the gradient treatment):
  /// `x` and `ctx` are those of the `route` call, `d_weights` holds dL/dw per assignment
  /// (routing order), `loss_grad` the optional dL/ds (`d_probs`, on `Routing::probs()`), dL/dz
  /// (`d_logits`) and dL/dw (`d_weights`). Accumulates into the gradient of `W_r` and adds
  /// dL/dx into `dx` `(num_tokens, model_dim)`. The same bits for any thread count. Throws
  /// `Error` naming `GroupedTopKGate::backward` on any size mismatch or a plan that is not from
  /// this gate and this `x`.
  void backward(const ConstRows<S>& x, const RouteContext& ctx, const Routing<S>& routing,
                std::span<const S> d_weights, const LossGrad& loss_grad, Rows<S> dx) {
    const Index k = call_k(ctx);
    this->router_.check_backward(x, routing, d_weights, loss_grad, dx);
    this->router_.allocate_grad();  // even for an empty batch
    const Index num_tokens = x.rows();
    const Index num_experts = options_.num_experts;
    if (num_tokens == 0) return;
    auto dz = dz_.matrix(num_tokens, num_experts);  // dL/dz (num_tokens, num_experts)
    const auto probs = routing.probs();             // s (num_tokens, num_experts)
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        S* g = dz.data() + t * num_experts;  // dL/ds first, then dL/dz in place
        const S* s = probs.data() + t * num_experts;
        std::fill(g, g + num_experts, S(0));
        weights_backward_row(routing, t, s, d_weights, k, g);
        if (!loss_grad.d_weights.empty()) {
          weights_backward_row(routing, t, s, loss_grad.d_weights, k, g);
        }
        if (!loss_grad.d_probs.empty()) {
          const S* dp = loss_grad.d_probs.data() + t * num_experts;
          for (Index e = 0; e < num_experts; ++e) g[e] += dp[e];
        }
        scores_backward_row(s, g);
        if (!loss_grad.d_logits.empty()) {
          const S* dl = loss_grad.d_logits.data() + t * num_experts;
          for (Index e = 0; e < num_experts; ++e) g[e] += dl[e];
        }
      }
    });
    this->router_.backward_logits(x, dz, dx);
  }

 private:
  static constexpr const char* kOp = "GroupedTopKGate";
  /// DeepSeek's `topk_weight.sum() + 1e-20` denominator.
  static constexpr S kNormEpsilon = static_cast<S>(1e-20);

  /// The `k` of this call: `ctx.overrides.k` when set (checked as the constructor checks `k`).
  Index call_k(const RouteContext& ctx) const {
    const auto apply = [](Options& o, const RoutingOverrides& v) { o.k = v.k != 0 ? v.k : o.k; };
    return detail::call_options(kOp, ctx.overrides, {.k = true}, options_, apply, validated).k;
  }

  bool normalizes(Index k) const {
    return options_.renormalize &&
           (options_.scaling == WeightScaling::kAfterNormalization || k > 1);
  }
  S scale(Index k) const {
    const bool scales = options_.scaling == WeightScaling::kAfterNormalization || !normalizes(k);
    return scales ? static_cast<S>(options_.scaling_factor) : S(1);
  }

  // Resets `out` and writes the scores s (softmax or sigmoid of x W_r) into out.probs_mut().
  void scores(const ConstRows<S>& x, Routing<S>& out) const {
    const Index num_tokens = x.rows();
    const Index num_experts = options_.num_experts;
    out.reset(num_tokens, num_experts);
    out.probs_are_distribution = options_.scoring == ExpertScoring::kSoftmax;
    auto probs = out.probs_mut();  // (num_tokens, num_experts), logits first
    if (num_tokens == 0) return;
    this->router_.logits(input_checked, x, probs);
    std::atomic<bool> bad{false};
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        S* row = probs.data() + t * num_experts;
        bool ok = true;
        for (Index e = 0; e < num_experts; ++e) ok = ok && std::isfinite(row[e]);
        if (!ok) {
          bad.store(true, std::memory_order_relaxed);
          continue;
        }
        if (options_.scoring == ExpertScoring::kSoftmax) {
          detail::softmax_row(row, num_experts);
        } else {
          for (Index e = 0; e < num_experts; ++e) row[e] = detail::sigmoid(row[e]);
        }
      }
    });
    if (bad.load()) {
      for (Index t = 0; t < num_tokens; ++t) {
        detail::require(probs.row(t).allFinite(), kOp,
                        "router logits must be finite, got NaN or Inf for token ", t,
                        " (x too large, or non-finite router weights)");
      }
    }
  }

  // One token's selection: `choice` (num_experts + num_groups) receives c = s + b (masked
  // experts -inf) and the group scores, `order` (num_experts + num_groups) the top-k experts
  // first, then the group order.
  void select(const S* s, S* choice, std::int32_t* order, Index k) const {
    const Index num_experts = options_.num_experts;
    const Index num_groups = options_.num_groups;
    const Index size = group_size();
    for (Index e = 0; e < num_experts; ++e) choice[e] = s[e] + bias_(0, e);
    if (options_.groups_kept < num_groups) {
      S* group = choice + num_experts;
      std::int32_t* group_order = order + num_experts;
      for (Index g = 0; g < num_groups; ++g) group[g] = group_score(choice + g * size, size);
      detail::top_k_descending(static_cast<const S*>(group), num_groups, options_.groups_kept,
                               group_order);
      // The groups past the kept ones are removed: their experts cannot be selected.
      for (Index j = options_.groups_kept; j < num_groups; ++j) {
        S* members = choice + group_order[j] * size;
        std::fill(members, members + size, -std::numeric_limits<S>::infinity());
      }
    }
    detail::top_k_descending(static_cast<const S*>(choice), num_experts, k, order);
  }

  S group_score(const S* c, Index size) const {
    if (options_.group_score == GroupScore::kMax) return *std::max_element(c, c + size);
    S best = -std::numeric_limits<S>::infinity();
    S second = -std::numeric_limits<S>::infinity();
    for (Index i = 0; i < size; ++i) {
      if (c[i] > best) {
        second = best;
        best = c[i];
      } else if (c[i] > second) {
        second = c[i];
      }
    }
    return best + second;
  }

  // Adds dL/ds of token t's combine weights into g (num_experts), from dw (one per assignment).
  void weights_backward_row(const Routing<S>& routing, Index t, const S* s,
                            std::span<const S> dw_all, Index k, S* g) const {
    const auto experts = routing.experts(t);
    if (experts.empty()) return;
    const auto a0 = static_cast<std::size_t>(routing.offsets()[static_cast<std::size_t>(t)]);
    const auto dw = dw_all.subspan(a0, experts.size());
    const S a = scale(k);
    if (!normalizes(k)) {
      for (std::size_t j = 0; j < experts.size(); ++j) g[experts[j]] += a * dw[j];
      return;
    }
    S denominator = S(0);
    for (const std::int32_t e : experts) denominator += s[e];
    denominator += kNormEpsilon;
    S dot = S(0);  // sum_j dw_j s_j / D
    for (std::size_t j = 0; j < experts.size(); ++j) dot += dw[j] * s[experts[j]];
    dot /= denominator;
    for (std::size_t j = 0; j < experts.size(); ++j) {
      g[experts[j]] += a / denominator * (dw[j] - dot);
    }
  }

  // Turns dL/ds (g, in place) into dL/dz through the score function.
  void scores_backward_row(const S* s, S* g) const {
    const Index n = options_.num_experts;
    if (options_.scoring == ExpertScoring::kSoftmax) {
      S dot = S(0);
      for (Index e = 0; e < n; ++e) dot += s[e] * g[e];
      for (Index e = 0; e < n; ++e) g[e] = s[e] * (g[e] - dot);
    } else {
      for (Index e = 0; e < n; ++e) g[e] *= s[e] * (S(1) - s[e]);
    }
  }

  static Options validated(const Options& o) {
    detail::check_router_shape(kOp, o.model_dim, o.num_experts);
    detail::require(o.num_groups >= 1 && o.num_experts % o.num_groups == 0, kOp,
                    "num_groups must be >= 1 and divide num_experts = ", o.num_experts, ", got ",
                    o.num_groups);
    detail::require(o.groups_kept >= 1 && o.groups_kept <= o.num_groups, kOp,
                    "groups_kept must be in [1, num_groups = ", o.num_groups, "], got ",
                    o.groups_kept);
    const Index size = o.num_experts / o.num_groups;
    detail::require(o.k >= 1 && o.k <= o.groups_kept * size, kOp,
                    "k must be in [1, groups_kept * group size = ", o.groups_kept, " * ", size,
                    " = ", o.groups_kept * size, "], got ", o.k);
    detail::require(o.group_score != GroupScore::kTopTwoSum || o.num_groups == 1 || size >= 2, kOp,
                    "group_score kTopTwoSum needs groups of at least 2 experts, got ", size,
                    " (num_experts ", o.num_experts, ", num_groups ", o.num_groups, ")");
    detail::require(std::isfinite(o.scaling_factor) && o.scaling_factor > 0.0 &&
                        std::isfinite(static_cast<S>(o.scaling_factor)) &&
                        static_cast<S>(o.scaling_factor) > S(0),
                    kOp, "scaling_factor must be > 0 and finite in the gate's scalar type, got ",
                    o.scaling_factor);
    return o;
  }

  Options options_;
  RowMatrix<S> bias_;        // (1, num_experts)
  detail::Buffer<S> dz_;     // backward scratch: dL/dz (num_tokens, num_experts), grow-only
};

}  // namespace moet
