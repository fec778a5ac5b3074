// ImportanceGate: the DA-MoE reconstruction (attention importance -> experts per token).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/gates/importance.hpp"

namespace test_gate_importance {  // one per file: the unity build puts several files in one TU

namespace {

using Gate = moet::ImportanceGate<float>;
using moet::Index;
using moet::ImportanceNorm;

struct NotAGate {
  using Scalar = float;
  Index num_experts() const { return 1; }
  void route(int) const {}
};

static_assert(moet::Gate<moet::ImportanceGate<float>>,
              "ImportanceGate<float> must satisfy moet::Gate");
static_assert(moet::Gate<moet::ImportanceGate<double>>,
              "ImportanceGate<double> must satisfy moet::Gate");
static_assert(!moet::Gate<NotAGate>, "a route() of the wrong signature is not a Gate");

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

// Random softmax attention [batch, heads, L, L]; causal rows only see keys j <= i, pad keys
// get no attention from anyone.
std::vector<float> random_attention(Index batch, Index heads, Index len, bool causal,
                                    const std::vector<std::uint8_t>& valid, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, 1.5);
  std::vector<float> a(static_cast<std::size_t>(batch * heads * len * len), 0.0f);
  for (Index b = 0; b < batch; ++b) {
    for (Index h = 0; h < heads; ++h) {
      for (Index i = 0; i < len; ++i) {
        std::vector<double> row(static_cast<std::size_t>(len), 0.0);
        double sum = 0.0;
        for (Index j = 0; j < len; ++j) {
          const bool key_ok = valid.empty() || valid[static_cast<std::size_t>(b * len + j)] != 0;
          if ((causal && j > i) || !key_ok) continue;
          row[static_cast<std::size_t>(j)] = std::exp(dist(gen));
          sum += row[static_cast<std::size_t>(j)];
        }
        for (Index j = 0; j < len; ++j) {
          a[static_cast<std::size_t>(((b * heads + h) * len + i) * len + j)] =
              sum > 0.0 ? static_cast<float>(row[static_cast<std::size_t>(j)] / sum) : 0.0f;
        }
      }
    }
  }
  return a;
}

// Column mean over valid queries and heads (causal: over valid queries i >= j), in double.
std::vector<double> naive_importance(const std::vector<float>& a, Index batch, Index heads,
                                     Index len, bool causal,
                                     const std::vector<std::uint8_t>& valid) {
  const auto ok = [&](Index t) { return valid.empty() || valid[static_cast<std::size_t>(t)] != 0; };
  std::vector<double> imp(static_cast<std::size_t>(batch * len), 0.0);
  for (Index b = 0; b < batch; ++b) {
    for (Index j = 0; j < len; ++j) {
      if (!ok(b * len + j)) continue;
      double sum = 0.0;
      Index queries = 0;
      for (Index i = 0; i < len; ++i) {
        if (!ok(b * len + i) || (causal && i < j)) continue;
        ++queries;
        for (Index h = 0; h < heads; ++h) {
          sum += a[static_cast<std::size_t>(((b * heads + h) * len + i) * len + j)];
        }
      }
      if (queries > 0) {
        imp[static_cast<std::size_t>(b * len + j)] =
            sum / static_cast<double>(heads * queries);
      }
    }
  }
  return imp;
}

// Experts per token from importance, per group of `group` tokens, written from the spec.
std::vector<Index> naive_k(const std::vector<double>& imp, const std::vector<std::uint8_t>& valid,
                           Index group, ImportanceNorm norm, Index k_min, Index k_max,
                           double k_avg) {
  const auto ok = [&](std::size_t t) { return valid.empty() || valid[t] != 0; };
  std::vector<Index> k(imp.size(), 0);
  for (std::size_t g0 = 0; g0 < imp.size(); g0 += static_cast<std::size_t>(group)) {
    const std::size_t g1 = g0 + static_cast<std::size_t>(group);
    std::vector<double> v;
    for (std::size_t t = g0; t < g1; ++t) {
      if (ok(t)) v.push_back(imp[t]);
    }
    if (v.empty()) continue;
    const double mx = *std::max_element(v.begin(), v.end());
    const double mn = *std::min_element(v.begin(), v.end());
    const double mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
    for (std::size_t t = g0; t < g1; ++t) {
      if (!ok(t)) continue;
      double kk = 0.0;
      if (mx == mn) {
        kk = norm == ImportanceNorm::kBudget ? std::round(k_avg) : static_cast<double>(k_max);
      } else if (norm == ImportanceNorm::kMax) {
        kk = std::ceil(imp[t] / mx * static_cast<double>(k_max) - 1e-6);
      } else if (norm == ImportanceNorm::kMinMax) {
        kk = static_cast<double>(k_min) +
             std::ceil((imp[t] - mn) / (mx - mn) * static_cast<double>(k_max - k_min) - 1e-6);
      } else {
        kk = std::ceil(k_avg * imp[t] / mean - 1e-6);
      }
      k[t] = std::clamp(static_cast<Index>(kk), k_min, k_max);
    }
  }
  return k;
}

// Top-k of the gate's own P row by a stable descending sort (ties to the lower id).
std::vector<int> naive_top(const moet::Routing<float>& out, Index t, Index k) {
  std::vector<int> ids(static_cast<std::size_t>(out.num_experts()));
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(),
                   [&](int a, int b) { return out.probs()(t, a) > out.probs()(t, b); });
  ids.resize(static_cast<std::size_t>(k));
  return ids;
}

