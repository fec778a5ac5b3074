#pragma once
/// \file weight_format.hpp
/// `WeightFormat`: the element type of the packed copies an expert bank's inference kernels
/// read (its trainable weights are always the bank's scalar type).

#include <string_view>
#include <type_traits>

#include "moet/errors.hpp"

namespace moet {

/// Element type of a float expert bank's packed kernel weights (`Options::weight_format`).
///
/// - `kF32`: float copies; `forward` is exact float arithmetic (one FMA chain per output).
/// - `kBf16`: bfloat16 copies (half the bytes: decode, which streams the weights from memory,
///   runs up to twice as fast). `forward` rounds the weights and each product's input rows to
///   bf16 and accumulates in float (`vdpbf16ps` on the `avx512bf16` kernel level; elsewhere,
///   Intel CPUs by default included, FMAs on the weight pairs split into floats in registers).
///   Expect a relative error of a few 1e-3 against `kF32`
///   (tests/test_gemm_bf16.cpp measures and bounds it).
/// - `kQ8_0`, `kQ4_0`, `kQ4_1`: ggml's block formats (detail/quant.hpp): each column's blocks of
///   32 weights along the input dimension share a half-precision scale (and, for `kQ4_1`, a
///   minimum); 8.5, 4.5 and 5 bits per weight. On every x86 kernel level the products run on
///   8-bit integer dot products (`vpdpbusd` with AVX512-VNNI or AVX-VNNI; `vpmaddubsw` +
///   `vpmaddwd`, exact like it, on `avx2` and `avx512`) with each row of the activations
///   quantised per block of 32 to 8 bits on the fly, as llama.cpp does; the portable level
///   dequantises the weights to float in the kernels (float activations).
///
/// In every format the router, the combine and the master weights stay float: the optimisers
/// update the bank's float weights and `parameters_changed()` re-rounds or re-quantises them;
/// `forward_train` runs an f32 or bf16 copy (block formats: Eigen on the float weights) and
/// `backward` the float weights packed transposed (as bf16 for a bf16 bank, whose backward
/// products all take bf16 operands, activations rounded per product, and accumulate in float;
/// float otherwise); an `inference_only` bank keeps the packed copy alone.
enum class WeightFormat { kF32, kBf16, kQ8_0, kQ4_0, kQ4_1 };

/// Every format, in the enum's order.
inline constexpr WeightFormat kAllWeightFormats[] = {WeightFormat::kF32, WeightFormat::kBf16,
                                                     WeightFormat::kQ8_0, WeightFormat::kQ4_0,
                                                     WeightFormat::kQ4_1};

/// `"f32"`, `"bf16"`, `"q8_0"`, `"q4_0"` or `"q4_1"`.
constexpr const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::kBf16:
      return "bf16";
    case WeightFormat::kQ8_0:
      return "q8_0";
    case WeightFormat::kQ4_0:
      return "q4_0";
    case WeightFormat::kQ4_1:
      return "q4_1";
    case WeightFormat::kF32:
      break;
  }
  return "f32";
}

/// Bits of packed storage per weight (scales included; panel padding not counted): 32, 16, 8.5,
/// 4.5, 5.
constexpr double weight_format_bits(WeightFormat f) {
  switch (f) {
    case WeightFormat::kBf16:
      return 16.0;
    case WeightFormat::kQ8_0:
      return 8.5;
    case WeightFormat::kQ4_0:
      return 4.5;
    case WeightFormat::kQ4_1:
      return 5.0;
    case WeightFormat::kF32:
      break;
  }
  return 32.0;
}

/// The format named `name` (`weight_format_name`'s spelling); throws `moet::Error` naming `op`
/// and the valid names otherwise.
inline WeightFormat parse_weight_format(std::string_view name, const char* op = "WeightFormat") {
  for (const WeightFormat f : kAllWeightFormats) {
    if (name == weight_format_name(f)) return f;
  }
  detail::fail(op, "unknown weight format '", name, "' (expected f32, bf16, q8_0, q4_0 or q4_1)");
}

namespace detail {

/// The banks' check of `weight_format`: every format but `kF32` needs a float bank (`S`) with
/// packed weights. Throws `moet::Error` naming `op` otherwise.
template <class S>
void require_weight_format(const char* op, WeightFormat format, bool pack_weights) {
  if (format == WeightFormat::kF32) return;
  const char* name = weight_format_name(format);
  require(std::is_same_v<S, float>, op, "weight_format ", name,
          " needs a float bank (its kernels are float), got a ", sizeof(S), "-byte scalar");
  require(pack_weights, op, "weight_format ", name, " needs pack_weights = true (the ", name,
          " weights are the packed copy)");
}

}  // namespace detail
/// How an expert bank's weights start (`Options::init`).
enum class WeightInit {
  /// Normal with standard deviation `1 / sqrt(fan_in)`, from `init_seed`; biases 0. Draws every
  /// weight (seconds for a large bank): a loader should pass `kNone`.
  kRandom,
  /// Every tensor 0.
  kZeros,
  /// Nothing drawn or written (storage zeroed): for loaders. `forward` and `forward_train`
  /// throw until every tensor of every expert was set (`set_*`, or a view taken in `edit()`).
  kNone,
};

/// `"kRandom"`, `"kZeros"` or `"kNone"` (for messages).
constexpr const char* weight_init_name(WeightInit init) {
  return init == WeightInit::kZeros ? "kZeros" : init == WeightInit::kNone ? "kNone" : "kRandom";
}

}  // namespace moet
