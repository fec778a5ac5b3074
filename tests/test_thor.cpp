// ThorStep: two stochastic passes with their own draws, both trained; the backward equals the
// sum of two independent layer backwards; argument checks.
#include <cstdint>
#include <cstring>
#include <random>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/context.hpp"
#include "moet/errors.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/layer.hpp"
#include "moet/train/thor.hpp"

namespace test_thor {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;
using S = float;
using Layer = moet::MoELayer<moet::StochasticGate<S>, moet::GeluFfnExperts<S>>;

constexpr Index kDim = 8;
constexpr Index kTokens = 20;
constexpr Index kExperts = 4;

RowMatrix<S> random_rows(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  RowMatrix<S> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(normal(gen));
  return m;
}

Layer make_layer() {
  return Layer(moet::StochasticGate<S>({.model_dim = kDim, .num_experts = kExperts, .stream = 3}),
               moet::GeluFfnExperts<S>(
                   {.model_dim = kDim, .hidden_dim = 12, .num_experts = kExperts, .init_seed = 5}));
}

bool bit_identical(const RowMatrix<S>& a, const RowMatrix<S>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(S) * static_cast<std::size_t>(a.size())) == 0;
}

std::vector<RowMatrix<S>> grads(Layer& layer) {
  std::vector<RowMatrix<S>> out;
  layer.visit_parameters(
      [&](std::string_view, moet::ParamMap<S>, moet::ParamMap<S> grad) { out.emplace_back(grad); });
  return out;
}

// A step whose two passes draw different experts (found by search, so the test does not
// depend on particular draw values).
moet::RouteContext context_with_distinct_draws(const Layer& layer) {
  moet::RouteContext ctx;
  ctx.seed = 17;
  for (std::uint64_t step = 0; step < 64; ++step) {
    ctx.step = step;
    const auto& gate = layer.gate();
    if (gate.training_expert(ctx.seed, 2 * step) != gate.training_expert(ctx.seed, 2 * step + 1)) {
      return ctx;
    }
  }
  FAIL("no step with two different draws");
  return ctx;
}

}  // namespace

TEST_CASE("thor_pass_context gives each pass its own step", "[thor]") {
  moet::RouteContext ctx;
  ctx.seed = 4;
  ctx.step = 10;
  const auto p0 = moet::thor_pass_context(ctx, 0);
  const auto p1 = moet::thor_pass_context(ctx, 1);
  CHECK(p0.training);
  CHECK(p1.training);
  CHECK(p0.step == 20);
  CHECK(p1.step == 21);
  CHECK(p0.seed == 4);
  CHECK_THROWS_WITH(moet::thor_pass_context(ctx, 2), Contains("pass must be 0 or 1"));
}

TEST_CASE("ThorStep runs two passes with different draws", "[thor]") {
  Layer layer = make_layer();
  const RowMatrix<S> x = random_rows(kTokens, kDim, 1);
  const moet::RouteContext ctx = context_with_distinct_draws(layer);
  moet::ThorStep<Layer> thor;
  thor.forward(layer, x, ctx);
  for (int pass = 0; pass < 2; ++pass) {
    INFO("pass " << pass);
    const std::int32_t want =
        layer.gate().training_expert(ctx.seed, 2 * ctx.step + static_cast<std::uint64_t>(pass));
    const auto& plan = thor.routing(pass);
    REQUIRE(plan.num_assignments() == kTokens);
    for (const std::int32_t e : plan.experts()) CHECK(e == want);
    // The pass output is the drawn expert on every token (weight 1).
    RowMatrix<S> expert_out(kTokens, kDim);
    moet::GeluFfnExperts<S>::Scratch scratch;
    layer.experts().forward(want, x, expert_out, scratch);
    CHECK((thor.y(pass) - expert_out).norm() <= 1e-6F * expert_out.norm());
  }
  CHECK(thor.routing(0).experts()[0] != thor.routing(1).experts()[0]);
  CHECK_THROWS_WITH(thor.y(2), Contains("pass must be 0 or 1"));
}

TEST_CASE("ThorStep backward equals the sum of two layer backwards", "[thor][grad]") {
  const RowMatrix<S> x = random_rows(kTokens, kDim, 2);
  const RowMatrix<S> dy0 = random_rows(kTokens, kDim, 3);
  const RowMatrix<S> dy1 = random_rows(kTokens, kDim, 4);
  Layer layer = make_layer();
  const moet::RouteContext ctx = context_with_distinct_draws(layer);

  Layer manual = layer;
  manual.zero_grad();
  Layer::Workspace ws0;
  Layer::Workspace ws1;
  RowMatrix<S> y0(kTokens, kDim), y1(kTokens, kDim), dx0(kTokens, kDim), dx1(kTokens, kDim);
  manual.forward_train(x, y0, moet::thor_pass_context(ctx, 0), ws0);
  manual.forward_train(x, y1, moet::thor_pass_context(ctx, 1), ws1);
  manual.backward(x, dy0, moet::thor_pass_context(ctx, 0), ws0, dx0);
  manual.backward(x, dy1, moet::thor_pass_context(ctx, 1), ws1, dx1);
  const RowMatrix<S> want_dx = dx0 + dx1;

  moet::ThorStep<Layer> thor;
  RowMatrix<S> dx(kTokens, kDim);
  layer.zero_grad();
  thor.forward(layer, x, ctx);
  CHECK(bit_identical(thor.y(0), y0));
  CHECK(bit_identical(thor.y(1), y1));
  thor.backward(layer, x, dy0, dy1, dx);
  CHECK(bit_identical(dx, want_dx));
  const auto got = grads(layer);
  const auto want = grads(manual);
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) CHECK(bit_identical(got[i], want[i]));

  // Exactly the two drawn experts have gradients.
  const auto& w1_grad = layer.experts().in_weights_grad();
  const std::int32_t e0 = thor.routing(0).experts()[0];
  const std::int32_t e1 = thor.routing(1).experts()[0];
  for (Index e = 0; e < kExperts; ++e) {
    const bool drawn = e == e0 || e == e1;
    CHECK(w1_grad.middleRows(e * kDim, kDim).isZero(0.0F) == !drawn);
  }
}

TEST_CASE("ThorStep checks its arguments", "[thor][errors]") {
  Layer layer = make_layer();
  const RowMatrix<S> x = random_rows(kTokens, kDim, 5);
  RowMatrix<S> dx(kTokens, kDim);
  moet::ThorStep<Layer> thor;
  CHECK_THROWS_WITH(thor.backward(layer, x, x, x, dx),
                    Contains("ThorStep") && Contains("needs a forward"));
  thor.forward(layer, x, {});
  RowMatrix<S> bad(kTokens, kDim + 1);
  CHECK_THROWS_WITH(thor.backward(layer, x, x, x, bad), Contains("dx must have x's shape"));
  const RowMatrix<S> fewer = x.topRows(kTokens - 1);
  RowMatrix<S> dx_fewer(kTokens - 1, kDim);
  CHECK_THROWS_WITH(thor.backward(layer, fewer, fewer, fewer, dx_fewer),
                    Contains("needs a forward"));
}

}  // namespace test_thor
