// bench_layer: the whole MoELayer forward (route, dispatch, combine, statistics) for every gate
// x tokens 1 .. 4096 x 1 or 2 threads, SwiGLU experts on packed weights.
//
//   ./bench_layer                                  # shape S2 (MOET_BENCH_SHAPE=S1|S2|S3|tiny)
//   ./bench_layer --benchmark_out=layer.json --benchmark_out_format=json
//
// Counters: tokens/s, GFLOP/s (6 d f per routed assignment: dynamic gates do less work on
// purpose, read it next to mean_k), mean_k, max_load (max/mean), threads.
#include <benchmark/benchmark.h>

#include "bench_suite.hpp"

namespace {

using moet::Index;

template <class G>
void BM_layer(benchmark::State& state) {
  using Bank = moet::SwiGluExperts<float>;
  const moet::bench::Shape shape = moet::bench::bench_shape("S2");
  const Index tokens = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const int saved = moet::num_threads();
  moet::set_num_threads(threads);
  Bank& bank = moet::bench::shared_bank(shape);
  // The layer borrows the shared bank (moved in, moved back at the end).
  moet::MoELayer<G, Bank> layer(moet::bench::make_gate<G>(shape), std::move(bank));
  typename moet::MoELayer<G, Bank>::Workspace ws;
  const auto x = moet::bench::random_tokens(tokens, shape.d, 7);
  const auto importance = moet::bench::random_importance(tokens, 8);
  moet::RouteContext ctx;
  ctx.seed = 42;
  ctx.importance = importance;
  moet::RowMatrix<float> y(tokens, shape.d);
  double assignments = static_cast<double>(layer.forward(x, y, ctx, ws).num_assignments);
  double mean_k = 0, max_load = 0;
  for (auto _ : state) {
    const auto& stats = layer.forward(x, y, ctx, ws);
    assignments = static_cast<double>(stats.num_assignments);
    mean_k = stats.mean_k;
    max_load = stats.max_mean_load_ratio;
    benchmark::DoNotOptimize(y.data());
  }
  const double it = static_cast<double>(state.iterations());
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(tokens) * it, benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] = benchmark::Counter(
      assignments * layer.experts().flops_per_token() * it * 1e-9, benchmark::Counter::kIsRate);
  state.counters["mean_k"] = mean_k;
  state.counters["max_load"] = max_load;
  state.counters["threads"] = threads;
  state.SetLabel(shape.name);
  bank = std::move(layer.experts());
  moet::set_num_threads(saved);
}

MOET_BENCH_EVERY_GATE(BM_layer);

}  // namespace

BENCHMARK_MAIN();
