// NullExpertGate and AdaMoE's balance loss (docs/algorithms.md §17): plans against a naive
// oracle (stable sort of all E + N slots, the first k, the real ones renormalised), a
// hand-computed case, the k override against a gate built with that k, the conformance check,
// the gradient against central differences in double (weights, probabilities over all slots
// and logits), the balance loss against hand values, and bad options.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/moet.hpp"
#include "moet/testing/gate_conformance.hpp"

#include "random_rows.hpp"

namespace test_gate_null_experts {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;
using Gate = moet::NullExpertGate<float>;

RowMatrix<double> random_double(Index rows, Index cols, std::uint32_t seed) {
  return moet_test::random_rows(rows, cols, seed).cast<double>();
}

}  // namespace

TEST_CASE("NullExpertGate plans equal the naive oracle", "[gate][null_experts]") {
  const Index E = GENERATE(1, 4, 8);
  const Index N = GENERATE(1, 3, 8);
  const Index k = GENERATE(1, 2, 4);
  if (k > E + N) return;
  const bool renormalize = GENERATE(true, false);
  constexpr Index kDim = 10, kTokens = 150;
  Gate gate({.model_dim = kDim,
             .num_experts = E,
             .num_null = N,
             .k = k,
             .renormalize = renormalize,
             .init_seed = 6});
  const RowMatrix<float> x = moet_test::random_rows(kTokens, kDim, 31);
  moet::Routing<float> plan;
  gate.route(x, {}, plan);
  RowMatrix<float> p(kTokens, E + N);
  gate.all_probabilities(x, p);
  const RowMatrix<double> z = x.cast<double>() * gate.router().cast<double>();
  REQUIRE(plan.num_experts() == E);
  CHECK(plan.probs() == p.leftCols(E));
  Index real = 0;
  for (Index t = 0; t < kTokens; ++t) {
    const Eigen::RowVectorXd ez = (z.row(t).array() - z.row(t).maxCoeff()).exp();
    CHECK((p.row(t).cast<double>() - ez / ez.sum()).cwiseAbs().maxCoeff() <= 1e-6);
    std::vector<std::int32_t> slots(static_cast<std::size_t>(E + N));
    std::iota(slots.begin(), slots.end(), 0);
    std::stable_sort(slots.begin(), slots.end(),
                     [&](std::int32_t a, std::int32_t b) { return p(t, a) > p(t, b); });
    std::vector<std::int32_t> expected;
    double sum = 0.0;
    for (Index j = 0; j < k; ++j) {
      const std::int32_t s = slots[static_cast<std::size_t>(j)];
      if (s < E) {
        expected.push_back(s);
        sum += p(t, s);
      }
    }
    const auto experts = plan.experts(t);
    REQUIRE(std::vector<std::int32_t>(experts.begin(), experts.end()) == expected);
    for (std::size_t j = 0; j < experts.size(); ++j) {
      const double w = renormalize ? p(t, experts[j]) / sum : p(t, experts[j]);
      CHECK(double(plan.weights(t)[j]) == Approx(w).epsilon(1e-6));
    }
    real += static_cast<Index>(expected.size());
  }
  CHECK(plan.mean_k() == Approx(double(real) / double(kTokens)));  // null picks cost nothing
  if (N >= E && k >= 2) CHECK(plan.mean_k() < double(k));
}

