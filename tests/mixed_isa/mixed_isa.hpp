#pragma once
// A program of two translation units compiled with different -march (main.cpp with the
// default flags, native.cpp with -march=native): layers built in one and run in the other must
// compute what a naive reference computes. Before moet chose its kernels at run time, the
// expert banks' packed layout depended on the unit's flags (a silent ODR violation: garbage or
// a crash); Eigen's storage alignment still does unless EIGEN_MAX_ALIGN_BYTES is the same in
// every unit (moet::moet sets it).
#include <memory>

#include <moet/moet.hpp>

namespace mixed_isa {

using Layer = moet::MoELayer<moet::TopKGate<float>, moet::SwiGluExperts<float>>;

/// A top-2 layer of 6 SwiGLU experts (d 48, f 80) with `format` kernel weights, built in
/// native.cpp (`native = true`) or main.cpp.
std::unique_ptr<Layer> make_layer_native(moet::WeightFormat format);
std::unique_ptr<Layer> make_layer_plain(moet::WeightFormat format);

/// `layer.forward(x)`, run in native.cpp or main.cpp.
moet::RowMatrix<float> forward_native(const Layer& layer, const moet::RowMatrix<float>& x);
moet::RowMatrix<float> forward_plain(const Layer& layer, const moet::RowMatrix<float>& x);

inline std::unique_ptr<Layer> make_layer(moet::WeightFormat format) {
  return std::make_unique<Layer>(
      moet::TopKGate<float>(
          {.model_dim = 48, .num_experts = 6, .k = 2, .renormalize = true, .init_seed = 3}),
      moet::SwiGluExperts<float>({.model_dim = 48,
                                  .hidden_dim = 80,
                                  .num_experts = 6,
                                  .init_seed = 4,
                                  .weight_format = format}));
}

}  // namespace mixed_isa
