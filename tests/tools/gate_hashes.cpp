// Hashes (FNV-1a over the bits) what the gates produce: for TopAnyGate under many options (live
// slots, variants, temperatures, more slots than model_dim), the training and eval plans (CSR
// and scores), the straight-through backward (dx, every gradient) with and without the
// auxiliary loss's d_gates, the adaptive process driven through a layer's forward_train on the
// DeepSpeed cycle and by hand (masks, embeddings, thresholds, records, later plans), and one
// AdamW step through a layer; for every other shipped gate, the plans of the option sets that
// moet-compare's and the examples' default router specs build. Written to compare the trees
// before and after the TopAnyGate split and the router grammar (commit "One router grammar"):
//
//   g++ -std=c++20 -O2 -fopenmp -I<tree>/include -I/usr/include/eigen3
//       [-DGATE_HASHES_OLD_TOP_ANY] tests/tools/gate_hashes.cpp -o gate_hashes
//   ./gate_hashes [threads]
//
// GATE_HASHES_OLD_TOP_ANY builds it against the options before that commit (`num_experts` live
// at construction, `max_experts` slots) instead of after (`num_experts` slots,
// `initial_experts` live). Not built or run by ctest: a recorded comparison, not a test.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <moet/moet.hpp>
#include <moet/train/optim.hpp>
#include <moet/train/top_any_losses.hpp>

using moet::Index;

namespace {

struct Hash {
  std::uint64_t h = 1469598103934665603ULL;
  void bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) {
      h ^= b[i];
      h *= 1099511628211ULL;
    }
  }
  template <class T>
  void value(T v) {
    bytes(&v, sizeof v);
  }
  template <class M>
  void mat(const M& m) {
    value(m.rows());
    value(m.cols());
    for (Index i = 0; i < m.rows(); ++i)
      for (Index j = 0; j < m.cols(); ++j) value(m(i, j));
  }
  template <class S>
  void plan(const moet::Routing<S>& r) {
    for (const auto o : r.offsets()) value(o);
    for (const auto e : r.experts()) value(e);
    for (const auto w : r.weights()) value(w);
    mat(r.probs());
    value(r.live_experts);
  }
};

template <class S>
moet::RowMatrix<S> rnd(Index r, Index c, unsigned seed, double scale = 1.0) {
  std::mt19937 g(seed);
  std::normal_distribution<double> n(0.0, scale);
  moet::RowMatrix<S> m(r, c);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(n(g));
  return m;
}

void print(const char* name, std::initializer_list<std::pair<const char*, const Hash*>> hashes) {
  std::printf("%-40s", name);
  for (const auto& [what, h] : hashes) {
    std::printf(" %s %016llx", what, static_cast<unsigned long long>(h->h));
  }
  std::printf("\n");
}

/// The TopAnyGate options of `slots` slots with `live` of them live at construction.
template <class S>
typename moet::TopAnyGate<S>::Options top_any(Index d, Index slots, Index live) {
  typename moet::TopAnyGate<S>::Options o;
  o.model_dim = d;
#ifdef GATE_HASHES_OLD_TOP_ANY
  o.num_experts = live;
  o.max_experts = slots;
#else
  o.num_experts = slots;
  o.initial_experts = live == slots ? 0 : live;
#endif
  return o;
}

/// Plans, backward and auxiliary loss of one TopAnyGate.
template <class S>
void top_any_case(const char* name, typename moet::TopAnyGate<S>::Options o, double threshold) {
  moet::TopAnyGate<S> gate(o);
  const Index n = 83, d = gate.model_dim(), emax = gate.num_experts();
  gate.set_thresholds(moet::Vector<S>::Constant(emax, S(threshold)));
  const auto x = rnd<S>(n, d, 400 + unsigned(emax));
  Hash train, eval, bwd, grads, aux;
  moet::Routing<S> plan, eval_plan;
  gate.route(x, moet::RouteContext{}, eval_plan);
  eval.plan(eval_plan);
  const moet::RouteContext ctx{.training = true, .seed = 5, .step = 2};
  gate.route(x, ctx, plan);
  train.plan(plan);
  for (const bool with_aux : {false, true}) {
    for (const auto* p : {&plan, &eval_plan}) {
      const moet::RouteContext c = p == &plan ? ctx : moet::RouteContext{};
      gate.zero_grad();
      std::vector<S> d_gates;
      if (with_aux) {
        d_gates.assign(static_cast<std::size_t>(n * emax), S(0));
        const auto loss = moet::top_any_aux_loss<S>(gate, *p, d_gates);
        aux.value(loss.value);
        aux.value(loss.simplicity);
        aux.value(loss.efficiency);
        aux.value(loss.diversity);
        aux.value(loss.load_balance);
        for (const auto v : d_gates) aux.value(v);
      }
      const auto dw = rnd<S>(1, p->num_assignments(), 500);
      moet::RowMatrix<S> dx = moet::RowMatrix<S>::Zero(n, d);
      gate.backward(x, c, *p, std::span<const S>(dw.data(), std::size_t(dw.size())),
                    {.d_gates = {d_gates.data(), d_gates.size()}}, dx);
      bwd.mat(dx);
      gate.visit_parameters(
          [&](std::string_view, moet::ParamMap<S>, moet::ParamMap<S> g) { grads.mat(g); });
    }
  }
  print(name, {{"train", &train}, {"eval", &eval}, {"bwd", &bwd}, {"grad", &grads}, {"aux", &aux}});
}

