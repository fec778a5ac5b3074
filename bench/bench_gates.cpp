// bench_gates: the routing cost alone (Gate::route: router product, selection, weights) of every
// gate on the same seeded tokens, for T = 1 .. 4096 tokens and 1 or 2 threads.
//
//   ./bench_gates                                  # shape S2 (MOET_BENCH_SHAPE=S1|S2|S3|tiny)
//   ./bench_gates --benchmark_out=gates.json --benchmark_out_format=json
//
// Counters: tokens/s, mean_k (experts per token the gate chose), threads.
#include <benchmark/benchmark.h>

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

}  // namespace

BENCHMARK_MAIN();
