// GroupedTopKGate (DeepSeek-V2/V3 routing): the plan against a naive double port of
// modeling_deepseek.py's MoEGate (with -inf masking), the two scaling rules, the masking choice
// (-inf against the reference code's 0), equality with TopKGate for one group, backward against
// finite differences in double, thread-count independence, and every bad input.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/gates/grouped_top_k.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/concepts.hpp"

namespace test_gate_grouped_top_k {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;
using Gate = moet::GroupedTopKGate<float>;
using GateD = moet::GroupedTopKGate<double>;

static_assert(moet::TrainableGate<Gate>, "GroupedTopKGate<float> is trainable");
static_assert(moet::TrainableGate<GateD>, "GroupedTopKGate<double> is trainable");

template <class S>
RowMatrix<S> random_matrix(Index rows, Index cols, std::uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  RowMatrix<S> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(dist(gen));
  return m;
}

// A naive port of the reference MoEGate in double: ids in slot order and weights. `zero_mask`
// masks removed groups with 0 (the reference code) instead of -inf (moet).
struct Plan {
  std::vector<std::vector<Index>> ids;
  std::vector<std::vector<double>> weights;
};

template <class Options>
Plan naive(const RowMatrix<double>& x, const RowMatrix<double>& w, const std::vector<double>& bias,
           const Options& o, bool zero_mask = false) {
  Plan plan;
  const Index n = o.num_experts;
  const Index size = n / o.num_groups;
  for (Index t = 0; t < x.rows(); ++t) {
    std::vector<double> z(static_cast<std::size_t>(n), 0.0);
    for (Index e = 0; e < n; ++e) {
      for (Index i = 0; i < x.cols(); ++i) z[std::size_t(e)] += x(t, i) * w(i, e);
    }
    std::vector<double> s = z;
    if (o.scoring == moet::ExpertScoring::kSoftmax) {
      const double mx = *std::max_element(s.begin(), s.end());
      double sum = 0.0;
      for (double& v : s) sum += (v = std::exp(v - mx));
      for (double& v : s) v /= sum;
    } else {
      for (double& v : s) v = 1.0 / (1.0 + std::exp(-v));
    }
    std::vector<double> c(s.size());
    for (std::size_t e = 0; e < s.size(); ++e) c[e] = s[e] + (bias.empty() ? 0.0 : bias[e]);
    const auto top = [](const std::vector<double>& v, Index k) {
      std::vector<Index> idx(v.size());
      std::iota(idx.begin(), idx.end(), Index{0});
      std::stable_sort(idx.begin(), idx.end(),
                       [&](Index a, Index b) { return v[std::size_t(a)] > v[std::size_t(b)]; });
      idx.resize(std::size_t(k));
      return idx;
    };
    std::vector<double> group(std::size_t(o.num_groups));
    for (Index g = 0; g < o.num_groups; ++g) {
      std::vector<double> m(c.begin() + g * size, c.begin() + (g + 1) * size);
      std::sort(m.rbegin(), m.rend());
      group[std::size_t(g)] = o.group_score == moet::GroupScore::kMax ? m[0] : m[0] + m[1];
    }
    const auto kept = top(group, o.groups_kept);
    std::vector<double> masked(c.size(),
                               zero_mask ? 0.0 : -std::numeric_limits<double>::infinity());
    for (const Index g : kept) {
      for (Index e = g * size; e < (g + 1) * size; ++e) masked[std::size_t(e)] = c[std::size_t(e)];
    }
    const auto ids = top(masked, o.k);
    std::vector<double> wt;
    double sum = 0.0;
    for (const Index e : ids) sum += s[std::size_t(e)];
    const bool v3 = o.scaling == moet::WeightScaling::kAfterNormalization;
    for (const Index e : ids) {
      double v = s[std::size_t(e)];
      if (v3) {
        v = (o.renormalize ? v / (sum + 1e-20) : v) * o.scaling_factor;
      } else {
        v = (o.k > 1 && o.renormalize) ? v / (sum + 1e-20) : v * o.scaling_factor;
      }
      wt.push_back(v);
    }
    plan.ids.push_back(ids);
    plan.weights.push_back(wt);
  }
  return plan;
}

template <class G, class S>
void check_plan(const moet::Routing<S>& routing, const Plan& want, double tol) {
  REQUIRE(routing.num_tokens() == static_cast<Index>(want.ids.size()));
  for (Index t = 0; t < routing.num_tokens(); ++t) {
    INFO("token " << t);
    const auto ids = routing.experts(t);
    const auto w = routing.weights(t);
    REQUIRE(ids.size() == want.ids[std::size_t(t)].size());
    for (std::size_t j = 0; j < ids.size(); ++j) {
      CHECK(ids[j] == want.ids[std::size_t(t)][j]);
      CHECK(static_cast<double>(w[j]) ==
            Approx(want.weights[std::size_t(t)][j]).epsilon(tol).margin(tol));
    }
  }
}

struct Config {
  const char* name;
  Gate::Options options;
};

std::vector<Config> configs(Index d) {
  return {
      {"V2 group_limited_greedy, not renormalised, scaled",
       Gate::deepseek_v2_options(d, 16, 3, 4, 2, false, 16.0)},
      {"V2 group_limited_greedy, renormalised, not scaled",
       Gate::deepseek_v2_options(d, 16, 3, 4, 2, true, 16.0)},
      {"V3 noaux_tc", Gate::deepseek_v3_options(d, 16, 4, 4, 2, 2.5)},
      {"V3 noaux_tc, not renormalised",
       {.model_dim = d,
        .num_experts = 16,
        .k = 4,
        .scoring = moet::ExpertScoring::kSigmoid,
        .num_groups = 8,
        .groups_kept = 3,
        .group_score = moet::GroupScore::kTopTwoSum,
        .renormalize = false,
        .scaling_factor = 1.5}},
      {"softmax top-2, one group", Gate::softmax_top_k_options(d, 8, 2, true)},
      {"sigmoid top-1, V2 scaling with renormalize and k = 1",
       {.model_dim = d,
        .num_experts = 6,
        .k = 1,
        .scoring = moet::ExpertScoring::kSigmoid,
        .num_groups = 3,
        .groups_kept = 1,
        .renormalize = true,
        .scaling_factor = 2.0,
        .scaling = moet::WeightScaling::kInsteadOfNormalization}},
  };
}

}  // namespace

