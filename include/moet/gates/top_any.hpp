#pragma once
/// \file gates/top_any.hpp
/// `TopAnyGate`: DynMoE's top-any gating (Guo et al., "Dynamic Mixture of Experts: An Auto-Tuning
/// Approach for Efficient Transformer Models", ICLR 2025, arXiv 2405.14297). Every token picks
/// every expert whose cosine score beats that expert's trainable threshold, so k varies per token
/// and may be 0. Specification: ALGORITHMS.md section 1.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include <Eigen/Core>
#include <Eigen/QR>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/rng.hpp"
#include "moet/detail/select.hpp"
#include "moet/detail/weights.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// Which DynMoE implementation `TopAnyGate` follows where the two public ones differ
/// (ALGORITHMS.md 1.9): the eval fallback weight, the combine-weight gradient (1.3) and the
/// auxiliary loss set of `top_any_aux_loss` (1.5).
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

/// When `TopAnyGate` runs DynMoE's adaptive process (ALGORITHMS.md 1.6).
enum class TopAnySchedule {
  /// DeepSpeed's cycle over the gate's counter `n` of training forwards (counted by
  /// `on_training_forward`, read before the forward): begin recording when
  /// `n % period == 0 && (n / period) % 3 == 1`, update the experts after the forward when
  /// `n % period == 0 && (n / period) % 3 == 2` (`period` = `Options::schedule_period`, 300 in
  /// DeepSpeed). With 300: record forwards 300..600 inclusive (301 calls), update after 600,
  /// again 1200..1500, and so on.
  kDeepSpeedCycle,
  /// Only explicit `begin_recording()` / `update_experts()` calls (Tutel's GLUE script style,
  /// where the caller knows the epoch length).
  kManual,
};

/// Loss-gradient input of `TopAnyGate::backward` besides the combine-weight gradient.
/// `d_gates` is empty (no such loss) or holds `num_tokens * max_experts` values, row-major:
/// dL/da for the 0/1 straight-through gate matrix `a` of ALGORITHMS.md 1.2 (the load-balance
/// and efficiency terms enter here; `top_any_aux_loss` in train/top_any_losses.hpp fills it).
/// Only entries of activated (token, expert) pairs pass a gradient (`relu'` is 0 elsewhere),
/// and eval-fallback entries pass none (the fallback one-hot is a constant).
template <class S>
struct TopAnyLossGrad {
  std::span<const S> d_gates{};
};

/// What one `TopAnyGate::update_experts()` did.
struct TopAnyExpertUpdate {
  /// Slots switched off (they were active and received no token while recording).
  Index removed = 0;
  /// The slot switched on, or -1 when none was added.
  Index added = -1;
};

namespace detail {

/// DynMoE's gate embedding initialisation (ALGORITHMS.md 1.1): PyTorch-style `orthogonal_` on an
/// `(max_experts, model_dim)` matrix, returned transposed as `(model_dim, max_experts)`. The
/// columns are orthonormal when `max_experts <= model_dim`, the rows otherwise. Built from a
/// Gaussian matrix drawn by `Rng(seed)` and its Householder QR in double, with the signs of `Q`'s
/// columns fixed so that `diag(R) >= 0` (so the result is a deterministic function of `seed`).
template <class S>
RowMatrix<S> orthogonal_gate_embeddings(Index model_dim, Index max_experts, std::uint64_t seed) {
  const Index tall = std::max(model_dim, max_experts);
  const Index thin = std::min(model_dim, max_experts);
  Rng rng(seed);
  Eigen::MatrixXd gaussian(tall, thin);  // (tall, thin)
  for (Index i = 0; i < tall; ++i) {
    for (Index j = 0; j < thin; ++j) gaussian(i, j) = rng.normal();
  }
  const Eigen::HouseholderQR<Eigen::MatrixXd> qr(gaussian);
  Eigen::MatrixXd q = qr.householderQ() * Eigen::MatrixXd::Identity(tall, thin);  // (tall, thin)
  for (Index j = 0; j < thin; ++j) {
    if (qr.matrixQR()(j, j) < 0.0) q.col(j) *= -1.0;
  }
  // max_experts <= model_dim: q is (model_dim, max_experts) with orthonormal columns, already the
  // transpose of the (max_experts, model_dim) matrix with orthonormal rows. Otherwise q is
  // (max_experts, model_dim) with orthonormal columns and the embeddings are its transpose.
  if (max_experts <= model_dim) return q.cast<S>();
  return q.transpose().cast<S>();
}

}  // namespace detail

