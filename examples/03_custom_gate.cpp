// What this shows: how to write your own gate, one that trains, with moet's gate toolkit
// (gates/router.hpp). `ThresholdGate` keeps every expert whose router probability exceeds a
// threshold (always at least the best one) and renormalises their weights.
// What to copy: derive from `SoftmaxGateBase` (router weights, set_router, logits, zero_grad,
// visit_parameters), compute `P` with `SoftmaxRouter::probabilities` (it checks `x`), state the
// selection rule in `RankedSelection::rank`, and let `SoftmaxRouter::backward` differentiate the
// weights. tests/test_gate_router.cpp checks this gate's gradients by finite differences and
// runs the gate conformance check (moet/testing/gate_conformance.hpp) on it.
#include <cstdio>

#include <moet/moet.hpp>

template <class S>
class ThresholdGate : public moet::SoftmaxGateBase<S> {
 public:
  ThresholdGate(moet::Index model_dim, moet::Index num_experts, S threshold, std::uint64_t seed)
      : moet::SoftmaxGateBase<S>(
            moet::SoftmaxRouter<S>("ThresholdGate", model_dim, num_experts, seed)),
        threshold_(threshold) {}

  // x: (num_tokens, model_dim). Keeps no state, so it is safe from many threads.
  void route(const moet::ConstRows<S>& x, const moet::RouteContext& /*ctx*/,
             moet::Routing<S>& out) const {
    const auto probs = this->router_.probabilities(x, out);  // checks x; P = softmax(x W_r)
    moet::RankedSelection<S> select(out);
    select.rank(probs, this->num_experts(),
                [&](moet::Index t, std::span<const std::int32_t> ranked) {
                  std::size_t k = 1;  // the best expert, then every next one above the threshold
                  while (k < ranked.size() && probs(t, ranked[k]) > threshold_) ++k;
                  return k;
                });
    select.write(probs, /*renormalize=*/true);
  }

  // The kept set is held fixed; the renormalised weights are differentiated to W_r and x.
  void backward(const moet::ConstRows<S>& x, const moet::RouteContext& /*ctx*/,
                const moet::Routing<S>& routing, std::span<const S> d_weights,
                const moet::SoftmaxLossGrad<S>& loss_grad, moet::Rows<S> dx) {
    this->router_.backward(x, routing, d_weights, /*renormalize=*/true, loss_grad, dx);
  }

 private:
  S threshold_;
};

#ifndef MOET_EXAMPLE_03_NO_MAIN
static_assert(moet::TrainableGate<ThresholdGate<float>>, "ThresholdGate must be trainable");

int main() {
  constexpr moet::Index kModelDim = 32, kExperts = 6, kTokens = 64;
  moet::MoELayer layer(ThresholdGate<float>(kModelDim, kExperts, 0.2f, /*seed=*/1),
                       moet::SwiGluExperts<float>(
                           {.model_dim = kModelDim, .hidden_dim = 64, .num_experts = kExperts}));
  const moet::RowMatrix<float> x = moet::RowMatrix<float>::Random(kTokens, kModelDim);
  const moet::RowMatrix<float> target = moet::RowMatrix<float>::Random(kTokens, kModelDim) * 0.1f;
  moet::RowMatrix<float> y(kTokens, kModelDim), dx(kTokens, kModelDim);
  decltype(layer)::Workspace ws;
  moet::AdamW<float> opt({.lr = 1e-2});
  float first = 0.0f, last = 0.0f;
  for (int step = 0; step < 20; ++step) {  // fit y to a target: the router learns too
    layer.zero_grad();
    layer.forward_train(x, y, {.training = true}, ws);
    const moet::RowMatrix<float> dy = (y - target) / static_cast<float>(kTokens);
    last = 0.5f * (y - target).squaredNorm() / static_cast<float>(kTokens);
    if (step == 0) first = last;
    layer.backward(x, dy, {.training = true}, ws, dx);
    opt.step(layer);
  }
  std::printf("ThresholdGate: mean k %.2f, loss %.4f -> %.4f\n", ws.stats.mean_k,
              static_cast<double>(first), static_cast<double>(last));
  return last < first ? 0 : 1;
}
#endif
