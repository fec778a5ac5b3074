#pragma once
/// \file gates/relu.hpp
/// `ReluGate`: ReLU routing, ReMoE (Wang et al., ICLR 2025, arXiv 2412.14711): the router's
/// ReLU is both the selection and the weight, so a token gets 0 to `E` experts.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <span>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/errors.hpp"
#include "moet/gates/router.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// ReLU routing (docs/algorithms.md §16; ReMoE, "ReMoE: Fully Differentiable Mixture-of-Experts
/// with ReLU Routing", official code thu-ml/ReMoE):
///
/// ```
/// R = relu(x W_r)          (num_tokens, num_experts), in S
/// token t's slots: the experts with R[t, e] > 0, in descending R (ties to the lower id)
/// w[t, e] = R[t, e]        no softmax, no renormalisation
/// ```
///
/// so a token gets 0 to `E` experts (0: the layer's output for it is 0). `Routing::probs()`
/// holds `R` (not a distribution). Sparsity is not a rule of the gate but the training's: the
/// L1 regulariser `relu_l1_loss` with the adaptive coefficient of `ReluSparsityController`
/// (train/relu_routing.hpp) drives the mean experts per token to a target k; without it about
/// half the experts fire (a zero-mean router).
///
/// **Gradient** (`backward`): ReLU routing is differentiable where it matters: `dL/dz[t, e] =
/// (dL/dw + dL/dR) · [z[t, e] > 0] + dL/dz` (relu'(0) = 0), with `dL/dw` the combine part of the
/// kept slots (`d_weights` plus `loss_grad.d_weights`), `dL/dR` `loss_grad.d_probs` (the L1
/// regulariser's) and `dL/dz` `loss_grad.d_logits`; then `dW_r += x^T dz`, `dx += dz W_r^T`. The
/// same bits for any thread count. There are no run-time overrides.
///
/// \tparam S scalar of the router, the scores and the combine weights.
///
/// ```cpp
/// moet::ReluGate<float> gate({.model_dim = 512, .num_experts = 16});
/// ```
template <class S>
class ReluGate : public SoftmaxGateBase<S> {
 public:
  /// Construction options (validated by the constructor).
  struct Options {
    /// Columns of `x`; >= 1.
    Index model_dim = 0;
    /// Number of experts `E`; >= 1.
    Index num_experts = 0;
    /// Seed of the router initialisation.
    std::uint64_t init_seed = 0;
  };

  /// Initialises `W_r` normal with standard deviation `1 / sqrt(model_dim)` from `init_seed`;
  /// throws `Error` on a bad shape.
  explicit ReluGate(const Options& options)
      : SoftmaxGateBase<S>(
            SoftmaxRouter<S>(kOp, options.model_dim, options.num_experts, options.init_seed)),
        options_(options) {}

  const Options& options() const { return options_; }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out`. Throws `Error` when `x` has
  /// the wrong width or a NaN/Inf, when a router logit is not finite (naming the token), or when
  /// `ctx.overrides` is set. The same plan for any thread count.
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    if (!ctx.overrides.empty()) detail::check_override_fields(kOp, ctx.overrides, {});
    this->router_.check_input(x);
    const Index num_tokens = x.rows();
    const Index num_experts = this->num_experts();
    out.reset(num_tokens, num_experts);
    auto scores = out.probs_mut();  // z, then R = relu(z) in place
    if (num_tokens > 0) this->router_.logits(input_checked, x, scores);
    std::atomic<bool> bad{false};
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        S* row = scores.data() + t * num_experts;
        for (Index e = 0; e < num_experts; ++e) {
          if (!std::isfinite(row[e])) bad.store(true, std::memory_order_relaxed);
          row[e] = row[e] > S(0) ? row[e] : S(0);  // NaN to 0 too; reported below
        }
      }
    });
    if (bad.load()) {
      RowMatrix<S> z(num_tokens, num_experts);
      this->router_.logits(input_checked, x, z);
      for (Index t = 0; t < num_tokens; ++t) {
        detail::require(z.row(t).allFinite(), kOp,
                        "router logits must be finite, got NaN or Inf for token ", t,
                        " (x too large, or non-finite router weights)");
      }
    }
    RankedSelection<S> select(out);
    select.rank(scores, num_experts, [&](Index t, std::span<const std::int32_t> ranked) {
      const S* row = scores.data() + t * num_experts;
      Index k = 0;
      while (k < static_cast<Index>(ranked.size()) && row[ranked[static_cast<std::size_t>(k)]] > 0)
        ++k;
      return k;
    });
    select.write(scores, /*renormalize=*/false);
  }

  /// Backward of `route(x, ctx, routing)` (see the class notes): `d_weights` holds dL/dw per
  /// assignment (routing order), `loss_grad` the optional `d_probs` (dL/dR, e.g. from
  /// `relu_l1_loss`), `d_logits` and `d_weights`. Accumulates into the gradient of `W_r` and
  /// adds dL/dx into `dx`. Throws `Error` naming `ReluGate::backward` on any size mismatch or a
  /// plan that is not from this gate and this `x`.
  void backward(const ConstRows<S>& x, const RouteContext& /*ctx*/, const Routing<S>& routing,
                std::span<const S> d_weights, const SoftmaxLossGrad<S>& loss_grad, Rows<S> dx) {
    this->router_.check_backward(x, routing, d_weights, loss_grad, dx);
    this->router_.allocate_grad();
    const Index num_tokens = x.rows();
    const Index num_experts = this->num_experts();
    if (num_tokens == 0) return;
    auto dz = dz_.matrix(num_tokens, num_experts);
    const auto r = routing.probs();
    const auto offsets = routing.offsets();
    const auto experts = routing.experts();
    detail::parallel_blocks(num_tokens, detail::kGateTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        const std::size_t row = static_cast<std::size_t>(t * num_experts);
        for (Index e = 0; e < num_experts; ++e) {
          const std::size_t i = row + static_cast<std::size_t>(e);
          S g = loss_grad.d_probs.empty() ? S(0) : loss_grad.d_probs[i];
          dz(t, e) = r(t, e) > S(0) ? g : S(0);
          if (!loss_grad.d_logits.empty()) dz(t, e) += loss_grad.d_logits[i];
        }
        for (Index a = offsets[static_cast<std::size_t>(t)];
             a < offsets[static_cast<std::size_t>(t + 1)]; ++a) {
          const auto ua = static_cast<std::size_t>(a);
          const std::int32_t e = experts[ua];
          if (!(r(t, e) > S(0))) continue;
          S g = d_weights[ua];
          if (!loss_grad.d_weights.empty()) g += loss_grad.d_weights[ua];
          dz(t, e) += g;
        }
      }
    });
    this->router_.backward_logits(x, dz, dx);
  }

 private:
  static constexpr const char* kOp = "ReluGate";

  Options options_;
  detail::Buffer<S> dz_;  // backward scratch: dL/dz (num_tokens, num_experts), grow-only
};

}  // namespace moet
