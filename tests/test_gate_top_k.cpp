// TopKGate: softmax top-k (Switch, GShard/Mixtral, noisy top-k) with DeepSpeed capacity.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/detail/rng.hpp"
#include "moet/gates/top_k.hpp"

namespace test_gate_top_k {  // one per file: the unity build puts several files in one TU

namespace {

using Gate = moet::TopKGate<float>;
using moet::Index;

struct NotAGate {
  using Scalar = float;
  Index num_experts() const { return 1; }
};

static_assert(moet::Gate<moet::TopKGate<float>>, "TopKGate<float> must satisfy moet::Gate");
static_assert(moet::Gate<moet::TopKGate<double>>, "TopKGate<double> must satisfy moet::Gate");
static_assert(!moet::Gate<NotAGate>, "a type without route() and model_dim() is not a Gate");

moet::RowMatrix<float> random_matrix(Index rows, Index cols, std::uint32_t seed,
                                     float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  moet::RowMatrix<float> m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) m(i, j) = dist(gen);
  }
  return m;
}

// softmax(x W) in double, row by row, written without Eigen products.
std::vector<std::vector<double>> naive_softmax(const moet::RowMatrix<float>& x,
                                               const moet::RowMatrix<float>& w) {
  std::vector<std::vector<double>> p(static_cast<std::size_t>(x.rows()));
  for (Index t = 0; t < x.rows(); ++t) {
    std::vector<double> z(static_cast<std::size_t>(w.cols()), 0.0);
    for (Index e = 0; e < w.cols(); ++e) {
      for (Index c = 0; c < x.cols(); ++c) {
        z[static_cast<std::size_t>(e)] += static_cast<double>(x(t, c)) * w(c, e);
      }
    }
    const double m = *std::max_element(z.begin(), z.end());
    double s = 0.0;
    for (auto& v : z) s += (v = std::exp(v - m));
    for (auto& v : z) v /= s;
    p[static_cast<std::size_t>(t)] = z;
  }
  return p;
}

// The k best ids of `values` by a stable sort: descending value, ties to the lower id.
std::vector<int> naive_top(const std::vector<double>& values, std::size_t k) {
  std::vector<int> ids(values.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int a, int b) {
    return values[static_cast<std::size_t>(a)] > values[static_cast<std::size_t>(b)];
  });
  ids.resize(k);
  return ids;
}

std::vector<double> row_of(const moet::Routing<float>& r, Index t) {
  std::vector<double> v(static_cast<std::size_t>(r.num_experts()));
  for (Index e = 0; e < r.num_experts(); ++e) v[static_cast<std::size_t>(e)] = r.probs()(t, e);
  return v;
}

std::vector<int> experts_of(const moet::Routing<float>& r, Index t) {
  const auto s = r.experts(t);
  return {s.begin(), s.end()};
}

void check_same_plan(const moet::Routing<float>& a, const moet::Routing<float>& b) {
  REQUIRE(a.num_tokens() == b.num_tokens());
  REQUIRE(a.num_assignments() == b.num_assignments());
  CHECK(a.dropped == b.dropped);
  for (Index t = 0; t < a.num_tokens(); ++t) REQUIRE(a.k(t) == b.k(t));
  for (std::size_t i = 0; i < a.experts().size(); ++i) {
    REQUIRE(a.experts()[i] == b.experts()[i]);
    REQUIRE(a.weights()[i] == b.weights()[i]);  // bit-identical
  }
}

// Gate with W_r = identity (model_dim = E), so each row of x is its logits.
Gate identity_gate(Gate::Options o) {
  Gate gate(o);
  gate.set_router(moet::RowMatrix<float>::Identity(o.model_dim, o.num_experts),
                  moet::WeightLayout::kInOut);
  return gate;
}

}  // namespace

TEST_CASE("TopKGate probabilities are the softmax of x W_r", "[gate][top_k]") {
  const auto seed = GENERATE(1u, 2u, 3u);
  Gate gate({.model_dim = 12, .num_experts = 6, .k = 2, .init_seed = seed});
  const auto x = random_matrix(40, 12, seed + 100);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  const auto p = naive_softmax(x, gate.router());
  REQUIRE(out.probs().rows() == 40);
  REQUIRE(out.probs().cols() == 6);
  CHECK(out.probs_are_distribution);
  for (Index t = 0; t < 40; ++t) {
    for (Index e = 0; e < 6; ++e) {
      CHECK(out.probs()(t, e) == Approx(p[static_cast<std::size_t>(t)][static_cast<std::size_t>(e)])
                                     .margin(1e-6));
    }
  }
}