/// DynMoE top-any gate (Guo et al., ICLR 2025, arXiv 2405.14297): forward, straight-through
/// backward and the adaptive expert count.
///
/// State (ALGORITHMS.md 1.1): gate embeddings `W` `(model_dim, max_experts)`, one column per
/// expert slot; thresholds `theta` `(max_experts)`, initially 0; the 0/1 expert mask `m`
/// `(max_experts)`, the first `num_experts` slots active; the logit scale `tau`. DynMoE allocates
/// `max_experts` slots up front and switches them on and off, so `num_experts()` is
/// `max_experts` and the expert bank must hold that many experts; `num_active()` counts the live
/// slots.
///
/// Forward (ALGORITHMS.md 1.2), per token `t` and slot `e`:
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
/// Training (ALGORITHMS.md 1.3, 1.6): `backward` is the straight-through gradient (see its
/// comment), with the parameters `embeddings` (`W`) and `thresholds` (`theta`) visited by
/// `visit_parameters`; the auxiliary losses live in train/top_any_losses.hpp; the adaptive
/// process (records, remove-then-add, schedules) is `on_training_forward`, `begin_recording`
/// and `update_experts`. The mask is not a parameter. The Tutel `gated_multi_gate_t`
/// variant's trainable temperature is `Options::trainable_temperature`: the parameter is
/// `log_t` (visited as `log_temperature`, `(1, 1)`) and `tau = exp(min(log_t, log 100))`; build
/// it with `temperature = 10` to start as Tutel does (`init_t = 0.1`). Otherwise `tau` is a
/// constant (DeepSpeed, Tutel `gated_multi_gate`).
///
/// \tparam S scalar type (float or double); routing runs in `S`.
///
/// ```cpp
/// moet::TopAnyGate<float> gate({.model_dim = 512, .num_experts = 8, .max_experts = 16});
/// ```
template <class S>
class TopAnyGate {
 public:
  using Scalar = S;

  /// Construction options.
  struct Options {
    /// Width of a token, `d` (>= 1).
    Index model_dim = 0;
    /// Slots active at construction, 1..max_experts (DynMoE's `num_experts`).
    Index num_experts = 0;
    /// Expert slots allocated, `Emax` (DynMoE's `max_expert_num`); 0 means `num_experts`.
    Index max_experts = 0;
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
    /// When the adaptive process runs. The default is DeepSpeed's cycle, DynMoE's recommended
    /// implementation: a layer that calls `on_training_forward` every training forward then
    /// auto-tunes its expert count as DynMoE does, with no extra calls. `kManual` leaves it to
    /// explicit `begin_recording()` / `update_experts()` calls.
    TopAnySchedule schedule = TopAnySchedule::kDeepSpeedCycle;
    /// The cycle's period in training forwards (>= 1); 300 in DeepSpeed.
    std::int64_t schedule_period = 300;
  };

  /// Loss-gradient input of `backward` (the auxiliary losses' dL/da).
  using LossGrad = TopAnyLossGrad<S>;

  /// Norm floor of `F.normalize` (PyTorch's default `eps`), applied to tokens and embeddings.
  static constexpr S kNormEps = S(1e-12);
  /// Tokens per routing task: fixed, so the split never depends on the thread count.
  static constexpr Index kTokenBlock = 256;
  /// Clamp of the trainable temperature: `tau <= 100` (`log(1 / 0.01)` in Tutel).
  static constexpr S kLogMaxTemperature = S(4.605170185988091368);

  /// Builds the gate and initialises its state (ALGORITHMS.md 1.1). Throws `moet::Error` when
  /// `model_dim < 1`, `num_experts < 1`, `num_experts > max_experts` (when `max_experts != 0`)
  /// or `temperature` is not finite and > 0.
  explicit TopAnyGate(const Options& options) : options_(options) {
    detail::require(options_.model_dim >= 1, kOp, "model_dim must be >= 1, got ",
                    options_.model_dim);
    detail::require(options_.num_experts >= 1, kOp, "num_experts must be >= 1, got ",
                    options_.num_experts);
    detail::require(options_.max_experts >= 0, kOp, "max_experts must be >= 0, got ",
                    options_.max_experts);
    if (options_.max_experts == 0) options_.max_experts = options_.num_experts;
    detail::require(options_.num_experts <= options_.max_experts, kOp,
                    "num_experts must be <= max_experts, got ", options_.num_experts, " > ",
                    options_.max_experts);
    detail::require(options_.max_experts <= std::numeric_limits<std::int32_t>::max(), kOp,
                    "max_experts must fit a 32-bit expert id, got ", options_.max_experts);
    check_temperature(options_.temperature);
    detail::require(options_.schedule_period >= 1, kOp, "schedule_period must be >= 1, got ",
                    options_.schedule_period);
    const Index emax = options_.max_experts;
    temperature_ = options_.temperature;
    log_temperature_ = std::log(options_.temperature);
    embeddings_ =
        detail::orthogonal_gate_embeddings<S>(options_.model_dim, emax, options_.init_seed);
    thresholds_ = Vector<S>::Zero(emax);
    mask_ = Vector<S>::Zero(emax);
    mask_.head(options_.num_experts).setOnes();
    record_tokens_.assign(static_cast<std::size_t>(emax), 0);
    record_unrouted_ = Vector<S>::Zero(options_.model_dim);
  }

  /// Expert slots, `max_experts` (the expert bank's size). See `num_active()`.
  Index num_experts() const { return options_.max_experts; }
  /// Expert slots allocated, `Emax`.
  Index max_experts() const { return options_.max_experts; }
  /// Slots currently active (ones in `expert_mask()`).
  Index num_active() const { return static_cast<Index>((mask_.array() != S(0)).count()); }
  /// Width of a token.
  Index model_dim() const { return options_.model_dim; }
  /// The options the gate was built with (`max_experts` resolved; the temperature is the
  /// initial one, see `temperature()`).
  const Options& options() const { return options_; }
  /// The variant whose eval fallback weight the gate follows.
  TopAnyVariant variant() const { return options_.variant; }

