// TopAnyGate (DynMoE top-any gating, docs/algorithms.md §4.1, §4.2, §4.4, §4.8).
#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/detail/rng.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/kernel_isa.hpp"

namespace test_gate_top_any {  // one per file: the unity build puts several files in one TU

static_assert(moet::Gate<moet::TopAnyGate<float>>, "TopAnyGate<float> is a Gate");
static_assert(moet::Gate<moet::TopAnyGate<double>>, "TopAnyGate<double> is a Gate");

namespace {

using Gate = moet::TopAnyGate<float>;
using moet::Index;

moet::RowMatrix<float> random_tokens(Index rows, Index cols, std::uint64_t seed) {
  moet::detail::Rng rng(seed);
  moet::RowMatrix<float> x(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) x(i, j) = static_cast<float>(rng.normal());
  }
  return x;
}

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// The naive reference: cosine with plain loops in double, masked sigmoid scores, the strict
// threshold test, and a per-token "ambiguous" flag for pairs whose margin is within float noise.
struct Reference {
  std::vector<std::vector<double>> s;   // (T, Emax)
  std::vector<std::vector<int>> fired;  // ascending ids per token
  std::vector<bool> ambiguous;          // some pair's margin below kMargin
  static constexpr double kMargin = 1e-5;
};

Reference reference(const moet::RowMatrix<float>& x, const Gate& gate) {
  const auto& w = gate.gate_embeddings();
  const auto& theta = gate.thresholds();
  const auto& mask = gate.expert_mask();
  const double tau = static_cast<double>(gate.temperature());
  Reference ref;
  const Index num_tokens = x.rows();
  const Index emax = gate.num_experts();
  for (Index t = 0; t < num_tokens; ++t) {
    double xx = 0.0;
    for (Index i = 0; i < x.cols(); ++i) xx += double(x(t, i)) * double(x(t, i));
    std::vector<double> row;
    std::vector<int> fired;
    bool ambiguous = false;
    for (Index e = 0; e < emax; ++e) {
      double dot = 0.0;
      double ww = 0.0;
      for (Index i = 0; i < x.cols(); ++i) {
        dot += double(x(t, i)) * double(w(i, e));
        ww += double(w(i, e)) * double(w(i, e));
      }
      const double cos = dot / (std::max(std::sqrt(xx), 1e-12) * std::max(std::sqrt(ww), 1e-12));
      const double s = mask[e] != 0.0f ? sigmoid(tau * cos) : 0.0;
      const double thr = sigmoid(tau * double(theta[e]));
      row.push_back(s);
      if (mask[e] != 0.0f) {
        if (std::abs(s - thr) < Reference::kMargin) ambiguous = true;
        if (s > thr) fired.push_back(static_cast<int>(e));
      }
    }
    ref.s.push_back(row);
    ref.fired.push_back(fired);
    ref.ambiguous.push_back(ambiguous);
  }
  return ref;
}

std::vector<int> experts_of(const moet::Routing<float>& r, Index t) {
  std::vector<int> ids;
  for (const auto e : r.experts(t)) ids.push_back(e);
  return ids;
}

// Largest reference score over active slots.
double best_active_score(const Reference& ref, const Gate& gate, Index t) {
  double best = -1.0;
  for (Index e = 0; e < gate.num_experts(); ++e) {
    if (gate.expert_mask()[e] != 0.0f) best = std::max(best, ref.s[std::size_t(t)][std::size_t(e)]);
  }
  return best;
}

void check_same_plan(const moet::Routing<float>& a, const moet::Routing<float>& b) {
  REQUIRE(a.num_tokens() == b.num_tokens());
  REQUIRE(a.num_assignments() == b.num_assignments());
  for (std::size_t i = 0; i < a.offsets().size(); ++i) REQUIRE(a.offsets()[i] == b.offsets()[i]);
  for (std::size_t i = 0; i < a.experts().size(); ++i) {
    REQUIRE(a.experts()[i] == b.experts()[i]);
    REQUIRE(a.weights()[i] == b.weights()[i]);  // bit-identical
  }
  REQUIRE(a.probs().rows() == b.probs().rows());
  REQUIRE(a.probs().cols() == b.probs().cols());
  for (Index t = 0; t < a.probs().rows(); ++t) {
    for (Index e = 0; e < a.probs().cols(); ++e) REQUIRE(a.probs()(t, e) == b.probs()(t, e));
  }
}

moet::RouteContext train_ctx() {
  moet::RouteContext ctx;
  ctx.training = true;
  return ctx;
}

// A 2-d gate whose embeddings are the unit axes, for hand-computed cases.
Gate axis_gate(Index emax, moet::TopAnyVariant variant = moet::TopAnyVariant::kDeepSpeed) {
  Gate gate({.model_dim = 2, .num_experts = emax, .variant = variant});
  moet::RowMatrix<float> w = moet::RowMatrix<float>::Zero(2, emax);
  for (Index e = 0; e < emax; ++e) w(e % 2, e) = 1.0f;
  gate.set_gate_embeddings(w, moet::WeightLayout::kInOut);
  return gate;
}

}  // namespace

