// Run-time routing overrides (RouteContext::overrides, MoELayer::set_overrides): routing a call
// with an override equals routing it with a gate built with those options (plans compared bit
// for bit, gradients too where the override reaches the backward), a call's field wins over the
// layer's, and a field a gate does not take or an out-of-range value is a moet::Error that
// names the gate and the field.
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/context.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/errors.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/grouped_top_k.hpp"
#include "moet/gates/importance.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/layer.hpp"
#include "moet/routing.hpp"

#include "random_rows.hpp"

namespace test_route_overrides {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;
using moet_test::random_rows;

bool same_bits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Two plans are the same: counts, expert ids, weight bits, probabilities, drops.
void check_same_plan(const moet::Routing<float>& got, const moet::Routing<float>& want) {
  REQUIRE(got.num_tokens() == want.num_tokens());
  REQUIRE(got.num_assignments() == want.num_assignments());
  CHECK(got.dropped == want.dropped);
  for (Index t = 0; t < got.num_tokens(); ++t) {
    INFO("token " << t);
    const auto ge = got.experts(t);
    const auto we = want.experts(t);
    REQUIRE(std::vector<std::int32_t>(ge.begin(), ge.end()) ==
            std::vector<std::int32_t>(we.begin(), we.end()));
    REQUIRE(same_bits(got.weights(t), want.weights(t)));
  }
  CHECK(got.probs() == want.probs());
}

// Routes `x` with `gate` under `overrides` and with `built` (options already changed), whose
// router is set to `gate`'s; the plans must be the same and must differ from `gate`'s own plan
// (so the override did something).
template <class G>
void check_override(const G& gate, G built, const moet::RoutingOverrides& overrides,
                    const RowMatrix<float>& x, moet::RouteContext ctx = {}) {
  built.set_router(gate.router(), moet::WeightLayout::kInOut);
  moet::Routing<float> own;
  gate.route(x, ctx, own);
  moet::Routing<float> want;
  built.route(x, ctx, want);
  ctx.overrides = overrides;
  moet::Routing<float> got;
  gate.route(x, ctx, got);
  check_same_plan(got, want);
  CHECK(got.num_assignments() != own.num_assignments());
}

}  // namespace

TEST_CASE("An override routes as a gate built with that option", "[overrides][gate]") {
  const RowMatrix<float> x = random_rows(97, 24, 1);
  SECTION("TopKGate k, with capacity dropping") {
    const moet::TopKGate<float>::Options o{
        .model_dim = 24, .num_experts = 8, .k = 2, .capacity_factor = 1.0, .init_seed = 3};
    const moet::TopKGate<float> gate(o);
    for (const Index k : {1, 3, 8}) {
      auto ok = o;
      ok.k = k;
      INFO("k " << k);
      check_override(gate, moet::TopKGate<float>(ok), {.k = k}, x);
    }
  }
  SECTION("TopPGate p") {
    const moet::TopPGate<float>::Options o{.model_dim = 24, .num_experts = 8, .p = 0.4};
    const moet::TopPGate<float> gate(o);
    for (const double p : {0.1, 0.7, 1.0}) {
      auto op = o;
      op.p = p;
      INFO("p " << p);
      check_override(gate, moet::TopPGate<float>(op), {.p = p}, x);
    }
  }
  SECTION("ImportanceGate k_max and the budget k_avg") {
    std::vector<float> importance(97);
    std::mt19937 gen(5);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    for (auto& v : importance) v = uniform(gen);
    moet::RouteContext ctx;
    ctx.importance = importance;
    const moet::ImportanceGate<float>::Options o{.model_dim = 24, .num_experts = 8, .k_max = 4};
    const moet::ImportanceGate<float> gate(o);
    auto o2 = o;
    o2.k_max = 2;
    check_override(gate, moet::ImportanceGate<float>(o2), {.k_max = 2}, x, ctx);
    const moet::ImportanceGate<float>::Options ob{.model_dim = 24,
                                                  .num_experts = 8,
                                                  .k_max = 6,
                                                  .norm = moet::ImportanceNorm::kBudget,
                                                  .k_avg = 2.0};
    const moet::ImportanceGate<float> budget(ob);
    auto ob2 = ob;
    ob2.k_avg = 3.5;
    ob2.k_max = 5;
    check_override(budget, moet::ImportanceGate<float>(ob2), {.k_max = 5, .k_avg = 3.5}, x, ctx);
  }
  SECTION("GroupedTopKGate k: route and backward") {
    // k = 1 turns DeepSeek-V2's renormalisation off (it renormalises only for k > 1), so the
    // backward must see the override too.
    const auto o = moet::GroupedTopKGate<float>::deepseek_v2_options(24, 8, 2, 4, 2, true, 1.5);
    moet::GroupedTopKGate<float> gate(o);
    auto o1 = o;
    o1.k = 1;
    moet::GroupedTopKGate<float> built(o1);
    check_override(gate, built, {.k = 1}, x);
    built.set_router(gate.router(), moet::WeightLayout::kInOut);
    moet::RouteContext ctx;
    ctx.overrides.k = 1;
    moet::Routing<float> plan;
    gate.route(x, ctx, plan);
    const RowMatrix<float> dw_rows = random_rows(1, plan.num_assignments(), 9);
    const std::span<const float> dw(dw_rows.data(), static_cast<std::size_t>(dw_rows.size()));
    RowMatrix<float> dx_got = RowMatrix<float>::Zero(97, 24);
    RowMatrix<float> dx_want = RowMatrix<float>::Zero(97, 24);
    gate.zero_grad();
    built.zero_grad();
    gate.backward(x, ctx, plan, dw, {}, dx_got);
    built.backward(x, {}, plan, dw, {}, dx_want);
    CHECK(dx_got == dx_want);
    CHECK(gate.router_grad() == built.router_grad());
    // Without the override the backward renormalises: a different gradient.
    RowMatrix<float> dx_plain = RowMatrix<float>::Zero(97, 24);
    gate.backward(x, {}, plan, dw, {}, dx_plain);
    CHECK(dx_plain != dx_want);
  }
}

