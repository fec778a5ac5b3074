#pragma once
/// \file gates/top_any.hpp
/// `TopAnyGate`: DynMoE's top-any gating (Guo et al., ICLR 2025, arXiv 2405.14297). Every token
/// picks every expert whose cosine score beats that expert's trainable threshold, so k varies
/// per token and may be 0. Scores: `CosineRouter` (gates/cosine_router.hpp); adaptive expert
/// count: `TopAnyAdaptive` (gates/top_any_adaptive.hpp). Specification: docs/algorithms.md §4.

#include <algorithm>
#include <cstdint>
#include <span>
#include <utility>

#include <Eigen/Core>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/errors.hpp"
#include "moet/gates/cosine_router.hpp"
#include "moet/gates/top_any_adaptive.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// Which DynMoE implementation `TopAnyGate` follows where the two public ones differ
/// (docs/algorithms.md §4.7): the eval fallback weight (§4.4), the combine-weight gradient
/// (§4.3) and the auxiliary loss set of `top_any_aux_loss` (§8.6).
enum class TopAnyVariant {
  /// The DeepSpeed-0.9.5 copy (recommended by the DynMoE README): a token that activates no
  /// expert in eval goes to its best expert with weight 1; the weight `a / k` is differentiated
  /// with `k` held constant; the auxiliary loss has all four terms.
  kDeepSpeed,
  /// The Tutel copy (`EMoE/tutel`, GLUE and vision experiments): the fallback weight is the raw
  /// sigmoid score `s[t, e]` of the chosen expert when no token of the batch activates two or
  /// more experts, and 1 otherwise; the weight `a / sum(a)` is differentiated through its
  /// denominator when some token of the batch activates two or more experts; the auxiliary
  /// loss is diversity + simplicity only.
  kTutel,
};

/// Loss-gradient input of `TopAnyGate::backward` besides the combine-weight gradient:
/// `d_gates` is empty or dL/da `(num_tokens, num_experts)` row-major for the 0/1 gate matrix `a`
/// of docs/algorithms.md §4.3 (`top_any_aux_loss`'s load balance and efficiency). Only activated,
/// non-fallback (token, expert) entries pass a gradient.
template <class S>
struct TopAnyLossGrad {
  std::span<const S> d_gates{};
};

/// DynMoE top-any gate (Guo et al., ICLR 2025, arXiv 2405.14297): forward, straight-through
/// backward and the adaptive expert count.
///
/// State (docs/algorithms.md §4.1): the `CosineRouter` (gate embeddings `W` `(model_dim,
/// num_experts)`, one column per expert slot, thresholds `theta` `(num_experts)`, initially 0,
/// the logit scale `tau`) and the 0/1 expert mask `m` `(num_experts)`, the first
/// `initial_experts` slots live (all when 0). DynMoE allocates its slots up front and switches
/// them on and off, so `num_experts()` is the slot count, like every gate's, and the expert bank
/// must hold that many experts; `num_active()` counts the live slots.
///
/// Forward (docs/algorithms.md §4.2, fallback §4.4), per token `t` and slot `e`:
/// ```
/// cos[t,e] = x_t . W_e / (max(||x_t||, 1e-12) * max(||W_e||, 1e-12))
/// s[t,e]   = sigmoid(tau * cos[t,e]) * m_e          (written to Routing::probs_mut())
/// fires    = m_e == 1 and s[t,e] > sigmoid(tau * theta_e)   (strict: equality does not fire)
/// ```
/// A token goes to every expert that fires, in ascending expert id (its slot order), each with
/// weight `1 / k_t`. A token that activates nothing is routed nowhere in training
/// (`ctx.training`; its MoE output is 0). In eval it goes to the active expert with the largest
/// `s[t,e]` (the lowest id among equal maxima) with weight 1 (`TopAnyVariant::kDeepSpeed`) or,
/// for `TopAnyVariant::kTutel`, weight `s[t,e]` when no token of the batch fires two or more
/// experts and 1 otherwise. The fallback looks at active slots only (the DeepSpeed code's argmax
/// runs over all slots, which differs only when an active score underflows to 0). With no
/// active slot at all, every token is routed nowhere, in eval too.
///
/// Training (docs/algorithms.md §4.3, §4.5-4.6): `backward` is the straight-through gradient,
/// to the parameters `visit_parameters` visits (`embeddings`, `thresholds`, and `log_temperature`
/// with `trainable_temperature`: Tutel's `gated_multi_gate_t`, which starts at `temperature =
/// 10`); the auxiliary losses live in train/top_any_losses.hpp; the adaptive process is
/// `on_training_forward`, `begin_recording` and `update_experts`. The mask is not a parameter.
///
/// \tparam S scalar type (float or double); routing runs in `S`.
///
/// ```cpp
/// // 16 slots (the expert bank's 16 experts), 8 live at the start as in DynMoE's examples.
/// moet::TopAnyGate<float> gate({.model_dim = 512, .num_experts = 16, .initial_experts = 8});
/// ```
template <class S>
class TopAnyGate {
 public:
  using Scalar = S;

