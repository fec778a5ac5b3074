#pragma once
/// \file gates/router.hpp
/// The gate toolkit. A gate that scores tokens with a linear softmax router and keeps a prefix of
/// each token's ranking is three pieces, and only the last is its own:
///
/// - `SoftmaxRouter`: the router weights `W_r` `(model_dim, num_experts)` with their gradient,
///   the logits `z = x W_r`, the probabilities `P = softmax(z)` written into the plan, and the
///   backward of the combine weights and of the score losses (`SoftmaxLossGrad`) to `W_r` and
///   `x`, all checked and with the same bits for any thread count;
/// - `SoftmaxGateBase`: the members every such gate exposes (`router()`, `set_router`,
///   `router_grad()`, `logits`, `zero_grad`, `visit_parameters`, `model_dim`, `num_experts`);
/// - `RankedSelection`: rank each token's experts by a score (ties to the lower id), let the
///   gate's rule say how many to keep, and write them into the `Routing` with their weights,
///   renormalised or not.
///
/// `TopKGate`, `TopPGate` and `ImportanceGate` are selection rules on top of these, and so is a
/// user's gate: examples/03_custom_gate.cpp is a trainable gate in about 30 lines. Conventions
/// (ties, softmax, initialisation, checks): docs/algorithms.md §1.4; the gradient: §3.4, §5.2,
/// §9.1.
///
/// ```cpp
/// void route(const moet::ConstRows<S>& x, const moet::RouteContext&, moet::Routing<S>& out) const
/// {
///   const auto probs = router_.probabilities(x, out);  // checks x; P into out.probs()
///   moet::RankedSelection<S> select(out);
///   select.rank(probs, num_experts(), [&](moet::Index t, std::span<const std::int32_t> ranked) {
///     return my_rule(probs.row(t), ranked);          // how many of the ranked experts to keep
///   });
///   select.write(probs, /*renormalize=*/true);
/// }
/// ```

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "moet/concepts.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/select.hpp"
#include "moet/detail/softmax_router.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// Tag for the calls of `SoftmaxRouter` that skip the check of `x`, for a gate that checked it
/// with `check_input` before work of its own (`moet::input_checked`).
struct InputChecked {};
/// The `InputChecked` tag.
inline constexpr InputChecked input_checked{};

/// The linear softmax router `P = softmax(x W_r)` of a gate, computed in `S` (fp32 for a float
/// gate, as DeepSpeed routes), with its parameter `W_r` `(model_dim, num_experts)` and the
/// gradient. Every entry point checks its arguments and throws `moet::Error` naming the gate
/// (`name`, and `name::backward` for the backward), so a gate built on it inherits moet's
/// checks: wrong widths, NaN/Inf in `x`, non-finite logits, plans that do not fit.
///
/// \tparam S scalar of the weights, the probabilities and the combine weights.
///
/// ```cpp
/// moet::SoftmaxRouter<float> router("MyGate", 512, 8, /*init_seed=*/1);
/// const auto probs = router.probabilities(x, plan);  // (num_tokens, 8), rows sum to 1
/// ```
template <class S>
class SoftmaxRouter {
 public:
  using Scalar = S;

  /// `W_r` `(model_dim, num_experts)` normal with standard deviation `1 / sqrt(model_dim)`,
  /// drawn row-major from `init_seed` (docs/algorithms.md §1.4). `name` names the gate in errors
  /// (a string literal: it is kept as a pointer). Throws `moet::Error` naming `name` unless
  /// `model_dim >= 1` and `1 <= num_experts <= INT32_MAX` (expert ids are `int32`).
  SoftmaxRouter(const char* name, Index model_dim, Index num_experts, std::uint64_t init_seed = 0)
      : name_(checked_name(name, model_dim, num_experts)),
        backward_name_(std::string(name) + "::backward"),
        weights_(detail::normal_fan_in<S>(model_dim, num_experts, init_seed)),
        model_dim_(model_dim),
        num_experts_(num_experts) {}

  /// The gate's name in errors.
  const char* name() const { return name_; }
  /// Width of a token, the rows of `W_r`.
  Index model_dim() const { return model_dim_; }
  /// Number of experts, the columns of `W_r`.
  Index num_experts() const { return num_experts_; }

  // --- parameters --------------------------------------------------------------------------

