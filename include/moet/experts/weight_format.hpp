#pragma once
/// \file experts/weight_format.hpp
/// `WeightFormat`: the element type of the packed copies an expert bank's inference kernels
/// read (its trainable weights are always the bank's scalar type).

#include <type_traits>

#include "moet/errors.hpp"

namespace moet {

/// Element type of a float expert bank's packed kernel weights (`GluExperts::Options` and
/// `FfnExperts::Options::weight_format`).
///
/// - `kF32`: float copies; `forward` is exact float arithmetic (one FMA chain per output).
/// - `kBf16`: bfloat16 copies (half the bytes: decode, which streams the weights from memory,
///   runs up to twice as fast). `forward` rounds the weights and each product's input rows to
///   bf16 and accumulates in float: with AVX512-BF16 (`__AVX512BF16__`, e.g. `-march=native`
///   on Zen 4/5 or Sapphire Rapids) through `vdpbf16ps`, else through portable loops that
///   compute the same products. The router, the combine and training stay float: training
///   reads and updates the float weights (`forward_train`/`backward` do not use the copies)
///   and `parameters_changed()` re-rounds them. Expect a relative error of a few 1e-3 against
///   `kF32` (tests/test_gemm_bf16.cpp measures and bounds it; README, "bf16 expert weights").
enum class WeightFormat { kF32, kBf16 };

/// `"f32"` or `"bf16"`.
constexpr const char* weight_format_name(WeightFormat f) {
  return f == WeightFormat::kBf16 ? "bf16" : "f32";
}

namespace detail {

/// The banks' check of `weight_format`: `kBf16` needs a float bank (`S`) with packed weights.
/// Throws `moet::Error` naming `op` otherwise.
template <class S>
void require_weight_format(const char* op, WeightFormat format, bool pack_weights) {
  if (format != WeightFormat::kBf16) return;
  require(std::is_same_v<S, float>, op,
          "weight_format bf16 needs a float bank (the bf16 kernels are float), got a ", sizeof(S),
          "-byte scalar");
  require(pack_weights, op,
          "weight_format bf16 needs pack_weights = true (the bf16 weights are the packed copy)");
}

}  // namespace detail
}  // namespace moet