  /// Gate embeddings `W` `(model_dim, max_experts)`: column `e` is expert `e`'s representation.
  /// A read-only view of fixed shape: write with `set_gate_embeddings` (training updates them
  /// through `visit_parameters`).
  Eigen::Map<const RowMatrix<S>> gate_embeddings() const {
    return Eigen::Map<const RowMatrix<S>>(embeddings_.data(), embeddings_.rows(),
                                          embeddings_.cols());
  }
  /// The same matrix as `gate_embeddings()`, under the name every gate's router weights have.
  Eigen::Map<const RowMatrix<S>> router() const { return gate_embeddings(); }
  /// Replaces the gate embeddings by `w`: `(model_dim, max_experts)` with
  /// `WeightLayout::kInOut`, `[max_experts, model_dim]` with `kOutIn` (one row per expert, as
  /// PyTorch code usually stores them). Throws `moet::Error` (nothing changed) on another shape
  /// ("looks transposed" for the other layout's) or a NaN/Inf entry.
  void set_gate_embeddings(const ConstRows<S>& w, WeightLayout layout) {
    set_embeddings("set_gate_embeddings", w, layout);
  }
  /// The same as `set_gate_embeddings`, under the name every gate's router setter has.
  void set_router(const ConstRows<S>& w, WeightLayout layout) {
    set_embeddings("set_router", w, layout);
  }

  /// Thresholds `theta` `(max_experts)`: expert `e` fires iff `sigmoid(tau cos) >
  /// sigmoid(tau theta_e)`. A read-only view of fixed size: write with `set_thresholds`
  /// (training updates them through `visit_parameters`).
  Eigen::Map<const Vector<S>> thresholds() const {
    return Eigen::Map<const Vector<S>>(thresholds_.data(), thresholds_.size());
  }
  /// Replaces the thresholds; throws `moet::Error` unless `theta` has `max_experts` finite
  /// entries.
  void set_thresholds(const Eigen::Ref<const Vector<S>>& theta) {
    detail::require(theta.size() == max_experts(), kOp, "thresholds must have ", max_experts(),
                    " entries, got ", theta.size());
    detail::require(detail::all_finite(theta), kOp, "thresholds must be finite");
    thresholds_ = theta;
  }

  /// The expert mask `m` `(max_experts)`: 1 for an active slot, 0 for an inactive one.
  const Vector<S>& expert_mask() const { return mask_; }
  /// Replaces the expert mask; throws `moet::Error` unless it has `max_experts` entries, each
  /// 0 or 1. An all-zero mask is allowed (every token is then routed nowhere).
  void set_expert_mask(const Eigen::Ref<const Vector<S>>& mask) {
    detail::require(mask.size() == max_experts(), kOp, "expert mask must have ", max_experts(),
                    " entries, got ", mask.size());
    for (Index e = 0; e < mask.size(); ++e) {
      detail::require(mask[e] == S(0) || mask[e] == S(1), kOp,
                      "expert mask entries must be 0 or 1, got ", mask[e], " at slot ", e);
    }
    mask_ = mask;
  }
  /// Switches slot `e` on or off (what DynMoE's add/remove does); throws `moet::Error` unless
  /// `0 <= e < max_experts`.
  void set_expert_active(Index e, bool active) {
    detail::require(e >= 0 && e < max_experts(), kOp, "expert slot must be in [0, ", max_experts(),
                    "), got ", e);
    mask_[e] = active ? S(1) : S(0);
  }