  /// `W_r` `(model_dim, num_experts)`, a read-only view of fixed shape (write with
  /// `set_weights`).
  Eigen::Map<const RowMatrix<S>> weights() const { return weights_.view(); }

  /// Replaces `W_r` by `w`: `(model_dim, num_experts)` with `WeightLayout::kInOut`,
  /// `[num_experts, model_dim]` with `kOutIn` (PyTorch's `nn.Linear(model_dim,
  /// num_experts).weight`). Throws `moet::Error` naming the gate and `setter` (nothing changed)
  /// on another shape ("looks transposed" for the other layout's) or a NaN/Inf entry.
  void set_weights(const ConstRows<S>& w, WeightLayout layout, const char* setter = "set_router") {
    weights_.set(name_, setter, "router", w, layout, model_dim_, num_experts_);
  }

  /// The gradient of `W_r` `(model_dim, num_experts)`; `(0, 0)` before the first `zero_grad()`
  /// or backward.
  const RowMatrix<S>& grad() const { return weights_.grad(); }
  /// Sets the gradient to zero (allocating it on first use).
  void zero_grad() { weights_.zero_grad(); }
  /// Allocates the gradient (zero) on first use; a no-op afterwards (a backward that adds
  /// nothing, such as an empty batch's, still leaves the gradient allocated).
  void allocate_grad() { weights_.grad(); }
  /// Calls `f("router.weight", W_r, dW_r)` (allocating the gradient on first use). `W_r` is
  /// handed out for writing: until `parameters_changed()` the logits are Eigen's product on it
  /// instead of the packed kernels' (the same values, other rounding; see `RouterWeights`).
  template <class F>
  void visit_parameters(F&& f) {
    weights_.visit(std::string_view("router.weight"), f);
  }
  /// Repacks `W_r` for the selected kernels after it was written through `visit_parameters`
  /// (the optimisers' `step`, `load_parameters` and `MoELayer::parameters_changed` call it).
  void parameters_changed() { weights_.repack(); }

  // --- forward -----------------------------------------------------------------------------

  /// Throws `moet::Error` naming the gate unless `x` has `model_dim` columns and only finite
  /// entries (naming the first NaN/Inf by token and column).
  void check_input(const ConstRows<S>& x) const { detail::check_gate_input(name_, x, model_dim_); }

  /// Writes the logits `z = x W_r` `(num_tokens, num_experts)` into `z`, with the bits
  /// `probabilities` starts from (the input of `router_z_loss`). Throws `moet::Error` on a bad
  /// `x` or a `z` of the wrong shape.
  void logits(const ConstRows<S>& x, Rows<S> z) const {
    check_input(x);
    detail::require(z.rows() == x.rows() && z.cols() == num_experts_, name_, "z must be (",
                    x.rows(), ", ", num_experts_, "), got (", z.rows(), ", ", z.cols(), ")");
    weights_.forward(x, z);
  }
  /// `logits` for an `x` that passed `check_input` (no checks).
  void logits(InputChecked /*tag*/, const ConstRows<S>& x, Rows<S> z) const {
    weights_.forward(x, z);
  }

  /// Checks `x` (`check_input`), resets `out` to `(x.rows(), num_experts)` and writes
  /// `P = softmax(x W_r)` into `out.probs_mut()` (max-subtracted per row), setting
  /// `out.probs_are_distribution`; returns it, `(num_tokens, num_experts)`. Parallel over fixed
  /// token blocks. Throws `moet::Error` when a logit is NaN or Inf (finite `x` can still
  /// overflow, and weights set through `visit_parameters` may hold anything), naming the first
  /// such token.
  Eigen::Map<RowMatrix<S>> probabilities(const ConstRows<S>& x, Routing<S>& out) const {
    check_input(x);
    return probabilities(input_checked, x, out);
  }

  /// `probabilities` for an `x` the gate has checked with `check_input` already.
  Eigen::Map<RowMatrix<S>> probabilities(InputChecked tag, const ConstRows<S>& x,
                                         Routing<S>& out) const {
    return probabilities(tag, x, out, [](Index, const S*) { return true; });
  }

