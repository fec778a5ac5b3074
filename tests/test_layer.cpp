// MoELayer: input checks, the routed sum against a naive oracle, shared experts, statistics,
// thread-count independence and concurrent calls with separate workspaces.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/context.hpp"
#include "moet/detail/rng.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/dispatch/reference.hpp"
#include "moet/errors.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/layer.hpp"
#include "moet/routing.hpp"
#include "moet/stats.hpp"

namespace test_layer {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;

// A test-only gate: token t's experts and weights are a pure function of (seed, t). k ranges
// over 0..max_k, so tokens routed nowhere occur; every third expert (ids 1, 4, 7, ...) is never
// chosen, so idle experts occur. It ignores x's values (the layer checks them).
struct HashGate {
  using Scalar = float;
  Index dim = 0;
  Index experts = 0;
  std::uint64_t seed = 0;
  Index max_k = 3;

  Index num_experts() const { return experts; }
  Index model_dim() const { return dim; }

  void route(const moet::ConstRows<float>& x, const moet::RouteContext& ctx,
             moet::Routing<float>& out) const {
    using moet::detail::hash_key;
    const Index num_tokens = x.rows();
    out.reset(num_tokens, experts);
    std::vector<std::int32_t> usable;
    for (std::int32_t e = 0; e < static_cast<std::int32_t>(experts); ++e) {
      if (experts == 1 || e % 3 != 1) usable.push_back(e);
    }
    const auto limit =
        static_cast<std::uint64_t>(std::min<Index>(max_k, static_cast<Index>(usable.size())));
    const std::uint64_t key = seed ^ ctx.seed;
    for (Index t = 0; t < num_tokens; ++t) {
      out.counts()[static_cast<std::size_t>(t)] = static_cast<Index>(
          moet::detail::uniform_below(hash_key(key, static_cast<std::uint64_t>(t), 1), limit + 1));
    }
    out.commit_counts();
    for (Index t = 0; t < num_tokens; ++t) {
      std::vector<std::int32_t> pool = usable;
      const auto ids = out.experts(t);
      const auto weights = out.weights(t);
      for (std::size_t j = 0; j < ids.size(); ++j) {
        const auto pick =
            j + moet::detail::uniform_below(hash_key(key, static_cast<std::uint64_t>(t), 2, j),
                                            pool.size() - j);
        std::swap(pool[j], pool[pick]);
        ids[j] = pool[j];
        weights[j] = static_cast<float>(0.1 + 0.9 * moet::detail::uniform01(hash_key(
                                                        key, static_cast<std::uint64_t>(t), 3, j)));
      }
    }
  }
};
static_assert(moet::Gate<HashGate>);

using Glu = moet::SwiGluExperts<float>;
using Layer = moet::MoELayer<HashGate, Glu>;

template <class S>
moet::RowMatrix<S> random_rows(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  moet::RowMatrix<S> m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<S>(normal(gen));
  }
  return m;
}

// Naive SwiGLU expert e on one row, in double.
Eigen::RowVectorXd naive_swiglu(const Glu& bank, Index e, const Eigen::RowVectorXd& x) {
  const Index d = bank.model_dim();
  const Index f = bank.hidden_dim();
  const auto wg = bank.gate_weights(e);
  const auto wu = bank.up_weights(e);
  const auto wd = bank.down_weights(e);
  Eigen::RowVectorXd h(f);
  for (Index j = 0; j < f; ++j) {
    double g = 0.0;
    double u = 0.0;
    for (Index i = 0; i < d; ++i) {
      g += x(i) * static_cast<double>(wg(i, j));
      u += x(i) * static_cast<double>(wu(i, j));
    }
    h(j) = g / (1.0 + std::exp(-g)) * u;
  }
  Eigen::RowVectorXd y = Eigen::RowVectorXd::Zero(d);
  for (Index c = 0; c < d; ++c) {
    for (Index j = 0; j < f; ++j) y(c) += h(j) * static_cast<double>(wd(j, c));
  }
  return y;
}

