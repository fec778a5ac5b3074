#pragma once
/// \file detail/quant.hpp
/// Block-quantised weights: IEEE half precision (the scales' format), the three block formats
/// of ggml/GGUF that moet reads and packs (`Q8_0`, `Q4_0`, `Q4_1`: 32 weights per block), and
/// their reference quantisation and dequantisation.
///
/// The formats (one block = 32 consecutive weights along the reduction dimension `K`):
///
/// | format | block bytes | weight value                    | bits per weight |
/// |--------|-------------|---------------------------------|-----------------|
/// | `Q8_0` | 2 + 32      | `d * q`, `q` in [-127, 127]     | 8.5             |
/// | `Q4_0` | 2 + 16      | `d * (q - 8)`, `q` in [0, 15]   | 4.5             |
/// | `Q4_1` | 2 + 2 + 16  | `d * q + m`, `q` in [0, 15]     | 5               |
///
/// `d` and `m` are stored in half precision (`to_f16`, round to nearest even), as in GGUF files,
/// so blocks read from a file pack without re-quantising. The quantisers round as ggml's
/// reference quantisers (`quantize_row_q8_0_ref` and friends) do, so a layer quantised here and
/// one quantised by llama.cpp hold the same codes:
/// - `Q8_0`: `d = max|x| / 127`, `q = round(x / d)` (half away from zero), with the float `d`;
///   the stored scale is `d` rounded to half.
/// - `Q4_0`: `d = x_max / -8` where `x_max` is the weight of largest magnitude (sign kept), and
///   `q = min(15, floor(x / d + 8.5))`.
/// - `Q4_1`: `d = (max - min) / 15`, `m = min`, `q = min(15, floor((x - min) / d + 0.5))`.
/// An all-zero block stores `d = 0` (and `q = 0`, or 8 for `Q4_0`). Packing rejects non-finite
/// weights and blocks whose scale overflows half precision (`max|w| > 65504 * 127` for
/// `Q8_0`, `> 65504 * 8` for `Q4_0`); blocks of tiny weights (scale below 2^-14, the smallest
/// normal half) keep a subnormal scale with fewer significant bits, as GGUF files do.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "moet/errors.hpp"
#include "moet/tensor.hpp"

namespace moet::detail {

/// Weights per quantisation block.
inline constexpr Index kQuantBlock = 32;

/// `v` rounded to the nearest IEEE binary16 (ties to even); overflow gives infinity, NaN stays
/// NaN, tiny values become half subnormals or zero (the rounding of `vcvtps2ph` with
/// `_MM_FROUND_TO_NEAREST_INT`).
constexpr std::uint16_t to_f16(float v) {
  const auto u = std::bit_cast<std::uint32_t>(v);
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000U);
  const std::uint32_t abs = u & 0x7fffffffU;
  if (abs > 0x7f800000U) return static_cast<std::uint16_t>(sign | 0x7e00U);  // NaN
  if (abs >= 0x477ff000U) return static_cast<std::uint16_t>(sign | 0x7c00U);  // >= 65520: inf
  if (abs < 0x38800000U) {
    // Below the smallest normal half (2^-14): a subnormal half, m * 2^-24, rounded to nearest
    // even. abs * 2^24 as an exact float, then round half to even by hand.
    if (abs < 0x33000000U) return sign;  // < 2^-25: rounds to zero (2^-25 itself ties to 0)
    const std::uint32_t exp = abs >> 23;            // biased exponent, 102..112
    const std::uint32_t mant = (abs & 0x7fffffU) | 0x800000U;
    const std::uint32_t shift = 126 - exp;          // so that value = mant >> (shift) in 2^-24
    const std::uint32_t q = mant >> shift;
    const std::uint32_t rem = mant & ((1U << shift) - 1U);
    const std::uint32_t half = 1U << (shift - 1U);
    const std::uint32_t r = q + ((rem > half || (rem == half && (q & 1U))) ? 1U : 0U);
    return static_cast<std::uint16_t>(sign | r);
  }
  // Normal half: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits.
  const std::uint32_t rebased = abs - (112U << 23);
  const std::uint32_t rounded = rebased + 0xfffU + ((rebased >> 13) & 1U);
  return static_cast<std::uint16_t>(sign | (rounded >> 13));
}

/// The float a half represents (exact).
constexpr float from_f16(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000U) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fU;
  const std::uint32_t mant = h & 0x3ffU;
  if (exp == 0x1fU) return std::bit_cast<float>(sign | 0x7f800000U | (mant << 13));  // inf, NaN
  if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112U) << 23) | (mant << 13));
  // Zero or subnormal: mant * 2^-24.
  const float magnitude = static_cast<float>(mant) * 0x1p-24f;
  return sign != 0 ? -magnitude : magnitude;
}

