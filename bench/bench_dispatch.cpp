// bench_dispatch: GroupedDispatch (gather, packed expert kernels, combine) on a top-2 plan
// against the OpenBLAS ceiling (the same activated FLOPs as an equal split of the 2T rows over
// the experts, three single-threaded sgemm per expert, experts in parallel; see moet-compare).
//
//   env -u OPENBLAS_CORETYPE ./bench_dispatch      # shape S2 (MOET_BENCH_SHAPE=S1|S2|S3|tiny)
//   ./bench_dispatch --benchmark_out=dispatch.json --benchmark_out_format=json
//
// Counters: tokens/s, GFLOP/s (6 d f per routed assignment), mean_k, max_load (max/mean),
// threads. Compare BM_grouped and BM_ceiling rows with the same tokens and threads.
#include <benchmark/benchmark.h>

#include "bench_suite.hpp"

namespace {

using moet::Index;

void set_counters(benchmark::State& state, Index tokens, double assignments, double flops_per,
                  int threads) {
  const double it = static_cast<double>(state.iterations());
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(tokens) * it, benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(assignments * flops_per * it * 1e-9, benchmark::Counter::kIsRate);
  state.counters["threads"] = threads;
}

void BM_grouped(benchmark::State& state) {
  const moet::bench::Shape shape = moet::bench::bench_shape("S2");
  const Index tokens = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const int saved = moet::num_threads();
  moet::set_num_threads(threads);
  const auto& bank = moet::bench::cached_bank(shape);
  const auto gate = moet::bench::make_gate<moet::TopKGate<float>>(shape);
  const auto x = moet::bench::random_tokens(tokens, shape.d, 7);
  moet::Routing<float> plan;
  gate.route(x, moet::RouteContext{}, plan);
  moet::RowMatrix<float> y(tokens, shape.d);
  moet::GroupedDispatch dispatch;
  moet::GroupedDispatch::Workspace<moet::SwiGluExperts<float>> ws;
  dispatch.run(bank, x, plan, y, ws);  // warm-up
  for (auto _ : state) {
    dispatch.run(bank, x, plan, y, ws);
    benchmark::DoNotOptimize(y.data());
  }
  set_counters(state, tokens, static_cast<double>(plan.num_assignments()), bank.flops_per_token(),
               threads);
  const auto stats = moet::compute_stats(plan);
  state.counters["mean_k"] = stats.mean_k;
  state.counters["max_load"] = stats.max_mean_load_ratio;
  state.SetLabel(shape.name + " top_k:k=2");
  moet::set_num_threads(saved);
}

void BM_ceiling(benchmark::State& state) {
  if (!moet::bench::Ceiling::available()) {
    state.SkipWithError("built without OpenBLAS");
    return;
  }
  const moet::bench::Shape shape = moet::bench::bench_shape("S2");
  const Index tokens = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const int saved = moet::num_threads();
  moet::set_num_threads(threads);
  const auto& bank = moet::bench::cached_bank(shape);
  moet::bench::Ceiling ceiling(bank, 2 * tokens);
  ceiling.run();  // warm-up
  for (auto _ : state) ceiling.run();
  set_counters(state, tokens, 2.0 * static_cast<double>(tokens), bank.flops_per_token(), threads);
  state.counters["mean_k"] = 2.0;
  state.SetLabel(shape.name + " OpenBLAS equal split");
  moet::set_num_threads(saved);
}

BENCHMARK(BM_grouped)->Apply(moet::bench::token_args);
BENCHMARK(BM_ceiling)->Apply(moet::bench::token_args);

}  // namespace

BENCHMARK_MAIN();
