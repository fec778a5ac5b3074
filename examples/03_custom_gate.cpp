// What this shows: how to write your own gate. `ThresholdGate` keeps every expert whose router
// probability exceeds a fixed threshold (at least the best one) and renormalises their weights.
// What to copy: the four members a gate needs (Scalar, num_experts, model_dim, route) and the
// three-step Routing fill: counts, commit_counts, then experts/weights per token.
#include <cstdio>

#include <moet/moet.hpp>

template <class S>
class ThresholdGate {
 public:
  using Scalar = S;

  ThresholdGate(moet::Index model_dim, moet::Index num_experts, S threshold)
      : router_(moet::RowMatrix<S>::Random(model_dim, num_experts)), threshold_(threshold) {}

  moet::Index num_experts() const { return router_.cols(); }
  moet::Index model_dim() const { return router_.rows(); }

  // x: (num_tokens, model_dim). Fills `out`; keeps no state, so it is safe from many threads.
  void route(const moet::ConstRows<S>& x, const moet::RouteContext&, moet::Routing<S>& out) const {
    if (x.cols() != model_dim()) throw moet::Error("[ThresholdGate] x has the wrong width");
    const moet::Index num_tokens = x.rows(), num_experts = router_.cols();
    out.reset(num_tokens, num_experts);
    auto probs = out.probs_mut();  // (num_tokens, num_experts)
    probs.noalias() = x * router_;
    for (moet::Index t = 0; t < num_tokens; ++t) {
      probs.row(t) = (probs.row(t).array() - probs.row(t).maxCoeff()).exp();
      probs.row(t) /= probs.row(t).sum();
    }
    out.probs_are_distribution = true;
    // 1. How many experts each token keeps.
    for (moet::Index t = 0; t < num_tokens; ++t) {
      moet::Index k = (probs.row(t).array() > threshold_).count();
      out.counts()[static_cast<std::size_t>(t)] = k > 0 ? k : 1;
    }
    out.commit_counts();  // 2. offsets and storage
    for (moet::Index t = 0; t < num_tokens; ++t) {  // 3. which experts, what weights
      moet::Index best = 0;
      probs.row(t).maxCoeff(&best);
      auto experts = out.experts(t);
      auto weights = out.weights(t);
      std::size_t j = 0;
      for (moet::Index e = 0; e < num_experts; ++e) {
        const bool keep = experts.size() == 1 ? e == best : probs(t, e) > threshold_;
        if (keep) experts[j] = static_cast<std::int32_t>(e), weights[j++] = probs(t, e);
      }
      S sum = 0;
      for (const S w : weights) sum += w;
      for (S& w : weights) w /= sum;
    }
  }

 private:
  moet::RowMatrix<S> router_;  // (model_dim, num_experts)
  S threshold_;
};

static_assert(moet::Gate<ThresholdGate<float>>, "ThresholdGate must satisfy moet::Gate");

int main() {
  constexpr moet::Index kModelDim = 32, kExperts = 6;
  moet::MoELayer layer(ThresholdGate<float>(kModelDim, kExperts, 0.2f),
                       moet::SwiGluExperts<float>({.model_dim = kModelDim, .hidden_dim = 64,
                                                   .num_experts = kExperts}));
  const moet::RowMatrix<float> x = moet::RowMatrix<float>::Random(16, kModelDim);
  const moet::RowMatrix<float> y = layer.forward(x);
  std::printf("ThresholdGate: mean k %.2f, |y| = %.4f\n", layer.stats().mean_k,
              static_cast<double>(y.norm()));
  return layer.stats().num_assignments >= x.rows() ? 0 : 1;
}
