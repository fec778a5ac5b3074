#pragma once
/// \file gates/top_k.hpp
/// `TopKGate`: softmax top-k routing (Switch, GShard, Mixtral, noisy top-k) with optional
/// DeepSpeed-style expert capacity.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "moet/context.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/rng.hpp"
#include "moet/detail/select.hpp"
#include "moet/detail/softmax_router.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

namespace detail {

/// Numerically stable `log(1 + exp(v))`.
template <class S>
S softplus(S v) {
  return std::max(v, S(0)) + std::log1p(std::exp(-std::abs(v)));
}

/// DeepSpeed's expert capacity `max(ceil(T / E * capacity_factor * k), min_capacity)`, with the
/// product evaluated in fp32 as DeepSpeed does (`T / E` is a Python float rounded to fp32 when
/// it meets the fp32 tensor `capacity_factor * k`).
inline Index expert_capacity(Index num_tokens, Index num_experts, double capacity_factor,
                             Index k, Index min_capacity) {
  const auto ratio =
      static_cast<float>(static_cast<double>(num_tokens) / static_cast<double>(num_experts));
  const auto factor = static_cast<float>(capacity_factor * static_cast<double>(k));
  const float capacity = std::ceil(ratio * factor);
  // Beyond 2^62 a capacity never binds (an expert gets each token at most once); clamping there
  // keeps a huge capacity_factor (whose fp32 product may be +Inf) from overflowing the conversion.
  constexpr float kMaxCapacity = 0x1p62f;
  const Index bounded =
      capacity < kMaxCapacity ? static_cast<Index>(capacity) : static_cast<Index>(kMaxCapacity);
  return std::max(bounded, min_capacity);
}

}  // namespace detail

/// Softmax top-k gating: `P = softmax(x W_r)` per token, then the `k` most probable experts.
///
/// - `renormalize = false` (Switch Transformer, Fedus et al. 2021; DeepSpeed top-1): the
///   weight of a selected expert is `P_e`.
/// - `renormalize = true` (GShard, Lepikhin et al. 2020; DeepSpeed top-2; Mixtral): the weight
///   is `P_e / sum of P over the selected experts`, identical to a softmax over the selected
///   logits.
/// - `noisy = true` (noisy top-k, Shazeer et al. 2017): in training only, the scores are
///   `H = z + eps * softplus(x W_noise)` with `z = x W_r` and `eps ~ N(0, 1)` drawn from the key
///   `(ctx.seed, ctx.step, token, expert)`, so the draw is reproducible and thread-count
///   independent. The experts are the top-k of `H` (slot order: descending `H`), and the weights
///   are computed from `softmax(H)` exactly as they are from `P` without noise: with
///   `renormalize = true` this is Shazeer's `G = softmax(KeepTopK(H, k))`; with
///   `renormalize = false` it is `softmax(H)_e` (the Switch convention on the noisy logits).
///   `Routing::probs()` always holds the clean `P`. In inference (`ctx.training == false`)
///   there is no noise and the plan equals the plain gate's. `W_noise` `(model_dim,
///   num_experts)` starts at zero, as in Shazeer et al., so the initial noise scale is
///   `softplus(0) = ln 2`; it is empty when `noisy` is off. No 0.01 is added to the softplus
///   (tensor2tensor does).
/// - `capacity_factor > 0` (DeepSpeed, Lepikhin et al.): each expert takes at most
///   `C = max(ceil(T / E * capacity_factor * k), min_capacity)` assignments, `C` evaluated in
///   fp32 as in DeepSpeed. Priority is slot-major: every token's first choice is placed before
///   any second choice, and within a slot earlier tokens win (DeepSpeed top-2; DeepSpeed top-1's
///   random token selection is not reproduced). Dropped assignments leave the plan and are
///   counted in `Routing::dropped`; a token whose choices are all dropped gets `k = 0` (its MoE
///   output is 0). With `renormalize = true` the survivors are renormalised among themselves
///   (DeepSpeed top-2: if the second choice is dropped, the first gets weight 1); without it
///   they keep `P_e`. `capacity_factor = 0` (the default) is dropless.
///
/// Ties go to the lower expert id, and slots are ordered by descending score. Renormalisation
/// divides by the exact sum; a sum of exactly 0 (possible only after a capacity drop left an
/// underflowed probability) gives weight 0 (DeepSpeed divides by `max(sum, fp32 eps)` instead).
/// Note that DeepSpeed's top-2 samples its second expert with Gumbel noise; this gate takes the
/// deterministic second-best, as GShard's formula and Mixtral do.
///
/// \tparam S scalar of the router, the probabilities and the combine weights (routing runs in
///   fp32 for a float model, as DeepSpeed does).
///
/// ```cpp
/// moet::TopKGate<float> gate(moet::TopKGate<float>::mixtral_options(512, 8));
/// gate.route(x, {}, plan);
/// ```
template <class S>
class TopKGate {
 public:
  using Scalar = S;

