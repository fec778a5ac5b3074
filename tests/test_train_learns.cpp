// End-to-end training: a one-layer MoE classifier learns a synthetic clustered task with every
// router, its loss falls by a stated factor, and the run is deterministic (same bits for the
// same seed, and for 1 and 2 threads).
//
// Task: 8 classes, each a random centre in R^8; a token is its class centre plus noise. The
// model's logits are `x + MoE(x)` (a residual block), trained with softmax cross-entropy (mean
// over tokens, the oracle written here independently of the library) and AdamW, full batch.

#include <cmath>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/moet.hpp"
#include "moet/train/losses.hpp"
#include "moet/train/optim.hpp"
#include "moet/train/thor.hpp"
#include "moet/train/top_any_losses.hpp"

namespace test_train_learns {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;
using moet::RowMatrix;
using S = float;

constexpr Index kDim = 8;
constexpr Index kTokens = 256;
constexpr Index kExperts = 4;
constexpr Index kHidden = 16;
constexpr int kSteps = 150;
// The evaluation loss must fall by this factor (from about 4.1, the loss of the untrained
// residual model, whose logits are x itself).
constexpr double kFactor = 100.0;

struct Task {
  RowMatrix<S> x;
  std::vector<int> label;
  std::vector<float> importance;  // a per-token importance for ImportanceGate
};

Task make_task(std::uint64_t seed) {
  moet::detail::Rng rng(seed);
  RowMatrix<S> centres(kDim, kDim);
  for (Index c = 0; c < kDim; ++c) {
    for (Index j = 0; j < kDim; ++j) centres(c, j) = static_cast<S>(1.5 * rng.normal());
  }
  Task task;
  task.x.resize(kTokens, kDim);
  for (Index t = 0; t < kTokens; ++t) {
    const auto c = static_cast<int>(t % kDim);
    task.label.push_back(c);
    for (Index j = 0; j < kDim; ++j) {
      task.x(t, j) = centres(c, j) + static_cast<S>(0.3 * rng.normal());
    }
    task.importance.push_back(static_cast<float>(rng.uniform()));
  }
  return task;
}

// Mean softmax cross-entropy of `logits` (T, C) against `label`; writes dL/dlogits.
double cross_entropy(const RowMatrix<S>& logits, const std::vector<int>& label,
                     RowMatrix<S>* d_logits) {
  const Index n = logits.rows();
  double total = 0.0;
  if (d_logits) d_logits->resize(n, logits.cols());
  for (Index t = 0; t < n; ++t) {
    double max = logits(t, 0);
    for (Index c = 1; c < logits.cols(); ++c) max = std::max(max, double(logits(t, c)));
    double sum = 0.0;
    for (Index c = 0; c < logits.cols(); ++c) sum += std::exp(double(logits(t, c)) - max);
    const auto y = static_cast<Index>(label[static_cast<std::size_t>(t)]);
    total += -(double(logits(t, y)) - max - std::log(sum));
    if (d_logits) {
      for (Index c = 0; c < logits.cols(); ++c) {
        const double p = std::exp(double(logits(t, c)) - max) / sum;
        (*d_logits)(t, c) = static_cast<S>((p - (c == y ? 1.0 : 0.0)) / double(n));
      }
    }
  }
  return total / double(n);
}

moet::SwiGluExperts<S> experts() {
  return moet::SwiGluExperts<S>(
      {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts, .init_seed = 11});
}

// Evaluation loss (inference mode) of the residual classifier.
template <class Layer>
double eval_loss(Layer& layer, const Task& task) {
  moet::RouteContext ctx;
  ctx.importance = task.importance;
  RowMatrix<S> logits = task.x + layer.forward(task.x, ctx);
  return cross_entropy(logits, task.label, nullptr);
}

// Trains with a softmax-router gate and Switch load balance; returns (initial, final) eval
// losses and the final training loss (for the determinism checks).
struct Run {
  double initial = 0.0;
  double final_loss = 0.0;
  double last_train = 0.0;
};

template <class Layer, class AuxLoss>
Run train(Layer layer, const Task& task, AuxLoss&& aux) {
  Run run;
  run.initial = eval_loss(layer, task);
  moet::AdamW<S> opt({.lr = 1e-2, .weight_decay = 0.0});
  typename Layer::Workspace ws;
  RowMatrix<S> y(kTokens, kDim), dx(kTokens, kDim), d_logits;
  for (int step = 0; step < kSteps; ++step) {
    moet::RouteContext ctx;
    ctx.training = true;
    ctx.seed = 5;
    ctx.step = static_cast<std::uint64_t>(step);
    ctx.importance = task.importance;
    layer.forward_train(task.x, y, ctx, ws);
    RowMatrix<S> logits = task.x + y;
    run.last_train = cross_entropy(logits, task.label, &d_logits);
    layer.zero_grad();
    const auto loss_grad = aux(layer, ws);
    layer.backward(task.x, d_logits, ctx, ws, dx, loss_grad.view());
    opt.step(layer);
  }
  run.final_loss = eval_loss(layer, task);
  return run;
}

// Switch load balance on the plan of the last forward, as the gate's loss-gradient input.
struct SoftmaxAux {
  RowMatrix<S> d_probs;
  moet::SoftmaxLossGrad<S> view() const {
    return {.d_probs =
                std::span<const S>(d_probs.data(), static_cast<std::size_t>(d_probs.size()))};
  }
};
template <class Layer>
SoftmaxAux switch_balance(Layer&, typename Layer::Workspace& ws) {
  SoftmaxAux aux;
  aux.d_probs = RowMatrix<S>::Zero(ws.routing.num_tokens(), ws.routing.num_experts());
  moet::load_balance_loss<S>(ws.routing, aux.d_probs, moet::LoadBalanceOptions::switch_options());
  return aux;
}

// No auxiliary loss for a softmax gate (empty spans).
template <class Layer>
SoftmaxAux no_softmax_aux(Layer&, typename Layer::Workspace&) {
  return {};
}

// DynMoE's DeepSpeed loss set (diversity, simplicity, load balance, efficiency; 0.01): adds the
// embedding terms into the gate's gradient, returns dL/da for the straight-through backward.
struct TopAnyAux {
  std::vector<S> d_gates;
  moet::TopAnyLossGrad<S> view() const {
    return {.d_gates = std::span<const S>(d_gates.data(), d_gates.size())};
  }
};
template <class Layer>
TopAnyAux dynmoe_aux(Layer& layer, typename Layer::Workspace& ws) {
  TopAnyAux aux;
  aux.d_gates.assign(static_cast<std::size_t>(ws.routing.num_tokens() * layer.gate().num_experts()),
                     S(0));
  moet::top_any_aux_loss<S>(layer.gate(), ws.routing, aux.d_gates);
  return aux;
}

void check_learns(const Run& run, double factor) {
  INFO("initial eval loss " << run.initial << ", final " << run.final_loss);
  CHECK(std::isfinite(run.final_loss));
  CHECK(run.final_loss * factor < run.initial);
}

}  // namespace

