#pragma once
/// \file train/optim.hpp
/// Optimisers and gradient utilities over anything with `visit_parameters(f)` (a layer, a gate,
/// an expert bank, or a user model that visits several of them): `zero_grad`, `grad_norm`,
/// `clip_grad_norm`, `Sgd` (momentum, Nesterov, coupled L2 decay) and `AdamW` (decoupled
/// weight decay, Loshchilov & Hutter 2019).
///
/// Optimiser state (velocity, moments) is kept per parameter tensor in visiting order, which is
/// fixed for a given module; every step checks that the module still visits the same number of
/// tensors with the same shapes, and throws `moet::Error` otherwise. All updates are
/// elementwise (each tensor split into one contiguous range per thread): the same bits on every
/// run and for any thread count.
///
/// ```cpp
/// moet::AdamW<float> opt({.lr = 1e-3, .weight_decay = 0.01});
/// layer.zero_grad();
/// layer.forward_train(x, y, ctx, ws);  ...  layer.backward(x, dy, ctx, ws, dx);
/// opt.step(layer);
/// ```

#include <cmath>
#include <concepts>
#include <cstddef>
#include <string_view>
#include <type_traits>
#include <vector>

#include "moet/concepts.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/detail/kernels/elementwise.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/errors.hpp"
#include "moet/kernel_isa.hpp"
#include "moet/tensor.hpp"

namespace moet {

namespace detail {

/// Per-tensor optimiser state: `slots` buffers of the tensor's shape.
template <class S>
struct TensorState {
  Index rows = 0;
  Index cols = 0;
  std::vector<RowMatrix<S>> buffers;
};

/// Checks (or, on the first step, creates) the state of every visited tensor.
template <class S>
class OptimizerState {
 public:
  /// `op` names the optimiser in errors; `slots` is the number of buffers per tensor.
  OptimizerState(const char* op, int slots) : op_(op), slots_(slots) {}

  /// The state of visited tensor number `i` `(rows, cols)`: created zero on the first step,
  /// checked on later ones.
  TensorState<S>& at(std::size_t i, std::string_view name, Index rows, Index cols) {
    if (initialised_) {
      require(i < states_.size(), op_, "the module now visits more parameter tensors (", i + 1,
              ") than at the first step (", states_.size(), "), at '", name, "'");
      TensorState<S>& state = states_[i];
      require(state.rows == rows && state.cols == cols, op_, "parameter '", name,
              "' changed shape from (", state.rows, ", ", state.cols, ") to (", rows, ", ", cols,
              ") since the first step");
      return state;
    }
    TensorState<S>& state = states_.emplace_back();
    state.rows = rows;
    state.cols = cols;
    state.buffers.assign(static_cast<std::size_t>(slots_), RowMatrix<S>::Zero(rows, cols));
    return state;
  }

  /// Ends a step that visited `count` tensors.
  void finish(std::size_t count) {
    if (initialised_) {
      require(count == states_.size(), op_, "the module now visits ", count, " parameter tensors, ",
              states_.size(), " at the first step");
    }
    initialised_ = true;
  }

  /// Forgets all state (the next step starts afresh).
  void reset() {
    states_.clear();
    initialised_ = false;
  }

  /// One optimiser step over `module`: `update(p, g, state, n)` for every visited tensor in
  /// visiting order (its `n` values `p` and gradients `g`, and its `state`), then counts the
  /// step and calls the module's `parameters_changed` hook.
  template <class M, class Update>
  void step(M& module, Update&& update) {
    std::size_t i = 0;
    module.visit_parameters([&](std::string_view name, ParamMap<S> value, ParamMap<S> grad) {
      auto& state = at(i++, name, value.rows(), value.cols());
      update(value.data(), static_cast<const S*>(grad.data()), state, value.size());
    });
    finish(i);
    ++steps_;
    notify_parameters_changed(module);
  }

  /// Steps taken.
  long long steps() const { return steps_; }