TEST_CASE("TopAnyGate routing equals a naive cosine-threshold reference", "[gate][top_any]") {
  const auto seed = GENERATE(1u, 2u, 3u, 4u);
  const bool training = GENERATE(true, false);
  const float tau = GENERATE(1.0f, 2.5f);
  const Index d = 16;
  const Index emax = 8;
  const Index num_tokens = 203;  // not a multiple of any block size
  Gate gate({.model_dim = d,
             .num_experts = emax,
             .initial_experts = 6,
             .temperature = tau,
             .init_seed = seed});
  moet::detail::Rng rng(seed + 100);
  moet::Vector<float> theta(emax);
  for (Index e = 0; e < emax; ++e) {
    theta[e] = static_cast<float>(0.6 * rng.uniform() - 0.1);  // [-0.1, 0.5)
  }
  gate.set_thresholds(theta);
  const auto x = random_tokens(num_tokens, d, seed);
  moet::RouteContext ctx;
  ctx.training = training;
  moet::Routing<float> out;
  gate.route(x, ctx, out);
  const auto ref = reference(x, gate);

  REQUIRE(out.num_tokens() == num_tokens);
  REQUIRE(out.num_experts() == emax);
  CHECK(out.live_experts == 6);
  CHECK_FALSE(out.probs_are_distribution);
  REQUIRE(out.probs().rows() == num_tokens);
  REQUIRE(out.probs().cols() == emax);
  Index ambiguous = 0;
  Index fallbacks = 0;
  Index multi = 0;
  for (Index t = 0; t < num_tokens; ++t) {
    for (Index e = 0; e < emax; ++e) {
      CHECK(double(out.probs()(t, e)) ==
            Approx(ref.s[std::size_t(t)][std::size_t(e)]).margin(1e-6));
    }
    if (ref.ambiguous[std::size_t(t)]) {
      ++ambiguous;
      continue;
    }
    const auto& fired = ref.fired[std::size_t(t)];
    if (!fired.empty()) {
      if (fired.size() >= 2) ++multi;
      CHECK(experts_of(out, t) == fired);
      for (const float w : out.weights(t)) {
        CHECK(w == Approx(1.0 / double(fired.size())).epsilon(1e-6));
      }
    } else if (training) {
      CHECK(out.k(t) == 0);
    } else {
      ++fallbacks;
      REQUIRE(out.k(t) == 1);
      const int e = out.experts(t)[0];
      CHECK(gate.expert_mask()[e] == 1.0f);
      CHECK(ref.s[std::size_t(t)][std::size_t(e)] ==
            Approx(best_active_score(ref, gate, t)).margin(1e-6));
      CHECK(out.weights(t)[0] == 1.0f);
    }
  }
  CHECK(ambiguous < 5);
  CHECK(multi > 10);  // the case exercises variable k
  if (!training) CHECK(fallbacks > 5);
}