// Checks the plan against K and the naive selection, with raw or renormalised weights.
void check_plan(const moet::Routing<float>& out, const std::vector<Index>& k, bool renormalize) {
  REQUIRE(out.num_tokens() == static_cast<Index>(k.size()));
  for (Index t = 0; t < out.num_tokens(); ++t) {
    const Index want_k = k[static_cast<std::size_t>(t)];
    REQUIRE(out.k(t) == want_k);
    const auto want = naive_top(out, t, want_k);
    REQUIRE(experts_of(out, t) == want);
    double selected = 0.0;
    for (const int e : want) selected += out.probs()(t, e);
    double sum = 0.0;
    for (std::size_t j = 0; j < want.size(); ++j) {
      const double p = out.probs()(t, want[j]);
      CHECK(out.weights(t)[j] == Approx(renormalize ? p / selected : p).epsilon(1e-5));
      sum += out.weights(t)[j];
    }
    if (want_k > 0) {
      if (renormalize) {
        CHECK(sum == Approx(1.0).epsilon(1e-5));
      } else {
        CHECK(sum <= 1.0 + 1e-6);
      }
    }
  }
}

Gate make_gate(Index num_experts, Index k_min, Index k_max, ImportanceNorm norm = ImportanceNorm::kMax,
               double k_avg = 2.0, bool renormalize = false, std::uint64_t seed = 0) {
  return Gate({.model_dim = 6,
               .num_experts = num_experts,
               .k_min = k_min,
               .k_max = k_max,
               .norm = norm,
               .k_avg = k_avg,
               .renormalize = renormalize,
               .init_seed = seed});
}

std::vector<Index> route_k(const Gate& gate, const moet::RouteContext& ctx, Index num_tokens) {
  moet::Routing<float> out;
  gate.route(random_matrix(num_tokens, gate.model_dim(), 99), ctx, out);
  std::vector<Index> k;
  for (Index t = 0; t < num_tokens; ++t) k.push_back(out.k(t));
  return k;
}

}  // namespace

TEST_CASE("ImportanceGate column-mean importance, hand-computed", "[gate][importance]") {
  // One sequence, one head, L = 3, non-causal rows:
  //   query 0: 0.5 0.25 0.25 / query 1: 0.5 0.5 0 / query 2: 1 0 0
  // column means: 2/3, 0.75/3, 0.25/3; u = 1, 0.375, 0.125; K = ceil(4u) = 4, 2, 1.
  const std::vector<float> a{0.5f, 0.25f, 0.25f, 0.5f, 0.5f, 0.0f, 1.0f, 0.0f, 0.0f};
  moet::RouteContext ctx;
  ctx.attention = {a.data(), 1, 1, 3};
  const auto gate = make_gate(6, 1, 4);
  CHECK(route_k(gate, ctx, 3) == std::vector<Index>{4, 2, 1});
}

