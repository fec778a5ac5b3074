// TopPGate: top-p routing of Huang et al. 2024 ("Harder Tasks Need More Experts").
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
#include "moet/gates/top_p.hpp"

namespace test_gate_top_p {  // one per file: the unity build puts several files in one TU

namespace {

using Gate = moet::TopPGate<float>;
using moet::Index;

struct NotAGate {
  using Scalar = float;
  Index num_experts() const { return 1; }
  Index model_dim() const { return 1; }
  // no route()
};

static_assert(moet::Gate<moet::TopPGate<float>>, "TopPGate<float> must satisfy moet::Gate");
static_assert(moet::Gate<moet::TopPGate<double>>, "TopPGate<double> must satisfy moet::Gate");
static_assert(!moet::Gate<NotAGate>, "a type without route() is not a Gate");

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

std::vector<int> experts_of(const moet::Routing<float>& r, Index t) {
  const auto s = r.experts(t);
  return {s.begin(), s.end()};
}

// Naive top-p on one float row: stable sort by descending P (ties to the lower id), then walk
// the float running sum and stop before the first position whose preceding sum passed p.
std::vector<int> naive_top_p(const std::vector<float>& probs, float p, bool inclusive) {
  std::vector<int> ids(probs.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int a, int b) {
    return probs[static_cast<std::size_t>(a)] > probs[static_cast<std::size_t>(b)];
  });
  std::vector<int> kept;
  float running = 0.0f;  // float, as a float32 cumsum
  for (const int e : ids) {
    const bool passed = inclusive ? running >= p : running > p;
    if (passed) break;
    kept.push_back(e);
    running += probs[static_cast<std::size_t>(e)];
  }
  return kept;
}

// Gate with W_r = identity (model_dim = E): each row of x is its logits.
Gate identity_gate(Gate::Options o) {
  Gate gate(o);
  gate.set_router(moet::RowMatrix<float>::Identity(gate.model_dim(), gate.num_experts()),
                  moet::WeightLayout::kInOut);
  return gate;
}

moet::Routing<float> route_logits(const Gate& gate, const std::vector<float>& logits) {
  moet::RowMatrix<float> x(1, static_cast<Index>(logits.size()));
  for (std::size_t e = 0; e < logits.size(); ++e) x(0, static_cast<Index>(e)) = logits[e];
  moet::Routing<float> out;
  gate.route(x, {}, out);
  return out;
}

Index count(const std::vector<float>& sorted, float p, bool inclusive) {
  std::vector<std::int32_t> order(sorted.size());
  std::iota(order.begin(), order.end(), 0);
  return moet::detail::top_p_count(sorted.data(), order.data(), static_cast<Index>(sorted.size()),
                                   p, inclusive);
}

}  // namespace

TEST_CASE("top_p_count reproduces the float edge cases of the original", "[gate][top_p]") {
  // [0.4, 0.4, 0.2], p = 0.4: 0.4f > 0.4f is false, so the second expert is kept too.
  CHECK(count({0.4f, 0.4f, 0.2f}, 0.4f, false) == 2);
  CHECK(count({0.4f, 0.4f, 0.2f}, 0.4f, true) == 1);  // the >= variant stops at 0.4
  // p just under the first probability: only the first expert.
  CHECK(count({0.5f, 0.3f, 0.2f, 0.0f}, 0.49f, false) == 1);
  CHECK(count({0.5f, 0.3f, 0.2f, 0.0f}, 0.5f, false) == 2);
  CHECK(count({0.5f, 0.3f, 0.2f, 0.0f}, 0.5f, true) == 1);
  // Exact float values 0.5f + 0.3f + 0.2f sum to exactly 1.0f: with p = 1 nothing passes, and
  // every expert (the zero one included) is kept.
  CHECK(count({0.5f, 0.3f, 0.2f, 0.0f}, 1.0f, false) == 4);
  // A float cumulative sum that overshoots 1 after three experts keeps three.
  CHECK(count({0.50000006f, 0.3f, 0.20000002f, 0.0f}, 1.0f, false) == 3);
  // A single expert is always kept.
  CHECK(count({1.0f}, 1.0f, false) == 1);
  CHECK(count({1.0f}, 1.0f, true) == 1);
}