TEST_CASE(
    "TopAnyGate scores run the packed kernels: a token's bits alone equal its bits in a "
    "batch, and parameters_changed repacks written embeddings",
    "[gate][top_any]") {
  const Index d = 37;
  const Index emax = 24;  // >= kPackedRouterMinExperts: W is packed on a vector level
  const Index num_tokens = 150;
  Gate gate({.model_dim = d, .num_experts = emax, .initial_experts = 20, .init_seed = 5});
  const auto x = random_tokens(num_tokens, d, 11);
  moet::RouteContext ctx;
  const bool vector_level = moet::kernel_isa() != moet::KernelIsa::kPortable;
  const auto check = [&](bool packed) {
    moet::Routing<float> out;
    gate.route(x, ctx, out);
    const auto ref = reference(x, gate);
    moet::Routing<float> one;
    for (Index t = 0; t < num_tokens; ++t) {
      gate.route(x.middleRows(t, 1), ctx, one);
      for (Index e = 0; e < emax; ++e) {
        INFO("token " << t << " slot " << e);
        CHECK(double(out.probs()(t, e)) ==
              Approx(ref.s[std::size_t(t)][std::size_t(e)]).margin(1e-6));
        if (packed) CHECK(one.probs()(0, e) == out.probs()(t, e));
      }
    }
  };
  CHECK(gate.cosine_router().packed_product() == vector_level);
  check(vector_level);
  // Write W through visit_parameters: right scores at once (Eigen's product), the packed
  // kernels' bits again after parameters_changed.
  gate.visit_parameters(
      [](std::string_view name, moet::ParamMap<float> value, moet::ParamMap<float>) {
        if (name != "embeddings") return;
        for (Index i = 0; i < value.size(); ++i) {
          value.data()[i] = 1.5f * value.data()[i] + 0.01f * static_cast<float>(i % 7);
        }
      });
  CHECK_FALSE(gate.cosine_router().packed_product());
  check(false);
  gate.parameters_changed();
  CHECK(gate.cosine_router().packed_product() == vector_level);
  check(vector_level);
  // Fewer slots than a kernel panel's worth stay on Eigen's product.
  const Gate small({.model_dim = d, .num_experts = moet::detail::kPackedRouterMinExperts - 1});
  CHECK_FALSE(small.cosine_router().packed_product());
}

TEST_CASE("TopAnyGate weights are 1/k and sum to 1 over routed tokens", "[gate][top_any]") {
  const auto seed = GENERATE(11u, 12u);
  Gate gate({.model_dim = 8, .num_experts = 8, .init_seed = seed});
  gate.set_thresholds(moet::Vector<float>::Constant(gate.num_experts(), -0.1f));
  const auto x = random_tokens(100, 8, seed);
  moet::Routing<float> out;
  gate.route(x, train_ctx(), out);
  Index routed = 0;
  for (Index t = 0; t < out.num_tokens(); ++t) {
    const Index k = out.k(t);
    if (k == 0) continue;
    ++routed;
    double sum = 0.0;
    for (const float w : out.weights(t)) {
      CHECK(w == Approx(1.0 / double(k)));
      sum += double(w);
    }
    CHECK(sum == Approx(1.0).epsilon(1e-6));
    // Ascending expert ids, no duplicates.
    for (std::size_t j = 1; j < out.experts(t).size(); ++j) {
      CHECK(out.experts(t)[j - 1] < out.experts(t)[j]);
    }
  }
  CHECK(routed > 90);
}