// y_t = sum over the plan's slots of w * naive expert(x_t), in double.
Eigen::MatrixXd naive_routed(const Glu& bank, const moet::RowMatrix<float>& x,
                             const moet::Routing<float>& plan) {
  Eigen::MatrixXd y = Eigen::MatrixXd::Zero(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    const Eigen::RowVectorXd xt = x.row(t).cast<double>();
    for (std::size_t j = 0; j < plan.experts(t).size(); ++j) {
      y.row(t) +=
          static_cast<double>(plan.weights(t)[j]) * naive_swiglu(bank, plan.experts(t)[j], xt);
    }
  }
  return y;
}

// got ~ want: Frobenius-relative <= rel, and every element within rel * (|want| + rms(want)).
void check_close(const moet::RowMatrix<float>& got, const Eigen::MatrixXd& want, double rel) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const Eigen::MatrixXd g = got.cast<double>();
  CHECK((g - want).norm() <= rel * want.norm());
  const double rms =
      want.size() > 0 ? want.norm() / std::sqrt(static_cast<double>(want.size())) : 0.0;
  int bad = 0;
  for (Index i = 0; i < want.rows(); ++i) {
    for (Index j = 0; j < want.cols(); ++j) {
      if (!(std::abs(g(i, j) - want(i, j)) <= rel * (std::abs(want(i, j)) + rms))) ++bad;
    }
  }
  CHECK(bad == 0);
}

bool bit_identical(const moet::RowMatrix<float>& a, const moet::RowMatrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::equal(a.data(), a.data() + a.size(), b.data(),
                    [](float u, float v) { return std::memcmp(&u, &v, sizeof(float)) == 0; });
}

struct ThreadGuard {
  int saved = moet::num_threads();
  ~ThreadGuard() { moet::set_num_threads(saved); }
};

constexpr Index kDim = 16;

Layer make_layer(Index num_experts, std::uint64_t seed, Index max_k = 3) {
  return Layer(
      HashGate{.dim = kDim, .experts = num_experts, .seed = seed, .max_k = max_k},
      Glu({.model_dim = kDim, .hidden_dim = 24, .num_experts = num_experts, .init_seed = seed}));
}

}  // namespace

TEST_CASE("MoELayer output is the weighted sum of the routed experts", "[layer]") {
  const auto seed = GENERATE(1u, 2u, 3u);
  const auto num_tokens = GENERATE(Index{1}, Index{7}, Index{300});
  const auto num_experts = GENERATE(Index{1}, Index{3}, Index{8});
  CAPTURE(seed, num_tokens, num_experts);
  const Layer layer = make_layer(num_experts, seed);
  const auto x = random_rows<float>(num_tokens, kDim, seed + 50u);
  Layer::Workspace ws;
  moet::RowMatrix<float> y =
      moet::RowMatrix<float>::Constant(num_tokens, kDim, std::numeric_limits<float>::quiet_NaN());
  layer.forward(x, y, {}, ws);
  // The oracle routes with the same (test-local) gate, then sums naive experts in double.
  moet::Routing<float> plan;
  layer.gate().route(x, {}, plan);
  check_close(y, naive_routed(layer.experts(), x, plan), 1e-5);
  for (Index t = 0; t < num_tokens; ++t) {
    if (plan.k(t) == 0) CHECK(y.row(t).isZero(0.0f));
  }
}