  /// Construction options (validated by the constructor).
  struct Options {
    /// Columns of `x`; >= 1.
    Index model_dim = 0;
    /// Number of experts `E`; >= 1.
    Index num_experts = 0;
    /// Experts per token, `1 <= k <= num_experts` (a larger `k` is an error, not clamped).
    Index k = 1;
    /// Divide the selected probabilities by their sum (GShard, Mixtral) instead of using the
    /// raw `P_e` (Switch).
    bool renormalize = false;
    /// Shazeer et al.'s noisy top-k in training (adds the `W_noise` matrix).
    bool noisy = false;
    /// Capacity factor; 0 = dropless (the default), else finite and > 0.
    double capacity_factor = 0.0;
    /// Lower bound of the capacity, >= 0 (DeepSpeed `MoE`'s default is 4).
    Index min_capacity = 4;
    /// Seed of the router initialisation.
    std::uint64_t init_seed = 0;
  };

  /// Switch Transformer: top-1, weight `P_e`.
  static Options switch_options(Index model_dim, Index num_experts) {
    return {.model_dim = model_dim, .num_experts = num_experts, .k = 1, .renormalize = false};
  }
  /// GShard top-2: the two best experts, weights renormalised (set `capacity_factor` for
  /// GShard's capacity; the preset is dropless).
  static Options gshard_options(Index model_dim, Index num_experts) {
    return {.model_dim = model_dim, .num_experts = num_experts, .k = 2, .renormalize = true};
  }
  /// Mixtral: top-2, weights renormalised, dropless.
  static Options mixtral_options(Index model_dim, Index num_experts) {
    return gshard_options(model_dim, num_experts);
  }
  /// Shazeer et al. 2017: noisy top-k in training, `G = softmax(KeepTopK(H, k))`.
  static Options noisy_top_k_options(Index model_dim, Index num_experts, Index k) {
    return {.model_dim = model_dim,
            .num_experts = num_experts,
            .k = k,
            .renormalize = true,
            .noisy = true};
  }

  /// Validates `options` (throws `Error`) and initialises the router: `W_r` normal with
  /// standard deviation `1 / sqrt(model_dim)` from `init_seed`, `W_noise` zero.
  explicit TopKGate(const Options& options)
      : options_(validated(options)),
        router_(options_.model_dim, options_.num_experts, options_.init_seed) {
    if (options_.noisy) noise_weights_.setZero(options_.model_dim, options_.num_experts);
  }

  Index num_experts() const { return options_.num_experts; }
  Index model_dim() const { return options_.model_dim; }
  const Options& options() const { return options_; }
  /// Router weights `W_r` `(model_dim, num_experts)`.
  const RowMatrix<S>& router() const { return router_.weights(); }
  RowMatrix<S>& router() { return router_.weights(); }
  /// Noise weights `W_noise` `(model_dim, num_experts)`; `(0, 0)` unless `noisy`.
  const RowMatrix<S>& noise_router() const { return noise_weights_; }
  RowMatrix<S>& noise_router() { return noise_weights_; }