TEST_CASE("ImportanceGate causal importance divides by the queries that can see the key",
          "[gate][importance]") {
  // Causal L = 3: query 0: 1 0 0 / query 1: 0.5 0.5 0 / query 2: 0.2 0.3 0.5
  // column sums 1.7, 0.8, 0.5; divisors 3, 2, 1 -> 0.5667, 0.4, 0.5;
  // u = 1, 0.7059, 0.8824 -> K = ceil(4u) = 4, 3, 4.
  const std::vector<float> a{1.0f, 0.0f, 0.0f, 0.5f, 0.5f, 0.0f, 0.2f, 0.3f, 0.5f};
  moet::RouteContext ctx;
  ctx.attention = {a.data(), 1, 1, 3, true};
  const auto gate = make_gate(6, 1, 4);
  CHECK(route_k(gate, ctx, 3) == std::vector<Index>{4, 3, 4});
  // Read as non-causal, the same matrix favours the first token: 1.7/3, 0.8/3, 0.5/3 ->
  // u = 1, 0.47, 0.29 -> K = 4, 2, 2.
  ctx.attention.causal = false;
  CHECK(route_k(gate, ctx, 3) == std::vector<Index>{4, 2, 2});
}

TEST_CASE("ImportanceGate gives pads K = 0 and does not count them as queries",
          "[gate][importance]") {
  // L = 3, token 2 is a pad. Query 2's row would give key 1 everything; it must be ignored.
  //   query 0: 0.75 0.25 0 / query 1: 0.5 0.5 0 / query 2 (pad): 0 1 0
  // valid columns: key 0 -> (0.75 + 0.5) / 2 = 0.625, key 1 -> 0.375; u = 1, 0.6 -> 4, 3.
  const std::vector<float> a{0.75f, 0.25f, 0.0f, 0.5f, 0.5f, 0.0f, 0.0f, 1.0f, 0.0f};
  const std::vector<std::uint8_t> valid{1, 1, 0};
  moet::RouteContext ctx;
  ctx.attention = {a.data(), 1, 1, 3};
  ctx.valid = valid;
  const auto gate = make_gate(6, 1, 4);
  moet::Routing<float> out;
  gate.route(random_matrix(3, 6, 5), ctx, out);
  CHECK(out.k(0) == 4);
  CHECK(out.k(1) == 3);
  CHECK(out.k(2) == 0);
  CHECK(out.num_assignments() == 7);
  // With given importance, pads get K = 0 whatever their value.
  const std::vector<float> imp{1.0f, 0.5f, 100.0f};
  moet::RouteContext ctx2;
  ctx2.importance = imp;
  ctx2.valid = valid;
  CHECK(route_k(gate, ctx2, 3) == std::vector<Index>{4, 2, 0});
}

TEST_CASE("ImportanceGate maps importance to K: max, min-max and budget, by hand",
          "[gate][importance]") {
  moet::RouteContext ctx;
  SECTION("kMax keeps exact ratios exact") {
    // u * 4 = 4, 1, 2 exactly: the slack keeps 1 and 2 from rounding up.
    const std::vector<float> imp{4.0f, 1.0f, 2.0f, 0.0f};
    ctx.importance = imp;
    CHECK(route_k(make_gate(6, 1, 4), ctx, 4) == std::vector<Index>{4, 1, 2, 1});
    CHECK(route_k(make_gate(6, 2, 4), ctx, 4) == std::vector<Index>{4, 2, 2, 2});  // k_min
  }
  SECTION("kMinMax sends the least important to k_min, the most to k_max") {
    // u = 0, 0.5, 1, 0.25 -> 1 + ceil(3u) = 1, 3, 4, 2.
    const std::vector<float> imp{0.0f, 0.5f, 1.0f, 0.25f};
    ctx.importance = imp;
    CHECK(route_k(make_gate(6, 1, 4, ImportanceNorm::kMinMax), ctx, 4) ==
          std::vector<Index>{1, 3, 4, 2});
    // k_min 2: 2 + ceil(2u) = 2, 3, 4, 3.
    CHECK(route_k(make_gate(6, 2, 4, ImportanceNorm::kMinMax), ctx, 4) ==
          std::vector<Index>{2, 3, 4, 3});
  }
  SECTION("kBudget scales k_avg by importance / mean") {
    // mean 3; 2 * imp / 3 = 0.67, 1.33, 2, 4 -> 1, 2, 2, 4.
    const std::vector<float> imp{1.0f, 2.0f, 3.0f, 6.0f};
    ctx.importance = imp;
    CHECK(route_k(make_gate(6, 1, 4, ImportanceNorm::kBudget, 2.0), ctx, 4) ==
          std::vector<Index>{1, 2, 2, 4});
    // k_max 3 clamps the last.
    CHECK(route_k(make_gate(6, 1, 3, ImportanceNorm::kBudget, 2.0), ctx, 4) ==
          std::vector<Index>{1, 2, 2, 3});
  }
}