  /// The logit scale `tau` in use: the fixed one, or `exp(min(log_t, log 100))` with
  /// `trainable_temperature`.
  S temperature() const {
    if (!options_.trainable_temperature) return temperature_;
    return std::exp(std::min(log_temperature_, kLogMaxTemperature));
  }
  /// Sets `tau` (with `trainable_temperature`, sets `log_t = log(tau)`); throws `moet::Error`
  /// unless it is finite and > 0.
  void set_temperature(S tau) {
    check_temperature(tau);
    temperature_ = tau;
    log_temperature_ = std::log(tau);
  }
  /// The trainable parameter `log_t` (meaningful with `trainable_temperature`).
  S log_temperature() const { return log_temperature_; }
  /// dL/dlog_t (0 unless `trainable_temperature`).
  S log_temperature_grad() const { return grad_log_temperature_; }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out` (see the class comment).
  /// Fills `out.probs_mut()` with the masked sigmoid scores `s` `(num_tokens, max_experts)`
  /// (not a distribution) and sets `out.live_experts = num_active()`. Throws `moet::Error`
  /// when `x` has the wrong width or a non-finite entry, when training (`visit_parameters`)
  /// left a non-finite embedding, threshold or temperature, or when a score is not finite (an
  /// overflowing token norm); `out` is then unspecified.
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    const Index d = model_dim();
    const Index emax = max_experts();
    detail::require(x.cols() == d, kOp, "x must have model_dim = ", d, " columns, got ", x.cols());
    MOET_ASSERT(embeddings_.rows() == d && embeddings_.cols() == emax && thresholds_.size() == emax,
                "the setters keep the gate's shapes");
    detail::require(detail::all_finite(embeddings_), kOp, "gate embeddings must be finite");
    detail::require(detail::all_finite(thresholds_), kOp, "thresholds must be finite");
    detail::require(detail::all_finite(x), kOp, "x must be finite (found NaN or Inf)");
    const S tau = temperature();
    detail::require(std::isfinite(tau) && tau > S(0), kOp,
                    "temperature must be finite and > 0, got ", tau, " (log_temperature ",
                    log_temperature_, ")");

    const Index num_tokens = x.rows();
    const Index num_active_slots = num_active();
    out.reset(num_tokens, emax);
    out.probs_are_distribution = false;
    out.live_experts = num_active_slots;
    if (num_tokens == 0) return;

    // Per-slot constants: floored column norms of W and the fire thresholds sigmoid(tau theta).
    auto slot = out.scratch_values.vector(2 * emax);
    S* const norm_w = slot.data();       // (max_experts)
    S* const threshold = norm_w + emax;  // (max_experts)
    const S* const mask = mask_.data();
    S max_norm_w = kNormEps;  // largest active embedding norm
    for (Index e = 0; e < emax; ++e) {
      norm_w[e] = std::max(embeddings_.col(e).norm(), kNormEps);
      threshold[e] = sigmoid(tau * thresholds_[e]);
      if (mask[e] != S(0)) max_norm_w = std::max(max_norm_w, norm_w[e]);
    }

    // Raw dot products x W, turned in place into the scores s.
    auto scores = out.probs_mut();  // (num_tokens, max_experts)
    detail::router_product(x, embeddings_, scores);

    // Pass 1: scores, natural k per token, and per block a non-finite flag and the largest k.
    const Index num_blocks = (num_tokens + kTokenBlock - 1) / kTokenBlock;
    std::int32_t* const block_info = out.scratch_ids.data(2 * num_blocks);
    std::int32_t* const block_bad = block_info;                 // (num_blocks)
    std::int32_t* const block_max_k = block_info + num_blocks;  // (num_blocks)
    const auto counts = out.counts();
    const bool fallback = !ctx.training && num_active_slots > 0;
    detail::parallel_blocks(num_tokens, kTokenBlock, [&](Index begin, Index end) {
      bool bad = false;
      Index max_k = 0;
      for (Index t = begin; t < end; ++t) {
        const S norm_x = std::max(x.row(t).norm(), kNormEps);
        // An overflowing norm product would silently turn the cosines into 0: flag it.
        bad = bad || !std::isfinite(norm_x * max_norm_w);
        S* const s = &scores(t, 0);
        Index k = 0;
        for (Index e = 0; e < emax; ++e) {
          if (mask[e] == S(0)) {
            s[e] = S(0);
            continue;
          }
          s[e] = sigmoid(tau * (s[e] / (norm_x * norm_w[e])));
          bad = bad || !std::isfinite(s[e]);
          if (s[e] > threshold[e]) ++k;
        }
        max_k = std::max(max_k, k);
        counts[static_cast<std::size_t>(t)] = (k == 0 && fallback) ? 1 : k;
      }
      const Index b = begin / kTokenBlock;
      block_bad[b] = bad ? 1 : 0;
      block_max_k[b] = static_cast<std::int32_t>(max_k);
    });
    Index batch_max_k = 0;
    for (Index b = 0; b < num_blocks; ++b) {
      detail::require(block_bad[b] == 0, kOp,
                      "scores must be finite (a token or gate embedding norm overflowed), got a "
                      "non-finite score in tokens [",
                      b * kTokenBlock, ", ", std::min(num_tokens, (b + 1) * kTokenBlock), ")");
      batch_max_k = std::max<Index>(batch_max_k, block_max_k[b]);
    }
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

  // ---------------------------------------------------------------------------------------
  // Training: straight-through backward and parameters.

  /// Straight-through backward (ALGORITHMS.md 1.2-1.3). `x`, `ctx` and `routing` are those of
  /// the `route` call (the plan's `probs()` holds the scores `s` it used, so nothing else is
  /// cached); `d_weights` is dL/dw per assignment (routing order); `loss_grad.d_gates` is
  /// empty or dL/da `(num_tokens, max_experts)` row-major from the auxiliary losses.
  /// Accumulates into `gate_embeddings_grad()` and `thresholds_grad()` and adds dL/dx into `dx`
  /// `(num_tokens, model_dim)`.
  ///
  /// The surrogate differentiated, per token `t` with activated set `S_t`, `k = |S_t|`:
  /// ```
  /// a[t,e] = r + stopgrad(sign(r) - r),  r = relu(s[t,e] - sigmoid(tau theta_e))   (da/dr = 1)
  /// kDeepSpeed:   w[t,e] = a[t,e] / k      (k a constant)
  /// kTutel:       w[t,e] = a[t,e] / sum_j a[t,j]  when some token of the batch has k >= 2,
  ///               else w = a (no division; the same gradient as kDeepSpeed, k <= 1)
  /// dL/da[t,e] = (weight part) + d_gates[t,e];   dL/dr = dL/da on activated pairs, 0 elsewhere
  /// dL/dtheta_e = -tau sigmoid'(tau theta_e) sum_t dL/dr[t,e]
  /// dL/dcos[t,e] = tau s (1 - s) dL/dr[t,e], then through both F.normalize (eps 1e-12) to x, W
  /// ```
  /// so only activated pairs pass gradient to `W`, `theta` and `x`; tokens that activated
  /// nothing (training) pass nothing; inactive slots get nothing. Eval-fallback assignments
  /// (a token with no activated expert, routed to its best one when `!ctx.training`) pass
  /// nothing for `kDeepSpeed` (weight 1, a constant) and, for `kTutel` when the weight is the
  /// raw score `s`, dL/ds = dL/dw through the sigmoid and cosine (the threshold is not
  /// involved). `tau` is a constant unless `trainable_temperature`; then, with `z = tau cos` and
  /// `tau theta` both depending on it, `dL/dlog_t = tau dL/dtau` below the clamp (0 above).
  ///
  /// The gate's `W` and `theta` must be those the plan was routed with; the only allowed
  /// change is an expert update by `on_training_forward` (it touches only slots that are not
  /// in the plan). Parallel over tokens (for `dx`) and over slots (for `W`, `theta`), each
  /// value summed in a fixed order: the same bits for any thread count.
  ///
  /// Throws `moet::Error` when a shape or size does not match (`x` `(T, model_dim)`,
  /// `routing` over `T` tokens and `max_experts` experts with `(T, max_experts)` scores,
  /// `d_weights` one per assignment, `d_gates` empty or `T * max_experts`, `dx`
  /// `(T, model_dim)`), or when the plan does not match the gate (an expert id out of range, or
  /// an assignment that did not fire and is not an eval fallback); nothing is changed then.
  void backward(const ConstRows<S>& x, const RouteContext& ctx, const Routing<S>& routing,
                std::span<const S> d_weights, const LossGrad& loss_grad, Rows<S> dx) {
    static constexpr const char* op = "TopAnyGate::backward";
    const Index d = model_dim();
    const Index emax = max_experts();
    const Index num_tokens = x.rows();
    check_plan(op, x, routing);
    detail::require(static_cast<Index>(d_weights.size()) == routing.num_assignments(), op,
                    "d_weights must have one entry per assignment (", routing.num_assignments(),
                    "), got ", d_weights.size());
    const std::span<const S> d_gates = loss_grad.d_gates;
    detail::require(d_gates.empty() || static_cast<Index>(d_gates.size()) == num_tokens * emax, op,
                    "d_gates must be empty or have num_tokens * max_experts = ", num_tokens * emax,
                    " entries, got ", d_gates.size());
    detail::require(dx.rows() == num_tokens && dx.cols() == d, op, "dx must be (", num_tokens, ", ",
                    d, "), got (", dx.rows(), ", ", dx.cols(), ")");
    const S tau = temperature();
    S* const threshold = slot_thresholds();
    const auto scores = routing.probs();  // (num_tokens, max_experts)
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
    ensure_grads();
    if (num_tokens == 0) return;

    // Per-slot constants: raw column norms of W and the normalised columns, transposed so that
    // each is contiguous.
    S* const raw_norm_w = threshold + emax;      // (max_experts)
    S* const slot_d_tau = threshold + 2 * emax;  // (max_experts): dL/dtau through theta
    auto slot_rows = wn_scratch_.matrix(2 * emax, d);
    auto wn_t = slot_rows.topRows(emax);  // (max_experts, model_dim): Wn transposed
    for (Index e = 0; e < emax; ++e) {
      raw_norm_w[e] = embeddings_.col(e).norm();
      wn_t.row(e) = embeddings_.col(e).transpose() / std::max(raw_norm_w[e], kNormEps);
    }
    const bool divide = options_.variant == TopAnyVariant::kTutel && batch_max_k >= 2;
    const bool raw_fallback = options_.variant == TopAnyVariant::kTutel && batch_max_k < 2;

    // Pass 1, over token blocks: dL/dcos and dL/dr per (token, slot), and dx.
    const Index num_blocks = (num_tokens + kTokenBlock - 1) / kTokenBlock;
    S* const token_data = token_scratch_.data(2 * num_tokens * emax + num_tokens + num_blocks);
    Eigen::Map<RowMatrix<S>> d_cos(token_data, num_tokens, emax);                    // (T, Emax)
    Eigen::Map<RowMatrix<S>> d_r(token_data + num_tokens * emax, num_tokens, emax);  // (T, Emax)
    S* const inv_norm_x = token_data + 2 * num_tokens * emax;                        // (T)
    S* const block_d_tau = inv_norm_x + num_tokens;  // (num_blocks): dL/dtau through s
    detail::parallel_blocks(num_tokens, kTokenBlock, [&](Index begin, Index end) {
      S d_tau = S(0);  // sum_t,e dL/ds s (1 - s) cos = sum_t projection_t / tau
      for (Index t = begin; t < end; ++t) {
        d_cos.row(t).setZero();
        d_r.row(t).setZero();
        const S raw_norm_x = x.row(t).norm();
        const S norm_x = std::max(raw_norm_x, kNormEps);
        inv_norm_x[t] = S(1) / norm_x;
        const Index k = routing.k(t);
        if (k == 0) continue;
        const auto experts = routing.experts(t);
        const auto first = static_cast<std::size_t>(routing.offsets()[static_cast<std::size_t>(t)]);
        const S inv_k = S(1) / static_cast<S>(k);
        S sum_g = S(0);
        for (Index j = 0; j < k; ++j) sum_g += d_weights[first + static_cast<std::size_t>(j)];
        S projection = S(0);  // sum_e dL/dcos[t,e] cos[t,e] = u . (dL/du)
        bool any = false;
        for (Index j = 0; j < k; ++j) {
          const Index e = experts[static_cast<std::size_t>(j)];
          const S g = d_weights[first + static_cast<std::size_t>(j)];
          const S s = scores(t, e);
          S dcos = S(0);
          if (s > threshold[e]) {
            S da = divide ? g * inv_k - sum_g * inv_k * inv_k : g * inv_k;
            if (!d_gates.empty()) da += d_gates[static_cast<std::size_t>(t * emax + e)];
            d_r(t, e) = da;
            dcos = tau * s * (S(1) - s) * da;
          } else if (raw_fallback) {
            dcos = tau * s * (S(1) - s) * g;  // Tutel eval fallback weight w = s
          }
          d_cos(t, e) = dcos;
          if (dcos == S(0)) continue;
          any = true;
          dx.row(t) += (dcos / norm_x) * wn_t.row(e);
          projection += dcos * (x.row(t).dot(wn_t.row(e)) / norm_x);
        }
        // d(x / ||x||)/dx = (I - u u^T) / ||x||; below the floor, x / eps has derivative I / eps.
        if (any && raw_norm_x > kNormEps) {
          dx.row(t) -= (projection / (norm_x * norm_x)) * x.row(t);
        }
        d_tau += projection / tau;
      }
      block_d_tau[begin / kTokenBlock] = d_tau;
    });

    // Pass 2, over slots: dL/dWn_e = sum_t dL/dcos[t,e] x_t / ||x_t|| in token order, then
    // through the column normalisation; dL/dtheta_e from sum_t dL/dr[t,e].
    auto g_wn_t = slot_rows.bottomRows(emax);  // (max_experts, model_dim): dL/dWn transposed
    detail::parallel_for(emax, [&](Index e) {
      auto acc = g_wn_t.row(e);
      acc.setZero();
      S sum_r = S(0);
      bool any = false;
      for (Index t = 0; t < num_tokens; ++t) {
        sum_r += d_r(t, e);
        const S c = d_cos(t, e);
        if (c == S(0)) continue;
        acc += (c * inv_norm_x[t]) * x.row(t);
        any = true;
      }
      const S thr = threshold[e];
      grad_thresholds_[e] += -tau * thr * (S(1) - thr) * sum_r;
      slot_d_tau[e] = -thr * (S(1) - thr) * thresholds_[e] * sum_r;
      if (!any) return;
      if (raw_norm_w[e] > kNormEps) {
        const S along = acc.dot(wn_t.row(e));
        grad_embeddings_.col(e) += ((acc - along * wn_t.row(e)) / raw_norm_w[e]).transpose();
      } else {
        grad_embeddings_.col(e) += (acc / kNormEps).transpose();
      }
    });

    // dL/dlog_t = tau dL/dtau below the clamp, summed in block and slot order.
    if (options_.trainable_temperature && log_temperature_ < kLogMaxTemperature) {
      S d_tau = S(0);
      for (Index b = 0; b < num_blocks; ++b) d_tau += block_d_tau[b];
      for (Index e = 0; e < emax; ++e) d_tau += slot_d_tau[e];
      grad_log_temperature_ += tau * d_tau;
    }
  }

