#pragma once
/// \file train/top_any_losses.hpp
/// DynMoE's auxiliary losses for `TopAnyGate` (Guo et al., ICLR 2025, arXiv 2405.14297;
/// docs/algorithms.md §8.6): diversity, simplicity, load balance and efficiency, returned as values
/// with their gradients.
///
/// How the gradients reach the parameters. Diversity and simplicity depend on the gate
/// embeddings `W` directly: `top_any_aux_loss` **adds** their (scaled) gradient into
/// `gate.gate_embeddings_grad()`. Load balance and efficiency depend on the 0/1
/// straight-through gate matrix `a` `(num_tokens, num_experts)`: the function **adds** dL/da
/// into the caller's `d_gates` buffer, which the caller passes to `TopAnyGate::backward` as
/// `TopAnyLossGrad::d_gates` (the backward takes it through the straight-through chain to `W`,
/// `theta` and `x`). A training step is therefore:
/// ```cpp
/// gate.zero_grad();
/// gate.route(x, ctx, plan);                          // ctx.training = true
/// std::vector<float> d_gates(plan.num_tokens() * gate.num_experts(), 0.0f);
/// const auto aux = moet::top_any_aux_loss(gate, plan, d_gates);   // aux.value is 0.01 l_aux
/// gate.backward(x, ctx, plan, d_weights, {d_gates}, dx);
/// ```

#include <algorithm>
#include <cmath>
#include <span>

#include "moet/errors.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// Options of `top_any_aux_loss`.
template <class S>
struct TopAnyAuxLossOptions {
  /// Multiplies `l_aux` in the returned value and in every gradient (finite, >= 0). DynMoE's
  /// default is 0.01 (`loss = task_loss + 0.01 * sum_layers l_aux`).
  S coefficient = S(0.01);
  /// When false, only the values are computed: no gradient is added to the gate and `d_gates`
  /// may be empty (for eval, where DeepSpeed computes the loss too, or for logging).
  bool accumulate_grad = true;
};

/// The terms of DynMoE's auxiliary loss, unscaled, and the scaled total.
template <class S>
struct TopAnyAuxLoss {
  /// `|| (Wn^T Wn - I) . (m m^T) ||_F` (not squared), over the active slot pairs.
  S diversity = S(0);
  /// `(1 / Emax) sum_e ||W[:, e]||_2` on the raw embeddings, every slot.
  S simplicity = S(0);
  /// `Emax * sum_e me_e ce_e` (0 when no token is routed). Computed for both variants,
  /// included in `value` only for `TopAnyVariant::kDeepSpeed`.
  S load_balance = S(0);
  /// The mean of `a` over all `num_tokens * num_experts` entries (0 for an empty batch).
  /// Computed for both variants, included in `value` only for `kDeepSpeed`.
  S efficiency = S(0);
  /// `coefficient * l_aux`: all four terms for `kDeepSpeed`, diversity + simplicity for
  /// `kTutel` (its scripts use `is_gshard_loss=False`).
  S value = S(0);
};