TEST_CASE("MoELayer with ReferenceDispatch agrees with the default dispatcher", "[layer]") {
  const auto seed = GENERATE(4u, 5u);
  const auto x = random_rows<float>(200, kDim, seed);
  HashGate gate{.dim = kDim, .experts = 6, .seed = seed};
  Glu experts({.model_dim = kDim, .hidden_dim = 24, .num_experts = 6, .init_seed = seed});
  moet::MoELayer<HashGate, Glu, moet::ReferenceDispatch> reference(gate, experts);
  moet::MoELayer grouped(gate, experts);
  static_assert(
      std::is_same_v<decltype(grouped), moet::MoELayer<HashGate, Glu, moet::GroupedDispatch>>);
  const moet::RowMatrix<float> want = reference.forward(x);
  const moet::RowMatrix<float> got = grouped.forward(x);
  check_close(got, want.cast<double>(), 1e-5);
}

TEST_CASE("Shared experts add their output to every token with weight 1", "[layer][shared]") {
  const auto seed = GENERATE(1u, 2u);
  const auto num_tokens = GENERATE(Index{1}, Index{300});
  HashGate gate{.dim = kDim, .experts = 4, .seed = seed};
  Glu routed({.model_dim = kDim, .hidden_dim = 24, .num_experts = 4, .init_seed = seed});
  Glu shared({.model_dim = kDim, .hidden_dim = 40, .num_experts = 2, .init_seed = seed + 100u});
  const Layer plain(gate, routed);
  const Layer with_shared(gate, routed, shared);
  CHECK_FALSE(plain.has_shared_experts());
  REQUIRE(with_shared.has_shared_experts());
  CHECK(with_shared.num_shared_experts() == 2);
  const auto x = random_rows<float>(num_tokens, kDim, seed + 7u);
  Layer::Workspace ws;
  moet::RowMatrix<float> y_plain(num_tokens, kDim);
  moet::RowMatrix<float> y_shared(num_tokens, kDim);
  plain.forward(x, y_plain, {}, ws);
  with_shared.forward(x, y_shared, {}, ws);
  // Oracle: the routed sum plus every shared expert on every token, naive, in double.
  moet::Routing<float> plan;
  gate.route(x, {}, plan);
  Eigen::MatrixXd want = naive_routed(routed, x, plan);
  for (Index t = 0; t < num_tokens; ++t) {
    const Eigen::RowVectorXd xt = x.row(t).cast<double>();
    want.row(t) += naive_swiglu(shared, 0, xt) + naive_swiglu(shared, 1, xt);
  }
  check_close(y_shared, want, 1e-5);
}

TEST_CASE("A token routed nowhere gets exactly the shared expert's output", "[layer][shared]") {
  // max_k = 0: every token is routed nowhere, so y is exactly the one shared expert's output.
  HashGate gate{.dim = kDim, .experts = 3, .seed = 1, .max_k = 0};
  Glu routed({.model_dim = kDim, .hidden_dim = 24, .num_experts = 3});
  Glu shared({.model_dim = kDim, .hidden_dim = 32, .num_experts = 1, .init_seed = 9});
  Layer layer(gate, routed, shared);
  const auto x = random_rows<float>(100, kDim, 3u);  // one dense block (<= 128 rows)
  const moet::RowMatrix<float> y = layer.forward(x);
  CHECK(layer.stats().num_assignments == 0);
  moet::RowMatrix<float> expert_out(100, kDim);
  Glu::Scratch scratch;
  moet::Rows<float> out_ref(expert_out);
  shared.forward(0, x, out_ref, scratch);
  CHECK(bit_identical(y, expert_out));
  check_close(
      y,
      [&] {
        Eigen::MatrixXd m(100, kDim);
        for (Index t = 0; t < 100; ++t) m.row(t) = naive_swiglu(shared, 0, x.row(t).cast<double>());
        return m;
      }(),
      1e-5);
}

