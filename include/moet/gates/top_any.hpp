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

#include <Eigen/Core>
#include <Eigen/QR>

#include "moet/context.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/rng.hpp"
#include "moet/detail/select.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// Which DynMoE implementation `TopAnyGate` follows where the two public ones differ
/// (ALGORITHMS.md 1.9). In the forward pass they differ only in the eval fallback weight; the
/// weight gradient and the auxiliary loss set (a later training feature) differ too.
enum class TopAnyVariant {
  /// The DeepSpeed-0.9.5 copy (recommended by the DynMoE README): a token that activates no
  /// expert in eval goes to its best expert with weight 1.
  kDeepSpeed,
  /// The Tutel copy (`EMoE/tutel`, GLUE and vision experiments): the fallback weight is the raw
  /// sigmoid score `s[t, e]` of the chosen expert when no token of the batch activates two or
  /// more experts, and 1 otherwise.
  kTutel,
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

/// DynMoE top-any gate (Guo et al., ICLR 2025, arXiv 2405.14297), forward pass.
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
/// Not here yet (a later issue): the straight-through backward, the auxiliary losses, the
/// routing records and the adaptive add/remove of experts (ALGORITHMS.md 1.3-1.6), and the
/// Tutel `gated_multi_gate_t` variant's trainable temperature (`tau = exp(min(log_t, log 100))`,
/// starting at 10). The state above is laid out for them: `gate_embeddings()`, `thresholds()`
/// and `set_temperature()` are what training updates, `set_expert_active()` what the adaptive
/// process switches.
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
    /// Logit scale `tau`, finite and > 0. 1 in DeepSpeed and Tutel `gated_multi_gate`.
    S temperature = S(1);
    /// Seed of the orthogonal gate embedding initialisation.
    std::uint64_t init_seed = 0;
  };

  /// Norm floor of `F.normalize` (PyTorch's default `eps`), applied to tokens and embeddings.
  static constexpr S kNormEps = S(1e-12);
  /// Tokens per routing task: fixed, so the split never depends on the thread count.
  static constexpr Index kTokenBlock = 256;

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
    const Index emax = options_.max_experts;
    temperature_ = options_.temperature;
    embeddings_ =
        detail::orthogonal_gate_embeddings<S>(options_.model_dim, emax, options_.init_seed);
    thresholds_ = Vector<S>::Zero(emax);
    mask_ = Vector<S>::Zero(emax);
    mask_.head(options_.num_experts).setOnes();
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
  /// The non-const reference lets training update them in place; keep the shape (`route`
  /// checks it) and the values finite.
  const RowMatrix<S>& gate_embeddings() const { return embeddings_; }
  RowMatrix<S>& gate_embeddings() { return embeddings_; }
  /// The same matrix as `gate_embeddings()`, under the name every gate's router weights have.
  const RowMatrix<S>& router() const { return embeddings_; }
  RowMatrix<S>& router() { return embeddings_; }
  /// Replaces the gate embeddings; throws `moet::Error` unless `w` is `(model_dim, max_experts)`
  /// and finite.
  void set_gate_embeddings(const ConstRows<S>& w) {
    detail::require(w.rows() == model_dim() && w.cols() == max_experts(), kOp,
                    "gate embeddings must be (", model_dim(), ", ", max_experts(), "), got (",
                    w.rows(), ", ", w.cols(), ")");
    detail::require(detail::all_finite(w), kOp, "gate embeddings must be finite");
    embeddings_ = w;
  }

  /// Thresholds `theta` `(max_experts)`: expert `e` fires iff `sigmoid(tau cos) >
  /// sigmoid(tau theta_e)`. The non-const reference lets training update them in place.
  const Vector<S>& thresholds() const { return thresholds_; }
  Vector<S>& thresholds() { return thresholds_; }
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

  /// The logit scale `tau`.
  S temperature() const { return temperature_; }
  /// Sets `tau` (for the trainable-temperature variant); throws `moet::Error` unless it is
  /// finite and > 0.
  void set_temperature(S tau) {
    check_temperature(tau);
    temperature_ = tau;
  }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out` (see the class comment).
  /// Fills `out.probs_mut()` with the masked sigmoid scores `s` `(num_tokens, max_experts)`
  /// (not a distribution) and sets `out.live_experts = num_active()`. Throws `moet::Error`
  /// when `x` has the wrong width or a non-finite entry, when the state was given a wrong
  /// shape or non-finite values through the non-const accessors, or when a score is not finite
  /// (an overflowing token norm); `out` is then unspecified.
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    const Index d = model_dim();
    const Index emax = max_experts();
    detail::require(x.cols() == d, kOp, "x must have model_dim = ", d, " columns, got ", x.cols());
    detail::require(embeddings_.rows() == d && embeddings_.cols() == emax, kOp,
                    "gate embeddings must be (", d, ", ", emax, "), got (", embeddings_.rows(),
                    ", ", embeddings_.cols(), ")");
    detail::require(thresholds_.size() == emax, kOp, "thresholds must have ", emax,
                    " entries, got ", thresholds_.size());
    detail::require(detail::all_finite(embeddings_), kOp, "gate embeddings must be finite");
    detail::require(detail::all_finite(thresholds_), kOp, "thresholds must be finite");
    detail::require(detail::all_finite(x), kOp, "x must be finite (found NaN or Inf)");

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
    const S tau = temperature_;
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

 private:
  static constexpr const char* kOp = "TopAnyGate";

  static S sigmoid(S z) { return S(1) / (S(1) + std::exp(-z)); }

  static void check_temperature(S tau) {
    detail::require(std::isfinite(tau) && tau > S(0), kOp,
                    "temperature must be finite and > 0, got ", tau);
  }

  Options options_;
  S temperature_ = S(1);
  RowMatrix<S> embeddings_;  // (model_dim, max_experts)
  Vector<S> thresholds_;     // (max_experts)
  Vector<S> mask_;           // (max_experts), 0 or 1
};

}  // namespace moet