  /// Sets the gradients to zero (allocating them on the first call).
  void zero_grad() {
    ensure_grads();
    grad_embeddings_.setZero();
    grad_thresholds_.setZero();
    grad_log_temperature_ = S(0);
  }

  /// dL/dW `(model_dim, max_experts)`; `(0, 0)` before the first `zero_grad` or `backward`.
  /// The non-const overload allocates (zero) first; the auxiliary losses add into it.
  const RowMatrix<S>& gate_embeddings_grad() const { return grad_embeddings_; }
  RowMatrix<S>& gate_embeddings_grad() {
    ensure_grads();
    return grad_embeddings_;
  }
  /// dL/dtheta `(max_experts)`; empty before the first `zero_grad` or `backward`. The
  /// non-const overload allocates (zero) first.
  const Vector<S>& thresholds_grad() const { return grad_thresholds_; }
  Vector<S>& thresholds_grad() {
    ensure_grads();
    return grad_thresholds_;
  }

  /// Calls `f(name, value, grad)` for `embeddings` (`W`, `(model_dim, max_experts)`),
  /// `thresholds` (`theta`, `(1, max_experts)`) and, with `trainable_temperature`,
  /// `log_temperature` (`log_t`, `(1, 1)`), in that order (train/grad.hpp). The expert mask is
  /// not a parameter. Allocates the gradients on first use.
  template <class F>
  void visit_parameters(F&& f) {
    ensure_grads();
    const Index d = model_dim();
    const Index emax = max_experts();
    f(std::string_view("embeddings"), ParamMap<S>(embeddings_.data(), d, emax),
      ParamMap<S>(grad_embeddings_.data(), d, emax));
    f(std::string_view("thresholds"), ParamMap<S>(thresholds_.data(), 1, emax),
      ParamMap<S>(grad_thresholds_.data(), 1, emax));
    if (options_.trainable_temperature) {
      f(std::string_view("log_temperature"), ParamMap<S>(&log_temperature_, 1, 1),
        ParamMap<S>(&grad_log_temperature_, 1, 1));
    }
  }

