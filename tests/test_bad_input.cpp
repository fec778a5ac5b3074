// The bad-input catalogue, part 1: the gates and the routing plan. Every gate's options, every
// gate's `route` on malformed `x` (wrong width, NaN, +/-Inf), non-finite logits, malformed
// context, and the documented results of the edge cases (T = 0, E = 1, capacity drops, very
// large E, thresholds above 1), `Routing` / `ExpertMajor` misuse, and reuse of a `Routing` after
// an exception. Each case checks the exact documented outcome: a `moet::Error` whose message
// names the operation in brackets and the offending values, or the documented result against
// an oracle written here. Part 2 (test_bad_input_layer.cpp) covers experts, dispatch and the layer.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/context.hpp"
#include "moet/errors.hpp"
#include "moet/gates/importance.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

#include "check_error.hpp"

namespace test_bad_input {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

std::string str(Index v) { return std::to_string(v); }

RowMatrix<float> normal_matrix(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  RowMatrix<float> m(rows, cols);  // (rows, cols)
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
  return m;
}

// Oracle: logits z = x_t W in double.
std::vector<double> oracle_logits(const RowMatrix<float>& x, const RowMatrix<float>& w, Index t) {
  std::vector<double> z(static_cast<std::size_t>(w.cols()), 0.0);
  for (Index e = 0; e < w.cols(); ++e) {
    for (Index i = 0; i < x.cols(); ++i) {
      z[static_cast<std::size_t>(e)] += static_cast<double>(x(t, i)) * static_cast<double>(w(i, e));
    }
  }
  return z;
}

// Oracle: P = softmax(x_t W) in double.
std::vector<double> oracle_softmax(const RowMatrix<float>& x, const RowMatrix<float>& w, Index t) {
  std::vector<double> p = oracle_logits(x, w, t);
  const double max = *std::max_element(p.begin(), p.end());
  double sum = 0.0;
  for (double& v : p) {
    v = std::exp(v - max);
    sum += v;
  }
  for (double& v : p) v /= sum;
  return p;
}

// Oracle: ids sorted by descending value, ties to the lower id.
std::vector<std::int32_t> oracle_order(const std::vector<double>& v) {
  std::vector<std::int32_t> order(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) order[i] = static_cast<std::int32_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
    return v[static_cast<std::size_t>(a)] > v[static_cast<std::size_t>(b)];
  });
  return order;
}

// Oracle: DynMoE's cosine cos[t, e] = x_t . W_e / (max(|x_t|, 1e-12) max(|W_e|, 1e-12)).
double oracle_cosine(const RowMatrix<float>& x, Index t, const RowMatrix<float>& w, Index e) {
  double dot = 0.0;
  double nx = 0.0;
  double nw = 0.0;
  for (Index i = 0; i < x.cols(); ++i) {
    const auto a = static_cast<double>(x(t, i));
    const auto b = static_cast<double>(w(i, e));
    dot += a * b;
    nx += a * a;
    nw += b * b;
  }
  return dot / (std::max(std::sqrt(nx), 1e-12) * std::max(std::sqrt(nw), 1e-12));
}

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

void check_empty_plan(const moet::Routing<float>& r, Index num_experts) {
  CHECK(r.num_tokens() == 0);
  CHECK(r.num_experts() == num_experts);
  CHECK(r.num_assignments() == 0);
  REQUIRE(r.offsets().size() == 1);
  CHECK(r.offsets()[0] == 0);
  CHECK(r.experts().empty());
  CHECK(r.weights().empty());
  CHECK(r.dropped == 0);
  CHECK(r.mean_k() == 0.0);
}

// Two plans are identical: same sizes, offsets, experts, bitwise weights, dropped and probs.
void check_same_plan(const moet::Routing<float>& a, const moet::Routing<float>& b) {
  REQUIRE(a.num_tokens() == b.num_tokens());
  REQUIRE(a.num_experts() == b.num_experts());
  REQUIRE(a.num_assignments() == b.num_assignments());
  CHECK(a.dropped == b.dropped);
  CHECK(a.live_experts == b.live_experts);
  CHECK(a.probs_are_distribution == b.probs_are_distribution);
  CHECK(std::equal(a.offsets().begin(), a.offsets().end(), b.offsets().begin()));
  CHECK(std::equal(a.experts().begin(), a.experts().end(), b.experts().begin()));
  CHECK(std::equal(a.weights().begin(), a.weights().end(), b.weights().begin()));
  REQUIRE(a.probs().rows() == b.probs().rows());
  REQUIRE(a.probs().cols() == b.probs().cols());
  CHECK((a.probs().array() == b.probs().array()).all());
}

// The x checks every gate runs: width (one column too few, one too many), NaN, +Inf and -Inf.
// `names_position`: the softmax gates also name the offending value, token and column.
template <class G>
void check_rejects_bad_x(const G& gate, const moet::RouteContext& ctx, const std::string& op,
                         bool names_position) {
  const std::string tag = "[moet::" + op + "]";
  const Index d = gate.model_dim();
  moet::Routing<float> out;
  for (const Index cols : {d - 1, d + 1}) {
    const RowMatrix<float> x = normal_matrix(6, cols, 11);
    CHECK_MOET_ERROR(gate.route(x, ctx, out), Contains(tag) && Contains("model_dim = " + str(d)) &&
                                                  Contains("got " + str(cols)));
  }
  const float bad_values[] = {kNaN, kInf, -kInf};
  const char* bad_names[] = {"nan", "inf", "-inf"};
  for (int i = 0; i < 3; ++i) {
    RowMatrix<float> x = normal_matrix(6, d, 12);
    x(2, 1) = bad_values[i];
    CHECK_MOET_ERROR(gate.route(x, ctx, out), Contains(tag) && Contains("finite"));
    if (names_position) {
      CHECK_THROWS_WITH(gate.route(x, ctx, out),
                        Contains(std::string("got ") + bad_names[i] + " at token 2, column 1"));
    }
  }
}

std::vector<float> uniform_importance(Index n) {
  return std::vector<float>(static_cast<std::size_t>(n), 0.5f);
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Options validated by the constructors.

TEST_CASE("TopKGate rejects a model_dim or num_experts below 1", "[bad_input][gate][top_k]") {
  using G = moet::TopKGate<float>;
  CHECK_MOET_ERROR(G({.model_dim = 0, .num_experts = 4}),
                   Contains("[moet::TopKGate]") && Contains("model_dim must be >= 1, got 0"));
  CHECK_MOET_ERROR(G({.model_dim = -3, .num_experts = 4}),
                   Contains("[moet::TopKGate]") && Contains("got -3"));
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 0}),
                   Contains("[moet::TopKGate]") && Contains("num_experts must be >= 1, got 0"));
}

TEST_CASE("TopKGate rejects k = 0, k > num_experts and a negative k", "[bad_input][gate][top_k]") {
  using G = moet::TopKGate<float>;
  for (const Index k : {Index{0}, Index{5}, Index{-1}, Index{-100}}) {
    CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 4, .k = k}),
                     Contains("[moet::TopKGate]") &&
                         Contains("k must be in [1, num_experts = 4]") &&
                         Contains("got " + str(k)));
  }
  // The boundary k = num_experts is valid and keeps every expert in descending order.
  G gate({.model_dim = 4, .num_experts = 4, .k = 4, .renormalize = true});
  const RowMatrix<float> x = normal_matrix(5, 4, 3);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  for (Index t = 0; t < 5; ++t) {
    const auto order = oracle_order(oracle_softmax(x, gate.router(), t));
    REQUIRE(out.k(t) == 4);
    for (std::size_t j = 0; j < 4; ++j) CHECK(out.experts(t)[j] == order[j]);
  }
}

TEST_CASE(
    "TopKGate rejects a negative, NaN or infinite capacity_factor and a negative "
    "min_capacity",
    "[bad_input][gate][top_k]") {
  using G = moet::TopKGate<float>;
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 4, .capacity_factor = -0.5}),
                   Contains("[moet::TopKGate]") &&
                       Contains("capacity_factor must be finite and >= 0") && Contains("got -0.5"));
  CHECK_MOET_ERROR(G({.model_dim = 4,
                      .num_experts = 4,
                      .capacity_factor = std::numeric_limits<double>::quiet_NaN()}),
                   Contains("[moet::TopKGate]") && Contains("capacity_factor") && Contains("nan"));
  CHECK_MOET_ERROR(G({.model_dim = 4,
                      .num_experts = 4,
                      .capacity_factor = std::numeric_limits<double>::infinity()}),
                   Contains("[moet::TopKGate]") && Contains("capacity_factor") && Contains("inf"));
  CHECK_MOET_ERROR(
      G({.model_dim = 4, .num_experts = 4, .capacity_factor = 1.0, .min_capacity = -1}),
      Contains("[moet::TopKGate]") && Contains("min_capacity must be >= 0, got -1"));
}