TEST_CASE("ImportanceGate constant or all-zero importance gives u = 1", "[gate][importance]") {
  const std::vector<float> zeros(5, 0.0f);
  const std::vector<float> same(5, 0.3f);
  for (const auto* imp : {&zeros, &same}) {
    moet::RouteContext ctx;
    ctx.importance = *imp;
    CHECK(route_k(make_gate(6, 1, 3, ImportanceNorm::kMax), ctx, 5) == std::vector<Index>(5, 3));
    CHECK(route_k(make_gate(6, 1, 3, ImportanceNorm::kMinMax), ctx, 5) ==
          std::vector<Index>(5, 3));
    // Budget: round(k_avg), half away from zero.
    CHECK(route_k(make_gate(6, 1, 4, ImportanceNorm::kBudget, 2.5), ctx, 5) ==
          std::vector<Index>(5, 3));
    CHECK(route_k(make_gate(6, 1, 4, ImportanceNorm::kBudget, 2.3), ctx, 5) ==
          std::vector<Index>(5, 2));
  }
  // All-zero attention.
  const std::vector<float> a(2 * 2 * 4 * 4, 0.0f);
  moet::RouteContext ctx;
  ctx.attention = {a.data(), 2, 2, 4};
  CHECK(route_k(make_gate(6, 1, 4), ctx, 8) == std::vector<Index>(8, 4));
}

TEST_CASE("ImportanceGate normalises each sequence separately", "[gate][importance]") {
  // Two sequences of 2: (1, 0.5) and (10, 5) give the same K per position under kMax.
  const std::vector<float> imp{1.0f, 0.5f, 10.0f, 5.0f};
  moet::RouteContext ctx;
  ctx.importance = imp;
  ctx.sequence_length = 2;
  CHECK(route_k(make_gate(6, 1, 4), ctx, 4) == std::vector<Index>{4, 2, 4, 2});
  // One group (sequence_length 0): 1 / 10 * 4 -> 1, 0.5 / 10 * 4 -> 1.
  ctx.sequence_length = 0;
  CHECK(route_k(make_gate(6, 1, 4), ctx, 4) == std::vector<Index>{1, 1, 4, 2});
}

TEST_CASE("ImportanceGate matches a naive reconstruction on random attention",
          "[gate][importance]") {
  const auto seed = GENERATE(1u, 2u, 3u);
  const bool causal = GENERATE(false, true);
  const auto norm = GENERATE(ImportanceNorm::kMax, ImportanceNorm::kMinMax, ImportanceNorm::kBudget);
  const bool pads = GENERATE(false, true);
  const bool renormalize = GENERATE(false, true);
  const Index batch = 3, heads = 2, len = 70, num_experts = 8;  // len > 64: two key blocks
  const Index k_min = 1, k_max = 5;
  std::vector<std::uint8_t> valid;
  if (pads) {
    valid.assign(static_cast<std::size_t>(batch * len), 1);
    for (Index i = 50; i < len; ++i) valid[static_cast<std::size_t>(0 * len + i)] = 0;
    for (Index i = 10; i < len; ++i) valid[static_cast<std::size_t>(2 * len + i)] = 0;
  }
  const auto a = random_attention(batch, heads, len, causal, valid, seed);
  moet::RouteContext ctx;
  ctx.attention = {a.data(), batch, heads, len, causal};
  ctx.valid = valid;
  Gate gate({.model_dim = 6,
             .num_experts = num_experts,
             .k_min = k_min,
             .k_max = k_max,
             .norm = norm,
             .k_avg = 2.0,
             .renormalize = renormalize,
             .init_seed = seed});
  moet::Routing<float> out;
  gate.route(random_matrix(batch * len, 6, seed + 10, 2.0f), ctx, out);
  const auto imp = naive_importance(a, batch, heads, len, causal, valid);
  const auto k = naive_k(imp, valid, len, norm, k_min, k_max, 2.0);
  check_plan(out, k, renormalize);
  CHECK(out.probs_are_distribution);
  for (Index t = 0; t < batch * len; ++t) {
    if (!valid.empty() && valid[static_cast<std::size_t>(t)] == 0) {
      CHECK(out.k(t) == 0);
    } else {
      CHECK(out.k(t) >= k_min);
    }
  }
}

