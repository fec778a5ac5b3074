// Backward of the softmax-router gates (TopKGate, TopPGate, ImportanceGate, and example 03's
// ThresholdGate, built on the public gate toolkit): finite differences in double against the
// gates' own forward, determinism at 1 and 2 threads, bad input.
//
// The oracle: a scalar loss L = sum_a c_a w_a + sum_{t,e} r_{t,e} P_{t,e} + sum_{t,e} s_{t,e}
// z_{t,e} of the forward plan (w: combine weights, P: clean probabilities, z = x W_r computed
// here by naive loops), with fixed random c, r, s. Central differences of L in every router
// weight, noise weight and input entry, with the selection checked to be unchanged at every
// perturbed point, against backward(x, ctx, plan, c, {r, s}, dx).
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <span>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/gates/expert_choice.hpp"
#include "moet/gates/importance.hpp"
#include "moet/gates/relu.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/gates/top_p.hpp"

#include "example_03_gate.hpp"

namespace test_grad_softmax_gates {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;

static_assert(moet::TrainableGate<moet::TopKGate<float>>, "TopKGate<float> is trainable");
static_assert(moet::TrainableGate<moet::TopKGate<double>>, "TopKGate<double> is trainable");
static_assert(moet::TrainableGate<moet::TopPGate<float>>, "TopPGate<float> is trainable");
static_assert(moet::TrainableGate<moet::TopPGate<double>>, "TopPGate<double> is trainable");
static_assert(moet::TrainableGate<moet::ImportanceGate<float>>,
              "ImportanceGate<float> is trainable");
static_assert(moet::TrainableGate<moet::ImportanceGate<double>>,
              "ImportanceGate<double> is trainable");
static_assert(moet::TrainableGate<ThresholdGate<double>>, "example 03's gate is trainable");
static_assert(moet::TrainableGate<moet::ReluGate<double>>, "ReluGate<double> is trainable");
static_assert(moet::TrainableGate<moet::ExpertChoiceGate<double>>,
              "ExpertChoiceGate<double> is trainable");

template <class S>
RowMatrix<S> random_matrix(Index rows, Index cols, std::uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  RowMatrix<S> m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<S>(dist(gen));
  }
  return m;
}

template <class S>
std::vector<S> random_vector(std::size_t n, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<S> v(n);
  for (auto& x : v) x = static_cast<S>(dist(gen));
  return v;
}

template <class S>
std::span<const S> span_of(const RowMatrix<S>& m) {
  return {m.data(), static_cast<std::size_t>(m.size())};
}

// The fixed random coefficients of the test loss.
struct Coeffs {
  std::vector<double> c;  // per assignment
  RowMatrix<double> r;    // (T, E) on P, or empty
  RowMatrix<double> s;    // (T, E) on z, or empty
};

// z = x W in double, naive loops.
RowMatrix<double> naive_logits(const RowMatrix<double>& x, const RowMatrix<double>& w) {
  RowMatrix<double> z = RowMatrix<double>::Zero(x.rows(), w.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    for (Index e = 0; e < w.cols(); ++e) {
      for (Index i = 0; i < x.cols(); ++i) z(t, e) += x(t, i) * w(i, e);
    }
  }
  return z;
}

bool same_selection(const moet::Routing<double>& a, const moet::Routing<double>& b) {
  if (a.num_assignments() != b.num_assignments()) return false;
  for (Index t = 0; t <= a.num_tokens(); ++t) {
    if (a.offsets()[static_cast<std::size_t>(t)] != b.offsets()[static_cast<std::size_t>(t)]) {
      return false;
    }
  }
  for (std::size_t i = 0; i < a.experts().size(); ++i) {
    if (a.experts()[i] != b.experts()[i]) return false;
  }
  return true;
}

// The test loss at the gate's current parameters and x; checks the selection equals `ref`.
template <class G>
double test_loss(const G& gate, const RowMatrix<double>& x, const moet::RouteContext& ctx,
                 const moet::Routing<double>& ref, const Coeffs& k) {
  moet::Routing<double> plan;
  gate.route(x, ctx, plan);
  REQUIRE(same_selection(plan, ref));  // the test point is away from selection boundaries
  double loss = 0.0;
  for (std::size_t a = 0; a < plan.weights().size(); ++a) loss += k.c[a] * plan.weights()[a];
  if (k.r.size() > 0) loss += (k.r.array() * plan.probs().array()).sum();
  if (k.s.size() > 0) loss += (k.s.array() * naive_logits(x, gate.router()).array()).sum();
  return loss;
}

