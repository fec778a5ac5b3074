// StochasticGate (THOR's random expert choice, docs/algorithms.md §7).
#include <cmath>
#include <cstdint>
#include <set>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/detail/rng.hpp"
#include "moet/gates/stochastic.hpp"

namespace test_gate_stochastic {  // one per file: the unity build puts several files in one TU

static_assert(moet::Gate<moet::StochasticGate<float>>, "StochasticGate<float> is a Gate");
static_assert(moet::Gate<moet::StochasticGate<double>>, "StochasticGate<double> is a Gate");

namespace {

using Gate = moet::StochasticGate<float>;
using moet::Index;
using moet::StochasticInference;

moet::RowMatrix<float> tokens(Index rows, Index cols) {
  moet::RowMatrix<float> x(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) x(i, j) = std::sin(0.37f * float(i) + 1.3f * float(j));
  }
  return x;
}

moet::RouteContext make_ctx(bool training, std::uint64_t seed, std::uint64_t step,
                            Index sequence_length = 0) {
  moet::RouteContext ctx;
  ctx.training = training;
  ctx.seed = seed;
  ctx.step = step;
  ctx.sequence_length = sequence_length;
  return ctx;
}

// Pearson's chi-square statistic of `counts` against the uniform distribution.
double chi_square(const std::vector<Index>& counts) {
  double total = 0.0;
  for (const auto c : counts) total += double(c);
  const double expected = total / double(counts.size());
  double chi2 = 0.0;
  for (const auto c : counts) chi2 += (double(c) - expected) * (double(c) - expected) / expected;
  return chi2;
}

// Every token has exactly one expert with weight 1; returns the experts.
std::vector<int> single_experts(const moet::Routing<float>& out) {
  std::vector<int> ids;
  for (Index t = 0; t < out.num_tokens(); ++t) {
    REQUIRE(out.k(t) == 1);
    REQUIRE(out.weights(t)[0] == 1.0f);
    const int e = out.experts(t)[0];
    REQUIRE(e >= 0);
    REQUIRE(e < out.num_experts());
    ids.push_back(e);
  }
  return ids;
}

}  // namespace

TEST_CASE("StochasticGate trains the whole batch on one expert per step", "[gate][stochastic]") {
  const auto seed = GENERATE(1u, 2u, 3u);
  Gate gate({.model_dim = 6, .num_experts = 4});
  const auto x = tokens(300, 6);
  moet::Routing<float> out;
  std::set<int> seen;
  for (std::uint64_t step = 0; step < 20; ++step) {
    gate.route(x, make_ctx(true, seed, step), out);
    const auto ids = single_experts(out);
    for (const int e : ids) REQUIRE(e == ids[0]);
    CHECK(ids[0] == gate.training_expert(seed, step));
    // The spec's key: hash_key(seed, step, stream) with stream 0.
    CHECK(ids[0] == int(moet::detail::uniform_below(moet::detail::hash_key(seed, step, 0u), 4)));
    seen.insert(ids[0]);
  }
  CHECK(seen.size() >= 2);  // the expert changes with the step (20 draws from 4)
  CHECK(out.probs().size() == 0);
  CHECK_FALSE(out.probs_are_distribution);
  CHECK(out.live_experts == 4);
}

TEST_CASE("StochasticGate training draws are uniform over the experts", "[gate][stochastic]") {
  const auto num_experts = GENERATE(2, 3, 5);
  Gate gate({.model_dim = 2, .num_experts = num_experts, .stream = 17});
  const auto x = tokens(3, 2);
  moet::Routing<float> out;
  std::vector<Index> counts(std::size_t(num_experts), 0);
  const std::uint64_t steps = 6000;
  for (std::uint64_t step = 0; step < steps; ++step) {
    gate.route(x, make_ctx(true, 2024, step), out);
    ++counts[std::size_t(out.experts(0)[0])];
  }
  // Chi-square with at most 4 degrees of freedom: P(chi2 > 30) < 5e-6; the seeds are fixed.
  CHECK(chi_square(counts) < 30.0);
  for (const auto c : counts) CHECK(c > 0);
}