TEST_CASE("TopKGate router initialisation is deterministic with std 1/sqrt(model_dim)",
          "[gate][top_k]") {
  Gate a({.model_dim = 64, .num_experts = 32, .init_seed = 5});
  Gate b({.model_dim = 64, .num_experts = 32, .init_seed = 5});
  Gate c({.model_dim = 64, .num_experts = 32, .init_seed = 6});
  CHECK(a.router() == b.router());
  CHECK(a.router() != c.router());
  const double n = static_cast<double>(a.router().size());
  const double mean = static_cast<double>(a.router().sum()) / n;
  const double var = static_cast<double>(a.router().squaredNorm()) / n - mean * mean;
  CHECK(std::abs(mean) < 0.02);
  CHECK(std::sqrt(var) == Approx(1.0 / 8.0).epsilon(0.05));
}

TEST_CASE("TopKGate matches a naive top-k on random inputs", "[gate][top_k]") {
  const auto seed = GENERATE(11u, 12u, 13u, 14u);
  const auto shape = GENERATE(std::vector<Index>{1, 1, 1}, std::vector<Index>{7, 4, 1},
                              std::vector<Index>{65, 8, 2}, std::vector<Index>{130, 16, 4},
                              std::vector<Index>{33, 5, 5});
  const bool renormalize = GENERATE(false, true);
  const Index num_tokens = shape[0], num_experts = shape[1], k = shape[2];
  Gate gate({.model_dim = 10,
             .num_experts = num_experts,
             .k = k,
             .renormalize = renormalize,
             .init_seed = seed});
  const auto x = random_matrix(num_tokens, 10, seed * 7, 2.0f);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  REQUIRE(out.num_tokens() == num_tokens);
  REQUIRE(out.num_experts() == num_experts);
  CHECK(out.dropped == 0);
  CHECK(out.num_assignments() == num_tokens * k);
  for (Index t = 0; t < num_tokens; ++t) {
    REQUIRE(out.k(t) == k);
    const auto p = row_of(out, t);
    const auto expected = naive_top(p, static_cast<std::size_t>(k));
    CHECK(experts_of(out, t) == expected);
    double selected = 0.0;
    for (const int e : expected) selected += p[static_cast<std::size_t>(e)];
    double sum = 0.0;
    for (Index j = 0; j < k; ++j) {
      const auto e = static_cast<std::size_t>(out.experts(t)[static_cast<std::size_t>(j)]);
      const double w = out.weights(t)[static_cast<std::size_t>(j)];
      CHECK(w == Approx(renormalize ? p[e] / selected : p[e]).epsilon(1e-5));
      sum += w;
    }
    if (renormalize) {
      CHECK(sum == Approx(1.0).epsilon(1e-5));
    } else {
      CHECK(sum <= 1.0 + 1e-6);
      CHECK(sum == Approx(selected).epsilon(1e-5));
    }
  }
}

TEST_CASE("TopKGate hand-computed case: raw and renormalised weights", "[gate][top_k]") {
  // Logits log(1), log(2), log(3): P = (1/6, 2/6, 3/6).
  moet::RowMatrix<float> x(1, 3);
  x << 0.0f, std::log(2.0f), std::log(3.0f);
  moet::Routing<float> out;

  auto raw = identity_gate({.model_dim = 3, .num_experts = 3, .k = 2});
  raw.route(x, {}, out);
  REQUIRE(out.k(0) == 2);
  CHECK(experts_of(out, 0) == std::vector<int>{2, 1});
  CHECK(out.weights(0)[0] == Approx(0.5));
  CHECK(out.weights(0)[1] == Approx(1.0 / 3.0));

  auto renorm = identity_gate({.model_dim = 3, .num_experts = 3, .k = 2, .renormalize = true});
  renorm.route(x, {}, out);
  CHECK(experts_of(out, 0) == std::vector<int>{2, 1});
  CHECK(out.weights(0)[0] == Approx(0.6));
  CHECK(out.weights(0)[1] == Approx(0.4));

  // k = E with renormalisation is the full softmax.
  auto all = identity_gate({.model_dim = 3, .num_experts = 3, .k = 3, .renormalize = true});
  all.route(x, {}, out);
  CHECK(experts_of(out, 0) == std::vector<int>{2, 1, 0});
  CHECK(out.weights(0)[2] == Approx(1.0 / 6.0));
}