// Central differences of f over every entry of m (restored afterwards).
RowMatrix<double> central_diff(Eigen::Ref<RowMatrix<double>> m, const std::function<double()>& f) {
  const double h = 1e-6;
  RowMatrix<double> g(m.rows(), m.cols());
  for (Index i = 0; i < m.rows(); ++i) {
    for (Index j = 0; j < m.cols(); ++j) {
      const double saved = m(i, j);
      m(i, j) = saved + h;
      const double up = f();
      m(i, j) = saved - h;
      const double down = f();
      m(i, j) = saved;
      g(i, j) = (up - down) / (2.0 * h);
    }
  }
  return g;
}

// Parameter `name` of `gate` in place, writable, as the optimisers see it (visit_parameters).
template <class G>
moet::ParamMap<double> visited(G& gate, std::string_view name) {
  double* data = nullptr;
  Index rows = 0;
  Index cols = 0;
  gate.visit_parameters(
      [&](std::string_view n, moet::ParamMap<double> value, moet::ParamMap<double>) {
        if (n != name) return;
        data = value.data();
        rows = value.rows();
        cols = value.cols();
      });
  REQUIRE(data != nullptr);
  return moet::ParamMap<double>(data, rows, cols);
}

double rel_error(const RowMatrix<double>& a, const RowMatrix<double>& ref) {
  return (a - ref).norm() / std::max(ref.norm(), 1e-300);
}

// Checks the gate's backward against finite differences of `test_loss` at (gate, x, ctx).
// `noise` is the gate's W_noise or null.
template <class G>
void check_gradients(G& gate, RowMatrix<double> x, const moet::RouteContext& ctx, bool use_r,
                     bool use_s, bool noise = false) {
  moet::Routing<double> plan;
  gate.route(x, ctx, plan);
  const Index num_tokens = x.rows();
  const Index num_experts = gate.num_experts();
  Coeffs k;
  k.c = random_vector<double>(static_cast<std::size_t>(plan.num_assignments()), 101);
  if (use_r) k.r = random_matrix<double>(num_tokens, num_experts, 102);
  if (use_s) k.s = random_matrix<double>(num_tokens, num_experts, 103);

  gate.zero_grad();
  RowMatrix<double> dx = RowMatrix<double>::Zero(num_tokens, x.cols());
  moet::SoftmaxLossGrad<double> lg;
  if (use_r) lg.d_probs = span_of(k.r);
  if (use_s) lg.d_logits = span_of(k.s);
  gate.backward(x, ctx, plan, std::span<const double>(k.c), lg, dx);

  const auto f = [&] { return test_loss(gate, x, ctx, plan, k); };
  const RowMatrix<double> fd_w = central_diff(visited(gate, "router.weight"), f);
  const RowMatrix<double> fd_x = central_diff(x, f);
  INFO("dW_r rel error " << rel_error(gate.router_grad(), fd_w) << ", dx rel error "
                         << rel_error(dx, fd_x));
  CHECK(fd_w.norm() > 1e-3);
  CHECK(rel_error(gate.router_grad(), fd_w) <= 1e-4);
  CHECK(rel_error(dx, fd_x) <= 1e-4);
  if constexpr (requires { gate.noise_router_grad(); }) {
    if (noise) {
      const RowMatrix<double> fd_n = central_diff(visited(gate, "router.noise_weight"), f);
      INFO("dW_noise rel error " << rel_error(gate.noise_router_grad(), fd_n));
      CHECK(fd_n.norm() > 1e-3);
      CHECK(rel_error(gate.noise_router_grad(), fd_n) <= 1e-4);
    }
  }

  // Accumulation: a second backward adds the same gradients again.
  const RowMatrix<double> once = gate.router_grad();
  RowMatrix<double> dx2 = dx;
  gate.backward(x, ctx, plan, std::span<const double>(k.c), lg, dx2);
  CHECK((gate.router_grad() - 2.0 * once).norm() <= 1e-12 * once.norm());
  CHECK((dx2 - 2.0 * dx).norm() <= 1e-12 * dx.norm());
}

constexpr Index kDim = 5;
constexpr Index kTokens = 14;
constexpr Index kExperts = 6;

}  // namespace

