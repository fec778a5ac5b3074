// MoELayer training: the whole layer's backward (input, every expert weight, shared experts,
// router) against central finite differences in double, the grouped backward against a naive
// per-token oracle, dropped tokens, idle experts, accumulation, thread-count independence and
// the argument checks.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/context.hpp"
#include "moet/detail/rng.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/dispatch/shared_gate.hpp"
#include "moet/errors.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/grouped_top_k.hpp"
#include "moet/gates/importance.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/layer.hpp"
#include "moet/routing.hpp"

#include "fd_util.hpp"

namespace test_grad_layer {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;

template <class S>
RowMatrix<S> random_rows(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  RowMatrix<S> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(normal(gen));
  return m;
}

// A test-only trainable gate. Token t's experts are a fixed function of (seed, t): k in 0..3
// (so tokens routed nowhere occur), never expert 1 (so an idle expert occurs). Its weights
// depend on x through its own parameters: assignment a of token t has weight
// w_a = sigmoid(x_t · V_a), V `(max_assignments, model_dim)`, so the layer's router path
// (d_weights in, dx out) is exercised by the finite differences too.
template <class S>
struct TableGate {
  using Scalar = S;
  using LossGrad = moet::NoLossGrad;
  Index dim = 0;
  Index experts = 0;
  std::uint64_t seed = 0;
  RowMatrix<S> v;       // (kMaxAssignments, dim)
  RowMatrix<S> v_grad;  // same shape
  static constexpr Index kMaxAssignments = 256;

  TableGate(Index model_dim, Index num_experts, std::uint64_t s)
      : dim(model_dim), experts(num_experts), seed(s) {
    v = random_rows<S>(kMaxAssignments, dim, static_cast<std::uint32_t>(s + 100));
  }
  Index num_experts() const { return experts; }
  Index model_dim() const { return dim; }

  static S sigmoid(S z) { return S(1) / (S(1) + std::exp(-z)); }

  void route(const moet::ConstRows<S>& x, const moet::RouteContext&, moet::Routing<S>& out) const {
    using moet::detail::hash_key;
    const Index num_tokens = x.rows();
    out.reset(num_tokens, experts);
    std::vector<std::int32_t> usable;
    for (std::int32_t e = 0; e < static_cast<std::int32_t>(experts); ++e) {
      if (e != 1) usable.push_back(e);
    }
    for (Index t = 0; t < num_tokens; ++t) {
      out.counts()[static_cast<std::size_t>(t)] = static_cast<Index>(
          moet::detail::uniform_below(hash_key(seed, static_cast<std::uint64_t>(t), 1),
                                      std::min<std::uint64_t>(4, usable.size() + 1)));
    }
    out.commit_counts();
    REQUIRE(out.num_assignments() <= kMaxAssignments);
    for (Index t = 0; t < num_tokens; ++t) {
      std::vector<std::int32_t> pool = usable;
      const auto ids = out.experts(t);
      const auto weights = out.weights(t);
      const auto first = static_cast<Index>(out.offsets()[static_cast<std::size_t>(t)]);
      for (std::size_t j = 0; j < ids.size(); ++j) {
        const auto pick =
            j + moet::detail::uniform_below(hash_key(seed, static_cast<std::uint64_t>(t), 2, j),
                                            pool.size() - j);
        std::swap(pool[j], pool[pick]);
        ids[j] = pool[j];
        weights[j] = sigmoid(x.row(t).dot(v.row(first + static_cast<Index>(j))));
      }
    }
  }

