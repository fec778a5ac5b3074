// bench_gates: the routing cost alone (Gate::route: router product, selection, weights) of every
// gate on the same seeded tokens, for T = 1 .. 4096 tokens and 1 or 2 threads.
//
//   ./bench_gates                                  # shape S2 (MOET_BENCH_SHAPE=S1|S2|S3|tiny)
//   ./bench_gates --benchmark_out=gates.json --benchmark_out_format=json
//
// Counters: tokens/s, mean_k (experts per token the gate chose), threads.
//
// BM_router_product: the router's product `z = x W_r` alone (d = 1024, one thread) for E = 4,
// 8, 16, 64 experts and T = 1, 32, 512 tokens, on moet's packed kernels and on Eigen's product
// with this build's flags (`router_product`): the measurement behind kPackedRouterMinExperts.
// The packed runs take `RouterWeights::forward` from kPackedRouterMinExperts experts up and,
// below it (where the router itself keeps Eigen's product), the same loop written out:
// `gemm_packed` over blocks of kRouterRowBlock rows on W packed for the selected level.
// BM_router_backward: the router's backward products the same way (E = 16, 64; T = 32, 512);
// BM_cosine_backward: the cosine router's (DynMoE's) whole backward the same way (timed by hand:
// without the per-iteration copy of its incoming gradients).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string_view>
#include <vector>

#include <benchmark/benchmark.h>

#include "moet/detail/softmax_router.hpp"
#include "moet/gates/cosine_router.hpp"

#include "bench_suite.hpp"