TEST_CASE("GroupedTopKGate matches a naive port of DeepSeek's MoEGate", "[gate][grouped_top_k]") {
  const Index d = 12;
  const auto seed = GENERATE(1u, 2u, 3u);
  for (const auto& config : configs(d)) {
    INFO(config.name << ", seed " << seed);
    Gate gate(config.options);
    const auto w = random_matrix<float>(d, config.options.num_experts, seed, 0.5);
    gate.set_router(w, moet::WeightLayout::kInOut);
    std::vector<float> bias(std::size_t(config.options.num_experts));
    std::mt19937 gen(seed + 50);
    std::uniform_real_distribution<float> u(0.0f, 0.3f);
    for (auto& b : bias) b = u(gen);
    gate.set_score_bias(bias);
    const auto x = random_matrix<float>(40, d, seed + 10);
    moet::Routing<float> plan;
    gate.route(x, {}, plan);
    const Plan want = naive(x.cast<double>(), w.cast<double>(),
                            std::vector<double>(bias.begin(), bias.end()), config.options);
    check_plan<Gate>(plan, want, 2e-5);
    CHECK(plan.probs_are_distribution == (config.options.scoring == moet::ExpertScoring::kSoftmax));
    CHECK(plan.mean_k() == Approx(double(config.options.k)));
  }
}

