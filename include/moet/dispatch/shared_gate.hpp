#pragma once
/// \file dispatch/shared_gate.hpp
/// `SharedExpertGate`: a per-token sigmoid gate on a layer's shared experts (Qwen2-MoE's
/// `shared_expert_gate`), and the dense passes that run gated shared experts: forward,
/// training forward and backward (`MoELayer` calls them when it has such a gate).

#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>

#include "moet/concepts.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/select.hpp"
#include "moet/detail/softmax_router.hpp"
#include "moet/detail/weights.hpp"
#include "moet/dispatch/dense.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/errors.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// A sigmoid gate on the shared experts' output (Qwen2-MoE, `Qwen2MoeSparseMoeBlock`):
/// ```
/// y_t += sigmoid(x_t w) * sum over shared experts s of S_s(x_t)
/// ```
/// with one weight column `w` `(model_dim, 1)` (HF's `shared_expert_gate.weight` `[1,
/// model_dim]`). Trainable: `visit_parameters` visits `weight`; the gradients are
/// `dL/dg_t = dy_t · S(x_t)`, `dz_t = dL/dg_t g_t (1 - g_t)`, `dw += x^T dz`, `dx += dz w^T`,
/// and the shared experts receive `g_t dy_t`.
///
/// \tparam S scalar type.
///
/// ```cpp
/// moet::SharedExpertGate<float> shared_gate({.model_dim = 2048});
/// shared_gate.set_weights(hf_shared_expert_gate, moet::WeightLayout::kOutIn);  // [1, 2048]
/// moet::MoELayer layer(gate, experts, shared_experts, std::move(shared_gate));
/// ```
template <class S>
class SharedExpertGate {
 public:
  using Scalar = S;

  /// Construction options.
  struct Options {
    /// Columns of `x`; >= 1.
    Index model_dim = 0;
    /// Seed of the initialisation (normal, standard deviation `1 / sqrt(model_dim)`).
    std::uint64_t init_seed = 0;
  };

  /// Validates `options` (throws `moet::Error`) and draws `w`.
  explicit SharedExpertGate(const Options& options)
      : w_(detail::normal_fan_in<S>(validated_dim(options.model_dim), 1, options.init_seed)) {}

  Index model_dim() const { return w_.rows(); }
  /// The gate weights `w` `(model_dim, 1)`, read-only.
  Eigen::Map<const RowMatrix<S>> weights() const {
    return Eigen::Map<const RowMatrix<S>>(w_.data(), w_.rows(), 1);
  }
  /// Replaces `w`: `(model_dim, 1)` with `WeightLayout::kInOut`, `[1, model_dim]` with `kOutIn`
  /// (PyTorch's `nn.Linear(model_dim, 1).weight`). Throws `moet::Error` (nothing changed) for
  /// another shape or a NaN/Inf.
  void set_weights(const ConstRows<S>& w, WeightLayout layout) {
    const detail::WeightName name{"shared expert gate", -1, "model_dim", "1"};
    detail::check_weight_shape(kOp, "set_weights", name, model_dim(), 1, w.rows(), w.cols(),
                               layout);
    detail::check_weights_finite(kOp, "set_weights", name, w);
    if (layout == WeightLayout::kOutIn) {
      w_ = w.transpose();
    } else {
      w_ = w;
    }
  }

  /// Writes `g_t = sigmoid(x_t w)` for every row of `x` `(num_tokens, model_dim)` into `g`
  /// `(num_tokens, 1)`.
  void gates(const ConstRows<S>& x, Rows<S> g) const {
    detail::router_product(x, w_, g);
    for (Index t = 0; t < g.rows(); ++t) g(t, 0) = detail::sigmoid(g(t, 0));
  }

  /// The gradient of `w` `(model_dim, 1)`; `(0, 0)` before the first use.
  const RowMatrix<S>& grad() const { return grad_; }
  /// Sets the gradient to zero (allocating it on first use).
  void zero_grad() { grad_.setZero(w_.rows(), 1); }
  /// Calls `f("weight", w, dw)` (allocating the gradient on first use).
  template <class F>
  void visit_parameters(F&& f) {
    if (grad_.rows() != w_.rows()) zero_grad();
    f(std::string_view("weight"), ParamMap<S>(w_.data(), w_.rows(), 1),
      ParamMap<S>(grad_.data(), grad_.rows(), 1));
  }