/// One `Q8_0` block as GGUF stores it: the half scale, then 32 signed codes.
struct BlockQ8_0 {
  std::uint16_t d;
  std::int8_t qs[kQuantBlock];
};
/// One `Q4_0` block as GGUF stores it: the half scale, then 16 bytes of codes; byte `j` holds
/// weight `j` in its low nibble and weight `j + 16` in its high nibble.
struct BlockQ4_0 {
  std::uint16_t d;
  std::uint8_t qs[kQuantBlock / 2];
};
/// One `Q4_1` block as GGUF stores it: half scale and minimum, then the codes as in `Q4_0`.
struct BlockQ4_1 {
  std::uint16_t d;
  std::uint16_t m;
  std::uint8_t qs[kQuantBlock / 2];
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20,
              "GGUF block layouts");

/// Element tags of packed quantised weights (`PackedMatrix<Q8_0>` ...).
struct Q8_0 {
  using Block = BlockQ8_0;
  static constexpr const char* kName = "q8_0";
};
struct Q4_0 {
  using Block = BlockQ4_0;
  static constexpr const char* kName = "q4_0";
};
struct Q4_1 {
  using Block = BlockQ4_1;
  static constexpr const char* kName = "q4_1";
};

/// Quantises the 32 weights `x` into `out` (see the file comment for the rounding).
inline void quantize_block(const float* x, BlockQ8_0& out) {
  float amax = 0.0f;
  for (Index i = 0; i < kQuantBlock; ++i) amax = std::max(amax, std::abs(x[i]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  out.d = to_f16(d);
  for (Index i = 0; i < kQuantBlock; ++i) out.qs[i] = static_cast<std::int8_t>(std::round(x[i] * id));
}
inline void quantize_block(const float* x, BlockQ4_0& out) {
  float amax = 0.0f;
  float max = 0.0f;
  for (Index i = 0; i < kQuantBlock; ++i) {
    if (std::abs(x[i]) > amax) {
      amax = std::abs(x[i]);
      max = x[i];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  out.d = to_f16(d);
  for (Index j = 0; j < kQuantBlock / 2; ++j) {
    const auto q0 = std::min(15, static_cast<int>(x[j] * id + 8.5f));
    const auto q1 = std::min(15, static_cast<int>(x[j + kQuantBlock / 2] * id + 8.5f));
    out.qs[j] = static_cast<std::uint8_t>(q0 | (q1 << 4));
  }
}
inline void quantize_block(const float* x, BlockQ4_1& out) {
  float min = x[0];
  float max = x[0];
  for (Index i = 1; i < kQuantBlock; ++i) {
    min = std::min(min, x[i]);
    max = std::max(max, x[i]);
  }
  const float d = (max - min) / 15.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  out.d = to_f16(d);
  out.m = to_f16(min);
  for (Index j = 0; j < kQuantBlock / 2; ++j) {
    const auto q0 = std::min(15, static_cast<int>((x[j] - min) * id + 0.5f));
    const auto q1 = std::min(15, static_cast<int>((x[j + kQuantBlock / 2] - min) * id + 0.5f));
    out.qs[j] = static_cast<std::uint8_t>(q0 | (q1 << 4));
  }
}

/// The code of weight `i` (0..31) of a block: `q` for `Q8_0`, the unsigned nibble for the
/// 4-bit formats.
inline int block_code(const BlockQ8_0& b, Index i) { return b.qs[i]; }
inline int block_code(const BlockQ4_0& b, Index i) {
  const std::uint8_t byte = b.qs[i % (kQuantBlock / 2)];
  return i < kQuantBlock / 2 ? (byte & 0xf) : (byte >> 4);
}
inline int block_code(const BlockQ4_1& b, Index i) {
  const std::uint8_t byte = b.qs[i % (kQuantBlock / 2)];
  return i < kQuantBlock / 2 ? (byte & 0xf) : (byte >> 4);
}

/// The value weight `i` of a block stands for.
inline float block_value(const BlockQ8_0& b, Index i) {
  return from_f16(b.d) * static_cast<float>(block_code(b, i));
}
inline float block_value(const BlockQ4_0& b, Index i) {
  return from_f16(b.d) * static_cast<float>(block_code(b, i) - 8);
}
inline float block_value(const BlockQ4_1& b, Index i) {
  return from_f16(b.d) * static_cast<float>(block_code(b, i)) + from_f16(b.m);
}

}  // namespace moet::detail