TEST_CASE("TopAnyGate eval fallback weight follows the DeepSpeed or Tutel variant",
          "[gate][top_any]") {
  // Axes e0 = (1, 0), e1 = (0, 1); theta = 0.5 on both: fire iff cos > 0.5.
  // Token (1, 0): cos (1, 0) -> fires e0 only.  Token (-1, -1): cos -1/sqrt2 on both, k = 0,
  // tie -> fallback e0 with s = sigmoid(-1/sqrt2).  Token (1, 1): cos 1/sqrt2 on both -> k = 2.
  const double s_fallback = sigmoid(-1.0 / std::sqrt(2.0));
  moet::RowMatrix<float> low(2, 2);
  low << 1.0f, 0.0f, -1.0f, -1.0f;
  moet::RowMatrix<float> high(3, 2);
  high << 1.0f, 0.0f, -1.0f, -1.0f, 1.0f, 1.0f;
  moet::Routing<float> out;
  const moet::RouteContext eval;

  SECTION("DeepSpeed: weight 1 always") {
    auto gate = axis_gate(2, moet::TopAnyVariant::kDeepSpeed);
    gate.set_thresholds(moet::Vector<float>::Constant(gate.num_experts(), 0.5f));
    gate.route(low, eval, out);
    REQUIRE(out.k(1) == 1);
    CHECK(out.experts(1)[0] == 0);
    CHECK(out.weights(1)[0] == 1.0f);
    gate.route(high, eval, out);
    REQUIRE(out.k(1) == 1);
    CHECK(out.weights(1)[0] == 1.0f);
    REQUIRE(out.k(2) == 2);
    CHECK(out.weights(2)[0] == 0.5f);
  }
  SECTION("Tutel: the raw score when the batch's max k is 1, else 1") {
    auto gate = axis_gate(2, moet::TopAnyVariant::kTutel);
    gate.set_thresholds(moet::Vector<float>::Constant(gate.num_experts(), 0.5f));
    gate.route(low, eval, out);
    REQUIRE(out.k(0) == 1);
    CHECK(out.experts(0)[0] == 0);
    CHECK(out.weights(0)[0] == 1.0f);  // a natural k = 1 token keeps weight 1
    REQUIRE(out.k(1) == 1);
    CHECK(out.experts(1)[0] == 0);
    CHECK(double(out.weights(1)[0]) == Approx(s_fallback).epsilon(1e-6));
    gate.route(high, eval, out);
    REQUIRE(out.k(1) == 1);
    CHECK(out.experts(1)[0] == 0);
    CHECK(out.weights(1)[0] == 1.0f);
    REQUIRE(out.k(2) == 2);
    CHECK(experts_of(out, 2) == std::vector<int>{0, 1});
    CHECK(out.weights(2)[1] == 0.5f);
  }
  SECTION("training drops the token in both variants") {
    for (const auto variant : {moet::TopAnyVariant::kDeepSpeed, moet::TopAnyVariant::kTutel}) {
      auto gate = axis_gate(2, variant);
      gate.set_thresholds(moet::Vector<float>::Constant(gate.num_experts(), 0.5f));
      gate.route(high, train_ctx(), out);
      CHECK(out.k(0) == 1);
      CHECK(out.k(1) == 0);
      CHECK(out.k(2) == 2);
      CHECK(out.num_assignments() == 3);
    }
  }
}

TEST_CASE("TopAnyGate with all thresholds high drops every token in training",
          "[gate][top_any][edge]") {
  Gate gate({.model_dim = 12, .num_experts = 7, .initial_experts = 5, .init_seed = 5});
  gate.set_thresholds(moet::Vector<float>::Constant(gate.num_experts(), 10.0f));  // cos <= 1 < 10
  const auto x = random_tokens(150, 12, 5);
  moet::Routing<float> out;
  gate.route(x, train_ctx(), out);
  CHECK(out.num_assignments() == 0);
  for (Index t = 0; t < out.num_tokens(); ++t) CHECK(out.k(t) == 0);
}

TEST_CASE("TopAnyGate with all thresholds high falls back to top-1 in eval",
          "[gate][top_any][edge]") {
  const auto seed = GENERATE(6u, 7u);
  Gate gate({.model_dim = 12, .num_experts = 7, .initial_experts = 5, .init_seed = seed});
  gate.set_thresholds(moet::Vector<float>::Constant(gate.num_experts(), 10.0f));
  const auto x = random_tokens(150, 12, seed);
  moet::Routing<float> out;
  gate.route(x, moet::RouteContext{}, out);
  const auto ref = reference(x, gate);
  REQUIRE(out.num_assignments() == 150);
  for (Index t = 0; t < out.num_tokens(); ++t) {
    REQUIRE(out.k(t) == 1);
    const int e = out.experts(t)[0];
    CHECK(e < 5);  // active slots only
    CHECK(ref.s[std::size_t(t)][std::size_t(e)] ==
          Approx(best_active_score(ref, gate, t)).margin(1e-6));
    CHECK(out.weights(t)[0] == 1.0f);
  }
}