TEST_CASE("MoELayer statistics describe the routing plan", "[layer][stats]") {
  const auto seed = GENERATE(1u, 2u);
  const Layer layer = make_layer(8, seed);
  const auto x = random_rows<float>(257, kDim, seed);
  Layer::Workspace ws;
  moet::RowMatrix<float> y(257, kDim);
  const moet::RoutingStats stats = layer.forward(x, y, {}, ws);
  // Oracle: count the test gate's plan by hand.
  moet::Routing<float> plan;
  layer.gate().route(x, {}, plan);
  std::vector<Index> load(8, 0);
  std::vector<Index> hist(9, 0);
  Index total = 0;
  for (Index t = 0; t < 257; ++t) {
    ++hist[static_cast<std::size_t>(plan.k(t))];
    for (const auto e : plan.experts(t)) {
      ++load[static_cast<std::size_t>(e)];
      ++total;
    }
  }
  CHECK(stats.num_tokens == 257);
  CHECK(stats.num_experts == 8);
  CHECK(stats.num_assignments == total);
  CHECK(stats.load == load);
  CHECK(stats.k_histogram == hist);
  CHECK(stats.mean_k == Approx(static_cast<double>(total) / 257.0));
  CHECK(stats.max_load == Approx(static_cast<double>(*std::max_element(load.begin(), load.end()))));
  CHECK(load[1] == 0);  // the test gate leaves every third expert idle
  CHECK(hist[0] > 0);   // and routes some tokens nowhere
  CHECK(ws.stats.load == load);
  // Parameter and FLOP accounting.
  const double per_expert = 3.0 * kDim * 24;
  CHECK(layer.activated_params_per_token(stats) == Approx(stats.mean_k * per_expert));
  CHECK(layer.activated_flops_per_token(stats) == Approx(stats.mean_k * 2.0 * per_expert));
  Glu shared({.model_dim = kDim, .hidden_dim = 10, .num_experts = 2});
  const Layer with_shared(layer.gate(), layer.experts(), shared);
  CHECK(with_shared.activated_params_per_token(stats) ==
        Approx(stats.mean_k * per_expert + 2.0 * 3.0 * kDim * 10));
}

TEST_CASE("MoELayer accepts an empty batch", "[layer]") {
  Layer layer = make_layer(4, 1);
  const moet::RowMatrix<float> x(0, kDim);
  Layer::Workspace ws;
  moet::RowMatrix<float> y(0, kDim);
  const auto stats = layer.forward(x, y, {}, ws);
  CHECK(stats.num_tokens == 0);
  CHECK(stats.num_assignments == 0);
  CHECK(stats.mean_k == 0.0);
  CHECK(stats.load == std::vector<Index>(4, 0));
  const moet::RowMatrix<float> y2 = layer.forward(x);
  CHECK(y2.rows() == 0);
  CHECK(y2.cols() == kDim);
  CHECK(layer.stats().num_tokens == 0);
  // Shared experts too.
  Layer shared(HashGate{.dim = kDim, .experts = 4},
               Glu({.model_dim = kDim, .hidden_dim = 8, .num_experts = 4}),
               Glu({.model_dim = kDim, .hidden_dim = 8, .num_experts = 1}));
  CHECK(shared.forward(x).rows() == 0);
}

