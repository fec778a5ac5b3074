#pragma once
/// \file train/relu_routing.hpp
/// ReMoE's sparsity control for `ReluGate` (Wang et al., arXiv 2412.14711; docs/algorithms.md
/// §16): the load-balanced L1 regulariser of the ReLU scores and the adaptive coefficient that
/// drives the mean experts per token to a target.
///
/// ```cpp
/// moet::ReluSparsityController control({.target_k = 2, .num_experts = 8});
/// // per step and MoE layer, after forward_train:
/// RowMatrix<float> d_r = RowMatrix<float>::Zero(T, E);
/// loss += moet::relu_l1_loss<float>(ws.routing, d_r, {.target_k = 2, .coefficient =
///                                                      control.coefficient()});
/// control.record(ws.routing);
/// layer.backward(x, dy, ctx, ws, dx, {.d_probs = {d_r.data(), std::size_t(T * E)}});
/// // after the optimiser step:
/// control.update();   // lambda *= 1.2 when too dense, /= 1.2 otherwise
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

/// Options of `relu_l1_loss`.
struct ReluL1Options {
  /// The target experts per token `k` of `f_e`, in `(0, num_experts]`.
  double target_k = 1.0;
  /// The coefficient `lambda` (from `ReluSparsityController::coefficient()`), >= 0, finite.
  double coefficient = 1.0;
  /// Optional per-token validity (0 = pad).
  std::span<const std::uint8_t> valid{};
};

/// ReMoE's load-balanced L1 regulariser of the ReLU scores `R = routing.probs()` (a
/// `ReluGate` plan), `lambda · L1` with
///
///     f_e = E / (k T) · #{t : R[t, e] > 0}        (a count: no gradient)
///     L1  = (1 / T) Σ_t Σ_e f_e R[t, e]            (T: valid tokens)
///
/// Adds `dL/dR[t, e] = lambda f_e / T` into `d_probs` `(num_tokens, num_experts)` for every
/// valid token (the gate's backward keeps it where `R > 0`); returns `lambda · L1` (double).
/// Serial, in a fixed order: the same bits for any thread count. Throws `Error` naming
/// `relu_l1_loss` on a shape mismatch, a negative or non-finite score, or bad options.
template <class S>
double relu_l1_loss(const Routing<S>& routing, Rows<S> d_probs, const ReluL1Options& options) {
  constexpr const char* op = "relu_l1_loss";
  const auto r = routing.probs();
  const Index num_tokens = routing.num_tokens();
  const Index num_experts = routing.num_experts();
  detail::require_shape(op, "routing.probs()", r, num_tokens, num_experts);
  detail::require_shape(op, "d_probs", d_probs, num_tokens, num_experts);
  detail::require(options.target_k > 0.0 && options.target_k <= static_cast<double>(num_experts),
                  op, "target_k must be in (0, num_experts = ", num_experts, "], got ",
                  options.target_k);
  detail::require(std::isfinite(options.coefficient) && options.coefficient >= 0.0, op,
                  "coefficient must be finite and >= 0, got ", options.coefficient);
  detail::require_finite(op, "routing.probs()", r);
  detail::require((r.array() >= S(0)).all(), op,
                  "routing.probs() must be ReLU scores (>= 0): use a ReluGate plan");
  const Index n_valid = detail::count_valid(op, options.valid, num_tokens);
  if (n_valid == 0) return 0.0;
  std::vector<double> f(static_cast<std::size_t>(num_experts), 0.0);
  for (Index t = 0; t < num_tokens; ++t) {
    if (!detail::is_valid(options.valid, t)) continue;
    for (Index e = 0; e < num_experts; ++e) f[static_cast<std::size_t>(e)] += r(t, e) > S(0);
  }
  const double inv_t = 1.0 / static_cast<double>(n_valid);
  for (auto& v : f) v *= static_cast<double>(num_experts) / options.target_k * inv_t;
  double l1 = 0.0;
  for (Index t = 0; t < num_tokens; ++t) {
    if (!detail::is_valid(options.valid, t)) continue;
    for (Index e = 0; e < num_experts; ++e) {
      const double fe = f[static_cast<std::size_t>(e)];
      l1 += fe * static_cast<double>(r(t, e));
      d_probs(t, e) += static_cast<S>(options.coefficient * fe * inv_t);
    }
  }
  return options.coefficient * l1 * inv_t;
}