  void backward(const moet::ConstRows<S>& x, const moet::RouteContext&,
                const moet::Routing<S>& routing, std::span<const S> d_weights, const LossGrad&,
                moet::Rows<S> dx) {
    if (v_grad.rows() != v.rows()) v_grad = RowMatrix<S>::Zero(v.rows(), v.cols());
    for (Index t = 0; t < x.rows(); ++t) {
      for (Index a = routing.offsets()[static_cast<std::size_t>(t)];
           a < routing.offsets()[static_cast<std::size_t>(t + 1)]; ++a) {
        const S w = routing.weights()[static_cast<std::size_t>(a)];
        const S g = d_weights[static_cast<std::size_t>(a)] * w * (S(1) - w);
        v_grad.row(a) += g * x.row(t);
        dx.row(t) += g * v.row(a);
      }
    }
  }
  void zero_grad() { v_grad = RowMatrix<S>::Zero(v.rows(), v.cols()); }
  template <class F>
  void visit_parameters(F&& f) {
    if (v_grad.rows() != v.rows()) zero_grad();
    f("table.v", moet::ParamMap<S>(v.data(), v.rows(), v.cols()),
      moet::ParamMap<S>(v_grad.data(), v_grad.rows(), v_grad.cols()));
  }
};
static_assert(moet::TrainableGate<TableGate<double>>);
static_assert(moet::TrainableGate<moet::StochasticGate<float>>);
static_assert(moet::TrainableGate<moet::TopKGate<double>>);

using moet_test::check_gradient;
using moet_test::collect;
using moet_test::fd_input;
using moet_test::fd_tensor;
using moet_test::Tensor;
using moet_test::ZeroGradient;

// L = sum(R ⊙ layer(x)) through the inference forward.
template <class Layer>
double layer_loss(const Layer& layer, const RowMatrix<double>& x, const RowMatrix<double>& r,
                  const moet::RouteContext& ctx) {
  typename Layer::Workspace ws;
  RowMatrix<double> y(x.rows(), x.cols());
  layer.forward(x, y, ctx, ws);
  return (y.array() * r.array()).sum();
}

// FD of the whole layer: x and every visited parameter. `ctx` must route the same way in
// forward_train and forward (no noise); `fd_ctx` is what the finite differences route with.
template <class Layer>
void check_layer_gradients(Layer layer, const RowMatrix<double>& x, const moet::RouteContext& ctx,
                           const moet::RouteContext& fd_ctx, const std::string& what) {
  INFO(what);
  constexpr double kEps = 1e-6;
  const RowMatrix<double> r = random_rows<double>(x.rows(), x.cols(), 77);
  typename Layer::Workspace ws;
  RowMatrix<double> y(x.rows(), x.cols());
  RowMatrix<double> dx = RowMatrix<double>::Constant(x.rows(), x.cols(), 9.0);  // overwritten
  layer.zero_grad();
  layer.forward_train(x, y, ctx, ws);
  {
    typename Layer::Workspace plain;
    RowMatrix<double> want(x.rows(), x.cols());
    layer.forward(x, want, fd_ctx, plain);
    CHECK((y - want).norm() <= 1e-12 * (1.0 + want.norm()));
  }
  layer.backward(x, r, ctx, ws, dx);

  const RowMatrix<double> fd_x = fd_input(
      x, kEps, [&](const RowMatrix<double>& xp) { return layer_loss(layer, xp, r, fd_ctx); });
  check_gradient(dx, fd_x, what + " dx", ZeroGradient::kAllowed);

  for (Tensor& tensor : collect(layer)) {
    const RowMatrix<double> fd =
        fd_tensor(tensor, kEps, [&] { return layer_loss(layer, x, r, fd_ctx); });
    check_gradient(tensor.grad, fd, what + " " + tensor.name, ZeroGradient::kAllowed);
  }
}

constexpr Index kDim = 6;
constexpr Index kHidden = 5;
constexpr Index kExperts = 4;
constexpr Index kTokens = 12;

using Glu = moet::SwiGluExperts<double>;
Glu glu(Index num_experts, std::uint64_t seed) {
  return Glu(
      {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = num_experts, .init_seed = seed});
}
// Three-row blocks: every busy expert's backward runs over several blocks.
const moet::GroupedDispatch kSmallBlocks({.block_rows = 3});

template <class S>
bool bit_identical(const RowMatrix<S>& a, const RowMatrix<S>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), sizeof(S) * static_cast<std::size_t>(a.size())) == 0);
}