TEST_CASE("GroupedTopKGate selects only inside the kept groups", "[gate][grouped_top_k]") {
  const Index d = 10;
  Gate gate(Gate::deepseek_v3_options(d, 16, 4, 4, 2, 1.0));
  gate.set_router(random_matrix<float>(d, 16, 9, 0.7), moet::WeightLayout::kInOut);
  const auto x = random_matrix<float>(64, d, 10);
  moet::Routing<float> plan;
  gate.route(x, {}, plan);
  for (Index t = 0; t < x.rows(); ++t) {
    std::vector<Index> groups;
    for (const auto e : plan.experts(t)) groups.push_back(e / 4);
    std::sort(groups.begin(), groups.end());
    groups.erase(std::unique(groups.begin(), groups.end()), groups.end());
    CHECK(groups.size() <= 2);
    // Slots by descending selection score.
    const auto s = plan.probs().row(t);
    for (std::size_t j = 1; j < plan.experts(t).size(); ++j) {
      CHECK(s(plan.experts(t)[j - 1]) >= s(plan.experts(t)[j]));
    }
  }
}

TEST_CASE("GroupedTopKGate masks removed groups with -inf, not with the reference code's 0",
          "[gate][grouped_top_k]") {
  // Sigmoid scores 0.5 (zero logits) plus negative biases: every selection score is negative.
  // Group 0 has the best top-2 sum and is the one kept. With 0-masking, the removed groups'
  // experts (selection score 0) outrank group 0's (negative), so the reference code picks
  // experts of a removed group; moet keeps the selection inside the kept group.
  const Index d = 4;
  Gate::Options o = Gate::deepseek_v3_options(d, 8, 2, 4, 1, 1.0);
  Gate gate(o);
  RowMatrix<float> w = RowMatrix<float>::Zero(d, 8);
  gate.set_router(w, moet::WeightLayout::kInOut);
  const std::vector<float> bias = {-0.55f, -0.6f, -0.8f, -0.9f, -0.7f, -0.9f, -0.9f, -0.9f};
  gate.set_score_bias(bias);
  const RowMatrix<float> x = RowMatrix<float>::Ones(1, d);
  moet::Routing<float> plan;
  gate.route(x, {}, plan);
  // Group scores (top-2 sums): -0.15, -0.7, -0.6, -0.8: group 0 is kept.
  REQUIRE(plan.k(0) == 2);
  CHECK(plan.experts(0)[0] == 0);
  CHECK(plan.experts(0)[1] == 1);
  const std::vector<double> b(bias.begin(), bias.end());
  CHECK(naive(x.cast<double>(), w.cast<double>(), b, o).ids[0] == std::vector<Index>{0, 1});
  CHECK(naive(x.cast<double>(), w.cast<double>(), b, o, /*zero_mask=*/true).ids[0] ==
        std::vector<Index>{2, 3});  // group 1, which the group limit removed

  // Where the selection scores are positive (no negative bias) the two rules agree, and moet
  // matches both.
  const auto w2 = random_matrix<float>(d, 8, 31);
  const auto x2 = random_matrix<float>(32, d, 32);
  gate.set_router(w2, moet::WeightLayout::kInOut);
  gate.set_score_bias(std::vector<float>(8, 0.1f));
  moet::Routing<float> positive;
  gate.route(x2, {}, positive);
  const std::vector<double> b2(8, 0.1);
  const Plan minus_inf = naive(x2.cast<double>(), w2.cast<double>(), b2, o);
  const Plan zero = naive(x2.cast<double>(), w2.cast<double>(), b2, o, true);
  CHECK(minus_inf.ids == zero.ids);
  check_plan<Gate>(positive, zero, 2e-5);
}

TEST_CASE("GroupedTopKGate applies V2's and V3's scaling rules", "[gate][grouped_top_k]") {
  const Index d = 6;
  const auto w = random_matrix<float>(d, 8, 4);
  const auto x = random_matrix<float>(5, d, 5);
  const auto sum_of = [&](const Gate::Options& o) {
    Gate gate(o);
    gate.set_router(w, moet::WeightLayout::kInOut);
    moet::Routing<float> plan;
    gate.route(x, {}, plan);
    std::vector<double> sums;
    for (Index t = 0; t < x.rows(); ++t) {
      double s = 0.0;
      for (const float v : plan.weights(t)) s += double(v);
      sums.push_back(s);
    }
    return sums;
  };
  // V3: renormalised, then scaled: the weights add up to the factor.
  for (const double s : sum_of(Gate::deepseek_v3_options(d, 8, 3, 2, 1, 2.5))) {
    CHECK(s == Approx(2.5).epsilon(1e-6));
  }
  // V2, renormalised with k > 1: not scaled.
  for (const double s : sum_of(Gate::deepseek_v2_options(d, 8, 3, 2, 1, true, 16.0))) {
    CHECK(s == Approx(1.0).epsilon(1e-6));
  }
  // V2, not renormalised: scaled softmax probabilities (below the factor).
  for (const double s : sum_of(Gate::deepseek_v2_options(d, 8, 3, 2, 1, false, 16.0))) {
    CHECK(s < 16.0);
    CHECK(s > 0.0);
  }
}