TEST_CASE("TopKGate backward matches finite differences (Switch, GShard, capacity)",
          "[train][grad][gate][top_k]") {
  const RowMatrix<double> x = random_matrix<double>(kTokens, kDim, 7);
  SECTION("Switch top-1, raw P") {
    moet::TopKGate<double> gate(moet::TopKGate<double>::switch_options(kDim, kExperts));
    check_gradients(gate, x, {}, true, true);
  }
  SECTION("top-3 raw P, weights only") {
    auto o = moet::TopKGate<double>::switch_options(kDim, kExperts);
    o.k = 3;
    moet::TopKGate<double> gate(o);
    check_gradients(gate, x, {}, false, false);
  }
  SECTION("GShard top-2 renormalised, with d_probs and d_logits") {
    moet::TopKGate<double> gate(moet::TopKGate<double>::gshard_options(kDim, kExperts));
    check_gradients(gate, x, {}, true, true);
  }
  SECTION("top-2 renormalised with capacity drops") {
    auto o = moet::TopKGate<double>::gshard_options(kDim, kExperts);
    o.capacity_factor = 1.0;
    o.min_capacity = 0;
    moet::TopKGate<double> gate(o);
    moet::Routing<double> plan;
    gate.route(x, {}, plan);
    REQUIRE(plan.dropped > 0);
    check_gradients(gate, x, {}, true, false);
  }
  SECTION("top-2 raw P with capacity drops") {
    auto o = moet::TopKGate<double>::switch_options(kDim, kExperts);
    o.k = 2;
    o.capacity_factor = 1.0;
    o.min_capacity = 0;
    moet::TopKGate<double> gate(o);
    check_gradients(gate, x, {}, true, false);
  }
}

TEST_CASE("Noisy TopKGate backward reaches W_r and W_noise through H",
          "[train][grad][gate][top_k][noisy]") {
  const RowMatrix<double> x = random_matrix<double>(kTokens, kDim, 8);
  moet::RouteContext ctx;
  ctx.training = true;
  ctx.seed = 42;
  ctx.step = 3;
  const bool renormalize = GENERATE(true, false);
  auto o = moet::TopKGate<double>::noisy_top_k_options(kDim, kExperts, 2);
  o.renormalize = renormalize;
  moet::TopKGate<double> gate(o);
  gate.set_noise_router(random_matrix<double>(kDim, kExperts, 9, 0.5), moet::WeightLayout::kInOut);
  check_gradients(gate, x, ctx, true, true, /*noise=*/true);

  SECTION("in inference the noise weights get no gradient") {
    gate.zero_grad();
    moet::Routing<double> plan;
    gate.route(x, {}, plan);
    RowMatrix<double> dx = RowMatrix<double>::Zero(kTokens, kDim);
    const auto c = random_vector<double>(static_cast<std::size_t>(plan.num_assignments()), 5);
    gate.backward(x, {}, plan, std::span<const double>(c), {}, dx);
    CHECK(gate.noise_router_grad().norm() == 0.0);
    CHECK(gate.router_grad().norm() > 0.0);
  }
}

TEST_CASE("TopKGate visits router.weight and router.noise_weight", "[train][grad][gate][top_k]") {
  moet::TopKGate<float> plain(moet::TopKGate<float>::mixtral_options(kDim, kExperts));
  moet::TopKGate<float> noisy(moet::TopKGate<float>::noisy_top_k_options(kDim, kExperts, 2));
  std::vector<std::string> names;
  const auto visit = [&](std::string_view name, moet::ParamMap<float> value,
                         moet::ParamMap<float> grad) {
    names.emplace_back(name);
    CHECK(value.rows() == kDim);
    CHECK(value.cols() == kExperts);
    CHECK(grad.rows() == kDim);
    CHECK(grad.cols() == kExperts);
    CHECK(grad.norm() == 0.0f);
  };
  plain.visit_parameters(visit);
  CHECK(names == std::vector<std::string>{"router.weight"});
  names.clear();
  noisy.visit_parameters(visit);
  CHECK(names == std::vector<std::string>{"router.weight", "router.noise_weight"});
  // The visited maps alias the gate's own storage.
  noisy.visit_parameters([](std::string_view, moet::ParamMap<float> value, moet::ParamMap<float>) {
    value(0, 0) = 3.0f;
  });
  CHECK(noisy.router()(0, 0) == 3.0f);
  CHECK(noisy.noise_router()(0, 0) == 3.0f);
}

