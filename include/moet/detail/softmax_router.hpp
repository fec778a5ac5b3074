#pragma once
/// \file detail/softmax_router.hpp
/// The linear softmax router shared by `TopKGate`, `TopPGate` and `ImportanceGate`: the router
/// weights `W_r` `(model_dim, num_experts)`, their deterministic initialisation, the input
/// checks, and `P = softmax(x W_r)` written into `Routing::probs_mut()`. Each gate only adds its
/// own selection rule on top.

#include <atomic>
#include <cmath>
#include <cstdint>

#include "moet/detail/parallel.hpp"
#include "moet/detail/rng.hpp"
#include "moet/detail/select.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet::detail {

/// Tokens per routing task in the gates' per-token passes. Fixed (not derived from the thread
/// count) so that the task split, and therefore every result, is the same for any thread count.
inline constexpr Index kGateTokenBlock = 64;

/// A normal `(rows, cols)` matrix with standard deviation `1 / sqrt(rows)`, drawn row-major from
/// `Rng(seed)`: the router initialisation every softmax gate uses (fan-in scaling, so the logits
/// of a unit-variance token start with unit variance).
template <class S>
RowMatrix<S> normal_fan_in(Index rows, Index cols, std::uint64_t seed) {
  RowMatrix<S> w(rows, cols);  // (rows, cols)
  Rng rng(seed);
  const double scale = rows > 0 ? 1.0 / std::sqrt(static_cast<double>(rows)) : 0.0;
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) w(i, j) = static_cast<S>(rng.normal() * scale);
  }
  return w;
}

/// Throws `Error` naming `op` unless `x` has `model_dim` columns and only finite entries.
template <class S>
void check_gate_input(const char* op, const ConstRows<S>& x, Index model_dim) {
  require(x.cols() == model_dim, op, "x must have model_dim = ", model_dim, " columns, got ",
          x.cols(), " (x is ", x.rows(), " x ", x.cols(), ")");
  if (all_finite(x)) return;
  for (Index t = 0; t < x.rows(); ++t) {
    for (Index c = 0; c < x.cols(); ++c) {
      require(std::isfinite(x(t, c)), op, "x must be finite, got ", x(t, c), " at token ", t,
              ", column ", c);
    }
  }
}

/// The linear softmax router `P = softmax(x W_r)`, computed in `S` (fp32 for a float gate,
/// as DeepSpeed routes).
template <class S>
class SoftmaxRouter {
 public:
  /// `W_r` `(model_dim, num_experts)` drawn by `normal_fan_in(model_dim, num_experts, seed)`.
  SoftmaxRouter(Index model_dim, Index num_experts, std::uint64_t seed)
      : weights_(normal_fan_in<S>(model_dim, num_experts, seed)) {}

  /// The router weights `(model_dim, num_experts)`.
  const RowMatrix<S>& weights() const { return weights_; }
  RowMatrix<S>& weights() { return weights_; }

  /// Resets `out` to `(x.rows(), num_experts)` and writes `P = softmax(x W_r)` into
  /// `out.probs_mut()`, in parallel over fixed token blocks; sets `probs_are_distribution`.
  /// `x` must already have passed `check_gate_input`. `pre_softmax(t, logits)` runs on every
  /// token's logits row `(num_experts)` before the softmax (noisy top-k reads them there) and
  /// returns false when it met a non-finite value. Throws `Error` naming `op` when a logit is
  /// NaN or Inf (finite `x` can still overflow, and the weights may hold anything).
  template <class PreSoftmax>
  Eigen::Map<RowMatrix<S>> probabilities(const char* op, const ConstRows<S>& x, Routing<S>& out,
                                         PreSoftmax&& pre_softmax) const {
    const Index num_tokens = x.rows();
    const Index num_experts = weights_.cols();
    out.reset(num_tokens, num_experts);
    out.probs_are_distribution = true;
    auto probs = out.probs_mut();  // (num_tokens, num_experts), logits first
    if (num_tokens == 0) return probs;
    router_product(x, weights_, probs);
    std::atomic<bool> bad{false};
    parallel_blocks(num_tokens, kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        S* row = probs.data() + t * num_experts;
        bool ok = true;
        for (Index e = 0; e < num_experts; ++e) ok = ok && std::isfinite(row[e]);
        ok = pre_softmax(t, static_cast<const S*>(row)) && ok;
        if (!ok) {
          bad.store(true, std::memory_order_relaxed);
          continue;
        }
        softmax_row(row, num_experts);
      }
    });
    if (bad.load()) {
      // Name the first offending token; its row still holds the raw logits unless only the
      // hook's values were bad.
      for (Index t = 0; t < num_tokens; ++t) {
        if (!probs.row(t).allFinite()) {
          fail(op, "router logits must be finite, got NaN or Inf for token ", t,
               " (x too large, or non-finite router weights)");
        }
      }
      fail(op, "router logits must be finite, got NaN or Inf (x too large, or non-finite "
               "router weights)");
    }
    return probs;
  }

  /// `probabilities` without a pre-softmax hook.
  Eigen::Map<RowMatrix<S>> probabilities(const char* op, const ConstRows<S>& x,
                                         Routing<S>& out) const {
    return probabilities(op, x, out, [](Index, const S*) { return true; });
  }

 private:
  RowMatrix<S> weights_;  // (model_dim, num_experts)
};

}  // namespace moet::detail
