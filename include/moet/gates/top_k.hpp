#pragma once
/// \file gates/top_k.hpp
/// `TopKGate`: softmax top-k routing (Switch, GShard, Mixtral, noisy top-k) with optional
/// DeepSpeed-style expert capacity.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/rng.hpp"
#include "moet/detail/select.hpp"
#include "moet/detail/softmax_router.hpp"
#include "moet/errors.hpp"
#include "moet/gates/router.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

namespace detail {

/// DeepSpeed's expert capacity `max(ceil(T / E * capacity_factor * k), min_capacity)`, with the
/// product evaluated in fp32 as DeepSpeed does (`T / E` is a Python float rounded to fp32 when
/// it meets the fp32 tensor `capacity_factor * k`).
inline Index expert_capacity(Index num_tokens, Index num_experts, double capacity_factor, Index k,
                             Index min_capacity) {
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

/// Softmax top-k gating (docs/algorithms.md §3): `P = softmax(x W_r)` per token, then the `k` most
/// probable experts.
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
/// **Gradient** (`backward`, docs/algorithms.md §3.4). The selection (top-k, slot order, capacity
/// drops) is held fixed; only the weights of the plan's surviving assignments are
/// differentiated, from the scores they were computed from:
/// - without noise, `w = P_e` (`dL/dP_e += dL/dw`) or `w = P_e / sum_{survivors} P` (a softmax
///   over the survivors' logits: `dz_e += w_e (dw_e - sum_j w_j dw_j)` on the survivors), then
///   through `P = softmax(z)`, `z = x W_r`;
/// - noisy, in training: the weights come from `Q = softmax(H)`, `H = z + eps * softplus(n)`,
///   `n = x W_noise`, with `eps` recomputed from `(ctx.seed, ctx.step, token, expert)` exactly
///   as `route` drew it; `dL/dH` reaches `z` (identity) and `n` (`eps * sigmoid(n)`), so both
///   `W_r` and `W_noise` get gradients. `loss_grad.d_probs` is on the clean `P` (as
///   `Routing::probs()`), so it reaches `W_r` only;
/// - `loss_grad.d_logits` (router z-loss) is added to dL/dz as given.
/// Dropped assignments get no gradient (they are not in the plan). `visit_parameters` visits
/// `router.weight` and, when `noisy`, `router.noise_weight`.
///
/// \tparam S scalar of the router, the probabilities and the combine weights (routing runs in
///   fp32 for a float model, as DeepSpeed does).
///
/// ```cpp
/// moet::TopKGate<float> gate(moet::TopKGate<float>::mixtral_options(512, 8));
/// gate.route(x, {}, plan);
/// ```
template <class S>
class TopKGate : public SoftmaxGateBase<S> {
 public:
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
      : SoftmaxGateBase<S>(
            SoftmaxRouter<S>(kOp, options.model_dim, options.num_experts, options.init_seed)),
        options_(validated(options)) {
    if (options_.noisy) noise_.set_zero(options_.model_dim, options_.num_experts);
  }

  const Options& options() const { return options_; }
  /// Noise weights `W_noise` `(model_dim, num_experts)`; `(0, 0)` unless `noisy`.
  Eigen::Map<const RowMatrix<S>> noise_router() const { return noise_.view(); }

  /// Replaces `W_noise` like `set_router`. Throws `moet::Error` unless the gate is `noisy`.
  void set_noise_router(const ConstRows<S>& w, WeightLayout layout) {
    detail::require(options_.noisy, kOp, "set_noise_router needs a noisy gate (noisy = true)");
    noise_.set(kOp, "set_noise_router", "noise router", w, layout, options_.model_dim,
               options_.num_experts);
  }

  /// Gradient of `W_noise` `(model_dim, num_experts)`; `(0, 0)` unless `noisy` and used.
  const RowMatrix<S>& noise_router_grad() const { return noise_.grad(); }

  /// Writes the noise logits `n = x W_noise` and the draws `eps` (each `(num_tokens,
  /// num_experts)`) that `route(x, ctx, ...)` uses in training, so that
  /// `H = z + eps * softplus(n)` (the inputs of `noisy_load_loss`). Throws `Error` unless the
  /// gate is `noisy`, or on a bad `x` or output shape.
  void noise_logits(const ConstRows<S>& x, const RouteContext& ctx, Rows<S> n, Rows<S> eps) const {
    detail::require(options_.noisy, kOp, "noise_logits needs a noisy gate");
    detail::check_gate_input(kOp, x, options_.model_dim);
    detail::require(n.rows() == x.rows() && n.cols() == options_.num_experts &&
                        eps.rows() == x.rows() && eps.cols() == options_.num_experts,
                    kOp, "n and eps must be (", x.rows(), ", ", options_.num_experts, "), got (",
                    n.rows(), ", ", n.cols(), ") and (", eps.rows(), ", ", eps.cols(), ")");
    noise_.forward(x, n);
    for (Index t = 0; t < x.rows(); ++t) {
      for (Index e = 0; e < options_.num_experts; ++e) eps(t, e) = noise_eps(ctx, t, e);
    }
  }

  /// Backward of `n = x W_noise` for a loss on the noise logits (`noisy_load_loss`):
  /// accumulates `dW_noise += x^T d_noise_logits` and adds `dx += d_noise_logits W_noise^T`.
  /// Shapes: `x` `(num_tokens, model_dim)`, `d_noise_logits` `(num_tokens, num_experts)`, `dx`
  /// like `x`. Throws `Error` naming `TopKGate::backward_noise_logits` unless the gate is
  /// `noisy` and the shapes match.
  void backward_noise_logits(const ConstRows<S>& x, const ConstRows<S>& d_noise_logits,
                             Rows<S> dx) {
    constexpr const char* op = "TopKGate::backward_noise_logits";
    detail::require(options_.noisy, op, "needs a noisy gate");
    detail::check_gate_input(op, x, options_.model_dim);
    detail::require(
        d_noise_logits.rows() == x.rows() && d_noise_logits.cols() == options_.num_experts, op,
        "d_noise_logits must be (", x.rows(), ", ", options_.num_experts, "), got (",
        d_noise_logits.rows(), ", ", d_noise_logits.cols(), ")");
    detail::require(dx.rows() == x.rows() && dx.cols() == options_.model_dim, op, "dx must be (",
                    x.rows(), ", ", options_.model_dim, ") like x, got (", dx.rows(), ", ",
                    dx.cols(), ")");
    noise_.backward(x, d_noise_logits, dx);
  }

  /// Sets every gradient to zero (allocating them on first use).
  void zero_grad() {
    this->router_.zero_grad();
    if (options_.noisy) noise_.zero_grad();
  }

  /// Calls `f(name, value, grad)` for `router.weight` and, when `noisy`, `router.noise_weight`
  /// (each `(model_dim, num_experts)`), allocating the gradients on first use.
  template <class F>
  void visit_parameters(F&& f) {
    this->router_.visit_parameters(f);
    if (options_.noisy) noise_.visit(std::string_view("router.noise_weight"), f);
  }

  /// Repacks `W_r` and `W_noise` after they were written through `visit_parameters`.
  void parameters_changed() {
    this->router_.parameters_changed();
    noise_.repack();
  }

  /// Backward of `route(x, ctx, routing)` (see the class notes for the gradient treatment):
  /// `x` and `ctx` are those of the `route` call, `d_weights` holds dL/dw per assignment
  /// (routing order, `routing.num_assignments()` values), `loss_grad` the optional auxiliary
  /// inputs (`SoftmaxLossGrad`: dL/dP, dL/dz, dL/dw of losses on the weights, and, for a noisy
  /// gate, dL/dn on the noise logits). Accumulates into the gradients of `W_r` (and
  /// `W_noise`) and adds dL/dx into `dx` `(num_tokens, model_dim)`. The same bits for any thread
  /// count. Throws `Error` naming `TopKGate::backward` on any size mismatch or a plan that is not
  /// from this gate and this `x`.
  void backward(const ConstRows<S>& x, const RouteContext& ctx, const Routing<S>& routing,
                std::span<const S> d_weights, const SoftmaxLossGrad<S>& loss_grad, Rows<S> dx) {
    SoftmaxRouter<S>& router = this->router_;
    router.check_backward(x, routing, d_weights, loss_grad, dx, options_.noisy);
    const bool noisy = options_.noisy && ctx.training;
    if (options_.noisy) noise_.grad();  // allocated even for an empty batch
    if (!noisy) {
      router.backward(input_checked, x, routing, d_weights, options_.renormalize, loss_grad, dx);
      if (!loss_grad.d_noise_logits.empty() && x.rows() > 0) {  // a loss on n without noise
        const Eigen::Map<const RowMatrix<S>> dn(loss_grad.d_noise_logits.data(), x.rows(),
                                                options_.num_experts);
        noise_.backward(x, dn, dx);
      }
      return;
    }
    router.allocate_grad();  // even for an empty batch
    const Index num_tokens = x.rows();
    const Index num_experts = options_.num_experts;
    if (num_tokens == 0) return;

    // dL/dz; z, then Q = softmax(H) over it; n, then dL/dn over it (each (num_tokens, E)).
    const Index size = num_tokens * num_experts;
    Eigen::Map<RowMatrix<S>> dz(dz_.data(size), num_tokens, num_experts);
    Eigen::Map<RowMatrix<S>> q(q_.data(size), num_tokens, num_experts);
    Eigen::Map<RowMatrix<S>> dn(dn_.data(size), num_tokens, num_experts);
    router.logits(input_checked, x, q);
    noise_.forward(x, dn);
    const auto probs = routing.probs();  // clean P (num_tokens, num_experts)
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        S* dz_row = dz.data() + t * num_experts;
        // H exactly as route computes it, then Q = softmax(H), in place of z.
        S* h = q.data() + t * num_experts;
        S* n = dn.data() + t * num_experts;
        for (Index e = 0; e < num_experts; ++e) {
          h[e] = h[e] + noise_eps(ctx, t, e) * detail::softplus(n[e]);
        }
        detail::softmax_row(h, num_experts);
        detail::plan_weights_backward_row(routing, t, static_cast<const S*>(h), num_experts,
                                          d_weights, loss_grad.d_weights, options_.renormalize,
                                          dz_row);
        // dL/dH (still alone in dz_row) reaches z as is and n as dL/dH * eps * sigmoid(n).
        const S* dn_loss = loss_grad.d_noise_logits.empty()
                               ? nullptr
                               : loss_grad.d_noise_logits.data() + t * num_experts;
        for (Index e = 0; e < num_experts; ++e) {
          n[e] = dz_row[e] * noise_eps(ctx, t, e) * detail::sigmoid(n[e]) +
                 (dn_loss != nullptr ? dn_loss[e] : S(0));
        }
        detail::score_losses_backward_row(loss_grad, t, probs.data() + t * num_experts, num_experts,
                                          dz_row);
      }
    });
    router.backward_logits(x, dz, dx);
    noise_.backward(x, dn, dx);
  }

  /// The expert capacity for a batch of `num_tokens` tokens; `num_tokens` (no limit: an expert
  /// gets each token at most once) when dropless.
  Index capacity(Index num_tokens) const { return capacity(num_tokens, options_.k); }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out`. Throws `Error` when `x` has
  /// the wrong width or a NaN/Inf, or when a router logit is not finite.
  ///
  /// `ctx.overrides.k` (when set) routes this call as a gate built with that `k` would
  /// (validated alike: in `[1, num_experts]`); other override fields are errors.
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    this->router_.check_input(x);
    const Index num_tokens = x.rows();
    const Index num_experts = options_.num_experts;
    const Index k = call_k(ctx);
    const bool noisy = options_.noisy && ctx.training;
    // Noisy scores H, then softmax(H) (num_tokens, num_experts), sized before the parallel
    // regions; H = z + eps * softplus(x W_noise) is written over the noise logits before z is
    // softmaxed.
    S* noisy_scores = noisy ? out.scratch_values.data(num_tokens * num_experts) : nullptr;
    if (noisy && num_tokens > 0) {
      Eigen::Map<RowMatrix<S>> noise_logits(noisy_scores, num_tokens, num_experts);
      noise_.forward(x, noise_logits);
    }
    const auto add_noise = [&](Index t, const S* logits) {
      if (!noisy) return true;
      S* h = noisy_scores + t * num_experts;
      bool ok = true;
      for (Index e = 0; e < num_experts; ++e) {
        h[e] = logits[e] + noise_eps(ctx, t, e) * detail::softplus(h[e]);
        ok = ok && std::isfinite(h[e]);
      }
      return ok;
    };
    auto probs = this->router_.probabilities(input_checked, x, out, add_noise);  // (T, E)
    if (num_tokens == 0) return;

    // Each token's top-k of P, or of H (then H becomes softmax(H), the weights' source), with
    // num_experts load counters after the rankings.
    RankedSelection<S> select(out, num_experts);
    Eigen::Map<RowMatrix<S>> h(noisy ? noisy_scores : probs.data(), num_tokens, num_experts);
    select.rank(h, k, [k](Index, std::span<const std::int32_t>) { return k; });
    if (noisy) {
      detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
        for (Index t = begin; t < end; ++t) detail::softmax_row(h.row(t).data(), num_experts);
      });
    }
    // Capacity: slot-major priority, serial by construction (earlier tokens win).
    const Index cap = capacity(num_tokens, k);
    if (options_.capacity_factor > 0.0 && cap < num_tokens) {
      std::int32_t* load = select.extra_ids();  // (num_experts)
      std::fill(load, load + num_experts, 0);
      const auto counts = select.counts();
      Index dropped = 0;
      for (Index j = 0; j < k; ++j) {
        for (Index t = 0; t < num_tokens; ++t) {
          std::int32_t& e = select.ranking(t)[static_cast<std::size_t>(j)];
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
    select.write(h, options_.renormalize);
  }

 private:
  static constexpr const char* kOp = "TopKGate";

  /// The noise draw of token `t`, expert `e` (shared by `route` and `backward`).
  static S noise_eps(const RouteContext& ctx, Index t, Index e) {
    return static_cast<S>(detail::normal(detail::hash_key(
        ctx.seed, ctx.step, static_cast<std::uint64_t>(t), static_cast<std::uint64_t>(e))));
  }

  Index capacity(Index num_tokens, Index k) const {
    if (options_.capacity_factor == 0.0) return num_tokens;
    return detail::expert_capacity(num_tokens, options_.num_experts, options_.capacity_factor, k,
                                   options_.min_capacity);
  }

  /// The `k` of this call: `ctx.overrides.k` when set (checked as the constructor checks `k`).
  Index call_k(const RouteContext& ctx) const {
    const auto apply = [](Options& o, const RoutingOverrides& v) { o.k = v.k != 0 ? v.k : o.k; };
    return detail::call_options(kOp, ctx.overrides, {.k = true}, options_, apply, validated).k;
  }

  static Options validated(const Options& o) {
    detail::require(o.k >= 1 && o.k <= o.num_experts, kOp,
                    "k must be in [1, num_experts = ", o.num_experts, "], got ", o.k);
    detail::require(std::isfinite(o.capacity_factor) && o.capacity_factor >= 0.0, kOp,
                    "capacity_factor must be finite and >= 0 (0 = dropless), got ",
                    o.capacity_factor);
    detail::require(o.min_capacity >= 0, kOp, "min_capacity must be >= 0, got ", o.min_capacity);
    return o;
  }

  Options options_;
  detail::RouterWeights<S> noise_;  // W_noise (model_dim, num_experts), or (0, 0) unless noisy
  // Noisy backward scratch (grow-only): dL/dz, noisy scores softmax(H), noise logits then
  // dL/dn.
  detail::Buffer<S> dz_;
  detail::Buffer<S> q_;
  detail::Buffer<S> dn_;
};

}  // namespace moet