TEST_CASE("TopPGate rejects p = 0, p < 0, p > 1 and a NaN p", "[bad_input][gate][top_p]") {
  using G = moet::TopPGate<float>;
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 4, .p = 0.0}),
                   Contains("[moet::TopPGate]") && Contains("p must be in (0, 1], got 0"));
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 4, .p = -0.25}),
                   Contains("[moet::TopPGate]") && Contains("got -0.25"));
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 4, .p = 1.5}),
                   Contains("[moet::TopPGate] p must be in (0, 1], got 1.5"));
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 4, .p = std::nan("")}),
                   Contains("[moet::TopPGate]") && Contains("got nan"));
  CHECK_MOET_ERROR(G({.model_dim = 0, .num_experts = 4}),
                   Contains("[moet::TopPGate]") && Contains("model_dim must be >= 1, got 0"));
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 0}),
                   Contains("[moet::TopPGate]") && Contains("num_experts must be >= 1, got 0"));
  // p = 1 is the inclusive boundary: with P summing to 1 in double, every expert whose prefix
  // stays <= 1 is kept; p just above 0 (0 in fp32 after rounding) keeps exactly the top-1.
  G tiny({.model_dim = 4, .num_experts = 4, .p = 1e-50});
  const RowMatrix<float> x = normal_matrix(6, 4, 5);
  moet::Routing<float> out;
  tiny.route(x, {}, out);
  for (Index t = 0; t < 6; ++t) {
    REQUIRE(out.k(t) == 1);
    CHECK(out.experts(t)[0] == oracle_order(oracle_softmax(x, tiny.router(), t))[0]);
  }
  CHECK_NOTHROW(G({.model_dim = 4, .num_experts = 4, .p = 1.0}));
}

TEST_CASE("TopPGate rejects max_k outside 0 or [1, num_experts]", "[bad_input][gate][top_p]") {
  using G = moet::TopPGate<float>;
  for (const Index max_k : {Index{-1}, Index{5}, Index{1000}}) {
    CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 4, .max_k = max_k}),
                     Contains("[moet::TopPGate]") &&
                         Contains("max_k must be 0 (no cap) or in [1, num_experts = 4]") &&
                         Contains("got " + str(max_k)));
  }
  // max_k = 1 with p = 1 caps every token at its best expert.
  G capped({.model_dim = 4, .num_experts = 4, .p = 1.0, .max_k = 1});
  const RowMatrix<float> x = normal_matrix(5, 4, 6);
  moet::Routing<float> out;
  capped.route(x, {}, out);
  for (Index t = 0; t < 5; ++t) {
    const auto p = oracle_softmax(x, capped.router(), t);
    REQUIRE(out.k(t) == 1);
    CHECK(out.experts(t)[0] == oracle_order(p)[0]);
    CHECK(out.weights(t)[0] ==
          Approx(p[static_cast<std::size_t>(oracle_order(p)[0])]).epsilon(1e-5));
  }
}

TEST_CASE("TopAnyGate rejects bad sizes: model_dim, num_experts, initial_experts",
          "[bad_input][gate][top_any]") {
  using G = moet::TopAnyGate<float>;
  CHECK_MOET_ERROR(G({.model_dim = 0, .num_experts = 2}),
                   Contains("[moet::TopAnyGate]") && Contains("model_dim must be >= 1, got 0"));
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 0}),
                   Contains("[moet::TopAnyGate]") && Contains("num_experts must be >= 1, got 0"));
  CHECK_MOET_ERROR(
      G({.model_dim = 4, .num_experts = 4, .initial_experts = 5}),
      Contains("[moet::TopAnyGate]") &&
          Contains("initial_experts must be in [0, num_experts = 4] (0: all live), got 5"));
  CHECK_MOET_ERROR(
      G({.model_dim = 4, .num_experts = 4, .initial_experts = -1}),
      Contains("[moet::TopAnyGate]") && Contains("initial_experts") && Contains("got -1"));
}

TEST_CASE("TopAnyGate rejects a temperature <= 0, NaN or Inf and keeps the old one",
          "[bad_input][gate][top_any]") {
  using G = moet::TopAnyGate<float>;
  CHECK_MOET_ERROR(
      G({.model_dim = 4, .num_experts = 2, .temperature = 0.0f}),
      Contains("[moet::TopAnyGate]") && Contains("temperature must be finite and > 0, got 0"));
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 2, .temperature = -2.0f}),
                   Contains("[moet::TopAnyGate]") && Contains("got -2"));
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 2, .temperature = kNaN}),
                   Contains("[moet::TopAnyGate]") && Contains("got nan"));
  G gate({.model_dim = 4, .num_experts = 2, .temperature = 3.0f});
  CHECK_MOET_ERROR(gate.set_temperature(0.0f), Contains("[moet::TopAnyGate]") && Contains("got 0"));
  CHECK_MOET_ERROR(gate.set_temperature(kNaN),
                   Contains("[moet::TopAnyGate]") && Contains("got nan"));
  CHECK_MOET_ERROR(gate.set_temperature(kInf),
                   Contains("[moet::TopAnyGate]") && Contains("got inf"));
  CHECK(gate.temperature() == 3.0f);
}

TEST_CASE("TopAnyGate::set_thresholds rejects a wrong size or a non-finite entry",
          "[bad_input][gate][top_any]") {
  moet::TopAnyGate<float> gate({.model_dim = 3, .num_experts = 4});
  const moet::Vector<float> before = gate.thresholds();
  CHECK_MOET_ERROR(
      gate.set_thresholds(moet::Vector<float>::Zero(3)),
      Contains("[moet::TopAnyGate]") && Contains("thresholds must have 4 entries, got 3"));
  CHECK_MOET_ERROR(gate.set_thresholds(moet::Vector<float>::Zero(5)),
                   Contains("[moet::TopAnyGate]") && Contains("got 5"));
  moet::Vector<float> theta = moet::Vector<float>::Constant(4, 0.25f);
  theta[2] = kNaN;
  CHECK_MOET_ERROR(gate.set_thresholds(theta),
                   Contains("[moet::TopAnyGate]") && Contains("thresholds must be finite"));
  theta[2] = -kInf;
  CHECK_MOET_ERROR(gate.set_thresholds(theta),
                   Contains("[moet::TopAnyGate]") && Contains("thresholds must be finite"));
  CHECK(gate.thresholds() == before);
}

TEST_CASE("TopAnyGate::set_gate_embeddings rejects a wrong shape or a non-finite entry",
          "[bad_input][gate][top_any]") {
  moet::TopAnyGate<float> gate({.model_dim = 3, .num_experts = 4});
  const RowMatrix<float> before = gate.gate_embeddings();
  CHECK_MOET_ERROR(gate.set_gate_embeddings(normal_matrix(4, 3, 1), moet::WeightLayout::kInOut),
                   Contains("[moet::TopAnyGate] set_gate_embeddings: gate embeddings must be "
                            "(model_dim, num_experts) = (3, 4)") &&
                       Contains("got (4, 3): looks transposed") && Contains("kOutIn"));
  CHECK_MOET_ERROR(gate.set_gate_embeddings(normal_matrix(3, 4, 1), moet::WeightLayout::kOutIn),
                   Contains("[num_experts, model_dim] = [4, 3]") &&
                       Contains("got (3, 4): looks transposed") && Contains("kInOut"));
  CHECK_MOET_ERROR(
      gate.set_gate_embeddings(normal_matrix(3, 5, 1), moet::WeightLayout::kInOut),
      Contains("[moet::TopAnyGate]") && Contains("got (3, 5)") && !Contains("transposed"));
  RowMatrix<float> w = normal_matrix(3, 4, 2);
  w(1, 3) = kInf;
  CHECK_MOET_ERROR(gate.set_gate_embeddings(w, moet::WeightLayout::kInOut),
                   Contains("[moet::TopAnyGate]") &&
                       Contains("gate embeddings must be finite, got inf at row 1, column 3"));
  CHECK(gate.gate_embeddings() == before);
  // The router alias takes the same matrix in PyTorch's layout (one row per expert).
  w(1, 3) = 0.5f;
  gate.set_router(RowMatrix<float>(w.transpose()), moet::WeightLayout::kOutIn);
  CHECK(gate.gate_embeddings() == w);
}

TEST_CASE("TopAnyGate rejects a bad expert mask and an out-of-range slot",
          "[bad_input][gate][top_any]") {
  moet::TopAnyGate<float> gate({.model_dim = 3, .num_experts = 4, .initial_experts = 2});
  CHECK_MOET_ERROR(
      gate.set_expert_mask(moet::Vector<float>::Ones(2)),
      Contains("[moet::TopAnyGate]") && Contains("expert mask must have 4 entries, got 2"));
  moet::Vector<float> mask = moet::Vector<float>::Ones(4);
  mask[1] = 0.5f;
  CHECK_MOET_ERROR(gate.set_expert_mask(mask),
                   Contains("[moet::TopAnyGate]") &&
                       Contains("expert mask entries must be 0 or 1, got 0.5 at slot 1"));
  CHECK_MOET_ERROR(
      gate.set_expert_active(4, true),
      Contains("[moet::TopAnyGate]") && Contains("expert slot must be in [0, 4), got 4"));
  CHECK_MOET_ERROR(gate.set_expert_active(-1, true),
                   Contains("[moet::TopAnyGate]") && Contains("got -1"));
  CHECK(gate.num_active() == 2);
}

