#pragma once
/// \file train/thor.hpp
/// THOR's training step (Zuo et al., ICLR 2022; docs/algorithms.md §7.2, loss §8.7): two stochastic
/// forward passes per step, each with its own random experts, both trained, tied by a consistency
/// loss
/// (`thor_consistency` in train/losses.hpp).
///
/// For a single layer, `ThorStep` runs both passes and their backward. In a model with several
/// THOR layers, run the whole model twice with `thor_pass_context(ctx, 0)` and
/// `thor_pass_context(ctx, 1)`: every layer then draws independently per pass (layers differ by
/// their gate's `stream`), as in THOR.
///
/// ```cpp
/// moet::ThorStep<decltype(layer)> thor;
/// thor.forward(layer, x, ctx);                  // thor.y(0), thor.y(1)
/// // loss = CE(head(y0)) + CE(head(y1)) + alpha * CR(head(y0), head(y1)) -> dy0, dy1
/// thor.backward(layer, x, dy0, dy1, dx);        // accumulates both passes' gradients
/// ```

#include <array>
#include <cstdint>

#include "moet/context.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// The context of THOR pass `pass` (0 or 1) of the step described by `ctx`: the same context
/// with `step = 2 * ctx.step + pass` and `training = true`, so the two passes draw different
/// (independent) experts and every step draws new ones. Throws `moet::Error` for another pass.
inline RouteContext thor_pass_context(const RouteContext& ctx, int pass) {
  detail::require(pass == 0 || pass == 1, "thor_pass_context", "pass must be 0 or 1, got ", pass);
  RouteContext out = ctx;
  out.training = true;
  out.step = 2 * ctx.step + static_cast<std::uint64_t>(pass);
  return out;
}

/// Runs THOR's two passes of one layer and their backward; keeps both passes' workspaces and
/// outputs (reused between steps: a warmed `ThorStep` does not allocate for same-sized batches).
/// \tparam Layer a `MoELayer` (normally with a `StochasticGate`; any trainable gate works).
template <class Layer>
class ThorStep {
 public:
  using Scalar = typename Layer::Scalar;

  /// Runs `layer.forward_train` twice on `x` `(num_tokens, model_dim)`, with
  /// `thor_pass_context(ctx, 0)` and `(ctx, 1)`; the outputs are `y(0)` and `y(1)`.
  void forward(Layer& layer, const ConstRows<Scalar>& x, const RouteContext& ctx) {
    for (int pass = 0; pass < 2; ++pass) {
      const auto p = static_cast<std::size_t>(pass);
      ctx_[p] = thor_pass_context(ctx, pass);
      y_[p].resize(x.rows(), x.cols());  // (num_tokens, model_dim)
      layer.forward_train(x, y_[p], ctx_[p], ws_[p]);
    }
    tokens_ = x.rows();
  }

  /// Backward of both passes: `dy0`, `dy1` are dL/dy of pass 0 and 1 `(num_tokens,
  /// model_dim)`; accumulates the layer's gradients of both and writes `dx` = the sum of both
  /// passes' input gradients. Throws `moet::Error` naming `ThorStep` when no `forward` of
  /// `x.rows()` tokens preceded it, or a shape differs (the layer checks the rest).
  void backward(Layer& layer, const ConstRows<Scalar>& x, const ConstRows<Scalar>& dy0,
                const ConstRows<Scalar>& dy1, Rows<Scalar> dx) {
    detail::require(tokens_ >= 0 && tokens_ == x.rows(), "ThorStep",
                    "backward needs a forward of the same x first (forward saw ", tokens_,
                    " tokens, x has ", x.rows(), ")");
    detail::require(dx.rows() == x.rows() && dx.cols() == x.cols(), "ThorStep",
                    "dx must have x's shape (", x.rows(), ", ", x.cols(), "), got (", dx.rows(),
                    ", ", dx.cols(), ")");
    dx_pass_.resize(x.rows(), x.cols());  // (num_tokens, model_dim)
    layer.backward(x, dy0, ctx_[0], ws_[0], dx);
    layer.backward(x, dy1, ctx_[1], ws_[1], dx_pass_);
    dx += dx_pass_;
  }

  /// Output of pass `pass` (0 or 1) of the last `forward`.
  const RowMatrix<Scalar>& y(int pass) const { return y_[checked(pass)]; }
  /// Routing plan of pass `pass` of the last `forward`.
  const Routing<Scalar>& routing(int pass) const { return ws_[checked(pass)].routing; }
  /// Context of pass `pass` of the last `forward`.
  const RouteContext& context(int pass) const { return ctx_[checked(pass)]; }

 private:
  static std::size_t checked(int pass) {
    detail::require(pass == 0 || pass == 1, "ThorStep", "pass must be 0 or 1, got ", pass);
    return static_cast<std::size_t>(pass);
  }

  std::array<typename Layer::Workspace, 2> ws_{};
  std::array<RouteContext, 2> ctx_{};
  std::array<RowMatrix<Scalar>, 2> y_{};
  RowMatrix<Scalar> dx_pass_;
  Index tokens_ = -1;
};

}  // namespace moet
