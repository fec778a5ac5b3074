#pragma once
/// \file detail/grad_stacks.hpp
/// An expert bank's gradient stacks, zeroed lazily. `zero()` writes nothing: it marks every
/// expert *pending* (its gradients are zero but not written). The backward of a pending expert
/// takes the mark (`take_pending`) and writes its first products instead of adding them to
/// zeros, so a training step touches each gradient byte once instead of three times (zero, read,
/// write). Every reader calls `materialise()` first, which writes the zeros of the experts
/// still pending (those that got no tokens since `zero()`).

#include <algorithm>
#include <array>
#include <cstddef>
#include <vector>

#include "moet/detail/expert_bank.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/tensor.hpp"

namespace moet::detail {

template <class S, std::size_t N>
class GradStacks {
 public:
  /// Allocates zero stacks shaped like `values` (one `(num_experts * rows, cols)` stack per
  /// tensor) unless they have those shapes; nothing pending. A no-op once allocated.
  void ensure_like(const std::array<RowMatrix<S>, N>& values, Index num_experts) {
    for (std::size_t t = 0; t < N; ++t) ensure_grad_like(stacks_[t], values[t]);
    if (static_cast<Index>(pending_.size()) != num_experts) {
      pending_.assign(static_cast<std::size_t>(num_experts), 0);
    }
  }

  /// Every gradient is zero from now on (marks; writes nothing).
  void zero() { std::fill(pending_.begin(), pending_.end(), static_cast<unsigned char>(1)); }

  /// Whether expert `e` was pending, clearing the mark: the caller now writes (not adds) its
  /// gradients, all of them. Calls for different experts may run at once.
  bool take_pending(Index e) {
    unsigned char& mark = pending_[static_cast<std::size_t>(e)];
    const bool was = mark != 0;
    mark = 0;
    return was;
  }

  /// Writes zeros into expert `e`'s blocks of every stack.
  void zero_expert(Index e) const {
    const auto n = static_cast<Index>(pending_.size());
    for (RowMatrix<S>& stack : stacks_) {
      if (stack.size() == 0) continue;
      expert_block(stack, e, stack.rows() / n).setZero();
    }
  }

  /// Writes the zeros of every pending expert (in parallel over experts) and clears the marks.
  /// Logically const (the values do not change); not to be called concurrently with anything
  /// else on the bank.
  void materialise() const {
    const auto n = static_cast<Index>(pending_.size());
    if (std::find(pending_.begin(), pending_.end(), 1) == pending_.end()) return;
    parallel_for(n, [&](Index e) {
      if (pending_[static_cast<std::size_t>(e)] == 0) return;
      zero_expert(e);
      pending_[static_cast<std::size_t>(e)] = 0;
    });
  }

  /// Stack `t` as written so far (pending experts' blocks are stale): the backward's view.
  RowMatrix<S>& operator[](std::size_t t) { return stacks_[t]; }
  /// Stack `t` with every pending expert's zeros written.
  RowMatrix<S>& materialised(std::size_t t) const {
    materialise();
    return stacks_[t];
  }

 private:
  mutable std::array<RowMatrix<S>, N> stacks_;
  mutable std::vector<unsigned char> pending_;  // 1 per expert: zero but not written
};

}  // namespace moet::detail
