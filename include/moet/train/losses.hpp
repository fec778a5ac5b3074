#pragma once
/// \file train/losses.hpp
/// Auxiliary routing losses and THOR's consistency loss, as free functions: each returns the
/// loss value (accumulated in double) and **adds** its gradient into caller buffers (the caller
/// zeroes them; several losses may add into the same buffer). Coefficients are option structs
/// with the papers' defaults. Formulas and sources: ALGORITHMS.md §2.2 (top-p), §4.2 (THOR),
/// §5 (baselines). DynMoE's losses live in train/top_any_losses.hpp.
///
/// Where the gradient goes (see concepts.hpp, `SoftmaxLossGrad`):
/// | loss                  | input                        | adds into, then pass as            |
/// |-----------------------|------------------------------|------------------------------------|
/// | `load_balance_loss`   | `Routing` (plan, `probs()`)  | `d_probs` (T, E): `d_probs`        |
/// | `router_z_loss`       | logits `z` (T, E)            | `d_logits` (T, E): `d_logits`      |
/// | `router_entropy_loss` | probabilities `P` (T, E)     | `d_probs` (T, E): `d_probs`        |
/// | `importance_loss`     | `Routing` (combine weights)  | `d_weights` (assignments)          |
/// | `noisy_load_loss`     | `z`, `n`, `eps` (T, E) each  | `d_logits`; `d_noise_logits`       |
/// | `consistency_loss`    | two logits matrices (T, V)   | `d0`, `d1` (T, V), e.g. dL/dy     |
///
/// Token means divide by the number of valid tokens: `valid` (one byte per token, 0 = pad) is
/// optional in every option struct that has it; pads contribute nothing and get no gradient,
/// and a batch with no valid token gives 0. All losses run serially in a fixed order except
/// `consistency_loss` (fixed row blocks, partial sums added in block order): the same bits for
/// any thread count. Each call allocates a little scratch (`O(E)` values; `consistency_loss`
/// `O(threads * V)`): these are per-step functions, not per-token kernels.
///
/// ```cpp
/// RowMatrix<float> d_probs = RowMatrix<float>::Zero(T, E);
/// const auto opts = moet::LoadBalanceOptions::switch_options();
/// double lb = moet::load_balance_loss<float>(plan, d_probs, opts);
/// gate.backward(x, ctx, plan, d_weights, {.d_probs = {d_probs.data(), std::size_t(T * E)}}, dx);
/// ```

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <span>
#include <vector>

#include "moet/detail/parallel.hpp"
#include "moet/detail/select.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

namespace detail {

/// Throws `Error` naming `op` unless `m` is `(rows, cols)`.
template <class M>
void require_shape(const char* op, const char* name, const M& m, Index rows, Index cols) {
  require(m.rows() == rows && m.cols() == cols, op, name, " must be (", rows, ", ", cols,
          "), got (", m.rows(), ", ", m.cols(), ")");
}

/// Throws `Error` naming `op` unless `valid` is empty or has `num_tokens` entries; returns the
/// number of valid tokens.
inline Index count_valid(const char* op, std::span<const std::uint8_t> valid, Index num_tokens) {
  if (valid.empty()) return num_tokens;
  require(static_cast<Index>(valid.size()) == num_tokens, op,
          "valid must be empty or have one entry per token (", num_tokens, "), got ", valid.size());
  Index n = 0;
  for (const std::uint8_t v : valid) n += v != 0 ? 1 : 0;
  return n;
}

inline bool is_valid(std::span<const std::uint8_t> valid, Index t) {
  return valid.empty() || valid[static_cast<std::size_t>(t)] != 0;
}

/// Throws `Error` naming `op` unless every entry of `m` is finite.
template <class M>
void require_finite(const char* op, const char* name, const M& m) {
  if (all_finite(m)) return;
  for (Index t = 0; t < m.rows(); ++t) {
    for (Index e = 0; e < m.cols(); ++e) {
      require(std::isfinite(m(t, e)), op, name, " must be finite, got ", m(t, e), " at (", t, ", ",
              e, ")");
    }
  }
}

/// `CV^2 = Var / (mean^2 + 1e-10)` of `v` (population variance, tensor2tensor's `cv_squared`)
/// and its gradient `grad[e] = dCV^2/dv_e`. A single value gives 0 (t2t returns 0 for n = 1).
inline double cv_squared(const std::vector<double>& v, std::vector<double>& grad) {
  const auto n = static_cast<double>(v.size());
  grad.assign(v.size(), 0.0);
  if (v.size() <= 1) return 0.0;
  double mean = 0.0;
  for (const double x : v) mean += x;
  mean /= n;
  double var = 0.0;
  for (const double x : v) var += (x - mean) * (x - mean);
  var /= n;
  const double denom = mean * mean + 1e-10;
  for (std::size_t e = 0; e < v.size(); ++e) {
    grad[e] = 2.0 * (v[e] - mean) / n / denom - var * 2.0 * mean / n / (denom * denom);
  }
  return var / denom;
}

/// Standard normal CDF and density.
inline double normal_cdf(double u) { return 0.5 * std::erfc(-u / std::numbers::sqrt2); }
inline double normal_pdf(double u) {
  return std::exp(-0.5 * u * u) / std::sqrt(2.0 * std::numbers::pi);
}

/// Probabilities below this are clamped inside logarithms (`log 0` guard).
inline constexpr double kLogFloor = 1e-30;

}  // namespace detail

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