  /// The expert capacity for a batch of `num_tokens` tokens; `num_tokens` (no limit: an expert
  /// gets each token at most once) when dropless.
  Index capacity(Index num_tokens) const {
    if (options_.capacity_factor == 0.0) return num_tokens;
    return detail::expert_capacity(num_tokens, options_.num_experts, options_.capacity_factor,
                                   options_.k, options_.min_capacity);
  }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out`. Throws `Error` when `x` has
  /// the wrong width or a NaN/Inf, or when a router logit is not finite.
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    detail::check_gate_input(kOp, x, options_.model_dim);
    const Index num_tokens = x.rows();
    const Index num_experts = options_.num_experts;
    const Index k = options_.k;
    const bool noisy = options_.noisy && ctx.training;
    // Scratch, sized before any parallel region: per-token sort order (num_tokens, num_experts)
    // plus num_experts load counters; noisy scores softmax(H) (num_tokens, num_experts).
    std::int32_t* order = out.scratch_ids.data(num_tokens * num_experts + num_experts);
    S* noisy_scores = noisy ? out.scratch_values.data(num_tokens * num_experts) : nullptr;
    if (noisy && num_tokens > 0) {
      Eigen::Map<RowMatrix<S>> noise_logits(noisy_scores, num_tokens, num_experts);
      detail::router_product(x, noise_weights_, noise_logits);
    }

    // H = z + eps * softplus(x W_noise), written over the noise logits before z is softmaxed.
    const auto add_noise = [&](Index t, const S* logits) {
      if (!noisy) return true;
      S* h = noisy_scores + t * num_experts;
      bool ok = true;
      for (Index e = 0; e < num_experts; ++e) {
        const auto eps = static_cast<S>(detail::normal(detail::hash_key(
            ctx.seed, ctx.step, static_cast<std::uint64_t>(t), static_cast<std::uint64_t>(e))));
        h[e] = logits[e] + eps * detail::softplus(h[e]);
        ok = ok && std::isfinite(h[e]);
      }
      return ok;
    };
    const auto probs = router_.probabilities(kOp, x, out, add_noise);  // (num_tokens, E)
    if (num_tokens == 0) return;

    // Pass 1: each token's top-k (slot order) into the first k entries of its order row.
    const auto counts = out.counts();
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        std::int32_t* row_order = order + t * num_experts;
        if (noisy) {
          S* h = noisy_scores + t * num_experts;
          detail::top_k_descending(static_cast<const S*>(h), num_experts, k, row_order);
          detail::softmax_row(h, num_experts);  // softmax(H): the weights' source
        } else {
          detail::top_k_descending(probs.data() + t * num_experts, num_experts, k, row_order);
        }
        counts[static_cast<std::size_t>(t)] = k;
      }
    });

    // Capacity: slot-major priority, serial by construction (earlier tokens win).
    const Index cap = capacity(num_tokens);
    if (options_.capacity_factor > 0.0 && cap < num_tokens) {
      std::int32_t* load = order + num_tokens * num_experts;  // (num_experts)
      std::fill(load, load + num_experts, 0);
      Index dropped = 0;
      for (Index j = 0; j < k; ++j) {
        for (Index t = 0; t < num_tokens; ++t) {
          std::int32_t& e = order[t * num_experts + j];
          if (load[e] < cap) {
            ++load[e];
          } else {
            e = -1;  // dropped
            --counts[static_cast<std::size_t>(t)];
            ++dropped;
          }
        }
      }
      out.dropped = dropped;
    }
    out.commit_counts();

    // Pass 2: fill the plan with the surviving choices in slot order.
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        const std::int32_t* row_order = order + t * num_experts;
        const S* source = noisy ? noisy_scores + t * num_experts : probs.data() + t * num_experts;
        const auto experts = out.experts(t);
        const auto weights = out.weights(t);
        S sum = S(0);
        std::size_t a = 0;
        for (Index j = 0; j < k; ++j) {
          const std::int32_t e = row_order[j];
          if (e < 0) continue;
          experts[a] = e;
          weights[a] = source[e];
          sum += source[e];
          ++a;
        }
        if (options_.renormalize) {
          for (auto& w : weights) w = sum > S(0) ? w / sum : S(0);
        }
      }
    });
  }

 private:
  static constexpr const char* kOp = "TopKGate";

  static Options validated(const Options& o) {
    detail::require(o.model_dim >= 1, kOp, "model_dim must be >= 1, got ", o.model_dim);
    detail::require(o.num_experts >= 1, kOp, "num_experts must be >= 1, got ", o.num_experts);
    detail::require(o.num_experts <= std::numeric_limits<std::int32_t>::max(), kOp,
                    "num_experts must fit in int32, got ", o.num_experts);
    detail::require(o.k >= 1 && o.k <= o.num_experts, kOp, "k must be in [1, num_experts = ",
                    o.num_experts, "], got ", o.k);
    detail::require(std::isfinite(o.capacity_factor) && o.capacity_factor >= 0.0, kOp,
                    "capacity_factor must be finite and >= 0 (0 = dropless), got ",
                    o.capacity_factor);
    detail::require(o.min_capacity >= 0, kOp, "min_capacity must be >= 0, got ",
                    o.min_capacity);
    return o;
  }

  Options options_;
  detail::SoftmaxRouter<S> router_;
  RowMatrix<S> noise_weights_;  // (model_dim, num_experts), or (0, 0) unless noisy
};

}  // namespace moet
