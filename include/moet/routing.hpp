#pragma once
/// \file routing.hpp
/// The routing plan: which experts each token goes to, and with what weight.

#include <algorithm>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "moet/detail/buffer.hpp"
#include "moet/errors.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// A routing plan in CSR form. Token `t`'s assignments are the slots
/// `[offsets()[t], offsets()[t + 1])` of `experts()` and `weights()`, in slot order (the order
/// the gate chose them, best first for score-based gates). A variable number of experts per
/// token is the normal case; `k(t) == 0` means the token is routed nowhere and its MoE output
/// is 0.
///
/// A `Routing` is a reusable workspace: its storage only grows, so routing same-sized batches
/// repeatedly does not allocate.
///
/// \tparam S scalar of the combine weights and router probabilities.
///
/// Gates fill a plan in three steps:
/// ```cpp
/// out.reset(num_tokens, num_experts);
/// for (t...) out.counts()[t] = k_t;       // may run in parallel
/// out.commit_counts();                     // prefix sum, sizes the arrays
/// for (t...) { out.experts(t)[j] = e; out.weights(t)[j] = w; }  // may run in parallel
/// ```
template <class S>
class Routing {
 public:
  using Scalar = S;

  /// Starts a new plan of `num_tokens` tokens over `num_experts` experts, every `k(t) = 0`.
  void reset(Index num_tokens, Index num_experts) {
    detail::require(num_tokens >= 0 && num_experts >= 0, "Routing::reset", "sizes must be >= 0, got (",
            num_tokens, ", ", num_experts, ")");
    num_tokens_ = num_tokens;
    num_experts_ = num_experts;
    offsets_.assign(static_cast<std::size_t>(num_tokens + 1), 0);
    num_assignments_ = 0;
    probs_rows_ = probs_cols_ = 0;
    probs_are_distribution = false;
    dropped = 0;
    live_experts = num_experts;
  }

  /// Writable per-token counts `k(t)` (size `num_tokens`) before `commit_counts()`.
  std::span<Index> counts() {
    return {offsets_.data() + 1, static_cast<std::size_t>(num_tokens_)};
  }

  /// Turns the counts into offsets and sizes `experts()` and `weights()`. Throws `moet::Error`
  /// when a count is negative (the plan must then be `reset`).
  void commit_counts() {
    for (Index t = 0; t < num_tokens_; ++t) {
      const Index count = offsets_[static_cast<std::size_t>(t + 1)];
      detail::require(count >= 0, "Routing::commit_counts", "counts must be >= 0, got ", count,
                      " for token ", t);
      offsets_[static_cast<std::size_t>(t + 1)] += offsets_[static_cast<std::size_t>(t)];
    }
    num_assignments_ = offsets_[static_cast<std::size_t>(num_tokens_)];
    if (experts_.size() < static_cast<std::size_t>(num_assignments_)) {
      experts_.resize(static_cast<std::size_t>(num_assignments_));
      weights_.resize(static_cast<std::size_t>(num_assignments_));
    }
  }

  Index num_tokens() const { return num_tokens_; }
  Index num_experts() const { return num_experts_; }
  /// Total (token, expert) assignments after any capacity drop.
  Index num_assignments() const { return num_assignments_; }
  /// Number of experts token `t` goes to.
  Index k(Index t) const {
    return offsets_[static_cast<std::size_t>(t + 1)] - offsets_[static_cast<std::size_t>(t)];
  }
  /// Mean experts per token (0 for an empty batch).
  double mean_k() const {
    return num_tokens_ == 0 ? 0.0
                            : static_cast<double>(num_assignments_) /
                                  static_cast<double>(num_tokens_);
  }

  /// `(num_tokens + 1)` offsets into the assignment arrays.
  std::span<const Index> offsets() const {
    return {offsets_.data(), static_cast<std::size_t>(num_tokens_ + 1)};
  }
  /// Expert id of every assignment, token-major, slot order.
  std::span<const std::int32_t> experts() const {
    return {experts_.data(), static_cast<std::size_t>(num_assignments_)};
  }
  /// Combine weight of every assignment.
  std::span<const S> weights() const {
    return {weights_.data(), static_cast<std::size_t>(num_assignments_)};
  }
  /// Token `t`'s expert ids in slot order.
  std::span<const std::int32_t> experts(Index t) const { return token_span(experts_, t); }
  std::span<std::int32_t> experts(Index t) { return token_span(experts_, t); }
  /// Token `t`'s weights in slot order.
  std::span<const S> weights(Index t) const { return token_span(weights_, t); }
  std::span<S> weights(Index t) { return token_span(weights_, t); }

  /// The gate's per-token scores after its nonlinearity, `(num_tokens, num_experts)`: softmax
  /// probabilities for score-based gates, sigmoid scores for `TopAnyGate`. Empty `(0, 0)` when
  /// the gate has none (`StochasticGate`).
  Eigen::Map<const RowMatrix<S>> probs() const {
    return Eigen::Map<const RowMatrix<S>>(probs_.data(), probs_rows_, probs_cols_);
  }
  /// Sizes and returns the writable probabilities `(num_tokens, num_experts)`.
  Eigen::Map<RowMatrix<S>> probs_mut() {
    probs_rows_ = num_tokens_;
    probs_cols_ = num_experts_;
    return probs_.matrix(probs_rows_, probs_cols_);
  }

