// After a warm-up call, the dispatchers run without touching the heap: Eigen's own allocations
// are caught by EIGEN_RUNTIME_NO_MALLOC (its assertion is redirected to a counter, since it is
// compiled out under NDEBUG), everything else (std::vector growth, Buffer growth) by counting
// calls to a replaced global operator new while a flag is set. The flag is cleared before any
// Catch2 assertion, which allocates itself.

// clang-format off
#include "no_alloc_harness.hpp"  // first: it configures Eigen and replaces operator new
// clang-format on

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/dispatch/dense.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/dispatch/reference.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/importance.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/layer.hpp"
#include "moet/routing.hpp"

namespace test_no_alloc {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;
using no_alloc::Window;

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

// Token t -> experts (t + j * stride) % E for j < k_t, k_t = t % (max_k + 1); weights 1 / (j + 1).
moet::Routing<float> make_plan(Index num_tokens, Index num_experts, Index max_k, Index stride) {
  moet::Routing<float> r;
  r.reset(num_tokens, num_experts);
  for (Index t = 0; t < num_tokens; ++t) r.counts()[static_cast<std::size_t>(t)] = t % (max_k + 1);
  r.commit_counts();
  for (Index t = 0; t < num_tokens; ++t) {
    for (std::size_t j = 0; j < r.experts(t).size(); ++j) {
      r.experts(t)[j] =
          static_cast<std::int32_t>((t + static_cast<Index>(j) * stride) % num_experts);
      r.weights(t)[j] = 1.0f / static_cast<float>(j + 1);
    }
  }
  return r;
}

template <class X>
void check_dispatchers_do_not_allocate(const X& experts, Index num_tokens = 64,
                                       Index block_rows = 16) {
  const Index d = experts.model_dim();
  const auto x = random_rows<float>(num_tokens, d, 1u);
  const auto warm_plan = make_plan(num_tokens, experts.num_experts(), 3, 1);
  // Fewer assignments, another mix.
  const auto plan = make_plan(num_tokens, experts.num_experts(), 2, 3);
  moet::RowMatrix<float> y(num_tokens, d);
  moet::GroupedDispatch grouped({.block_rows = block_rows});
  moet::GroupedDispatch::Workspace<X> gws;
  moet::ReferenceDispatch::Workspace<X> rws;
  moet::DenseWorkspace<X> dws;

  // Warm-up: one call of each.
  grouped.run(experts, x, warm_plan, y, gws);
  moet::ReferenceDispatch{}.run(experts, x, warm_plan, y, rws);
  moet::add_dense_expert(experts, 0, 1.0f, x, y, dws);

  Window window;
  window.open();
  for (int repeat = 0; repeat < 3; ++repeat) {
    grouped.run(experts, x, warm_plan, y, gws);
    grouped.run(experts, x, plan, y, gws);
    moet::ReferenceDispatch{}.run(experts, x, plan, y, rws);
    moet::add_dense_expert(experts, 1, 0.5f, x, y, dws);
  }
  const auto counts = window.close();
  CHECK(counts.new_calls == 0);
  CHECK(counts.eigen_violations == 0);
}

// A whole layer forward (route, dispatch, shared experts, stats) after one warm-up call.
template <class Gate>
void check_layer_does_not_allocate(Gate gate, const moet::RouteContext& ctx) {
  using Experts = moet::SwiGluExperts<float>;
  const Index d = gate.model_dim(), num_experts = gate.num_experts();
  moet::MoELayer layer(std::move(gate),
                       Experts({.model_dim = d, .hidden_dim = 24, .num_experts = num_experts}),
                       Experts({.model_dim = d, .hidden_dim = 8, .num_experts = 1}));
  const auto x = random_rows<float>(48, d, 5u);
  moet::RowMatrix<float> y(48, d);
  typename decltype(layer)::Workspace ws;
  layer.forward(x, y, ctx, ws);  // warm-up
  Window window;
  window.open();
  long num_assignments = 0;
  for (int repeat = 0; repeat < 3; ++repeat) {
    num_assignments += static_cast<long>(layer.forward(x, y, ctx, ws).num_assignments);
  }
  const auto counts = window.close();
  CHECK(num_assignments > 0);
  CHECK(counts.new_calls == 0);
  CHECK(counts.eigen_violations == 0);
}

}  // namespace