  /// Backward of the gate given `dz` `(num_tokens, 1)` = dL/d(x w): accumulates `dw += x^T dz`
  /// and adds `dx += dz w^T` (deterministic for any thread count).
  void backward(const ConstRows<S>& x, const ConstRows<S>& dz, Rows<S> dx) {
    if (grad_.rows() != w_.rows()) zero_grad();
    detail::linear_backward<S>(x, w_, dz, grad_, dx);
  }

 private:
  static constexpr const char* kOp = "SharedExpertGate";
  static Index validated_dim(Index model_dim) {
    detail::require(model_dim >= 1, kOp, "model_dim must be >= 1, got ", model_dim);
    return model_dim;
  }
  RowMatrix<S> w_;     // (model_dim, 1)
  RowMatrix<S> grad_;  // (model_dim, 1), or (0, 0) before the first use
};

/// Workspace of the gated shared experts: the dense experts' workspace, their summed output
/// `(num_tokens, model_dim)`, the gate values and the backward scratch. Grow-only.
template <class X>
struct GatedSharedWorkspace {
  using S = typename X::Scalar;
  DenseWorkspace<X> dense;
  detail::Buffer<S> sum;    // sum_s S_s(x) (num_tokens, model_dim)
  detail::Buffer<S> gates;  // g (num_tokens, 1)
  detail::Buffer<S> d_sum;  // backward: g ⊙ dy (num_tokens, model_dim)
  detail::Buffer<S> dz;     // backward: dL/d(x w) (num_tokens, 1)
};

namespace detail {

// y += g ⊙ sum, row by row over fixed blocks.
template <class S>
void add_gated_rows(const ConstRows<S>& sum, const ConstRows<S>& g, Rows<S> y) {
  parallel_blocks(y.rows(), kDenseRowBlock, [&](Index begin, Index end) {
    for (Index t = begin; t < end; ++t) y.row(t) += g(t, 0) * sum.row(t);
  });
}

}  // namespace detail

namespace detail {

/// The shared-expert step both forwards share: checks `x` against the gate, zeroes the
/// workspace's sum `(num_tokens, model_dim)`, lets `run_experts(sum)` add the shared experts'
/// outputs into it, computes the gate values and adds `g_t * sum_t` to `y`'s rows.
template <class X, class S, class RunExperts>
void gated_shared_sum(const SharedExpertGate<S>& gate, const ConstRows<S>& x, Rows<S> y,
                      GatedSharedWorkspace<X>& ws, RunExperts&& run_experts) {
  require(gate.model_dim() == x.cols(), "SharedExpertGate",
          "x must have model_dim = ", gate.model_dim(), " columns, got ", x.cols());
  auto sum = aligned_matrix(ws.sum, x.rows(), x.cols());  // (num_tokens, model_dim)
  auto g = ws.gates.matrix(x.rows(), 1);                  // (num_tokens, 1)
  sum.setZero();
  run_experts(Rows<S>(sum));
  gate.gates(x, g);
  add_gated_rows<S>(sum, g, y);
}

}  // namespace detail

/// Adds the gated shared experts to `y`: `y_t += g_t sum_s S_s(x_t)`, `g = gate.gates(x)`.
/// Shapes: `x` and `y` `(num_tokens, model_dim)`. Bit-identical for any thread count. Throws
/// `moet::Error` (like `add_dense_expert`) on mismatched shapes.
template <Experts X>
void add_gated_shared_experts(const X& shared, const SharedExpertGate<typename X::Scalar>& gate,
                              const ConstRows<typename X::Scalar>& x, Rows<typename X::Scalar> y,
                              GatedSharedWorkspace<X>& ws) {
  using S = typename X::Scalar;
  detail::gated_shared_sum(gate, x, y, ws, [&](Rows<S> sum) {
    for (Index s = 0; s < shared.num_experts(); ++s)
      add_dense_expert(shared, s, S(1), x, sum, ws.dense);
  });
}

/// Training: `add_gated_shared_experts` through the experts' `forward_train`, keeping their
/// summed output, the gate values and the experts' caches in `ws` for
/// `backward_gated_shared_experts`.
template <TrainableExperts X>
void add_gated_shared_experts_train(const X& shared,
                                    const SharedExpertGate<typename X::Scalar>& gate,
                                    const ConstRows<typename X::Scalar>& x,
                                    Rows<typename X::Scalar> y, GatedSharedWorkspace<X>& ws) {
  using S = typename X::Scalar;
  detail::gated_shared_sum(gate, x, y, ws,
                           [&](Rows<S> sum) { add_dense_experts_train(shared, x, sum, ws.dense); });
}