TEST_CASE("StochasticGate token-level inference draws per token, reproducibly",
          "[gate][stochastic]") {
  Gate gate({.model_dim = 3, .num_experts = 5});
  const auto x = tokens(5000, 3);
  moet::Routing<float> a;
  moet::Routing<float> b;
  moet::Routing<float> c;
  gate.route(x, make_ctx(false, 7, 3), a);
  gate.route(x, make_ctx(false, 7, 3), b);
  gate.route(x, make_ctx(false, 7, 4), c);
  const auto ia = single_experts(a);
  const auto ib = single_experts(b);
  const auto ic = single_experts(c);
  CHECK(ia == ib);
  std::vector<Index> counts(5, 0);
  Index changes = 0;
  Index differ_step = 0;
  for (std::size_t t = 0; t < ia.size(); ++t) {
    ++counts[std::size_t(ia[t])];
    if (t > 0 && ia[t] != ia[t - 1]) ++changes;
    if (ia[t] != ic[t]) ++differ_step;
  }
  CHECK(chi_square(counts) < 30.0);
  // Independent neighbours differ with probability 4/5; a new step redraws every token.
  CHECK(changes > 3500);
  CHECK(differ_step > 3500);
}

TEST_CASE("StochasticGate position-level inference shares an expert per position",
          "[gate][stochastic]") {
  const Index batch = 6;
  const Index len = 50;
  Gate gate({.model_dim = 4, .num_experts = 3, .inference = StochasticInference::kPosition});
  const auto x = tokens(batch * len, 4);
  moet::Routing<float> out;
  gate.route(x, make_ctx(false, 11, 0, len), out);
  const auto ids = single_experts(out);
  std::set<int> per_position;
  for (Index i = 0; i < len; ++i) {
    for (Index b = 1; b < batch; ++b) {
      CHECK(ids[std::size_t(b * len + i)] == ids[std::size_t(i)]);
    }
    per_position.insert(ids[std::size_t(i)]);
  }
  CHECK(per_position.size() == 3);  // positions draw independently: 50 draws cover 3 experts
}

TEST_CASE("StochasticGate sequence-level inference shares an expert per sequence",
          "[gate][stochastic]") {
  const Index batch = 40;
  const Index len = 7;
  Gate gate({.model_dim = 4, .num_experts = 3, .inference = StochasticInference::kSequence});
  const auto x = tokens(batch * len, 4);
  moet::Routing<float> out;
  gate.route(x, make_ctx(false, 12, 0, len), out);
  const auto ids = single_experts(out);
  std::set<int> per_sequence;
  for (Index b = 0; b < batch; ++b) {
    for (Index i = 1; i < len; ++i) {
      CHECK(ids[std::size_t(b * len + i)] == ids[std::size_t(b * len)]);
    }
    per_sequence.insert(ids[std::size_t(b * len)]);
  }
  CHECK(per_sequence.size() == 3);
  // sequence_length 0: one sequence, so every token shares one expert.
  gate.route(x, make_ctx(false, 12, 0, 0), out);
  const auto one = single_experts(out);
  for (const int e : one) CHECK(e == one[0]);
}

TEST_CASE("StochasticGate ensemble inference uses every expert with weight 1/E",
          "[gate][stochastic]") {
  const auto num_experts = GENERATE(1, 3, 8);
  Gate gate(
      {.model_dim = 4, .num_experts = num_experts, .inference = StochasticInference::kEnsemble});
  const auto x = tokens(20, 4);
  moet::Routing<float> out;
  gate.route(x, make_ctx(false, 1, 0), out);
  CHECK(out.num_assignments() == 20 * num_experts);
  for (Index t = 0; t < 20; ++t) {
    REQUIRE(out.k(t) == num_experts);
    double sum = 0.0;
    for (Index e = 0; e < num_experts; ++e) {
      CHECK(out.experts(t)[std::size_t(e)] == e);
      CHECK(out.weights(t)[std::size_t(e)] == Approx(1.0 / double(num_experts)));
      sum += double(out.weights(t)[std::size_t(e)]);
    }
    CHECK(sum == Approx(1.0).epsilon(1e-6));
  }
  // Training ignores the inference mode: one expert for the batch.
  gate.route(x, make_ctx(true, 1, 0), out);
  const auto ids = single_experts(out);
  for (const int e : ids) CHECK(e == ids[0]);
}