  // ---------------------------------------------------------------------------------------
  // The adaptive process (ALGORITHMS.md 1.6).

  /// The hook a layer calls after routing in every training forward, with the gate input `x`
  /// `(num_tokens, model_dim)` and the plan `route` made. In order: under
  /// `TopAnySchedule::kDeepSpeedCycle`, begins recording when the counter `n =
  /// training_forwards()` says so; while recording, adds the plan to the records
  /// (`R_E[e] += tokens routed to e`, `R_S += x_t` for every token routed nowhere); under the
  /// cycle, updates the experts (`update_experts()`) when `n` says so and a recording is still
  /// open (an explicit `update_experts()` earlier in the window closes it); then counts the
  /// forward (`++n`). Under `kManual` it only records (when recording) and counts. The update
  /// touches only slots that are not in this forward's plan (idle or inactive ones), so the
  /// plan stays valid for `backward`; the auxiliary loss computed after it sees the new mask.
  ///
  /// Throws `moet::Error`, changing nothing, when the shapes do not match (`x` `(T,
  /// model_dim)`, `routing` over `T` tokens and `max_experts` experts with `(T, max_experts)`
  /// scores), when an expert id is out of range, or when the plan is an eval plan (a token
  /// routed by the eval fallback to an expert that did not fire): eval forwards never record.
  void on_training_forward(const ConstRows<S>& x, const Routing<S>& routing) {
    static constexpr const char* op = "TopAnyGate::on_training_forward";
    check_plan(op, x, routing);
    const S* const threshold = slot_thresholds();
    const auto scores = routing.probs();
    for (Index t = 0; t < routing.num_tokens(); ++t) {
      for (const auto e : routing.experts(t)) {
        detail::require(scores(t, e) > threshold[e], op, "token ", t, " goes to expert ", e,
                        " whose score ", scores(t, e), " does not beat its threshold ",
                        threshold[e],
                        ": an eval-mode plan (fallback); call this for training forwards only");
      }
    }
    const std::int64_t n = forwards_;
    const std::int64_t period = options_.schedule_period;
    const bool cycle = options_.schedule == TopAnySchedule::kDeepSpeedCycle && n % period == 0;
    if (cycle && (n / period) % 3 == 1) begin_recording();
    if (recording_) {
      for (Index t = 0; t < routing.num_tokens(); ++t) {
        if (routing.k(t) == 0) record_unrouted_ += x.row(t).transpose();
        for (const auto e : routing.experts(t)) ++record_tokens_[static_cast<std::size_t>(e)];
      }
    }
    if (cycle && (n / period) % 3 == 2 && recording_) update_experts();
    ++forwards_;
  }