TEST_CASE("MoELayer rejects bad shapes and non-finite input", "[layer][errors]") {
  const Layer layer = make_layer(4, 1);
  Layer::Workspace ws;
  const auto x = random_rows<float>(3, kDim, 1u);

  const auto x_narrow = random_rows<float>(3, 7, 1u);
  moet::RowMatrix<float> y_narrow(3, 7);
  CHECK_THROWS_AS(layer.forward(x_narrow, y_narrow, {}, ws), moet::Error);
  CHECK_THROWS_WITH(layer.forward(x_narrow, y_narrow, {}, ws), Contains("[moet::MoELayer]") &&
                                                                   Contains("model_dim = 16") &&
                                                                   Contains("(3, 7)"));

  moet::RowMatrix<float> y_short(2, kDim);
  CHECK_THROWS_WITH(layer.forward(x, y_short, {}, ws),
                    Contains("[moet::MoELayer]") && Contains("(3, 16)") && Contains("(2, 16)"));

  auto x_nan = x;
  x_nan(1, 5) = std::numeric_limits<float>::quiet_NaN();
  moet::RowMatrix<float> y(3, kDim);
  CHECK_THROWS_WITH(layer.forward(x_nan, y, {}, ws),
                    Contains("[moet::MoELayer]") && Contains("NaN or Inf") && Contains("(3, 16)"));
  auto x_inf = x;
  x_inf(2, 0) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(layer.forward(x_inf, y, {}, ws),
                    Contains("[moet::MoELayer]") && Contains("NaN or Inf"));

  moet::RowMatrix<float> xy = x;
  CHECK_THROWS_WITH(layer.forward(xy, xy, {}, ws),
                    Contains("[moet::MoELayer]") && Contains("overlap"));

  Layer mutable_layer = make_layer(4, 1);
  CHECK_THROWS_WITH(mutable_layer.forward(x_narrow),
                    Contains("[moet::MoELayer]") && Contains("(3, 7)"));
  CHECK_THROWS_WITH(layer.shared_experts(),
                    Contains("[moet::MoELayer]") && Contains("no shared experts"));
}

TEST_CASE("MoELayer checks that the gate, experts and shared experts agree", "[layer][errors]") {
  CHECK_THROWS_WITH(Layer(HashGate{.dim = kDim, .experts = 5},
                          Glu({.model_dim = kDim, .hidden_dim = 8, .num_experts = 4})),
                    Contains("[moet::MoELayer]") && Contains("5 experts") && Contains("has 4"));
  CHECK_THROWS_WITH(Layer(HashGate{.dim = 12, .experts = 4},
                          Glu({.model_dim = kDim, .hidden_dim = 8, .num_experts = 4})),
                    Contains("[moet::MoELayer]") && Contains("model_dim is 12") && Contains("16"));
  CHECK_THROWS_WITH(
      Layer(HashGate{.dim = kDim, .experts = 4},
            Glu({.model_dim = kDim, .hidden_dim = 8, .num_experts = 4}),
            Glu({.model_dim = 8, .hidden_dim = 8, .num_experts = 1})),
      Contains("[moet::MoELayer]") && Contains("shared experts' model_dim is 8") && Contains("16"));
}

TEST_CASE("MoELayer is bit-identical for 1, 2 and 3 threads", "[layer][parallel]") {
  ThreadGuard guard;
  HashGate gate{.dim = kDim, .experts = 8, .seed = 3};
  const Layer layer(gate, Glu({.model_dim = kDim, .hidden_dim = 24, .num_experts = 8}),
                    Glu({.model_dim = kDim, .hidden_dim = 20, .num_experts = 1, .init_seed = 5}));
  const auto x = random_rows<float>(600, kDim, 11u);
  std::vector<moet::RowMatrix<float>> results;
  for (const int threads : {1, 2, 3}) {
    moet::set_num_threads(threads);
    Layer::Workspace ws;
    moet::RowMatrix<float> y(600, kDim);
    layer.forward(x, y, {}, ws);
    results.push_back(y);
  }
  CHECK(bit_identical(results[0], results[1]));
  CHECK(bit_identical(results[0], results[2]));
}