TEST_CASE("StochasticGate streams draw independently", "[gate][stochastic]") {
  Gate a({.model_dim = 2, .num_experts = 4, .stream = 0});
  Gate b({.model_dim = 2, .num_experts = 4, .stream = 1});
  Index same_train = 0;
  for (std::uint64_t step = 0; step < 400; ++step) {
    if (a.training_expert(5, step) == b.training_expert(5, step)) ++same_train;
  }
  // Independent layers coincide with probability 1/4: about 100 of 400.
  CHECK(same_train > 60);
  CHECK(same_train < 140);
  const auto x = tokens(800, 2);
  moet::Routing<float> ra;
  moet::Routing<float> rb;
  a.route(x, make_ctx(false, 5, 0), ra);
  b.route(x, make_ctx(false, 5, 0), rb);
  const auto ia = single_experts(ra);
  const auto ib = single_experts(rb);
  Index same = 0;
  for (std::size_t t = 0; t < ia.size(); ++t) same += ia[t] == ib[t] ? 1 : 0;
  CHECK(same > 140);
  CHECK(same < 260);
}

TEST_CASE("StochasticGate rejects bad options and input", "[gate][stochastic][errors]") {
  using Catch::Contains;
  CHECK_THROWS_WITH(Gate({.model_dim = 0, .num_experts = 2}), Contains("[moet::StochasticGate]") &&
                                                                  Contains("model_dim") &&
                                                                  Contains("got 0"));
  CHECK_THROWS_WITH(Gate({.model_dim = 3, .num_experts = 0}), Contains("[moet::StochasticGate]") &&
                                                                  Contains("num_experts") &&
                                                                  Contains("got 0"));
  Gate gate({.model_dim = 3, .num_experts = 2, .inference = StochasticInference::kPosition});
  moet::Routing<float> out;
  CHECK_THROWS_WITH(
      gate.route(tokens(10, 3), make_ctx(false, 0, 0, 4), out),
      Contains("[moet::StochasticGate]") && Contains("10 tokens") && Contains("sequence_length 4"));
  CHECK_THROWS_WITH(gate.route(tokens(10, 4), make_ctx(false, 0, 0), out),
                    Contains("model_dim = 3") && Contains("got 4"));
  CHECK_THROWS_WITH(gate.route(tokens(10, 3), make_ctx(false, 0, 0, -2), out), Contains("got -2"));
  auto bad = tokens(4, 3);
  bad(2, 1) = NAN;
  CHECK_THROWS_WITH(gate.route(bad, make_ctx(true, 0, 0), out), Contains("finite"));
  bad(2, 1) = INFINITY;
  CHECK_THROWS_AS(gate.route(bad, make_ctx(false, 0, 0), out), moet::Error);
  // Divisible layouts are fine.
  CHECK_NOTHROW(gate.route(tokens(12, 3), make_ctx(false, 0, 0, 4), out));
}

TEST_CASE("StochasticGate gives an empty plan for an empty batch", "[gate][stochastic][edge]") {
  Gate gate({.model_dim = 3, .num_experts = 4, .inference = StochasticInference::kEnsemble});
  moet::Routing<float> out;
  for (const bool training : {true, false}) {
    gate.route(moet::RowMatrix<float>(0, 3), make_ctx(training, 0, 0, 5), out);
    CHECK(out.num_tokens() == 0);
    CHECK(out.num_experts() == 4);
    CHECK(out.num_assignments() == 0);
  }
}

TEST_CASE("StochasticGate plans do not depend on the thread count",
          "[gate][stochastic][parallel]") {
  const auto mode = GENERATE(StochasticInference::kToken, StochasticInference::kPosition,
                             StochasticInference::kSequence, StochasticInference::kEnsemble);
  const bool training = GENERATE(true, false);
  Gate gate({.model_dim = 2, .num_experts = 7, .inference = mode, .stream = 3});
  const auto x = tokens(5000, 2);  // several fill blocks
  const auto ctx = make_ctx(training, 99, 5, 100);
  const int saved = moet::num_threads();
  moet::Routing<float> one;
  moet::Routing<float> two;
  moet::set_num_threads(1);
  gate.route(x, ctx, one);
  moet::set_num_threads(2);
  gate.route(x, ctx, two);
  moet::set_num_threads(saved);
  REQUIRE(one.num_assignments() == two.num_assignments());
  for (std::size_t a = 0; a < one.experts().size(); ++a) {
    REQUIRE(one.experts()[a] == two.experts()[a]);
    REQUIRE(one.weights()[a] == two.weights()[a]);
  }
}

}  // namespace test_gate_stochastic
