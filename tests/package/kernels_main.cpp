// A moet user that compiles the kernels once for the whole program (README, "Compile time"):
// this unit is built with MOET_EXTERN_KERNELS and links the kernels of kernels.cpp, which
// includes <moet/instantiate_kernels.hpp>. Built by the find_package consumer against the
// installed headers. It checks the packed kernels' output (the instances from kernels.cpp)
// against the same layer on Eigen's products (`pack_weights = false`).
#include <cstdio>
#include <utility>

#include <moet/moet.hpp>

namespace {

auto make_layer(bool packed) {
  constexpr moet::Index kModelDim = 64, kHiddenDim = 96, kExperts = 4;
  moet::TopKGate<float> gate(moet::TopKGate<float>::mixtral_options(kModelDim, kExperts));
  moet::SwiGluExperts<float> experts({.model_dim = kModelDim,
                                      .hidden_dim = kHiddenDim,
                                      .num_experts = kExperts,
                                      .pack_weights = packed});
  return moet::MoELayer(std::move(gate), std::move(experts));
}

}  // namespace

int main() {
  auto packed = make_layer(true);
  auto eigen = make_layer(false);
  // 40 tokens: more than 8 per expert on average, so the kernels' many-row path runs too.
  const moet::RowMatrix<float> x = moet::RowMatrix<float>::Random(40, 64);
  const moet::RowMatrix<float> y = packed.forward(x);
  const moet::RowMatrix<float> y_ref = eigen.forward(x);
  const double error = static_cast<double>((y - y_ref).norm());
  const double scale = static_cast<double>(y_ref.norm());
  std::printf("kernels_consumer: level %s, |y| %.4f, relative difference to Eigen's %.2e\n",
              moet::kernel_isa_name(moet::kernel_isa()), scale, error / scale);
  if (!(scale > 0.0) || !(error <= 1e-5 * scale)) {
    std::fprintf(stderr, "kernels_consumer: FAILED: packed output differs from Eigen's\n");
    return 1;
  }
  return 0;
}