TEST_CASE("TopKGate::logits equals x W_r", "[train][gate][top_k]") {
  const RowMatrix<double> x = random_matrix<double>(kTokens, kDim, 10);
  moet::TopKGate<double> gate(moet::TopKGate<double>::switch_options(kDim, kExperts));
  RowMatrix<double> z(kTokens, kExperts);
  gate.logits(x, z);
  CHECK((z - naive_logits(x, gate.router())).norm() <= 1e-12);
  RowMatrix<double> bad(kTokens, kExperts + 1);
  CHECK_THROWS_WITH(gate.logits(x, bad), Contains("TopKGate") && Contains("z must be (14, 6)"));
}

TEST_CASE("TopPGate backward matches finite differences with the kept set fixed",
          "[train][grad][gate][top_p]") {
  const RowMatrix<double> x = random_matrix<double>(kTokens, kDim, 11, 1.5);
  const double p = GENERATE(0.4, 0.7);
  moet::TopPGate<double> gate({.model_dim = kDim, .num_experts = kExperts, .p = p});
  moet::Routing<double> plan;
  gate.route(x, {}, plan);
  REQUIRE(plan.mean_k() > 1.0);  // some tokens keep several experts
  check_gradients(gate, x, {}, true, true);
  SECTION("weights only") { check_gradients(gate, x, {}, false, false); }
}

TEST_CASE("ExpertChoiceGate backward matches finite differences with the choice fixed",
          "[train][grad][gate][expert_choice]") {
  // (seed, capacity factor): C = 2 and C = 4 of 14 tokens per expert.
  const auto [seed, cf] = GENERATE(table<std::uint32_t, double>({{14u, 1.0}, {17u, 1.5}}));
  const RowMatrix<double> x = random_matrix<double>(kTokens, kDim, seed);
  moet::ExpertChoiceGate<double> gate(
      {.model_dim = kDim, .num_experts = kExperts, .capacity_factor = cf, .min_capacity = 0});
  moet::Routing<double> plan;
  gate.route(x, {}, plan);
  Index none = 0, several = 0;
  for (Index t = 0; t < kTokens; ++t) {
    none += plan.k(t) == 0 ? 1 : 0;
    several += plan.k(t) > 1 ? 1 : 0;
  }
  REQUIRE(none > 0);     // tokens no expert took: gradient through d_probs and d_logits only
  REQUIRE(several > 0);  // and tokens several experts took
  check_gradients(gate, x, {}, true, true);
  SECTION("weights only") { check_gradients(gate, x, {}, false, false); }
}

TEST_CASE("ReluGate backward matches finite differences (R = relu(x W_r) is the weight)",
          "[train][grad][gate][relu]") {
  const RowMatrix<double> x = random_matrix<double>(kTokens, kDim, 15);
  moet::ReluGate<double> gate({.model_dim = kDim, .num_experts = kExperts, .init_seed = 2});
  moet::Routing<double> plan;
  gate.route(x, {}, plan);
  Index none = 0, several = 0, zeros = 0;
  for (Index t = 0; t < kTokens; ++t) {
    none += plan.k(t) == 0 ? 1 : 0;
    several += plan.k(t) > 1 ? 1 : 0;
    zeros += kExperts - plan.k(t);
  }
  REQUIRE(several > 0);
  REQUIRE(zeros > 0);  // inactive experts: no gradient through their R (relu' = 0)
  INFO("tokens without an expert: " << none);
  check_gradients(gate, x, {}, true, true);
  SECTION("weights only") { check_gradients(gate, x, {}, false, false); }
}

TEST_CASE("Example 03's ThresholdGate trains: its backward matches finite differences",
          "[train][grad][gate][custom]") {
  const RowMatrix<double> x = random_matrix<double>(kTokens, kDim, 12);
  ThresholdGate<double> gate(kDim, kExperts, 0.15, /*seed=*/3);
  moet::Routing<double> plan;
  gate.route(x, {}, plan);
  Index multi = 0;
  for (Index t = 0; t < kTokens; ++t) multi += plan.k(t) > 1 ? 1 : 0;
  REQUIRE(multi > 0);        // renormalised weights over several experts
  REQUIRE(multi < kTokens);  // and tokens with the best expert only
  SECTION("combine weights only") { check_gradients(gate, x, {}, false, false); }
  SECTION("with d_probs and d_logits") { check_gradients(gate, x, {}, true, true); }
}