TEST_CASE("TopAnyGate hands out read-only views; route rejects NaN state written by training",
          "[bad_input][gate][top_any]") {
  moet::TopAnyGate<float> gate({.model_dim = 3, .num_experts = 4});
  // No accessor hands out a resizable or writable matrix any more (they used to, and a resize
  // or a NaN reached route).
  static_assert(
      std::is_same_v<decltype(gate.gate_embeddings()), Eigen::Map<const RowMatrix<float>>>);
  static_assert(std::is_same_v<decltype(gate.router()), Eigen::Map<const RowMatrix<float>>>);
  static_assert(std::is_same_v<decltype(gate.thresholds()), Eigen::Map<const moet::Vector<float>>>);
  const RowMatrix<float> x = normal_matrix(5, 3, 1);
  moet::Routing<float> out;
  // The optimisers write through visit_parameters; a NaN written there is route's to reject.
  const auto poison = [&](std::string_view which) {
    gate.visit_parameters(
        [&](std::string_view name, moet::ParamMap<float> value, moet::ParamMap<float>) {
          if (name == which) value(0, 0) = kNaN;
        });
  };
  poison("thresholds");
  CHECK_MOET_ERROR(gate.route(x, {}, out),
                   Contains("[moet::TopAnyGate]") && Contains("thresholds must be finite"));
  gate.set_thresholds(moet::Vector<float>::Zero(4));
  poison("embeddings");
  CHECK_MOET_ERROR(gate.route(x, {}, out),
                   Contains("[moet::TopAnyGate]") && Contains("gate embeddings must be finite"));
}

TEST_CASE("ImportanceGate rejects bad k_min, k_max, sizes, norm and k_avg",
          "[bad_input][gate][importance]") {
  using G = moet::ImportanceGate<float>;
  CHECK_MOET_ERROR(
      G({.model_dim = 4, .num_experts = 4, .k_min = 3, .k_max = 2}),
      Contains("[moet::ImportanceGate]") && Contains("k_min must be in [1, k_max = 2], got 3"));
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 4, .k_min = 0, .k_max = 2}),
                   Contains("[moet::ImportanceGate]") && Contains("got 0"));
  CHECK_MOET_ERROR(
      G({.model_dim = 4, .num_experts = 4, .k_min = 1, .k_max = 5}),
      Contains("[moet::ImportanceGate]") && Contains("k_max must be <= num_experts = 4, got 5"));
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = 4, .k_min = 1, .k_max = -1}),
                   Contains("[moet::ImportanceGate]") && Contains("k_max = -1"));
  CHECK_MOET_ERROR(G({.model_dim = 0, .num_experts = 4}),
                   Contains("[moet::ImportanceGate]") && Contains("model_dim must be >= 1, got 0"));
  CHECK_MOET_ERROR(
      G({.model_dim = 4, .num_experts = 0, .k_max = 1}),
      Contains("[moet::ImportanceGate]") && Contains("num_experts must be >= 1, got 0"));
  CHECK_MOET_ERROR(
      G({.model_dim = 4, .num_experts = 4, .norm = static_cast<moet::ImportanceNorm>(7)}),
      Contains("[moet::ImportanceGate]") &&
          Contains("norm must be kMax, kMinMax or kBudget, got 7"));
  CHECK_MOET_ERROR(G({.model_dim = 4,
                      .num_experts = 4,
                      .k_min = 1,
                      .k_max = 4,
                      .norm = moet::ImportanceNorm::kBudget,
                      .k_avg = 4.5}),
                   Contains("[moet::ImportanceGate]") &&
                       Contains("k_avg must be finite and in [k_min = 1, k_max = 4], got 4.5"));
  CHECK_MOET_ERROR(G({.model_dim = 4,
                      .num_experts = 4,
                      .norm = moet::ImportanceNorm::kBudget,
                      .k_avg = std::nan("")}),
                   Contains("[moet::ImportanceGate]") && Contains("got nan"));
  // k_avg is only checked (and used) with kBudget.
  CHECK_NOTHROW(G({.model_dim = 4, .num_experts = 4, .k_avg = std::nan("")}));
}

TEST_CASE("StochasticGate rejects a model_dim or num_experts below 1",
          "[bad_input][gate][stochastic]") {
  using G = moet::StochasticGate<float>;
  CHECK_MOET_ERROR(G({.model_dim = 0, .num_experts = 2}),
                   Contains("[moet::StochasticGate]") && Contains("model_dim must be >= 1, got 0"));
  CHECK_MOET_ERROR(
      G({.model_dim = 4, .num_experts = 0}),
      Contains("[moet::StochasticGate]") && Contains("num_experts must be >= 1, got 0"));
  CHECK_MOET_ERROR(G({.model_dim = 4, .num_experts = -2}),
                   Contains("[moet::StochasticGate]") && Contains("got -2"));
}

// ------------------------------------------------------------------------------------------
// x: wrong width, NaN, +Inf, -Inf, for every gate.

TEST_CASE("TopKGate rejects x of the wrong width and x with NaN or +/-Inf",
          "[bad_input][gate][top_k]") {
  check_rejects_bad_x(moet::TopKGate<float>({.model_dim = 4, .num_experts = 3, .k = 2}), {},
                      "TopKGate", true);
  // The noisy training path checks x before drawing noise.
  moet::RouteContext train;
  train.training = true;
  check_rejects_bad_x(moet::TopKGate<float>(moet::TopKGate<float>::noisy_top_k_options(4, 3, 2)),
                      train, "TopKGate", true);
}

TEST_CASE("TopPGate rejects x of the wrong width and x with NaN or +/-Inf",
          "[bad_input][gate][top_p]") {
  check_rejects_bad_x(moet::TopPGate<float>({.model_dim = 4, .num_experts = 3}), {}, "TopPGate",
                      true);
}

TEST_CASE("TopAnyGate rejects x of the wrong width and x with NaN or +/-Inf",
          "[bad_input][gate][top_any]") {
  moet::RouteContext train;
  train.training = true;
  check_rejects_bad_x(moet::TopAnyGate<float>({.model_dim = 4, .num_experts = 3}), {}, "TopAnyGate",
                      false);
  check_rejects_bad_x(moet::TopAnyGate<float>({.model_dim = 4, .num_experts = 3}), train,
                      "TopAnyGate", false);
}

TEST_CASE("ImportanceGate rejects x of the wrong width and x with NaN or +/-Inf",
          "[bad_input][gate][importance]") {
  const auto importance = uniform_importance(6);
  moet::RouteContext ctx;
  ctx.importance = importance;
  check_rejects_bad_x(moet::ImportanceGate<float>({.model_dim = 4, .num_experts = 3, .k_max = 2}),
                      ctx, "ImportanceGate", true);
}

TEST_CASE("StochasticGate rejects x of the wrong width and x with NaN or +/-Inf",
          "[bad_input][gate][stochastic]") {
  moet::RouteContext train;
  train.training = true;
  for (const auto mode :
       {moet::StochasticInference::kToken, moet::StochasticInference::kEnsemble}) {
    const moet::StochasticGate<float> gate({.model_dim = 4, .num_experts = 3, .inference = mode});
    check_rejects_bad_x(gate, {}, "StochasticGate", false);
    check_rejects_bad_x(gate, train, "StochasticGate", false);
  }
}

// ------------------------------------------------------------------------------------------
// Non-finite logits from finite x.

TEST_CASE("Softmax gates reject non-finite logits produced by huge router weights",
          "[bad_input][gate][top_k][top_p][importance]") {
  const RowMatrix<float> x = RowMatrix<float>::Ones(5, 4);  // 4 * 3e38 overflows to +Inf
  const auto importance = uniform_importance(5);
  moet::RouteContext ctx;
  ctx.importance = importance;
  moet::Routing<float> out;
  const std::string logits = "router logits must be finite, got NaN or Inf for token 0";

  moet::TopKGate<float> top_k({.model_dim = 4, .num_experts = 3, .k = 2});
  top_k.set_router(RowMatrix<float>::Constant(4, 3, 3e38f), moet::WeightLayout::kInOut);
  CHECK_MOET_ERROR(top_k.route(x, {}, out), Contains("[moet::TopKGate]") && Contains(logits));

  moet::TopPGate<float> top_p({.model_dim = 4, .num_experts = 3});
  top_p.set_router(RowMatrix<float>::Constant(4, 3, 3e38f), moet::WeightLayout::kInOut);
  CHECK_MOET_ERROR(top_p.route(x, {}, out), Contains("[moet::TopPGate]") && Contains(logits));

  moet::ImportanceGate<float> importance_gate({.model_dim = 4, .num_experts = 3, .k_max = 2});
  importance_gate.set_router(RowMatrix<float>::Constant(4, 3, 3e38f), moet::WeightLayout::kInOut);
  CHECK_MOET_ERROR(importance_gate.route(x, ctx, out),
                   Contains("[moet::ImportanceGate]") && Contains(logits));

  // NaN weights in one column reach only that logit; the token is still named. (A NaN can
  // only get there through training now: set_router rejects it, test below.)
  moet::TopKGate<float> nan_router({.model_dim = 4, .num_experts = 3});
  nan_router.visit_parameters([](std::string_view, moet::ParamMap<float> value,
                                 moet::ParamMap<float>) { value(0, 1) = kNaN; });
  CHECK_MOET_ERROR(nan_router.route(x, {}, out), Contains("[moet::TopKGate]") && Contains(logits));

  // Only the last token overflows: the message names it.
  moet::TopKGate<float> big({.model_dim = 4, .num_experts = 3});
  big.set_router(RowMatrix<float>::Constant(4, 3, 1e30f), moet::WeightLayout::kInOut);
  RowMatrix<float> x_last = RowMatrix<float>::Constant(5, 4, 1e-3f);
  x_last.row(4).setConstant(1e30f);
  CHECK_MOET_ERROR(big.route(x_last, {}, out),
                   Contains("[moet::TopKGate]") && Contains("NaN or Inf for token 4"));
}