TEST_CASE("TopKGate breaks ties toward the lower expert id", "[gate][top_k]") {
  // Logits (1, 3, 3, 1, 3): experts 1, 2, 4 tie for first, 0 and 3 for last.
  moet::RowMatrix<float> x(2, 5);
  x << 1, 3, 3, 1, 3,  //
      0, 0, 0, 0, 0;   // uniform: order 0, 1, 2, ...
  moet::Routing<float> out;
  for (Index k = 1; k <= 5; ++k) {
    auto gate = identity_gate({.model_dim = 5, .num_experts = 5, .k = k});
    gate.route(x, {}, out);
    const std::vector<int> order0{1, 2, 4, 0, 3};
    const std::vector<int> order1{0, 1, 2, 3, 4};
    CHECK(experts_of(out, 0) ==
          std::vector<int>(order0.begin(), order0.begin() + static_cast<std::ptrdiff_t>(k)));
    CHECK(experts_of(out, 1) ==
          std::vector<int>(order1.begin(), order1.begin() + static_cast<std::ptrdiff_t>(k)));
    CHECK(out.weights(1)[0] == Approx(0.2));
  }
}

TEST_CASE("TopKGate presets are Switch, GShard and Mixtral", "[gate][top_k]") {
  const auto s = Gate::switch_options(16, 8);
  CHECK(s.model_dim == 16);
  CHECK(s.num_experts == 8);
  CHECK(s.k == 1);
  CHECK_FALSE(s.renormalize);
  CHECK(s.capacity_factor == 0.0);
  const auto g = Gate::gshard_options(16, 8);
  CHECK(g.k == 2);
  CHECK(g.renormalize);
  const auto m = Gate::mixtral_options(16, 8);
  CHECK(m.k == 2);
  CHECK(m.renormalize);
  CHECK(m.capacity_factor == 0.0);
  const auto n = Gate::noisy_top_k_options(16, 8, 3);
  CHECK(n.k == 3);
  CHECK(n.noisy);
  CHECK(n.renormalize);
  CHECK(Gate::Options{}.min_capacity == 4);
}

TEST_CASE("TopKGate with E = 1 sends every token to expert 0 with weight 1", "[gate][top_k]") {
  const bool renormalize = GENERATE(false, true);
  Gate gate({.model_dim = 4, .num_experts = 1, .k = 1, .renormalize = renormalize});
  const auto x = random_matrix(9, 4, 3);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  REQUIRE(out.num_assignments() == 9);
  for (Index t = 0; t < 9; ++t) {
    CHECK(out.experts(t)[0] == 0);
    CHECK(out.weights(t)[0] == 1.0f);
  }
}

TEST_CASE("TopKGate gives an empty plan for an empty batch", "[gate][top_k]") {
  Gate gate({.model_dim = 4, .num_experts = 3, .k = 2, .capacity_factor = 1.0});
  moet::RowMatrix<float> x(0, 4);
  moet::Routing<float> out;
  moet::RouteContext ctx;
  ctx.training = true;
  gate.route(x, ctx, out);
  CHECK(out.num_tokens() == 0);
  CHECK(out.num_experts() == 3);
  CHECK(out.num_assignments() == 0);
  CHECK(out.dropped == 0);
}

TEST_CASE("TopKGate capacity is computed in fp32 as DeepSpeed does", "[gate][top_k][capacity]") {
  // 10 / 2 * 0.6 = 3 exactly; fp32: 5 * 0.6f = 3.0000001192... ties to even = 3.
  // (Double arithmetic would give 3.0000000000000004 and a capacity of 4.)
  Gate a({.model_dim = 2, .num_experts = 2, .k = 1, .capacity_factor = 0.6, .min_capacity = 0});
  CHECK(a.capacity(10) == 3);
  // ceil(7 / 4 * 1.0 * 2) = ceil(3.5) = 4, raised to min_capacity 8.
  Gate b({.model_dim = 2, .num_experts = 4, .k = 2, .capacity_factor = 1.0, .min_capacity = 8});
  CHECK(b.capacity(7) == 8);
  Gate c({.model_dim = 2, .num_experts = 4, .k = 2, .capacity_factor = 1.0, .min_capacity = 0});
  CHECK(c.capacity(7) == 4);
  Gate d({.model_dim = 2, .num_experts = 4, .k = 2});  // dropless
  CHECK(d.capacity(7) == 7);
}