TEST_CASE("Concurrent forward calls with separate workspaces equal serial calls",
          "[layer][parallel]") {
  const Layer layer(HashGate{.dim = kDim, .experts = 6, .seed = 8},
                    Glu({.model_dim = kDim, .hidden_dim = 24, .num_experts = 6}),
                    Glu({.model_dim = kDim, .hidden_dim = 12, .num_experts = 1}));
  constexpr int kCallers = 4;
  std::vector<moet::RowMatrix<float>> inputs;
  std::vector<moet::RowMatrix<float>> serial;
  for (int i = 0; i < kCallers; ++i) {
    inputs.push_back(random_rows<float>(150 + 40 * i, kDim, static_cast<std::uint32_t>(20 + i)));
    Layer::Workspace ws;
    moet::RowMatrix<float> y(inputs.back().rows(), kDim);
    layer.forward(inputs.back(), y, {}, ws);
    serial.push_back(y);
  }
  std::vector<moet::RowMatrix<float>> concurrent(kCallers);
  std::vector<std::thread> callers;
  for (int i = 0; i < kCallers; ++i) {
    callers.emplace_back([&, i] {
      Layer::Workspace ws;
      const auto& x = inputs[static_cast<std::size_t>(i)];
      auto& y = concurrent[static_cast<std::size_t>(i)];
      y.resize(x.rows(), kDim);
      for (int repeat = 0; repeat < 5; ++repeat) layer.forward(x, y, {}, ws);
    });
  }
  for (auto& caller : callers) caller.join();
  for (int i = 0; i < kCallers; ++i) {
    CHECK(bit_identical(concurrent[static_cast<std::size_t>(i)],
                        serial[static_cast<std::size_t>(i)]));
  }
}

TEST_CASE("The convenience forward equals the workspace forward", "[layer]") {
  Layer layer = make_layer(5, 2);
  const auto x = random_rows<float>(90, kDim, 4u);
  moet::RouteContext ctx;
  ctx.seed = 77;  // the test gate mixes ctx.seed into its choices
  Layer::Workspace ws;
  moet::RowMatrix<float> y(90, kDim);
  const auto stats = layer.forward(x, y, ctx, ws);
  const moet::RowMatrix<float> y2 = layer.forward(x, ctx);
  CHECK(bit_identical(y, y2));
  CHECK(layer.stats().load == stats.load);
  CHECK(layer.stats().num_assignments == stats.num_assignments);
  // A different context routes differently (so ctx really reaches the gate).
  const moet::RowMatrix<float> y3 = layer.forward(x);
  CHECK_FALSE(bit_identical(y, y3));
}

TEST_CASE("MoELayer works with FFN experts in double", "[layer]") {
  struct DoubleGate {
    using Scalar = double;
    Index num_experts() const { return 3; }
    Index model_dim() const { return 6; }
    void route(const moet::ConstRows<double>& x, const moet::RouteContext&,
               moet::Routing<double>& out) const {
      out.reset(x.rows(), 3);
      for (Index t = 0; t < x.rows(); ++t) out.counts()[static_cast<std::size_t>(t)] = t % 3;
      out.commit_counts();
      for (Index t = 0; t < x.rows(); ++t) {
        for (std::size_t j = 0; j < out.experts(t).size(); ++j) {
          out.experts(t)[j] = static_cast<std::int32_t>((static_cast<std::size_t>(t) + j) % 3);
          out.weights(t)[j] = 0.5 + 0.25 * static_cast<double>(j);
        }
      }
    }
  };
  using Ffn = moet::FfnExperts<double>;
  Ffn experts({.model_dim = 6, .hidden_dim = 10, .num_experts = 3, .init_seed = 4});
  experts.edit().in_bias_stack() = random_rows<double>(3, 10, 1u);
  experts.edit().out_bias_stack() = random_rows<double>(3, 6, 2u);
  moet::MoELayer layer(DoubleGate{}, experts);
  const auto x = random_rows<double>(40, 6, 3u);
  const moet::RowMatrix<double> y = layer.forward(x);
  // Oracle: the reference dispatcher on the same plan.
  moet::Routing<double> plan;
  DoubleGate{}.route(x, {}, plan);
  moet::ReferenceDispatch::Workspace<Ffn> ws;
  moet::RowMatrix<double> want(40, 6);
  moet::ReferenceDispatch{}.run(experts, x, plan, want, ws);
  CHECK((y - want).norm() <= 1e-12 * want.norm());
  CHECK(y.row(0).isZero(0.0));  // token 0 has k = 0
}

}  // namespace test_layer