struct ThreadGuard {
  int saved = moet::num_threads();
  ~ThreadGuard() { moet::set_num_threads(saved); }
};

}  // namespace

TEST_CASE("Layer gradients equal finite differences: table gate, SwiGLU, shared experts",
          "[layer][grad]") {
  const RowMatrix<double> x = random_rows<double>(kTokens, kDim, 1);
  moet::MoELayer layer(TableGate<double>(kDim, kExperts, 5), glu(kExperts, 2), glu(2, 3),
                       kSmallBlocks);
  check_layer_gradients(layer, x, {}, {}, "table+swiglu+shared");
}

TEST_CASE("Layer gradients equal finite differences: FFN experts with biases",
          "[layer][grad][ffn]") {
  const RowMatrix<double> x = random_rows<double>(kTokens, kDim, 4);
  moet::GeluFfnExperts<double> ffn(
      {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts, .init_seed = 6});
  ffn.edit().in_bias_stack() = random_rows<double>(kExperts, kHidden, 7);
  ffn.edit().out_bias_stack() = random_rows<double>(kExperts, kDim, 8);
  moet::MoELayer layer(TableGate<double>(kDim, kExperts, 9), ffn, kSmallBlocks);
  check_layer_gradients(layer, x, {}, {}, "table+ffn");
}

TEST_CASE("Layer gradients equal finite differences: TopKGate, renormalised top-2",
          "[layer][grad][top_k]") {
  const RowMatrix<double> x = random_rows<double>(kTokens, kDim, 10);
  auto options = moet::TopKGate<double>::mixtral_options(kDim, kExperts);
  options.init_seed = 11;
  moet::MoELayer layer(moet::TopKGate<double>(options), glu(kExperts, 12), glu(1, 13),
                       kSmallBlocks);
  check_layer_gradients(layer, x, {}, {}, "top-2");
}

TEST_CASE("Layer gradients equal finite differences: TopKGate with dropped tokens",
          "[layer][grad][top_k][capacity]") {
  const RowMatrix<double> x = random_rows<double>(kTokens, kDim, 14);
  auto options = moet::TopKGate<double>::switch_options(kDim, kExperts);
  options.capacity_factor = 0.5;  // C = max(ceil(12 / 4 * 0.5), 1) = 2 per expert
  options.min_capacity = 1;
  options.init_seed = 15;
  moet::TopKGate<double> gate(options);
  moet::Routing<double> plan;
  gate.route(x, {}, plan);
  REQUIRE(plan.dropped > 0);  // some tokens have k = 0
  moet::MoELayer layer(gate, glu(kExperts, 16), kSmallBlocks);
  check_layer_gradients(layer, x, {}, {}, "switch with capacity");
}

TEST_CASE("Layer gradients equal finite differences: TopPGate", "[layer][grad][top_p]") {
  const RowMatrix<double> x = random_rows<double>(kTokens, kDim, 80);
  moet::MoELayer layer(moet::TopPGate<double>(
                           {.model_dim = kDim, .num_experts = kExperts, .p = 0.5, .init_seed = 81}),
                       glu(kExperts, 82), glu(1, 83), kSmallBlocks);
  check_layer_gradients(layer, x, {}, {}, "top-p");
}

TEST_CASE("Layer gradients equal finite differences: ImportanceGate", "[layer][grad][importance]") {
  const RowMatrix<double> x = random_rows<double>(kTokens, kDim, 84);
  std::vector<float> importance;
  for (Index t = 0; t < kTokens; ++t) importance.push_back(static_cast<float>((t * 7) % 5) + 0.5F);
  moet::RouteContext ctx;
  ctx.importance = importance;
  moet::MoELayer layer(
      moet::ImportanceGate<double>(
          {.model_dim = kDim, .num_experts = kExperts, .k_min = 1, .k_max = 3, .init_seed = 85}),
      glu(kExperts, 86), kSmallBlocks);
  check_layer_gradients(layer, x, ctx, ctx, "importance");
}