TEST_CASE("TopAnyGate does not fire an expert whose score equals its threshold",
          "[gate][top_any][edge]") {
  // Token (1, 0) is orthogonal to e1 = (0, 1): cos = 0, s = sigmoid(0) = 0.5 = sigmoid(theta = 0).
  auto gate = axis_gate(2);
  moet::RowMatrix<float> x(1, 2);
  x << 1.0f, 0.0f;
  moet::Routing<float> out;
  gate.route(x, train_ctx(), out);
  CHECK(out.probs()(0, 1) == 0.5f);
  CHECK(experts_of(out, 0) == std::vector<int>{0});
  moet::Vector<float> theta = gate.thresholds();
  theta[1] = -1e-3f;  // now s = 0.5 > sigmoid(-1e-3)
  gate.set_thresholds(theta);
  gate.route(x, train_ctx(), out);
  CHECK(experts_of(out, 0) == std::vector<int>{0, 1});
}

TEST_CASE("TopAnyGate fallback ties go to the lowest expert id", "[gate][top_any][edge]") {
  // Four slots on the axes: e0 = e2 = (1, 0), e1 = e3 = (0, 1). Token (1, 1) scores equally
  // on all four; thresholds 0.9 block them all, so eval falls back to the first maximum.
  auto gate = axis_gate(4);
  gate.set_thresholds(moet::Vector<float>::Constant(gate.num_experts(), 0.9f));
  moet::RowMatrix<float> x(2, 2);
  x << 1.0f, 1.0f, 0.0f, -3.0f;  // second token: ties between e0 and e2 (cos 0)
  moet::Routing<float> out;
  gate.route(x, moet::RouteContext{}, out);
  REQUIRE(out.k(0) == 1);
  CHECK(out.experts(0)[0] == 0);
  REQUIRE(out.k(1) == 1);
  CHECK(out.experts(1)[0] == 0);
  gate.set_expert_active(0, false);  // the lowest *active* id wins
  gate.route(x, moet::RouteContext{}, out);
  CHECK(out.experts(0)[0] == 1);
  CHECK(out.experts(1)[0] == 2);
}

TEST_CASE("TopAnyGate fallback never picks an inactive slot, even when scores underflow",
          "[gate][top_any][edge][mask]") {
  // tau = 1000 and cos = -1 give sigmoid(-1000) = 0 in float: the active slots 1 and 2 score
  // exactly like the inactive slot 0, and the fallback must still pick an active one (slot 1).
  Gate gate({.model_dim = 2, .num_experts = 3, .temperature = 1000.0f});
  moet::RowMatrix<float> w(2, 3);
  w << 1.0f, 0.0f, 0.0f,  //
      0.0f, 1.0f, 1.0f;
  gate.set_gate_embeddings(w, moet::WeightLayout::kInOut);
  gate.set_expert_active(0, false);
  moet::RowMatrix<float> x(1, 2);
  x << 0.0f, -1.0f;
  moet::Routing<float> out;
  gate.route(x, moet::RouteContext{}, out);
  CHECK(out.probs()(0, 1) == 0.0f);
  CHECK(out.probs()(0, 2) == 0.0f);
  REQUIRE(out.k(0) == 1);
  CHECK(out.experts(0)[0] == 1);
}

TEST_CASE("TopAnyGate gives an all-zero token cos 0 and s 0.5", "[gate][top_any][edge]") {
  Gate gate({.model_dim = 6, .num_experts = 4, .init_seed = 9});
  gate.set_thresholds((moet::Vector<float>(4) << 0.0f, -0.1f, 0.1f, -0.0f).finished());
  const moet::RowMatrix<float> x = moet::RowMatrix<float>::Zero(3, 6);
  moet::Routing<float> out;
  gate.route(x, train_ctx(), out);
  for (Index t = 0; t < 3; ++t) {
    for (Index e = 0; e < 4; ++e) CHECK(out.probs()(t, e) == 0.5f);
    CHECK(experts_of(out, t) == std::vector<int>{1});  // only theta_e < 0 fires
    CHECK(out.weights(t)[0] == 1.0f);
  }
}