TEST_CASE("GroupedTopKGate with one group is TopKGate's softmax top-k", "[gate][grouped_top_k]") {
  const Index d = 16;
  const bool renormalize = GENERATE(false, true);
  Gate grouped(Gate::softmax_top_k_options(d, 8, 2, renormalize));
  moet::TopKGate<float> top_k(
      {.model_dim = d, .num_experts = 8, .k = 2, .renormalize = renormalize});
  const auto w = random_matrix<float>(d, 8, 6);
  grouped.set_router(w, moet::WeightLayout::kInOut);
  top_k.set_router(w, moet::WeightLayout::kInOut);
  const auto x = random_matrix<float>(100, d, 7);
  moet::Routing<float> a, b;
  grouped.route(x, {}, a);
  top_k.route(x, {}, b);
  CHECK(std::vector<std::int32_t>(a.experts().begin(), a.experts().end()) ==
        std::vector<std::int32_t>(b.experts().begin(), b.experts().end()));
  for (std::size_t i = 0; i < a.weights().size(); ++i) {
    CHECK(a.weights()[i] == Approx(b.weights()[i]).epsilon(1e-6));
  }
  CHECK(a.probs() == b.probs());
}

TEST_CASE("GroupedTopKGate backward matches finite differences in double",
          "[gate][grouped_top_k][train][grad]") {
  const Index d = 5;
  const Index tokens = 9;
  auto o = GENERATE(GateD::deepseek_v2_options(5, 8, 3, 4, 2, false, 16.0),
                    GateD::deepseek_v2_options(5, 8, 3, 4, 2, true, 16.0),
                    GateD::deepseek_v3_options(5, 8, 3, 4, 2, 2.5),
                    GateD::Options{.model_dim = 5,
                                   .num_experts = 8,
                                   .k = 2,
                                   .scoring = moet::ExpertScoring::kSigmoid,
                                   .scaling_factor = 1.7});
  INFO("scoring " << int(o.scoring) << ", renormalize " << o.renormalize << ", scaling "
                  << int(o.scaling));
  GateD gate(o);
  gate.set_router(random_matrix<double>(d, 8, 11, 0.8), moet::WeightLayout::kInOut);
  std::vector<double> bias(8);
  for (std::size_t e = 0; e < 8; ++e) bias[e] = 0.05 * double(e % 3);
  gate.set_score_bias(bias);
  const RowMatrix<double> x = random_matrix<double>(tokens, d, 12);
  moet::Routing<double> plan;
  gate.route(x, {}, plan);
  const std::vector<std::int32_t> chosen(plan.experts().begin(), plan.experts().end());
  const auto c = random_matrix<double>(1, plan.num_assignments(), 13);
  const auto c_loss = random_matrix<double>(1, plan.num_assignments(), 16);
  const auto r = random_matrix<double>(tokens, 8, 14);
  const auto s = random_matrix<double>(tokens, 8, 15);
  const auto span = [](const RowMatrix<double>& m) {
    return std::span<const double>(m.data(), std::size_t(m.size()));
  };

  // L = sum_a (c_a + c'_a) w_a + sum r * probs + sum s * z, selection held fixed.
  const auto loss = [&](GateD& g, const RowMatrix<double>& in) {
    moet::Routing<double> p;
    g.route(in, {}, p);
    REQUIRE(std::vector<std::int32_t>(p.experts().begin(), p.experts().end()) == chosen);
    RowMatrix<double> z(in.rows(), 8);
    g.logits(in, z);
    double l = 0.0;
    for (Index a = 0; a < p.num_assignments(); ++a) {
      l += (c(0, a) + c_loss(0, a)) * p.weights()[std::size_t(a)];
    }
    l += (r.array() * p.probs().array()).sum() + (s.array() * z.array()).sum();
    return l;
  };
  gate.zero_grad();
  RowMatrix<double> dx = RowMatrix<double>::Zero(tokens, d);
  gate.backward(x, {}, plan, span(c),
                {.d_probs = span(r), .d_logits = span(s), .d_weights = span(c_loss)}, dx);
  const double eps = 1e-6;
  RowMatrix<double> fd_x(tokens, d);
  for (Index i = 0; i < x.size(); ++i) {
    RowMatrix<double> up = x, down = x;
    up.data()[i] += eps;
    down.data()[i] -= eps;
    fd_x.data()[i] = (loss(gate, up) - loss(gate, down)) / (2 * eps);
  }
  CHECK((dx - fd_x).norm() <= 1e-6 * fd_x.norm());
  RowMatrix<double> w = gate.router();
  RowMatrix<double> fd_w(d, 8);
  for (Index i = 0; i < w.size(); ++i) {
    RowMatrix<double> up = w, down = w;
    up.data()[i] += eps;
    down.data()[i] -= eps;
    gate.set_router(up, moet::WeightLayout::kInOut);
    const double lu = loss(gate, x);
    gate.set_router(down, moet::WeightLayout::kInOut);
    fd_w.data()[i] = (lu - loss(gate, x)) / (2 * eps);
  }
  gate.set_router(w, moet::WeightLayout::kInOut);
  CHECK((gate.router_grad() - fd_w).norm() <= 1e-6 * fd_w.norm());
  CHECK(fd_w.norm() > 0.0);
}

