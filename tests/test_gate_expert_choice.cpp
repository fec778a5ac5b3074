// ExpertChoiceGate (docs/algorithms.md §15): the plan against a naive oracle (each expert sorts
// all tokens by its probability, stably, and takes the first C), a hand-computed case with ties,
// the capacity formula against a hand table, the load every expert gets, the conformance check,
// and bad options. The gradient is in test_grad_softmax_gates.cpp, thread counts in
// test_determinism.cpp, the layer in test_all_gates.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/gates/expert_choice.hpp"
#include "moet/testing/gate_conformance.hpp"

#include "random_rows.hpp"

namespace test_gate_expert_choice {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;
using Gate = moet::ExpertChoiceGate<float>;

// C by the formula written out independently: std::nearbyint in the default rounding mode
// (half to even), then the floor and the cap.
Index naive_capacity(Index t, Index e, double cf, Index min_capacity) {
  const auto c =
      static_cast<Index>(std::nearbyint(cf * static_cast<double>(t) / static_cast<double>(e)));
  return std::min(std::max(c, min_capacity), t);
}

// The plan expert choice should give for the probabilities `p` (T, E): per token, the experts
// that took it, in descending p (ties to the lower id).
std::vector<std::vector<std::int32_t>> naive_choice(const RowMatrix<float>& p, Index c) {
  const Index T = p.rows(), E = p.cols();
  std::vector<std::vector<bool>> taken(static_cast<std::size_t>(T),
                                       std::vector<bool>(static_cast<std::size_t>(E), false));
  for (Index e = 0; e < E; ++e) {
    std::vector<Index> tokens(static_cast<std::size_t>(T));
    std::iota(tokens.begin(), tokens.end(), Index{0});
    std::stable_sort(tokens.begin(), tokens.end(),
                     [&](Index a, Index b) { return p(a, e) > p(b, e); });
    for (Index j = 0; j < c; ++j) {
      taken[static_cast<std::size_t>(tokens[static_cast<std::size_t>(j)])]
           [static_cast<std::size_t>(e)] = true;
    }
  }
  std::vector<std::vector<std::int32_t>> out(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) {
    std::vector<std::int32_t> ids(static_cast<std::size_t>(E));
    std::iota(ids.begin(), ids.end(), 0);
    std::stable_sort(ids.begin(), ids.end(),
                     [&](std::int32_t a, std::int32_t b) { return p(t, a) > p(t, b); });
    for (const std::int32_t e : ids) {
      if (taken[static_cast<std::size_t>(t)][static_cast<std::size_t>(e)]) {
        out[static_cast<std::size_t>(t)].push_back(e);
      }
    }
  }
  return out;
}

}  // namespace

TEST_CASE("ExpertChoiceGate capacity follows the reference formula", "[gate][expert_choice]") {
  // (T, E, cf, min_capacity) -> C, computed by hand.
  struct Case {
    Index t, e;
    double cf;
    Index min_capacity, c;
  };
  const std::vector<Case> cases{
      {10, 4, 1.0, 0, 2},     // 2.5 rounds to even: 2
      {14, 4, 1.0, 0, 4},     // 3.5 rounds to even: 4
      {11, 4, 1.0, 0, 3},     // 2.75: 3
      {9, 4, 1.0, 0, 2},      // 2.25: 2
      {1, 8, 2.0, 4, 1},      // the floor 4, capped at T = 1 (decode)
      {1, 8, 2.0, 0, 0},      // 0.25 rounds to 0: no expert takes the token
      {100, 2, 3.0, 0, 100},  // 150, capped at T
      {8, 8, 1.0, 4, 4},      // 1, raised to the floor
      {0, 8, 2.0, 4, 0},      // empty batch
      {512, 8, 2.0, 4, 128},
  };
  for (const Case& k : cases) {
    INFO("T " << k.t << " E " << k.e << " cf " << k.cf << " min " << k.min_capacity);
    CHECK(moet::detail::expert_choice_capacity(k.t, k.e, k.cf, k.min_capacity) == k.c);
    CHECK(naive_capacity(k.t, k.e, k.cf, k.min_capacity) == k.c);
    Gate gate({.model_dim = 3,
               .num_experts = k.e,
               .capacity_factor = k.cf,
               .min_capacity = k.min_capacity});
    CHECK(gate.capacity(k.t) == k.c);
  }
}