/// Switch load balance `L_b = alpha * E * sum_e f_e * Pbar_e` (ALGORITHMS.md §5.3), where
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

/// Router z-loss (ST-MoE, ALGORITHMS.md §5.4) `L_z = c_z * mean_t (logsumexp_e z_{t,e})^2` of
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
  /// Coefficient `beta`; Huang et al. 2024 use 1e-4 (secondary sources, ALGORITHMS.md §2.2).
  double beta = 1e-4;
  /// Optional per-token validity (0 = pad).
  std::span<const std::uint8_t> valid{};
};

/// Huang et al.'s dynamic loss `L_d = beta * mean_t (-sum_e P_{t,e} log P_{t,e})`, the entropy
/// of each token's routing distribution averaged over the valid tokens (ALGORITHMS.md §2.2;
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

// --- Noisy top-k importance and load losses ---------------------------------------------------

/// Options of `importance_loss`.
struct ImportanceLossOptions {
  /// Coefficient `w_importance`; 0.1 is the commonly quoted value for Shazeer et al. 2017
  /// (unverified; tensor2tensor uses a 1e-2 `loss_coef`).
  double w_importance = 0.1;
};

/// Shazeer et al.'s importance loss `L_imp = w_importance * CV(Importance)^2`,
/// `Importance_e = sum_t G_{t,e}` with `G` the plan's combine weights (ALGORITHMS.md §5.2),
/// `CV^2 = Var / (mean^2 + 1e-10)` over the `E` experts with the population variance
/// (tensor2tensor). Adds `dL/dG` per assignment into `d_weights`
/// (`routing.num_assignments()` values, routing order): pass it as
/// `SoftmaxLossGrad::d_weights` (to `MoELayer::backward` or the gate's `backward`; or sum it
/// into the gate's `d_weights` yourself), which carries it through `softmax(H)` to `W_r` and
/// `W_noise`. Returns `L_imp`. Throws `Error` naming `importance_loss` on a size mismatch
/// or an out-of-range expert id.
template <class S>
double importance_loss(const Routing<S>& routing, std::span<S> d_weights,
                       const ImportanceLossOptions& options = {}) {
  constexpr const char* op = "importance_loss";
  detail::require(static_cast<Index>(d_weights.size()) == routing.num_assignments(), op,
                  "d_weights must have one entry per assignment (", routing.num_assignments(),
                  "), got ", d_weights.size());
  const Index num_experts = routing.num_experts();
  const auto experts = routing.experts();
  const auto weights = routing.weights();
  std::vector<double> importance(static_cast<std::size_t>(num_experts), 0.0);
  for (std::size_t a = 0; a < experts.size(); ++a) {
    detail::require(experts[a] >= 0 && experts[a] < num_experts, op, "routing expert id ",
                    experts[a], " at assignment ", a, " is outside [0, ", num_experts, ")");
    importance[static_cast<std::size_t>(experts[a])] += static_cast<double>(weights[a]);
  }
  std::vector<double> grad;
  const double cv2 = detail::cv_squared(importance, grad);
  for (std::size_t a = 0; a < experts.size(); ++a) {
    d_weights[a] +=
        static_cast<S>(options.w_importance * grad[static_cast<std::size_t>(experts[a])]);
  }
  return options.w_importance * cv2;
}