  /// Resets the records and starts recording (DynMoE's start flag).
  void begin_recording() {
    std::fill(record_tokens_.begin(), record_tokens_.end(), Index{0});
    record_unrouted_.setZero();
    recording_ = true;
  }

  /// DynMoE's expert update (ALGORITHMS.md 1.6), remove first, then add; stops recording.
  /// Remove: every active slot that received no token while recording is switched off (its
  /// `W` column, threshold and the expert bank's weights stay as they are). Add: when
  /// `||R_S||_2 > 0` (the norm, where DeepSpeed tests `sum_i R_S[i] != 0`: a sum that cancels
  /// to 0 would skip a real add) and some slot is inactive, the lowest inactive slot `j` is
  /// switched on with `W[:, j] = R_S / ||R_S||_2` and `theta_j = 0`; at most one slot per
  /// update, never more than `max_experts` in all. The gate does not own the expert weights:
  /// the new slot reuses whatever weights the bank holds for slot `j` (possibly those of an
  /// expert removed in this very update), as DynMoE does. Optimiser state (momenta) for the
  /// slot's `W` column and threshold is not reset. A non-finite `R_S` (a float sum that
  /// overflowed) adds nothing. Throws `moet::Error` when not recording.
  TopAnyExpertUpdate update_experts() {
    detail::require(recording_, "TopAnyGate::update_experts",
                    "no recording to update from: call begin_recording() first (recording ",
                    "stops at every update), training forwards counted so far: ", forwards_);
    TopAnyExpertUpdate result;
    const Index emax = max_experts();
    for (Index e = 0; e < emax; ++e) {
      if (mask_[e] != S(0) && record_tokens_[static_cast<std::size_t>(e)] == 0) {
        mask_[e] = S(0);
        ++result.removed;
      }
    }
    const S norm = record_unrouted_.stableNorm();
    if (norm > S(0) && std::isfinite(norm) && detail::all_finite(record_unrouted_)) {
      for (Index j = 0; j < emax; ++j) {
        if (mask_[j] != S(0)) continue;
        mask_[j] = S(1);
        embeddings_.col(j) = record_unrouted_ / norm;
        thresholds_[j] = S(0);
        result.added = j;
        break;
      }
    }
    recording_ = false;
    return result;
  }