TEST_CASE("ImportanceGate backward matches finite differences with importance detached",
          "[train][grad][gate][importance]") {
  const RowMatrix<double> x = random_matrix<double>(kTokens, kDim, 12);
  std::vector<float> importance(static_cast<std::size_t>(kTokens));
  std::mt19937 gen(13);
  std::uniform_real_distribution<float> unit(0.05f, 1.0f);
  for (auto& v : importance) v = unit(gen);
  std::vector<std::uint8_t> valid(static_cast<std::size_t>(kTokens), 1);
  valid[3] = 0;  // a pad: K = 0, gradient only through d_probs
  moet::RouteContext ctx;
  ctx.importance = importance;
  ctx.valid = valid;
  const bool renormalize = GENERATE(false, true);
  moet::ImportanceGate<double> gate({.model_dim = kDim,
                                     .num_experts = kExperts,
                                     .k_min = 1,
                                     .k_max = 4,
                                     .renormalize = renormalize});
  moet::Routing<double> plan;
  gate.route(x, ctx, plan);
  REQUIRE(plan.k(3) == 0);
  check_gradients(gate, x, ctx, true, true);
}

namespace {

// Backward of `gate` on a larger float batch (several token and column blocks) at `threads`.
template <class G>
void float_backward(G& gate, const moet::RouteContext& ctx, int threads,
                    RowMatrix<float>& router_grad, RowMatrix<float>& dx) {
  const Index num_tokens = 300;
  const Index dim = gate.model_dim();
  const RowMatrix<float> x = random_matrix<float>(num_tokens, dim, 21);
  const int saved = moet::num_threads();
  moet::set_num_threads(threads);
  moet::Routing<float> plan;
  gate.route(x, ctx, plan);
  const auto c = random_vector<float>(static_cast<std::size_t>(plan.num_assignments()), 22);
  const RowMatrix<float> r = random_matrix<float>(num_tokens, gate.num_experts(), 23);
  const RowMatrix<float> s = random_matrix<float>(num_tokens, gate.num_experts(), 24);
  gate.zero_grad();
  dx = RowMatrix<float>::Zero(num_tokens, dim);
  gate.backward(x, ctx, plan, std::span<const float>(c), {span_of(r), span_of(s)}, dx);
  moet::set_num_threads(saved);
  router_grad = gate.router_grad();
}

}  // namespace

TEST_CASE("Softmax gate backward gives the same bits at 1 and 2 threads",
          "[train][grad][gate][parallel]") {
  constexpr Index dim = 40;
  constexpr Index experts = 8;
  RowMatrix<float> g1, g2, dx1, dx2;
  SECTION("noisy TopKGate") {
    moet::TopKGate<float> gate(moet::TopKGate<float>::noisy_top_k_options(dim, experts, 2));
    gate.set_noise_router(random_matrix<float>(dim, experts, 25, 0.3), moet::WeightLayout::kInOut);
    moet::RouteContext ctx;
    ctx.training = true;
    ctx.seed = 1;
    float_backward(gate, ctx, 1, g1, dx1);
    const RowMatrix<float> n1 = gate.noise_router_grad();
    float_backward(gate, ctx, 2, g2, dx2);
    CHECK(n1 == gate.noise_router_grad());
    CHECK(n1.norm() > 0.0f);
  }
  SECTION("TopKGate with capacity") {
    auto o = moet::TopKGate<float>::gshard_options(dim, experts);
    o.capacity_factor = 1.0;
    moet::TopKGate<float> gate(o);
    float_backward(gate, {}, 1, g1, dx1);
    float_backward(gate, {}, 2, g2, dx2);
  }
  SECTION("TopKGate with 24 experts (the router's products on the packed kernels)") {
    auto o = moet::TopKGate<float>::gshard_options(dim, 24);
    moet::TopKGate<float> gate(o);
    float_backward(gate, {}, 1, g1, dx1);
    float_backward(gate, {}, 2, g2, dx2);
  }
  SECTION("TopPGate") {
    moet::TopPGate<float> gate({.model_dim = dim, .num_experts = experts, .p = 0.5});
    float_backward(gate, {}, 1, g1, dx1);
    float_backward(gate, {}, 2, g2, dx2);
  }
  SECTION("ImportanceGate") {
    std::vector<float> importance(300);
    for (std::size_t t = 0; t < importance.size(); ++t) {
      importance[t] = static_cast<float>((t * 37) % 11) + 1.0f;
    }
    moet::RouteContext ctx;
    ctx.importance = importance;
    moet::ImportanceGate<float> gate({.model_dim = dim, .num_experts = experts, .k_max = 3});
    float_backward(gate, ctx, 1, g1, dx1);
    float_backward(gate, ctx, 2, g2, dx2);
  }
  CHECK(g1.norm() > 0.0f);
  CHECK(dx1.norm() > 0.0f);
  CHECK(g1 == g2);
  CHECK(dx1 == dx2);
}