  /// Construction options.
  struct Options {
    /// Width of a token, `d` (>= 1).
    Index model_dim = 0;
    /// Expert slots, `Emax` (>= 1; DynMoE's `max_expert_num`): the expert bank's size, as for
    /// every gate. The adaptive process switches slots on and off within it.
    Index num_experts = 0;
    /// Slots live at construction, the first ones: 0 (the default) = all `num_experts`, else
    /// in `[1, num_experts]` (DynMoE's `num_experts`; its examples start with half).
    Index initial_experts = 0;
    /// Which implementation's eval fallback weight to follow.
    TopAnyVariant variant = TopAnyVariant::kDeepSpeed;
    /// Logit scale `tau`, finite and > 0. 1 in DeepSpeed and Tutel `gated_multi_gate`; the
    /// initial value when `trainable_temperature`.
    S temperature = S(1);
    /// Train `tau` as Tutel `gated_multi_gate_t` does: the parameter is `log_t = log(tau)`,
    /// and `tau = exp(min(log_t, log 100))` (so no gradient reaches `log_t` above the clamp).
    bool trainable_temperature = false;
    /// Seed of the orthogonal gate embedding initialisation.
    std::uint64_t init_seed = 0;
    /// When the adaptive process runs: DeepSpeed's cycle (DynMoE's recommended copy; a layer's
    /// `forward_train` then auto-tunes the expert count with no extra calls), or `kManual`.
    TopAnySchedule schedule = TopAnySchedule::kDeepSpeedCycle;
    /// The cycle's period in training forwards (>= 1); 300 in DeepSpeed.
    std::int64_t schedule_period = 300;
  };

  /// Loss-gradient input of `backward` (the auxiliary losses' dL/da).
  using LossGrad = TopAnyLossGrad<S>;
  /// The router the gate scores with.
  using Router = CosineRouter<S>;

  /// The router's norm floor, token block and temperature clamp (see `CosineRouter`).
  static constexpr S kNormEps = Router::kNormEps;
  static constexpr Index kTokenBlock = Router::kTokenBlock;
  static constexpr S kLogMaxTemperature = Router::kLogMaxTemperature;

  /// Builds the gate and initialises its state (docs/algorithms.md §4.1). Throws `moet::Error`
  /// when `model_dim < 1`, `num_experts < 1`, `initial_experts` is outside `[0, num_experts]`,
  /// `temperature` is not finite and > 0, or `schedule_period < 1`.
  explicit TopAnyGate(const Options& options)
      : options_(checked(options)),
        router_({.model_dim = options.model_dim,
                 .num_experts = options.num_experts,
                 .temperature = options.temperature,
                 .trainable_temperature = options.trainable_temperature,
                 .init_seed = options.init_seed},
                kOp),
        adaptive_(options.num_experts, options.model_dim, options.schedule,
                  options.schedule_period) {
    if (options_.initial_experts == 0) options_.initial_experts = options_.num_experts;
    mask_ = Vector<S>::Zero(options_.num_experts);
    mask_.head(options_.initial_experts).setOnes();
  }