  /// True when every row of `probs()` is a probability distribution (entropy is meaningful).
  bool probs_are_distribution = false;
  /// Assignments removed by a capacity limit (they are not in the plan).
  Index dropped = 0;
  /// Experts that could receive tokens: DynMoE's active slots, else `num_experts`.
  Index live_experts = 0;

  /// Gate-private scratch, reused across calls; its contents mean nothing outside `route`.
  detail::Buffer<std::int32_t> scratch_ids;
  /// Gate-private scratch, reused across calls.
  detail::Buffer<S> scratch_values;

 private:
  template <class V>
  auto token_span(V& v, Index t) const {
    using T = std::remove_pointer_t<decltype(v.data())>;
    const auto begin = static_cast<std::size_t>(offsets_[static_cast<std::size_t>(t)]);
    return std::span<T>(v.data() + begin, static_cast<std::size_t>(k(t)));
  }

  Index num_tokens_ = 0;
  Index num_experts_ = 0;
  Index num_assignments_ = 0;
  std::vector<Index> offsets_{0};
  std::vector<std::int32_t> experts_;
  std::vector<S> weights_;
  detail::Buffer<S> probs_;
  Index probs_rows_ = 0;
  Index probs_cols_ = 0;
};

/// The expert-major view of a `Routing`: for each expert, the assignments routed to it, in
/// token order. This is what grouped dispatch iterates over (ggml's `mul_mat_id` grouping).
/// Entry `i` of expert `e` lies at `i + offsets()[e]`; `tokens()[j]` is its token,
/// `assignments()[j]` its index in the token-major plan, and `position()[a]` maps a token-major
/// assignment `a` back to its expert-major entry. Reusable: storage only grows.
class ExpertMajor {
 public:
  /// Rebuilds the view from `routing` (a stable counting sort by expert, O(assignments)). Throws
  /// `moet::Error` when an expert id is outside `[0, routing.num_experts())`.
  template <class S>
  void build(const Routing<S>& routing) {
    const auto num_experts = static_cast<std::size_t>(routing.num_experts());
    const auto num_assignments = static_cast<std::size_t>(routing.num_assignments());
    num_experts_ = routing.num_experts();
    offsets_.assign(num_experts + 1, 0);
    if (tokens_.size() < num_assignments) {
      tokens_.resize(num_assignments);
      assignments_.resize(num_assignments);
      position_.resize(num_assignments);
    }
    const auto experts = routing.experts();
    for (std::size_t a = 0; a < num_assignments; ++a) {
      const std::int32_t e = experts[a];
      detail::require(e >= 0 && static_cast<std::size_t>(e) < num_experts, "ExpertMajor::build",
                      "expert id ", e, " at assignment ", a, " is outside [0, ", num_experts, ")");
      ++offsets_[static_cast<std::size_t>(e) + 1];
    }
    for (std::size_t e = 0; e < num_experts; ++e) offsets_[e + 1] += offsets_[e];
    cursor_.assign(offsets_.begin(), offsets_.end() - 1);
    const auto offsets = routing.offsets();
    for (Index t = 0; t < routing.num_tokens(); ++t) {
      for (Index a = offsets[static_cast<std::size_t>(t)];
           a < offsets[static_cast<std::size_t>(t + 1)]; ++a) {
        const auto e = static_cast<std::size_t>(experts[static_cast<std::size_t>(a)]);
        const auto j = static_cast<std::size_t>(cursor_[e]++);
        tokens_[j] = static_cast<std::int32_t>(t);
        assignments_[j] = a;
        position_[static_cast<std::size_t>(a)] = static_cast<Index>(j);
      }
    }
  }

  Index num_experts() const { return num_experts_; }
  /// Tokens routed to expert `e` (its load).
  Index load(Index e) const {
    return offsets_[static_cast<std::size_t>(e + 1)] - offsets_[static_cast<std::size_t>(e)];
  }
  /// `(num_experts + 1)` offsets into the expert-major arrays.
  std::span<const Index> offsets() const { return {offsets_.data(), offsets_.size()}; }
  /// Token of every expert-major entry.
  std::span<const std::int32_t> tokens() const { return {tokens_.data(), size()}; }
  /// Token-major assignment index of every expert-major entry.
  std::span<const Index> assignments() const { return {assignments_.data(), size()}; }
  /// Expert-major entry of every token-major assignment.
  std::span<const Index> position() const { return {position_.data(), size()}; }

 private:
  std::size_t size() const { return offsets_.empty() ? 0 : static_cast<std::size_t>(offsets_.back()); }

  Index num_experts_ = 0;
  std::vector<Index> offsets_;
  std::vector<Index> cursor_;
  std::vector<std::int32_t> tokens_;
  std::vector<Index> assignments_;
  std::vector<Index> position_;
};

}  // namespace moet
