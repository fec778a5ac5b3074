// What this shows: the training loop of one MoE layer, end to end: forward_train, a task loss,
// the router's auxiliary loss (Switch load balance) as the gate's loss-gradient input,
// backward, and an AdamW step. The layer learns to map random tokens to fixed targets.
// What to copy: the five lines inside the loop; examples 04 and 06 show whole models.
#include <cstdio>

#include <moet/moet.hpp>

int main() {
  constexpr moet::Index kDim = 32, kTokens = 256;
  moet::MoELayer layer(moet::TopKGate<float>(moet::TopKGate<float>::mixtral_options(kDim, 8)),
                       moet::SwiGluExperts<float>({.model_dim = kDim, .hidden_dim = 64,
                                                   .num_experts = 8}));
  moet::AdamW<float> opt({.lr = 3e-3, .weight_decay = 0.0});
  decltype(layer)::Workspace ws;

  const moet::RowMatrix<float> x = moet::RowMatrix<float>::Random(kTokens, kDim);
  const moet::RowMatrix<float> target = moet::RowMatrix<float>::Random(kTokens, kDim) * 0.5f;
  moet::RowMatrix<float> y(kTokens, kDim), dy(kTokens, kDim), dx(kTokens, kDim);
  moet::RowMatrix<float> d_probs(kTokens, 8);  // dL/dP of the auxiliary loss
  double first = 0, last = 0;
  for (int step = 0; step < 200; ++step) {
    const moet::RouteContext ctx{.training = true, .seed = 1, .step = std::uint64_t(step)};
    layer.zero_grad();
    layer.forward_train(x, y, ctx, ws);                  // keeps what backward needs in ws
    dy = (y - target) / float(kTokens);                  // L = |y - target|^2 / (2 T)
    last = 0.5 * double((y - target).squaredNorm()) / kTokens;
    d_probs.setZero();
    const double aux = moet::load_balance_loss<float>(ws.routing, d_probs);  // alpha = 1e-2
    layer.backward(x, dy, ctx, ws, dx, {.d_probs = {d_probs.data(), std::size_t(d_probs.size())}});
    opt.step(layer);                                     // AdamW, then repacks the experts
    if (step == 0) first = last;
    if (step % 50 == 0) std::printf("step %3d  loss %.5f  load balance %.5f\n", step, last, aux);
  }
  std::printf("loss %.5f -> %.5f\n", first, last);
  return last < 0.5 * first ? 0 : 1;  // the layer must have learned
}