  /// True between `begin_recording()` (or the cycle's begin) and the next update.
  bool recording() const { return recording_; }
  /// `R_E` `(max_experts)`: tokens routed to each slot since recording began.
  std::span<const Index> recorded_tokens() const { return record_tokens_; }
  /// `R_S` `(model_dim)`: the sum of the raw inputs of tokens routed nowhere since recording
  /// began.
  const Vector<S>& recorded_unrouted() const { return record_unrouted_; }
  /// The counter `n` of training forwards seen by `on_training_forward`.
  std::int64_t training_forwards() const { return forwards_; }
  /// Sets the counter (to resume a run); throws `moet::Error` unless `n >= 0`.
  void set_training_forwards(std::int64_t n) {
    detail::require(n >= 0, kOp, "training forward count must be >= 0, got ", n);
    forwards_ = n;
  }

 private:
  static constexpr const char* kOp = "TopAnyGate";

  static S sigmoid(S z) { return S(1) / (S(1) + std::exp(-z)); }

  static void check_temperature(S tau) {
    detail::require(std::isfinite(tau) && tau > S(0), kOp,
                    "temperature must be finite and > 0, got ", tau);
  }

  /// Checks what `backward` and `on_training_forward` share: `x`, the plan and the state.
  void check_plan(const char* op, const ConstRows<S>& x, const Routing<S>& routing) const {
    const Index d = model_dim();
    const Index emax = max_experts();
    detail::require(x.cols() == d, op, "x must have model_dim = ", d, " columns, got ", x.cols());
    detail::require(routing.num_tokens() == x.rows(), op, "the plan has ", routing.num_tokens(),
                    " tokens but x has ", x.rows(), " rows");
    detail::require(routing.num_experts() == emax, op, "the plan must be over max_experts = ", emax,
                    " experts, got ", routing.num_experts());
    // route leaves the scores (0, 0) for an empty batch.
    const bool scores_ok =
        x.rows() == 0 || (routing.probs().rows() == x.rows() && routing.probs().cols() == emax);
    detail::require(scores_ok, op, "the plan's scores must be (", x.rows(), ", ", emax,
                    ") as route writes them, got (", routing.probs().rows(), ", ",
                    routing.probs().cols(), ")");
    detail::require(embeddings_.rows() == d && embeddings_.cols() == emax, op,
                    "gate embeddings must be (", d, ", ", emax, "), got (", embeddings_.rows(),
                    ", ", embeddings_.cols(), ")");
    detail::require(thresholds_.size() == emax, op, "thresholds must have ", emax, " entries, got ",
                    thresholds_.size());
    for (const auto e : routing.experts()) {
      detail::require(e >= 0 && e < emax, op, "expert id must be in [0, ", emax, "), got ", e);
    }
  }

  /// The fire thresholds `sigmoid(tau theta_e)`, computed exactly as `route` does, in the
  /// first `max_experts` entries of a slot scratch of `3 * max_experts`.
  S* slot_thresholds() {
    const Index emax = max_experts();
    S* const threshold = slot_scratch_.data(3 * emax);
    const S tau = temperature();
    for (Index e = 0; e < emax; ++e) threshold[e] = sigmoid(tau * thresholds_[e]);
    return threshold;
  }

  // The checked write of set_gate_embeddings / set_router.
  void set_embeddings(const char* setter, const ConstRows<S>& w, WeightLayout layout) {
    const detail::WeightName name{"gate embeddings", -1, "model_dim", "max_experts"};
    detail::check_weight_shape(kOp, setter, name, model_dim(), max_experts(), w.rows(), w.cols(),
                               layout);
    detail::check_weights_finite(kOp, setter, name, w);
    if (layout == WeightLayout::kOutIn) {
      embeddings_ = w.transpose();
    } else {
      embeddings_ = w;
    }
  }

  void ensure_grads() {
    const Index d = model_dim();
    const Index emax = max_experts();
    if (grad_embeddings_.rows() != d || grad_embeddings_.cols() != emax) {
      grad_embeddings_ = RowMatrix<S>::Zero(d, emax);
    }
    if (grad_thresholds_.size() != emax) grad_thresholds_ = Vector<S>::Zero(emax);
  }

  Options options_;
  S temperature_ = S(1);      // the fixed tau
  S log_temperature_ = S(0);  // log_t, the parameter with trainable_temperature
  RowMatrix<S> embeddings_;   // (model_dim, max_experts)
  Vector<S> thresholds_;      // (max_experts)
  Vector<S> mask_;            // (max_experts), 0 or 1
  // Training state: gradients (allocated lazily) and backward scratch.
  RowMatrix<S> grad_embeddings_;  // (model_dim, max_experts)
  Vector<S> grad_thresholds_;     // (max_experts)
  S grad_log_temperature_ = S(0);
  detail::Buffer<S> slot_scratch_;   // (3 * max_experts)
  detail::Buffer<S> wn_scratch_;     // (2 * max_experts, model_dim)
  detail::Buffer<S> token_scratch_;  // (2 T max_experts + T + token blocks)
  // Adaptive process (ALGORITHMS.md 1.6).
  std::vector<Index> record_tokens_;  // R_E (max_experts)
  Vector<S> record_unrouted_;         // R_S (model_dim)
  bool recording_ = false;
  std::int64_t forwards_ = 0;  // training forwards counted by on_training_forward
};

}  // namespace moet