 private:
  const char* op_;
  int slots_;
  bool initialised_ = false;
  std::vector<TensorState<S>> states_;
  long long steps_ = 0;
};

/// `lr` when it is positive and finite; throws `Error` naming `op` otherwise.
inline double checked_lr(const char* op, double lr) {
  require(std::isfinite(lr) && lr > 0.0, op, "lr must be positive and finite, got ", lr);
  return lr;
}

}  // namespace detail

/// Sets every gradient of `module` to zero (allocating them on first use).
template <class M>
void zero_grad(M& module) {
  module.zero_grad();
}

/// The global L2 norm of every gradient of `module`, accumulated in double in visiting order.
/// It goes through `visit_parameters`, which hands the weights out for writing: an expert bank's
/// `forward` then throws until `parameters_changed()` (the optimisers' `step` calls it), so call
/// it between `backward` and `step`, as training loops do (`clip_grad_norm` too).
template <class S, class M>
requires ParameterModule<M, S>
double grad_norm(M& module) {
  double sum = 0.0;
  module.visit_parameters([&](std::string_view, ParamMap<S>, ParamMap<S> grad) {
    for (Index i = 0; i < grad.size(); ++i) {
      const double g = static_cast<double>(grad.data()[i]);
      sum += g * g;
    }
  });
  return std::sqrt(sum);
}

/// Scales every gradient of `module` by `max_norm / norm` when their global L2 norm exceeds
/// `max_norm` (> 0); returns the norm before clipping. Throws `moet::Error` naming
/// `clip_grad_norm` when `max_norm` is not positive and finite, or a gradient is NaN or Inf.
template <class S, class M>
requires ParameterModule<M, S>
double clip_grad_norm(M& module, double max_norm) {
  detail::require(std::isfinite(max_norm) && max_norm > 0.0, "clip_grad_norm",
                  "max_norm must be positive and finite, got ", max_norm);
  const double norm = grad_norm<S>(module);
  detail::require(std::isfinite(norm), "clip_grad_norm", "the gradients hold a NaN or Inf (norm ",
                  norm, ")");
  if (norm > max_norm) {
    const auto scale = static_cast<S>(max_norm / norm);
    module.visit_parameters(
        [&](std::string_view, ParamMap<S>, ParamMap<S> grad) { grad *= scale; });
  }
  return norm;
}

/// Stochastic gradient descent with optional momentum (PyTorch's convention):
/// ```
/// g ← grad + weight_decay · p          (coupled L2 decay)
/// v ← momentum · v + g                 (v = g at the first step)
/// p ← p − lr · (nesterov ? g + momentum · v : v)
/// ```
/// \tparam S scalar of the parameters.
template <class S>
class Sgd {
 public:
  /// Hyper-parameters.
  struct Options {
    /// Learning rate (> 0).
    double lr = 1e-2;
    /// Momentum in [0, 1).
    double momentum = 0.0;
    /// Coupled L2 weight decay (>= 0), added to the gradient.
    double weight_decay = 0.0;
    /// Nesterov momentum (needs momentum > 0).
    bool nesterov = false;
  };

  /// Throws `moet::Error` naming `Sgd` for an out-of-range option.
  explicit Sgd(const Options& options) : options_(options) {
    detail::checked_lr(kOp, options_.lr);
    detail::require(options_.momentum >= 0.0 && options_.momentum < 1.0, kOp,
                    "momentum must be in [0, 1), got ", options_.momentum);
    detail::require(options_.weight_decay >= 0.0 && std::isfinite(options_.weight_decay), kOp,
                    "weight_decay must be >= 0 and finite, got ", options_.weight_decay);
    detail::require(!options_.nesterov || options_.momentum > 0.0, kOp,
                    "nesterov needs momentum > 0, got ", options_.momentum);
  }

  /// One update of every parameter of `module` from its accumulated gradients.
  template <class M>
  requires ParameterModule<M, S>
  void step(M& module) {
    const S lr = static_cast<S>(options_.lr);
    const S mu = static_cast<S>(options_.momentum);
    const S wd = static_cast<S>(options_.weight_decay);
    const bool use_momentum = options_.momentum > 0.0;
    const bool first = state_.steps() == 0;
    state_.step(module, [&](S* p, const S* g, detail::TensorState<S>& state, Index n) {
      S* v = use_momentum ? state.buffers[0].data() : nullptr;
      const bool nesterov = options_.nesterov;
      detail::parallel_ranges(n, detail::kElementwiseBlock, [&](Index b, Index e) {
        for (Index j = b; j < e; ++j) {
          S d = g[j] + wd * p[j];
          if (use_momentum) {
            v[j] = first ? d : mu * v[j] + d;
            d = nesterov ? d + mu * v[j] : v[j];
          }
          p[j] -= lr * d;
        }
      });
    });
  }

  /// Steps taken.
  long long steps() const { return state_.steps(); }
  /// The options in use; `set_lr` changes the learning rate (schedules).
  const Options& options() const { return options_; }
  void set_lr(double lr) { options_.lr = detail::checked_lr(kOp, lr); }