TEST_CASE("NullExpertGate on a hand-computed case", "[gate][null_experts]") {
  // [W_r | W_null] = [[1, 0, 0], [0, 1, 0]]: z = (x0, x1, 0), the null slot's logit is 0.
  Gate gate({.model_dim = 2, .num_experts = 2, .num_null = 1, .k = 2});
  RowMatrix<float> w(2, 3);
  w << 1, 0, 0, 0, 1, 0;
  gate.set_router(w, moet::WeightLayout::kInOut);
  RowMatrix<float> x(3, 2);
  x << 2, 1, -1, -2, -3, -3;
  moet::Routing<float> plan;
  gate.route(x, {}, plan);
  // Token 0: picks experts 0 and 1, weights e^2 / (e^2 + e) and e / (e^2 + e).
  REQUIRE(plan.k(0) == 2);
  CHECK(plan.experts(0)[0] == 0);
  CHECK(plan.weights(0)[0] == Approx(std::exp(2.0) / (std::exp(2.0) + std::exp(1.0))));
  CHECK(plan.weights(0)[1] == Approx(std::exp(1.0) / (std::exp(2.0) + std::exp(1.0))));
  // Token 1: the null slot first, then expert 0, which gets weight 1 after renormalisation.
  REQUIRE(plan.k(1) == 1);
  CHECK(plan.experts(1)[0] == 0);
  CHECK(plan.weights(1)[0] == 1.0f);
  // Token 2: null first, then a tie between experts 0 and 1: the lower id.
  REQUIRE(plan.k(2) == 1);
  CHECK(plan.experts(2)[0] == 0);

  SECTION("k = 1 through the override: tokens 1 and 2 pick only the null expert") {
    moet::RouteContext ctx;
    ctx.overrides.k = 1;
    gate.route(x, ctx, plan);
    CHECK(plan.k(0) == 1);
    CHECK(plan.k(1) == 0);
    CHECK(plan.k(2) == 0);
    CHECK(plan.mean_k() == Approx(1.0 / 3.0));
  }
}

TEST_CASE("NullExpertGate's k override routes as a gate built with that k",
          "[gate][null_experts][overrides]") {
  const Index k = GENERATE(1, 3, 5);
  Gate base({.model_dim = 8, .num_experts = 4, .num_null = 2, .k = 2, .init_seed = 9});
  Gate built({.model_dim = 8, .num_experts = 4, .num_null = 2, .k = k, .init_seed = 9});
  const RowMatrix<float> x = moet_test::random_rows(70, 8, 3);
  moet::RouteContext ctx;
  ctx.overrides.k = k;
  moet::Routing<float> a, b;
  base.route(x, ctx, a);
  built.route(x, {}, b);
  CHECK(std::vector<Index>(a.offsets().begin(), a.offsets().end()) ==
        std::vector<Index>(b.offsets().begin(), b.offsets().end()));
  CHECK(std::equal(a.experts().begin(), a.experts().end(), b.experts().begin(), b.experts().end()));
  CHECK(std::equal(a.weights().begin(), a.weights().end(), b.weights().begin(), b.weights().end()));
  ctx.overrides.k = 7;
  CHECK_THROWS_WITH(base.route(x, ctx, a),
                    Contains("NullExpertGate") &&
                        Contains("k must be in [1, num_experts + num_null = 6], got 7"));
  ctx.overrides = {};
  ctx.overrides.p = 0.5;
  CHECK_THROWS_WITH(base.route(x, ctx, a), Contains("ctx.overrides.p"));
}

TEST_CASE("NullExpertGate passes the gate conformance check", "[gate][null_experts]") {
  moet::testing::GateCheckOptions options;
  options.weights_sum_to_one = true;
  Gate gate({.model_dim = 10, .num_experts = 5, .num_null = 5, .k = 3, .init_seed = 2});
  const auto report = moet::testing::check_gate(gate, options);
  INFO(report.to_string());
  CHECK(report.ok());
}