TEST_CASE("Layer gradients equal finite differences: StochasticGate in training",
          "[layer][grad][stochastic]") {
  const RowMatrix<double> x = random_rows<double>(kTokens, kDim, 17);
  moet::RouteContext ctx;
  ctx.training = true;
  ctx.seed = 3;
  ctx.step = 4;
  moet::MoELayer layer(moet::StochasticGate<double>({.model_dim = kDim, .num_experts = kExperts}),
                       glu(kExperts, 18), glu(1, 19));
  // The finite differences route with the same training context: the draw is the same.
  check_layer_gradients(layer, x, ctx, ctx, "thor");
}

TEST_CASE("The grouped backward equals a naive per-token backward", "[layer][grad]") {
  using S = float;
  using Bank = moet::SwiGluExperts<S>;
  constexpr Index kT = 40;
  const RowMatrix<S> x = random_rows<S>(kT, 16, 20);
  const RowMatrix<S> dy = random_rows<S>(kT, 16, 21);
  const Bank bank({.model_dim = 16, .hidden_dim = 24, .num_experts = 6, .init_seed = 22});
  const Bank shared({.model_dim = 16, .hidden_dim = 24, .num_experts = 2, .init_seed = 23});
  const TableGate<S> gate(16, 6, 24);
  moet::MoELayer layer(gate, bank, shared, moet::GroupedDispatch({.block_rows = 4}));
  decltype(layer)::Workspace ws;
  RowMatrix<S> y(kT, 16), dx(kT, 16);
  layer.zero_grad();
  layer.forward_train(x, y, {}, ws);
  layer.backward(x, dy, {}, ws, dx);

  // Oracle: every assignment alone, one row at a time, in token order.
  Bank naive = bank;
  Bank naive_shared = shared;
  TableGate<S> naive_gate = gate;
  naive.zero_grad();
  naive_shared.zero_grad();
  naive_gate.zero_grad();
  Bank::Scratch scratch;
  const moet::Routing<S>& plan = ws.routing;
  std::vector<S> d_weights(static_cast<std::size_t>(plan.num_assignments()));
  RowMatrix<S> want_dx = RowMatrix<S>::Zero(kT, 16);
  RowMatrix<S> out(1, 16), cache(1, bank.cache_width()), din(1, 16);
  for (Index t = 0; t < kT; ++t) {
    for (Index a = plan.offsets()[static_cast<std::size_t>(t)];
         a < plan.offsets()[static_cast<std::size_t>(t + 1)]; ++a) {
      const auto ua = static_cast<std::size_t>(a);
      naive.forward_train(plan.experts()[ua], x.row(t), out, cache, scratch);
      d_weights[ua] = dy.row(t).dot(out.row(0));
      const RowMatrix<S> dout = plan.weights()[ua] * dy.row(t);
      naive.backward(plan.experts()[ua], x.row(t), cache, dout, din, scratch);
      want_dx.row(t) += din.row(0);
    }
    for (Index s = 0; s < 2; ++s) {
      naive_shared.forward_train(s, x.row(t), out, cache, scratch);
      naive_shared.backward(s, x.row(t), cache, dy.row(t), din, scratch);
      want_dx.row(t) += din.row(0);
    }
  }
  naive_gate.backward(x, {}, plan, d_weights, {}, want_dx);

  auto close = [](const RowMatrix<S>& got, const RowMatrix<S>& want, const char* what) {
    INFO(what);
    REQUIRE(got.rows() == want.rows());
    CHECK((got - want).norm() <= 1e-5F * want.norm());
  };
  const auto got_dw = layer.weight_grads(ws);
  REQUIRE(got_dw.size() == d_weights.size());
  for (std::size_t a = 0; a < d_weights.size(); ++a) {
    CHECK_THAT(got_dw[a], Catch::Matchers::WithinAbs(d_weights[a], 1e-4));
  }
  close(dx, want_dx, "dx");
  close(layer.experts().gate_grad(), naive.gate_grad(), "experts.gate");
  close(layer.experts().up_grad(), naive.up_grad(), "experts.up");
  close(layer.experts().down_grad(), naive.down_grad(), "experts.down");
  close(layer.shared_experts().gate_grad(), naive_shared.gate_grad(), "shared.gate");
  close(layer.shared_experts().down_grad(), naive_shared.down_grad(), "shared.down");
  close(layer.gate().v_grad, naive_gate.v_grad, "gate");

  // Expert 1 never gets a token: its gradient is exactly zero. A token routed nowhere gets
  // only the shared experts' input gradient (the table gate has no term for it).
  CHECK(layer.experts().gate_grad().middleRows(16, 16).isZero(0.0F));
  CHECK(layer.experts().down_grad().middleRows(24, 24).isZero(0.0F));
  bool saw_empty = false;
  for (Index t = 0; t < kT; ++t) {
    if (plan.k(t) == 0) saw_empty = true;
  }
  CHECK(saw_empty);
}

