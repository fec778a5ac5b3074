// After a warm-up step, MoELayer training (zero_grad, forward_train, backward, then an AdamW or
// SGD step with its repack) runs without touching the heap, like the inference path (harness as in
// test_no_alloc.cpp). Eigen's own allocations are caught by EIGEN_RUNTIME_NO_MALLOC (its assertion
// is redirected to a counter, since it is compiled out under NDEBUG), everything else (std::vector
// growth, Buffer growth) by counting calls to a replaced global operator new while a flag is set.
// The flag is cleared before any Catch2 assertion, which allocates itself.

// clang-format off
#include "no_alloc_harness.hpp"  // first: it configures Eigen and replaces operator new
// clang-format on

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/layer.hpp"
#include "moet/routing.hpp"
#include "moet/train/optim.hpp"

namespace test_no_alloc_train {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;
using no_alloc::Window;

template <class S>
moet::RowMatrix<S> random_rows(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  moet::RowMatrix<S> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(normal(gen));
  return m;
}

// Warm-up steps, then six steps (zero_grad, forward_train, backward, then AdamW or SGD) in a
// no-allocation window. Small shapes: Eigen's product stays within its stack buffers.
template <class Layer>
void check_training_does_not_allocate(Layer layer, const moet::RouteContext& ctx) {
  const Index d = layer.model_dim();
  const auto x = random_rows<float>(48, d, 5u);
  const auto dy = random_rows<float>(48, d, 6u);
  moet::RowMatrix<float> y(48, d), dx(48, d);
  typename Layer::Workspace ws;
  moet::AdamW<float> adamw({.lr = 1e-3});
  moet::Sgd<float> sgd({.lr = 1e-3, .momentum = 0.9});
  const auto step = [&] {
    layer.zero_grad();
    layer.forward_train(x, y, ctx, ws);
    layer.backward(x, dy, ctx, ws, dx);
  };
  // Warm-up: the first step allocates the gradients, the transposed packs and each optimiser's
  // state.
  step();
  adamw.step(layer);
  step();
  sgd.step(layer);
  Window window;
  window.open();
  for (int repeat = 0; repeat < 3; ++repeat) {
    step();
    adamw.step(layer);  // the update, then parameters_changed(): the repack
    step();
    sgd.step(layer);
  }
  const auto counts = window.close();
  CHECK(counts.new_calls == 0);
  CHECK(counts.eigen_violations == 0);
}

// The bank's own contract, independent of which thread ran what before: a scratch that only
// had `reserve(scratch, rows)` runs forward_train and backward on up to `rows` rows without
// allocating (the weights' transposed packs are built by a first backward on another scratch).
// The layer test above relies on it when a thread runs its first backward after the warm-up.
// Few rows against wide weights is the case a forward-only reservation misses: the weight
// gradients' products have max(d, f) output rows.
template <class Bank>
void check_reserved_scratch_does_not_allocate(Bank bank, Index rows) {
  const Index d = bank.model_dim();
  const auto x = random_rows<float>(rows, d, 7u);
  const auto dy = random_rows<float>(rows, d, 8u);
  moet::RowMatrix<float> y(rows, d), dx(rows, d);
  moet::RowMatrix<float> cache(rows, bank.cache_width());
  bank.zero_grad();
  {
    typename Bank::Scratch first;
    bank.forward_train(0, x, y, cache, first);
    bank.backward(0, x, cache, dy, dx, first);
  }
  typename Bank::Scratch fresh;
  bank.reserve(fresh, rows);
  Window window;
  window.open();
  bank.forward_train(0, x, y, cache, fresh);
  bank.backward(0, x, cache, dy, dx, fresh);
  const auto counts = window.close();
  CHECK(counts.new_calls == 0);
  CHECK(counts.eigen_violations == 0);
}

// A plan of `tokens` tokens, one expert each: token t goes to expert `expert_of(t)`.
template <class F>
moet::Routing<float> one_each(Index tokens, Index experts, F&& expert_of) {
  moet::Routing<float> r;
  r.reset(tokens, experts);
  for (Index t = 0; t < tokens; ++t) r.counts()[static_cast<std::size_t>(t)] = 1;
  r.commit_counts();
  for (Index t = 0; t < tokens; ++t) {
    r.experts(t)[0] = static_cast<std::int32_t>(expert_of(t));
    r.weights(t)[0] = 0.5f;
  }
  return r;
}

// GroupedDispatch's split backward after a warm-up on a balanced plan, then on plans with as many
// assignments spread differently (one hot expert: more blocks; every expert's rows contiguous):
// its pieces and packs were sized for the most blocks such a plan can have. Only the backward
// is in the window (the forward's task list may grow with the number of blocks).
template <class Bank>
void check_split_backward_does_not_allocate(Bank bank) {
  REQUIRE(bank.backward_split_products() > 0);
  const Index d = bank.model_dim();
  const Index n = bank.num_experts();
  constexpr Index kTokens = 64;  // the balanced warm-up has whole blocks of 16
  const auto x = random_rows<float>(kTokens, d, 9u);
  const auto dy = random_rows<float>(kTokens, d, 10u);
  moet::RowMatrix<float> y(kTokens, d), dx(kTokens, d);
  std::vector<float> d_weights(kTokens);
  const moet::GroupedDispatch dispatch({.block_rows = 16});
  typename moet::GroupedDispatch::Workspace<Bank> ws;
  const auto balanced = one_each(kTokens, n, [&](Index t) { return t % n; });
  const auto hot = one_each(kTokens, n, [&](Index t) { return t % 7 == 0 ? 1 : 0; });
  const auto ragged = one_each(kTokens, n, [&](Index t) { return t < n * 15 ? t / 15 : n - 1; });
  bank.zero_grad();
  dispatch.forward_train(bank, x, balanced, y, ws);
  dispatch.backward(bank, x, balanced, dy, ws, d_weights, dx);
  for (const auto* plan : {&hot, &ragged, &balanced}) {
    bank.zero_grad();
    dispatch.forward_train(bank, x, *plan, y, ws);
    Window window;
    window.open();
    dispatch.backward(bank, x, *plan, dy, ws, d_weights, dx);
    dispatch.backward(bank, x, *plan, dy, ws, d_weights, dx);  // accumulating
    const auto counts = window.close();
    CHECK(counts.new_calls == 0);
    CHECK(counts.eigen_violations == 0);
  }
}

}  // namespace