/// Backward of `add_gated_shared_experts_train` (same `shared`, `gate`, `x` and `ws`): for
/// `dL/dy = dy`, accumulates the shared experts' and the gate's gradients and **adds** dL/dx
/// into `dx` (through the experts, `g_t dy_t`, and through the gate). Bit-identical for any
/// thread count.
template <TrainableExperts X>
void backward_gated_shared_experts(X& shared, SharedExpertGate<typename X::Scalar>& gate,
                                   const ConstRows<typename X::Scalar>& x,
                                   const ConstRows<typename X::Scalar>& dy,
                                   Rows<typename X::Scalar> dx, GatedSharedWorkspace<X>& ws) {
  using S = typename X::Scalar;
  const Index num_tokens = x.rows();
  const Index model_dim = x.cols();
  detail::require(ws.dense.train_tokens == num_tokens, "SharedExpertGate",
                  "backward needs a training forward of the same x first (it saw ",
                  ws.dense.train_tokens, " tokens, x has ", num_tokens, ")");
  auto sum = detail::aligned_matrix(ws.sum, num_tokens, model_dim);
  auto g = ws.gates.matrix(num_tokens, 1);
  auto d_sum = detail::aligned_matrix(ws.d_sum, num_tokens, model_dim);  // g ⊙ dy
  auto dz = ws.dz.matrix(num_tokens, 1);                                 // dL/d(x w)
  detail::parallel_blocks(num_tokens, kDenseRowBlock, [&](Index begin, Index end) {
    for (Index t = begin; t < end; ++t) {
      const auto gt = g(t, 0);
      d_sum.row(t) = gt * dy.row(t);
      dz(t, 0) = dy.row(t).dot(sum.row(t)) * gt * (S(1) - gt);
    }
  });
  backward_dense_experts(shared, x, d_sum, dx, ws.dense);
  gate.backward(x, dz, dx);
}

namespace detail {

// A layer's shared-expert step (MoELayer and the expert-parallel layer): nothing without shared
// experts, each shared expert with weight 1, or their sum scaled by `gate` when there is one.
template <Experts X>
void add_shared_experts(const std::optional<X>& shared,
                        const std::optional<SharedExpertGate<typename X::Scalar>>& gate,
                        const ConstRows<typename X::Scalar>& x, Rows<typename X::Scalar> y,
                        DenseWorkspace<X>& dense, GatedSharedWorkspace<X>& gated) {
  if (gate) {
    add_gated_shared_experts(*shared, *gate, x, y, gated);
  } else if (shared) {
    for (Index s = 0; s < shared->num_experts(); ++s) {
      add_dense_expert(*shared, s, typename X::Scalar(1), x, y, dense);
    }
  }
}

// The training forward of that step.
template <TrainableExperts X>
void add_shared_experts_train(const std::optional<X>& shared,
                              const std::optional<SharedExpertGate<typename X::Scalar>>& gate,
                              const ConstRows<typename X::Scalar>& x, Rows<typename X::Scalar> y,
                              DenseWorkspace<X>& dense, GatedSharedWorkspace<X>& gated) {
  if (gate) {
    add_gated_shared_experts_train(*shared, *gate, x, y, gated);
  } else if (shared) {
    add_dense_experts_train(*shared, x, y, dense);
  }
}

// Its backward: accumulates the shared experts' (and their gate's) gradients, adds into `dx`.
template <TrainableExperts X>
void backward_shared_experts(std::optional<X>& shared,
                             std::optional<SharedExpertGate<typename X::Scalar>>& gate,
                             const ConstRows<typename X::Scalar>& x,
                             const ConstRows<typename X::Scalar>& dy, Rows<typename X::Scalar> dx,
                             DenseWorkspace<X>& dense, GatedSharedWorkspace<X>& gated) {
  if (gate) {
    backward_gated_shared_experts(*shared, *gate, x, dy, dx, gated);
  } else if (shared) {
    backward_dense_experts(*shared, x, dy, dx, dense);
  }
}

}  // namespace detail

}  // namespace moet
