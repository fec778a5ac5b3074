#pragma once
/// \file train/router_losses.hpp
/// The losses on a softmax router's scores (see train/losses.hpp for the table of where each
/// gradient goes): Switch load balance (docs/algorithms.md §8.1), ST-MoE's router z-loss
/// (§8.2) and top-p's entropy ("dynamic") loss (§8.3).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"
#include "moet/train/loss_checks.hpp"

namespace moet {

// --- Switch load balance ----------------------------------------------------------------------

/// Which assignments count in the load-balance fraction `f_e`.
enum class LoadBalanceCount {
  /// The top-1 choice of each token before any capacity drop (Switch, DeepSpeed top-1 and
  /// top-2), read from the plan as the argmax of `Routing::probs()` (ties to the lower id):
  /// for `TopKGate` without noise, `TopPGate` and `ImportanceGate` this is exactly the first
  /// slot the gate chose, including tokens whose choices were all dropped. (With noisy top-k
  /// in training the gate's first choice is on `H`, not `P`; use the noisy losses there.)
  kTop1,
  /// The plan's first slot, after capacity dropping (tokens with `k = 0` count nowhere).
  kFirstSlot,
  /// Every assignment in the plan (HF Mixtral's all-k variant, `sum_e f_e = k` when dropless;
  /// Huang et al.'s `L_b` for top-p counts all selections). Counted after any capacity drop.
  kAllAssignments,
};

/// Options of `load_balance_loss`.
struct LoadBalanceOptions {
  /// Coefficient `alpha`; Switch uses 1e-2.
  double alpha = 1e-2;
  /// What `f_e` counts.
  LoadBalanceCount count = LoadBalanceCount::kTop1;
  /// Optional per-token validity (0 = pad, excluded from `f` and from the mean of `P`).
  std::span<const std::uint8_t> valid{};