TEST_CASE("TopAnyGate never fires an inactive slot", "[gate][top_any][mask]") {
  const auto seed = GENERATE(21u, 22u);
  Gate gate({.model_dim = 10, .num_experts = 6, .initial_experts = 3, .init_seed = seed});
  gate.set_thresholds(moet::Vector<float>::Constant(
      gate.num_experts(), -10.0f));  // every active slot fires for every token
  gate.set_expert_active(4, true);   // active: 0, 1, 2, 4
  const auto x = random_tokens(120, 10, seed);
  moet::Routing<float> out;
  gate.route(x, train_ctx(), out);
  CHECK(gate.num_active() == 4);
  CHECK(out.live_experts == 4);
  for (Index t = 0; t < out.num_tokens(); ++t) {
    CHECK(experts_of(out, t) == std::vector<int>{0, 1, 2, 4});
    CHECK(out.probs()(t, 3) == 0.0f);
    CHECK(out.probs()(t, 5) == 0.0f);
    CHECK(out.probs()(t, 0) > 0.0f);
  }
  gate.set_expert_active(0, false);
  gate.route(x, train_ctx(), out);
  for (Index t = 0; t < out.num_tokens(); ++t) {
    CHECK(experts_of(out, t) == std::vector<int>{1, 2, 4});
  }
}

TEST_CASE("TopAnyGate with no active slot routes nothing, in eval too", "[gate][top_any][mask]") {
  Gate gate({.model_dim = 4, .num_experts = 3, .initial_experts = 2, .init_seed = 2});
  gate.set_expert_mask(moet::Vector<float>::Zero(3));
  CHECK(gate.num_active() == 0);
  const auto x = random_tokens(10, 4, 2);
  moet::Routing<float> out;
  gate.route(x, moet::RouteContext{}, out);
  CHECK(out.num_assignments() == 0);
  CHECK(out.live_experts == 0);
  CHECK((out.probs().array() == 0.0f).all());
}

TEST_CASE("TopAnyGate initialises orthonormal gate embeddings", "[gate][top_any][init]") {
  const auto seed = GENERATE(1u, 2u);
  SECTION("num_experts <= model_dim: orthonormal columns") {
    const Index d = GENERATE(8, 16);
    Gate gate({.model_dim = d, .num_experts = 8, .initial_experts = 4, .init_seed = seed});
    const auto& w = gate.gate_embeddings();
    REQUIRE(w.rows() == d);
    REQUIRE(w.cols() == 8);
    const Eigen::MatrixXd wd = w.cast<double>();
    const Eigen::MatrixXd gram = wd.transpose() * wd;
    CHECK((gram - Eigen::MatrixXd::Identity(8, 8)).cwiseAbs().maxCoeff() < 1e-5);
  }
  SECTION("num_experts > model_dim: orthonormal rows") {
    Gate gate({.model_dim = 4, .num_experts = 10, .initial_experts = 3, .init_seed = seed});
    const auto& w = gate.gate_embeddings();
    REQUIRE(w.rows() == 4);
    REQUIRE(w.cols() == 10);
    const Eigen::MatrixXd wd = w.cast<double>();
    const Eigen::MatrixXd gram = wd * wd.transpose();
    CHECK((gram - Eigen::MatrixXd::Identity(4, 4)).cwiseAbs().maxCoeff() < 1e-5);
  }
  SECTION("thresholds 0, first initial_experts slots active, deterministic in the seed") {
    Gate a({.model_dim = 6, .num_experts = 5, .initial_experts = 2, .init_seed = seed});
    Gate b({.model_dim = 6, .num_experts = 5, .initial_experts = 2, .init_seed = seed});
    Gate c({.model_dim = 6, .num_experts = 5, .initial_experts = 2, .init_seed = seed + 7});
    CHECK((a.thresholds().array() == 0.0f).all());
    CHECK(a.expert_mask() == (moet::Vector<float>(5) << 1, 1, 0, 0, 0).finished());
    CHECK(a.num_active() == 2);
    CHECK(a.num_experts() == 5);
    CHECK(a.options().initial_experts == 2);
    CHECK(a.gate_embeddings() == b.gate_embeddings());
    CHECK(a.gate_embeddings() != c.gate_embeddings());
  }
  SECTION("initial_experts 0 means every slot") {
    Gate gate({.model_dim = 6, .num_experts = 3, .init_seed = seed});
    CHECK(gate.num_experts() == 3);
    CHECK(gate.options().initial_experts == 3);
    CHECK(gate.num_active() == 3);
  }
}