/// Options of `noisy_load_loss`.
struct NoisyLoadLossOptions {
  /// Experts per token `k` of the noisy top-k gate, `1 <= k <= num_experts`.
  Index k = 2;
  /// Coefficient `w_load`; 0.1 is the commonly quoted value (unverified; t2t: 1e-2).
  double w_load = 0.1;
};

/// Shazeer et al.'s load loss `L_load = w_load * CV(Load)^2` (ALGORITHMS.md §5.2):
/// ```
/// H_{t,e}    = z_{t,e} + eps_{t,e} * softplus(n_{t,e})          (the gate's noisy scores)
/// Load_e     = sum_t Phi((z_{t,e} - kth_excl(H_t, k, e)) / softplus(n_{t,e}))
/// ```
/// with `kth_excl(H_t, k, e)` the k-th largest entry of `H_t` leaving `e` out: the (k+1)-th
/// largest of `H_t` when `e` is in the top-k of `H_t` (ties to the lower id, as the gate
/// selects), else the k-th; when `k = E` an expert in the top-k has no such entry and its
/// probability is 1. Inputs `(num_tokens, num_experts)` each: the clean logits `z`
/// (`TopKGate::logits`), the noise logits `n = x W_noise` and the draws `eps`
/// (`TopKGate::noise_logits`); `H` is recomputed here exactly as the gate does. The gradient
/// flows, as in tensor2tensor, into `z_{t,e}`, `n_{t,e}` (through the softplus scale) and the
/// threshold entry `H_{t,j}` (to `z_{t,j}` and, through `eps softplus(n)`, `n_{t,j}`); the
/// in/out decision is held fixed. Adds dL/dz into `d_logits` (pass as
/// `SoftmaxLossGrad::d_logits`) and dL/dn into `d_noise_logits` (pass as
/// `SoftmaxLossGrad::d_noise_logits`, or to `TopKGate::backward_noise_logits`); returns
/// `L_load`. Throws `Error` naming
/// `noisy_load_loss` on a shape mismatch, a bad `k` or non-finite input.
template <class S>
double noisy_load_loss(const ConstRows<S>& logits, const ConstRows<S>& noise_logits,
                       const ConstRows<S>& noise_eps, Rows<S> d_logits, Rows<S> d_noise_logits,
                       const NoisyLoadLossOptions& options) {
  constexpr const char* op = "noisy_load_loss";
  const Index num_tokens = logits.rows();
  const Index num_experts = logits.cols();
  detail::require_shape(op, "noise_logits", noise_logits, num_tokens, num_experts);
  detail::require_shape(op, "noise_eps", noise_eps, num_tokens, num_experts);
  detail::require_shape(op, "d_logits", d_logits, num_tokens, num_experts);
  detail::require_shape(op, "d_noise_logits", d_noise_logits, num_tokens, num_experts);
  detail::require(options.k >= 1 && options.k <= num_experts, op,
                  "k must be in [1, num_experts = ", num_experts, "], got ", options.k);
  detail::require_finite(op, "logits", logits);
  detail::require_finite(op, "noise_logits", noise_logits);
  detail::require_finite(op, "noise_eps", noise_eps);
  const Index k = options.k;
  const auto E = static_cast<std::size_t>(num_experts);
  std::vector<S> h(E);
  std::vector<std::int32_t> order(E);
  // u_{t,e} and the threshold's owner j (-1: no threshold, probability 1), per token.
  std::vector<double> u(E);
  std::vector<std::int32_t> owner(E);
  const auto softplus = [](double v) { return detail::softplus(v); };
  const auto sigmoid = [](double v) {
    return v >= 0.0 ? 1.0 / (1.0 + std::exp(-v)) : std::exp(v) / (1.0 + std::exp(v));
  };

  // Pass 1: Load_e.
  std::vector<double> load(E, 0.0);
  const auto token_terms = [&](Index t) {
    for (Index e = 0; e < num_experts; ++e) {
      // As TopKGate::route: H = z + eps * softplus(n), in S.
      h[static_cast<std::size_t>(e)] =
          logits(t, e) + noise_eps(t, e) * detail::softplus(noise_logits(t, e));
    }
    detail::top_k_descending(h.data(), num_experts, std::min(k + 1, num_experts), order.data());
    for (Index e = 0; e < num_experts; ++e) {
      bool in_top = false;
      for (Index j = 0; j < k; ++j) in_top = in_top || order[static_cast<std::size_t>(j)] == e;
      const Index pos = in_top ? k : k - 1;
      const auto ue = static_cast<std::size_t>(e);
      if (pos >= num_experts) {
        owner[ue] = -1;
        u[ue] = std::numeric_limits<double>::infinity();
        continue;
      }
      const std::int32_t j = order[static_cast<std::size_t>(pos)];
      owner[ue] = j;
      const double sd = softplus(static_cast<double>(noise_logits(t, e)));
      u[ue] = (static_cast<double>(logits(t, e)) -
               static_cast<double>(h[static_cast<std::size_t>(j)])) /
              sd;
    }
  };
  for (Index t = 0; t < num_tokens; ++t) {
    token_terms(t);
    for (std::size_t e = 0; e < E; ++e) load[e] += owner[e] < 0 ? 1.0 : detail::normal_cdf(u[e]);
  }
  std::vector<double> grad;
  const double cv2 = detail::cv_squared(load, grad);

  // Pass 2: dL/dz and dL/dn.
  for (Index t = 0; t < num_tokens; ++t) {
    token_terms(t);
    for (Index e = 0; e < num_experts; ++e) {
      const auto ue = static_cast<std::size_t>(e);
      if (owner[ue] < 0) continue;
      const double n_e = static_cast<double>(noise_logits(t, e));
      const double sd = softplus(n_e);
      const double a = options.w_load * grad[ue] * detail::normal_pdf(u[ue]);  // dL/du
      // u = (z_e - H_j) / sd_e.
      d_logits(t, e) += static_cast<S>(a / sd);
      d_noise_logits(t, e) += static_cast<S>(-a * u[ue] / sd * sigmoid(n_e));
      const std::int32_t j = owner[ue];
      const double d_h = -a / sd;  // dL/dH_j, H_j = z_j + eps_j softplus(n_j)
      const double n_j = static_cast<double>(noise_logits(t, j));
      d_logits(t, j) += static_cast<S>(d_h);
      d_noise_logits(t, j) +=
          static_cast<S>(d_h * static_cast<double>(noise_eps(t, j)) * sigmoid(n_j));
    }
  }
  return options.w_load * cv2;
}

