#pragma once
/// \file train/loss_checks.hpp
/// The argument checks and small numerics the loss functions of train/*_loss*.hpp share:
/// shapes, validity masks, finiteness, tensor2tensor's `CV^2`, the normal distribution, the
/// log-0 floor. Internal (`moet::detail`).

#include <cmath>
#include <cstdint>
#include <numbers>
#include <span>
#include <vector>

#include "moet/detail/select.hpp"
#include "moet/errors.hpp"
#include "moet/tensor.hpp"

namespace moet {

namespace detail {

/// Throws `Error` naming `op` unless `m` is `(rows, cols)`.
template <class M>
void require_shape(const char* op, const char* name, const M& m, Index rows, Index cols) {
  require(m.rows() == rows && m.cols() == cols, op, name, " must be (", rows, ", ", cols,
          "), got (", m.rows(), ", ", m.cols(), ")");
}

/// Throws `Error` naming `op` unless `valid` is empty or has `num_tokens` entries; returns the
/// number of valid tokens.
inline Index count_valid(const char* op, std::span<const std::uint8_t> valid, Index num_tokens) {
  if (valid.empty()) return num_tokens;
  require(static_cast<Index>(valid.size()) == num_tokens, op,
          "valid must be empty or have one entry per token (", num_tokens, "), got ", valid.size());
  Index n = 0;
  for (const std::uint8_t v : valid) n += v != 0 ? 1 : 0;
  return n;
}

inline bool is_valid(std::span<const std::uint8_t> valid, Index t) {
  return valid.empty() || valid[static_cast<std::size_t>(t)] != 0;
}

/// Throws `Error` naming `op` unless every entry of `m` is finite.
template <class M>
void require_finite(const char* op, const char* name, const M& m) {
  if (all_finite(m)) return;
  for (Index t = 0; t < m.rows(); ++t) {
    for (Index e = 0; e < m.cols(); ++e) {
      require(std::isfinite(m(t, e)), op, name, " must be finite, got ", m(t, e), " at (", t, ", ",
              e, ")");
    }
  }
}

/// `CV^2 = Var / (mean^2 + 1e-10)` of `v` (population variance, tensor2tensor's `cv_squared`)
/// and its gradient `grad[e] = dCV^2/dv_e`. A single value gives 0 (t2t returns 0 for n = 1).
inline double cv_squared(const std::vector<double>& v, std::vector<double>& grad) {
  const auto n = static_cast<double>(v.size());
  grad.assign(v.size(), 0.0);
  if (v.size() <= 1) return 0.0;
  double mean = 0.0;
  for (const double x : v) mean += x;
  mean /= n;
  double var = 0.0;
  for (const double x : v) var += (x - mean) * (x - mean);
  var /= n;
  const double denom = mean * mean + 1e-10;
  for (std::size_t e = 0; e < v.size(); ++e) {
    grad[e] = 2.0 * (v[e] - mean) / n / denom - var * 2.0 * mean / n / (denom * denom);
  }
  return var / denom;
}

/// Standard normal CDF and density.
inline double normal_cdf(double u) { return 0.5 * std::erfc(-u / std::numbers::sqrt2); }
inline double normal_pdf(double u) {
  return std::exp(-0.5 * u * u) / std::sqrt(2.0 * std::numbers::pi);
}

/// Probabilities below this are clamped inside logarithms (`log 0` guard).
inline constexpr double kLogFloor = 1e-30;

}  // namespace detail

}  // namespace moet
