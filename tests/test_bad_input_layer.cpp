// The bad-input catalogue, part 2: expert banks, dispatchers, add_dense_expert and MoELayer.
// Bad shapes, NaN/Inf, mismatched banks and plans, each checked for the exact documented
// moet::Error (operation in brackets, offending values); and the documented results of the
// degenerate cases (empty batch, one expert, one hot expert, idle experts, every assignment
// dropped, thresholds above 1, 4096 experts) against a naive oracle written here. Also checks
// that workspaces reused after an exception give bit-identical results to fresh ones, and the
// expert weights of issue 12 (transposed and NaN weights, writes without repacking, weights
// never set) through a layer. (test_expert_weights.cpp covers the weight API in detail.)
// Part 1 (test_bad_input.cpp) covers the gates and the routing plan.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/context.hpp"
#include "moet/dispatch/dense.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/dispatch/reference.hpp"
#include "moet/errors.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/importance.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/layer.hpp"
#include "moet/routing.hpp"
#include "moet/stats.hpp"
#include "moet/tensor.hpp"

#include "check_error.hpp"

namespace test_bad_input_layer {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;
using Ffn = moet::ReluFfnExperts<float>;
using TopK = moet::TopKGate<float>;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

RowMatrix<float> normal_matrix(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  RowMatrix<float> m(rows, cols);  // (rows, cols)
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
  return m;
}

// A bank with random (non-zero) biases so that the oracle checks them too.
Ffn make_ffn(Index model_dim, Index hidden_dim, Index num_experts, std::uint64_t seed) {
  Ffn bank({.model_dim = model_dim,
            .hidden_dim = hidden_dim,
            .num_experts = num_experts,
            .init_seed = seed});
  bank.edit().in_bias_stack() =
      0.1f * normal_matrix(num_experts, hidden_dim, static_cast<std::uint32_t>(seed) + 1000u);
  bank.edit().out_bias_stack() =
      0.1f * normal_matrix(num_experts, model_dim, static_cast<std::uint32_t>(seed) + 2000u);
  return bank;
}

// Oracle: ReLU FFN expert e on token t, relu(x W1 + b1) W2 + b2, in double.
Eigen::RowVectorXd naive_ffn(const Ffn& bank, Index e, const RowMatrix<float>& x, Index t) {
  const Index d = bank.model_dim();
  const Index f = bank.hidden_dim();
  const auto w1 = bank.in_weights(e);
  const auto w2 = bank.out_weights(e);
  const auto b1 = bank.in_bias(e);
  const auto b2 = bank.out_bias(e);
  Eigen::RowVectorXd h(f);
  for (Index j = 0; j < f; ++j) {
    double acc = static_cast<double>(b1(j));
    for (Index i = 0; i < d; ++i)
      acc += static_cast<double>(x(t, i)) * static_cast<double>(w1(i, j));
    h(j) = std::max(acc, 0.0);
  }
  Eigen::RowVectorXd y(d);
  for (Index c = 0; c < d; ++c) {
    double acc = static_cast<double>(b2(c));
    for (Index j = 0; j < f; ++j) acc += h(j) * static_cast<double>(w2(j, c));
    y(c) = acc;
  }
  return y;
}

// Oracle: y_t = sum over the plan's slots of w * expert(x_t), plus every shared expert.
Eigen::MatrixXd naive_layer(const Ffn& bank, const RowMatrix<float>& x,
                            const moet::Routing<float>& plan, const Ffn* shared = nullptr) {
  Eigen::MatrixXd y = Eigen::MatrixXd::Zero(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    for (std::size_t j = 0; j < plan.experts(t).size(); ++j) {
      y.row(t) +=
          static_cast<double>(plan.weights(t)[j]) * naive_ffn(bank, plan.experts(t)[j], x, t);
    }
    if (shared != nullptr) {
      for (Index s = 0; s < shared->num_experts(); ++s) y.row(t) += naive_ffn(*shared, s, x, t);
    }
  }
  return y;
}

// got ~ want elementwise: |got - want| <= rel * (|want| + rms(want)) + 1e-6.
void check_close(const RowMatrix<float>& got, const Eigen::MatrixXd& want, double rel = 1e-4) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const double rms =
      want.size() > 0 ? want.norm() / std::sqrt(static_cast<double>(want.size())) : 0.0;
  Index bad = 0;
  for (Index i = 0; i < want.rows(); ++i) {
    for (Index j = 0; j < want.cols(); ++j) {
      const double g = static_cast<double>(got(i, j));
      if (!(std::abs(g - want(i, j)) <= rel * (std::abs(want(i, j)) + rms) + 1e-6)) ++bad;
    }
  }
  CHECK(bad == 0);
}

bool bit_identical(const RowMatrix<float>& a, const RowMatrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}

void check_same_stats(const moet::RoutingStats& a, const moet::RoutingStats& b) {
  CHECK(a.num_tokens == b.num_tokens);
  CHECK(a.num_experts == b.num_experts);
  CHECK(a.num_assignments == b.num_assignments);
  CHECK(a.dropped == b.dropped);
  CHECK(a.load == b.load);
  CHECK(a.k_histogram == b.k_histogram);
  CHECK(a.mean_k == b.mean_k);
}

// Positive tokens (|N(0, 1)| + 0.1): with a router column of +10 that expert dominates every one.
RowMatrix<float> positive_tokens(Index rows, Index cols, std::uint32_t seed) {
  RowMatrix<float> x = normal_matrix(rows, cols, seed).cwiseAbs();
  x.array() += 0.1f;
  return x;
}