TEST_CASE("A token routed nowhere gets a zero input gradient without shared experts",
          "[layer][grad]") {
  const RowMatrix<double> x = random_rows<double>(kTokens, kDim, 30);
  const RowMatrix<double> dy = random_rows<double>(kTokens, kDim, 31);
  moet::MoELayer layer(TableGate<double>(kDim, kExperts, 32), glu(kExperts, 33));
  decltype(layer)::Workspace ws;
  RowMatrix<double> y(kTokens, kDim), dx(kTokens, kDim);
  layer.zero_grad();
  layer.forward_train(x, y, {}, ws);
  layer.backward(x, dy, {}, ws, dx);
  int empty = 0;
  for (Index t = 0; t < kTokens; ++t) {
    if (ws.routing.k(t) > 0) continue;
    ++empty;
    CHECK(dx.row(t).isZero(0.0));
    CHECK(y.row(t).isZero(0.0));
  }
  CHECK(empty > 0);
}

TEST_CASE("Layer backward accumulates and zero_grad clears", "[layer][grad]") {
  const RowMatrix<double> x = random_rows<double>(kTokens, kDim, 40);
  const RowMatrix<double> dy = random_rows<double>(kTokens, kDim, 41);
  moet::MoELayer layer(TableGate<double>(kDim, kExperts, 42), glu(kExperts, 43), glu(1, 44));
  decltype(layer)::Workspace ws;
  RowMatrix<double> y(kTokens, kDim), dx(kTokens, kDim), dx2(kTokens, kDim);
  layer.zero_grad();
  layer.forward_train(x, y, {}, ws);
  layer.backward(x, dy, {}, ws, dx);
  const std::vector<Tensor> once = collect(layer);
  layer.backward(x, dy, {}, ws, dx2);
  CHECK(bit_identical(dx, dx2));  // dx is written, not accumulated
  const std::vector<Tensor> twice = collect(layer);
  REQUIRE(once.size() == twice.size());
  CHECK(once.size() == 7);  // table.v; experts gate, up, down; shared gate, up, down
  CHECK(once[0].name == "gate.table.v");
  CHECK(once[1].name == "experts.gate");
  CHECK(once[6].name == "shared.down");
  for (std::size_t i = 0; i < once.size(); ++i) {
    INFO(once[i].name);
    CHECK((twice[i].grad - 2.0 * once[i].grad).norm() <= 1e-12 * (1.0 + once[i].grad.norm()));
  }
  layer.zero_grad();
  for (const Tensor& tensor : collect(layer)) CHECK(tensor.grad.isZero(0.0));
}