TEST_CASE("TopPGate with softmax P = [0.5, 0.3, 0.2, 0] and p = 1 keeps 3", "[gate][top_p]") {
  // The fp32 softmax of log(0.5), log(0.3), log(0.2), -200 rounds so that the first three
  // probabilities sum to more than 1 in fp32: the cumulative sum overshoots and the fourth
  // expert (P = 0) is left out.
  const auto gate = identity_gate({.model_dim = 4, .num_experts = 4, .p = 1.0});
  const auto out =
      route_logits(gate, {std::log(0.5f), std::log(0.3f), std::log(0.2f), -200.0f});
  const auto p = out.probs();
  CHECK(p(0, 0) == Approx(0.5));
  CHECK(p(0, 1) == Approx(0.3));
  CHECK(p(0, 2) == Approx(0.2));
  CHECK(p(0, 3) == 0.0f);
  REQUIRE(p(0, 0) + p(0, 1) + p(0, 2) > 1.0f);  // the precondition of the case, in fp32
  CHECK(out.k(0) == 3);
  CHECK(experts_of(out, 0) == std::vector<int>{0, 1, 2});
}

TEST_CASE("TopPGate with P = [0.4, 0.4, 0.2] and p = 0.4 keeps 2", "[gate][top_p]") {
  const bool inclusive = GENERATE(false, true);
  const auto gate = identity_gate(
      {.model_dim = 3, .num_experts = 3, .p = 0.4, .inclusive = inclusive});
  const auto out = route_logits(gate, {std::log(2.0f), std::log(2.0f), 0.0f});
  REQUIRE(out.probs()(0, 0) == 0.4f);
  REQUIRE(out.probs()(0, 1) == 0.4f);
  CHECK(out.k(0) == (inclusive ? 1 : 2));
  CHECK(out.experts(0)[0] == 0);  // tie -> lower id first
  CHECK(out.weights(0)[0] == 0.4f);
}

TEST_CASE("TopPGate on uniform P keeps ceil(p E) experts away from boundaries",
          "[gate][top_p]") {
  const Index num_experts = GENERATE(2, 4, 7, 8, 10, 16);
  const bool inclusive = GENERATE(false, true);
  for (Index m = 0; m < num_experts; ++m) {
    const double p = (static_cast<double>(m) + 0.5) / static_cast<double>(num_experts);
    Gate gate({.model_dim = 3, .num_experts = num_experts, .p = p, .inclusive = inclusive});
    moet::RowMatrix<float> x = moet::RowMatrix<float>::Zero(2, 3);  // zero logits: uniform P
    moet::Routing<float> out;
    gate.route(x, {}, out);
    const auto k = static_cast<Index>(std::ceil(p * static_cast<double>(num_experts)));
    CHECK(out.k(0) == k);
    CHECK(out.k(1) == k);
    for (Index j = 0; j < out.k(0); ++j) {
      CHECK(out.experts(0)[static_cast<std::size_t>(j)] == j);  // ties in id order
      CHECK(out.weights(0)[static_cast<std::size_t>(j)] ==
            Approx(1.0 / static_cast<double>(num_experts)));
    }
  }
}

TEST_CASE("TopPGate on uniform P at an exact boundary keeps one more with the strict rule",
          "[gate][top_p]") {
  // E = 4, p = 0.5: 0.25 + 0.25 = 0.5 exactly, not > 0.5, so the strict rule takes a third.
  // E = 5, p = 0.4: 0.2f + 0.2f = 0.4f exactly (p rounds to 0.4f), same story.
  const auto boundary = GENERATE(std::pair<Index, double>{4, 0.5}, std::pair<Index, double>{5, 0.4});
  const bool inclusive = GENERATE(false, true);
  Gate gate({.model_dim = 2,
             .num_experts = boundary.first,
             .p = boundary.second,
             .inclusive = inclusive});
  moet::RowMatrix<float> x = moet::RowMatrix<float>::Zero(1, 2);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  const Index at = 2;  // p * E in both cases
  CHECK(out.k(0) == (inclusive ? at : at + 1));
}