// ------------------------------------------------------------------------------------------
// Router weights through the setters (issue 12, defect 4: `router()` was a resizable matrix, and
// assigning PyTorch's untransposed [num_experts, model_dim] array overflowed the heap in
// detail/select.hpp under ASan, or reported "non-finite router weights" in Release).

namespace {

// Every router setter of `gate` (`set(w, layout)`, `get()` the view, `op` the gate's name):
// PyTorch's array in kInOut is "looks transposed", a wrong shape is named, a NaN is named by
// row and column, nothing changes on an error; kOutIn and kInOut of the same weights give the
// same bits, and `route` then follows the oracle softmax of x W.
template <class Gate, class Set, class Get>
void check_router_setter(Gate& gate, Set&& set, Get&& get, const std::string& op,
                         const std::string& setter, const std::string& label,
                         const moet::RouteContext& ctx) {
  constexpr Index kD = 6;
  constexpr Index kE = 4;
  const RowMatrix<float> torch = normal_matrix(kE, kD, 61);  // nn.Linear(d, E).weight
  const RowMatrix<float> before = get();
  CHECK_MOET_ERROR(set(torch, moet::WeightLayout::kInOut),
                   Contains("[moet::" + op + "] " + setter + ": " + label +
                            " must be (model_dim, num_experts) = (6, 4) in WeightLayout::kInOut") &&
                       Contains("got (4, 6): looks transposed") && Contains("kOutIn"));
  CHECK_MOET_ERROR(set(RowMatrix<float>(torch.transpose()), moet::WeightLayout::kOutIn),
                   Contains(label + " must be [num_experts, model_dim] = [4, 6]") &&
                       Contains("got (6, 4): looks transposed"));
  CHECK_MOET_ERROR(set(normal_matrix(5, 4, 1), moet::WeightLayout::kInOut),
                   Contains("got (5, 4)") && !Contains("transposed"));
  RowMatrix<float> bad = torch;
  bad(2, 3) = kNaN;
  CHECK_MOET_ERROR(set(bad, moet::WeightLayout::kOutIn),
                   Contains("[moet::" + op + "] " + setter + ": " + label +
                            " must be finite, got nan at row 2, column 3"));
  bad(2, 3) = -kInf;
  CHECK_MOET_ERROR(set(bad, moet::WeightLayout::kOutIn), Contains("got -inf at row 2, column 3"));
  CHECK(get() == before);

  set(torch, moet::WeightLayout::kOutIn);
  const RowMatrix<float> w = get();
  CHECK(w == torch.transpose());
  set(RowMatrix<float>(torch.transpose()), moet::WeightLayout::kInOut);
  CHECK(get() == w);
  if (label != "router") return;  // the noise router is checked through the clean plan
  const RowMatrix<float> x = normal_matrix(9, kD, 62);
  moet::Routing<float> out;
  gate.route(x, ctx, out);
  for (Index t = 0; t < x.rows(); ++t) {
    const auto p = oracle_softmax(x, w, t);
    for (Index e = 0; e < kE; ++e) {
      CHECK(out.probs()(t, e) == Approx(p[static_cast<std::size_t>(e)]).epsilon(1e-5));
    }
  }
}

}  // namespace

TEST_CASE("Router setters take PyTorch's [E, d] weight and reject the untransposed array",
          "[bad_input][gate][weights]") {
  using moet::WeightLayout;
  const auto importance = uniform_importance(9);
  moet::RouteContext with_importance;
  with_importance.importance = importance;

  moet::TopKGate<float> top_k(moet::TopKGate<float>::noisy_top_k_options(6, 4, 2));
  check_router_setter(
      top_k, [&](const RowMatrix<float>& w, WeightLayout l) { top_k.set_router(w, l); },
      [&] { return RowMatrix<float>(top_k.router()); }, "TopKGate", "set_router", "router", {});
  check_router_setter(
      top_k, [&](const RowMatrix<float>& w, WeightLayout l) { top_k.set_noise_router(w, l); },
      [&] { return RowMatrix<float>(top_k.noise_router()); }, "TopKGate", "set_noise_router",
      "noise router", {});
  moet::TopKGate<float> plain({.model_dim = 6, .num_experts = 4});
  CHECK_MOET_ERROR(plain.set_noise_router(normal_matrix(6, 4, 1), WeightLayout::kInOut),
                   Contains("[moet::TopKGate]") && Contains("needs a noisy gate"));

  moet::TopPGate<float> top_p({.model_dim = 6, .num_experts = 4, .p = 0.5});
  check_router_setter(
      top_p, [&](const RowMatrix<float>& w, WeightLayout l) { top_p.set_router(w, l); },
      [&] { return RowMatrix<float>(top_p.router()); }, "TopPGate", "set_router", "router", {});

  moet::ImportanceGate<float> imp({.model_dim = 6, .num_experts = 4, .k_max = 2});
  check_router_setter(
      imp, [&](const RowMatrix<float>& w, WeightLayout l) { imp.set_router(w, l); },
      [&] { return RowMatrix<float>(imp.router()); }, "ImportanceGate", "set_router", "router",
      with_importance);

  // The accessors are fixed-shape read-only views: nothing to resize or assign.
  static_assert(std::is_same_v<decltype(top_k.router()), Eigen::Map<const RowMatrix<float>>>);
  static_assert(std::is_same_v<decltype(top_k.noise_router()), Eigen::Map<const RowMatrix<float>>>);
  static_assert(std::is_same_v<decltype(top_p.router()), Eigen::Map<const RowMatrix<float>>>);
  static_assert(std::is_same_v<decltype(imp.router()), Eigen::Map<const RowMatrix<float>>>);
}

TEST_CASE("Noisy TopKGate rejects non-finite noisy logits in training only",
          "[bad_input][gate][top_k]") {
  moet::TopKGate<float> noisy(moet::TopKGate<float>::noisy_top_k_options(4, 3, 2));
  // softplus(x W_noise) = +Inf
  noisy.set_noise_router(RowMatrix<float>::Constant(4, 3, 3e38f), moet::WeightLayout::kInOut);
  const RowMatrix<float> x = RowMatrix<float>::Ones(5, 4);
  moet::RouteContext train;
  train.training = true;
  moet::Routing<float> out;
  CHECK_MOET_ERROR(noisy.route(x, train, out),
                   Contains("[moet::TopKGate]") && Contains("router logits must be finite"));
  // Inference adds no noise: the plan is the clean gate's (same init_seed, same W_r).
  moet::TopKGate<float> clean({.model_dim = 4, .num_experts = 3, .k = 2, .renormalize = true});
  REQUIRE(clean.router() == noisy.router());
  moet::Routing<float> expected;
  noisy.route(x, {}, out);
  clean.route(x, {}, expected);
  check_same_plan(out, expected);
}

TEST_CASE("TopAnyGate rejects an overflowing token norm or gate embedding norm",
          "[bad_input][gate][top_any]") {
  // |x_t|^2 = 4e60 overflows fp32; the scores would silently become sigmoid(0).
  moet::TopAnyGate<float> gate({.model_dim = 4, .num_experts = 3});
  RowMatrix<float> x = normal_matrix(300, 4, 4);
  x.row(290).setConstant(1e30f);
  moet::Routing<float> out;
  for (const bool training : {false, true}) {
    moet::RouteContext ctx;
    ctx.training = training;
    CHECK_MOET_ERROR(gate.route(x, ctx, out), Contains("[moet::TopAnyGate]") &&
                                                  Contains("scores must be finite") &&
                                                  Contains("tokens [256, 300)"));
  }
  // Finite embeddings whose norm overflows.
  moet::TopAnyGate<float> huge({.model_dim = 4, .num_experts = 3});
  RowMatrix<float> w = huge.gate_embeddings();
  w.col(1).setConstant(3e38f);
  huge.set_gate_embeddings(w, moet::WeightLayout::kInOut);
  CHECK_MOET_ERROR(huge.route(normal_matrix(6, 4, 5), {}, out),
                   Contains("[moet::TopAnyGate]") && Contains("scores must be finite"));
}