// --- THOR consistency -------------------------------------------------------------------------

/// Options of `consistency_loss`.
struct ConsistencyOptions {
  /// Coefficient `alpha`; THOR's default `consistency_alpha` is 1.0 (its IWSLT'14 script uses
  /// 5.0).
  double alpha = 1.0;
  /// Optional per-row validity (0 = pad row, e.g. a pad target token): skipped.
  std::span<const std::uint8_t> valid{};
};

/// THOR's consistency regulariser (Zuo et al. 2022, ALGORITHMS.md §4.2):
/// `CR = alpha * 1/2 * sum_rows sum_v (p_v - q_v)(log p_v - log q_v)` with `p = softmax(a)`,
/// `q = softmax(b)` per row of the two logits matrices `logits0 = a`, `logits1 = b`
/// `(rows, V)` (rows = tokens; THOR sums over non-pad target tokens, so scale `alpha` by
/// `1 / rows` for a mean). This is `1/2 (KL(p||q) + KL(q||p))` per row. Softmax and logs are
/// computed here in double, `log p` as `max(a - logsumexp(a), log 1e-30)` (the log-0 guard:
/// clamping `p` at 1e-30). Both sides get gradients (no stop-gradient), the exact gradient of
/// the guarded formula (a clamped log contributes no gradient): with `g = (lp - lq) / 2` and
/// `r = (p - q) / 2` on the unclamped entries (0 on clamped ones),
/// `dL/da = alpha (p (g - <p, g>) + r - p sum r)`, symmetrically for `b` with signs flipped.
/// Adds them into `d0` and `d1` (same shape) and returns `CR`. Runs in parallel over fixed row
/// blocks (same bits for any thread count). Throws `Error` naming `consistency_loss` on a
/// shape mismatch or a non-finite logit.
template <class S>
double consistency_loss(const ConstRows<S>& logits0, const ConstRows<S>& logits1, Rows<S> d0,
                        Rows<S> d1, const ConsistencyOptions& options = {}) {
  constexpr const char* op = "consistency_loss";
  const Index rows = logits0.rows();
  const Index cols = logits0.cols();
  detail::require_shape(op, "logits1", logits1, rows, cols);
  detail::require_shape(op, "d0", d0, rows, cols);
  detail::require_shape(op, "d1", d1, rows, cols);
  detail::require_finite(op, "logits0", logits0);
  detail::require_finite(op, "logits1", logits1);
  detail::count_valid(op, options.valid, rows);
  if (rows == 0 || cols == 0) return 0.0;
  constexpr Index kBlock = 32;  // rows per task (fixed: thread-count independent)
  const Index num_blocks = (rows + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<std::size_t>(num_blocks), 0.0);
  const double log_floor = std::log(detail::kLogFloor);
  const double alpha = options.alpha;
  // Per-thread row work arrays, allocated before the region: log p, log q, p, q (cols each).
  std::vector<double> work(static_cast<std::size_t>(detail::max_threads() * 4 * cols));
  detail::parallel_for(num_blocks, [&](Index b) {
    double* lp = work.data() +
                 static_cast<std::size_t>(detail::thread_id()) * static_cast<std::size_t>(4 * cols);
    double* lq = lp + cols;
    double* p = lq + cols;
    double* q = p + cols;
    const auto log_softmax = [&](const S* z, double* lz, double* pz) {
      double max = static_cast<double>(z[0]);
      for (Index v = 1; v < cols; ++v) max = std::max(max, static_cast<double>(z[v]));
      double sum = 0.0;
      for (Index v = 0; v < cols; ++v) sum += std::exp(static_cast<double>(z[v]) - max);
      const double lse = max + std::log(sum);
      for (Index v = 0; v < cols; ++v) {
        lz[v] = static_cast<double>(z[v]) - lse;
        pz[v] = std::exp(lz[v]);
      }
    };
    double acc = 0.0;
    const Index end = std::min(rows, (b + 1) * kBlock);
    for (Index t = b * kBlock; t < end; ++t) {
      if (!detail::is_valid(options.valid, t)) continue;
      log_softmax(logits0.data() + t * logits0.outerStride(), lp, p);
      log_softmax(logits1.data() + t * logits1.outerStride(), lq, q);
      double row = 0.0;
      double pg = 0.0, qg = 0.0, rp = 0.0, rq = 0.0;
      for (Index v = 0; v < cols; ++v) {
        const double lpv = std::max(lp[v], log_floor);
        const double lqv = std::max(lq[v], log_floor);
        const double g = 0.5 * (lpv - lqv);
        row += (p[v] - q[v]) * g;
        pg += p[v] * g;
        qg += q[v] * g;
        if (lp[v] >= log_floor) rp += 0.5 * (p[v] - q[v]);
        if (lq[v] >= log_floor) rq += 0.5 * (p[v] - q[v]);
      }
      acc += row;
      S* da = d0.data() + t * d0.outerStride();
      S* db = d1.data() + t * d1.outerStride();
      for (Index v = 0; v < cols; ++v) {
        const double g = 0.5 * (std::max(lp[v], log_floor) - std::max(lq[v], log_floor));
        const double r = 0.5 * (p[v] - q[v]);
        // a: dL/dp = g, dL/dlp = r (unclamped); b: dL/dq = -g, dL/dlq = -r (unclamped).
        const double ga = p[v] * (g - pg) + (lp[v] >= log_floor ? r : 0.0) - p[v] * rp;
        const double gb = q[v] * (-g + qg) - (lq[v] >= log_floor ? r : 0.0) + q[v] * rq;
        da[v] += static_cast<S>(alpha * ga);
        db[v] += static_cast<S>(alpha * gb);
      }
    }
    partial[static_cast<std::size_t>(b)] = acc;
  });
  double loss = 0.0;
  for (const double v : partial) loss += v;
  return alpha * loss;
}

}  // namespace moet