/// The adaptive process: a layer's forward_train on a short DeepSpeed cycle, then by hand.
void adaptive_case(const char* name, moet::TopAnyGate<float>::Options o) {
  o.schedule_period = 2;
  const Index d = o.model_dim;
  moet::MoELayer layer(
      moet::TopAnyGate<float>(o),
      moet::SwiGluExperts<float>({.model_dim = d,
                                  .hidden_dim = 24,
                                  .num_experts = moet::TopAnyGate<float>(o).num_experts(),
                                  .init_seed = 21}));
  layer.gate().set_thresholds(moet::Vector<float>::Constant(layer.gate().num_experts(), 0.2f));
  decltype(layer)::Workspace ws;
  Hash process, outputs;
  moet::RowMatrix<float> y(40, d);
  for (int step = 0; step < 14; ++step) {
    const auto x = rnd<float>(40, d, 600 + unsigned(step), step % 3 == 0 ? 3.0 : 1.0);
    layer.forward_train(
        x, y, {.training = true, .seed = 1, .step = static_cast<std::uint64_t>(step)}, ws);
    outputs.mat(y);
    outputs.plan(ws.routing);
    const auto& g = layer.gate();
    process.mat(g.expert_mask());
    process.value(g.recording());
    for (const auto r : g.recorded_tokens()) process.value(r);
    process.mat(g.recorded_unrouted());
  }
  auto& gate = layer.gate();
  gate.begin_recording();
  const auto x = rnd<float>(40, d, 700, 2.0);
  moet::Routing<float> plan;
  gate.route(x, {.training = true}, plan);
  gate.on_training_forward(x, plan);
  const auto update = gate.update_experts();
  process.value(update.removed);
  process.value(update.added);
  process.mat(gate.expert_mask());
  process.mat(gate.gate_embeddings());
  process.mat(gate.thresholds());
  process.value(gate.training_forwards());
  gate.route(x, {}, plan);
  outputs.plan(plan);
  print(name, {{"process", &process}, {"outputs", &outputs}});
}

/// forward, forward_train, backward, an AdamW step and a forward through a TopAny layer.
void top_any_layer_case(const char* name, moet::TopAnyGate<float>::Options o) {
  const Index d = o.model_dim;
  const Index slots = moet::TopAnyGate<float>(o).num_experts();
  moet::MoELayer layer(
      moet::TopAnyGate<float>(o),
      moet::SwiGluExperts<float>(
          {.model_dim = d, .hidden_dim = 40, .num_experts = slots, .init_seed = 8}));
  const Index n = 61;
  const auto x = rnd<float>(n, d, 300);
  const auto dy = rnd<float>(n, d, 301);
  decltype(layer)::Workspace ws;
  moet::RowMatrix<float> y(n, d), dx(n, d);
  Hash fwd, ftr, bwd, after;
  layer.forward(x, y, moet::RouteContext{}, ws);
  fwd.mat(y);
  const moet::RouteContext ctx{.training = true, .seed = 3, .step = 1};
  layer.zero_grad();
  layer.forward_train(x, y, ctx, ws);
  ftr.mat(y);
  layer.backward(x, dy, ctx, ws, dx);
  bwd.mat(dx);
  layer.visit_parameters(
      [&](std::string_view, moet::ParamMap<float>, moet::ParamMap<float> g) { bwd.mat(g); });
  moet::AdamW<float> opt({.lr = 1e-2});
  opt.step(layer);
  layer.forward(x, y, moet::RouteContext{}, ws);
  after.mat(y);
  print(name, {{"fwd", &fwd}, {"ftr", &ftr}, {"bwd", &bwd}, {"step+fwd", &after}});
}

/// Train and eval plans of any gate on one batch (importance from a log-normal draw).
template <class G>
void plan_case(const char* name, const G& gate) {
  using S = typename G::Scalar;
  const Index n = 97;
  const auto x = rnd<S>(n, gate.model_dim(), 800);
  std::vector<S> importance(static_cast<std::size_t>(n));
  std::mt19937 g(9);
  std::lognormal_distribution<double> ln(0.0, 1.0);
  for (auto& v : importance) v = static_cast<S>(ln(g));
  Hash train, eval;
  moet::Routing<S> plan;
  moet::RouteContext ctx{.training = true, .seed = 42, .step = 3};
  ctx.importance = std::span<const S>(importance);
  gate.route(x, ctx, plan);
  train.plan(plan);
  ctx.training = false;
  gate.route(x, ctx, plan);
  eval.plan(plan);
  print(name, {{"train", &train}, {"eval", &eval}});
}

}  // namespace