TEST_CASE("TopAnyGate temperature scales the cosine inside the sigmoid", "[gate][top_any]") {
  const auto seed = GENERATE(31u, 32u);
  Gate one({.model_dim = 8, .num_experts = 6, .temperature = 1.0f, .init_seed = seed});
  Gate three({.model_dim = 8, .num_experts = 6, .temperature = 3.0f, .init_seed = seed});
  one.set_thresholds(moet::Vector<float>::Constant(one.num_experts(), 0.2f));
  three.set_thresholds(moet::Vector<float>::Constant(three.num_experts(), 0.2f));
  const auto x = random_tokens(64, 8, seed);
  moet::Routing<float> a;
  moet::Routing<float> b;
  one.route(x, train_ctx(), a);
  three.route(x, train_ctx(), b);
  Index differ = 0;
  for (Index t = 0; t < 64; ++t) {
    for (Index e = 0; e < 6; ++e) {
      const double pa = double(a.probs()(t, e));
      const double cos = std::log(pa / (1.0 - pa));  // logit of sigmoid(1 * cos)
      CHECK(double(b.probs()(t, e)) == Approx(sigmoid(3.0 * cos)).margin(1e-5));
      if (std::abs(pa - double(b.probs()(t, e))) > 1e-3) ++differ;
    }
    // Both fire iff cos > theta: tau does not change the firing set (away from the margin).
    bool near = false;
    for (Index e = 0; e < 6; ++e) {
      const double pa = double(a.probs()(t, e));
      near = near || std::abs(std::log(pa / (1.0 - pa)) - 0.2) < 1e-4;
    }
    if (!near) CHECK(experts_of(a, t) == experts_of(b, t));
  }
  CHECK(differ > 100);
  CHECK(three.temperature() == 3.0f);
}

TEST_CASE("TopAnyGate routes in double too", "[gate][top_any]") {
  moet::TopAnyGate<double> gate({.model_dim = 2, .num_experts = 2});
  moet::RowMatrix<double> w(2, 2);
  w << 2.0, 0.0, 0.0, 3.0;  // column norms 2 and 3: normalised away
  gate.set_gate_embeddings(w, moet::WeightLayout::kInOut);
  gate.set_thresholds((moet::Vector<double>(2) << 0.5, 0.5).finished());
  moet::RowMatrix<double> x(1, 2);
  x << 3.0, 4.0;  // cos = 0.6 and 0.8
  moet::Routing<double> out;
  gate.route(x, moet::RouteContext{}, out);
  CHECK(out.probs()(0, 0) == Approx(sigmoid(0.6)).epsilon(1e-12));
  CHECK(out.probs()(0, 1) == Approx(sigmoid(0.8)).epsilon(1e-12));
  REQUIRE(out.k(0) == 2);
  CHECK(out.weights(0)[0] == 0.5);
}