TEST_CASE("A top-2 MoE classifier learns the clustered task", "[train][learn]") {
  const Task task = make_task(3);
  moet::MoELayer layer(moet::TopKGate<S>(moet::TopKGate<S>::mixtral_options(kDim, kExperts)),
                       experts());
  const Run run = train(layer, task, [](auto& l, auto& ws) { return switch_balance(l, ws); });
  check_learns(run, kFactor);
}

TEST_CASE("A top-1 (Switch) MoE classifier learns the clustered task", "[train][learn]") {
  const Task task = make_task(3);
  moet::MoELayer layer(moet::TopKGate<S>(moet::TopKGate<S>::switch_options(kDim, kExperts)),
                       experts());
  const Run run = train(layer, task, [](auto& l, auto& ws) { return switch_balance(l, ws); });
  check_learns(run, kFactor);
}

TEST_CASE("A top-p MoE classifier learns the clustered task", "[train][learn]") {
  const Task task = make_task(3);
  moet::MoELayer layer(moet::TopPGate<S>({.model_dim = kDim, .num_experts = kExperts, .p = 0.4}),
                       experts());
  const Run run = train(layer, task, [](auto& l, auto& ws) { return switch_balance(l, ws); });
  check_learns(run, kFactor);
}

TEST_CASE("An importance-routed (DA-MoE) classifier learns the clustered task", "[train][learn]") {
  const Task task = make_task(3);
  moet::MoELayer layer(
      moet::ImportanceGate<S>({.model_dim = kDim, .num_experts = kExperts, .k_min = 1, .k_max = 3}),
      experts());
  const Run run = train(layer, task, [](auto& l, auto& ws) { return switch_balance(l, ws); });
  check_learns(run, kFactor);
}