  /// `probabilities` with a hook: `pre_softmax(t, logits)` runs on every token's logits row
  /// `(num_experts)` before its softmax (noisy top-k reads them there) and returns false when it
  /// met a non-finite value (then the call throws). It runs inside a parallel region: it must
  /// be thread-safe and must not throw. `x` must have passed `check_input`.
  template <class PreSoftmax>
  Eigen::Map<RowMatrix<S>> probabilities(InputChecked /*tag*/, const ConstRows<S>& x,
                                         Routing<S>& out, PreSoftmax&& pre_softmax) const {
    return detail::softmax_probabilities(name_, weights_, x, out, pre_softmax);
  }

  // --- backward ----------------------------------------------------------------------------

  /// The argument checks of a gate's `backward` (errors name `name::backward`): `x`
  /// `(num_tokens, model_dim)` finite; `routing` from a `route` of this router's gate on this
  /// `x` (token and expert counts, probabilities `(num_tokens, num_experts)`, ids in range);
  /// `d_weights` and `loss_grad.d_weights` one value per assignment; `d_probs`, `d_logits` and
  /// `d_noise_logits` empty or `num_tokens * num_experts` values, `d_noise_logits` only when
  /// `accepts_noise`; `dx` `(num_tokens, model_dim)`.
  void check_backward(const ConstRows<S>& x, const Routing<S>& routing,
                      std::span<const S> d_weights, const SoftmaxLossGrad<S>& loss_grad,
                      const Rows<S>& dx, bool accepts_noise = false) const {
    detail::check_softmax_backward(backward_name_.c_str(), x, model_dim_, num_experts_, routing,
                                   d_weights, loss_grad, dx, accepts_noise);
  }

  /// Backward of a plan whose weights are the clean `P = routing.probs()` of its slots: `P_e`
  /// (`renormalize = false`) or `P_e / sum of P over the token's slots`. Checks the arguments
  /// (`check_backward`), then per token dL/dz is the combine-weight part (the task's
  /// `d_weights` plus `loss_grad.d_weights`), plus the softmax backward of
  /// `loss_grad.d_probs`, plus `loss_grad.d_logits`; then `dW_r += x^T dz` (accumulated) and
  /// `dx += dz W_r^T` (added). docs/algorithms.md §3.4. The same bits for any thread count.
  void backward(const ConstRows<S>& x, const Routing<S>& routing, std::span<const S> d_weights,
                bool renormalize, const SoftmaxLossGrad<S>& loss_grad, Rows<S> dx) {
    check_backward(x, routing, d_weights, loss_grad, dx);
    backward(input_checked, x, routing, d_weights, renormalize, loss_grad, dx);
  }

  /// `backward` for arguments that passed `check_backward`.
  void backward(InputChecked /*tag*/, const ConstRows<S>& x, const Routing<S>& routing,
                std::span<const S> d_weights, bool renormalize, const SoftmaxLossGrad<S>& loss_grad,
                Rows<S> dx) {
    allocate_grad();  // even for an empty batch
    const Index num_tokens = x.rows();
    if (num_tokens == 0) return;
    auto dz = dz_.matrix(num_tokens, num_experts_);  // dL/dz (num_tokens, num_experts)
    detail::plan_logits_backward(routing, d_weights, renormalize, loss_grad, dz);
    weights_.backward(x, dz, dx);
  }

  /// Backward of `z = x W_r` for a gradient `dz` = dL/dz `(num_tokens, num_experts)` the gate
  /// computed itself (weights from other scores, as noisy top-k's): `dW_r += x^T dz`,
  /// `dx += dz W_r^T`. Throws `moet::Error` naming `name::backward` on a shape mismatch.
  void backward_logits(const ConstRows<S>& x, const ConstRows<S>& dz, Rows<S> dx) {
    const char* op = backward_name_.c_str();
    detail::require(x.cols() == model_dim_ && dz.rows() == x.rows() && dz.cols() == num_experts_ &&
                        dx.rows() == x.rows() && dx.cols() == model_dim_,
                    op, "x, dz and dx must be (T, ", model_dim_, "), (T, ", num_experts_,
                    ") and (T, ", model_dim_, "), got (", x.rows(), ", ", x.cols(), "), (",
                    dz.rows(), ", ", dz.cols(), ") and (", dx.rows(), ", ", dx.cols(), ")");
    weights_.backward(x, dz, dx);
  }

