// The bad-input catalogue, part 3: the edge cases parts 1 and 2 leave out, each against its
// documented outcome (the headers' comments) with an oracle written here: capacity_factor 0 is
// dropless even when every token wants one expert; exact ties go to the lower id (all-zero
// routers, denormal tokens); top-p's documented counts for a uniform P (strict, inclusive,
// p = 1, and E = 4096); ImportanceGate with every token a pad, k_min = k_max, constant and
// all-zero importance, an attention view with no data, no heads or no sequences, and E = 4096;
// StochasticGate's documented modes at their degenerate sizes; and MoELayer on denormal input.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/context.hpp"
#include "moet/errors.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/importance.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/layer.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

#include "check_error.hpp"

namespace test_bad_input_edges {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;

RowMatrix<float> normal_matrix(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  RowMatrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
  return m;
}

// Token t's experts as a vector.
std::vector<std::int32_t> ids(const moet::Routing<float>& r, Index t) {
  return {r.experts(t).begin(), r.experts(t).end()};
}

std::vector<std::int32_t> iota_ids(std::int32_t n) {
  std::vector<std::int32_t> v(static_cast<std::size_t>(n));
  for (std::int32_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = i;
  return v;
}

}  // namespace

TEST_CASE("capacity_factor 0 is dropless even when every token prefers the same expert",
          "[bad_input][gate][top_k][capacity]") {
  const Index k = GENERATE(Index{1}, Index{2});
  moet::TopKGate<float> gate(
      {.model_dim = 3, .num_experts = 4, .k = k, .capacity_factor = 0.0, .min_capacity = 0});
  // Positive tokens and a router whose column 0 sums them (the others are 0): expert 0 has the
  // largest logit for every token, so a capacity would have to drop.
  RowMatrix<float> w = RowMatrix<float>::Zero(3, 4);
  w.col(0).setOnes();
  gate.set_router(w, moet::WeightLayout::kInOut);
  RowMatrix<float> x = normal_matrix(50, 3, 1).cwiseAbs();
  x.array() += 0.1f;
  moet::Routing<float> out;
  gate.route(x, {}, out);
  CHECK(gate.capacity(50) == 50);
  CHECK(out.dropped == 0);
  CHECK(out.num_assignments() == 50 * k);
  for (Index t = 0; t < 50; ++t) {
    REQUIRE(out.k(t) == k);
    CHECK(out.experts(t)[0] == 0);
    if (k == 2) CHECK(out.experts(t)[1] == 1);  // experts 1..3 tie at logit 0: lowest id
  }
}

TEST_CASE("An all-zero router gives exact ties that go to the lowest ids, weight 1/E or 1/k",
          "[bad_input][gate][top_k][importance]") {
  const RowMatrix<float> x = normal_matrix(7, 5, 2);
  const bool renormalize = GENERATE(false, true);
  moet::TopKGate<float> top_k(
      {.model_dim = 5, .num_experts = 8, .k = 3, .renormalize = renormalize});
  top_k.set_router(RowMatrix<float>::Zero(top_k.model_dim(), top_k.num_experts()),
                   moet::WeightLayout::kInOut);
  moet::Routing<float> out;
  top_k.route(x, {}, out);
  for (Index t = 0; t < 7; ++t) {
    CHECK(ids(out, t) == iota_ids(3));
    for (const float w : out.weights(t)) CHECK(w == (renormalize ? 1.0f / 3.0f : 0.125f));
  }
  // ImportanceGate: constant importance gives k_max (documented u = 1), ties the same way.
  moet::ImportanceGate<float> importance(
      {.model_dim = 5, .num_experts = 8, .k_max = 4, .renormalize = renormalize});
  importance.set_router(RowMatrix<float>::Zero(importance.model_dim(), importance.num_experts()),
                        moet::WeightLayout::kInOut);
  const std::vector<float> imp(7, 0.0f);  // all zero: constant
  moet::RouteContext ctx;
  ctx.importance = imp;
  importance.route(x, ctx, out);
  for (Index t = 0; t < 7; ++t) {
    CHECK(ids(out, t) == iota_ids(4));
    for (const float w : out.weights(t)) CHECK(w == (renormalize ? 0.25f : 0.125f));
  }
}

TEST_CASE("Denormal tokens route like zero tokens in every softmax gate",
          "[bad_input][gate][top_k][top_p]") {
  // x W is at most a few denormals, far below the ulp of 1, so softmax is exactly uniform and
  // every choice is a tie: the lowest ids win.
  RowMatrix<float> x(6, 4);
  const float tiny = std::numeric_limits<float>::denorm_min();
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(i % 5) * tiny;
  x(0, 0) = -tiny;
  moet::Routing<float> out;
  moet::TopKGate<float>({.model_dim = 4, .num_experts = 5, .k = 2}).route(x, {}, out);
  for (Index t = 0; t < 6; ++t) {
    CHECK(ids(out, t) == iota_ids(2));
    for (const float w : out.weights(t)) CHECK(w == 0.2f);
  }
  // Top-p with p = 0.5 over 4 uniform experts: 0, 0.25 and 0.5 are <= 0.5, so 3 are kept.
  moet::TopPGate<float>({.model_dim = 4, .num_experts = 4, .p = 0.5}).route(x, {}, out);
  for (Index t = 0; t < 6; ++t) CHECK(ids(out, t) == iota_ids(3));
  // A denormal token has a norm that underflows to the 1e-12 floor: every cosine is ~0, every
  // score 0.5 = sigmoid(0), nothing beats the zero thresholds, eval falls back to slot 0.
  moet::TopAnyGate<float> top_any({.model_dim = 4, .num_experts = 3});
  top_any.route(x, {}, out);
  for (Index t = 0; t < 6; ++t) {
    CHECK(ids(out, t) == std::vector<std::int32_t>{0});
    CHECK(out.weights(t)[0] == 1.0f);
  }
}

TEST_CASE("TopPGate keeps the documented counts for a uniform P", "[bad_input][gate][top_p]") {
  // All-zero router: P = 1/E exactly. Strict rule: position j is kept while j/E <= p.
  const RowMatrix<float> x = normal_matrix(5, 3, 3);
  const auto count = [&](Index num_experts, double p, bool inclusive) {
    moet::TopPGate<float> gate(
        {.model_dim = 3, .num_experts = num_experts, .p = p, .inclusive = inclusive});
    gate.set_router(RowMatrix<float>::Zero(gate.model_dim(), gate.num_experts()),
                    moet::WeightLayout::kInOut);
    moet::Routing<float> out;
    gate.route(x, {}, out);
    for (Index t = 1; t < 5; ++t) REQUIRE(out.k(t) == out.k(0));
    REQUIRE(ids(out, 0) == iota_ids(static_cast<std::int32_t>(out.k(0))));
    for (const float w : out.weights(0)) CHECK(w == 1.0f / static_cast<float>(num_experts));
    return out.k(0);
  };
  CHECK(count(4, 0.5, false) == 3);  // p E = 2 is an integer: one more than ceil(p E)
  CHECK(count(4, 0.5, true) == 2);   // inclusive: ceil(p E)
  CHECK(count(4, 0.3, false) == 2);  // ceil(1.2)
  CHECK(count(4, 1.0, false) == 4);  // p = 1 keeps every expert (sums of 1/4 are exact)
  CHECK(count(4, 1.0, true) == 4);
  CHECK(count(1, 0.01, false) == 1);  // the first expert is always kept
  // E = 4096: 1/4096 sums exactly, so j/4096 <= 1/2 keeps j = 0..2048.
  CHECK(count(4096, 0.5, false) == 2049);
  CHECK(count(4096, 0.5, true) == 2048);
}

TEST_CASE("TopPGate with max_k caps the top-p count after the rule", "[bad_input][gate][top_p]") {
  moet::TopPGate<float> gate({.model_dim = 3, .num_experts = 6, .p = 1.0, .max_k = 2});
  gate.set_router(RowMatrix<float>::Zero(gate.model_dim(), gate.num_experts()),
                  moet::WeightLayout::kInOut);
  moet::Routing<float> out;
  gate.route(normal_matrix(4, 3, 4), {}, out);
  for (Index t = 0; t < 4; ++t) CHECK(ids(out, t) == iota_ids(2));
}

TEST_CASE("ImportanceGate routes every pad nowhere, a batch of only pads included",
          "[bad_input][gate][importance]") {
  const moet::ImportanceGate<float> gate({.model_dim = 4, .num_experts = 5, .k_max = 3});
  const RowMatrix<float> x = normal_matrix(6, 4, 5);
  const std::vector<float> imp = {0.5f, 1.0f, 0.0f, 2.0f, 0.25f, 1.5f};
  const std::vector<std::uint8_t> none(6, 0);
  moet::RouteContext ctx;
  ctx.importance = imp;
  ctx.valid = none;
  moet::Routing<float> out;
  gate.route(x, ctx, out);
  CHECK(out.num_assignments() == 0);
  for (Index t = 0; t < 6; ++t) CHECK(out.k(t) == 0);
  // The same with attention: pads are no queries, every column mean has no query.
  const std::vector<float> att(2 * 1 * 3 * 3, 1.0f / 3.0f);
  moet::RouteContext att_ctx;
  att_ctx.attention = {att.data(), 2, 1, 3, false};
  att_ctx.valid = none;
  gate.route(x, att_ctx, out);
  CHECK(out.num_assignments() == 0);
  // One valid token among pads is the only one in its group: constant importance, k_max.
  std::vector<std::uint8_t> one(6, 0);
  one[3] = 1;
  ctx.valid = one;
  gate.route(x, ctx, out);
  CHECK(out.num_assignments() == 3);
  CHECK(out.k(3) == 3);
}

TEST_CASE("ImportanceGate with k_min = k_max gives every valid token exactly k",
          "[bad_input][gate][importance]") {
  const auto norm = GENERATE(moet::ImportanceNorm::kMax, moet::ImportanceNorm::kMinMax,
                             moet::ImportanceNorm::kBudget);
  const moet::ImportanceGate<float> gate(
      {.model_dim = 4, .num_experts = 6, .k_min = 2, .k_max = 2, .norm = norm, .k_avg = 2.0});
  const RowMatrix<float> x = normal_matrix(8, 4, 6);
  const std::vector<float> imp = {0.0f, 9.0f, 0.1f, 3.0f, 0.0f, 1e-20f, 5.0f, 2.0f};
  const std::vector<std::uint8_t> valid = {1, 1, 0, 1, 1, 1, 1, 0};
  moet::RouteContext ctx;
  ctx.importance = imp;
  ctx.valid = valid;
  moet::Routing<float> out;
  gate.route(x, ctx, out);
  for (Index t = 0; t < 8; ++t) CHECK(out.k(t) == (valid[static_cast<std::size_t>(t)] ? 2 : 0));
}

TEST_CASE("ImportanceGate with constant importance gives k_max, or round(k_avg) for kBudget",
          "[bad_input][gate][importance]") {
  const RowMatrix<float> x = normal_matrix(5, 4, 7);
  const std::vector<float> imp(5, 0.7f);
  moet::RouteContext ctx;
  ctx.importance = imp;
  moet::Routing<float> out;
  moet::ImportanceGate<float>({.model_dim = 4,
                               .num_experts = 6,
                               .k_min = 1,
                               .k_max = 5,
                               .norm = moet::ImportanceNorm::kMinMax})
      .route(x, ctx, out);
  for (Index t = 0; t < 5; ++t) CHECK(out.k(t) == 5);
  // round(2.5) = 3 (half away from zero).
  moet::ImportanceGate<float>({.model_dim = 4,
                               .num_experts = 6,
                               .k_min = 1,
                               .k_max = 5,
                               .norm = moet::ImportanceNorm::kBudget,
                               .k_avg = 2.5})
      .route(x, ctx, out);
  for (Index t = 0; t < 5; ++t) CHECK(out.k(t) == 3);
}

TEST_CASE("ImportanceGate rejects an attention view without data, heads or sequences",
          "[bad_input][gate][importance]") {
  const moet::ImportanceGate<float> gate({.model_dim = 4, .num_experts = 4, .k_max = 2});
  const RowMatrix<float> x = normal_matrix(6, 4, 8);
  const std::vector<float> att(2 * 1 * 3 * 3, 1.0f / 3.0f);
  moet::Routing<float> out;
  moet::RouteContext ctx;
  // A shape without data is "missing" (AttentionView::empty() looks at the pointer).
  ctx.attention = {nullptr, 2, 1, 3, false};
  CHECK_MOET_ERROR(gate.route(x, ctx, out), Contains("[moet::ImportanceGate]") &&
                                                Contains("needs ctx.importance or ctx.attention"));
  ctx.attention = {att.data(), 2, 0, 3, false};  // no heads
  CHECK_MOET_ERROR(gate.route(x, ctx, out), Contains("[moet::ImportanceGate]") &&
                                                Contains("[2, 0, 3, 3]") &&
                                                Contains("must cover batch * L = num_tokens"));
  ctx.attention = {att.data(), 0, 1, 3, false};  // no sequences
  CHECK_MOET_ERROR(gate.route(x, ctx, out),
                   Contains("[moet::ImportanceGate]") && Contains("[0, 1, 3, 3]"));
  ctx.attention = {att.data(), 2, 1, 3, false};
  ctx.sequence_length = 2;  // disagrees with the attention's L
  CHECK_MOET_ERROR(gate.route(x, ctx, out),
                   Contains("[moet::ImportanceGate]") &&
                       Contains("ctx.sequence_length (2) must be 0 or the attention's L (3)"));
  // An empty ctx.importance span is "not given": the attention is used.
  ctx.sequence_length = 0;
  const std::vector<float> no_importance;
  ctx.importance = no_importance;
  gate.route(x, ctx, out);
  CHECK(out.num_assignments() == 6 * 2);  // uniform attention: constant importance, k_max
}

TEST_CASE("ImportanceGate with 4096 experts takes the top-K of the oracle softmax",
          "[bad_input][gate][importance]") {
  moet::ImportanceGate<float> gate({.model_dim = 2, .num_experts = 4096, .k_max = 8});
  const RowMatrix<float> x = normal_matrix(4, 2, 9);
  const std::vector<float> imp = {0.0f, 1.0f, 0.5f, 0.25f};
  moet::RouteContext ctx;
  ctx.importance = imp;
  moet::Routing<float> out;
  gate.route(x, ctx, out);
  // K = clamp(ceil(imp / max * 8 - 1e-6), 1, 8): 1, 8, 4, 2.
  const Index want_k[] = {1, 8, 4, 2};
  for (Index t = 0; t < 4; ++t) {
    REQUIRE(out.k(t) == want_k[t]);
    // Oracle: logits in double, the K largest (ties to the lower id).
    std::vector<double> z(4096);
    for (Index e = 0; e < 4096; ++e) {
      z[static_cast<std::size_t>(e)] =
          static_cast<double>(x(t, 0)) * static_cast<double>(gate.router()(0, e)) +
          static_cast<double>(x(t, 1)) * static_cast<double>(gate.router()(1, e));
    }
    for (std::size_t j = 0; j + 1 < out.experts(t).size(); ++j) {
      CHECK(z[static_cast<std::size_t>(out.experts(t)[j])] >=
            z[static_cast<std::size_t>(out.experts(t)[j + 1])] - 1e-6);
    }
    // No expert outside the chosen K beats the K-th by more than rounding.
    const double kth =
        z[static_cast<std::size_t>(out.experts(t)[static_cast<std::size_t>(want_k[t] - 1)])];
    Index better = 0;
    for (Index e = 0; e < 4096; ++e) better += z[static_cast<std::size_t>(e)] > kth + 1e-6 ? 1 : 0;
    CHECK(better <= want_k[t] - 1);
  }
}

TEST_CASE("StochasticGate's position and sequence modes at degenerate sizes",
          "[bad_input][gate][stochastic]") {
  const RowMatrix<float> x = normal_matrix(12, 3, 10);
  moet::Routing<float> out;
  // sequence_length 1: every token is position 0 of its own sequence, so kPosition puts every
  // token on one expert and kSequence draws per token.
  moet::RouteContext ctx;
  ctx.sequence_length = 1;
  moet::StochasticGate<float>(
      {.model_dim = 3, .num_experts = 50, .inference = moet::StochasticInference::kPosition})
      .route(x, ctx, out);
  for (Index t = 1; t < 12; ++t) CHECK(out.experts(t)[0] == out.experts(0)[0]);
  // sequence_length = T (or 0): one sequence, so kSequence puts every token on one expert.
  for (const Index len : {Index{0}, Index{12}}) {
    ctx.sequence_length = len;
    moet::StochasticGate<float>(
        {.model_dim = 3, .num_experts = 50, .inference = moet::StochasticInference::kSequence})
        .route(x, ctx, out);
    for (Index t = 1; t < 12; ++t) CHECK(out.experts(t)[0] == out.experts(0)[0]);
  }
  // With one expert every mode is expert 0 with weight 1.
  for (const auto mode :
       {moet::StochasticInference::kToken, moet::StochasticInference::kPosition,
        moet::StochasticInference::kSequence, moet::StochasticInference::kEnsemble}) {
    moet::StochasticGate<float>({.model_dim = 3, .num_experts = 1, .inference = mode})
        .route(x, {}, out);
    for (Index t = 0; t < 12; ++t) {
      CHECK(ids(out, t) == std::vector<std::int32_t>{0});
      CHECK(out.weights(t)[0] == 1.0f);
    }
  }
}

TEST_CASE("MoELayer on denormal input routes like a zero input and returns finite output",
          "[bad_input][layer]") {
  const Index d = 4;
  moet::MoELayer layer(
      moet::TopKGate<float>({.model_dim = d, .num_experts = 3, .k = 2}),
      moet::SwiGluExperts<float>({.model_dim = d, .hidden_dim = 6, .num_experts = 3}));
  RowMatrix<float> x = RowMatrix<float>::Constant(5, d, std::numeric_limits<float>::denorm_min());
  const RowMatrix<float> y = layer.forward(x);
  CHECK(y.allFinite());
  // Every token ties: experts 0 and 1 with weight 1/3 each; SwiGLU of a denormal row is
  // (at most) denormal, so |y| is tiny.
  CHECK(layer.stats().load == std::vector<Index>{5, 5, 0});
  CHECK(y.cwiseAbs().maxCoeff() <= 1e-30f);
}

}  // namespace test_bad_input_edges