/// What `ReluSparsityController::update` does when the measured sparsity equals the target.
enum class ReluLambdaTie {
  kDivide,  ///< lambda /= alpha, as ReMoE's code (`>=` against the target).
  kKeep,    ///< lambda unchanged, the paper's `alpha^sign(target - S)`.
};

/// ReMoE's adaptive L1 coefficient: `record` a `ReluGate` plan per MoE layer (and
/// micro-batch), `update` after each optimiser step:
///
///     S      = mean over the recorded plans of 1 − #{R > 0} / (T E)
///     target = 1 − k / E
///     lambda = lambda · alpha   if S < target   (too dense: push harder)
///              lambda / alpha   if S > target   (or S == target with kDivide)
///
/// Not thread-safe (one controller per model, used by the training loop's thread).
class ReluSparsityController {
 public:
  struct Options {
    /// Target experts per token `k`, in `(0, num_experts]`.
    double target_k = 1.0;
    /// Experts per layer `E`, >= 1.
    Index num_experts = 0;
    /// `lambda_0`, > 0 (ReMoE: 1e-8).
    double initial_coefficient = 1e-8;
    /// `alpha`, > 1 (ReMoE: 1.2).
    double alpha = 1.2;
    /// At `S == target`: divide (the code) or keep (the paper).
    ReluLambdaTie tie = ReluLambdaTie::kDivide;
  };

  /// Throws `moet::Error` naming `ReluSparsityController` on options outside their ranges.
  explicit ReluSparsityController(const Options& options)
      : options_(validated(options)), coefficient_(options.initial_coefficient) {}

  const Options& options() const { return options_; }
  /// The current `lambda`.
  double coefficient() const { return coefficient_; }
  /// The mean sparsity of the plans recorded since the last `update` (0 when none).
  double recorded_sparsity() const {
    return records_ == 0 ? 0.0 : sparsity_sum_ / static_cast<double>(records_);
  }

  /// Adds the sparsity `1 − #{R > 0} / (T E)` of `routing` (a `ReluGate` plan; a plan without
  /// tokens is skipped). Throws `Error` when its expert count is not `num_experts`.
  template <class S>
  void record(const Routing<S>& routing) {
    detail::require(routing.num_experts() == options_.num_experts, kOp, "the plan has ",
                    routing.num_experts(), " experts, the controller ", options_.num_experts);
    const Index cells = routing.num_tokens() * routing.num_experts();
    if (cells == 0) return;
    const auto r = routing.probs();
    detail::require(r.size() == cells, kOp, "routing.probs() must be (num_tokens, num_experts)");
    Index active = 0;
    for (Index i = 0; i < cells; ++i) active += r.data()[i] > S(0) ? 1 : 0;
    sparsity_sum_ += 1.0 - static_cast<double>(active) / static_cast<double>(cells);
    ++records_;
  }

  /// Moves `lambda` by the rule above and clears the records; with nothing recorded, leaves it.
  /// Returns the new `lambda`.
  double update() {
    if (records_ > 0) {
      const double s = recorded_sparsity();
      const double target = 1.0 - options_.target_k / static_cast<double>(options_.num_experts);
      if (s < target) {
        coefficient_ *= options_.alpha;
      } else if (s > target || options_.tie == ReluLambdaTie::kDivide) {
        coefficient_ /= options_.alpha;
      }
    }
    sparsity_sum_ = 0.0;
    records_ = 0;
    return coefficient_;
  }

 private:
  static constexpr const char* kOp = "ReluSparsityController";

  static Options validated(const Options& o) {
    detail::require(o.num_experts >= 1, kOp, "num_experts must be >= 1, got ", o.num_experts);
    detail::require(o.target_k > 0.0 && o.target_k <= static_cast<double>(o.num_experts), kOp,
                    "target_k must be in (0, num_experts = ", o.num_experts, "], got ", o.target_k);
    detail::require(std::isfinite(o.initial_coefficient) && o.initial_coefficient > 0.0, kOp,
                    "initial_coefficient must be finite and > 0, got ", o.initial_coefficient);
    detail::require(std::isfinite(o.alpha) && o.alpha > 1.0, kOp,
                    "alpha must be finite and > 1, got ", o.alpha);
    return o;
  }

  Options options_;
  double coefficient_;
  double sparsity_sum_ = 0.0;
  Index records_ = 0;
};

}  // namespace moet