TEST_CASE("Overrides a gate does not take, or out of range, are errors naming it",
          "[overrides][errors]") {
  const RowMatrix<float> x = random_rows(5, 24, 2);
  moet::Routing<float> plan;
  moet::RouteContext ctx;
  const moet::TopKGate<float> top_k({.model_dim = 24, .num_experts = 8, .k = 2});
  ctx.overrides = {.p = 0.5};
  REQUIRE_THROWS_WITH(top_k.route(x, ctx, plan),
                      Contains("TopKGate") && Contains("ctx.overrides.p") && Contains("takes k"));
  ctx.overrides = {.k = 9};
  REQUIRE_THROWS_WITH(top_k.route(x, ctx, plan), Contains("TopKGate") && Contains("got 9"));
  ctx.overrides = {.k = -1};
  REQUIRE_THROWS_AS(top_k.route(x, ctx, plan), moet::Error);
  const moet::TopPGate<float> top_p({.model_dim = 24, .num_experts = 8});
  ctx.overrides = {.p = 1.5};
  REQUIRE_THROWS_WITH(top_p.route(x, ctx, plan), Contains("TopPGate") && Contains("1.5"));
  ctx.overrides = {.p = std::numeric_limits<double>::quiet_NaN()};
  REQUIRE_THROWS_AS(top_p.route(x, ctx, plan), moet::Error);
  ctx.overrides = {.k = 1};
  REQUIRE_THROWS_WITH(top_p.route(x, ctx, plan), Contains("ctx.overrides.k"));
  const moet::ImportanceGate<float> importance({.model_dim = 24, .num_experts = 8});
  ctx.overrides = {.k_avg = 2.0};  // only for the budget mapping
  std::vector<float> imp(5, 1.0f);
  ctx.importance = imp;
  REQUIRE_THROWS_WITH(importance.route(x, ctx, plan), Contains("kBudget"));
  ctx.overrides = {.k_max = 9};
  REQUIRE_THROWS_WITH(importance.route(x, ctx, plan), Contains("k_max"));
  const moet::GroupedTopKGate<float> grouped(
      moet::GroupedTopKGate<float>::deepseek_v2_options(24, 8, 2, 4, 1, true, 1.0));
  ctx.overrides = {.k = 3};  // more than one kept group of 2 experts holds
  REQUIRE_THROWS_WITH(grouped.route(x, ctx, plan), Contains("GroupedTopKGate"));
  const moet::StochasticGate<float> stochastic({.model_dim = 24, .num_experts = 8});
  ctx.overrides = {.k = 1};
  REQUIRE_THROWS_WITH(stochastic.route(x, ctx, plan),
                      Contains("StochasticGate") && Contains("no overrides"));
  const moet::TopAnyGate<float> top_any({.model_dim = 24, .num_experts = 8});
  REQUIRE_THROWS_WITH(top_any.route(x, ctx, plan), Contains("TopAnyGate"));
}

TEST_CASE("A layer's overrides route every call, a call's fields win", "[overrides][layer]") {
  using Experts = moet::SwiGluExperts<float>;
  const RowMatrix<float> x = random_rows(40, 32, 3);
  const moet::TopKGate<float> gate({.model_dim = 32, .num_experts = 4, .k = 2, .init_seed = 1});
  moet::TopKGate<float> gate1({.model_dim = 32, .num_experts = 4, .k = 1});
  moet::TopKGate<float> gate3({.model_dim = 32, .num_experts = 4, .k = 3});
  gate1.set_router(gate.router(), moet::WeightLayout::kInOut);
  gate3.set_router(gate.router(), moet::WeightLayout::kInOut);
  const Experts experts({.model_dim = 32, .hidden_dim = 48, .num_experts = 4, .init_seed = 2});
  moet::MoELayer<moet::TopKGate<float>, Experts> layer(gate, experts);
  moet::MoELayer<moet::TopKGate<float>, Experts> layer1(gate1, experts);
  moet::MoELayer<moet::TopKGate<float>, Experts> layer3(gate3, experts);
  const RowMatrix<float> y2 = layer.forward(x);
  layer.set_overrides({.k = 1});
  CHECK(layer.overrides().k == 1);
  const RowMatrix<float> y1 = layer.forward(x);
  CHECK(y1 == layer1.forward(x));
  CHECK(y1 != y2);
  CHECK(layer.stats().mean_k == 1.0);
  moet::RouteContext ctx;
  ctx.overrides.k = 3;  // the call's k wins over the layer's
  CHECK(layer.forward(x, ctx) == layer3.forward(x));
  layer.set_overrides({});
  CHECK(layer.forward(x) == y2);
  layer.set_overrides({.p = 0.5});
  REQUIRE_THROWS_WITH(layer.forward(x), Contains("TopKGate") && Contains("ctx.overrides.p"));
}

}  // namespace test_route_overrides
