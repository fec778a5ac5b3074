#pragma once
/// \file detail/bf16.hpp
/// The bfloat16 storage type of bf16 expert weights (`WeightFormat::kBf16`) and its
/// conversions from and to float.
///
/// bfloat16 is the upper half of an IEEE binary32: sign, the same 8 exponent bits, 7 stored
/// mantissa bits (8 significant bits, relative rounding error at most 2^-9 = 0.2%). Every bf16
/// value is exactly a float, and the product of two bf16 values is exact in float (8 + 8
/// significant bits <= 24), which is why dot products of bf16 pairs with float accumulation
/// (AVX512-BF16's `vdpbf16ps`) lose precision only in the rounding of the inputs and of the sum.

#include <bit>
#include <cstdint>

namespace moet::detail {

/// One bfloat16 value, stored as its 16 bits (trivially copyable, 2 bytes; `Bf16{}` is +0).
struct Bf16 {
  std::uint16_t bits;
};
static_assert(sizeof(Bf16) == 2, "Bf16 must be two bytes");

/// `v` rounded to the nearest bfloat16, ties to even (the rounding of `vcvtneps2bf16`). NaN
/// stays NaN (quietened: the top mantissa bit is set, so truncation cannot turn it into an
/// infinity), infinities stay infinities, and finite values beyond the largest bf16
/// (about 3.39e38) round to infinity as IEEE rounding does.
constexpr Bf16 to_bf16(float v) {
  const auto u = std::bit_cast<std::uint32_t>(v);
  if ((u & 0x7fffffffU) > 0x7f800000U) {
    return Bf16{static_cast<std::uint16_t>((u >> 16) | 0x0040U)};
  }
  const std::uint32_t rounded = u + 0x7fffU + ((u >> 16) & 1U);
  return Bf16{static_cast<std::uint16_t>(rounded >> 16)};
}

/// The float `b` represents (exact).
constexpr float from_bf16(Bf16 b) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b.bits) << 16);
}

/// `v` rounded through bf16 and back: the value a bf16 kernel actually multiplies.
constexpr float round_to_bf16(float v) { return from_bf16(to_bf16(v)); }

}  // namespace moet::detail