TEST_CASE("GroupedTopKGate plans and gradients are bit-identical for 1 and 2 threads",
          "[gate][grouped_top_k][parallel]") {
  const Index d = 20;
  const auto x = random_matrix<float>(300, d, 21);
  const auto run = [&](int threads, RowMatrix<float>& dx, RowMatrix<float>& dw) {
    const int saved = moet::num_threads();
    moet::set_num_threads(threads);
    Gate gate(Gate::deepseek_v3_options(d, 16, 4, 4, 2, 2.5));
    moet::Routing<float> plan;
    gate.route(x, {}, plan);
    std::vector<float> dw_plan(std::size_t(plan.num_assignments()), 0.25f);
    dx = RowMatrix<float>::Zero(x.rows(), d);
    gate.backward(x, {}, plan, dw_plan, {}, dx);
    dw = gate.router_grad();
    moet::set_num_threads(saved);
    return std::vector<float>(plan.weights().begin(), plan.weights().end());
  };
  RowMatrix<float> dx1, dx2, dw1, dw2;
  CHECK(run(1, dx1, dw1) == run(2, dx2, dw2));
  CHECK(dx1 == dx2);
  CHECK(dw1 == dw2);
}

TEST_CASE("GroupedTopKGate visits router.weight only and handles an empty batch",
          "[gate][grouped_top_k][train]") {
  Gate gate(Gate::deepseek_v3_options(4, 8, 2, 2, 1, 1.0));
  std::vector<std::string> names;
  gate.visit_parameters([&](std::string_view name, auto value, auto grad) {
    names.emplace_back(name);
    CHECK(value.rows() == 4);
    CHECK(grad.cols() == 8);
  });
  CHECK(names == std::vector<std::string>{"router.weight"});
  moet::Routing<float> plan;
  gate.route(RowMatrix<float>(0, 4), {}, plan);
  CHECK(plan.num_tokens() == 0);
  CHECK(plan.num_assignments() == 0);
  RowMatrix<float> dx(0, 4);
  gate.backward(RowMatrix<float>(0, 4), {}, plan, {}, {}, dx);
  CHECK(gate.router_grad().rows() == 4);
}