TEST_CASE("TopPGate matches a naive top-p on random inputs", "[gate][top_p]") {
  const auto seed = GENERATE(1u, 2u, 3u, 4u);
  const Index num_experts = GENERATE(1, 3, 8, 16);
  const double p = GENERATE(0.05, 0.4, 0.5, 0.9, 1.0);
  const bool inclusive = GENERATE(false, true);
  const Index num_tokens = 150;
  Gate gate({.model_dim = 12,
             .num_experts = num_experts,
             .p = p,
             .inclusive = inclusive,
             .init_seed = seed});
  const auto x = random_matrix(num_tokens, 12, seed + 50, 2.0f);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  REQUIRE(out.num_tokens() == num_tokens);
  CHECK(out.probs_are_distribution);
  CHECK(out.dropped == 0);
  for (Index t = 0; t < num_tokens; ++t) {
    std::vector<float> row(static_cast<std::size_t>(num_experts));
    double total = 0.0;
    for (Index e = 0; e < num_experts; ++e) {
      row[static_cast<std::size_t>(e)] = out.probs()(t, e);
      total += out.probs()(t, e);
    }
    CHECK(total == Approx(1.0).epsilon(1e-5));
    const auto want = naive_top_p(row, static_cast<float>(p), inclusive);
    REQUIRE(experts_of(out, t) == want);
    REQUIRE(out.k(t) >= 1);
    REQUIRE(out.k(t) <= num_experts);
    // Weights are the raw probabilities, not renormalised.
    double sum = 0.0, before_last = 0.0;
    for (std::size_t j = 0; j < want.size(); ++j) {
      const float w = out.weights(t)[j];
      CHECK(w == row[static_cast<std::size_t>(want[j])]);
      if (j + 1 < want.size()) before_last += w;
      sum += w;
    }
    CHECK(sum <= 1.0 + 1e-5);
    // Minimality in exact arithmetic, up to float slack: without the last expert the mass does
    // not pass p; with it, it does (unless every expert is kept).
    CHECK(before_last <= p + 1e-5);
    if (out.k(t) < num_experts) CHECK(sum >= p - 1e-5);
  }
}

TEST_CASE("TopPGate max_k caps the experts per token", "[gate][top_p]") {
  Gate gate({.model_dim = 2, .num_experts = 8, .p = 1.0, .max_k = 3});
  moet::RowMatrix<float> x = moet::RowMatrix<float>::Zero(4, 2);  // uniform: p = 1 keeps all
  moet::Routing<float> out;
  gate.route(x, {}, out);
  for (Index t = 0; t < 4; ++t) {
    CHECK(out.k(t) == 3);
    CHECK(experts_of(out, t) == std::vector<int>{0, 1, 2});
  }
  Gate uncapped({.model_dim = 2, .num_experts = 8, .p = 1.0});
  uncapped.route(x, {}, out);
  CHECK(out.k(0) == 8);
}

TEST_CASE("TopPGate with E = 1 sends every token to expert 0 with weight 1", "[gate][top_p]") {
  Gate gate({.model_dim = 5, .num_experts = 1, .p = 0.3});
  const auto x = random_matrix(6, 5, 9);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  REQUIRE(out.num_assignments() == 6);
  for (Index t = 0; t < 6; ++t) {
    CHECK(out.experts(t)[0] == 0);
    CHECK(out.weights(t)[0] == 1.0f);
  }
}

TEST_CASE("TopPGate gives an empty plan for an empty batch", "[gate][top_p]") {
  Gate gate({.model_dim = 5, .num_experts = 4});
  moet::RowMatrix<float> x(0, 5);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  CHECK(out.num_tokens() == 0);
  CHECK(out.num_assignments() == 0);
}

