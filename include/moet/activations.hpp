#pragma once
/// \file activations.hpp
/// Elementwise activation policies for the expert banks: `Silu`, `Gelu` (exact, erf form),
/// `GeluTanh` (tanh approximation) and `Relu`. Each is a stateless type with
/// `static S apply(S)` and `static S derivative(S)` (the derivative is for training), used as a
/// template argument: `moet::GluExperts<float, moet::Silu>` is SwiGLU.

#include <cmath>
#include <numbers>
#include <type_traits>

#include "moet/concepts.hpp"

namespace moet {

/// SiLU (swish with beta = 1): `silu(x) = x * sigmoid(x) = x / (1 + exp(-x))`. The gate
/// nonlinearity of SwiGLU experts (docs/algorithms.md §2.1, §2.3).
struct Silu {
  static constexpr const char* kName = "silu";

  /// `sigmoid(x) = 1 / (1 + exp(-x))`, evaluated without overflow for either sign of `x`.
  template <class S>
  static S sigmoid(S x) {
    if (x >= S(0)) return S(1) / (S(1) + std::exp(-x));
    const S e = std::exp(x);
    return e / (S(1) + e);
  }
  /// `x * sigmoid(x)`.
  template <class S>
  static S apply(S x) {
    return x * sigmoid(x);
  }
  /// `d silu / dx = s (1 + x (1 - s))` with `s = sigmoid(x)`.
  template <class S>
  static S derivative(S x) {
    const S s = sigmoid(x);
    return s * (S(1) + x * (S(1) - s));
  }
  /// `apply(x)` and `derivative(x)` from one sigmoid (the same bits as the two calls).
  template <class S>
  static void value_and_derivative(S x, S& value, S& slope) {
    const S s = sigmoid(x);
    value = x * s;
    slope = s * (S(1) + x * (S(1) - s));
  }
};

/// GELU, exact form: `gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))`, `Phi` the standard
/// normal CDF (PyTorch's `F.gelu` default, `approximate='none'`; GeGLU and the fairseq/THOR FFN).
/// See `GeluTanh` for the tanh approximation; the two differ by up to about 5e-4 in absolute
/// value near |x| = 2.
struct Gelu {
  static constexpr const char* kName = "gelu";

  /// `0.5 x (1 + erf(x / sqrt(2)))`.
  template <class S>
  static S apply(S x) {
    return S(0.5) * x * (S(1) + std::erf(x * S(std::numbers::sqrt2 / 2.0)));
  }
  /// `d gelu / dx = Phi(x) + x phi(x)`, `phi(x) = exp(-x^2 / 2) / sqrt(2 pi)`.
  template <class S>
  static S derivative(S x) {
    const S cdf = S(0.5) * (S(1) + std::erf(x * S(std::numbers::sqrt2 / 2.0)));
    // 1 / sqrt(2 pi) = inv_sqrtpi / sqrt2
    const S pdf = S(std::numbers::inv_sqrtpi / std::numbers::sqrt2) * std::exp(S(-0.5) * x * x);
    return cdf + x * pdf;
  }
};

/// GELU, tanh approximation (Hendrycks & Gimpel; PyTorch's `approximate='tanh'`, GPT-2's
/// `gelu_new`): `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
struct GeluTanh {
  static constexpr const char* kName = "gelu_tanh";
  /// The cubic coefficient of the approximation.
  static constexpr double kCubic = 0.044715;
  /// `sqrt(2 / pi) = 2 * inv_sqrtpi / sqrt2`.
  static constexpr double kScale = 2.0 * std::numbers::inv_sqrtpi / std::numbers::sqrt2;

  /// `0.5 x (1 + tanh(u))`, `u = sqrt(2/pi) (x + 0.044715 x^3)`.
  template <class S>
  static S apply(S x) {
    const S u = S(kScale) * (x + S(kCubic) * x * x * x);
    return S(0.5) * x * (S(1) + std::tanh(u));
  }
  /// `0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)`.
  template <class S>
  static S derivative(S x) {
    const S u = S(kScale) * (x + S(kCubic) * x * x * x);
    const S th = std::tanh(u);
    const S du = S(kScale) * (S(1) + S(3.0 * kCubic) * x * x);
    return S(0.5) * (S(1) + th) + S(0.5) * x * (S(1) - th * th) * du;
  }
};

/// ReLU: `max(x, 0)`. The derivative at 0 is taken as 0 (PyTorch's convention).
struct Relu {
  static constexpr const char* kName = "relu";

  /// `max(x, 0)`.
  template <class S>
  static S apply(S x) {
    return x > S(0) ? x : S(0);
  }
  /// 1 for `x > 0`, else 0.
  template <class S>
  static S derivative(S x) {
    return x > S(0) ? S(1) : S(0);
  }
};

/// Writes `Act::apply(x)` and `Act::derivative(x)` into `value` and `slope`, through
/// `Act::value_and_derivative` when the policy has it (sharing work such as SiLU's sigmoid),
/// else through the two functions. For the expert banks' backward.
template <class Act, class S>
void activation_value_and_derivative(S x, S& value, S& slope) {
  if constexpr (ActivationValueAndDerivativeHook<Act, S>) {
    Act::template value_and_derivative<S>(x, value, slope);
  } else {
    value = Act::template apply<S>(x);
    slope = Act::template derivative<S>(x);
  }
}

/// Applies `Act` to every entry of `m` in place (`m` an Eigen matrix, map, block or `Ref`).
///
/// Evaluated one scalar at a time through `Act::apply` (no SIMD packet path), so an entry's
/// value never depends on its address or its position in the block: the dispatchers rely on
/// this for results that are bit-identical for any thread count.
///
/// \tparam Act an activation policy (`Silu`, `Gelu`, `GeluTanh`, `Relu`, or your own type with
///   `template <class S> static S apply(S)`).
template <class Act, class Matrix>
void apply_activation(Matrix&& m) {
  using S = typename std::remove_cvref_t<Matrix>::Scalar;
  m = m.unaryExpr([](S v) { return Act::template apply<S>(v); });
}

}  // namespace moet