TEST_CASE("A noisy top-2 MoE classifier learns the clustered task", "[train][learn]") {
  const Task task = make_task(3);
  moet::MoELayer layer(moet::TopKGate<S>(moet::TopKGate<S>::noisy_top_k_options(kDim, kExperts, 2)),
                       experts());
  const Run run = train(layer, task, [](auto& l, auto& ws) { return no_softmax_aux(l, ws); });
  check_learns(run, kFactor);
}

TEST_CASE("A top-any (DynMoE) classifier learns the clustered task with its losses",
          "[train][learn][top_any]") {
  const Task task = make_task(3);
  moet::MoELayer layer(moet::TopAnyGate<S>({.model_dim = kDim, .num_experts = kExperts}),
                       experts());
  const Run run = train(layer, task, [](auto& l, auto& ws) { return dynmoe_aux(l, ws); });
  check_learns(run, kFactor);
}

TEST_CASE("A THOR classifier learns the clustered task with its consistency loss",
          "[train][learn][thor]") {
  const Task task = make_task(3);
  using Layer = moet::MoELayer<moet::StochasticGate<S>, moet::SwiGluExperts<S>>;
  Layer layer(moet::StochasticGate<S>({.model_dim = kDim, .num_experts = kExperts}), experts());
  const double initial = eval_loss(layer, task);
  moet::AdamW<S> opt({.lr = 1e-2, .weight_decay = 0.0});
  moet::ThorStep<Layer> thor;
  RowMatrix<S> d0, d1, dc0(kTokens, kDim), dc1(kTokens, kDim), dx(kTokens, kDim);
  double consistency = 0.0;
  for (int step = 0; step < kSteps; ++step) {
    moet::RouteContext ctx;
    ctx.seed = 9;
    ctx.step = static_cast<std::uint64_t>(step);
    thor.forward(layer, task.x, ctx);
    RowMatrix<S> logits0 = task.x + thor.y(0);
    RowMatrix<S> logits1 = task.x + thor.y(1);
    cross_entropy(logits0, task.label, &d0);
    cross_entropy(logits1, task.label, &d1);
    dc0.setZero();
    dc1.setZero();
    // Summed over tokens in THOR; scaled to the mean here like the cross-entropy.
    consistency =
        moet::consistency_loss<S>(logits0, logits1, dc0, dc1, {.alpha = 1.0 / double(kTokens)});
    d0 += dc0;
    d1 += dc1;
    layer.zero_grad();
    thor.backward(layer, task.x, d0, d1, dx);
    opt.step(layer);
  }
  const double final_loss = eval_loss(layer, task);
  INFO("initial " << initial << ", final " << final_loss << ", consistency " << consistency);
  CHECK(final_loss * kFactor < initial);
  CHECK(std::isfinite(consistency));
}

TEST_CASE("Training is deterministic for a seed and a thread count", "[train][learn][parallel]") {
  const Task task = make_task(4);
  auto make = [] {
    return moet::MoELayer(moet::TopKGate<S>(moet::TopKGate<S>::mixtral_options(kDim, kExperts)),
                          experts());
  };
  const auto aux = [](auto& l, auto& ws) { return switch_balance(l, ws); };
  const int saved = moet::num_threads();
  moet::set_num_threads(1);
  const Run one = train(make(), task, aux);
  const Run again = train(make(), task, aux);
  moet::set_num_threads(2);
  const Run two = train(make(), task, aux);
  moet::set_num_threads(saved);
  CHECK(one.last_train == again.last_train);
  CHECK(one.final_loss == again.final_loss);
  CHECK(one.last_train == two.last_train);
  CHECK(one.final_loss == two.final_loss);
}

}  // namespace test_train_learns