TEST_CASE("The split backward does not allocate after a warm-up of as many assignments",
          "[no_alloc][train]") {
  for (const auto format : {moet::WeightFormat::kF32, moet::WeightFormat::kBf16}) {
    CAPTURE(moet::weight_format_name(format));
    check_split_backward_does_not_allocate(moet::SwiGluExperts<float>(
        {.model_dim = 16, .hidden_dim = 24, .num_experts = 4, .weight_format = format}));
    check_split_backward_does_not_allocate(moet::GeluFfnExperts<float>(
        {.model_dim = 24, .hidden_dim = 16, .num_experts = 3, .weight_format = format}));
  }
}

TEST_CASE("A reserved scratch runs an expert's forward_train and backward without allocating",
          "[no_alloc][train]") {
  // bf16 banks run their backward on bf16 packs and bf16 rows of activations.
  for (const auto format : {moet::WeightFormat::kF32, moet::WeightFormat::kBf16}) {
    for (const Index rows : {Index{4}, Index{16}, Index{40}}) {
      CAPTURE(moet::weight_format_name(format), rows);
      check_reserved_scratch_does_not_allocate(
          moet::SwiGluExperts<float>(
              {.model_dim = 16, .hidden_dim = 24, .num_experts = 2, .weight_format = format}),
          rows);
      check_reserved_scratch_does_not_allocate(
          moet::GeluFfnExperts<float>(
              {.model_dim = 24, .hidden_dim = 16, .num_experts = 2, .weight_format = format}),
          rows);
    }
  }
}