TEST_CASE("TopKGate drops by slot-major priority and renormalises the survivors",
          "[gate][top_k][capacity]") {
  // Six tokens, three experts, k = 2; logits (first 2, second 1, third 0) per token.
  // Preferences (first, second): t0 (0,1) t1 (0,2) t2 (0,1) t3 (1,0) t4 (2,1) t5 (1,2).
  // C = max(ceil(6 / 3 * 0.5 * 2), 0) = 2.
  // Slot 0: e0 <- t0, t1, drops t2; e1 <- t3, t5; e2 <- t4.
  // Slot 1: t0->e1 full, drop; t1->e2 kept (2nd on e2); t2->e1 drop; t3->e0 drop; t4->e1 drop;
  //         t5->e2 full, drop.  Dropped: 1 + 5 = 6.
  moet::RowMatrix<float> x(6, 3);
  x << 2, 1, 0,  //
      2, 0, 1,   //
      2, 1, 0,   //
      1, 2, 0,   //
      0, 1, 2,   //
      0, 2, 1;
  const double e1 = std::exp(1.0), e2 = std::exp(2.0);
  const double p_first = e2 / (e2 + e1 + 1.0);       // P of the first choice
  const double pair_first = e2 / (e2 + e1);          // renormalised over first + second
  const double pair_second = e1 / (e2 + e1);
  moet::Routing<float> out;

  auto renorm = identity_gate({.model_dim = 3,
                               .num_experts = 3,
                               .k = 2,
                               .renormalize = true,
                               .capacity_factor = 0.5,
                               .min_capacity = 0});
  REQUIRE(renorm.capacity(6) == 2);
  renorm.route(x, {}, out);
  CHECK(out.dropped == 6);
  CHECK(out.num_assignments() == 6);
  CHECK(experts_of(out, 0) == std::vector<int>{0});
  CHECK(experts_of(out, 1) == std::vector<int>{0, 2});
  CHECK(experts_of(out, 2).empty());
  CHECK(out.k(2) == 0);
  CHECK(experts_of(out, 3) == std::vector<int>{1});
  CHECK(experts_of(out, 4) == std::vector<int>{2});
  CHECK(experts_of(out, 5) == std::vector<int>{1});
  CHECK(out.weights(0)[0] == 1.0f);  // second dropped: the first gets weight 1
  CHECK(out.weights(1)[0] == Approx(pair_first));
  CHECK(out.weights(1)[1] == Approx(pair_second));
  CHECK(out.weights(3)[0] == 1.0f);
  // Expert loads never exceed C.
  std::vector<int> load(3, 0);
  for (const auto e : out.experts()) ++load[static_cast<std::size_t>(e)];
  CHECK(load == std::vector<int>{2, 2, 2});

  // Without renormalisation the survivors keep P.
  auto raw = identity_gate(
      {.model_dim = 3, .num_experts = 3, .k = 2, .capacity_factor = 0.5, .min_capacity = 0});
  raw.route(x, {}, out);
  CHECK(out.dropped == 6);
  CHECK(out.weights(0)[0] == Approx(p_first));
  CHECK(out.weights(1)[1] == Approx(e1 / (e2 + e1 + 1.0)));  // t1 keeps e2, logit 1

  // min_capacity 4 raises C: only t4's second choice (e1, whose 4 places went to t3, t5,
  // t0, t2) is dropped.
  auto roomy = identity_gate({.model_dim = 3,
                              .num_experts = 3,
                              .k = 2,
                              .renormalize = true,
                              .capacity_factor = 0.5,
                              .min_capacity = 4});
  roomy.route(x, {}, out);
  CHECK(out.dropped == 1);
  CHECK(experts_of(out, 4) == std::vector<int>{2});
  CHECK(out.weights(4)[0] == 1.0f);
  CHECK(experts_of(out, 2) == std::vector<int>{0, 1});

  // capacity_factor 0 is dropless.
  auto dropless = identity_gate({.model_dim = 3, .num_experts = 3, .k = 2, .renormalize = true});
  dropless.route(x, {}, out);
  CHECK(out.dropped == 0);
  CHECK(out.num_assignments() == 12);
}

