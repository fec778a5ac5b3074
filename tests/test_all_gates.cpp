// Every gate through the whole layer: bit-identical at 1, 2 and 3 threads, grouped dispatch
// equal to the per-token reference, and the stats agreeing with the plan.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "moet/moet.hpp"

namespace test_all_gates {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;
constexpr Index kModelDim = 24, kHidden = 40, kExperts = 6;

moet::RowMatrix<float> random_tokens(Index rows, unsigned seed) {
  moet::detail::Rng rng(seed);
  moet::RowMatrix<float> x(rows, kModelDim);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(rng.normal());
  return x;
}

moet::SwiGluExperts<float> experts() {
  return moet::SwiGluExperts<float>(
      {.model_dim = kModelDim, .hidden_dim = kHidden, .num_experts = kExperts, .init_seed = 3});
}

// Runs `gate` through a grouped and a reference layer at several thread counts.
template <class Gate>
void check_gate(const Gate& gate, const moet::RowMatrix<float>& x, const moet::RouteContext& ctx) {
  moet::MoELayer<Gate, moet::SwiGluExperts<float>> grouped(gate, experts());
  moet::MoELayer<Gate, moet::SwiGluExperts<float>, moet::ReferenceDispatch> reference(gate,
                                                                                       experts());
  const int saved = moet::num_threads();
  std::vector<moet::RowMatrix<float>> outputs;
  for (const int threads : {1, 2, 3}) {
    moet::set_num_threads(threads);
    typename decltype(grouped)::Workspace ws;
    moet::RowMatrix<float> y(x.rows(), x.cols());
    grouped.forward(x, y, ctx, ws);
    outputs.push_back(y);
  }
  moet::set_num_threads(saved);
  CHECK(outputs[0] == outputs[1]);  // bit-identical, not approximately equal
  CHECK(outputs[0] == outputs[2]);

  typename decltype(reference)::Workspace ws;
  moet::RowMatrix<float> y_ref(x.rows(), x.cols());
  const moet::RoutingStats stats = reference.forward(x, y_ref, ctx, ws);
  const double scale = std::max(1.0, static_cast<double>(y_ref.norm()));
  CHECK(static_cast<double>((outputs[0] - y_ref).norm()) <= 1e-5 * scale);

  // Stats agree with a count over the plan.
  std::vector<Index> load(kExperts, 0);
  for (const auto e : ws.routing.experts()) ++load[static_cast<std::size_t>(e)];
  CHECK(stats.load == load);
  CHECK(stats.mean_k == Approx(static_cast<double>(ws.routing.num_assignments()) /
                               static_cast<double>(x.rows())));
}

}  // namespace

TEST_CASE("Every gate gives thread-count-independent output equal to the reference dispatch",
          "[layer][parallel]") {
  const unsigned seed = GENERATE(1u, 2u);
  const bool training = GENERATE(false, true);
  const Index num_tokens = 130;
  const auto x = random_tokens(num_tokens, seed);
  std::vector<float> importance(static_cast<std::size_t>(num_tokens));
  moet::detail::Rng rng(seed + 100);
  for (auto& v : importance) v = static_cast<float>(rng.uniform());
  moet::RouteContext ctx;
  ctx.training = training;
  ctx.seed = seed;
  ctx.step = 5;
  ctx.importance = importance;
  const auto s = static_cast<std::uint64_t>(seed);

  SECTION("top-k") {
    check_gate(moet::TopKGate<float>({.model_dim = kModelDim, .num_experts = kExperts, .k = 2,
                                      .renormalize = true, .noisy = true, .init_seed = s}),
               x, ctx);
  }
  SECTION("top-k with capacity") {
    check_gate(moet::TopKGate<float>({.model_dim = kModelDim, .num_experts = kExperts, .k = 2,
                                      .capacity_factor = 1.0, .min_capacity = 1, .init_seed = s}),
               x, ctx);
  }
  SECTION("grouped top-k") {
    auto options =
        moet::GroupedTopKGate<float>::deepseek_v3_options(kModelDim, kExperts, 2, 3, 2, 2.5);
    options.init_seed = s;
    check_gate(moet::GroupedTopKGate<float>(options), x, ctx);
  }
  SECTION("top-p") {
    check_gate(moet::TopPGate<float>(
                   {.model_dim = kModelDim, .num_experts = kExperts, .p = 0.5, .init_seed = s}),
               x, ctx);
  }
  SECTION("top-any") {
    check_gate(moet::TopAnyGate<float>({.model_dim = kModelDim, .num_experts = kExperts,
                                        .initial_experts = kExperts - 2, .init_seed = s}),
               x, ctx);
  }
  SECTION("importance") {
    check_gate(moet::ImportanceGate<float>(
                   {.model_dim = kModelDim, .num_experts = kExperts, .k_max = 4, .init_seed = s}),
               x, ctx);
  }
  SECTION("expert choice") {
    const double cf = GENERATE(0.5, 2.0);
    check_gate(moet::ExpertChoiceGate<float>({.model_dim = kModelDim,
                                              .num_experts = kExperts,
                                              .capacity_factor = cf,
                                              .init_seed = s}),
               x, ctx);
  }
  SECTION("relu") {
    check_gate(
        moet::ReluGate<float>({.model_dim = kModelDim, .num_experts = kExperts, .init_seed = s}), x,
        ctx);
  }
  SECTION("null experts") {
    check_gate(moet::NullExpertGate<float>({.model_dim = kModelDim,
                                            .num_experts = kExperts,
                                            .num_null = kExperts,
                                            .k = 2,
                                            .init_seed = s}),
               x, ctx);
  }
  SECTION("stochastic") {
    const auto mode = GENERATE(moet::StochasticInference::kToken,
                               moet::StochasticInference::kEnsemble);
    check_gate(moet::StochasticGate<float>(
                   {.model_dim = kModelDim, .num_experts = kExperts, .inference = mode}),
               x, ctx);
  }
}

}  // namespace test_all_gates