TEST_CASE("ImportanceGate matches a naive reconstruction on given importance",
          "[gate][importance]") {
  const auto seed = GENERATE(4u, 5u, 6u);
  const auto norm = GENERATE(ImportanceNorm::kMax, ImportanceNorm::kMinMax, ImportanceNorm::kBudget);
  const Index group = GENERATE(0, 25);
  const Index num_tokens = 100;
  std::mt19937 gen(seed);
  std::exponential_distribution<float> dist(1.0f);
  std::vector<float> imp(static_cast<std::size_t>(num_tokens));
  for (auto& v : imp) v = dist(gen);
  imp[7] = 0.0f;
  moet::RouteContext ctx;
  ctx.importance = imp;
  ctx.sequence_length = group;
  Gate gate({.model_dim = 6,
             .num_experts = 6,
             .k_min = 2,
             .k_max = 6,
             .norm = norm,
             .k_avg = 3.0,
             .init_seed = seed});
  moet::Routing<float> out;
  gate.route(random_matrix(num_tokens, 6, seed + 20), ctx, out);
  const std::vector<double> imp_d(imp.begin(), imp.end());
  check_plan(out, naive_k(imp_d, {}, group == 0 ? num_tokens : group, norm, 2, 6, 3.0), false);
}

TEST_CASE("ImportanceGate with E = 1 sends valid tokens to expert 0 with weight 1",
          "[gate][importance]") {
  const std::vector<float> imp{0.1f, 2.0f, 0.0f, 1.0f};
  const std::vector<std::uint8_t> valid{1, 1, 1, 0};
  moet::RouteContext ctx;
  ctx.importance = imp;
  ctx.valid = valid;
  Gate gate({.model_dim = 3, .num_experts = 1, .k_min = 1, .k_max = 1});
  moet::Routing<float> out;
  gate.route(random_matrix(4, 3, 1), ctx, out);
  for (Index t = 0; t < 3; ++t) {
    REQUIRE(out.k(t) == 1);
    CHECK(out.experts(t)[0] == 0);
    CHECK(out.weights(t)[0] == 1.0f);
  }
  CHECK(out.k(3) == 0);
}

TEST_CASE("ImportanceGate gives an empty plan for an empty batch", "[gate][importance]") {
  const auto gate = make_gate(6, 1, 4);
  moet::Routing<float> out;
  gate.route(moet::RowMatrix<float>(0, 6), {}, out);
  CHECK(out.num_tokens() == 0);
  CHECK(out.num_assignments() == 0);
}

TEST_CASE("ImportanceGate rejects bad options", "[gate][importance][errors]") {
  using Catch::Contains;
  CHECK_THROWS_AS(make_gate(4, 1, 5), moet::Error);
  CHECK_THROWS_WITH(make_gate(4, 1, 5),
                    Contains("ImportanceGate") && Contains("k_max must be <= num_experts = 4, got 5"));
  CHECK_THROWS_WITH(make_gate(4, 0, 2), Contains("ImportanceGate") && Contains("k_min") &&
                                            Contains("got 0"));
  CHECK_THROWS_WITH(make_gate(4, 3, 2), Contains("ImportanceGate") && Contains("k_min") &&
                                            Contains("k_max = 2") && Contains("got 3"));
  CHECK_THROWS_WITH(make_gate(4, 1, 3, ImportanceNorm::kBudget, 3.5),
                    Contains("ImportanceGate") && Contains("k_avg") && Contains("3.5"));
  CHECK_THROWS_WITH(
      make_gate(4, 1, 3, ImportanceNorm::kBudget, std::numeric_limits<double>::quiet_NaN()),
      Contains("k_avg") && Contains("nan"));
  CHECK_NOTHROW(make_gate(4, 1, 1, ImportanceNorm::kMax, 2.0));  // k_avg unused by kMax
  CHECK_THROWS_WITH(make_gate(0, 1, 1),
                    Contains("ImportanceGate") && Contains("num_experts must be >= 1, got 0"));
  CHECK_THROWS_WITH(Gate({.model_dim = 0, .num_experts = 4}),
                    Contains("ImportanceGate") && Contains("model_dim must be >= 1, got 0"));
}