TEST_CASE("TopKGate top-1 capacity keeps the earliest tokens", "[gate][top_k][capacity]") {
  // Every token prefers expert 0; C = ceil(5 / 2 * 1) = 3.
  moet::RowMatrix<float> x(5, 2);
  x << 1, 0, 2, 0, 3, 0, 1, 0, 5, 0;
  auto gate = identity_gate(
      {.model_dim = 2, .num_experts = 2, .k = 1, .capacity_factor = 1.0, .min_capacity = 0});
  moet::Routing<float> out;
  gate.route(x, {}, out);
  CHECK(out.dropped == 2);
  CHECK(out.k(0) == 1);
  CHECK(out.k(1) == 1);
  CHECK(out.k(2) == 1);
  CHECK(out.k(3) == 0);
  CHECK(out.k(4) == 0);
}

TEST_CASE("TopKGate random capacity plans obey C and slot-major priority",
          "[gate][top_k][capacity]") {
  const auto seed = GENERATE(21u, 22u, 23u);
  const double cf = GENERATE(0.5, 1.0, 1.25);
  const Index num_tokens = 97, num_experts = 6, k = 2;
  Gate gate({.model_dim = 8,
             .num_experts = num_experts,
             .k = k,
             .renormalize = true,
             .capacity_factor = cf,
             .min_capacity = 0,
             .init_seed = seed});
  const auto x = random_matrix(num_tokens, 8, seed, 3.0f);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  // Oracle: naive top-k, then DeepSpeed's slot-major drop.
  const auto cap = static_cast<int>(std::ceil(static_cast<float>(97.0 / 6.0) *
                                              static_cast<float>(cf * 2.0)));
  CHECK(gate.capacity(num_tokens) == cap);
  std::vector<std::vector<int>> choice(static_cast<std::size_t>(num_tokens));
  for (Index t = 0; t < num_tokens; ++t) {
    choice[static_cast<std::size_t>(t)] = naive_top(row_of(out, t), 2);
  }
  std::vector<int> load(6, 0);
  std::vector<std::vector<int>> kept(static_cast<std::size_t>(num_tokens));
  Index dropped = 0;
  for (std::size_t j = 0; j < 2; ++j) {
    for (std::size_t t = 0; t < choice.size(); ++t) {
      const int e = choice[t][j];
      if (load[static_cast<std::size_t>(e)] < cap) {
        ++load[static_cast<std::size_t>(e)];
        kept[t].push_back(e);
      } else {
        ++dropped;
      }
    }
  }
  CHECK(out.dropped == dropped);
  for (Index t = 0; t < num_tokens; ++t) {
    const auto& want = kept[static_cast<std::size_t>(t)];
    REQUIRE(experts_of(out, t) == want);
    const auto p = row_of(out, t);
    double s = 0.0;
    for (const int e : want) s += p[static_cast<std::size_t>(e)];
    for (std::size_t j = 0; j < want.size(); ++j) {
      CHECK(out.weights(t)[j] ==
            Approx(p[static_cast<std::size_t>(want[j])] / s).epsilon(1e-5));
    }
  }
}

TEST_CASE("Noisy TopKGate adds no noise in inference", "[gate][top_k][noisy]") {
  const auto seed = GENERATE(31u, 32u);
  Gate plain({.model_dim = 8, .num_experts = 6, .k = 2, .renormalize = true, .init_seed = seed});
  Gate noisy(Gate::noisy_top_k_options(8, 6, 2));
  noisy.set_router(plain.router(), moet::WeightLayout::kInOut);
  noisy.set_noise_router(random_matrix(8, 6, seed + 1), moet::WeightLayout::kInOut);
  REQUIRE(noisy.noise_router().rows() == 8);
  CHECK(plain.noise_router().size() == 0);
  const auto x = random_matrix(50, 8, seed + 2);
  moet::Routing<float> a, b;
  moet::RouteContext ctx;
  ctx.seed = 9;
  ctx.step = 4;
  plain.route(x, ctx, a);
  noisy.route(x, ctx, b);  // ctx.training is false
  check_same_plan(a, b);
}