 private:
  static const char* checked_name(const char* name, Index model_dim, Index num_experts) {
    detail::check_router_shape(name, model_dim, num_experts);
    return name;
  }

  const char* name_;
  std::string backward_name_;
  detail::RouterWeights<S> weights_;  // W_r (model_dim, num_experts) and its gradient
  Index model_dim_;
  Index num_experts_;
  detail::Buffer<S> dz_;  // backward scratch: dL/dz (num_tokens, num_experts), grow-only
};

/// The base of a gate built on a `SoftmaxRouter`: it owns the router (`router_`, for the
/// gate's `route` and `backward`) and gives the gate the members every such gate exposes. A
/// gate that has more parameters hides `zero_grad` and `visit_parameters` with its own.
///
/// \tparam S scalar of the router.
template <class S>
class SoftmaxGateBase {
 public:
  using Scalar = S;
  /// Loss-gradient inputs of `backward`: dL/dP, dL/dz and dL/dw of the auxiliary losses.
  using LossGrad = SoftmaxLossGrad<S>;

  /// Width of a token.
  Index model_dim() const { return router_.model_dim(); }
  /// Number of experts.
  Index num_experts() const { return router_.num_experts(); }
  /// Router weights `W_r` `(model_dim, num_experts)`, a read-only view (write with
  /// `set_router`).
  Eigen::Map<const RowMatrix<S>> router() const { return router_.weights(); }
  /// Replaces `W_r` by `w`, `(model_dim, num_experts)` with `WeightLayout::kInOut` or
  /// `[num_experts, model_dim]` with `kOutIn` (PyTorch's `nn.Linear(model_dim,
  /// num_experts).weight`). Throws `moet::Error` (nothing changed) on another shape ("looks
  /// transposed" for the other layout's) or a NaN/Inf entry.
  ///
  /// ```cpp
  /// gate.set_router(hf_gate_weight, moet::WeightLayout::kOutIn);  // Mixtral block_sparse_moe.gate
  /// ```
  void set_router(const ConstRows<S>& w, WeightLayout layout) { router_.set_weights(w, layout); }
  /// Gradient of `W_r` `(model_dim, num_experts)`; `(0, 0)` before the first `zero_grad()` or
  /// `backward`.
  const RowMatrix<S>& router_grad() const { return router_.grad(); }
  /// Writes the router logits `z = x W_r` `(num_tokens, num_experts)` into `z` (the input of
  /// `router_z_loss`), with the same bits as `route` computes them. Throws `moet::Error` on a bad
  /// `x` or a `z` of the wrong shape.
  void logits(const ConstRows<S>& x, Rows<S> z) const { router_.logits(x, z); }
  /// Sets the router gradient to zero (allocating it on first use).
  void zero_grad() { router_.zero_grad(); }
  /// Calls `f(name, value, grad)` for `router.weight` `(model_dim, num_experts)`, allocating the
  /// gradient on first use.
  template <class F>
  void visit_parameters(F&& f) {
    router_.visit_parameters(f);
  }
  /// Repacks `W_r` after it was written through `visit_parameters` (see
  /// `SoftmaxRouter::parameters_changed`).
  void parameters_changed() { router_.parameters_changed(); }

 protected:
  explicit SoftmaxGateBase(SoftmaxRouter<S> router) : router_(std::move(router)) {}

  SoftmaxRouter<S> router_;
};

/// Ranked selection: the selection half of a gate that ranks each token's experts by a score
/// and keeps a prefix of the ranking (top-k, top-p, importance top-K). Used once per `route`:
///
/// 1. `rank(scores, depth, keep)`: token `t`'s experts sorted by descending score, equal scores
///    by lower id (docs/algorithms.md §1.4), the first `depth(t)` positions only (a partial sort);
///    then `keep(t, ranked)` (`ranked`: those `depth(t)` ids, best first) says how many of them
///    it keeps;
/// 2. optionally a rule over all tokens at once on `ranking(t)` and `counts()` (a capacity
///    limit marks an entry dropped with `-1` and lowers the token's count);
/// 3. `write(weights, renormalize)`: the plan's slots.
///
/// The rankings live in the plan's scratch (`Routing::scratch_ids`, grow-only): a warmed-up plan
/// does not allocate. Every pass runs in parallel over fixed token blocks, so the plan has the
/// same bits for any thread count.
///
/// \tparam S scalar of the scores and weights.
template <class S>
class RankedSelection {
 public:
  /// A selection for `out`, which the router (or the gate) has reset to its tokens and experts.
  /// `extra_ids` more ids of scratch follow the rankings, for the gate (`extra_ids()`).
  explicit RankedSelection(Routing<S>& out, Index extra_ids = 0)
      : out_(out),
        num_tokens_(out.num_tokens()),
        num_experts_(out.num_experts()),
        ranking_(out.scratch_ids.data(num_tokens_ * num_experts_ + extra_ids)) {}

