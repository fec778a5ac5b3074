// ReluGate and ReMoE's sparsity control (docs/algorithms.md §16): plans against a naive
// oracle (double logits, ReLU, the positive experts in descending order), a hand-computed case
// with ties and all-zero tokens, the conformance check, the L1 regulariser against hand values,
// the coefficient schedule step by step, and a training loop in which the controller brings the
// mean experts per token from about E/2 to the target. The gradient is in
// test_grad_softmax_gates.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/moet.hpp"
#include "moet/testing/gate_conformance.hpp"

#include "random_rows.hpp"

namespace test_gate_relu {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;
using Gate = moet::ReluGate<float>;

}  // namespace

TEST_CASE("ReluGate plans equal the naive oracle", "[gate][relu]") {
  const Index T = GENERATE(1, 64, 150);
  const Index E = GENERATE(1, 5, 8);
  constexpr Index kDim = 12;
  Gate gate({.model_dim = kDim, .num_experts = E, .init_seed = 4});
  const RowMatrix<float> x = moet_test::random_rows(T, kDim, 21);
  moet::Routing<float> plan;
  gate.route(x, {}, plan);
  CHECK_FALSE(plan.probs_are_distribution);
  const RowMatrix<double> z = x.cast<double>() * gate.router().cast<double>();
  const auto r = plan.probs();
  Index total = 0;
  for (Index t = 0; t < T; ++t) {
    for (Index e = 0; e < E; ++e) {
      CHECK(std::abs(double(r(t, e)) - std::max(z(t, e), 0.0)) <= 1e-5);
    }
    // The experts with R > 0, in descending R, ties to the lower id (from the gate's own R).
    std::vector<std::int32_t> expected;
    for (Index e = 0; e < E; ++e) {
      if (r(t, e) > 0.0f) expected.push_back(static_cast<std::int32_t>(e));
    }
    std::stable_sort(expected.begin(), expected.end(),
                     [&](std::int32_t a, std::int32_t b) { return r(t, a) > r(t, b); });
    const auto experts = plan.experts(t);
    REQUIRE(std::vector<std::int32_t>(experts.begin(), experts.end()) == expected);
    for (std::size_t j = 0; j < experts.size(); ++j) CHECK(plan.weights(t)[j] == r(t, experts[j]));
    total += static_cast<Index>(expected.size());
  }
  if (E > 1 && T > 1) {
    // A zero-mean router fires about half the experts.
    const double mean_k = static_cast<double>(total) / static_cast<double>(T);
    CHECK(mean_k > 0.25 * static_cast<double>(E));
    CHECK(mean_k < 0.75 * static_cast<double>(E));
  }
}

TEST_CASE("ReluGate on a hand-computed case", "[gate][relu]") {
  Gate gate({.model_dim = 2, .num_experts = 2});
  const RowMatrix<float> identity = RowMatrix<float>::Identity(2, 2);
  gate.set_router(identity, moet::WeightLayout::kInOut);  // R = relu(x)
  RowMatrix<float> x(4, 2);
  x << 1, 2, -1, 0.5, -1, -1, 3, 3;
  moet::Routing<float> plan;
  gate.route(x, {}, plan);
  REQUIRE(plan.k(0) == 2);
  CHECK(plan.experts(0)[0] == 1);
  CHECK(plan.experts(0)[1] == 0);
  CHECK(plan.weights(0)[0] == 2.0f);
  CHECK(plan.weights(0)[1] == 1.0f);
  REQUIRE(plan.k(1) == 1);
  CHECK(plan.experts(1)[0] == 1);
  CHECK(plan.weights(1)[0] == 0.5f);
  CHECK(plan.k(2) == 0);  // every logit negative: no expert, output 0
  REQUIRE(plan.k(3) == 2);
  CHECK(plan.experts(3)[0] == 0);  // a tie: the lower id first
  CHECK(plan.experts(3)[1] == 1);
  CHECK(plan.probs()(2, 0) == 0.0f);

  SECTION("a non-finite logit is an error naming the token") {
    RowMatrix<float> big(2, 2);
    big << 1, 1, 3e38f, 3e38f;
    RowMatrix<float> w(2, 2);
    w << 10, 0, 10, 0;
    gate.set_router(w, moet::WeightLayout::kInOut);
    CHECK_THROWS_WITH(gate.route(big, {}, plan), Contains("ReluGate") &&
                                                     Contains("router logits must be finite") &&
                                                     Contains("token 1"));
  }
  SECTION("overrides are errors") {
    moet::RouteContext ctx;
    ctx.overrides.p = 0.5;
    CHECK_THROWS_WITH(gate.route(x, ctx, plan),
                      Contains("ReluGate") && Contains("ctx.overrides.p"));
  }
}