TEST_CASE("Noisy TopKGate in training selects on H and weighs by softmax over the kept H",
          "[gate][top_k][noisy]") {
  const auto seed = GENERATE(41u, 42u, 43u);
  const bool renormalize = GENERATE(true, false);
  Gate gate({.model_dim = 6,
             .num_experts = 5,
             .k = 2,
             .renormalize = renormalize,
             .noisy = true,
             .init_seed = seed});
  gate.set_noise_router(random_matrix(6, 5, seed + 1, 0.5f), moet::WeightLayout::kInOut);
  const auto x = random_matrix(70, 6, seed + 2);
  moet::RouteContext ctx;
  ctx.training = true;
  ctx.seed = 1234;
  ctx.step = 7;
  moet::Routing<float> out;
  gate.route(x, ctx, out);
  // Oracle in double: H = z + eps * softplus(x W_noise), eps keyed on (seed, step, t, e).
  const auto p_clean = naive_softmax(x, gate.router());
  for (Index t = 0; t < 70; ++t) {
    std::vector<double> h(5);
    for (Index e = 0; e < 5; ++e) {
      double z = 0.0, nz = 0.0;
      for (Index c = 0; c < 6; ++c) {
        z += static_cast<double>(x(t, c)) * gate.router()(c, e);
        nz += static_cast<double>(x(t, c)) * gate.noise_router()(c, e);
      }
      const double eps = moet::detail::normal(moet::detail::hash_key(
          1234, 7, static_cast<std::uint64_t>(t), static_cast<std::uint64_t>(e)));
      h[static_cast<std::size_t>(e)] = z + eps * std::log1p(std::exp(nz));
    }
    const auto want = naive_top(h, 2);
    REQUIRE(experts_of(out, t) == want);
    const double hmax = h[static_cast<std::size_t>(want[0])];
    double all = 0.0;
    for (const double v : h) all += std::exp(v - hmax);
    const double kept = std::exp(h[static_cast<std::size_t>(want[0])] - hmax) +
                        std::exp(h[static_cast<std::size_t>(want[1])] - hmax);
    for (std::size_t j = 0; j < 2; ++j) {
      const double g = std::exp(h[static_cast<std::size_t>(want[j])] - hmax);
      CHECK(out.weights(t)[j] == Approx(g / (renormalize ? kept : all)).epsilon(1e-4));
    }
    // probs() stays the clean P.
    CHECK(out.probs()(t, 0) == Approx(p_clean[static_cast<std::size_t>(t)][0]).margin(1e-6));
  }
}

TEST_CASE("Noisy TopKGate noise is reproducible for a (seed, step) and changes with the step",
          "[gate][top_k][noisy]") {
  Gate gate(Gate::noisy_top_k_options(8, 8, 2));  // W_noise = 0: noise scale ln 2
  const auto x = random_matrix(200, 8, 5);
  moet::RouteContext ctx;
  ctx.training = true;
  ctx.seed = 77;
  ctx.step = 3;
  moet::Routing<float> a, b, c, clean;
  gate.route(x, ctx, a);
  gate.route(x, ctx, b);
  check_same_plan(a, b);
  ctx.step = 4;
  gate.route(x, ctx, c);
  ctx.training = false;
  gate.route(x, ctx, clean);
  const auto differs = [](const moet::Routing<float>& u, const moet::Routing<float>& v) {
    for (std::size_t i = 0; i < u.experts().size(); ++i) {
      if (u.experts()[i] != v.experts()[i] || u.weights()[i] != v.weights()[i]) return true;
    }
    return false;
  };
  CHECK(differs(a, c));
  CHECK(differs(a, clean));
}

