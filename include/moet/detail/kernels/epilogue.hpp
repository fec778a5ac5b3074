#pragma once
/// \file detail/kernels/epilogue.hpp
/// What every kernel level shares besides the blocking: the epilogue tags of the micro-kernels
/// and the constants of the vectorised SiLU.

namespace moet::detail {

/// Epilogue: store the raw accumulators (`M x P nr`).
struct RawEpilogue {};
/// Epilogue: `out = Act(gate) * up` (`M x P nr / 2`), gate and up being the two halves of each
/// panel's accumulators.
template <class Act>
struct GluEpilogue {
  using Activation = Act;
};

template <class E>
inline constexpr bool kIsGluEpilogue = false;
template <class Act>
inline constexpr bool kIsGluEpilogue<GluEpilogue<Act>> = true;

/// Constants of the vectorised `exp(t)` for `t <= 0` used by the kernels' SiLU (derivations
/// inline).
namespace exp_constants {
/// Below this argument `exp` returns 0: `exp(-87) = 1.6e-38` is still a normal float, and
/// `round(-87 * log2(e)) = -126` keeps the scale `2^n` normal.
inline constexpr float kMinArg = -87.0f;
/// `log2(e)`, turns `t` into the power of two `n = round(t log2(e))`.
inline constexpr float kLog2e = 1.44269504088896341f;
/// `ln 2 = kLn2Hi + kLn2Lo` (Cody-Waite split): `kLn2Hi = 0.693359375` has 9 significant bits,
/// so `n * kLn2Hi` is exact for `|n| <= 2^15` and `t - n ln 2` loses no bits.
inline constexpr float kLn2Hi = 0.693359375f;
inline constexpr float kLn2Lo = -2.12194440054690583e-4f;
/// Taylor coefficients `1 / i!` of `exp(r)` on `|r| <= ln(2) / 2`: the degree-7 truncation
/// error is at most `(ln 2 / 2)^8 / 8! * sqrt(2) = 7.3e-9`, far below float rounding.
inline constexpr float kC2 = 1.0f / 2.0f;
inline constexpr float kC3 = 1.0f / 6.0f;
inline constexpr float kC4 = 1.0f / 24.0f;
inline constexpr float kC5 = 1.0f / 120.0f;
inline constexpr float kC6 = 1.0f / 720.0f;
inline constexpr float kC7 = 1.0f / 5040.0f;
}  // namespace exp_constants

}  // namespace moet::detail