TEST_CASE("A warmed-up training step does not allocate: top-2, SwiGLU, shared experts",
          "[no_alloc][train]") {
  using Experts = moet::SwiGluExperts<float>;
  check_training_does_not_allocate(
      moet::MoELayer(moet::TopKGate<float>(moet::TopKGate<float>::mixtral_options(16, 6)),
                     Experts({.model_dim = 16, .hidden_dim = 24, .num_experts = 6}),
                     Experts({.model_dim = 16, .hidden_dim = 8, .num_experts = 1}),
                     moet::GroupedDispatch({.block_rows = 16})),
      {});
}

TEST_CASE("A warmed-up training step does not allocate: a packed router of 16 experts",
          "[no_alloc][train]") {
  // kPackedRouterMinExperts experts: the router's forward and backward products run on the
  // packed kernels (W_r, W_r^T and dz packed, thread-local workspaces), dW in two column
  // blocks.
  // Top-16 of 16: every expert gets every token in every step, so the steps' updates of W_r
  // cannot send an expert more rows, or a first row, after the warm-up.
  using Experts = moet::SwiGluExperts<float>;
  constexpr Index experts = moet::detail::kPackedRouterMinExperts;
  auto options = moet::TopKGate<float>::mixtral_options(32, experts);
  options.k = experts;
  moet::TopKGate<float> gate(options);
  check_training_does_not_allocate(
      moet::MoELayer(std::move(gate),
                     Experts({.model_dim = 32, .hidden_dim = 8, .num_experts = experts}),
                     moet::GroupedDispatch({.block_rows = 16})),
      {});
}

TEST_CASE("A warmed-up training step does not allocate: DynMoE's cosine router of 16 slots",
          "[no_alloc][train]") {
  // 16 slots: the cosine router's products on the packed kernels (W, Wn^T and x packed, y in
  // router scratch). Thresholds far below every score: every slot fires for every token in
  // every step, so the steps cannot send an expert more rows, or a first row, after the
  // warm-up.
  using Experts = moet::SwiGluExperts<float>;
  constexpr Index experts = moet::detail::kPackedRouterMinExperts;
  moet::TopAnyGate<float> gate(
      {.model_dim = 32, .num_experts = experts, .initial_experts = experts});
  gate.set_thresholds(moet::Vector<float>::Constant(experts, -50.0f));
  moet::RouteContext ctx;
  ctx.training = true;
  check_training_does_not_allocate(
      moet::MoELayer(std::move(gate),
                     Experts({.model_dim = 32, .hidden_dim = 8, .num_experts = experts}),
                     moet::GroupedDispatch({.block_rows = 16})),
      ctx);
}

TEST_CASE("A warmed-up training step does not allocate: bf16 banks", "[no_alloc][train]") {
  using Experts = moet::SwiGluExperts<float>;
  constexpr auto kBf16 = moet::WeightFormat::kBf16;
  check_training_does_not_allocate(
      moet::MoELayer(
          moet::TopKGate<float>(moet::TopKGate<float>::mixtral_options(16, 4)),
          Experts({.model_dim = 16, .hidden_dim = 24, .num_experts = 4, .weight_format = kBf16}),
          moet::GroupedDispatch({.block_rows = 16})),
      {});
}

TEST_CASE("A warmed-up training step does not allocate: THOR, FFN experts", "[no_alloc][train]") {
  moet::RouteContext ctx;
  ctx.training = true;
  check_training_does_not_allocate(
      moet::MoELayer(
          moet::StochasticGate<float>({.model_dim = 16, .num_experts = 3}),
          moet::GeluFfnExperts<float>({.model_dim = 16, .hidden_dim = 24, .num_experts = 3})),
      ctx);
}

}  // namespace test_no_alloc_train