TEST_CASE("Layer backward is bit-identical for 1 and 2 threads", "[layer][grad][parallel]") {
  using S = float;
  constexpr Index kT = 300;
  constexpr Index kD = 32;
  const RowMatrix<S> x = random_rows<S>(kT, kD, 50);
  const RowMatrix<S> dy = random_rows<S>(kT, kD, 51);
  auto options = moet::TopKGate<S>::mixtral_options(kD, 8);
  options.init_seed = 52;
  const moet::MoELayer layer(
      moet::TopKGate<S>(options),
      moet::SwiGluExperts<S>(
          {.model_dim = kD, .hidden_dim = 48, .num_experts = 8, .init_seed = 53}),
      moet::SwiGluExperts<S>(
          {.model_dim = kD, .hidden_dim = 48, .num_experts = 2, .init_seed = 54}),
      moet::GroupedDispatch({.block_rows = 16}));
  auto run = [&](int threads) {
    moet::set_num_threads(threads);
    auto copy = layer;
    decltype(copy)::Workspace ws;
    RowMatrix<S> y(kT, kD), dx(kT, kD);
    copy.zero_grad();
    copy.forward_train(x, y, {}, ws);
    copy.backward(x, dy, {}, ws, dx);
    std::vector<RowMatrix<S>> out{y, dx};
    copy.visit_parameters([&](std::string_view, moet::ParamMap<S>, moet::ParamMap<S> grad) {
      out.emplace_back(grad);
    });
    return out;
  };
  const ThreadGuard guard;
  const auto one = run(1);
  const auto two = run(2);
  REQUIRE(one.size() == two.size());
  for (std::size_t i = 0; i < one.size(); ++i) {
    INFO("tensor " << i);
    CHECK(bit_identical(one[i], two[i]));
  }
}

TEST_CASE("MoELayer backward checks its arguments", "[layer][grad][errors]") {
  const RowMatrix<double> x = random_rows<double>(kTokens, kDim, 60);
  const RowMatrix<double> dy = random_rows<double>(kTokens, kDim, 61);
  moet::MoELayer layer(TableGate<double>(kDim, kExperts, 62), glu(kExperts, 63));
  decltype(layer)::Workspace ws;
  RowMatrix<double> y(kTokens, kDim), dx(kTokens, kDim);
  CHECK_THROWS_WITH(layer.backward(x, dy, {}, ws, dx),
                    Contains("MoELayer") && Contains("needs a forward_train"));
  layer.forward(x, y, {}, ws);
  CHECK_THROWS_WITH(layer.backward(x, dy, {}, ws, dx), Contains("needs a forward_train"));
  layer.forward_train(x, y, {}, ws);
  const RowMatrix<double> half = x.topRows(kTokens / 2);
  RowMatrix<double> dx_half(kTokens / 2, kDim);
  CHECK_THROWS_WITH(layer.backward(half, dy.topRows(kTokens / 2), {}, ws, dx_half),
                    Contains("needs a forward_train"));
  CHECK_THROWS_WITH(layer.backward(x, dy.leftCols(kDim - 1), {}, ws, dx),
                    Contains("dy must have x's shape"));
  RowMatrix<double> dx_bad(kTokens, kDim + 1);
  CHECK_THROWS_WITH(layer.backward(x, dy, {}, ws, dx_bad), Contains("dx must have x's shape"));
  RowMatrix<double> same = dy;
  CHECK_THROWS_WITH(layer.backward(x, same, {}, ws, same), Contains("must not overlap"));
  CHECK_NOTHROW(layer.backward(x, dy, {}, ws, dx));

  // An empty batch trains to nothing.
  const RowMatrix<double> none(0, kDim);
  RowMatrix<double> none_y(0, kDim), none_dx(0, kDim);
  layer.forward_train(none, none_y, {}, ws);
  CHECK_NOTHROW(layer.backward(none, none, {}, ws, none_dx));
}