  /// Expert slots, `Emax` (the expert bank's size). See `num_active()`.
  Index num_experts() const { return options_.num_experts; }
  /// Slots currently active (ones in `expert_mask()`).
  Index num_active() const { return static_cast<Index>((mask_.array() != S(0)).count()); }
  /// Width of a token.
  Index model_dim() const { return options_.model_dim; }
  /// The options the gate was built with (`initial_experts` resolved; the temperature is the
  /// initial one, see `temperature()`).
  const Options& options() const { return options_; }
  /// The variant whose eval fallback weight the gate follows.
  TopAnyVariant variant() const { return options_.variant; }
  /// The cosine router: embeddings, thresholds, temperature and their gradients.
  const Router& cosine_router() const { return router_; }

  /// Gate embeddings `W` `(model_dim, num_experts)`, column `e` expert `e`'s: a read-only view
  /// (write with `set_gate_embeddings`; training updates them through `visit_parameters`).
  Eigen::Map<const RowMatrix<S>> gate_embeddings() const { return router_.embeddings(); }
  /// The same matrix as `gate_embeddings()`, under the name every gate's router weights have.
  Eigen::Map<const RowMatrix<S>> router() const { return router_.embeddings(); }
  /// Replaces `W` by `w`, `(model_dim, num_experts)` with `WeightLayout::kInOut` or
  /// `[num_experts, model_dim]` with `kOutIn` (PyTorch's rows); `moet::Error` (nothing
  /// changed) on another shape ("looks transposed" for the other layout's) or a NaN/Inf entry.
  void set_gate_embeddings(const ConstRows<S>& w, WeightLayout layout) {
    router_.set_embeddings("set_gate_embeddings", w, layout);
  }
  /// The same as `set_gate_embeddings`, under the name every gate's router setter has.
  void set_router(const ConstRows<S>& w, WeightLayout layout) {
    router_.set_embeddings("set_router", w, layout);
  }

  /// Thresholds `theta` `(num_experts)`: expert `e` fires iff `sigmoid(tau cos) >
  /// sigmoid(tau theta_e)`. A read-only view: write with `set_thresholds`.
  Eigen::Map<const Vector<S>> thresholds() const { return router_.thresholds(); }
  /// Replaces the thresholds; throws `moet::Error` unless `theta` has `num_experts` finite
  /// entries.
  void set_thresholds(const Eigen::Ref<const Vector<S>>& theta) { router_.set_thresholds(theta); }

  /// The expert mask `m` `(num_experts)`: 1 for an active slot, 0 for an inactive one.
  const Vector<S>& expert_mask() const { return mask_; }
  /// Replaces the expert mask; throws `moet::Error` unless it has `num_experts` entries, each
  /// 0 or 1. An all-zero mask is allowed (every token is then routed nowhere).
  void set_expert_mask(const Eigen::Ref<const Vector<S>>& mask) {
    detail::require(mask.size() == num_experts(), kOp, "expert mask must have ", num_experts(),
                    " entries, got ", mask.size());
    for (Index e = 0; e < mask.size(); ++e) {
      detail::require(mask[e] == S(0) || mask[e] == S(1), kOp,
                      "expert mask entries must be 0 or 1, got ", mask[e], " at slot ", e);
    }
    mask_ = mask;
  }
  /// Switches slot `e` on or off (DynMoE's add/remove); `moet::Error` unless in range.
  void set_expert_active(Index e, bool active) {
    detail::require(e >= 0 && e < num_experts(), kOp, "expert slot must be in [0, ", num_experts(),
                    "), got ", e);
    mask_[e] = active ? S(1) : S(0);
  }

