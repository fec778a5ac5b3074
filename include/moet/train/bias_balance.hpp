#pragma once
/// \file train/bias_balance.hpp
/// Auxiliary-loss-free load balancing (Wang et al., arXiv 2408.15664; DeepSeek-V3, arXiv
/// 2412.19437): a per-expert score bias that only affects which experts are selected, updated
/// after each training step by the load each expert received, instead of a balance loss in the
/// gradient (docs/algorithms.md §13.5).
///
/// ```cpp
/// moet::LossFreeBalancer<float> balancer({.update_rate = 1e-3});
/// // per step, after forward_train (once per micro-batch when accumulating):
/// balancer.record(ws.routing);
/// // after the optimiser step:
/// balancer.update(layer.gate());   // b_e += u * sign(mean load - load_e), then clears the loads
/// ```
///
/// The gate must select on `scores + bias` and weight by the unbiased scores: `GroupedTopKGate`
/// does (its `score_bias`, DeepSeek-V3's `e_score_correction_bias`), with softmax or sigmoid
/// scores and any grouping (one group for plain top-k).

#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <vector>

#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// A gate with a selection-only score bias: `num_experts()`, `score_bias()` (a `(1,
/// num_experts)` matrix) and `set_score_bias(span)`.
template <class G, class S>
concept ScoreBiasGate = requires(G& gate, const G& cgate, std::span<const S> bias) {
  { cgate.num_experts() } -> std::convertible_to<Index>;
  { cgate.score_bias()(0, 0) } -> std::convertible_to<S>;
  gate.set_score_bias(bias);
};

/// Counts the assignments each expert receives over one or more plans (`record`), then moves
/// each expert's score bias by `update_rate` towards the mean load (`update`):
///
///     load_e = assignments of expert e recorded since the last update
///     b_e   += u * sign(mean_e' load_e' - load_e)            (sign(0) = 0)
///
/// An overloaded expert's bias falls and an underloaded one's rises, so later batches select
/// it less or more often; the combine weights and the gradients do not see the bias. The
/// update is computed in double and stored in the gate's scalar type. Not thread-safe (one
/// balancer per gate, used by the training loop's thread).
template <class S>
class LossFreeBalancer {
 public:
  struct Options {
    /// `u`, the bias update speed (> 0, finite). DeepSeek-V3 uses 1e-3 for most of training
    /// (0 for its last tokens: stop calling `update` there); Wang et al. also 1e-3.
    double update_rate = 1e-3;
  };

  /// Throws `moet::Error` naming `LossFreeBalancer` for a rate that is not positive and finite
  /// in `S`.
  explicit LossFreeBalancer(const Options& options) : options_(options) {
    detail::require(std::isfinite(options_.update_rate) && options_.update_rate > 0.0 &&
                        std::isfinite(static_cast<S>(options_.update_rate)),
                    kOp, "update_rate must be positive and finite in the gate's scalar type, got ",
                    options_.update_rate);
  }

  const Options& options() const { return options_; }

  /// Adds the assignments of `routing` to the loads (after any capacity drop: what the experts
  /// ran). The first plan fixes the number of experts; a plan with another count is a
  /// `moet::Error` (nothing recorded).
  void record(const Routing<S>& routing) {
    const Index num_experts = routing.num_experts();
    if (loads_.empty()) {
      detail::require(num_experts >= 1, kOp, "record: the plan has no experts");
      loads_.assign(static_cast<std::size_t>(num_experts), 0);
    }
    detail::require(num_experts == static_cast<Index>(loads_.size()), kOp,
                    "record: the plan routes over ", num_experts,
                    " experts, the loads so far over ", loads_.size());
    for (const std::int32_t e : routing.experts()) ++loads_[static_cast<std::size_t>(e)];
  }

  /// The assignments per expert recorded since the last update (empty before the first plan).
  std::span<const std::int64_t> loads() const { return {loads_.data(), loads_.size()}; }

  /// Applies `b_e += u * sign(mean load - load_e)` to `gate`'s score bias and clears the loads.
  /// Nothing recorded (or only empty plans): no change. Throws `moet::Error` (gate and loads
  /// unchanged) when the gate's expert count differs from the plans', or when a bias would
  /// leave `S`'s finite range (a huge rate applied many times).
  template <class G>
  requires ScoreBiasGate<G, S>
  void update(G& gate) {
    if (loads_.empty()) return;
    const Index num_experts = gate.num_experts();
    detail::require(num_experts == static_cast<Index>(loads_.size()), kOp, "update: the gate has ",
                    num_experts, " experts, the recorded plans ", loads_.size());
    std::int64_t total = 0;
    for (const std::int64_t load : loads_) total += load;
    if (total > 0) {
      // sign(total / E - load_e) = sign(total - E * load_e): exact in integers.
      const auto bias = gate.score_bias();
      bias_.resize(loads_.size());
      for (std::size_t e = 0; e < loads_.size(); ++e) {
        const std::int64_t diff = total - static_cast<std::int64_t>(num_experts) * loads_[e];
        const double step = diff > 0   ? options_.update_rate
                            : diff < 0 ? -options_.update_rate
                                       : 0.0;
        bias_[e] = static_cast<S>(static_cast<double>(bias(0, static_cast<Index>(e))) + step);
        detail::require(std::isfinite(bias_[e]), kOp, "update: the score bias of expert ", e,
                        " would become ", bias_[e], " (bias ", bias(0, static_cast<Index>(e)),
                        ", update_rate ", options_.update_rate, ")");
      }
      gate.set_score_bias(std::span<const S>(bias_.data(), bias_.size()));
    }
    loads_.assign(loads_.size(), 0);
  }

  /// Forgets the recorded loads (and the expert count they fixed).
  void reset() { loads_.clear(); }

 private:
  static constexpr const char* kOp = "LossFreeBalancer";
  Options options_;
  std::vector<std::int64_t> loads_;
  std::vector<S> bias_;
};

}  // namespace moet