  /// Ranks every token's experts by its row of `scores` `(num_tokens, num_experts)` (no NaN) and
  /// sets its count to `keep(t, ranked)`, between 0 and `depth(t)`. `depth` is an `Index` or a
  /// callable `depth(t)`; `num_experts` gives the full ranking, 0 skips the token (its count is
  /// then `keep(t, {})`). `depth` and `keep` run inside a parallel region: they must be
  /// thread-safe and must not throw.
  template <class Depth, class Keep>
  void rank(const ConstRows<S>& scores, Depth&& depth, Keep&& keep) {
    MOET_ASSERT(scores.rows() == num_tokens_ && scores.cols() == num_experts_,
                "scores must be (num_tokens, num_experts)");
    const auto counts = out_.counts();
    detail::parallel_blocks(num_tokens_, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        Index d = 0;
        if constexpr (std::is_invocable_v<Depth&, Index>) {
          d = static_cast<Index>(depth(t));
        } else {
          d = static_cast<Index>(depth);
        }
        std::int32_t* row = ranking_ + t * num_experts_;
        const S* values = scores.data() + t * scores.outerStride();
        if (d >= num_experts_) {
          detail::sort_descending(values, num_experts_, row);
        } else if (d > 0) {
          detail::top_k_descending(values, num_experts_, d, row);
        }
        const std::span<const std::int32_t> ranked(row, static_cast<std::size_t>(d > 0 ? d : 0));
        counts[static_cast<std::size_t>(t)] = static_cast<Index>(keep(t, ranked));
      }
    });
  }

  /// Token `t`'s ranking, `num_experts` ids (those past its depth in no particular order);
  /// writable, for rules over all tokens (mark an entry dropped with `-1`).
  std::span<std::int32_t> ranking(Index t) {
    return {ranking_ + t * num_experts_, static_cast<std::size_t>(num_experts_)};
  }
  /// The per-token counts `rank` set, writable until `write`.
  std::span<Index> counts() { return out_.counts(); }
  /// The `extra_ids` ids of scratch after the rankings.
  std::int32_t* extra_ids() { return ranking_ + num_tokens_ * num_experts_; }

  /// Commits the counts (`Routing::commit_counts`) and fills the plan: token `t`'s slots are
  /// the first `k(t)` entries of its ranking that are not `-1`, in rank order, each with the
  /// weight `weights(t, e)` from `weights` `(num_tokens, num_experts)` (non-negative, such as
  /// probabilities), divided by the sum of the token's kept weights when `renormalize` and that
  /// sum is positive.
  void write(const ConstRows<S>& weights, bool renormalize) {
    MOET_ASSERT(weights.rows() == num_tokens_ && weights.cols() == num_experts_,
                "weights must be (num_tokens, num_experts)");
    out_.commit_counts();
    detail::parallel_blocks(num_tokens_, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        const std::int32_t* row = ranking_ + t * num_experts_;
        const S* source = weights.data() + t * weights.outerStride();
        const auto experts = out_.experts(t);
        const auto slots = out_.weights(t);
        S sum = S(0);
        std::size_t a = 0;
        for (Index j = 0; a < experts.size(); ++j) {
          const std::int32_t e = row[j];
          if (e < 0) continue;
          experts[a] = e;
          slots[a] = source[e];
          sum += slots[a];
          ++a;
        }
        if (renormalize && sum > S(0)) {
          for (auto& w : slots) w /= sum;
        }
      }
    });
  }

 private:
  Routing<S>& out_;
  Index num_tokens_;
  Index num_experts_;
  std::int32_t* ranking_;  // (num_tokens, num_experts) rankings, then the extra ids
};

}  // namespace moet
