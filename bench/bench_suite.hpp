#pragma once
/// \file bench/bench_suite.hpp
/// What the Google Benchmark suites bench_gates, bench_dispatch and bench_layer share on top
/// of bench_common.hpp (which moet-compare also uses, without Google Benchmark): their
/// argument list and the registration of one benchmark template for every gate.

#include <benchmark/benchmark.h>

#include "bench_common.hpp"

namespace moet::bench {

/// The suites' arguments: tokens T = 1, 32, 512, 4096 at 1 and 2 threads, wall-clock time.
inline void token_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"tokens", "threads"});
  for (const int threads : {1, 2}) {
    for (const Index tokens : {1, 32, 512, 4096}) b->Args({tokens, threads});
  }
  b->UseRealTime();
}

/// Registers the benchmark template `fn<Gate>` for every float gate with `token_args`.
#define MOET_BENCH_EVERY_GATE(fn)                                                      \
  BENCHMARK_TEMPLATE(fn, moet::TopKGate<float>)->Apply(moet::bench::token_args);       \
  BENCHMARK_TEMPLATE(fn, moet::TopPGate<float>)->Apply(moet::bench::token_args);       \
  BENCHMARK_TEMPLATE(fn, moet::TopAnyGate<float>)->Apply(moet::bench::token_args);     \
  BENCHMARK_TEMPLATE(fn, moet::ImportanceGate<float>)->Apply(moet::bench::token_args); \
  BENCHMARK_TEMPLATE(fn, moet::StochasticGate<float>)->Apply(moet::bench::token_args)

}  // namespace moet::bench