TEST_CASE("ImportanceGate rejects bad input and context", "[gate][importance][errors]") {
  using Catch::Contains;
  const auto gate = make_gate(6, 1, 4);
  moet::Routing<float> out;
  const auto x = random_matrix(6, 6, 3);
  moet::RouteContext ctx;
  CHECK_THROWS_WITH(gate.route(x, ctx, out),
                    "[moet::ImportanceGate] needs ctx.importance or ctx.attention");

  std::vector<float> imp(5, 1.0f);
  ctx.importance = imp;
  CHECK_THROWS_WITH(gate.route(x, ctx, out), Contains("ImportanceGate") &&
                                                 Contains("ctx.importance") && Contains("(6)") &&
                                                 Contains("got 5"));
  imp.assign(6, 1.0f);
  imp[4] = -1.0f;
  ctx.importance = imp;
  CHECK_THROWS_WITH(gate.route(x, ctx, out),
                    Contains("ImportanceGate") && Contains("-1") && Contains("token 4"));
  imp[4] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(gate.route(x, ctx, out), Contains("ImportanceGate") && Contains("nan"));
  imp[4] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(gate.route(x, ctx, out), Contains("ImportanceGate") && Contains("inf"));
  imp[4] = 1.0f;
  ctx.sequence_length = 4;
  CHECK_THROWS_WITH(gate.route(x, ctx, out),
                    Contains("ImportanceGate") && Contains("sequence_length (4)"));
  ctx.sequence_length = 0;
  const std::vector<std::uint8_t> valid(5, 1);
  ctx.valid = valid;
  CHECK_THROWS_WITH(gate.route(x, ctx, out),
                    Contains("ImportanceGate") && Contains("ctx.valid") && Contains("got 5"));

  // Attention of the wrong shape: [2, 1, 3, 3] covers 6 tokens, x has 7.
  moet::RouteContext actx;
  std::vector<float> a(2 * 1 * 3 * 3, 1.0f / 3.0f);
  actx.attention = {a.data(), 2, 1, 3};
  const auto x7 = random_matrix(7, 6, 4);
  CHECK_THROWS_WITH(gate.route(x7, actx, out), Contains("ImportanceGate") &&
                                                   Contains("[2, 1, 3, 3]") &&
                                                   Contains("(7, 6)"));
  actx.attention.heads = 0;
  CHECK_THROWS_WITH(gate.route(x, actx, out), Contains("ImportanceGate") && Contains("[2, 0, 3, 3]"));
  actx.attention.heads = 1;
  a[13] = std::numeric_limits<float>::quiet_NaN();  // [1, 0, 1, 1]
  CHECK_THROWS_WITH(gate.route(x, actx, out), Contains("ImportanceGate") && Contains("nan") &&
                                                  Contains("[1, 0, 1, 1]"));
  a[13] = -0.5f;
  CHECK_THROWS_WITH(gate.route(x, actx, out), Contains("ImportanceGate") && Contains("-0.5"));
  a[13] = 1.0f / 3.0f;
  CHECK_NOTHROW(gate.route(x, actx, out));

  // Bad x.
  CHECK_THROWS_WITH(gate.route(random_matrix(6, 5, 1), actx, out),
                    Contains("ImportanceGate") && Contains("model_dim = 6") && Contains("got 5"));
  auto bad = x;
  bad(1, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(gate.route(bad, actx, out), Contains("ImportanceGate") && Contains("nan"));
}

TEST_CASE("ImportanceGate plans are bit-identical for 1 and 2 threads",
          "[gate][importance][parallel]") {
  const int saved = moet::num_threads();
  const Index batch = 10, heads = 2, len = 100;
  const auto a = random_attention(batch, heads, len, true, {}, 17);
  moet::RouteContext ctx;
  ctx.attention = {a.data(), batch, heads, len, true};
  Gate gate({.model_dim = 16, .num_experts = 16, .k_min = 1, .k_max = 6, .init_seed = 2});
  const auto x = random_matrix(batch * len, 16, 21);
  moet::Routing<float> one, two;
  moet::set_num_threads(1);
  gate.route(x, ctx, one);
  moet::set_num_threads(2);
  gate.route(x, ctx, two);
  moet::set_num_threads(saved);
  REQUIRE(one.num_assignments() == two.num_assignments());
  for (Index t = 0; t < batch * len; ++t) REQUIRE(one.k(t) == two.k(t));
  for (std::size_t i = 0; i < one.experts().size(); ++i) {
    REQUIRE(one.experts()[i] == two.experts()[i]);
    REQUIRE(one.weights()[i] == two.weights()[i]);
  }
  CHECK(one.probs() == two.probs());
}

}  // namespace test_gate_importance