TEST_CASE("ReluGate passes the gate conformance check", "[gate][relu]") {
  moet::testing::GateCheckOptions options;
  Gate gate({.model_dim = 10, .num_experts = 6, .init_seed = 3});
  const auto report = moet::testing::check_gate(gate, options);
  INFO(report.to_string());
  CHECK(report.ok());
}

TEST_CASE("relu_l1_loss equals the hand-computed ReMoE regulariser", "[train][relu]") {
  // R = [[1, 0], [2, 3]], k = 1, T = 2: counts (2, 1), f = E/(kT) counts = (2, 1),
  // L1 = (1/2)(2*1 + 2*2 + 1*3) = 4.5; dL/dR = lambda f / T = lambda (1, 0.5) in every row.
  Gate gate({.model_dim = 2, .num_experts = 2});
  const RowMatrix<float> identity = RowMatrix<float>::Identity(2, 2);
  gate.set_router(identity, moet::WeightLayout::kInOut);
  RowMatrix<float> x(3, 2);
  x << 1, -1, 2, 3, 5, 5;
  moet::Routing<float> plan;
  gate.route(x.topRows(2), {}, plan);
  RowMatrix<float> d = RowMatrix<float>::Zero(2, 2);
  CHECK(moet::relu_l1_loss<float>(plan, d, {.target_k = 1.0, .coefficient = 0.5}) ==
        Approx(0.5 * 4.5));
  CHECK(d(0, 0) == Approx(0.5));
  CHECK(d(0, 1) == Approx(0.25));
  CHECK(d(1, 0) == Approx(0.5));
  CHECK(d(1, 1) == Approx(0.25));

  SECTION("a pad contributes nothing") {
    moet::Routing<float> three;
    gate.route(x, {}, three);
    const std::vector<std::uint8_t> valid{1, 1, 0};
    RowMatrix<float> d3 = RowMatrix<float>::Zero(3, 2);
    CHECK(moet::relu_l1_loss<float>(three, d3, {.target_k = 1.0, .valid = valid}) == Approx(4.5));
    CHECK(d3.row(2).isZero());
    CHECK(d3(1, 1) == Approx(0.5));
  }
  SECTION("bad input") {
    RowMatrix<float> wrong = RowMatrix<float>::Zero(2, 3);
    CHECK_THROWS_WITH(moet::relu_l1_loss<float>(plan, wrong, {}),
                      Contains("relu_l1_loss") && Contains("d_probs"));
    CHECK_THROWS_WITH(moet::relu_l1_loss<float>(plan, d, {.target_k = 3.0}),
                      Contains("target_k must be in (0, num_experts = 2], got 3"));
    CHECK_THROWS_WITH(moet::relu_l1_loss<float>(plan, d, {.coefficient = -1.0}),
                      Contains("coefficient must be finite and >= 0"));
    moet::TopKGate<float> softmax({.model_dim = 2, .num_experts = 2});
    moet::Routing<float> p;
    RowMatrix<float> neg(2, 2);
    neg << 1, 1, 1, 1;
    softmax.route(neg, {}, p);
    p.probs_mut()(0, 0) = -0.5f;
    CHECK_THROWS_WITH(moet::relu_l1_loss<float>(p, d, {}), Contains("ReLU scores"));
  }
}