TEST_CASE("ExpertChoiceGate plans equal the naive oracle", "[gate][expert_choice]") {
  const Index T = GENERATE(1, 7, 64, 150, 301);
  const Index E = GENERATE(1, 4, 6);
  const double cf = GENERATE(0.5, 1.0, 2.0, 3.5);
  const Index min_capacity = GENERATE(0, 4);
  INFO("T " << T << " E " << E << " cf " << cf << " min " << min_capacity);
  constexpr Index kDim = 12;
  Gate gate({.model_dim = kDim,
             .num_experts = E,
             .capacity_factor = cf,
             .min_capacity = min_capacity,
             .init_seed = 5});
  const RowMatrix<float> x = moet_test::random_rows(T, kDim, 9);
  moet::Routing<float> plan;
  gate.route(x, {}, plan);
  const RowMatrix<float> p = plan.probs();
  REQUIRE(p.rows() == T);
  // The probabilities are the softmax of the router logits (double oracle).
  const RowMatrix<double> z = x.cast<double>() * gate.router().cast<double>();
  for (Index t = 0; t < T; ++t) {
    const Eigen::RowVectorXd e = (z.row(t).array() - z.row(t).maxCoeff()).exp();
    CHECK((p.row(t).cast<double>() - e / e.sum()).cwiseAbs().maxCoeff() <= 1e-6);
  }
  const Index c = naive_capacity(T, E, cf, min_capacity);
  const auto expected = naive_choice(p, c);
  std::vector<Index> load(static_cast<std::size_t>(E), 0);
  for (Index t = 0; t < T; ++t) {
    const auto experts = plan.experts(t);
    const auto weights = plan.weights(t);
    REQUIRE(std::vector<std::int32_t>(experts.begin(), experts.end()) ==
            expected[static_cast<std::size_t>(t)]);
    for (std::size_t j = 0; j < experts.size(); ++j) {
      CHECK(weights[j] == p(t, experts[j]));  // raw probability, not renormalised
      ++load[static_cast<std::size_t>(experts[j])];
    }
  }
  // Every expert processes exactly C tokens.
  CHECK(load == std::vector<Index>(static_cast<std::size_t>(E), c));
  CHECK(plan.num_assignments() == E * c);
}

TEST_CASE("ExpertChoiceGate on a hand-computed case with ties", "[gate][expert_choice]") {
  // W_r = I (2 x 2): P(t) = softmax(x_t). Tokens 0 and 1 tie at P = (0.5, 0.5); token 2 prefers
  // expert 0, token 3 expert 1. C = round(1 * 4 / 2) = 2: expert 0 takes token 2, then the
  // lower of the tied tokens 0 and 1 (token 0); expert 1 takes token 3, then token 0. Token 0
  // gets both experts (ties in its row: expert 0 first), token 1 none.
  Gate gate({.model_dim = 2, .num_experts = 2, .capacity_factor = 1.0, .min_capacity = 0});
  const RowMatrix<float> identity = RowMatrix<float>::Identity(2, 2);
  gate.set_router(identity, moet::WeightLayout::kInOut);
  RowMatrix<float> x(4, 2);
  x << 0, 0, 0, 0, 1, 0, 0, 1;
  moet::Routing<float> plan;
  gate.route(x, {}, plan);
  const float high = 1.0f / (1.0f + std::exp(-1.0f));
  REQUIRE(plan.k(0) == 2);
  CHECK(plan.experts(0)[0] == 0);
  CHECK(plan.experts(0)[1] == 1);
  CHECK(plan.weights(0)[0] == Approx(0.5));
  CHECK(plan.weights(0)[1] == Approx(0.5));
  CHECK(plan.k(1) == 0);
  REQUIRE(plan.k(2) == 1);
  CHECK(plan.experts(2)[0] == 0);
  CHECK(plan.weights(2)[0] == Approx(high));
  REQUIRE(plan.k(3) == 1);
  CHECK(plan.experts(3)[0] == 1);
  CHECK(plan.weights(3)[0] == Approx(high));
  CHECK(plan.mean_k() == Approx(1.0));

  SECTION("a token routes by its batch: alone, token 1 gets both experts") {
    moet::Routing<float> alone;
    Gate floor_one({.model_dim = 2, .num_experts = 2, .capacity_factor = 1.0});
    floor_one.set_router(identity, moet::WeightLayout::kInOut);
    floor_one.route(x.row(1), {}, alone);
    CHECK(alone.k(0) == 2);  // C = min(max(round(0.5), 4), 1) = 1
  }
}

TEST_CASE("ExpertChoiceGate passes the gate conformance check", "[gate][expert_choice]") {
  moet::testing::GateCheckOptions options;
  options.num_tokens = 150;
  for (const double cf : {0.5, 2.0}) {
    Gate gate({.model_dim = 10, .num_experts = 5, .capacity_factor = cf, .init_seed = 2});
    const auto report = moet::testing::check_gate(gate, options);
    INFO(report.to_string());
    CHECK(report.ok());
  }
}

TEST_CASE("ExpertChoiceGate rejects bad options and overrides",
          "[gate][expert_choice][bad_input]") {
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 2, .capacity_factor = 0.0}),
                    Contains("ExpertChoiceGate") && Contains("capacity_factor must be finite"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 2, .capacity_factor = std::nan("")}),
                    Contains("capacity_factor must be finite"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 2, .min_capacity = -1}),
                    Contains("min_capacity must be >= 0, got -1"));
  CHECK_THROWS_WITH(Gate({.model_dim = 0, .num_experts = 2}), Contains("ExpertChoiceGate"));
  Gate gate({.model_dim = 4, .num_experts = 2});
  moet::RouteContext ctx;
  ctx.overrides.k = 2;
  moet::Routing<float> plan;
  CHECK_THROWS_WITH(gate.route(moet_test::random_rows(3, 4, 1), ctx, plan),
                    Contains("ExpertChoiceGate") && Contains("ctx.overrides.k"));
}

}  // namespace test_gate_expert_choice