/// DynMoE's auxiliary loss of `gate` on the plan `routing` it made (docs/algorithms.md §8.6), with
/// the loss set of `gate.variant()`. Notation: `a[t,e]` is 1 for every assignment of the plan
/// (the eval fallback included) and 0 elsewhere, `Wn` the column-normalised embeddings (floor
/// 1e-12 as in the forward), `m` the expert mask, `N` the tokens with at least one expert:
/// ```
/// diversity    = || (Wn^T Wn - I) . (m m^T) ||_F
/// simplicity   = (1/Emax) sum_e ||W[:,e]||_2
/// q[t,e]       = a[t,e] / sum_j a[t,j]   (t in N; differentiable through a)
/// me_e         = mean_{t in N} q[t,e];   ce_e = mean_{t in N} a[t,e]   (ce: no gradient)
/// load_balance = Emax * sum_e me_e ce_e;  efficiency = mean_{t,e} a[t,e]
/// ```
/// With `options.accumulate_grad` (the default) it adds `coefficient * d(diversity +
/// simplicity)/dW` into `gate.gate_embeddings_grad()` (allocating it if needed) and, for
/// `kDeepSpeed`, `coefficient * d(load_balance + efficiency)/da` into `d_gates` `(num_tokens,
/// num_experts)` row-major, every entry (the backward uses only the activated, non-fallback
/// ones); zero `d_gates` before the first loss of a batch. For `kTutel` `d_gates` is left
/// untouched and may be empty. The gradient of a norm at 0 is taken as 0 (as PyTorch does).
/// Serial: the same bits for any thread count. Allocates `O(Emax^2 + d Emax)` scratch per
/// call (once per step, not a hot path).
///
/// Throws `moet::Error` when the plan is not over `gate.num_experts()` experts, when
/// `d_gates` is needed and does not have `num_tokens * num_experts` entries, when
/// `coefficient` is not finite and >= 0, or when the embeddings have the wrong shape.
template <class S>
TopAnyAuxLoss<S> top_any_aux_loss(TopAnyGate<S>& gate, const Routing<S>& routing,
                                  std::span<S> d_gates,
                                  const TopAnyAuxLossOptions<S>& options = {}) {
  static constexpr const char* op = "top_any_aux_loss";
  const Index emax = gate.num_experts();
  const Index d = gate.model_dim();
  const Index num_tokens = routing.num_tokens();
  const S coef = options.coefficient;
  detail::require(std::isfinite(coef) && coef >= S(0), op,
                  "coefficient must be finite and >= 0, got ", coef);
  detail::require(routing.num_experts() == emax, op, "the plan must be over num_experts = ", emax,
                  " experts, got ", routing.num_experts());
  const auto& w = gate.gate_embeddings();  // (model_dim, num_experts)
  detail::require(w.rows() == d && w.cols() == emax, op, "gate embeddings must be (", d, ", ", emax,
                  "), got (", w.rows(), ", ", w.cols(), ")");
  const bool routing_terms = gate.variant() == TopAnyVariant::kDeepSpeed;
  const bool need_d_gates = options.accumulate_grad && routing_terms;
  detail::require(!need_d_gates || static_cast<Index>(d_gates.size()) == num_tokens * emax, op,
                  "d_gates must have num_tokens * num_experts = ", num_tokens * emax,
                  " entries, got ", d_gates.size());
  for (const auto e : routing.experts()) {
    detail::require(e >= 0 && e < emax, op, "expert id must be in [0, ", emax, "), got ", e);
  }
  const auto& mask = gate.expert_mask();
  constexpr S eps = TopAnyGate<S>::kNormEps;
  TopAnyAuxLoss<S> out;

  // Diversity and simplicity, from the raw and normalised columns.
  RowMatrix<S> wn(d, emax);  // (model_dim, num_experts)
  Vector<S> raw_norm(emax);  // (num_experts)
  for (Index e = 0; e < emax; ++e) {
    raw_norm[e] = w.col(e).norm();
    wn.col(e) = w.col(e) / std::max(raw_norm[e], eps);
  }
  RowMatrix<S> m = RowMatrix<S>::Zero(emax, emax);  // (Wn^T Wn - I) on active pairs
  S sum_sq = S(0);
  for (Index i = 0; i < emax; ++i) {
    if (mask[i] == S(0)) continue;
    for (Index j = 0; j < emax; ++j) {
      if (mask[j] == S(0)) continue;
      m(i, j) = wn.col(i).dot(wn.col(j)) - (i == j ? S(1) : S(0));
      sum_sq += m(i, j) * m(i, j);
    }
  }
  out.diversity = std::sqrt(sum_sq);
  S sum_norm = S(0);
  for (Index e = 0; e < emax; ++e) sum_norm += raw_norm[e];
  out.simplicity = sum_norm / static_cast<S>(emax);

  // Load balance and efficiency, from the plan.
  Index routed = 0;                      // |N|
  Vector<S> ce = Vector<S>::Zero(emax);  // tokens of N per expert, then their mean
  Vector<S> me = Vector<S>::Zero(emax);  // sum of q per expert, then the mean
  for (Index t = 0; t < num_tokens; ++t) {
    const Index k = routing.k(t);
    if (k == 0) continue;
    ++routed;
    for (const auto e : routing.experts(t)) {
      ce[e] += S(1);
      me[e] += S(1) / static_cast<S>(k);
    }
  }
  if (routed > 0) {
    ce /= static_cast<S>(routed);
    me /= static_cast<S>(routed);
    out.load_balance = static_cast<S>(emax) * me.dot(ce);
  }
  const Index entries = num_tokens * emax;
  if (entries > 0) {
    out.efficiency = static_cast<S>(routing.num_assignments()) / static_cast<S>(entries);
  }
  out.value = coef * (out.diversity + out.simplicity +
                      (routing_terms ? out.load_balance + out.efficiency : S(0)));
  if (!options.accumulate_grad) return out;

  // dW from diversity: d/dWn_k = (2 / D) sum_j M_kj Wn_j (M symmetric), then through the
  // column normalisation; from simplicity: W_e / (Emax ||W_e||).
  auto& grad_w = gate.gate_embeddings_grad();  // (model_dim, num_experts)
  const S inv_emax = S(1) / static_cast<S>(emax);
  Vector<S> g(d);  // dD/dWn_e, then dD/dW_e
  for (Index e = 0; e < emax; ++e) {
    if (out.diversity > S(0) && mask[e] != S(0)) {
      g.setZero();
      for (Index j = 0; j < emax; ++j) {
        if (m(e, j) != S(0)) g += (S(2) * m(e, j) / out.diversity) * wn.col(j);
      }
      if (raw_norm[e] > eps) {
        const S along = wn.col(e).dot(g);
        g -= along * wn.col(e);
        g /= raw_norm[e];
      } else {
        g /= eps;
      }
      grad_w.col(e) += coef * g;
    }
    if (raw_norm[e] > S(0)) grad_w.col(e) += (coef * inv_emax / raw_norm[e]) * w.col(e);
  }
  if (!routing_terms) return out;

  // d_gates: efficiency gives 1 / (T Emax) everywhere; load balance, for t in N,
  // d/da[t,j] = Emax / (|N| k_t) (ce_j - mean_{e in S_t} ce_e) (through q = a / sum a).
  const S d_efficiency = coef / static_cast<S>(std::max<Index>(entries, 1));
  for (Index t = 0; t < num_tokens; ++t) {
    S* const row = d_gates.data() + t * emax;
    for (Index e = 0; e < emax; ++e) row[e] += d_efficiency;
    const Index k = routing.k(t);
    if (k == 0) continue;
    S mean_ce = S(0);
    for (const auto e : routing.experts(t)) mean_ce += ce[e];
    mean_ce /= static_cast<S>(k);
    const S scale = coef * static_cast<S>(emax) / (static_cast<S>(routed) * static_cast<S>(k));
    for (Index e = 0; e < emax; ++e) row[e] += scale * (ce[e] - mean_ce);
  }
  return out;
}

}  // namespace moet