// ------------------------------------------------------------------------------------------
// ImportanceGate's context.

TEST_CASE("ImportanceGate needs importance or attention", "[bad_input][gate][importance]") {
  const moet::ImportanceGate<float> gate({.model_dim = 4, .num_experts = 4, .k_max = 2});
  moet::Routing<float> out;
  CHECK_MOET_ERROR(gate.route(normal_matrix(6, 4, 1), {}, out),
                   Contains("[moet::ImportanceGate] needs ctx.importance or ctx.attention"));
  // An empty batch needs neither: the documented empty plan.
  gate.route(RowMatrix<float>(0, 4), {}, out);
  check_empty_plan(out, 4);
}

TEST_CASE("ImportanceGate rejects importance of the wrong size", "[bad_input][gate][importance]") {
  const moet::ImportanceGate<float> gate({.model_dim = 4, .num_experts = 4, .k_max = 2});
  moet::Routing<float> out;
  for (const Index n : {Index{5}, Index{7}}) {
    const auto importance = uniform_importance(n);
    moet::RouteContext ctx;
    ctx.importance = importance;
    CHECK_MOET_ERROR(
        gate.route(normal_matrix(6, 4, 1), ctx, out),
        Contains("[moet::ImportanceGate]") &&
            Contains("ctx.importance must have one entry per token (6), got " + str(n)));
  }
}

TEST_CASE("ImportanceGate rejects negative, NaN or infinite importance",
          "[bad_input][gate][importance]") {
  const moet::ImportanceGate<float> gate({.model_dim = 4, .num_experts = 4, .k_max = 2});
  moet::Routing<float> out;
  const float values[] = {-1.0f, kNaN, kInf, -kInf};
  const char* names[] = {"got -1 at token 2", "got nan at token 2", "got inf at token 2",
                         "got -inf at token 2"};
  for (int i = 0; i < 4; ++i) {
    auto importance = uniform_importance(6);
    importance[2] = values[i];
    moet::RouteContext ctx;
    ctx.importance = importance;
    CHECK_MOET_ERROR(gate.route(normal_matrix(6, 4, 1), ctx, out),
                     Contains("[moet::ImportanceGate]") &&
                         Contains("ctx.importance must be finite and >= 0") && Contains(names[i]));
  }
}

TEST_CASE("ImportanceGate rejects attention whose shape does not cover the tokens",
          "[bad_input][gate][importance]") {
  const moet::ImportanceGate<float> gate({.model_dim = 4, .num_experts = 4, .k_max = 2});
  moet::Routing<float> out;
  const std::vector<float> att(2 * 2 * 4 * 4, 0.25f);
  const RowMatrix<float> x = normal_matrix(6, 4, 1);
  moet::RouteContext ctx;
  ctx.attention = {att.data(), 2, 2, 4, false};  // covers 8 tokens, x has 6
  CHECK_MOET_ERROR(gate.route(x, ctx, out),
                   Contains("[moet::ImportanceGate]") &&
                       Contains("ctx.attention [batch, heads, L, L] = [2, 2, 4, 4]") &&
                       Contains("but x is (6, 4)"));
  ctx.attention = {att.data(), 2, 0, 3, false};  // no heads
  CHECK_MOET_ERROR(gate.route(x, ctx, out),
                   Contains("[moet::ImportanceGate]") && Contains("= [2, 0, 3, 3]"));
  ctx.attention = {att.data(), 0, 2, 3, false};  // no batch
  CHECK_MOET_ERROR(gate.route(x, ctx, out),
                   Contains("[moet::ImportanceGate]") && Contains("= [0, 2, 3, 3]"));
  // sequence_length must agree with the attention's L.
  ctx.attention = {att.data(), 2, 2, 3, false};
  ctx.sequence_length = 2;
  CHECK_MOET_ERROR(gate.route(x, ctx, out),
                   Contains("[moet::ImportanceGate]") &&
                       Contains("ctx.sequence_length (2) must be 0 or the attention's L (3)"));
}

TEST_CASE("ImportanceGate rejects NaN, infinite or negative attention and names the entry",
          "[bad_input][gate][importance]") {
  const moet::ImportanceGate<float> gate({.model_dim = 4, .num_experts = 4, .k_max = 2});
  moet::Routing<float> out;
  const float values[] = {kNaN, kInf, -0.5f};
  const char* names[] = {"got nan at [1, 0, 2, 1]", "got inf at [1, 0, 2, 1]",
                         "got -0.5 at [1, 0, 2, 1]"};
  for (int i = 0; i < 3; ++i) {
    std::vector<float> att(2 * 2 * 3 * 3, 1.0f / 3.0f);  // [batch 2, heads 2, 3, 3]
    att[((1 * 2 + 0) * 3 + 2) * 3 + 1] = values[i];      // [1, 0, 2, 1]
    moet::RouteContext ctx;
    ctx.attention = {att.data(), 2, 2, 3, i == 2};
    CHECK_MOET_ERROR(gate.route(normal_matrix(6, 4, 1), ctx, out),
                     Contains("[moet::ImportanceGate]") &&
                         Contains("ctx.attention must be finite and >= 0") && Contains(names[i]));
  }
}

TEST_CASE(
    "ImportanceGate rejects a sequence_length that does not divide the tokens or is "
    "negative",
    "[bad_input][gate][importance]") {
  const moet::ImportanceGate<float> gate({.model_dim = 4, .num_experts = 4, .k_max = 2});
  moet::Routing<float> out;
  const auto importance = uniform_importance(6);
  moet::RouteContext ctx;
  ctx.importance = importance;
  ctx.sequence_length = 4;
  CHECK_MOET_ERROR(gate.route(normal_matrix(6, 4, 1), ctx, out),
                   Contains("[moet::ImportanceGate]") &&
                       Contains("ctx.sequence_length (4) must divide the number of tokens (6)"));
  ctx.sequence_length = 12;
  CHECK_MOET_ERROR(gate.route(normal_matrix(6, 4, 1), ctx, out),
                   Contains("[moet::ImportanceGate]") && Contains("ctx.sequence_length (12)"));
  ctx.sequence_length = -2;
  CHECK_MOET_ERROR(
      gate.route(normal_matrix(6, 4, 1), ctx, out),
      Contains("[moet::ImportanceGate]") && Contains("ctx.sequence_length must be >= 0, got -2"));
}

TEST_CASE("ImportanceGate rejects a valid mask of the wrong size",
          "[bad_input][gate][importance]") {
  const moet::ImportanceGate<float> gate({.model_dim = 4, .num_experts = 4, .k_max = 2});
  moet::Routing<float> out;
  const auto importance = uniform_importance(6);
  const std::vector<std::uint8_t> valid(5, 1);
  moet::RouteContext ctx;
  ctx.importance = importance;
  ctx.valid = valid;
  CHECK_MOET_ERROR(gate.route(normal_matrix(6, 4, 1), ctx, out),
                   Contains("[moet::ImportanceGate]") &&
                       Contains("ctx.valid must have one entry per token (6), got 5"));
  // The same mask with attention instead of importance.
  const std::vector<float> att(2 * 1 * 3 * 3, 1.0f / 3.0f);
  moet::RouteContext att_ctx;
  att_ctx.attention = {att.data(), 2, 1, 3, false};
  att_ctx.valid = valid;
  CHECK_MOET_ERROR(gate.route(normal_matrix(6, 4, 1), att_ctx, out),
                   Contains("[moet::ImportanceGate]") && Contains("got 5"));
}