namespace {

using moet::Index;

template <class G>
void BM_route(benchmark::State& state) {
  const moet::bench::Shape shape = moet::bench::bench_shape("S2");
  const Index tokens = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const int saved = moet::num_threads();
  moet::set_num_threads(threads);
  const G gate = moet::bench::make_gate<G>(shape);
  const auto x = moet::bench::random_tokens(tokens, shape.d, 7);
  const auto importance = moet::bench::random_importance(tokens, 8);
  moet::RouteContext ctx;
  ctx.seed = 42;
  ctx.importance = importance;
  moet::Routing<float> routing;
  gate.route(x, ctx, routing);  // warm-up
  for (auto _ : state) {
    gate.route(x, ctx, routing);
    benchmark::DoNotOptimize(routing.weights().data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(tokens) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
  state.counters["mean_k"] = routing.mean_k();
  state.counters["threads"] = threads;
  state.SetLabel(shape.name);
  moet::set_num_threads(saved);
}

MOET_BENCH_EVERY_GATE(BM_route);

// range(0): experts, range(1): tokens, range(2): 1 = packed kernels, 0 = Eigen.
void BM_router_product(benchmark::State& state) {
  const Index experts = state.range(0);
  const Index tokens = state.range(1);
  const bool packed = state.range(2) != 0;
  const int saved = moet::num_threads();
  moet::set_num_threads(1);
  const auto x = moet::bench::random_tokens(tokens, 1024, 7);
  const moet::detail::RouterWeights<float> weights(moet::bench::random_tokens(1024, experts, 9));
  const bool direct = packed && !weights.packed_current();  // below the threshold
  if (direct && moet::kernel_isa() == moet::KernelIsa::kPortable) {
    state.SkipWithError("no packed kernels on the portable level");
  }
  moet::detail::PackedMatrix<float> w_packed;
  if (direct) w_packed.pack(moet::ConstRows<float>(weights.weights()), moet::kernel_isa());
  moet::detail::Buffer<float> scratch;
  moet::RowMatrix<float> z(tokens, experts);
  for (auto _ : state) {
    if (direct) {
      for (Index begin = 0; begin < tokens; begin += moet::detail::kRouterRowBlock) {
        const Index rows = std::min(moet::detail::kRouterRowBlock, tokens - begin);
        moet::detail::gemm_packed(moet::ConstRows<float>(x.middleRows(begin, rows)), w_packed,
                                  moet::Rows<float>(z.middleRows(begin, rows)),
                                  /*accumulate=*/false, scratch);
      }
    } else if (packed) {
      weights.forward(x, z);
    } else {
      moet::detail::router_product(moet::ConstRows<float>(x), weights.weights(), z);
    }
    benchmark::DoNotOptimize(z.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(tokens) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
  state.SetLabel(direct   ? "packed (gemm_packed, below the threshold)"
                 : packed ? "packed"
                          : "eigen");
  moet::set_num_threads(saved);
}
void router_product_args(benchmark::internal::Benchmark* b) {
  for (const Index experts : {4, 8, 16, 64}) {
    for (const Index tokens : {1, 32, 512}) {
      b->Args({experts, tokens, 0});
      b->Args({experts, tokens, 1});
    }
  }
}
BENCHMARK(BM_router_product)->Apply(router_product_args);

// range(0): experts, range(1): tokens, range(2): 1 = packed kernels, 0 = Eigen. The router's
// backward products alone (`dW += x^T dz`, `dx += dz W^T`, d = 1024, one thread): through
// `RouterWeights::backward` (the packed kernels from kPackedRouterMinExperts experts up) and
// through `linear_backward` (Eigen with this build's flags).
void BM_router_backward(benchmark::State& state) {
  const Index experts = state.range(0);
  const Index tokens = state.range(1);
  const bool packed = state.range(2) != 0;
  const int saved = moet::num_threads();
  moet::set_num_threads(1);
  const auto x = moet::bench::random_tokens(tokens, 1024, 7);
  const auto dz = moet::bench::random_tokens(tokens, experts, 8);
  moet::detail::RouterWeights<float> weights(moet::bench::random_tokens(1024, experts, 9));
  weights.zero_grad();
  moet::RowMatrix<float> grad = moet::RowMatrix<float>::Zero(1024, experts);
  moet::RowMatrix<float> dx = moet::RowMatrix<float>::Zero(tokens, 1024);
  for (auto _ : state) {
    if (packed) {
      weights.backward(moet::ConstRows<float>(x), moet::ConstRows<float>(dz), dx);
    } else {
      moet::detail::linear_backward<float>(moet::ConstRows<float>(x), weights.weights(),
                                           moet::ConstRows<float>(dz), grad, dx);
    }
    benchmark::DoNotOptimize(dx.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(tokens) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
  state.SetLabel(packed && weights.packed_current() ? "packed" : "eigen");
  moet::set_num_threads(saved);
}
void router_backward_args(benchmark::internal::Benchmark* b) {
  for (const Index experts : {16, 64}) {
    for (const Index tokens : {32, 512}) {
      b->Args({experts, tokens, 0});
      b->Args({experts, tokens, 1});
    }
  }
}
BENCHMARK(BM_router_backward)->Apply(router_backward_args);

// range(0): slots, range(1): tokens, range(2): 1 = packed kernels, 0 = Eigen. DynMoE's cosine
// router's backward alone (`CosineRouter::backward`, d = 1024, one thread, every dL/ds and
// dL/dr nonzero): on the packed kernels (from kPackedRouterMinExperts slots up), or with W
// handed out for writing first (`visit_parameters`), which keeps it on the scalar pass and
// Eigen's products until `parameters_changed()`.
void BM_cosine_backward(benchmark::State& state) {
  const Index slots = state.range(0);
  const Index tokens = state.range(1);
  const bool packed = state.range(2) != 0;
  const int saved = moet::num_threads();
  moet::set_num_threads(1);
  const auto x = moet::bench::random_tokens(tokens, 1024, 7);
  const auto ds = moet::bench::random_tokens(tokens, slots, 8);
  const auto dr = moet::bench::random_tokens(tokens, slots, 9);
  moet::CosineRouter<float> router({.model_dim = 1024, .num_experts = slots});
  const std::vector<float> mask(static_cast<std::size_t>(slots), 1.0f);
  std::vector<float> slot(static_cast<std::size_t>(2 * slots));
  std::vector<std::int32_t> block_bad(
      static_cast<std::size_t>(tokens / moet::CosineRouter<float>::kTokenBlock + 1));
  moet::RowMatrix<float> scores(tokens, slots);
  router.score(moet::ConstRows<float>(x), mask.data(),
               Eigen::Map<moet::RowMatrix<float>>(scores.data(), tokens, slots), slot.data(),
               block_bad.data());
  if (!packed) {
    router.visit_parameters([](std::string_view, moet::ParamMap<float>, moet::ParamMap<float>) {});
  }
  router.zero_grad();
  moet::RowMatrix<float> dx = moet::RowMatrix<float>::Zero(tokens, 1024);
  // Timed by hand around the backward alone: the copy of the incoming gradients that each
  // iteration needs (the backward turns them into dL/dcos in place) is not part of it.
  using Clock = std::chrono::steady_clock;
  for (auto _ : state) {
    auto grads = router.score_grads(tokens);
    grads.d_scores = ds;
    grads.d_r = dr;
    const auto t0 = Clock::now();
    router.backward(moet::ConstRows<float>(x), scores, router.fire_levels(), dx);
    benchmark::DoNotOptimize(dx.data());
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(tokens) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
  state.SetLabel(router.packed_product() ? "packed" : "eigen");
  moet::set_num_threads(saved);
}
BENCHMARK(BM_cosine_backward)->Apply(router_backward_args)->UseManualTime();

}  // namespace

BENCHMARK_MAIN();