TEST_CASE("StochasticGate backward adds nothing and checks shapes", "[gate][stochastic][grad]") {
  moet::StochasticGate<double> gate({.model_dim = kDim, .num_experts = 3});
  const RowMatrix<double> x = random_rows<double>(5, kDim, 70);
  moet::RouteContext ctx;
  ctx.training = true;
  moet::Routing<double> plan;
  gate.route(x, ctx, plan);
  const std::vector<double> dw(5, 1.0);
  RowMatrix<double> dx = RowMatrix<double>::Constant(5, kDim, 2.0);
  gate.zero_grad();
  gate.backward(x, ctx, plan, dw, {}, dx);
  CHECK((dx.array() == 2.0).all());
  int visited = 0;
  gate.visit_parameters(
      [&](std::string_view, moet::ParamMap<double>, moet::ParamMap<double>) { ++visited; });
  CHECK(visited == 0);
  CHECK_THROWS_WITH(gate.backward(x, ctx, plan, std::span<const double>(dw).first(4), {}, dx),
                    Contains("StochasticGate") && Contains("one value per assignment"));
  RowMatrix<double> bad(5, kDim + 1);
  CHECK_THROWS_WITH(gate.backward(x, ctx, plan, dw, {}, bad), Contains("dx must have x's shape"));
}

TEST_CASE("A copied training workspace gives the same backward", "[layer][grad]") {
  using S = float;
  const RowMatrix<S> x = random_rows<S>(70, 16, 90);
  const RowMatrix<S> dy = random_rows<S>(70, 16, 91);
  auto options = moet::TopKGate<S>::mixtral_options(16, 4);
  options.init_seed = 92;
  const moet::MoELayer layer(
      moet::TopKGate<S>(options),
      moet::SwiGluExperts<S>({.model_dim = 16, .hidden_dim = 20, .num_experts = 4}),
      moet::SwiGluExperts<S>({.model_dim = 16, .hidden_dim = 12, .num_experts = 1}),
      moet::GroupedDispatch({.block_rows = 8}));
  auto a = layer;
  auto b = layer;
  decltype(a)::Workspace ws;
  RowMatrix<S> y(70, 16), dx_a(70, 16), dx_b(70, 16);
  a.zero_grad();
  b.zero_grad();
  a.forward_train(x, y, {}, ws);
  const auto copy = std::make_unique<decltype(a)::Workspace>(ws);  // new storage addresses
  a.backward(x, dy, {}, ws, dx_a);
  b.backward(x, dy, {}, *copy, dx_b);
  CHECK(bit_identical(dx_a, dx_b));
  std::vector<RowMatrix<S>> ga, gb;
  a.visit_parameters(
      [&](std::string_view, moet::ParamMap<S>, moet::ParamMap<S> g) { ga.emplace_back(g); });
  b.visit_parameters(
      [&](std::string_view, moet::ParamMap<S>, moet::ParamMap<S> g) { gb.emplace_back(g); });
  REQUIRE(ga.size() == gb.size());
  for (std::size_t i = 0; i < ga.size(); ++i) CHECK(bit_identical(ga[i], gb[i]));
}

TEST_CASE("Layer gradients equal finite differences: GroupedTopKGate with shared experts",
          "[layer][grad][grouped_top_k]") {
  const RowMatrix<double> x = random_rows<double>(kTokens, kDim, 93);
  auto options = moet::GroupedTopKGate<double>::deepseek_v3_options(kDim, kExperts, 2, 2, 1, 2.5);
  options.init_seed = 94;
  moet::MoELayer layer(moet::GroupedTopKGate<double>(options), glu(kExperts, 95), glu(1, 96),
                       kSmallBlocks);
  check_layer_gradients(layer, x, {}, {}, "grouped top-k + shared");
}