TEST_CASE("TopPGate rejects bad options", "[gate][top_p][errors]") {
  using Catch::Contains;
  CHECK_THROWS_AS(Gate({.model_dim = 4, .num_experts = 3, .p = 0.0}), moet::Error);
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 3, .p = 1.5}),
                    "[moet::TopPGate] p must be in (0, 1], got 1.5");
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 3, .p = 0.0}),
                    Contains("TopPGate") && Contains("got 0"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 3, .p = -0.1}),
                    Contains("TopPGate") && Contains("got -0.1"));
  CHECK_THROWS_WITH(
      Gate({.model_dim = 4, .num_experts = 3, .p = std::numeric_limits<double>::quiet_NaN()}),
      Contains("TopPGate") && Contains("p must be in (0, 1]") && Contains("nan"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 3, .max_k = 4}),
                    Contains("TopPGate") && Contains("max_k") && Contains("got 4"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 3, .max_k = -1}),
                    Contains("TopPGate") && Contains("max_k") && Contains("got -1"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 0}),
                    Contains("TopPGate") && Contains("num_experts must be >= 1, got 0"));
  CHECK_THROWS_WITH(Gate({.model_dim = 0, .num_experts = 3}),
                    Contains("TopPGate") && Contains("model_dim must be >= 1, got 0"));
}

TEST_CASE("TopPGate rejects bad input", "[gate][top_p][errors]") {
  using Catch::Contains;
  Gate gate({.model_dim = 4, .num_experts = 3});
  moet::Routing<float> out;
  const moet::RowMatrix<float> wide = random_matrix(2, 5, 1);
  CHECK_THROWS_WITH(gate.route(wide, {}, out),
                    Contains("TopPGate") && Contains("model_dim = 4") && Contains("got 5"));
  auto x = random_matrix(3, 4, 2);
  x(2, 0) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(gate.route(x, {}, out),
                    Contains("TopPGate") && Contains("inf") && Contains("token 2"));
  x(2, 0) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(gate.route(x, {}, out), Contains("TopPGate") && Contains("nan"));
}

TEST_CASE("TopPGate plans are bit-identical for 1 and 2 threads", "[gate][top_p][parallel]") {
  const int saved = moet::num_threads();
  Gate gate({.model_dim = 24, .num_experts = 16, .p = 0.5, .init_seed = 4});
  const auto x = random_matrix(1000, 24, 10);
  moet::Routing<float> one, two;
  moet::set_num_threads(1);
  gate.route(x, {}, one);
  moet::set_num_threads(2);
  gate.route(x, {}, two);
  moet::set_num_threads(saved);
  REQUIRE(one.num_assignments() == two.num_assignments());
  for (Index t = 0; t < 1000; ++t) REQUIRE(one.k(t) == two.k(t));
  for (std::size_t i = 0; i < one.experts().size(); ++i) {
    REQUIRE(one.experts()[i] == two.experts()[i]);
    REQUIRE(one.weights()[i] == two.weights()[i]);
  }
  CHECK(one.probs() == two.probs());
}

TEST_CASE("TopPGate<double> cumulates in double", "[gate][top_p]") {
  moet::TopPGate<double> gate({.model_dim = 3, .num_experts = 3, .p = 0.6});
  gate.set_router(moet::RowMatrix<double>::Identity(3, 3), moet::WeightLayout::kInOut);
  moet::RowMatrix<double> x(1, 3);
  x << std::log(5.0), std::log(3.0), std::log(2.0);  // P = 0.5, 0.3, 0.2
  moet::Routing<double> out;
  gate.route(x, {}, out);
  CHECK(out.k(0) == 2);  // 0.5 <= 0.6 keeps the second; 0.8 > 0.6 stops
  CHECK(out.weights(0)[1] == Approx(0.3).epsilon(1e-14));
}

}  // namespace test_gate_top_p