  /// The logit scale `tau` in use (`exp(min(log_t, log 100))` with `trainable_temperature`).
  S temperature() const { return router_.temperature(); }
  /// Sets `tau` (and `log_t = log(tau)`); throws `moet::Error` unless finite and > 0.
  void set_temperature(S tau) { router_.set_temperature(tau); }
  /// The trainable parameter `log_t` (meaningful with `trainable_temperature`).
  S log_temperature() const { return router_.log_temperature(); }
  /// dL/dlog_t (0 unless `trainable_temperature`).
  S log_temperature_grad() const { return router_.log_temperature_grad(); }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out` (see the class comment).
  /// Fills `out.probs_mut()` with the masked sigmoid scores `s` `(num_tokens, num_experts)`
  /// (not a distribution) and sets `out.live_experts = num_active()`. Throws `moet::Error`
  /// when `x` has the wrong width or a non-finite entry, when training (`visit_parameters`)
  /// left a non-finite embedding, threshold or temperature, a score is not finite (an
  /// overflowing token norm) or `ctx.overrides` is set (no overrides); `out` is unspecified.
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    if (!ctx.overrides.empty()) detail::check_override_fields(kOp, ctx.overrides, {});
    router_.check_inputs(x);
    const Index emax = num_experts();
    const Index num_tokens = x.rows();
    const Index num_active_slots = num_active();
    out.reset(num_tokens, emax);
    out.probs_are_distribution = false;
    out.live_experts = num_active_slots;
    if (num_tokens == 0) return;

    // Scores s and, per slot, the floored embedding norms and the fire levels sigmoid(tau theta).
    auto slot = out.scratch_values.vector(2 * emax);
    const S* const threshold = slot.data() + emax;  // (num_experts)
    const S* const mask = mask_.data();
    const Index num_blocks = (num_tokens + kTokenBlock - 1) / kTokenBlock;
    std::int32_t* const block_info = out.scratch_ids.data(2 * num_blocks);
    auto scores = out.probs_mut();  // (num_tokens, num_experts)
    router_.score(x, mask, scores, slot.data(), block_info);

    // Pass 1: natural k per token, and per block the largest k.
    std::int32_t* const block_max_k = block_info + num_blocks;  // (num_blocks)
    const auto counts = out.counts();
    const bool fallback = !ctx.training && num_active_slots > 0;
    detail::parallel_blocks(num_tokens, kTokenBlock, [&](Index begin, Index end) {
      Index max_k = 0;
      for (Index t = begin; t < end; ++t) {
        const S* const s = &scores(t, 0);
        Index k = 0;
        for (Index e = 0; e < emax; ++e) {
          if (mask[e] != S(0) && s[e] > threshold[e]) ++k;
        }
        max_k = std::max(max_k, k);
        counts[static_cast<std::size_t>(t)] = (k == 0 && fallback) ? 1 : k;
      }
      block_max_k[begin / kTokenBlock] = static_cast<std::int32_t>(max_k);
    });
    Index batch_max_k = 0;
    for (Index b = 0; b < num_blocks; ++b)
      batch_max_k = std::max<Index>(batch_max_k, block_max_k[b]);
    out.commit_counts();

    // Pass 2: the experts that fire in ascending id with weight 1/k, or the eval fallback.
    const bool raw_fallback_weight = options_.variant == TopAnyVariant::kTutel && batch_max_k < 2;
    detail::parallel_blocks(num_tokens, kTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        const Index k = out.k(t);
        if (k == 0) continue;
        const auto experts = out.experts(t);
        const auto weights = out.weights(t);
        const S* const s = &scores(t, 0);
        const S weight = S(1) / static_cast<S>(k);
        std::size_t j = 0;
        for (Index e = 0; e < emax; ++e) {
          if (mask[e] != S(0) && s[e] > threshold[e]) {
            MOET_ASSERT(j < static_cast<std::size_t>(k), "pass 2 must find pass 1's experts");
            experts[j] = static_cast<std::int32_t>(e);
            weights[j] = weight;
            ++j;
          }
        }
        if (j > 0) continue;
        // Eval fallback: the first maximum of s over the active slots.
        Index best = -1;
        for (Index e = 0; e < emax; ++e) {
          if (mask[e] != S(0) && (best < 0 || s[e] > s[best])) best = e;
        }
        MOET_ASSERT(best >= 0 && k == 1, "a fallback token has one active expert");
        experts[0] = static_cast<std::int32_t>(best);
        weights[0] = raw_fallback_weight ? s[best] : S(1);
      }
    });
  }

  /// Straight-through backward (docs/algorithms.md §4.3). `x`, `ctx` and `routing` are those of
  /// the `route` call (the plan's `probs()` holds the scores `s` it used, so nothing else is
  /// cached); `d_weights` is dL/dw per assignment (routing order); `loss_grad.d_gates` is
  /// empty or dL/da `(num_tokens, num_experts)` row-major from the auxiliary losses.
  /// Accumulates into `gate_embeddings_grad()` and `thresholds_grad()` (and `log_temperature`'s
  /// with `trainable_temperature`) and adds dL/dx into `dx` `(num_tokens, model_dim)`.
  ///
  /// The surrogate, per token with activated set `S_t`, `k = |S_t|`: `a = r + stopgrad(sign(r)
  /// - r)` with `r = relu(s - sigmoid(tau theta_e))`; `w = a / k` with `k` constant
  /// (`kDeepSpeed`, and `kTutel` when no token of the batch has `k >= 2`) or `w = a / sum_j a`
  /// (`kTutel` otherwise); `dL/da = (weight part) + d_gates`, and `dL/dr = dL/da` on activated
  /// pairs only. So only activated pairs pass gradient to `W`, `theta` and `x`; tokens that
  /// activated nothing (training) and inactive slots get nothing. An eval fallback weight
  /// passes nothing for `kDeepSpeed` (1, a constant) and, for `kTutel` when it is the raw score
  /// `s`, dL/ds = dL/dw through the sigmoid and cosine. The rest, from dL/ds and dL/dr to `W`,
  /// `theta`, `tau` and `x`, is `CosineRouter::backward`.
  ///
  /// The gate's `W` and `theta` must be those the plan was routed with; the only allowed
  /// change is an expert update by `on_training_forward` (it touches only slots that are not
  /// in the plan). Parallel over tokens and over slots, each value summed in a fixed order: the
  /// same bits for any thread count.
  ///
  /// Throws `moet::Error` when a shape or size does not match (`x` `(T, model_dim)`,
  /// `routing` over `T` tokens and `num_experts` experts with `(T, num_experts)` scores,
  /// `d_weights` one per assignment, `d_gates` empty or `T * num_experts`, `dx`
  /// `(T, model_dim)`), or when the plan does not match the gate (an expert id out of range, or
  /// an assignment that did not fire and is not an eval fallback); nothing is changed then.
  void backward(const ConstRows<S>& x, const RouteContext& ctx, const Routing<S>& routing,
                std::span<const S> d_weights, const LossGrad& loss_grad, Rows<S> dx) {
    static constexpr const char* op = "TopAnyGate::backward";
    const Index d = model_dim();
    const Index emax = num_experts();
    const Index num_tokens = x.rows();
    check_plan(op, x, routing);
    detail::require(static_cast<Index>(d_weights.size()) == routing.num_assignments(), op,
                    "d_weights must have one entry per assignment (", routing.num_assignments(),
                    "), got ", d_weights.size());
    const std::span<const S> d_gates = loss_grad.d_gates;
    detail::require(d_gates.empty() || static_cast<Index>(d_gates.size()) == num_tokens * emax, op,
                    "d_gates must be empty or have num_tokens * num_experts = ", num_tokens * emax,
                    " entries, got ", d_gates.size());
    detail::require(dx.rows() == num_tokens && dx.cols() == d, op, "dx must be (", num_tokens, ", ",
                    d, "), got (", dx.rows(), ", ", dx.cols(), ")");
    const S* const threshold = router_.fire_levels();
    const auto scores = routing.probs();  // (num_tokens, num_experts)
    Index batch_max_k = 0;
    for (Index t = 0; t < num_tokens; ++t) {
      const Index k = routing.k(t);
      batch_max_k = std::max(batch_max_k, k);
      const auto experts = routing.experts(t);
      for (Index j = 0; j < k; ++j) {
        const Index e = experts[static_cast<std::size_t>(j)];
        const bool fired = scores(t, e) > threshold[e];
        detail::require(fired || (!ctx.training && k == 1), op,
                        "the plan does not match the gate: token ", t, " goes to expert ", e,
                        " whose score ", scores(t, e), " does not beat its threshold ",
                        threshold[e], (ctx.training ? " (a training plan has no fallback)" : ""));
      }
    }
    const bool divide = options_.variant == TopAnyVariant::kTutel && batch_max_k >= 2;
    const bool raw_fallback = options_.variant == TopAnyVariant::kTutel && batch_max_k < 2;

    // dL/ds and dL/dr per (token, slot): the straight-through part; the router does the rest.
    const auto grads = router_.score_grads(num_tokens);
    auto d_s = grads.d_scores;  // (T, Emax)
    auto d_r = grads.d_r;       // (T, Emax)
    detail::parallel_blocks(num_tokens, kTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        d_s.row(t).setZero();
        d_r.row(t).setZero();
        const Index k = routing.k(t);
        if (k == 0) continue;
        const auto experts = routing.experts(t);
        const auto first = static_cast<std::size_t>(routing.offsets()[static_cast<std::size_t>(t)]);
        const S inv_k = S(1) / static_cast<S>(k);
        S sum_g = S(0);
        for (Index j = 0; j < k; ++j) sum_g += d_weights[first + static_cast<std::size_t>(j)];
        for (Index j = 0; j < k; ++j) {
          const Index e = experts[static_cast<std::size_t>(j)];
          const S g = d_weights[first + static_cast<std::size_t>(j)];
          if (scores(t, e) > threshold[e]) {
            S da = divide ? g * inv_k - sum_g * inv_k * inv_k : g * inv_k;
            if (!d_gates.empty()) da += d_gates[static_cast<std::size_t>(t * emax + e)];
            d_r(t, e) = da;
            d_s(t, e) = da;
          } else if (raw_fallback) {
            d_s(t, e) = g;  // Tutel eval fallback weight w = s
          }
        }
      }
    });
    router_.backward(x, scores, threshold, dx);
  }

  /// Sets the gradients to zero (allocating them on the first call).
  void zero_grad() { router_.zero_grad(); }

  /// dL/dW `(model_dim, num_experts)` and dL/dtheta `(num_experts)`, empty before the first
  /// `zero_grad` or `backward`; the non-const overloads allocate (zero) first.
  const RowMatrix<S>& gate_embeddings_grad() const { return router_.embeddings_grad(); }
  RowMatrix<S>& gate_embeddings_grad() { return router_.embeddings_grad(); }
  const Vector<S>& thresholds_grad() const { return router_.thresholds_grad(); }
  Vector<S>& thresholds_grad() { return router_.thresholds_grad(); }

  /// Calls `f(name, value, grad)` for `embeddings` `(model_dim, num_experts)`, `thresholds`
  /// `(1, num_experts)` and, with `trainable_temperature`, `log_temperature` `(1, 1)`
  /// (`CosineRouter::visit_parameters`). The expert mask is not a parameter.
  template <class F>
  void visit_parameters(F&& f) {
    router_.visit_parameters(std::forward<F>(f));
  }
  /// Repacks the gate embeddings after they were written through `visit_parameters`
  /// (`CosineRouter::parameters_changed`).
  void parameters_changed() { router_.parameters_changed(); }

  // ---------------------------------------------------------------------------------------
  // The adaptive process (docs/algorithms.md §4.5-4.6), run by `TopAnyAdaptive`.

  /// The hook a layer calls after routing in every training forward, with the gate input `x`
  /// `(num_tokens, model_dim)` and the plan `route` made: runs the schedule, the records and,
  /// when due, the update (`TopAnyAdaptive::after_training_forward`), then counts the forward.
  /// The update touches only slots that are not in this forward's plan, so the plan stays
  /// valid for `backward`; the auxiliary loss computed after it sees the new mask.
  ///
  /// Throws `moet::Error`, changing nothing, when the shapes do not match (`x` `(T,
  /// model_dim)`, `routing` over `T` tokens and `num_experts` experts with `(T, num_experts)`
  /// scores), when an expert id is out of range, or when the plan is an eval plan (a token
  /// routed by the eval fallback to an expert that did not fire): eval forwards never record.
  void on_training_forward(const ConstRows<S>& x, const Routing<S>& routing) {
    static constexpr const char* op = "TopAnyGate::on_training_forward";
    check_plan(op, x, routing);
    const S* const threshold = router_.fire_levels();
    const auto scores = routing.probs();
    for (Index t = 0; t < routing.num_tokens(); ++t) {
      for (const auto e : routing.experts(t)) {
        detail::require(scores(t, e) > threshold[e], op, "token ", t, " goes to expert ", e,
                        " whose score ", scores(t, e), " does not beat its threshold ",
                        threshold[e],
                        ": an eval-mode plan (fallback); call this for training forwards only");
      }
    }
    adaptive_.after_training_forward(x, routing, mask_, router_);
  }

  /// Resets the records and starts recording (DynMoE's start flag).
  void begin_recording() { adaptive_.begin_recording(); }

  /// DynMoE's expert update (docs/algorithms.md §4.5; `TopAnyAdaptive::update_experts`):
  /// switches off every active slot that received no token while recording, then switches on
  /// the lowest inactive slot `j`, if any, with `W[:, j] = R_S / ||R_S||_2` and `theta_j = 0`
  /// when `||R_S||_2 > 0` and finite; stops recording. The new slot reuses whatever weights the
  /// expert bank holds for it. Throws `moet::Error` when not recording.
  TopAnyExpertUpdate update_experts() { return adaptive_.update_experts(mask_, router_); }

  /// True between `begin_recording()` (or the cycle's begin) and the next update.
  bool recording() const { return adaptive_.recording(); }
  /// `R_E` `(num_experts)`: tokens routed to each slot since recording began.
  std::span<const Index> recorded_tokens() const { return adaptive_.recorded_tokens(); }
  /// `R_S` `(model_dim)`: the sum of the raw inputs of tokens routed nowhere since recording
  /// began.
  const Vector<S>& recorded_unrouted() const { return adaptive_.recorded_unrouted(); }
  /// The counter `n` of training forwards seen by `on_training_forward`.
  std::int64_t training_forwards() const { return adaptive_.training_forwards(); }
  /// Sets the counter (to resume a run); throws `moet::Error` unless `n >= 0`.
  void set_training_forwards(std::int64_t n) {
    detail::require(n >= 0, kOp, "training forward count must be >= 0, got ", n);
    adaptive_.set_training_forwards(n);
  }

 private:
  static constexpr const char* kOp = "TopAnyGate";

  static const Options& checked(const Options& o) {
    detail::require(o.model_dim >= 1, kOp, "model_dim must be >= 1, got ", o.model_dim);
    detail::require(o.num_experts >= 1, kOp, "num_experts must be >= 1, got ", o.num_experts);
    detail::require(o.initial_experts >= 0 && o.initial_experts <= o.num_experts, kOp,
                    "initial_experts must be in [0, num_experts = ", o.num_experts,
                    "] (0: all live), got ", o.initial_experts);
    detail::require(o.schedule_period >= 1, kOp, "schedule_period must be >= 1, got ",
                    o.schedule_period);
    return o;
  }

  /// Checks what `backward` and `on_training_forward` share: `x`, the plan and the state.
  void check_plan(const char* op, const ConstRows<S>& x, const Routing<S>& routing) const {
    const Index d = model_dim();
    const Index emax = num_experts();
    detail::require(x.cols() == d, op, "x must have model_dim = ", d, " columns, got ", x.cols());
    detail::require(routing.num_tokens() == x.rows(), op, "the plan has ", routing.num_tokens(),
                    " tokens but x has ", x.rows(), " rows");
    detail::require(routing.num_experts() == emax, op, "the plan must be over num_experts = ", emax,
                    " experts, got ", routing.num_experts());
    const bool scores_ok =  // route leaves the scores (0, 0) for an empty batch
        x.rows() == 0 || (routing.probs().rows() == x.rows() && routing.probs().cols() == emax);
    detail::require(scores_ok, op, "the plan's scores must be (", x.rows(), ", ", emax,
                    ") as route writes them, got (", routing.probs().rows(), ", ",
                    routing.probs().cols(), ")");
    router_.check_shapes(op);
    for (const auto e : routing.experts()) {
      detail::require(e >= 0 && e < emax, op, "expert id must be in [0, ", emax, "), got ", e);
    }
  }

  Options options_;
  Router router_;               // W, theta, tau and their gradients
  TopAnyAdaptive<S> adaptive_;  // records, schedule, counter (docs/algorithms.md §4.5)
  Vector<S> mask_;              // (num_experts), 0 or 1
};

}  // namespace moet
