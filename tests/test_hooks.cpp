// The optional hooks of concepts.hpp: which shipped types have which hook, that a declared hook
// is called (and only then), that the optimisers call parameters_changed, and what HookCheck
// lets through. The compile errors for misspelt, undeclared and mis-signed hooks are the
// compile-fail tests in tests/compile_fail.
#include <string_view>

#include <catch2/catch.hpp>

#include "moet/concepts.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/importance.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/layer.hpp"
#include "moet/train/optim.hpp"

namespace test_hooks {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;

// The shipped types' hooks.
static_assert(moet::TrainingForwardHook<moet::TopAnyGate<float>>);
static_assert(moet::AdaptiveExpertsHook<moet::TopAnyGate<float>>);
static_assert(moet::HookCheck<moet::TopAnyGate<float>>::kTrainingForward);
static_assert(!moet::TrainingForwardHook<moet::TopKGate<float>>);
static_assert(!moet::TrainingForwardHook<moet::TopPGate<float>>);
static_assert(!moet::TrainingForwardHook<moet::ImportanceGate<float>>);
static_assert(!moet::TrainingForwardHook<moet::StochasticGate<float>>);
// The softmax gates repack their router weights (a packed copy for the selected kernels).
static_assert(moet::HookCheck<moet::TopKGate<float>>::kParametersChanged &&
              moet::HookCheck<moet::TopPGate<float>>::kParametersChanged &&
              moet::HookCheck<moet::ImportanceGate<float>>::kParametersChanged);
using Bank = moet::SwiGluExperts<float>;
static_assert(moet::ParametersChangedHook<Bank> && moet::ReadinessHook<Bank> &&
              moet::ScratchReserveHook<Bank> && moet::LazyGradientHook<Bank>);
static_assert(moet::HookCheck<Bank>::kParametersChanged && moet::HookCheck<Bank>::kCheckReady &&
              moet::HookCheck<Bank>::kReserve && moet::HookCheck<Bank>::kEnsureGrad);
static_assert(moet::HookCheck<moet::FfnExperts<double>>::kEnsureGrad);
using Layer = moet::MoELayer<moet::TopKGate<float>, Bank>;
static_assert(moet::ParametersChangedHook<Layer> && moet::HookCheck<Layer>::kParametersChanged);

// Routes every token to expert t % 2 with weight 1 and counts the hook's calls.
template <class S>
class CountingGate {
 public:
  using Scalar = S;
  using LossGrad = moet::NoLossGrad;
  static constexpr moet::Hooks kHooks{.training_forward = true, .parameters_changed = true};

  Index num_experts() const { return 2; }
  Index model_dim() const { return 4; }
  void route(const moet::ConstRows<S>& x, const moet::RouteContext& /*ctx*/,
             moet::Routing<S>& out) const {
    out.reset(x.rows(), 2);
    for (auto& count : out.counts()) count = 1;
    out.commit_counts();
    for (Index t = 0; t < x.rows(); ++t) {
      out.experts(t)[0] = static_cast<std::int32_t>(t % 2);
      out.weights(t)[0] = S(1);
    }
  }
  void backward(const moet::ConstRows<S>& /*x*/, const moet::RouteContext& /*ctx*/,
                const moet::Routing<S>& /*routing*/, std::span<const S> /*d_weights*/,
                const LossGrad& /*loss_grad*/, moet::Rows<S> /*dx*/) {}
  void zero_grad() {}
  template <class F>
  void visit_parameters(F&& /*f*/) {}

  void on_training_forward(const moet::ConstRows<S>& x, const moet::Routing<S>& routing) {
    ++training_forwards;
    last_tokens = x.rows();
    last_assignments = routing.num_assignments();
  }
  void parameters_changed() { ++changes; }

  int training_forwards = 0;
  Index last_tokens = -1;
  Index last_assignments = -1;
  int changes = 0;
};

static_assert(moet::TrainableGate<CountingGate<float>>);
static_assert(moet::HookCheck<CountingGate<float>>::kTrainingForward);

// A gate that has a hook-named member it does not declare in kHooks ... is rejected (the
// compile-fail test undeclared_hook.cpp); one that declares nothing and has no hook passes.
template <class S>
struct PlainGate {
  using Scalar = S;
  static constexpr moet::Hooks kHooks{};
  Index num_experts() const { return 1; }
  Index model_dim() const { return 1; }
  void route(const moet::ConstRows<S>& /*x*/, const moet::RouteContext& /*ctx*/,
             moet::Routing<S>& /*out*/) const {}
};
static_assert(moet::HookCheck<PlainGate<float>>::kChecked);
static_assert(!moet::HookCheck<PlainGate<float>>::kTrainingForward);

}  // namespace

TEST_CASE("MoELayer calls a declared training-forward hook after every training route only",
          "[hooks][layer]") {
  moet::MoELayer layer(
      CountingGate<float>{},
      moet::SwiGluExperts<float>({.model_dim = 4, .hidden_dim = 8, .num_experts = 2}));
  const moet::RowMatrix<float> x = moet::RowMatrix<float>::Random(5, 4);
  moet::RowMatrix<float> y(5, 4);
  decltype(layer)::Workspace ws;
  layer.forward(x, y, {}, ws);
  CHECK(layer.gate().training_forwards == 0);
  layer.forward_train(x, y, {.training = true}, ws);
  layer.forward_train(x, y, {}, ws);  // the hook runs whatever ctx.training says
  CHECK(layer.gate().training_forwards == 2);
  CHECK(layer.gate().last_tokens == 5);
  CHECK(layer.gate().last_assignments == 5);
}

TEST_CASE("The optimisers and MoELayer::parameters_changed call a declared parameters hook",
          "[hooks][optim]") {
  moet::MoELayer layer(
      CountingGate<float>{},
      moet::SwiGluExperts<float>({.model_dim = 4, .hidden_dim = 8, .num_experts = 2}));
  layer.zero_grad();
  moet::Sgd<float> sgd({.lr = 0.1});
  sgd.step(layer);
  CHECK(layer.gate().changes == 1);
  moet::AdamW<float> adamw({});
  adamw.step(layer);
  CHECK(layer.gate().changes == 2);
  layer.parameters_changed();
  CHECK(layer.gate().changes == 3);
  moet::notify_parameters_changed(layer.gate());
  CHECK(layer.gate().changes == 4);
}

}  // namespace test_hooks
