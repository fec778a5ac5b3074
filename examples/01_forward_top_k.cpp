// What this shows: the smallest complete moet program. A Mixtral-style top-2 gate routes a
// batch of tokens to 8 SwiGLU experts; the layer returns the output and routing statistics.
// What to copy: the three declarations (gate, experts, layer) and the forward call.
#include <cstdio>

#include <moet/moet.hpp>

int main() {
  constexpr moet::Index kModelDim = 64, kHiddenDim = 128, kExperts = 8, kTokens = 32;

  // Softmax over 8 experts, keep the best 2, renormalise their weights (GShard/Mixtral).
  moet::TopKGate<float> gate(moet::TopKGate<float>::mixtral_options(kModelDim, kExperts));
  // 8 experts E(x) = (silu(x Wg) * (x Wu)) Wd, weights drawn from a fixed seed.
  moet::SwiGluExperts<float> experts(
      {.model_dim = kModelDim, .hidden_dim = kHiddenDim, .num_experts = kExperts});
  moet::MoELayer layer(std::move(gate), std::move(experts));

  // A batch of tokens: (num_tokens, model_dim), row-major.
  const moet::RowMatrix<float> x = moet::RowMatrix<float>::Random(kTokens, kModelDim);

  const moet::RowMatrix<float> y = layer.forward(x);  // (num_tokens, model_dim)
  const moet::RoutingStats& stats = layer.stats();

  std::printf("output: %ld x %ld, |y| = %.4f\n", static_cast<long>(y.rows()),
              static_cast<long>(y.cols()), static_cast<double>(y.norm()));
  std::printf("mean experts per token: %.2f (top-2 always gives 2)\n", stats.mean_k);
  std::printf("tokens per expert:");
  for (const auto load : stats.load) std::printf(" %ld", static_cast<long>(load));
  std::printf("\nmax/mean load: %.2f\n", stats.max_mean_load_ratio);
  return stats.mean_k == 2.0 ? 0 : 1;
}