TEST_CASE("TopAnyGate rejects bad options and input", "[gate][top_any][errors]") {
  using Catch::Contains;
  CHECK_THROWS_WITH(Gate({.model_dim = 0, .num_experts = 2}),
                    Contains("[moet::TopAnyGate]") && Contains("model_dim") && Contains("got 0"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 0}),
                    Contains("[moet::TopAnyGate]") && Contains("num_experts") && Contains("got 0"));
  CHECK_THROWS_WITH(
      Gate({.model_dim = 4, .num_experts = 4, .initial_experts = 5}),
      Contains("[moet::TopAnyGate]") && Contains("initial_experts") && Contains("got 5"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 2, .temperature = 0.0f}),
                    Contains("temperature") && Contains("got 0"));
  CHECK_THROWS_WITH(Gate({.model_dim = 4, .num_experts = 2, .temperature = -1.5f}),
                    Contains("temperature") && Contains("got -1.5"));
  CHECK_THROWS_AS(Gate({.model_dim = 4, .num_experts = 2, .temperature = NAN}), moet::Error);
  CHECK_THROWS_AS(Gate({.model_dim = 4, .num_experts = 2, .temperature = INFINITY}), moet::Error);

  Gate gate({.model_dim = 4, .num_experts = 3, .initial_experts = 2});
  moet::Routing<float> out;
  const moet::RouteContext ctx;
  const moet::RowMatrix<float> wide = moet::RowMatrix<float>::Ones(3, 5);
  CHECK_THROWS_WITH(gate.route(wide, ctx, out), Contains("[moet::TopAnyGate]") &&
                                                    Contains("model_dim = 4") && Contains("got 5"));
  moet::RowMatrix<float> bad = moet::RowMatrix<float>::Ones(3, 4);
  bad(1, 2) = NAN;
  CHECK_THROWS_WITH(gate.route(bad, ctx, out),
                    Contains("[moet::TopAnyGate]") && Contains("finite"));
  bad(1, 2) = -INFINITY;
  CHECK_THROWS_AS(gate.route(bad, ctx, out), moet::Error);

  CHECK_THROWS_WITH(
      gate.set_gate_embeddings(moet::RowMatrix<float>::Ones(3, 4), moet::WeightLayout::kInOut),
      Contains("(4, 3)") && Contains("got (3, 4): looks transposed"));
  CHECK_THROWS_WITH(gate.set_thresholds(moet::Vector<float>::Zero(2)),
                    Contains("3 entries") && Contains("got 2"));
  CHECK_THROWS_WITH(gate.set_expert_mask((moet::Vector<float>(3) << 1, 0.5f, 0).finished()),
                    Contains("0 or 1") && Contains("got 0.5"));
  CHECK_THROWS_WITH(gate.set_expert_active(3, true), Contains("[0, 3)") && Contains("got 3"));
  CHECK_THROWS_WITH(gate.set_temperature(-2.0f), Contains("got -2"));
  CHECK_THROWS_WITH(gate.set_thresholds((moet::Vector<float>(3) << NAN, 0, 0).finished()),
                    Contains("thresholds must be finite"));
}

TEST_CASE("TopAnyGate gives an empty plan for an empty batch", "[gate][top_any][edge]") {
  Gate gate({.model_dim = 4, .num_experts = 5, .initial_experts = 2});
  const moet::RowMatrix<float> x(0, 4);
  moet::Routing<float> out;
  for (const bool training : {true, false}) {
    moet::RouteContext ctx;
    ctx.training = training;
    gate.route(x, ctx, out);
    CHECK(out.num_tokens() == 0);
    CHECK(out.num_experts() == 5);
    CHECK(out.num_assignments() == 0);
    CHECK(out.live_experts == 2);
  }
}

TEST_CASE("TopAnyGate plans are bit-identical with 1 and 2 threads", "[gate][top_any][parallel]") {
  const auto seed = GENERATE(41u, 42u);
  const bool training = GENERATE(true, false);
  Gate gate({.model_dim = 24,
             .num_experts = 16,
             .initial_experts = 12,
             .variant = moet::TopAnyVariant::kTutel,
             .init_seed = seed});
  gate.set_thresholds(moet::Vector<float>::Constant(gate.num_experts(), 0.15f));
  const auto x = random_tokens(1500, 24, seed);  // several routing and product blocks
  moet::RouteContext ctx;
  ctx.training = training;
  const int saved = moet::num_threads();
  moet::Routing<float> one;
  moet::Routing<float> two;
  moet::set_num_threads(1);
  gate.route(x, ctx, one);
  moet::set_num_threads(2);
  gate.route(x, ctx, two);
  moet::set_num_threads(saved);
  check_same_plan(one, two);
  CHECK(one.num_assignments() > 0);
}

}  // namespace test_gate_top_any