int main(int argc, char** argv) {
  moet::set_num_threads(argc > 1 ? std::atoi(argv[1]) : 1);
  using moet::TopAnySchedule;
  using moet::TopAnyVariant;
  {
    auto o = top_any<float>(12, 8, 8);
    o.init_seed = 1;
    top_any_case<float>("top_any all live", o, 0.1);
    o.variant = TopAnyVariant::kTutel;
    top_any_case<float>("top_any all live tutel", o, 0.1);
    top_any_case<float>("top_any tutel high thresholds", o, 0.6);
  }
  {
    auto o = top_any<float>(10, 16, 8);
    o.init_seed = 2;
    top_any_case<float>("top_any 8 of 16", o, 0.0);
    o.temperature = 10.0f;
    o.trainable_temperature = true;
    top_any_case<float>("top_any 8 of 16 trainable tau", o, 0.05);
  }
  {
    auto o = top_any<double>(4, 10, 3);
    o.init_seed = 3;
    o.temperature = 2.5;
    top_any_case<double>("top_any slots > d double", o, -0.1);
    o.variant = TopAnyVariant::kTutel;
    top_any_case<double>("top_any slots > d double tutel", o, 0.3);
  }
  {
    auto o = top_any<float>(16, 8, 4);
    o.init_seed = 4;
    adaptive_case("adaptive 4 of 8 cycle", o);
    o.schedule = TopAnySchedule::kManual;
    adaptive_case("adaptive 4 of 8 manual", o);
    auto all = top_any<float>(16, 6, 6);
    all.init_seed = 5;
    adaptive_case("adaptive 6 of 6 cycle", all);
  }
  {
    auto o = top_any<float>(24, 8, 8);
    o.init_seed = 6;
    top_any_layer_case("top_any layer all live", o);
    auto half = top_any<float>(24, 8, 4);
    half.init_seed = 7;
    half.variant = TopAnyVariant::kTutel;
    top_any_layer_case("top_any layer 4 of 8 tutel", half);
  }
  // The options the default router specs of moet-compare and the examples build (d 32, E 8).
  const Index d = 32, e = 8;
  const std::uint64_t s = 43;
  plan_case("top_k k=1", moet::TopKGate<float>({.model_dim = d, .num_experts = e, .init_seed = s}));
  plan_case("top_k k=2",
            moet::TopKGate<float>({.model_dim = d, .num_experts = e, .k = 2, .init_seed = s}));
  plan_case("top_k k=2 renorm",
            moet::TopKGate<float>(
                {.model_dim = d, .num_experts = e, .k = 2, .renormalize = true, .init_seed = s}));
  plan_case("top_k k=2 noisy capacity 1.25", moet::TopKGate<float>({.model_dim = d,
                                                                    .num_experts = e,
                                                                    .k = 2,
                                                                    .noisy = true,
                                                                    .capacity_factor = 1.25,
                                                                    .min_capacity = 2,
                                                                    .init_seed = s}));
  plan_case("top_p p=0.4",
            moet::TopPGate<float>({.model_dim = d, .num_experts = e, .init_seed = s}));
  plan_case("top_p p=0.6 inclusive max_k=3", moet::TopPGate<float>({.model_dim = d,
                                                                    .num_experts = e,
                                                                    .p = 0.6,
                                                                    .inclusive = true,
                                                                    .max_k = 3,
                                                                    .init_seed = s}));
  plan_case("top_any", moet::TopAnyGate<float>([&] {
              auto o = top_any<float>(d, e, e);
              o.init_seed = s;
              return o;
            }()));
  plan_case("top_any half", moet::TopAnyGate<float>([&] {
              auto o = top_any<float>(d, e, e / 2);
              o.init_seed = s;
              return o;
            }()));
  plan_case("importance k_max=4",
            moet::ImportanceGate<float>({.model_dim = d, .num_experts = e, .init_seed = s}));
  plan_case("importance budget", moet::ImportanceGate<float>({.model_dim = d,
                                                              .num_experts = e,
                                                              .k_min = 2,
                                                              .k_max = 5,
                                                              .norm = moet::ImportanceNorm::kBudget,
                                                              .k_avg = 3.0,
                                                              .renormalize = true,
                                                              .init_seed = s}));
  plan_case("stochastic", moet::StochasticGate<float>({.model_dim = d, .num_experts = e}));
  plan_case("stochastic ensemble stream 3",
            moet::StochasticGate<float>({.model_dim = d,
                                         .num_experts = e,
                                         .inference = moet::StochasticInference::kEnsemble,
                                         .stream = 3}));
}