TEST_CASE("Softmax gate backward on an empty batch allocates the gradient and adds nothing",
          "[train][grad][gate]") {
  moet::TopKGate<double> gate(moet::TopKGate<double>::switch_options(kDim, kExperts));
  const RowMatrix<double> x(0, kDim);
  moet::Routing<double> plan;
  gate.route(x, {}, plan);
  RowMatrix<double> dx(0, kDim);
  gate.backward(x, {}, plan, {}, {}, dx);
  CHECK(gate.router_grad().rows() == kDim);
  CHECK(gate.router_grad().norm() == 0.0);
}

TEST_CASE("Softmax gate backward rejects mismatched sizes and foreign plans",
          "[train][grad][gate][bad_input]") {
  const RowMatrix<double> x = random_matrix<double>(kTokens, kDim, 30);
  moet::TopKGate<double> gate(moet::TopKGate<double>::gshard_options(kDim, kExperts));
  moet::Routing<double> plan;
  gate.route(x, {}, plan);
  const std::vector<double> c(static_cast<std::size_t>(plan.num_assignments()), 1.0);
  const std::span<const double> dw(c);
  RowMatrix<double> dx = RowMatrix<double>::Zero(kTokens, kDim);
  const std::vector<double> short_probs(static_cast<std::size_t>(kTokens * kExperts - 1), 0.0);

  CHECK_THROWS_WITH(gate.backward(x, {}, plan, dw.first(5), {}, dx),
                    Contains("TopKGate::backward") &&
                        Contains("d_weights must have one entry per assignment (28), got 5"));
  CHECK_THROWS_WITH(
      gate.backward(x, {}, plan, dw, {.d_probs = short_probs}, dx),
      Contains("TopKGate::backward") && Contains("d_probs must be empty or num_tokens * "
                                                 "num_experts = 14 * 6 = 84 values, got 83"));
  CHECK_THROWS_WITH(gate.backward(x, {}, plan, dw, {.d_logits = short_probs}, dx),
                    Contains("d_logits must be empty or num_tokens * num_experts"));
  RowMatrix<double> dx_bad(kTokens, kDim + 1);
  CHECK_THROWS_WITH(gate.backward(x, {}, plan, dw, {}, dx_bad),
                    Contains("TopKGate::backward") && Contains("dx must be (14, 5)"));
  const RowMatrix<double> x_short = x.topRows(10);
  RowMatrix<double> dx_short(10, kDim);
  CHECK_THROWS_WITH(gate.backward(x_short, {}, plan, dw, {}, dx_short),
                    Contains("TopKGate::backward") && Contains("it has 14 tokens and 6 experts") &&
                        Contains("x has 10 rows"));
  const RowMatrix<double> x_wide(kTokens, kDim + 2);
  CHECK_THROWS_WITH(gate.backward(x_wide, {}, plan, dw, {}, dx),
                    Contains("TopKGate::backward") && Contains("model_dim = 5"));

  // A plan from a gate with another expert count.
  moet::TopPGate<double> other({.model_dim = kDim, .num_experts = kExperts + 1});
  moet::Routing<double> foreign;
  other.route(x, {}, foreign);
  const std::vector<double> cf(static_cast<std::size_t>(foreign.num_assignments()), 1.0);
  moet::TopPGate<double> top_p({.model_dim = kDim, .num_experts = kExperts});
  CHECK_THROWS_WITH(top_p.backward(x, {}, foreign, cf, {}, dx), Contains("TopPGate::backward") &&
                                                                    Contains("7 experts") &&
                                                                    Contains("the gate 6 experts"));
  // A plan without probabilities (hand-made).
  moet::Routing<double> bare;
  bare.reset(kTokens, kExperts);
  bare.commit_counts();
  moet::ImportanceGate<double> imp({.model_dim = kDim, .num_experts = kExperts});
  CHECK_THROWS_WITH(imp.backward(x, {}, bare, {}, {}, dx),
                    Contains("ImportanceGate::backward") &&
                        Contains("routing.probs() must be (14, 6), got (0, 0)"));
  // Nothing was accumulated by the failed calls.
  CHECK(gate.router_grad().size() == 0);
}

}  // namespace test_grad_softmax_gates
