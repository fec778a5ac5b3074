#pragma once
/// \file train/null_balance.hpp
/// AdaMoE's load-balancing loss for `NullExpertGate` (arXiv 2406.13233; docs/algorithms.md
/// §17): the Switch loss over real and null slots, with the null slots' counts replaced by their
/// mean, so the null experts together take their share without any one of them being pushed.
///
/// ```cpp
/// RowMatrix<float> p_all(T, E + N), d_p_all = RowMatrix<float>::Zero(T, E + N);
/// layer.gate().all_probabilities(x, p_all);
/// loss += moet::null_expert_balance_loss<float>(ws.routing, p_all, d_p_all, {.k = 2});
/// layer.backward(x, dy, ctx, ws, dx, {.d_probs = {d_p_all.data(), std::size_t(d_p_all.size())}});
/// ```

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"
#include "moet/train/loss_checks.hpp"

namespace moet {

/// Options of `null_expert_balance_loss`.
struct NullBalanceOptions {
  /// The picks per token the plan was routed with (the gate's `k`, or the override), >= 1.
  Index k = 2;
  /// Coefficient, >= 0 and finite (0.01: moet's choice, Mixtral's `router_aux_loss_coef`).
  double alpha = 0.01;
  /// Optional per-token validity (0 = pad).
  std::span<const std::uint8_t> valid{};
};

/// AdaMoE's balance loss of a `NullExpertGate` plan `routing` (E real experts) and the
/// probabilities over all slots `probs_all` `(T, E + N)` (`NullExpertGate::all_probabilities`):
///
///     c_e   = picks of real expert e (the plan's assignments)           e < E
///     c~_j  = (k T − Σ_e c_e) / N for every null slot j                  (their mean)
///     f_j   = c~_j / (k T),   P_j = mean_t probs_all[t, j]
///     L     = alpha (E + N) Σ_j f_j P_j                                  (T: valid tokens)
///
/// Adds `dL/dP[t, j] = alpha (E + N) f_j / T` (counts held constant, as Switch's) into
/// `d_probs_all` for every valid token, and returns `L`. Serial and in a fixed order. Throws
/// `Error` naming `null_expert_balance_loss` on shapes that do not match (`N >= 1` columns
/// beyond the plan's `E`), a token with more than `k` real picks, a non-finite probability or
/// bad options.
template <class S>
double null_expert_balance_loss(const Routing<S>& routing, const ConstRows<S>& probs_all,
                                Rows<S> d_probs_all, const NullBalanceOptions& options = {}) {
  constexpr const char* op = "null_expert_balance_loss";
  const Index num_tokens = routing.num_tokens();
  const Index num_real = routing.num_experts();
  const Index n = probs_all.cols();
  detail::require(probs_all.rows() == num_tokens && n > num_real, op,
                  "probs_all must be (num_tokens = ", num_tokens,
                  ", E + N) with N >= 1 beyond E = ", num_real, ", got (", probs_all.rows(), ", ",
                  n, ")");
  detail::require_shape(op, "d_probs_all", d_probs_all, num_tokens, n);
  detail::require(options.k >= 1 && options.k <= n, op, "k must be in [1, E + N = ", n, "], got ",
                  options.k);
  detail::require(std::isfinite(options.alpha) && options.alpha >= 0.0, op,
                  "alpha must be finite and >= 0, got ", options.alpha);
  detail::require_finite(op, "probs_all", probs_all);
  const Index n_valid = detail::count_valid(op, options.valid, num_tokens);
  std::vector<double> f(static_cast<std::size_t>(n), 0.0);
  std::vector<double> mean_p(static_cast<std::size_t>(n), 0.0);
  double real_picks = 0.0;
  for (Index t = 0; t < num_tokens; ++t) {
    detail::require(routing.k(t) <= options.k, op, "token ", t, " has ", routing.k(t),
                    " real experts, more than k = ", options.k);
    if (!detail::is_valid(options.valid, t)) continue;
    for (const std::int32_t e : routing.experts(t)) {
      detail::require(e >= 0 && e < num_real, op, "routing expert id ", e, " is outside [0, ",
                      num_real, ")");
      f[static_cast<std::size_t>(e)] += 1.0;
      real_picks += 1.0;
    }
    for (Index j = 0; j < n; ++j) mean_p[static_cast<std::size_t>(j)] += probs_all(t, j);
  }
  if (n_valid == 0) return 0.0;
  const double picks = static_cast<double>(options.k) * static_cast<double>(n_valid);
  const double null_mean = (picks - real_picks) / static_cast<double>(n - num_real);
  for (Index j = num_real; j < n; ++j) f[static_cast<std::size_t>(j)] = null_mean;
  const double inv_t = 1.0 / static_cast<double>(n_valid);
  const double scale = options.alpha * static_cast<double>(n);
  double loss = 0.0;
  for (std::size_t j = 0; j < f.size(); ++j) {
    f[j] /= picks;
    loss += f[j] * mean_p[j] * inv_t;
  }
  for (Index t = 0; t < num_tokens; ++t) {
    if (!detail::is_valid(options.valid, t)) continue;
    for (Index j = 0; j < n; ++j) {
      d_probs_all(t, j) += static_cast<S>(scale * f[static_cast<std::size_t>(j)] * inv_t);
    }
  }
  return scale * loss;
}

}  // namespace moet
