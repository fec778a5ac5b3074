// What this shows: the five routers of moet on one batch, through the same experts, and how
// many experts each activates: top-k (fixed k), top-p (confidence), top-any (DynMoE), attention
// importance (DA-MoE, fed real attention probabilities) and stochastic (THOR).
// What to copy: how each gate is configured, and how a RouteContext carries attention.
#include <cmath>
#include <cstdio>
#include <string>

#include <moet/moet.hpp>

namespace {

constexpr moet::Index kModelDim = 64, kHiddenDim = 128, kExperts = 8, kTokens = 48;
using Experts = moet::SwiGluExperts<float>;

Experts make_experts() {
  return Experts({.model_dim = kModelDim, .hidden_dim = kHiddenDim, .num_experts = kExperts});
}

// Runs one gate through a layer and prints its routing statistics.
template <class Gate>
void report(const std::string& name, Gate gate, const moet::RowMatrix<float>& x,
            const moet::RouteContext& ctx) {
  moet::MoELayer layer(std::move(gate), make_experts());
  layer.forward(x, ctx);
  const moet::RoutingStats& s = layer.stats();
  std::printf("%-22s mean k %.2f  k histogram", name.c_str(), s.mean_k);
  for (std::size_t k = 0; k < s.k_histogram.size(); ++k) {
    if (s.k_histogram[k] > 0) std::printf(" %zu:%ld", k, static_cast<long>(s.k_histogram[k]));
  }
  std::printf("  max/mean load %.2f\n", s.max_mean_load_ratio);
}

}  // namespace

int main() {
  const moet::RowMatrix<float> x = moet::RowMatrix<float>::Random(kTokens, kModelDim);

  // One head of causal self-attention over the batch as one sequence: A = softmax(x x^T / sqrt(d))
  // with future keys masked. Layout [batch = 1, heads = 1, L, L].
  moet::RowMatrix<float> attention = (x * x.transpose()) / std::sqrt(float(kModelDim));
  for (moet::Index i = 0; i < kTokens; ++i) {
    for (moet::Index j = i + 1; j < kTokens; ++j) attention(i, j) = -INFINITY;
    attention.row(i) = (attention.row(i).array() - attention.row(i).maxCoeff()).exp();
    attention.row(i) /= attention.row(i).sum();
  }
  moet::RouteContext ctx;
  ctx.attention = {.data = attention.data(), .batch = 1, .heads = 1, .seq_len = kTokens,
                   .causal = true};

  report("top_k k=2", moet::TopKGate<float>({.model_dim = kModelDim, .num_experts = kExperts,
                                              .k = 2, .renormalize = true}),
         x, ctx);
  report("top_p p=0.4", moet::TopPGate<float>({.model_dim = kModelDim, .num_experts = kExperts,
                                                .p = 0.4}),
         x, ctx);
  report("top_any (DynMoE)", moet::TopAnyGate<float>({.model_dim = kModelDim,
                                                       .num_experts = kExperts}),
         x, ctx);
  report("importance k<=4", moet::ImportanceGate<float>({.model_dim = kModelDim,
                                                          .num_experts = kExperts, .k_max = 4}),
         x, ctx);
  report("stochastic (THOR)", moet::StochasticGate<float>({.model_dim = kModelDim,
                                                            .num_experts = kExperts}),
         x, ctx);
  return 0;
}