TEST_CASE(
    "StochasticGate rejects a sequence_length that does not divide the tokens or is "
    "negative, in every mode",
    "[bad_input][gate][stochastic]") {
  moet::Routing<float> out;
  for (const auto mode :
       {moet::StochasticInference::kToken, moet::StochasticInference::kPosition,
        moet::StochasticInference::kSequence, moet::StochasticInference::kEnsemble}) {
    const moet::StochasticGate<float> gate({.model_dim = 4, .num_experts = 3, .inference = mode});
    for (const bool training : {false, true}) {
      moet::RouteContext ctx;
      ctx.training = training;
      ctx.sequence_length = 4;
      CHECK_MOET_ERROR(gate.route(normal_matrix(6, 4, 1), ctx, out),
                       Contains("[moet::StochasticGate]") &&
                           Contains("the number of tokens must be a multiple of sequence_length, "
                                    "got 6 tokens and sequence_length 4"));
      ctx.sequence_length = -3;
      CHECK_MOET_ERROR(
          gate.route(normal_matrix(6, 4, 1), ctx, out),
          Contains("[moet::StochasticGate]") && Contains("sequence_length must be >= 0, got -3"));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Documented results: T = 0, E = 1.

TEST_CASE("Every gate gives an empty plan for an empty batch", "[bad_input][gate]") {
  const RowMatrix<float> x(0, 4);  // (0, model_dim)
  moet::RouteContext train;
  train.training = true;
  train.sequence_length = 3;
  for (const moet::RouteContext& ctx : {moet::RouteContext{}, train}) {
    moet::Routing<float> out;
    // A stale plan in `out` must not survive.
    out.reset(3, 2);
    moet::TopKGate<float>({.model_dim = 4, .num_experts = 3, .k = 2, .capacity_factor = 1.0})
        .route(x, ctx, out);
    check_empty_plan(out, 3);
    moet::TopKGate<float>(moet::TopKGate<float>::noisy_top_k_options(4, 5, 2)).route(x, ctx, out);
    check_empty_plan(out, 5);
    moet::TopPGate<float>({.model_dim = 4, .num_experts = 6}).route(x, ctx, out);
    check_empty_plan(out, 6);
    moet::TopAnyGate<float>({.model_dim = 4, .num_experts = 7, .initial_experts = 2})
        .route(x, ctx, out);
    check_empty_plan(out, 7);
    moet::ImportanceGate<float>({.model_dim = 4, .num_experts = 8, .k_max = 2}).route(x, ctx, out);
    check_empty_plan(out, 8);
    moet::StochasticGate<float>({.model_dim = 4, .num_experts = 9}).route(x, ctx, out);
    check_empty_plan(out, 9);
  }
  // The width is still checked on an empty batch.
  moet::Routing<float> out;
  CHECK_MOET_ERROR(moet::TopKGate<float>({.model_dim = 4, .num_experts = 3})
                       .route(RowMatrix<float>(0, 5), {}, out),
                   Contains("[moet::TopKGate]") && Contains("got 5"));
}

TEST_CASE("With one expert the softmax gates route every token to expert 0 with weight 1",
          "[bad_input][gate][top_k][top_p][importance]") {
  const RowMatrix<float> x = normal_matrix(9, 4, 21);
  const auto importance = std::vector<float>{0.1f, 2.0f, 0.0f, 1.0f, 3.0f, 0.5f, 0.2f, 0.0f, 9.0f};
  moet::RouteContext ctx;
  ctx.importance = importance;
  std::vector<moet::Routing<float>> plans(5);
  moet::TopKGate<float>({.model_dim = 4, .num_experts = 1}).route(x, ctx, plans[0]);
  moet::TopKGate<float>({.model_dim = 4, .num_experts = 1, .renormalize = true})
      .route(x, ctx, plans[1]);
  moet::TopPGate<float>({.model_dim = 4, .num_experts = 1, .p = 0.1}).route(x, ctx, plans[2]);
  moet::ImportanceGate<float>({.model_dim = 4, .num_experts = 1, .k_max = 1})
      .route(x, ctx, plans[3]);
  // Capacity with E = 1: C = max(ceil(9 / 1 * 2 * 1), 4) = 18 >= 9, nothing drops.
  moet::TopKGate<float>({.model_dim = 4, .num_experts = 1, .capacity_factor = 2.0})
      .route(x, ctx, plans[4]);
  for (const auto& plan : plans) {
    REQUIRE(plan.num_tokens() == 9);
    CHECK(plan.num_assignments() == 9);
    CHECK(plan.dropped == 0);
    for (Index t = 0; t < 9; ++t) {
      REQUIRE(plan.k(t) == 1);
      CHECK(plan.experts(t)[0] == 0);
      CHECK(plan.weights(t)[0] == 1.0f);  // softmax of one logit is exactly 1
    }
  }
}

TEST_CASE("With one expert StochasticGate routes every token to expert 0 with weight 1",
          "[bad_input][gate][stochastic]") {
  const RowMatrix<float> x = normal_matrix(8, 4, 22);
  for (const auto mode :
       {moet::StochasticInference::kToken, moet::StochasticInference::kPosition,
        moet::StochasticInference::kSequence, moet::StochasticInference::kEnsemble}) {
    const moet::StochasticGate<float> gate({.model_dim = 4, .num_experts = 1, .inference = mode});
    for (const bool training : {false, true}) {
      moet::RouteContext ctx;
      ctx.training = training;
      ctx.sequence_length = 4;
      ctx.seed = 99;
      moet::Routing<float> out;
      gate.route(x, ctx, out);
      REQUIRE(out.num_assignments() == 8);
      for (Index t = 0; t < 8; ++t) {
        REQUIRE(out.k(t) == 1);
        CHECK(out.experts(t)[0] == 0);
        CHECK(out.weights(t)[0] == 1.0f);
      }
    }
  }
}

TEST_CASE("With one expert TopAnyGate fires on positive cosines and falls back per variant",
          "[bad_input][gate][top_any]") {
  // Tokens alternate along +W_0 and -W_0 (plus noise), so cos[t, 0] is clearly positive or
  // negative: positive tokens fire (weight 1 / 1); negative ones are dropped in training and in
  // eval fall back to expert 0 with weight 1 (DeepSpeed) or s[t, 0] (Tutel: no token of the
  // batch fires two experts, since there is only one).
  for (const auto variant : {moet::TopAnyVariant::kDeepSpeed, moet::TopAnyVariant::kTutel}) {
    const moet::TopAnyGate<float> gate(
        {.model_dim = 3, .num_experts = 1, .variant = variant, .temperature = 2.0f});
    const RowMatrix<float> noise = normal_matrix(8, 3, 23);
    RowMatrix<float> x(8, 3);
    for (Index t = 0; t < 8; ++t) {
      const float sign = t % 2 == 0 ? 1.0f : -1.0f;
      x.row(t) = sign * 2.0f * gate.gate_embeddings().col(0).transpose() + 0.2f * noise.row(t);
    }
    for (const bool training : {false, true}) {
      moet::RouteContext ctx;
      ctx.training = training;
      moet::Routing<float> out;
      gate.route(x, ctx, out);
      CHECK(out.live_experts == 1);
      for (Index t = 0; t < 8; ++t) {
        const double cos = oracle_cosine(x, t, gate.gate_embeddings(), 0);
        REQUIRE(std::abs(cos) > 0.5);
        if (cos > 0.0) {
          REQUIRE(out.k(t) == 1);
          CHECK(out.experts(t)[0] == 0);
          CHECK(out.weights(t)[0] == 1.0f);
        } else if (training) {
          CHECK(out.k(t) == 0);
        } else {
          REQUIRE(out.k(t) == 1);
          CHECK(out.experts(t)[0] == 0);
          const double expected =
              variant == moet::TopAnyVariant::kDeepSpeed ? 1.0 : sigmoid(2.0 * cos);
          CHECK(out.weights(t)[0] == Approx(expected).epsilon(1e-5));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Capacity.

namespace {

// The capacity oracle: the dropless top-k (from the double softmax), then slot-major priority
// (every first choice before any second, earlier tokens first) against capacity `cap`.
struct CapacityOracle {
  std::vector<std::vector<std::int32_t>> kept;  // per token, surviving experts in slot order
  std::vector<std::vector<double>> probs;       // per token, P over all experts
  Index dropped = 0;
};

CapacityOracle capacity_oracle(const RowMatrix<float>& x, const RowMatrix<float>& w, Index k,
                               Index cap) {
  const Index num_tokens = x.rows();
  const Index num_experts = w.cols();
  CapacityOracle o;
  std::vector<std::vector<std::int32_t>> chosen(static_cast<std::size_t>(num_tokens));
  for (Index t = 0; t < num_tokens; ++t) {
    o.probs.push_back(oracle_softmax(x, w, t));
    const auto order = oracle_order(o.probs.back());
    chosen[static_cast<std::size_t>(t)].assign(order.begin(), order.begin() + k);
  }
  o.kept.assign(static_cast<std::size_t>(num_tokens), {});
  std::vector<Index> load(static_cast<std::size_t>(num_experts), 0);
  for (Index j = 0; j < k; ++j) {
    for (Index t = 0; t < num_tokens; ++t) {
      const std::int32_t e = chosen[static_cast<std::size_t>(t)][static_cast<std::size_t>(j)];
      if (load[static_cast<std::size_t>(e)] < cap) {
        ++load[static_cast<std::size_t>(e)];
        o.kept[static_cast<std::size_t>(t)].push_back(e);
      } else {
        ++o.dropped;
      }
    }
  }
  return o;
}

void check_against_capacity_oracle(const moet::Routing<float>& out, const CapacityOracle& o,
                                   bool renormalize) {
  REQUIRE(out.dropped == o.dropped);
  for (Index t = 0; t < out.num_tokens(); ++t) {
    const auto& kept = o.kept[static_cast<std::size_t>(t)];
    const auto& p = o.probs[static_cast<std::size_t>(t)];
    REQUIRE(out.k(t) == static_cast<Index>(kept.size()));
    double sum = 0.0;
    for (const auto e : kept) sum += p[static_cast<std::size_t>(e)];
    for (std::size_t j = 0; j < kept.size(); ++j) {
      CHECK(out.experts(t)[j] == kept[j]);
      const double expected = renormalize ? p[static_cast<std::size_t>(kept[j])] / sum
                                          : p[static_cast<std::size_t>(kept[j])];
      CHECK(out.weights(t)[j] == Approx(expected).epsilon(1e-5).margin(1e-7));
    }
  }
}

}  // namespace

TEST_CASE(
    "A capacity so small that only min_capacity is left drops the hand-counted "
    "assignments",
    "[bad_input][gate][top_k][capacity]") {
  const auto seed = GENERATE(1u, 2u, 3u);
  const Index k = GENERATE(Index{1}, Index{2});
  const bool renormalize = GENERATE(false, true);
  const Index num_tokens = 24;
  // C = max(ceil(24 / 4 * 1e-3 * k), 3) = max(1, 3) = 3 per expert.
  const moet::TopKGate<float> gate({.model_dim = 5,
                                    .num_experts = 4,
                                    .k = k,
                                    .renormalize = renormalize,
                                    .capacity_factor = 1e-3,
                                    .min_capacity = 3,
                                    .init_seed = seed});
  REQUIRE(gate.capacity(num_tokens) == 3);
  const RowMatrix<float> x = normal_matrix(num_tokens, 5, seed + 100);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  const CapacityOracle o = capacity_oracle(x, gate.router(), k, 3);
  // 24 * k assignments into 4 experts of 3 slots: at least 24 * k - 12 drop.
  REQUIRE(o.dropped >= num_tokens * k - 12);
  check_against_capacity_oracle(out, o, renormalize);
  CHECK(out.num_assignments() == num_tokens * k - o.dropped);
}

TEST_CASE("min_capacity 0 leaves exactly ceil(T / E * capacity_factor * k) per expert",
          "[bad_input][gate][top_k][capacity]") {
  const auto seed = GENERATE(4u, 5u);
  const Index k = GENERATE(Index{1}, Index{2});
  // ceil(24 / 4 * 0.25 * k) = ceil(1.5 k): 2 for k = 1, 3 for k = 2.
  const Index cap = k == 1 ? 2 : 3;
  const moet::TopKGate<float> gate({.model_dim = 5,
                                    .num_experts = 4,
                                    .k = k,
                                    .renormalize = true,
                                    .capacity_factor = 0.25,
                                    .min_capacity = 0,
                                    .init_seed = seed});
  REQUIRE(gate.capacity(24) == cap);
  const RowMatrix<float> x = normal_matrix(24, 5, seed + 200);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  const CapacityOracle o = capacity_oracle(x, gate.router(), k, cap);
  REQUIRE(o.dropped > 0);
  check_against_capacity_oracle(out, o, true);
}

TEST_CASE("A capacity that rounds to 0 in fp32 with min_capacity 0 drops every assignment",
          "[bad_input][gate][top_k][capacity]") {
  // capacity_factor * k = 1e-46 rounds to 0 in fp32, so C = max(ceil(0), 0) = 0.
  const moet::TopKGate<float> gate(
      {.model_dim = 4, .num_experts = 3, .k = 2, .capacity_factor = 1e-46, .min_capacity = 0});
  REQUIRE(gate.capacity(10) == 0);
  moet::Routing<float> out;
  gate.route(normal_matrix(10, 4, 7), {}, out);
  CHECK(out.dropped == 20);
  CHECK(out.num_assignments() == 0);
  for (Index t = 0; t < 10; ++t) CHECK(out.k(t) == 0);
}

TEST_CASE("A huge capacity_factor is dropless, not an overflow",
          "[bad_input][gate][top_k][capacity]") {
  const Index k = GENERATE(Index{1}, Index{2});
  const double factor = GENERATE(1e20, 1e30, 1e300);
  const moet::TopKGate<float> gate({.model_dim = 4,
                                    .num_experts = 3,
                                    .k = k,
                                    .capacity_factor = factor,
                                    .min_capacity = 1,
                                    .init_seed = 8});
  const moet::TopKGate<float> dropless({.model_dim = 4, .num_experts = 3, .k = k, .init_seed = 8});
  CHECK(gate.capacity(50) >= 50);
  const RowMatrix<float> x = normal_matrix(50, 4, 8);
  moet::Routing<float> out;
  moet::Routing<float> expected;
  gate.route(x, {}, out);
  dropless.route(x, {}, expected);
  CHECK(out.dropped == 0);
  check_same_plan(out, expected);
}

// ------------------------------------------------------------------------------------------
// Very large E.

TEST_CASE("TopKGate with 4096 experts and model_dim 2 picks the oracle's top-k",
          "[bad_input][gate][top_k][large]") {
  const moet::TopKGate<float> gate({.model_dim = 2, .num_experts = 4096, .k = 3, .init_seed = 4});
  const RowMatrix<float> x = normal_matrix(16, 2, 31);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  REQUIRE(out.num_assignments() == 48);
  for (Index t = 0; t < 16; ++t) {
    const auto z = oracle_logits(x, gate.router(), t);
    const auto p = oracle_softmax(x, gate.router(), t);
    const auto order = oracle_order(z);
    REQUIRE(out.k(t) == 3);
    for (std::size_t j = 0; j < 3; ++j) {
      const auto e = static_cast<std::size_t>(out.experts(t)[j]);
      REQUIRE(e < 4096);
      // Near-ties between fp32 and double logits may swap; the value must match the oracle's.
      CHECK(z[e] == Approx(z[static_cast<std::size_t>(order[j])]).margin(1e-5));
      CHECK(out.weights(t)[j] == Approx(p[e]).epsilon(1e-4).margin(1e-7));
    }
  }
}

TEST_CASE("TopAnyGate with 4096 slots and model_dim 2 fires exactly the positive cosines",
          "[bad_input][gate][top_any][large]") {
  const moet::TopAnyGate<float> gate({.model_dim = 2, .num_experts = 4096});
  const RowMatrix<float> x = normal_matrix(6, 2, 32);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  for (Index t = 0; t < 6; ++t) {
    std::vector<bool> chosen(4096, false);
    for (const auto e : out.experts(t)) chosen[static_cast<std::size_t>(e)] = true;
    REQUIRE(out.k(t) > 0);
    for (Index e = 0; e < 4096; ++e) {
      const double cos = oracle_cosine(x, t, gate.gate_embeddings(), e);
      const bool is_chosen = chosen[static_cast<std::size_t>(e)];
      if (std::abs(cos) > 1e-5) CHECK(is_chosen == (cos > 0.0));
    }
    for (const float w : out.weights(t)) CHECK(w == 1.0f / static_cast<float>(out.k(t)));
  }
}

TEST_CASE("StochasticGate with 4096 experts draws ids in range and ensembles all of them",
          "[bad_input][gate][stochastic][large]") {
  const RowMatrix<float> x = normal_matrix(40, 2, 33);
  moet::Routing<float> out;
  moet::StochasticGate<float>({.model_dim = 2, .num_experts = 4096}).route(x, {}, out);
  for (Index t = 0; t < 40; ++t) {
    REQUIRE(out.k(t) == 1);
    CHECK(out.experts(t)[0] >= 0);
    CHECK(out.experts(t)[0] < 4096);
  }
  moet::StochasticGate<float>(
      {.model_dim = 2, .num_experts = 4096, .inference = moet::StochasticInference::kEnsemble})
      .route(x.topRows(2), {}, out);
  for (Index t = 0; t < 2; ++t) {
    REQUIRE(out.k(t) == 4096);
    for (std::size_t e = 0; e < 4096; ++e) {
      CHECK(out.experts(t)[e] == static_cast<std::int32_t>(e));
      CHECK(out.weights(t)[e] == 1.0f / 4096.0f);
    }
  }
}

// ------------------------------------------------------------------------------------------
// TopAnyGate's documented degenerate results.

TEST_CASE(
    "TopAnyGate with every threshold above 1 drops every token in training and falls "
    "back to the top-1 in eval",
    "[bad_input][gate][top_any]") {
  moet::TopAnyGate<float> gate({.model_dim = 5, .num_experts = 6, .temperature = 3.0f});
  // cos <= 1 < 1.5, so sigmoid(tau cos) < sigmoid(tau 1.5): nothing fires.
  gate.set_thresholds(moet::Vector<float>::Constant(6, 1.5f));
  const RowMatrix<float> x = normal_matrix(20, 5, 41);
  moet::RouteContext train;
  train.training = true;
  moet::Routing<float> out;
  gate.route(x, train, out);
  CHECK(out.num_assignments() == 0);
  for (Index t = 0; t < 20; ++t) CHECK(out.k(t) == 0);
  gate.route(x, {}, out);
  REQUIRE(out.num_assignments() == 20);
  for (Index t = 0; t < 20; ++t) {
    std::vector<double> cos(6);
    for (Index e = 0; e < 6; ++e) {
      cos[static_cast<std::size_t>(e)] = oracle_cosine(x, t, gate.gate_embeddings(), e);
    }
    REQUIRE(out.k(t) == 1);
    CHECK(out.experts(t)[0] == oracle_order(cos)[0]);
    CHECK(out.weights(t)[0] == 1.0f);
  }
}

TEST_CASE("TopAnyGate with an all-zero mask routes every token nowhere, in eval too",
          "[bad_input][gate][top_any]") {
  moet::TopAnyGate<float> gate({.model_dim = 3, .num_experts = 4});
  gate.set_expert_mask(moet::Vector<float>::Zero(4));
  for (const bool training : {false, true}) {
    moet::RouteContext ctx;
    ctx.training = training;
    moet::Routing<float> out;
    gate.route(normal_matrix(7, 3, 42), ctx, out);
    CHECK(out.live_experts == 0);
    CHECK(out.num_assignments() == 0);
    CHECK(out.probs().isZero(0.0f));
  }
}

TEST_CASE("TopAnyGate sends an all-zero token to expert 0 in eval and nowhere in training",
          "[bad_input][gate][top_any]") {
  // A zero token has cos = 0 everywhere: s = sigmoid(0) = threshold, and equality does not fire;
  // the eval fallback's argmax over equal scores is the lowest id.
  const moet::TopAnyGate<float> gate({.model_dim = 3, .num_experts = 4});
  const RowMatrix<float> x = RowMatrix<float>::Zero(3, 3);
  moet::Routing<float> out;
  gate.route(x, {}, out);
  for (Index t = 0; t < 3; ++t) {
    REQUIRE(out.k(t) == 1);
    CHECK(out.experts(t)[0] == 0);
    CHECK(out.weights(t)[0] == 1.0f);
  }
  moet::RouteContext train;
  train.training = true;
  gate.route(x, train, out);
  CHECK(out.num_assignments() == 0);
}

// ------------------------------------------------------------------------------------------
// Routing and ExpertMajor misuse.

TEST_CASE("Routing::reset rejects negative sizes", "[bad_input][routing]") {
  moet::Routing<float> r;
  CHECK_MOET_ERROR(r.reset(-1, 4),
                   Contains("[moet::Routing::reset] sizes must be >= 0, got (-1, 4)"));
  CHECK_MOET_ERROR(r.reset(3, -2), Contains("[moet::Routing::reset]") && Contains("got (3, -2)"));
  // Zero sizes are valid.
  r.reset(0, 0);
  CHECK(r.num_tokens() == 0);
  CHECK(r.num_experts() == 0);
  r.reset(2, 0);
  r.commit_counts();
  CHECK(r.num_assignments() == 0);
}

TEST_CASE("Routing::commit_counts rejects a negative count", "[bad_input][routing]") {
  moet::Routing<float> r;
  r.reset(4, 3);
  r.counts()[0] = 1;
  r.counts()[2] = -2;
  CHECK_MOET_ERROR(r.commit_counts(), Contains("[moet::Routing::commit_counts]") &&
                                          Contains("counts must be >= 0, got -2 for token 2"));
  // After reset the plan is usable again.
  r.reset(2, 3);
  r.counts()[0] = 1;
  r.counts()[1] = 2;
  r.commit_counts();
  CHECK(r.num_assignments() == 3);
  CHECK(r.k(1) == 2);
}

TEST_CASE("ExpertMajor::build rejects expert ids outside the plan's experts",
          "[bad_input][routing]") {
  for (const std::int32_t bad : {std::int32_t{3}, std::int32_t{-1}, std::int32_t{1000000}}) {
    moet::Routing<float> r;
    r.reset(3, 3);
    for (auto& c : r.counts()) c = 1;
    r.commit_counts();
    r.experts(0)[0] = 0;
    r.experts(1)[0] = bad;
    r.experts(2)[0] = 2;
    moet::ExpertMajor view;
    CHECK_MOET_ERROR(view.build(r), Contains("[moet::ExpertMajor::build]") &&
                                        Contains("expert id " + std::to_string(bad)) &&
                                        Contains("outside [0, 3)"));
    // The same view then builds a valid plan correctly.
    r.experts(1)[0] = 2;
    view.build(r);
    CHECK(view.load(0) == 1);
    CHECK(view.load(1) == 0);
    CHECK(view.load(2) == 2);
    CHECK(view.tokens()[1] == 1);
    CHECK(view.tokens()[2] == 2);
  }
}

// ------------------------------------------------------------------------------------------
// A Routing reused after an exception gives what a fresh one gives.

TEST_CASE("A Routing reused after a failed route equals a fresh one", "[bad_input][gate]") {
  const RowMatrix<float> x1 = normal_matrix(70, 4, 51);  // larger first call: scratch grows
  const RowMatrix<float> x2 = normal_matrix(13, 4, 52);
  const RowMatrix<float> ones = RowMatrix<float>::Ones(9, 4);
  const auto imp1 = uniform_importance(70);
  auto imp2 = uniform_importance(13);
  for (std::size_t t = 0; t < imp2.size(); ++t) imp2[t] = static_cast<float>(t % 5);

  SECTION("TopKGate with capacity, failing inside the softmax") {
    moet::TopKGate<float> gate(
        {.model_dim = 4, .num_experts = 5, .k = 2, .capacity_factor = 0.5, .min_capacity = 1});
    moet::Routing<float> reused;
    gate.route(x1, {}, reused);
    const RowMatrix<float> w = gate.router();
    gate.set_router(RowMatrix<float>::Constant(4, 5, 3e38f), moet::WeightLayout::kInOut);
    CHECK_THROWS_AS(gate.route(ones, {}, reused), moet::Error);
    gate.set_router(w, moet::WeightLayout::kInOut);
    RowMatrix<float> x_nan = x2;
    x_nan(3, 3) = kNaN;
    CHECK_THROWS_AS(gate.route(x_nan, {}, reused), moet::Error);
    gate.route(x2, {}, reused);
    moet::Routing<float> fresh;
    gate.route(x2, {}, fresh);
    check_same_plan(reused, fresh);
    CHECK(fresh.dropped > 0);
  }
  SECTION("TopPGate, failing inside the softmax") {
    moet::TopPGate<float> gate({.model_dim = 4, .num_experts = 5, .p = 0.6});
    moet::Routing<float> reused;
    gate.route(x1, {}, reused);
    const RowMatrix<float> w = gate.router();
    gate.set_router(RowMatrix<float>::Constant(4, 5, -3e38f), moet::WeightLayout::kInOut);
    CHECK_THROWS_AS(gate.route(ones, {}, reused), moet::Error);
    gate.set_router(w, moet::WeightLayout::kInOut);
    gate.route(x2, {}, reused);
    moet::Routing<float> fresh;
    gate.route(x2, {}, fresh);
    check_same_plan(reused, fresh);
  }
  SECTION("ImportanceGate, failing on its context and inside the softmax") {
    moet::ImportanceGate<float> gate({.model_dim = 4, .num_experts = 5, .k_max = 3});
    moet::RouteContext ctx;
    ctx.importance = imp1;
    moet::Routing<float> reused;
    gate.route(x1, ctx, reused);
    CHECK_THROWS_AS(gate.route(x2, ctx, reused), moet::Error);  // importance has 70 entries
    ctx.importance = imp2;
    const RowMatrix<float> w = gate.router();
    gate.set_router(RowMatrix<float>::Constant(4, 5, 3e38f), moet::WeightLayout::kInOut);
    RowMatrix<float> big = RowMatrix<float>::Ones(13, 4);
    CHECK_THROWS_AS(gate.route(big, ctx, reused), moet::Error);
    gate.set_router(w, moet::WeightLayout::kInOut);
    gate.route(x2, ctx, reused);
    moet::Routing<float> fresh;
    gate.route(x2, ctx, fresh);
    check_same_plan(reused, fresh);
  }
  SECTION("TopAnyGate, failing after the plan was reset") {
    const moet::TopAnyGate<float> gate({.model_dim = 4, .num_experts = 6, .initial_experts = 5});
    moet::Routing<float> reused;
    gate.route(x1, {}, reused);
    RowMatrix<float> overflow = x2;
    overflow.row(7).setConstant(1e30f);
    CHECK_THROWS_AS(gate.route(overflow, {}, reused), moet::Error);
    gate.route(x2, {}, reused);
    moet::Routing<float> fresh;
    gate.route(x2, {}, fresh);
    check_same_plan(reused, fresh);
  }
  SECTION("StochasticGate, failing on its sequence length") {
    const moet::StochasticGate<float> gate(
        {.model_dim = 4, .num_experts = 5, .inference = moet::StochasticInference::kPosition});
    moet::RouteContext ctx;
    ctx.sequence_length = 7;
    moet::Routing<float> reused;
    gate.route(x1, ctx, reused);
    CHECK_THROWS_AS(gate.route(x2, ctx, reused), moet::Error);  // 13 % 7 != 0
    ctx.sequence_length = 13;
    gate.route(x2, ctx, reused);
    moet::Routing<float> fresh;
    gate.route(x2, ctx, fresh);
    check_same_plan(reused, fresh);
  }
}

}  // namespace test_bad_input