TEST_CASE("Gated shared experts: y = routed + sigmoid(x w) * shared, gradients by FD",
          "[layer][grad][shared_gate]") {
  const RowMatrix<double> x = random_rows<double>(kTokens, kDim, 97);
  moet::SharedExpertGate<double> shared_gate({.model_dim = kDim, .init_seed = 98});
  auto options = moet::TopKGate<double>::mixtral_options(kDim, kExperts);
  options.init_seed = 99;
  const moet::MoELayer layer(moet::TopKGate<double>(options), glu(kExperts, 100), glu(2, 101),
                             shared_gate, kSmallBlocks);
  CHECK(layer.has_shared_gate());
  // Forward against the plain layer plus the gated shared output computed here.
  const moet::MoELayer routed(moet::TopKGate<double>(options), glu(kExperts, 100), kSmallBlocks);
  const Glu shared = glu(2, 101);
  RowMatrix<double> y(kTokens, kDim), want(kTokens, kDim);
  decltype(layer)::Workspace ws;
  decltype(routed)::Workspace ws_routed;
  layer.forward(x, y, {}, ws);
  routed.forward(x, want, {}, ws_routed);
  for (Index t = 0; t < kTokens; ++t) {
    const double g = 1.0 / (1.0 + std::exp(-x.row(t).dot(shared_gate.weights().col(0))));
    Glu::Scratch scratch;
    RowMatrix<double> out(1, kDim), sum = RowMatrix<double>::Zero(1, kDim);
    for (Index s = 0; s < 2; ++s) {
      shared.forward(s, x.row(t), out, scratch);
      sum += out;
    }
    want.row(t) += g * sum;
  }
  CHECK((y - want).norm() <= 1e-12 * want.norm());
  check_layer_gradients(layer, x, {}, {}, "top-2 + gated shared");
  std::vector<std::string> names;
  auto copy = layer;
  copy.visit_parameters([&](std::string_view n, auto, auto) { names.emplace_back(n); });
  CHECK(names.back() == "shared_gate.weight");
}

TEST_CASE("Gated shared experts are bit-identical for 1 and 2 threads and check their input",
          "[layer][grad][shared_gate][parallel]") {
  using S = float;
  const RowMatrix<S> x = random_rows<S>(300, 16, 102);
  const RowMatrix<S> dy = random_rows<S>(300, 16, 103);
  const auto run = [&](int threads) {
    const ThreadGuard guard;
    moet::set_num_threads(threads);
    moet::MoELayer layer(
        moet::TopKGate<S>(moet::TopKGate<S>::mixtral_options(16, 4)),
        moet::SwiGluExperts<S>({.model_dim = 16, .hidden_dim = 20, .num_experts = 4}),
        moet::SwiGluExperts<S>({.model_dim = 16, .hidden_dim = 12, .num_experts = 1}),
        moet::SharedExpertGate<S>({.model_dim = 16}));
    decltype(layer)::Workspace ws;
    RowMatrix<S> y(300, 16), dx = RowMatrix<S>::Zero(300, 16);
    layer.zero_grad();
    layer.forward_train(x, y, {}, ws);
    layer.backward(x, dy, {}, ws, dx);
    std::vector<RowMatrix<S>> out{y, dx};
    layer.visit_parameters(
        [&](std::string_view, moet::ParamMap<S>, moet::ParamMap<S> g) { out.emplace_back(g); });
    return out;
  };
  const auto one = run(1);
  const auto two = run(2);
  REQUIRE(one.size() == two.size());
  for (std::size_t i = 0; i < one.size(); ++i) CHECK(bit_identical(one[i], two[i]));

  moet::SharedExpertGate<S> gate({.model_dim = 16});
  CHECK_THROWS_WITH(gate.set_weights(RowMatrix<S>::Zero(16, 1), moet::WeightLayout::kOutIn),
                    Contains("looks transposed"));
  CHECK_THROWS_WITH(moet::SharedExpertGate<S>({.model_dim = 0}),
                    Contains("model_dim must be >= 1, got 0"));
  CHECK_THROWS_WITH(
      moet::MoELayer(moet::TopKGate<S>(moet::TopKGate<S>::mixtral_options(16, 4)),
                     moet::SwiGluExperts<S>({.model_dim = 16, .hidden_dim = 20, .num_experts = 4}),
                     moet::SwiGluExperts<S>({.model_dim = 16, .hidden_dim = 12, .num_experts = 1}),
                     moet::SharedExpertGate<S>({.model_dim = 8})),
      Contains("the shared-expert gate's model_dim is 8"));
}

}  // namespace test_grad_layer