  /// Switch Transformer (Fedus et al. 2021): `alpha = 1e-2`, top-1 before dropping.
  static LoadBalanceOptions switch_options() { return {}; }
  /// HF Mixtral: all k choices, `alpha = 0.02` (`router_aux_loss_coef` of the released config;
  /// the transformers default is 0.001).
  static LoadBalanceOptions mixtral_options() {
    return {.alpha = 0.02, .count = LoadBalanceCount::kAllAssignments};
  }
  /// Huang et al. 2024 (top-p), secondary sources: `alpha = 1e-2`, all selections.
  static LoadBalanceOptions top_p_options() {
    return {.alpha = 1e-2, .count = LoadBalanceCount::kAllAssignments};
  }
};

/// Switch load balance `L_b = alpha * E * sum_e f_e * Pbar_e` (docs/algorithms.md §8.1), where
/// `Pbar_e = mean_t P_{t,e}` over the valid tokens carries the gradient and `f_e` (the fraction
/// of valid tokens counted for expert `e`, see `LoadBalanceCount`) is detached. `E` is
/// `routing.num_experts()`. Adds `dL/dP_{t,e} = alpha * E * f_e / T_valid` into `d_probs`
/// `(num_tokens, num_experts)` (pass it as `SoftmaxLossGrad::d_probs` to the gate's
/// `backward`) and returns `L_b`. With a uniform router and balanced `f` (top-1) it is
/// `alpha`. Throws `Error` naming `load_balance_loss` when the plan has no probabilities,
/// `d_probs` or `valid` has the wrong size, or an expert id is out of range.
template <class S>
double load_balance_loss(const Routing<S>& routing, Rows<S> d_probs,
                         const LoadBalanceOptions& options = {}) {
  constexpr const char* op = "load_balance_loss";
  const Index num_tokens = routing.num_tokens();
  const Index num_experts = routing.num_experts();
  const auto probs = routing.probs();  // (num_tokens, num_experts)
  detail::require_shape(op, "routing.probs()", probs, num_tokens, num_experts);
  detail::require_shape(op, "d_probs", d_probs, num_tokens, num_experts);
  detail::require(options.count == LoadBalanceCount::kTop1 ||
                      options.count == LoadBalanceCount::kFirstSlot ||
                      options.count == LoadBalanceCount::kAllAssignments,
                  op, "count must be kTop1, kFirstSlot or kAllAssignments, got ",
                  static_cast<int>(options.count));
  const Index n_valid = detail::count_valid(op, options.valid, num_tokens);
  for (const std::int32_t e : routing.experts()) {
    detail::require(e >= 0 && e < num_experts, op, "routing expert id ", e, " is outside [0, ",
                    num_experts, ")");
  }
  if (n_valid == 0 || num_experts == 0) return 0.0;

  std::vector<double> f(static_cast<std::size_t>(num_experts), 0.0);
  std::vector<double> mean_p(static_cast<std::size_t>(num_experts), 0.0);
  for (Index t = 0; t < num_tokens; ++t) {
    if (!detail::is_valid(options.valid, t)) continue;
    const S* p = probs.data() + t * num_experts;
    for (Index e = 0; e < num_experts; ++e) mean_p[static_cast<std::size_t>(e)] += p[e];
    if (options.count == LoadBalanceCount::kTop1) {
      Index best = 0;
      for (Index e = 1; e < num_experts; ++e) best = p[e] > p[best] ? e : best;
      f[static_cast<std::size_t>(best)] += 1.0;
    } else {
      const auto experts = routing.experts(t);
      const std::size_t n = options.count == LoadBalanceCount::kFirstSlot
                                ? std::min<std::size_t>(1, experts.size())
                                : experts.size();
      for (std::size_t j = 0; j < n; ++j) f[static_cast<std::size_t>(experts[j])] += 1.0;
    }
  }
  const auto inv = 1.0 / static_cast<double>(n_valid);
  const double scale = options.alpha * static_cast<double>(num_experts);
  double loss = 0.0;
  for (std::size_t e = 0; e < f.size(); ++e) {
    f[e] *= inv;
    loss += f[e] * mean_p[e] * inv;
  }
  for (Index t = 0; t < num_tokens; ++t) {
    if (!detail::is_valid(options.valid, t)) continue;
    for (Index e = 0; e < num_experts; ++e) {
      d_probs(t, e) += static_cast<S>(scale * f[static_cast<std::size_t>(e)] * inv);
    }
  }
  return scale * loss;
}

// --- Router z-loss ----------------------------------------------------------------------------

/// Options of `router_z_loss`.
struct RouterZLossOptions {
  /// Coefficient `c_z`; ST-MoE (Zoph et al. 2022) uses 1e-3.
  double c_z = 1e-3;
  /// Optional per-token validity (0 = pad).
  std::span<const std::uint8_t> valid{};
};

/// Router z-loss (ST-MoE, docs/algorithms.md §8.2) `L_z = c_z * mean_t (logsumexp_e z_{t,e})^2` of
/// the router logits `logits` `(num_tokens, num_experts)`. The gates do not keep their
/// logits, so the caller passes them: `gate.logits(x, z)` recomputes `z = x W_r` with the same
/// bits as `route`. Adds `dL/dz_{t,e} = 2 c_z lse_t softmax(z_t)_e / T_valid` into `d_logits`
/// (same shape; pass it as `SoftmaxLossGrad::d_logits`) and returns `L_z`. Throws `Error`
/// naming `router_z_loss` on a shape mismatch or a non-finite logit.
template <class S>
double router_z_loss(const ConstRows<S>& logits, Rows<S> d_logits,
                     const RouterZLossOptions& options = {}) {
  constexpr const char* op = "router_z_loss";
  const Index num_tokens = logits.rows();
  const Index num_experts = logits.cols();
  detail::require_shape(op, "d_logits", d_logits, num_tokens, num_experts);
  detail::require_finite(op, "logits", logits);
  const Index n_valid = detail::count_valid(op, options.valid, num_tokens);
  if (n_valid == 0 || num_experts == 0) return 0.0;
  const auto inv = 1.0 / static_cast<double>(n_valid);
  double loss = 0.0;
  for (Index t = 0; t < num_tokens; ++t) {
    if (!detail::is_valid(options.valid, t)) continue;
    double max = static_cast<double>(logits(t, 0));
    for (Index e = 1; e < num_experts; ++e) max = std::max(max, static_cast<double>(logits(t, e)));
    double sum = 0.0;
    for (Index e = 0; e < num_experts; ++e)
      sum += std::exp(static_cast<double>(logits(t, e)) - max);
    const double lse = max + std::log(sum);
    loss += lse * lse;
    const double g = 2.0 * options.c_z * lse * inv;
    for (Index e = 0; e < num_experts; ++e) {
      d_logits(t, e) += static_cast<S>(g * std::exp(static_cast<double>(logits(t, e)) - max) / sum);
    }
  }
  return options.c_z * loss * inv;
}

// --- Top-p entropy ("dynamic") loss -----------------------------------------------------------

/// Options of `router_entropy_loss`.
struct EntropyLossOptions {
  /// Coefficient `beta`; Huang et al. 2024 use 1e-4 (secondary sources, docs/algorithms.md §8.3).
  double beta = 1e-4;
  /// Optional per-token validity (0 = pad).
  std::span<const std::uint8_t> valid{};
};

/// Huang et al.'s dynamic loss `L_d = beta * mean_t (-sum_e P_{t,e} log P_{t,e})`, the entropy
/// of each token's routing distribution averaged over the valid tokens (docs/algorithms.md §8.3;
/// the mean over tokens is our choice, the source is secondary). `log` is guarded:
/// `log max(P, 1e-30)`, so `P = 0` contributes 0. Adds the exact gradient of that guarded
/// formula, `dL/dP = -beta (log P + 1) / T_valid` (`-beta log(1e-30) / T_valid` below the
/// floor), into `d_probs` `(num_tokens, num_experts)` (pass it as `SoftmaxLossGrad::d_probs`);
/// `probs` is typically `routing.probs()`. Returns `L_d`. Throws `Error` naming
/// `router_entropy_loss` on a shape mismatch or a probability outside `[0, 1]`.
template <class S>
double router_entropy_loss(const ConstRows<S>& probs, Rows<S> d_probs,
                           const EntropyLossOptions& options = {}) {
  constexpr const char* op = "router_entropy_loss";
  const Index num_tokens = probs.rows();
  const Index num_experts = probs.cols();
  detail::require_shape(op, "d_probs", d_probs, num_tokens, num_experts);
  const Index n_valid = detail::count_valid(op, options.valid, num_tokens);
  for (Index t = 0; t < num_tokens; ++t) {
    for (Index e = 0; e < num_experts; ++e) {
      const S p = probs(t, e);
      detail::require(p >= S(0) && p <= S(1), op, "probs must be in [0, 1], got ", p, " at (", t,
                      ", ", e, ")");
    }
  }
  if (n_valid == 0) return 0.0;
  const auto inv = 1.0 / static_cast<double>(n_valid);
  const double log_floor = std::log(detail::kLogFloor);
  double loss = 0.0;
  for (Index t = 0; t < num_tokens; ++t) {
    if (!detail::is_valid(options.valid, t)) continue;
    for (Index e = 0; e < num_experts; ++e) {
      const auto p = static_cast<double>(probs(t, e));
      const bool floored = p < detail::kLogFloor;
      const double log_p = floored ? log_floor : std::log(p);
      loss -= p * log_p;
      d_probs(t, e) += static_cast<S>(-options.beta * (log_p + (floored ? 0.0 : 1.0)) * inv);
    }
  }
  return options.beta * loss * inv;
}

}  // namespace moet
