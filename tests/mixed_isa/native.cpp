// Compiled with -march=native (see tests/CMakeLists.txt).
#include "mixed_isa.hpp"

namespace mixed_isa {

std::unique_ptr<Layer> make_layer_native(moet::WeightFormat format) { return make_layer(format); }

moet::RowMatrix<float> forward_native(const Layer& layer, const moet::RowMatrix<float>& x) {
  return const_cast<Layer&>(layer).forward(x);  // NOLINT: forward keeps stats in the layer
}

}  // namespace mixed_isa