TEST_CASE("ReluSparsityController follows ReMoE's schedule", "[train][relu]") {
  // E = 4, k = 1: target sparsity 0.75.
  Gate gate({.model_dim = 4, .num_experts = 4});
  const RowMatrix<float> identity = RowMatrix<float>::Identity(4, 4);
  gate.set_router(identity, moet::WeightLayout::kInOut);
  const auto plan_with = [&](std::vector<float> values) {
    RowMatrix<float> x = Eigen::Map<RowMatrix<float>>(values.data(), 2, 4);
    moet::Routing<float> plan;
    gate.route(x, {}, plan);
    return plan;
  };
  const auto dense = plan_with({1, 1, 1, -1, 1, 1, -1, -1});         // 5 of 8 active: S = 0.375
  const auto sparse = plan_with({1, -1, -1, -1, -1, -1, -1, -1});    // 1 of 8: S = 0.875
  const auto on_target = plan_with({1, -1, -1, -1, -1, 1, -1, -1});  // 2 of 8: S = 0.75
  const double alpha = 1.2;
  moet::ReluSparsityController c({.target_k = 1.0, .num_experts = 4});
  CHECK(c.coefficient() == 1e-8);
  c.record(dense);
  CHECK(c.recorded_sparsity() == 0.375);
  CHECK(c.update() == 1e-8 * alpha);
  c.record(sparse);
  CHECK(c.update() == 1e-8 * alpha / alpha);
  c.record(dense);  // mean over two layers: (0.375 + 0.875) / 2 = 0.625 < 0.75
  c.record(sparse);
  CHECK(c.recorded_sparsity() == 0.625);
  CHECK(c.update() == 1e-8 * alpha / alpha * alpha);
  const double before = c.coefficient();
  CHECK(c.update() == before);  // nothing recorded
  c.record(on_target);
  CHECK(c.update() == before / alpha);  // the code's rule divides at equality
  moet::ReluSparsityController paper(
      {.target_k = 1.0, .num_experts = 4, .tie = moet::ReluLambdaTie::kKeep});
  paper.record(on_target);
  CHECK(paper.update() == 1e-8);

  CHECK_THROWS_WITH(moet::ReluSparsityController({.target_k = 0.0, .num_experts = 4}),
                    Contains("ReluSparsityController") && Contains("target_k"));
  CHECK_THROWS_WITH(moet::ReluSparsityController({.num_experts = 4, .alpha = 1.0}),
                    Contains("alpha must be finite and > 1"));
  CHECK_THROWS_WITH(moet::ReluSparsityController({.num_experts = 4, .initial_coefficient = 0.0}),
                    Contains("initial_coefficient"));
  moet::ReluSparsityController three({.num_experts = 3});
  CHECK_THROWS_WITH(three.record(dense), Contains("the plan has 4 experts, the controller 3"));
}

TEST_CASE("ReMoE training: the controller drives mean k to the target", "[train][relu]") {
  constexpr Index kDim = 12, kExperts = 8, kTokens = 128;
  constexpr double kTarget = 2.0;
  using Layer = moet::MoELayer<Gate, moet::SwiGluExperts<float>>;
  Layer layer(Gate({.model_dim = kDim, .num_experts = kExperts, .init_seed = 1}),
              moet::SwiGluExperts<float>(
                  {.model_dim = kDim, .hidden_dim = 16, .num_experts = kExperts, .init_seed = 2}));
  // A teacher: a fixed random top-2 layer.
  moet::MoELayer teacher(
      moet::TopKGate<float>(
          {.model_dim = kDim, .num_experts = 4, .k = 2, .renormalize = true, .init_seed = 7}),
      moet::SwiGluExperts<float>(
          {.model_dim = kDim, .hidden_dim = 16, .num_experts = 4, .init_seed = 8}));
  // Tokens with a non-zero mean, as a transformer's hidden states have: for a zero-mean
  // symmetric x, P(x w > 0) = 1/2 for every w != 0, so a router without a bias cannot make
  // ReLU routing sparser than E/2 (docs/algorithms.md §16).
  const RowMatrix<float> x = (moet_test::random_rows(kTokens, kDim, 5).array() + 1.0f).matrix();
  const RowMatrix<float> target = teacher.forward(x);
  RowMatrix<float> y(kTokens, kDim), dx(kTokens, kDim), dy(kTokens, kDim);
  RowMatrix<float> d_r(kTokens, kExperts);
  Layer::Workspace ws;
  moet::AdamW<float> opt({.lr = 1e-2});
  moet::ReluSparsityController control({.target_k = kTarget, .num_experts = kExperts});
  std::vector<double> mean_k;
  for (int step = 0; step < 300; ++step) {
    layer.zero_grad();
    layer.forward_train(x, y, {.training = true}, ws);
    mean_k.push_back(ws.routing.mean_k());
    dy = 2.0f * (y - target) / static_cast<float>(kTokens);
    d_r.setZero();
    moet::relu_l1_loss<float>(ws.routing, d_r,
                              {.target_k = kTarget, .coefficient = control.coefficient()});
    control.record(ws.routing);
    layer.backward(x, dy, {.training = true}, ws, dx,
                   {.d_probs = {d_r.data(), static_cast<std::size_t>(d_r.size())}});
    opt.step(layer);
    control.update();
  }
  INFO("mean k at step 0: " << mean_k.front() << ", last: " << mean_k.back()
                            << ", lambda: " << control.coefficient());
  CHECK(mean_k.front() > 3.0);  // near E/2 at the start
  double late = 0.0;
  for (std::size_t i = mean_k.size() - 50; i < mean_k.size(); ++i) late += mean_k[i];
  late /= 50.0;
  INFO("mean k over the last 50 steps: " << late);
  CHECK(std::abs(late - kTarget) < 0.3);
}

}  // namespace test_gate_relu