TEST_CASE("NullExpertGate backward matches finite differences with the picks fixed",
          "[train][grad][gate][null_experts]") {
  // L = sum_a c_a w_a + sum r * P_all + sum s * z_all, in double.
  constexpr Index kDim = 5, kTokens = 14, kE = 4, kN = 3;
  const bool renormalize = GENERATE(true, false);
  moet::NullExpertGate<double> gate(
      {.model_dim = kDim, .num_experts = kE, .num_null = kN, .k = 3, .renormalize = renormalize});
  RowMatrix<double> x = random_double(kTokens, kDim, 41);
  moet::Routing<double> ref;
  gate.route(x, {}, ref);
  Index all_null = 0, partly = 0;
  for (Index t = 0; t < kTokens; ++t) {
    all_null += ref.k(t) == 0 ? 1 : 0;
    partly += ref.k(t) > 0 && ref.k(t) < 3 ? 1 : 0;
  }
  REQUIRE(partly > 0);  // tokens that picked a null expert and real ones
  INFO("tokens with only null picks: " << all_null);
  const auto c = random_double(1, ref.num_assignments(), 42);
  const auto r = random_double(kTokens, kE + kN, 43);
  const auto s = random_double(kTokens, kE + kN, 44);
  const auto loss = [&]() {
    moet::Routing<double> plan;
    gate.route(x, {}, plan);
    REQUIRE(std::equal(plan.experts().begin(), plan.experts().end(), ref.experts().begin(),
                       ref.experts().end()));
    REQUIRE(std::equal(plan.offsets().begin(), plan.offsets().end(), ref.offsets().begin(),
                       ref.offsets().end()));
    RowMatrix<double> p(kTokens, kE + kN);
    gate.all_probabilities(x, p);
    const RowMatrix<double> z = x * gate.router();
    double l = (r.array() * p.array()).sum() + (s.array() * z.array()).sum();
    for (Index a = 0; a < plan.num_assignments(); ++a)
      l += c(0, a) * plan.weights()[std::size_t(a)];
    return l;
  };
  gate.zero_grad();
  RowMatrix<double> dx = RowMatrix<double>::Zero(kTokens, kDim);
  moet::SoftmaxLossGrad<double> lg;
  lg.d_probs = {r.data(), static_cast<std::size_t>(r.size())};
  lg.d_logits = {s.data(), static_cast<std::size_t>(s.size())};
  gate.backward(x, {}, ref, {c.data(), static_cast<std::size_t>(c.size())}, lg, dx);
  const double h = 1e-6;
  RowMatrix<double> w = gate.router();
  RowMatrix<double> fd_w(w.rows(), w.cols());
  for (Index i = 0; i < w.size(); ++i) {
    RowMatrix<double> plus = w, minus = w;
    plus.data()[i] += h;
    minus.data()[i] -= h;
    gate.set_router(plus, moet::WeightLayout::kInOut);
    const double lp = loss();
    gate.set_router(minus, moet::WeightLayout::kInOut);
    fd_w.data()[i] = (lp - loss()) / (2 * h);
  }
  gate.set_router(w, moet::WeightLayout::kInOut);
  RowMatrix<double> fd_x(kTokens, kDim);
  for (Index i = 0; i < x.size(); ++i) {
    const double v = x.data()[i];
    x.data()[i] = v + h;
    const double lp = loss();
    x.data()[i] = v - h;
    fd_x.data()[i] = (lp - loss()) / (2 * h);
    x.data()[i] = v;
  }
  const double err_w = (gate.router_grad() - fd_w).norm() / fd_w.norm();
  const double err_x = (dx - fd_x).norm() / fd_x.norm();
  INFO("dW rel error " << err_w << ", dx rel error " << err_x);
  CHECK(fd_w.rightCols(kN).norm() > 1e-3);  // the null columns get gradient
  CHECK(err_w <= 1e-6);
  CHECK(err_x <= 1e-6);

  SECTION("bad loss-gradient sizes name the backward") {
    RowMatrix<double> small(kTokens, kE);
    lg.d_probs = {small.data(), static_cast<std::size_t>(small.size())};
    CHECK_THROWS_WITH(gate.backward(x, {}, ref, {c.data(), std::size_t(c.size())}, lg, dx),
                      Contains("NullExpertGate::backward") && Contains("14 * 7"));
  }
}

