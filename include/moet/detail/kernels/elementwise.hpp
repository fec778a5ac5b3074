#pragma once
/// \file detail/kernels/elementwise.hpp
/// The elementwise update of the AdamW optimiser (train/optim.hpp): its coefficients and the
/// scalar formula, which kernels/elementwise.inl vectorises per kernel level and which runs
/// for other scalar types and the tails of the vector loops.

#include <cmath>

namespace moet::detail {

/// One AdamW step's coefficients in the parameters' scalar type: the bias corrections
/// `c1 = 1 - beta1^t`, `c2 = 1 - beta2^t` and the decay `1 - lr weight_decay` computed in
/// double by the optimiser, then rounded.
template <class S>
struct AdamWCoefficients {
  S decay;
  S b1;
  S one_minus_b1;
  S b2;
  S one_minus_b2;
  S c1;
  S c2;
  S lr;
  S eps;
};

/// AdamW's update of one parameter `p` with gradient `g` and moments `m`, `v`, in PyTorch's
/// order (every operation rounded to `S`; the vector kernels compute the same expressions):
/// ```
/// p = p decay;  m = b1 m + (1 - b1) g;  v = b2 v + ((1 - b2) g) g
/// p = p - (lr (m / c1)) / (sqrt(v / c2) + eps)
/// ```
template <class S>
inline void adamw_one(const AdamWCoefficients<S>& c, S& p, S g, S& m, S& v) {
  const S decayed = p * c.decay;
  m = c.b1 * m + c.one_minus_b1 * g;
  v = c.b2 * v + c.one_minus_b2 * g * g;
  p = decayed - c.lr * (m / c.c1) / (std::sqrt(v / c.c2) + c.eps);
}

}  // namespace moet::detail