 private:
  static constexpr const char* kOp = "Sgd";
  Options options_;
  detail::OptimizerState<S> state_{kOp, 1};
};

/// Adam with decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
/// Regularization", ICLR 2019), in PyTorch's order:
/// ```
/// p ← p · (1 − lr · weight_decay)
/// m ← β1 m + (1 − β1) g;   v ← β2 v + (1 − β2) g²
/// p ← p − lr · (m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + eps)
/// ```
/// Moments are kept in `S`; bias corrections are computed in double. Float parameters are
/// updated by the vector kernel of the selected level (`kernel_isa()`, kernels/elementwise.inl:
/// the same expressions, bound by memory); levels may differ in the last bits where the
/// compiler fuses a multiply and an add, never between runs or thread counts.
/// \tparam S scalar of the parameters.
template <class S>
class AdamW {
 public:
  /// Hyper-parameters (PyTorch's defaults).
  struct Options {
    /// Learning rate (> 0).
    double lr = 1e-3;
    /// First-moment decay in [0, 1).
    double beta1 = 0.9;
    /// Second-moment decay in [0, 1).
    double beta2 = 0.999;
    /// Denominator guard (> 0).
    double eps = 1e-8;
    /// Decoupled weight decay (>= 0).
    double weight_decay = 1e-2;
  };

  /// Throws `moet::Error` naming `AdamW` for an out-of-range option.
  explicit AdamW(const Options& options) : options_(options) {
    detail::checked_lr(kOp, options_.lr);
    detail::require(options_.beta1 >= 0.0 && options_.beta1 < 1.0, kOp,
                    "beta1 must be in [0, 1), got ", options_.beta1);
    detail::require(options_.beta2 >= 0.0 && options_.beta2 < 1.0, kOp,
                    "beta2 must be in [0, 1), got ", options_.beta2);
    detail::require(std::isfinite(options_.eps) && options_.eps > 0.0, kOp,
                    "eps must be positive and finite, got ", options_.eps);
    detail::require(options_.weight_decay >= 0.0 && std::isfinite(options_.weight_decay), kOp,
                    "weight_decay must be >= 0 and finite, got ", options_.weight_decay);
  }

  /// One update of every parameter of `module` from its accumulated gradients.
  template <class M>
  requires ParameterModule<M, S>
  void step(M& module) {
    const double t = static_cast<double>(state_.steps() + 1);
    const detail::AdamWCoefficients<S> c{
        .decay = static_cast<S>(1.0 - options_.lr * options_.weight_decay),
        .b1 = static_cast<S>(options_.beta1),
        .one_minus_b1 = S(1) - static_cast<S>(options_.beta1),
        .b2 = static_cast<S>(options_.beta2),
        .one_minus_b2 = S(1) - static_cast<S>(options_.beta2),
        .c1 = static_cast<S>(1.0 - std::pow(options_.beta1, t)),
        .c2 = static_cast<S>(1.0 - std::pow(options_.beta2, t)),
        .lr = static_cast<S>(options_.lr),
        .eps = static_cast<S>(options_.eps)};
    const KernelIsa isa = kernel_isa();
    state_.step(module, [&](S* p, const S* g, detail::TensorState<S>& state, Index n) {
      S* m = state.buffers[0].data();
      S* v = state.buffers[1].data();
      // One contiguous range per thread: 7 streams of 4 bytes per value, bound by memory
      // (blocks handed out dynamically interleave the threads' streams; see parallel_ranges).
      detail::parallel_ranges(n, detail::kElementwiseBlock, [&](Index b, Index e) {
        if constexpr (std::is_same_v<S, float>) {
          // The vector kernel of the selected level (a plain loop stays scalar: std::sqrt).
          detail::adamw_update(c, p + b, g + b, m + b, v + b, e - b, isa);
        } else {
          for (Index j = b; j < e; ++j) detail::adamw_one(c, p[j], g[j], m[j], v[j]);
        }
      });
    });
  }

  /// Steps taken.
  long long steps() const { return state_.steps(); }
  /// The options in use; `set_lr` changes the learning rate (schedules).
  const Options& options() const { return options_; }
  void set_lr(double lr) { options_.lr = detail::checked_lr(kOp, lr); }

 private:
  static constexpr const char* kOp = "AdamW";
  Options options_;
  detail::OptimizerState<S> state_{kOp, 2};
};

}  // namespace moet