// A plan of `num_tokens` tokens over `num_experts` experts, token t -> expert t % num_experts.
moet::Routing<float> round_robin_plan(Index num_tokens, Index num_experts) {
  moet::Routing<float> plan;
  plan.reset(num_tokens, num_experts);
  for (auto& c : plan.counts()) c = 1;
  plan.commit_counts();
  for (Index t = 0; t < num_tokens; ++t) {
    plan.experts(t)[0] = static_cast<std::int32_t>(t % num_experts);
    plan.weights(t)[0] = 0.5f;
  }
  return plan;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Constructors.

TEST_CASE("Expert banks reject a zero or negative dimension", "[bad_input][experts]") {
  using Glu = moet::SwiGluExperts<float>;
  const Index bad[][3] = {{0, 8, 2}, {4, 0, 2}, {4, 8, 0}, {-1, 8, 2}, {4, -8, 2}, {4, 8, -2}};
  for (const auto& dims : bad) {
    const std::string got = "got (" + std::to_string(dims[0]) + ", " + std::to_string(dims[1]) +
                            ", " + std::to_string(dims[2]) + ")";
    CHECK_MOET_ERROR(Ffn({.model_dim = dims[0], .hidden_dim = dims[1], .num_experts = dims[2]}),
                     Contains("[moet::FfnExperts]") &&
                         Contains("model_dim, hidden_dim and num_experts must be >= 1") &&
                         Contains(got));
    CHECK_MOET_ERROR(Glu({.model_dim = dims[0], .hidden_dim = dims[1], .num_experts = dims[2]}),
                     Contains("[moet::GluExperts]") &&
                         Contains("model_dim, hidden_dim and num_experts must be >= 1") &&
                         Contains(got));
  }
}

// ------------------------------------------------------------------------------------------
// Expert weights (issue 12, defects 5 and 6): loading mistakes and writes without repacking.

TEST_CASE("A layer's experts reject PyTorch-layout weights passed as moet's: looks transposed",
          "[bad_input][experts][weights]") {
  moet::MoELayer layer(
      TopK({.model_dim = 4, .num_experts = 3, .k = 2}),
      moet::SwiGluExperts<float>({.model_dim = 4, .hidden_dim = 6, .num_experts = 3}));
  const RowMatrix<float> w1 = normal_matrix(6, 4, 1);  // HF Mixtral experts.1.w1.weight [f, d]
  CHECK_MOET_ERROR(layer.experts().set_gate_weights(1, w1, moet::WeightLayout::kInOut),
                   Contains("[moet::GluExperts] set_gate_weights: expert 1's gate weights must be "
                            "(model_dim, hidden_dim) = (4, 6)") &&
                       Contains("got (6, 4): looks transposed") && Contains("kOutIn"));
  layer.experts().set_gate_weights(1, w1, moet::WeightLayout::kOutIn);
  CHECK(layer.experts().gate_weights(1) == w1.transpose());
  moet::FfnExperts<float> ffn({.model_dim = 4, .hidden_dim = 6, .num_experts = 2});
  CHECK_MOET_ERROR(ffn.set_out_weights(0, normal_matrix(4, 6, 2), moet::WeightLayout::kInOut),
                   Contains("[moet::FfnExperts] set_out_weights: expert 0's second-layer weights "
                            "must be (hidden_dim, model_dim) = (6, 4)") &&
                       Contains("looks transposed"));
}

TEST_CASE("Expert banks reject NaN and Inf weights when they are set, edited or repacked",
          "[bad_input][experts][weights]") {
  moet::SwiGluExperts<float> bank({.model_dim = 4, .hidden_dim = 6, .num_experts = 2});
  RowMatrix<float> w = normal_matrix(4, 6, 3);
  w(2, 5) = kNaN;
  CHECK_MOET_ERROR(bank.set_up_weights(0, w, moet::WeightLayout::kInOut),
                   Contains("[moet::GluExperts] set_up_weights: expert 0's up weights must be "
                            "finite, got nan at row 2, column 5"));
  auto edit = bank.edit();
  edit.up_weights(1)(0, 0) = kInf;
  // (Once: commit() ends the edit whether or not it throws.)
  CHECK_THROWS_WITH(edit.commit(), Contains("[moet::GluExperts] edit() end: expert 1's up weights "
                                            "must be finite, got inf at row 0, column 0"));
  CHECK_MOET_ERROR(bank.parameters_changed(),
                   Contains("[moet::GluExperts] parameters_changed: expert 1's up weights must "
                            "be finite, got inf at row 0, column 0"));
  const RowMatrix<float> x = normal_matrix(3, 4, 4);
  moet::SwiGluExperts<float>::Scratch scratch;
  RowMatrix<float> y(3, 4);
  CHECK_MOET_ERROR(bank.forward(0, x, y, scratch),
                   Contains("[moet::GluExperts] forward: expert 1's up weights must be finite"));
}

TEMPLATE_TEST_CASE("A layer whose experts were written without repacking refuses to run",
                   "[bad_input][layer][weights]", moet::GroupedDispatch, moet::ReferenceDispatch) {
  // Issue 12, defect 5: a write the packed copy had not seen used to make every later forward
  // 1.8-2.4x slower (the Eigen fallback) until parameters_changed(). Now the only writers
  // outside the setters are edit(), which repacks when it ends, and visit_parameters(), after
  // which forward is a moet::Error until parameters_changed() (the optimisers call it).
  moet::MoELayer<TopK, moet::SwiGluExperts<float>, TestType> layer(
      TopK({.model_dim = 4, .num_experts = 3, .k = 2}),
      moet::SwiGluExperts<float>({.model_dim = 4, .hidden_dim = 6, .num_experts = 3}),
      moet::SwiGluExperts<float>({.model_dim = 4, .hidden_dim = 6, .num_experts = 1}));
  const RowMatrix<float> x = normal_matrix(20, 4, 5);
  const RowMatrix<float> y0 = layer.forward(x);
  layer.experts().edit().down_weights(2) *= 2.0f;  // repacked at the end of the statement
  CHECK(layer.experts().uses_packed_kernels());
  CHECK(layer.forward(x) != y0);
  layer.visit_parameters(
      [](std::string_view name, moet::ParamMap<float> value, moet::ParamMap<float>) {
        if (name == "shared.gate") value *= 0.5f;
      });
  CHECK_MOET_ERROR(layer.forward(x), Contains("[moet::GluExperts] forward: the packed weights are "
                                              "stale") &&
                                         Contains("call parameters_changed()"));
  layer.parameters_changed();
  CHECK(layer.experts().uses_packed_kernels());
  CHECK(layer.shared_experts().uses_packed_kernels());
  CHECK(layer.forward(x).allFinite());
}

TEST_CASE("GroupedDispatch rejects block_rows below 1", "[bad_input][dispatch]") {
  CHECK_MOET_ERROR(moet::GroupedDispatch({.block_rows = 0}),
                   Contains("[moet::GroupedDispatch] block_rows must be >= 1, got 0"));
  CHECK_MOET_ERROR(moet::GroupedDispatch({.block_rows = -4}),
                   Contains("[moet::GroupedDispatch]") && Contains("got -4"));
}

TEST_CASE("MoELayer's constructor rejects a gate and experts with different num_experts",
          "[bad_input][layer]") {
  CHECK_MOET_ERROR(moet::MoELayer(TopK({.model_dim = 4, .num_experts = 4}), make_ffn(4, 6, 3, 1)),
                   Contains("[moet::MoELayer]") &&
                       Contains("the gate routes to 4 experts but the expert bank has 3"));
  // TopAnyGate routes to all num_experts slots, not to its initially active ones.
  CHECK_MOET_ERROR(moet::MoELayer(moet::TopAnyGate<float>(
                                      {.model_dim = 4, .num_experts = 6, .initial_experts = 4}),
                                  make_ffn(4, 6, 4, 1)),
                   Contains("[moet::MoELayer]") &&
                       Contains("the gate routes to 6 experts but the expert bank has 4"));
}

TEST_CASE("MoELayer's constructor rejects a model_dim mismatch, shared experts included",
          "[bad_input][layer]") {
  CHECK_MOET_ERROR(
      moet::MoELayer(TopK({.model_dim = 4, .num_experts = 3}), make_ffn(5, 6, 3, 1)),
      Contains("[moet::MoELayer]") && Contains("the gate's model_dim is 4 but the experts' is 5"));
  CHECK_MOET_ERROR(moet::MoELayer(TopK({.model_dim = 4, .num_experts = 3}), make_ffn(4, 6, 3, 1),
                                  make_ffn(5, 6, 1, 2)),
                   Contains("[moet::MoELayer]") &&
                       Contains("the shared experts' model_dim is 5 but the routed experts' is 4"));
}

TEST_CASE("MoELayer::shared_experts throws on a layer without shared experts",
          "[bad_input][layer]") {
  moet::MoELayer layer(TopK({.model_dim = 4, .num_experts = 3}), make_ffn(4, 6, 3, 1));
  const auto& const_layer = layer;
  CHECK_FALSE(layer.has_shared_experts());
  CHECK_MOET_ERROR(layer.shared_experts(),
                   Contains("[moet::MoELayer] this layer has no shared experts"));
  CHECK_MOET_ERROR(const_layer.shared_experts(),
                   Contains("[moet::MoELayer] this layer has no shared experts"));
}

// ------------------------------------------------------------------------------------------
// MoELayer::forward input checks.

TEMPLATE_TEST_CASE("MoELayer::forward rejects x of the wrong width", "[bad_input][layer]",
                   moet::GroupedDispatch, moet::ReferenceDispatch) {
  moet::MoELayer<TopK, Ffn, TestType> layer(TopK({.model_dim = 4, .num_experts = 3, .k = 2}),
                                            make_ffn(4, 6, 3, 1));
  typename decltype(layer)::Workspace ws;
  for (const Index cols : {Index{3}, Index{5}}) {
    const RowMatrix<float> x = normal_matrix(6, cols, 1);
    RowMatrix<float> y(6, cols);
    CHECK_MOET_ERROR(layer.forward(x, y, {}, ws),
                     Contains("[moet::MoELayer]") &&
                         Contains("x must have model_dim = 4 columns") &&
                         Contains("got (6, " + std::to_string(cols) + ")"));
    CHECK_MOET_ERROR(layer.forward(x), Contains("[moet::MoELayer]") &&
                                           Contains("got (6, " + std::to_string(cols) + ")"));
  }
}

TEMPLATE_TEST_CASE("MoELayer::forward rejects y of the wrong shape or overlapping x",
                   "[bad_input][layer]", moet::GroupedDispatch, moet::ReferenceDispatch) {
  moet::MoELayer<TopK, Ffn, TestType> layer(TopK({.model_dim = 4, .num_experts = 3, .k = 2}),
                                            make_ffn(4, 6, 3, 1));
  typename decltype(layer)::Workspace ws;
  const RowMatrix<float> x = normal_matrix(6, 4, 1);
  RowMatrix<float> y_rows = RowMatrix<float>::Constant(5, 4, 7.0f);
  CHECK_MOET_ERROR(
      layer.forward(x, y_rows, {}, ws),
      Contains("[moet::MoELayer]") && Contains("y must have x's shape (6, 4), got (5, 4)"));
  RowMatrix<float> y_cols = RowMatrix<float>::Constant(6, 5, 7.0f);
  CHECK_MOET_ERROR(layer.forward(x, y_cols, {}, ws),
                   Contains("[moet::MoELayer]") && Contains("got (6, 5)"));
  CHECK((y_rows.array() == 7.0f).all());  // nothing written on failure
  // y = x, and y sharing two rows with x.
  RowMatrix<float> buffer = normal_matrix(6, 4, 2);
  CHECK_MOET_ERROR(layer.forward(buffer, buffer, {}, ws),
                   Contains("[moet::MoELayer] y must not overlap x"));
  CHECK_MOET_ERROR(layer.forward(buffer.topRows(4), buffer.bottomRows(4), {}, ws),
                   Contains("[moet::MoELayer] y must not overlap x"));
  CHECK(buffer == normal_matrix(6, 4, 2));
}

TEMPLATE_TEST_CASE("MoELayer::forward rejects NaN and +/-Inf in x before routing",
                   "[bad_input][layer]", moet::GroupedDispatch, moet::ReferenceDispatch) {
  moet::MoELayer<TopK, Ffn, TestType> top_k(TopK({.model_dim = 4, .num_experts = 3, .k = 2}),
                                            make_ffn(4, 6, 3, 1));
  moet::MoELayer<moet::StochasticGate<float>, Ffn, TestType> stochastic(
      moet::StochasticGate<float>({.model_dim = 4, .num_experts = 3}), make_ffn(4, 6, 3, 1));
  moet::MoELayer<moet::TopAnyGate<float>, Ffn, TestType> top_any(
      moet::TopAnyGate<float>({.model_dim = 4, .num_experts = 3}), make_ffn(4, 6, 3, 1));
  for (const float bad : {kNaN, kInf, -kInf}) {
    RowMatrix<float> x = normal_matrix(6, 4, 3);
    x(4, 0) = bad;
    RowMatrix<float> y = RowMatrix<float>::Constant(6, 4, 7.0f);
    // The layer's own check runs first, so the message names MoELayer for every gate.
#define CHECK_LAYER_REJECTS_X(call)                      \
  CHECK_MOET_ERROR(call, Contains("[moet::MoELayer]") && \
                             Contains("x (6, 4) must be finite, found a NaN or Inf"))
    typename decltype(top_k)::Workspace ws1;
    CHECK_LAYER_REJECTS_X(top_k.forward(x, y, {}, ws1));
    typename decltype(stochastic)::Workspace ws2;
    CHECK_LAYER_REJECTS_X(stochastic.forward(x, y, {}, ws2));
    typename decltype(top_any)::Workspace ws3;
    CHECK_LAYER_REJECTS_X(top_any.forward(x, y, {}, ws3));
    CHECK_LAYER_REJECTS_X(top_k.forward(x));
#undef CHECK_LAYER_REJECTS_X
    CHECK((y.array() == 7.0f).all());
  }
}

TEST_CASE("MoELayer passes the gate's own errors through unchanged", "[bad_input][layer]") {
  const RowMatrix<float> x = normal_matrix(6, 4, 4);
  moet::MoELayer importance(
      moet::ImportanceGate<float>({.model_dim = 4, .num_experts = 3, .k_max = 2}),
      make_ffn(4, 6, 3, 1));
  CHECK_MOET_ERROR(importance.forward(x),
                   Contains("[moet::ImportanceGate] needs ctx.importance or ctx.attention"));
  moet::MoELayer stochastic(moet::StochasticGate<float>({.model_dim = 4, .num_experts = 3}),
                            make_ffn(4, 6, 3, 1));
  moet::RouteContext ctx;
  ctx.sequence_length = 4;
  CHECK_MOET_ERROR(stochastic.forward(x, ctx), Contains("[moet::StochasticGate]") &&
                                                   Contains("got 6 tokens and sequence_length 4"));
  // Finite x, non-finite logits from huge router weights.
  moet::MoELayer top_k(TopK({.model_dim = 4, .num_experts = 3}), make_ffn(4, 6, 3, 1));
  top_k.gate().set_router(RowMatrix<float>::Constant(4, 3, 3e38f), moet::WeightLayout::kInOut);
  CHECK_MOET_ERROR(top_k.forward(RowMatrix<float>::Ones(6, 4)),
                   Contains("[moet::TopKGate]") && Contains("router logits must be finite"));
}

// ------------------------------------------------------------------------------------------
// MoELayer: documented results of the degenerate cases.

TEMPLATE_TEST_CASE("MoELayer on an empty batch writes nothing and reports empty statistics",
                   "[bad_input][layer]", moet::GroupedDispatch, moet::ReferenceDispatch) {
  moet::MoELayer<TopK, Ffn, TestType> layer(
      TopK({.model_dim = 4, .num_experts = 3, .k = 2, .capacity_factor = 1.0}),
      make_ffn(4, 6, 3, 1), make_ffn(4, 6, 2, 2));
  typename decltype(layer)::Workspace ws;
  const RowMatrix<float> x(0, 4);  // (0, model_dim)
  RowMatrix<float> y(0, 4);
  const moet::RoutingStats stats = layer.forward(x, y, {}, ws);
  CHECK(stats.num_tokens == 0);
  CHECK(stats.num_experts == 3);
  CHECK(stats.num_assignments == 0);
  CHECK(stats.dropped == 0);
  CHECK(stats.mean_k == 0.0);
  CHECK(stats.load == std::vector<Index>(3, 0));
  CHECK(stats.k_histogram == std::vector<Index>(4, 0));
  CHECK(stats.max_mean_load_ratio == 0.0);
  CHECK(ws.routing.num_tokens() == 0);
  const RowMatrix<float> y2 = layer.forward(x);
  CHECK(y2.rows() == 0);
  CHECK(y2.cols() == 4);
  CHECK(layer.stats().num_tokens == 0);
}

TEST_CASE("MoELayer with one expert outputs that expert with weight 1", "[bad_input][layer]") {
  const RowMatrix<float> x = normal_matrix(40, 5, 5);
  const Ffn bank = make_ffn(5, 7, 1, 3);
  moet::MoELayer top_k(TopK({.model_dim = 5, .num_experts = 1}), bank);
  moet::MoELayer ensemble(
      moet::StochasticGate<float>(
          {.model_dim = 5, .num_experts = 1, .inference = moet::StochasticInference::kEnsemble}),
      bank);
  moet::Routing<float> all_to_zero = round_robin_plan(40, 1);
  for (Index t = 0; t < 40; ++t) all_to_zero.weights(t)[0] = 1.0f;
  const Eigen::MatrixXd expected = naive_layer(bank, x, all_to_zero);
  check_close(top_k.forward(x), expected);
  check_close(ensemble.forward(x), expected);
  CHECK(top_k.stats().load == std::vector<Index>{40});
  CHECK(ensemble.stats().load == std::vector<Index>{40});
}

TEST_CASE("MoELayer with every token on one expert equals ReferenceDispatch and the oracle",
          "[bad_input][layer]") {
  const Index block_rows = GENERATE(Index{7}, Index{128});
  const Index num_tokens = 300;
  TopK gate({.model_dim = 6, .num_experts = 5, .k = 1});
  RowMatrix<float> w = RowMatrix<float>::Zero(6, 5);
  w.col(3).setConstant(10.0f);  // logit_3 = 10 * sum(x) >= 6, the others 0
  gate.set_router(w, moet::WeightLayout::kInOut);
  const Ffn bank = make_ffn(6, 9, 5, 4);
  const moet::MoELayer grouped(gate, bank, moet::GroupedDispatch({.block_rows = block_rows}));
  const moet::MoELayer reference(gate, bank, moet::ReferenceDispatch{});
  const RowMatrix<float> x = positive_tokens(num_tokens, 6, 6);

  decltype(grouped)::Workspace ws;
  RowMatrix<float> y(num_tokens, 6);
  const moet::RoutingStats stats = grouped.forward(x, y, {}, ws);
  // The plan: expert 3 for every token, weight P_3 = 1 / (1 + 4 exp(-z_3)).
  for (Index t = 0; t < num_tokens; ++t) {
    REQUIRE(ws.routing.k(t) == 1);
    CHECK(ws.routing.experts(t)[0] == 3);
    const double z3 = 10.0 * static_cast<double>(x.row(t).cast<double>().sum());
    CHECK(ws.routing.weights(t)[0] == Approx(1.0 / (1.0 + 4.0 * std::exp(-z3))).epsilon(1e-6));
  }
  CHECK(stats.load == std::vector<Index>{0, 0, 0, num_tokens, 0});
  CHECK(stats.max_mean_load_ratio == Approx(5.0));
  check_close(y, naive_layer(bank, x, ws.routing));

  decltype(reference)::Workspace ref_ws;
  RowMatrix<float> y_ref(num_tokens, 6);
  reference.forward(x, y_ref, {}, ref_ws);
  check_close(y, y_ref.cast<double>(), 1e-5);
}

TEMPLATE_TEST_CASE(
    "An expert with no tokens is never run: weights there that overflow do not reach y",
    "[bad_input][layer]", moet::GroupedDispatch, moet::ReferenceDispatch) {
  // (NaN weights cannot get into a bank any more: see "Expert banks reject NaN and Inf".)
  TopK gate({.model_dim = 6, .num_experts = 4, .k = 2, .renormalize = true});
  RowMatrix<float> w = gate.router();
  w.col(2).setConstant(-10.0f);  // logit_2 <= -6 on positive tokens: never top-2
  gate.set_router(w, moet::WeightLayout::kInOut);
  Ffn bank = make_ffn(6, 8, 4, 5);
  bank.set_in_weights(2, RowMatrix<float>::Constant(6, 8, 3e38f), moet::WeightLayout::kInOut);
  bank.set_out_weights(2, RowMatrix<float>::Constant(8, 6, 3e38f), moet::WeightLayout::kInOut);
  bank.set_out_bias(2, RowMatrix<float>::Constant(1, 6, -3e38f));
  moet::MoELayer<TopK, Ffn, TestType> layer(gate, bank);
  const RowMatrix<float> x = positive_tokens(150, 6, 7);
  const RowMatrix<float> y = layer.forward(x);
  CHECK(y.allFinite());
  CHECK(layer.stats().load[2] == 0);
  moet::Routing<float> plan;
  layer.gate().route(x, {}, plan);
  check_close(y, naive_layer(layer.experts(), x, plan));
}

TEMPLATE_TEST_CASE("Every assignment dropped by capacity gives y = 0, or only the shared experts",
                   "[bad_input][layer][capacity]", moet::GroupedDispatch, moet::ReferenceDispatch) {
  // capacity_factor * k = 2e-46 rounds to 0 in fp32 and min_capacity is 0: C = 0.
  const TopK gate(
      {.model_dim = 5, .num_experts = 3, .k = 2, .capacity_factor = 1e-46, .min_capacity = 0});
  const RowMatrix<float> x = normal_matrix(33, 5, 8);
  moet::MoELayer<TopK, Ffn, TestType> routed_only(gate, make_ffn(5, 6, 3, 6));
  const RowMatrix<float> y = routed_only.forward(x);
  CHECK(y.isZero(0.0f));
  CHECK(routed_only.stats().dropped == 66);
  CHECK(routed_only.stats().num_assignments == 0);
  CHECK(routed_only.stats().k_histogram[0] == 33);

  const Ffn shared = make_ffn(5, 6, 2, 7);
  moet::MoELayer<TopK, Ffn, TestType> with_shared(gate, make_ffn(5, 6, 3, 6), shared);
  moet::Routing<float> empty_plan;
  empty_plan.reset(33, 3);
  empty_plan.commit_counts();
  check_close(with_shared.forward(x), naive_layer(shared, x, empty_plan, &shared));
}

TEST_CASE(
    "MoELayer with TopAnyGate thresholds above 1: training gives y = 0, eval the top-1 "
    "expert",
    "[bad_input][layer][top_any]") {
  moet::MoELayer layer(moet::TopAnyGate<float>({.model_dim = 6, .num_experts = 4}),
                       make_ffn(6, 8, 4, 8));
  layer.gate().set_thresholds(moet::Vector<float>::Constant(4, 1.5f));
  const RowMatrix<float> x = normal_matrix(70, 6, 9);
  moet::RouteContext train;
  train.training = true;
  CHECK(layer.forward(x, train).isZero(0.0f));
  CHECK(layer.stats().num_assignments == 0);

  const RowMatrix<float> y = layer.forward(x);
  // Oracle plan: argmax of the cosine with the gate embeddings, weight 1.
  moet::Routing<float> plan;
  plan.reset(70, 4);
  for (auto& c : plan.counts()) c = 1;
  plan.commit_counts();
  const RowMatrix<float>& w = layer.gate().gate_embeddings();
  for (Index t = 0; t < 70; ++t) {
    std::int32_t best = 0;
    double best_cos = -2.0;
    for (Index e = 0; e < 4; ++e) {
      const double cos = x.row(t).cast<double>().dot(w.col(e).cast<double>()) /
                         (x.row(t).cast<double>().norm() * w.col(e).cast<double>().norm());
      if (cos > best_cos) {
        best_cos = cos;
        best = static_cast<std::int32_t>(e);
      }
    }
    plan.experts(t)[0] = best;
    plan.weights(t)[0] = 1.0f;
  }
  check_close(y, naive_layer(layer.experts(), x, plan));
}

TEST_CASE("MoELayer with 4096 experts and model_dim 2 matches the oracle",
          "[bad_input][layer][large]") {
  const TopK gate(
      {.model_dim = 2, .num_experts = 4096, .k = 2, .renormalize = true, .init_seed = 3});
  const Ffn bank = make_ffn(2, 3, 4096, 9);
  const moet::MoELayer grouped(gate, bank);
  const moet::MoELayer reference(gate, bank, moet::ReferenceDispatch{});
  const RowMatrix<float> x = normal_matrix(64, 2, 10);
  decltype(grouped)::Workspace ws;
  RowMatrix<float> y(64, 2);
  const moet::RoutingStats stats = grouped.forward(x, y, {}, ws);
  CHECK(stats.num_experts == 4096);
  CHECK(stats.num_assignments == 128);
  for (Index t = 0; t < 64; ++t) {
    REQUIRE(ws.routing.k(t) == 2);
    // Each chosen expert's logit is within rounding of the best two (fp32 near-ties may swap).
    std::vector<double> z(4096);
    for (Index e = 0; e < 4096; ++e) {
      z[static_cast<std::size_t>(e)] =
          static_cast<double>(x(t, 0)) * static_cast<double>(gate.router()(0, e)) +
          static_cast<double>(x(t, 1)) * static_cast<double>(gate.router()(1, e));
    }
    std::vector<double> sorted = z;
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    for (std::size_t j = 0; j < 2; ++j) {
      CHECK(z[static_cast<std::size_t>(ws.routing.experts(t)[j])] ==
            Approx(sorted[j]).margin(1e-5));
    }
  }
  check_close(y, naive_layer(bank, x, ws.routing));
  decltype(reference)::Workspace ref_ws;
  RowMatrix<float> y_ref(64, 2);
  reference.forward(x, y_ref, {}, ref_ws);
  check_close(y, y_ref.cast<double>(), 1e-5);
}

// ------------------------------------------------------------------------------------------
// Dispatchers and add_dense_expert.

TEMPLATE_TEST_CASE("Dispatchers reject a plan, x or y that disagree with each other or the bank",
                   "[bad_input][dispatch]", moet::GroupedDispatch, moet::ReferenceDispatch) {
  const std::string tag = std::is_same_v<TestType, moet::GroupedDispatch>
                              ? "[moet::GroupedDispatch]"
                              : "[moet::ReferenceDispatch]";
  const TestType dispatch{};
  const Ffn bank = make_ffn(4, 6, 4, 11);
  typename TestType::template Workspace<Ffn> ws;
  const RowMatrix<float> x = normal_matrix(6, 4, 12);
  RowMatrix<float> y = RowMatrix<float>::Constant(6, 4, 7.0f);

  SECTION("a plan over a different number of tokens") {
    for (const Index tokens : {Index{0}, Index{5}, Index{7}}) {
      const moet::Routing<float> plan = round_robin_plan(tokens, 4);
      CHECK_MOET_ERROR(dispatch.run(bank, x, plan, y, ws),
                       Contains(tag) && Contains("the routing plan has " + std::to_string(tokens) +
                                                 " tokens but x has 6 rows"));
    }
  }
  SECTION("a plan over a different number of experts") {
    const moet::Routing<float> plan = round_robin_plan(6, 3);
    CHECK_MOET_ERROR(
        dispatch.run(bank, x, plan, y, ws),
        Contains(tag) && Contains("the routing plan has 3 experts but the expert bank has 4"));
  }
  SECTION("an expert id outside the bank") {
    for (const std::int32_t bad : {std::int32_t{4}, std::int32_t{-1}}) {
      moet::Routing<float> plan = round_robin_plan(6, 4);
      plan.experts(2)[0] = bad;
      CHECK_MOET_ERROR(dispatch.run(bank, x, plan, y, ws),
                       Contains(tag) && Contains("expert id " + std::to_string(bad) +
                                                 " at assignment 2 is outside [0, 4)"));
    }
  }
  SECTION("x of the wrong width") {
    const RowMatrix<float> x3 = normal_matrix(6, 3, 13);
    RowMatrix<float> y3(6, 3);
    CHECK_MOET_ERROR(dispatch.run(bank, x3, round_robin_plan(6, 4), y3, ws),
                     Contains(tag) && Contains("x must have model_dim = 4 columns, got (6, 3)"));
  }
  SECTION("y of the wrong shape, or overlapping x") {
    RowMatrix<float> y5(5, 4);
    CHECK_MOET_ERROR(dispatch.run(bank, x, round_robin_plan(6, 4), y5, ws),
                     Contains(tag) && Contains("y must have x's shape (6, 4), got (5, 4)"));
    RowMatrix<float> buffer = normal_matrix(6, 4, 14);
    CHECK_MOET_ERROR(dispatch.run(bank, buffer, round_robin_plan(6, 4), buffer, ws),
                     Contains(tag) && Contains("y must not overlap x"));
  }
  CHECK((y.array() == 7.0f).all());  // nothing written on failure
}

TEMPLATE_TEST_CASE("Dispatchers on an empty plan and empty x write nothing",
                   "[bad_input][dispatch]", moet::GroupedDispatch, moet::ReferenceDispatch) {
  const Ffn bank = make_ffn(4, 6, 4, 15);
  typename TestType::template Workspace<Ffn> ws;
  const RowMatrix<float> x(0, 4);
  RowMatrix<float> y(0, 4);
  moet::Routing<float> plan;
  plan.reset(0, 4);
  plan.commit_counts();
  CHECK_NOTHROW(TestType{}.run(bank, x, plan, y, ws));
  // Tokens routed nowhere get y = 0 (every row written).
  const RowMatrix<float> x2 = normal_matrix(5, 4, 16);
  RowMatrix<float> y2 = RowMatrix<float>::Constant(5, 4, 7.0f);
  moet::Routing<float> nowhere;
  nowhere.reset(5, 4);
  nowhere.commit_counts();
  TestType{}.run(bank, x2, nowhere, y2, ws);
  CHECK(y2.isZero(0.0f));
}

TEST_CASE("add_dense_expert rejects an out-of-range expert and bad shapes",
          "[bad_input][dispatch]") {
  const Ffn bank = make_ffn(4, 6, 2, 17);
  moet::DenseWorkspace<Ffn> ws;
  const RowMatrix<float> x = normal_matrix(6, 4, 18);
  RowMatrix<float> y = RowMatrix<float>::Constant(6, 4, 7.0f);
  for (const Index e : {Index{2}, Index{-1}}) {
    CHECK_MOET_ERROR(
        moet::add_dense_expert(bank, e, 1.0f, x, y, ws),
        Contains("[moet::add_dense_expert] expert id " + std::to_string(e) + " is outside [0, 2)"));
  }
  const RowMatrix<float> x5 = normal_matrix(6, 5, 19);
  RowMatrix<float> y5(6, 5);
  CHECK_MOET_ERROR(moet::add_dense_expert(bank, 0, 1.0f, x5, y5, ws),
                   Contains("[moet::add_dense_expert]") && Contains("got (6, 5)"));
  RowMatrix<float> y_short(4, 4);
  CHECK_MOET_ERROR(
      moet::add_dense_expert(bank, 0, 1.0f, x, y_short, ws),
      Contains("[moet::add_dense_expert]") && Contains("y must have x's shape (6, 4), got (4, 4)"));
  RowMatrix<float> buffer = normal_matrix(6, 4, 20);
  CHECK_MOET_ERROR(moet::add_dense_expert(bank, 0, 1.0f, buffer, buffer, ws),
                   Contains("[moet::add_dense_expert] y must not overlap x"));
  CHECK((y.array() == 7.0f).all());
  // The workspace still works, and adds exactly weight * expert(x).
  moet::add_dense_expert(bank, 1, 0.5f, x, y, ws);
  moet::Routing<float> plan = round_robin_plan(6, 2);
  for (Index t = 0; t < 6; ++t) plan.experts(t)[0] = 1;
  check_close(y, naive_layer(bank, x, plan) + Eigen::MatrixXd::Constant(6, 4, 7.0));
}

// ------------------------------------------------------------------------------------------
// Workspaces reused after an exception.

TEMPLATE_TEST_CASE(
    "A layer workspace reused after exceptions gives bit-identical results to a "
    "fresh one",
    "[bad_input][layer]", moet::GroupedDispatch, moet::ReferenceDispatch) {
  using Layer = moet::MoELayer<TopK, Ffn, TestType>;
  Layer layer(TopK({.model_dim = 8,
                    .num_experts = 6,
                    .k = 2,
                    .renormalize = true,
                    .capacity_factor = 0.5,
                    .min_capacity = 2}),
              make_ffn(8, 12, 6, 21), make_ffn(8, 12, 1, 22));
  const RowMatrix<float> x1 = normal_matrix(150, 8, 23);
  const RowMatrix<float> x2 = normal_matrix(37, 8, 24);
  typename Layer::Workspace reused;
  RowMatrix<float> y1(150, 8);
  layer.forward(x1, y1, {}, reused);

  // Failures before routing, inside the gate (after it reset the plan), and on y.
  RowMatrix<float> x_nan = x2;
  x_nan(10, 3) = kNaN;
  RowMatrix<float> y2(37, 8);
  CHECK_THROWS_AS(layer.forward(x_nan, y2, {}, reused), moet::Error);
  RowMatrix<float> y_bad(36, 8);
  CHECK_THROWS_AS(layer.forward(x2, y_bad, {}, reused), moet::Error);
  const RowMatrix<float> router = layer.gate().router();
  layer.gate().set_router(RowMatrix<float>::Constant(router.rows(), router.cols(), 3e38f),
                          moet::WeightLayout::kInOut);
  RowMatrix<float> ones = RowMatrix<float>::Ones(90, 8);
  RowMatrix<float> y_ones(90, 8);
  CHECK_THROWS_AS(layer.forward(ones, y_ones, {}, reused), moet::Error);
  layer.gate().set_router(router, moet::WeightLayout::kInOut);

  const moet::RoutingStats reused_stats = layer.forward(x2, y2, {}, reused);
  typename Layer::Workspace fresh;
  RowMatrix<float> y_fresh(37, 8);
  const moet::RoutingStats fresh_stats = layer.forward(x2, y_fresh, {}, fresh);
  CHECK(bit_identical(y2, y_fresh));
  check_same_stats(reused_stats, fresh_stats);
  CHECK(fresh_stats.dropped > 0);  // 74 assignments, 6 experts of ceil(37 / 6 * 0.5 * 2) = 7
  check_close(y2, naive_layer(layer.experts(), x2, fresh.routing, &layer.shared_experts()));

  // The convenience overload's internal workspace too.
  CHECK_THROWS_AS(layer.forward(x_nan), moet::Error);
  const RowMatrix<float> y_conv = layer.forward(x2);
  CHECK(bit_identical(y_conv, y_fresh));
  check_same_stats(layer.stats(), fresh_stats);
}

TEST_CASE("An ImportanceGate layer workspace reused after context errors equals a fresh one",
          "[bad_input][layer][importance]") {
  moet::MoELayer layer(moet::ImportanceGate<float>({.model_dim = 6, .num_experts = 5, .k_max = 3}),
                       make_ffn(6, 8, 5, 25));
  const RowMatrix<float> x = normal_matrix(20, 6, 26);
  std::vector<float> importance(20);
  for (std::size_t t = 0; t < importance.size(); ++t) importance[t] = static_cast<float>(t % 7);
  decltype(layer)::Workspace reused;
  RowMatrix<float> y(20, 6);
  moet::RouteContext ctx;
  CHECK_THROWS_AS(layer.forward(x, y, ctx, reused), moet::Error);  // no importance
  std::vector<float> nan_importance = importance;
  nan_importance[5] = kNaN;
  ctx.importance = nan_importance;
  CHECK_THROWS_AS(layer.forward(x, y, ctx, reused), moet::Error);
  ctx.importance = importance;
  layer.forward(x, y, ctx, reused);
  decltype(layer)::Workspace fresh;
  RowMatrix<float> y_fresh(20, 6);
  layer.forward(x, y_fresh, ctx, fresh);
  CHECK(bit_identical(y, y_fresh));
  check_close(y, naive_layer(layer.experts(), x, fresh.routing));
}

TEMPLATE_TEST_CASE("A dispatch workspace reused after an exception equals a fresh one",
                   "[bad_input][dispatch]", moet::GroupedDispatch, moet::ReferenceDispatch) {
  const Ffn bank = make_ffn(4, 6, 4, 27);
  const TestType dispatch{};
  typename TestType::template Workspace<Ffn> reused;
  const RowMatrix<float> x1 = normal_matrix(200, 4, 28);
  RowMatrix<float> y1(200, 4);
  dispatch.run(bank, x1, round_robin_plan(200, 4), y1, reused);
  const RowMatrix<float> x2 = normal_matrix(9, 4, 29);
  moet::Routing<float> bad = round_robin_plan(9, 4);
  bad.experts(8)[0] = 9;
  RowMatrix<float> y2(9, 4);
  CHECK_THROWS_AS(dispatch.run(bank, x2, bad, y2, reused), moet::Error);
  CHECK_THROWS_AS(dispatch.run(bank, x2, round_robin_plan(8, 4), y2, reused), moet::Error);
  const moet::Routing<float> plan = round_robin_plan(9, 4);
  dispatch.run(bank, x2, plan, y2, reused);
  typename TestType::template Workspace<Ffn> fresh;
  RowMatrix<float> y_fresh(9, 4);
  dispatch.run(bank, x2, plan, y_fresh, fresh);
  CHECK(bit_identical(y2, y_fresh));
  check_close(y2, naive_layer(bank, x2, plan));
}

}  // namespace test_bad_input_layer
