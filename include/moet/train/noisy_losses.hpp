#pragma once
/// \file train/noisy_losses.hpp
/// Shazeer et al.'s noisy top-k losses (see train/losses.hpp for the table of where each
/// gradient goes): the importance loss on the combine weights (docs/algorithms.md §8.4) and the
/// load loss on the noisy scores (§8.5).

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

// --- Noisy top-k importance and load losses ---------------------------------------------------

/// Options of `importance_loss`.
struct ImportanceLossOptions {
  /// Coefficient `w_importance`; 0.1 is the commonly quoted value for Shazeer et al. 2017
  /// (unverified; tensor2tensor uses a 1e-2 `loss_coef`).
  double w_importance = 0.1;
};

/// Shazeer et al.'s importance loss `L_imp = w_importance * CV(Importance)^2`,
/// `Importance_e = sum_t G_{t,e}` with `G` the plan's combine weights (docs/algorithms.md §8.4),
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

/// Shazeer et al.'s load loss `L_load = w_load * CV(Load)^2` (docs/algorithms.md §8.5):
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

}  // namespace moet