TEST_CASE("GroupedTopKGate rejects bad options and input", "[gate][grouped_top_k][errors]") {
  const auto make = [](Gate::Options o) { return Gate(o); };
  const Gate::Options good = Gate::deepseek_v3_options(4, 8, 2, 4, 2, 2.5);
  auto o = good;
  o.num_groups = 3;
  CHECK_THROWS_WITH(make(o), Contains("num_groups must be >= 1 and divide num_experts = 8, got 3"));
  o = good;
  o.groups_kept = 5;
  CHECK_THROWS_WITH(make(o), Contains("groups_kept must be in [1, num_groups = 4], got 5"));
  o = good;
  o.k = 5;
  CHECK_THROWS_WITH(make(o), Contains("k must be in [1, groups_kept * group size = 2 * 2 = 4]"));
  o = good;
  o.num_groups = 8;
  o.groups_kept = 2;
  o.k = 2;
  CHECK_THROWS_WITH(make(o), Contains("kTopTwoSum needs groups of at least 2 experts, got 1"));
  // One group ranks nothing: kTopTwoSum is accepted with groups of one expert (E = 1).
  CHECK_NOTHROW(make(Gate::deepseek_v3_options(4, 1, 1, 1, 1, 1.0)));
  o = good;
  o.scaling_factor = 0.0;
  CHECK_THROWS_WITH(make(o), Contains("scaling_factor must be > 0 and finite in the gate's "
                                      "scalar type, got 0"));
  // Finite as a double but not as a float: past float's range, or rounding to 0 (found by
  // the fuzzer: the weights became Inf).
  for (const double f : {1e300, 1e39, 1e-300}) {
    o.scaling_factor = f;
    CHECK_THROWS_WITH(make(o), Contains("scaling_factor must be > 0 and finite"));
  }
  o.scaling_factor = 1e38;  // the largest decade float holds
  CHECK_NOTHROW(make(o));
  o = good;
  o.model_dim = 0;
  CHECK_THROWS_AS(make(o), moet::Error);

  Gate gate(good);
  CHECK_THROWS_WITH(gate.set_score_bias(std::vector<float>(7, 0.0f)),
                    Contains("the bias needs num_experts = 8 values, got 7"));
  std::vector<float> nan_bias(8, 0.0f);
  nan_bias[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(gate.set_score_bias(nan_bias), Contains("for expert 3"));
  CHECK_THROWS_WITH(gate.set_router(RowMatrix<float>::Zero(4, 8), moet::WeightLayout::kOutIn),
                    Contains("looks transposed"));
  moet::Routing<float> plan;
  CHECK_THROWS_WITH(gate.route(RowMatrix<float>::Zero(3, 5), {}, plan),
                    Contains("x must have model_dim = 4 columns, got 5"));
  RowMatrix<float> x = RowMatrix<float>::Zero(3, 4);
  x(1, 2) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(gate.route(x, {}, plan), Contains("x must be finite"));
  RowMatrix<float> huge = RowMatrix<float>::Constant(2, 4, 1e38f);
  gate.set_router(RowMatrix<float>::Constant(4, 8, 1e38f), moet::WeightLayout::kInOut);
  CHECK_THROWS_WITH(gate.route(huge, {}, plan), Contains("router logits must be finite"));
  gate.set_router(RowMatrix<float>::Zero(4, 8), moet::WeightLayout::kInOut);
  const RowMatrix<float> ok = RowMatrix<float>::Ones(3, 4);
  gate.route(ok, {}, plan);
  RowMatrix<float> dx = RowMatrix<float>::Zero(3, 4);
  std::vector<float> short_dw(2, 0.0f);
  CHECK_THROWS_WITH(gate.backward(ok, {}, plan, short_dw, {}, dx),
                    Contains("GroupedTopKGate::backward"));
  RowMatrix<float> bad_dx = RowMatrix<float>::Zero(2, 4);
  std::vector<float> dw(std::size_t(plan.num_assignments()), 0.0f);
  CHECK_THROWS_WITH(gate.backward(ok, {}, plan, dw, {}, bad_dx), Contains("dx must be (3, 4)"));
}

}  // namespace test_gate_grouped_top_k