TEST_CASE("A layer forward does not allocate after warm-up, for every gate", "[no_alloc][layer]") {
  constexpr Index kDim = 16, kExperts = 6;
  const std::vector<float> importance(48, 0.5f);
  moet::RouteContext ctx;
  ctx.importance = importance;
  ctx.training = GENERATE(false, true);
  check_layer_does_not_allocate(moet::TopKGate<float>({.model_dim = kDim,
                                                       .num_experts = kExperts,
                                                       .k = 2,
                                                       .noisy = true,
                                                       .capacity_factor = 1.0}),
                                ctx);
  check_layer_does_not_allocate(
      moet::TopPGate<float>({.model_dim = kDim, .num_experts = kExperts, .p = 0.5}), ctx);
  check_layer_does_not_allocate(
      moet::TopAnyGate<float>({.model_dim = kDim, .num_experts = kExperts}), ctx);
  check_layer_does_not_allocate(
      moet::ImportanceGate<float>({.model_dim = kDim, .num_experts = kExperts}), ctx);
  check_layer_does_not_allocate(
      moet::StochasticGate<float>({.model_dim = kDim, .num_experts = kExperts}), ctx);
}

TEST_CASE("The no-allocation checks detect allocations", "[no_alloc]") {
  // Guards the harness itself: a std::vector growth and an Eigen heap matrix are both seen.
  Window window;
  window.open();
  {
    std::vector<int> v(100, 1);
    moet::RowMatrix<float> m(32, 32);
    m.setZero();
    static_cast<void>(v);
  }
  const auto counts = window.close();
  CHECK(counts.new_calls >= 1);
  CHECK(counts.eigen_violations >= 1);
}

TEST_CASE("Dispatchers do not allocate after warm-up with SwiGLU experts", "[no_alloc][dispatch]") {
  const moet::SwiGluExperts<float> experts({.model_dim = 16, .hidden_dim = 32, .num_experts = 4});
  check_dispatchers_do_not_allocate(experts);
}

TEST_CASE("Dispatchers do not allocate after warm-up with large packed experts",
          "[no_alloc][dispatch][packed]") {
  // Blocks of up to 128 rows by hidden_dim 640: Eigen's product would heap-allocate its
  // packing buffers here; the packed kernels work in the reserved scratch.
  const moet::SwiGluExperts<float> glu({.model_dim = 256, .hidden_dim = 640, .num_experts = 3});
  REQUIRE(glu.uses_packed_kernels());
  check_dispatchers_do_not_allocate(glu, 400, 128);
  const moet::FfnExperts<float> ffn({.model_dim = 256, .hidden_dim = 640, .num_experts = 3});
  REQUIRE(ffn.uses_packed_kernels());
  check_dispatchers_do_not_allocate(ffn, 400, 128);
  // bf16 weights: the packed rows of A are bf16 in the same float scratch.
  const moet::SwiGluExperts<float> glu16({.model_dim = 256,
                                          .hidden_dim = 640,
                                          .num_experts = 3,
                                          .weight_format = moet::WeightFormat::kBf16});
  REQUIRE(glu16.uses_packed_kernels());
  check_dispatchers_do_not_allocate(glu16, 400, 128);
}

TEST_CASE("Dispatchers do not allocate after warm-up with FFN experts", "[no_alloc][dispatch]") {
  moet::FfnExperts<float> experts({.model_dim = 16, .hidden_dim = 24, .num_experts = 5});
  check_dispatchers_do_not_allocate(experts);
}

TEST_CASE("Dispatchers do not allocate after warm-up with one thread", "[no_alloc][dispatch]") {
  const int saved = moet::num_threads();
  moet::set_num_threads(1);
  const moet::SwiGluExperts<float> experts({.model_dim = 8, .hidden_dim = 16, .num_experts = 3});
  check_dispatchers_do_not_allocate(experts);
  moet::set_num_threads(saved);
}

}  // namespace test_no_alloc