TEST_CASE("null_expert_balance_loss equals the hand-computed AdaMoE loss",
          "[train][null_experts]") {
  // E = 2, N = 2, k = 2, T = 2: token 0 picks expert 0 (and a null), token 1 experts 0 and 1.
  // c = (2, 1), null picks 4 - 3 = 1, each null 0.5; f = (2, 1, .5, .5) / 4.
  moet::Routing<float> plan;
  plan.reset(2, 2);
  plan.counts()[0] = 1;
  plan.counts()[1] = 2;
  plan.commit_counts();
  plan.experts(0)[0] = 0;
  plan.experts(1)[0] = 0;
  plan.experts(1)[1] = 1;
  RowMatrix<float> p(2, 4);
  p << 0.4f, 0.3f, 0.2f, 0.1f, 0.3f, 0.3f, 0.2f, 0.2f;  // mean (.35, .3, .2, .15)
  RowMatrix<float> d = RowMatrix<float>::Zero(2, 4);
  // L = alpha (E + N) sum f_j P_j = 0.01 * 4 * 0.29375.
  CHECK(moet::null_expert_balance_loss<float>(plan, p, d, {.k = 2}) == Approx(0.01 * 4 * 0.29375));
  for (Index t = 0; t < 2; ++t) {
    CHECK(d(t, 0) == Approx(0.01 * 4 * 0.5 / 2));
    CHECK(d(t, 1) == Approx(0.01 * 4 * 0.25 / 2));
    CHECK(d(t, 2) == Approx(0.01 * 4 * 0.125 / 2));
    CHECK(d(t, 3) == Approx(0.01 * 4 * 0.125 / 2));
  }
  SECTION("a pad is left out") {
    const std::vector<std::uint8_t> valid{0, 1};
    RowMatrix<float> d1 = RowMatrix<float>::Zero(2, 4);
    // One token, experts 0 and 1: f = (1, 1, 0, 0) / 2, P = (.3, .3, .2, .2): L = 0.04 * 0.3.
    CHECK(moet::null_expert_balance_loss<float>(plan, p, d1, {.k = 2, .valid = valid}) ==
          Approx(0.04 * 0.3));
    CHECK(d1.row(0).isZero());
  }
  SECTION("bad input") {
    RowMatrix<float> real_only(2, 2), d2(2, 2);
    CHECK_THROWS_WITH(moet::null_expert_balance_loss<float>(plan, real_only, d2, {}),
                      Contains("null_expert_balance_loss") && Contains("N >= 1 beyond E = 2"));
    CHECK_THROWS_WITH(moet::null_expert_balance_loss<float>(plan, p, d, {.k = 1}),
                      Contains("token 1 has 2 real experts, more than k = 1"));
    CHECK_THROWS_WITH(moet::null_expert_balance_loss<float>(plan, p, d, {.alpha = -1.0}),
                      Contains("alpha must be finite and >= 0"));
  }
}

TEST_CASE("NullExpertGate rejects bad options", "[gate][null_experts][bad_input]") {
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 2, .num_null = 0}),
                    Contains("NullExpertGate") && Contains("num_null must be >= 1, got 0"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 2, .num_null = 1, .k = 4}),
                    Contains("k must be in [1, num_experts + num_null = 3], got 4"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 0}), Contains("num_experts must be >= 1"));
  // A slot count past int32 (an overflow of num_experts + num_null before, found by the fuzzer).
  for (const moet::Index null : {std::numeric_limits<moet::Index>::max(), moet::Index{1} << 31,
                                 moet::Index{std::numeric_limits<std::int32_t>::max()}}) {
    CHECK_THROWS_WITH(
        Gate({.model_dim = 4, .num_experts = 2, .num_null = null}),
        Contains("NullExpertGate") && Contains("num_experts + num_null must be at most"));
  }
  Gate gate({.model_dim = 4, .num_experts = 2, .num_null = 2});
  RowMatrix<float> wrong(3, 3);
  CHECK_THROWS_WITH(gate.all_probabilities(moet_test::random_rows(3, 4, 1), wrong),
                    Contains("NullExpertGate"));
}

}  // namespace test_gate_null_experts