TEST_CASE("TopKGate rejects bad options", "[gate][top_k][errors]") {
  using Catch::Contains;
  CHECK_THROWS_AS(Gate({.model_dim = 4, .num_experts = 3, .k = 0}), moet::Error);
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 3, .k = 0}),
                    Contains("TopKGate") && Contains("k must be in [1, num_experts = 3], got 0"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 3, .k = 4}),
                    Contains("TopKGate") && Contains("got 4"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 0, .k = 1}),
                    Contains("TopKGate") && Contains("num_experts must be >= 1, got 0"));
  CHECK_THROWS_WITH(Gate({.model_dim = 0, .num_experts = 3, .k = 1}),
                    Contains("TopKGate") && Contains("model_dim must be >= 1, got 0"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 3, .capacity_factor = -0.5}),
                    Contains("TopKGate") && Contains("capacity_factor") && Contains("-0.5"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4,
                          .num_experts = 3,
                          .capacity_factor = std::numeric_limits<double>::quiet_NaN()}),
                    Contains("TopKGate") && Contains("capacity_factor") && Contains("nan"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4,
                          .num_experts = 3,
                          .capacity_factor = std::numeric_limits<double>::infinity()}),
                    Contains("capacity_factor") && Contains("inf"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 3, .min_capacity = -1}),
                    Contains("TopKGate") && Contains("min_capacity must be >= 0, got -1"));
}

TEST_CASE("TopKGate rejects bad input", "[gate][top_k][errors]") {
  using Catch::Contains;
  Gate gate({.model_dim = 4, .num_experts = 3, .k = 2});
  moet::Routing<float> out;
  const moet::RowMatrix<float> narrow = random_matrix(5, 3, 1);
  CHECK_THROWS_WITH(gate.route(narrow, {}, out),
                    Contains("TopKGate") && Contains("model_dim = 4") && Contains("got 3"));
  auto x = random_matrix(5, 4, 2);
  x(3, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(gate.route(x, {}, out),
                    Contains("TopKGate") && Contains("nan") && Contains("token 3"));
  x(3, 1) = -std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(gate.route(x, {}, out), Contains("TopKGate") && Contains("-inf"));
  // Finite x whose logits overflow.
  x.setConstant(3e38f);
  Gate big({.model_dim = 4, .num_experts = 3, .k = 2});
  big.set_router(moet::RowMatrix<float>::Constant(4, 3, 10.0f), moet::WeightLayout::kInOut);
  CHECK_THROWS_WITH(big.route(x, {}, out), Contains("TopKGate") && Contains("logits"));
  // Non-finite router weights: rejected by the setter (the router keeps its weights), and by
  // route when training wrote them.
  x = random_matrix(5, 4, 3);
  moet::RowMatrix<float> w = gate.router();
  w(0, 0) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(gate.set_router(w, moet::WeightLayout::kInOut),
                    Contains("TopKGate") && Contains("nan at row 0, column 0"));
  gate.route(x, {}, out);
  gate.visit_parameters([](std::string_view, moet::ParamMap<float> value, moet::ParamMap<float>) {
    value(0, 0) = std::numeric_limits<float>::quiet_NaN();
  });
  CHECK_THROWS_WITH(gate.route(x, {}, out), Contains("TopKGate") && Contains("logits"));
}

TEST_CASE("TopKGate plans are bit-identical for 1 and 2 threads", "[gate][top_k][parallel]") {
  const int saved = moet::num_threads();
  Gate gate({.model_dim = 32,
             .num_experts = 16,
             .k = 2,
             .renormalize = true,
             .noisy = true,
             .capacity_factor = 1.0,
             .init_seed = 3});
  gate.set_noise_router(random_matrix(32, 16, 8, 0.3f), moet::WeightLayout::kInOut);
  const auto x = random_matrix(1000, 32, 9);
  moet::RouteContext ctx;
  ctx.training = GENERATE(false, true);
  ctx.seed = 5;
  moet::Routing<float> one, two;
  moet::set_num_threads(1);
  gate.route(x, ctx, one);
  moet::set_num_threads(2);
  gate.route(x, ctx, two);
  moet::set_num_threads(saved);
  check_same_plan(one, two);
  CHECK(one.probs() == two.probs());
}

TEST_CASE("TopKGate<double> routes in double", "[gate][top_k]") {
  moet::TopKGate<double> gate({.model_dim = 3, .num_experts = 3, .k = 2, .renormalize = true});
  gate.set_router(moet::RowMatrix<double>::Identity(3, 3), moet::WeightLayout::kInOut);
  moet::RowMatrix<double> x(1, 3);
  x << 0.0, std::log(2.0), std::log(3.0);
  moet::Routing<double> out;
  gate.route(x, {}, out);
  CHECK(out.experts(0)[0] == 2);
  CHECK(out.weights(0)[0] == Approx(0.6).epsilon(1e-14));
}

}  // namespace test_gate_top_k
