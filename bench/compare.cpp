// moet-compare: runs every router on the same seeded batch through the same SwiGLU expert bank
// and prints, per gate, the experts it activates, the time the layer takes (min, median, max),
// and how that time compares with an OpenBLAS per-expert ceiling, the FMA peak and the memory
// roofline, flagging any ratio past its physical limit. `moet-compare --help` explains every
// flag, column, shape and gate key (help_footer below); the gates are built from router specs
// with moet's grammar (moet/gates/spec.hpp).
//
//   moet-compare                              # every gate, shape S2, T = 512, all threads
//   moet-compare --shape S1 --tokens 1,32,512,4096 --threads 1,2 --gates top_k:k=2 top_p:p=0.4
//   moet-compare --d-model 256 --d-ff 512 --experts 16 --repeat 9 --json out.json --svg out.svg
//   moet-compare --inputs zipf                # skewed loads (Zipf over token clusters)
//   moet-compare --weights f32,bf16,q8_0,q4_0 # weight formats, same weights, same run
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <map>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "moet/detail/parallel.hpp"
#include "moet/gates/spec.hpp"
#include <moet/moet.hpp>

#include "bench_common.hpp"
#include "build_info.hpp"  // MOET_BUILD_COMMIT, MOET_BUILD_CXX_FLAGS, MOET_BUILD_TYPE (CMake)
#include "openblas_core.hpp"
#include "svg.hpp"

namespace {

using moet::Index;
using Scalar = float;
using Bank = moet::SwiGluExperts<Scalar>;

struct Config {
  std::string shape = "S2";
  Index model_dim = 1024;
  Index hidden_dim = 3584;
  Index num_experts = 8;
  std::vector<Index> tokens = {512};
  std::vector<int> threads = {0};  // 0: OpenMP's default
  int repeat = 5;
  std::vector<std::string> gates = {"top_k:k=1",
                                    "top_k:k=2",
                                    "top_p:p=0.4",
                                    "top_any",
                                    "importance:k_max=4",
                                    "stochastic",
                                    "expert_choice",
                                    "relu",
                                    "null_experts:k=4,null=8"};
  std::vector<std::string> weights = {"f32"};  // WeightFormat names: one bank per format
  std::string inputs = "random";
  std::string json;
  std::string svg;
  bool flush = true;
  std::uint64_t seed = 42;
};

/// One measured (gate, tokens, threads, weights) combination.
struct Row {
  std::string gate;
  std::string weights = "f32";
  std::string params;
  Index tokens = 0;
  int threads = 0;
  double mean_k = 0.0;
  double active_params = 0.0;
  double ms_median = 0.0;
  double ms_min = 0.0;
  double ms_max = 0.0;
  std::vector<double> ms_all;  // every repeat, in run order
  double tokens_per_s = 0.0;
  double gflops = 0.0;
  double router_ms = 0.0;
  double dispatch_ms = 0.0;  // gather + combine (+ plan view): the dispatch with identity experts
  double max_load_ratio = 0.0;
  Index num_assignments = 0;
  Index live_experts = 0;
  std::vector<Index> load;
  bool is_top2 = false;  // top_k with k = 2: the t/top2 reference
  // Filled per series (tokens, threads, weights).
  double ceiling_gflops = 0.0;
  double peak_gflops = 0.0;
  double peak_limit = 1.0;  // the largest physically possible fraction of the FMA peak
  double bandwidth_gbs = 0.0;
  double roofline_ms = 0.0;
  double time_vs_top2 = 0.0;
  std::vector<std::string> flags;  // columns past their physical limit or bound
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr, "moet-compare: %s\nRun moet-compare --help for the flags.\n", why.c_str());
  std::exit(2);
}

/// The shapes of the performance issue (SwiGLU experts).
struct ShapeDef {
  const char* name;
  Index model_dim, hidden_dim, num_experts;
};
constexpr ShapeDef kShapes[] = {{"S1", 512, 1024, 8}, {"S2", 1024, 3584, 8}, {"S3", 1024, 512, 64}};

/// What `--help` prints after the flags: what the run measures, the shapes, the columns and
/// their limits, the JSON, and the router grammar (moet::gate_spec_help: the library's
/// defaults).
std::string help_footer() {
  std::string shapes;
  for (const auto& s : kShapes) {
    char line[128];
    std::snprintf(line, sizeof line,
                  "  %s  d_model %ld, d_ff %ld, %ld SwiGLU experts (%.1f M weights each)\n", s.name,
                  static_cast<long>(s.model_dim), static_cast<long>(s.hidden_dim),
                  static_cast<long>(s.num_experts),
                  static_cast<double>(3 * s.model_dim * s.hidden_dim) / 1e6);
    shapes += line;
  }
  return R"(
What it measures: every gate on the same seeded batch, through the same SwiGLU expert bank (one
bank per --weights format, all from the same float weights): the whole MoE layer forward, the
router alone and the dispatch alone, per token count T and thread count. Before each timed run
every thread writes its share of a 256 MiB buffer (not with --no-flush), so decode runs stream
their weights from DRAM. Each series (T, threads) also measures, in the same process, the read
bandwidth (a parallel sum over 128 MiB, best of 5) and the FMA peak (12 independent FMA chains
per thread), both on the vector width of the kernels in use whatever the build's flags, and the
OpenBLAS ceiling (top-2's FLOPs as an equal split of 2T rows over the experts, three
single-threaded cblas_sgemm per expert, experts in parallel; n/a when built without OpenBLAS;
the header names OpenBLAS's kernels: where OpenBLAS falls back to its SSE3 Prescott ones on an
AVX-512 or AVX2 CPU it does not know, and OPENBLAS_CORETYPE is unset, moet-compare re-runs
itself with OPENBLAS_CORETYPE=SkylakeX or Haswell).

Shapes (--shape; --d-model, --d-ff, --experts override its sizes and make it "custom"):
)" + shapes +
         R"(
Columns (one row per gate, one table per series and weight format):
  gate            the router spec as given
  mean_k          routed assignments per token
  params/tok      expert parameters activated per token (mean_k x 3 d_model d_ff)
  ms min/med/max  the layer forward over --repeat runs: fastest, median, slowest
  tokens/s        T over the median time
  GFLOP/s         6 d_model d_ff FLOPs per routed assignment, over the median time
  vs_ceil         GFLOP/s over the ceiling's (no physical limit: moet's kernels may beat it)
  peak            GFLOP/s over the FMA peak; limit 1 (2 for bf16 weights on AVX512-BF16, whose
                  dot products do two multiply-adds per lane; 4 for q8_0/q4_0/q4_1 on the levels
                  with 8-bit dot products, which do four per 32-bit lane: VNNI, and AVX2's
                  vpmaddubsw)
  roof            memory-roofline time (packed weight bytes of the experts the batch touches, over
                  the bandwidth) over the median time; limit 1
  router          the gate's routing time over the layer time; limit 100%
  disp            the dispatch overhead (the plan through GroupedDispatch with identity experts:
                  expert-major view, gather, output write, combine) over the layer time; limit 100%
  max/mean        the largest expert load over the mean load
  t/top2 (<=)     the median time over that of top_k with k=2 on the same batch, next to its
                  bound m/2 + 0.1 for a gate of mean k m
A value past its limit or bound is printed with a '!' and explained under the table: a
measurement to distrust (a probe that read low, weights served from cache, a busy machine).

JSON (--json FILE): {"meta": {...}, "results": [...]}. meta: tool and moet version, git commit,
CPU model and cores, kernel ISA in use and the CPU's best, compiler, flags, build type, OpenBLAS,
seed, repeat, flush, shape and sizes, tokens, threads, weights, inputs, gates, date (UTC).
results: one object per row with the columns above, every repeat's time (ms_all), the load per
expert and the flags. Integers are printed as integers, other numbers to full precision.

)" + moet::gate_spec_help<Scalar>();
}

/// Parses the command line (CLI11). `--help` prints everything and exits 0 before any
/// allocation or measurement; a bad flag, value or gate spec exits 2 with the reason.
Config parse(int argc, char** argv) {
  Config c;
  CLI::App app{
      "moet-compare: every router on the same batch through the same experts, timed against an "
      "OpenBLAS ceiling, the FMA peak and the memory roofline."};
  app.footer(help_footer());
  app.get_formatter()->column_width(30);
  std::string shape = c.shape;
  std::vector<std::string> gate_args;
  bool no_flush = false;
  std::string default_gates;
  for (const auto& g : c.gates) default_gates += (default_gates.empty() ? "" : " ") + g;
  app.add_option("--shape", shape, "S1, S2 or S3 (sizes below)")
      ->check(CLI::IsMember({"S1", "S2", "S3"}))
      ->capture_default_str();
  app.add_option("--d-model", c.model_dim, "token width d_model of a custom shape")
      ->check(CLI::Range(Index{1}, Index{1} << 30).description(">= 1"));
  app.add_option("--d-ff", c.hidden_dim, "expert hidden width d_ff of a custom shape")
      ->check(CLI::Range(Index{1}, Index{1} << 30).description(">= 1"));
  app.add_option("--experts", c.num_experts, "expert count of a custom shape")
      ->check(CLI::Range(Index{1}, Index{1} << 30).description(">= 1"));
  app.add_option("--tokens", c.tokens, "token counts T, comma-separated: one series each")
      ->delimiter(',')
      ->check(CLI::Range(Index{1}, Index{1} << 40).description(">= 1"))
      ->capture_default_str();
  app.add_option("--threads", c.threads,
                 "thread counts, comma-separated, 0 = OpenMP's default: one series each")
      ->delimiter(',')
      ->check(CLI::Range(0, 1 << 16).description(">= 0"))
      ->capture_default_str();
  app.add_option("--repeat", c.repeat, "timed runs per measurement (min, median, max)")
      ->check(CLI::Range(1, 1 << 20).description(">= 1"))
      ->capture_default_str();
  app.add_option(
         "--gates", gate_args,
         "router specs (grammar below), separated by spaces or commas [" + default_gates + "]")
      ->type_name("SPEC")
      ->expected(1, -1);
  app.add_option("--weights", c.weights,
                 "expert weight formats, comma-separated (f32, bf16, q8_0, q4_0, q4_1): one bank "
                 "each, same float weights; a last line compares their times")
      ->delimiter(',')
      ->check(CLI::IsMember({"f32", "bf16", "q8_0", "q4_0", "q4_1"}))
      ->capture_default_str();
  app.add_option("--inputs", c.inputs,
                 "random (normal: near-uniform loads), zipf (tokens around E centres drawn with "
                 "Zipf(1.2): skewed loads) or trained (Zipf(0.6), weaker centres)")
      ->check(CLI::IsMember({"random", "zipf", "trained"}))
      ->capture_default_str();
  app.add_option("--seed", c.seed, "seed of the weights, the inputs and the routers")
      ->capture_default_str();
  app.add_flag("--no-flush", no_flush, "do not flush the caches before each timed run");
  app.add_option("--json", c.json, "write the results and the run's metadata as JSON to FILE")
      ->type_name("FILE");
  app.add_option("--svg", c.svg, "plot tokens/s against mean k, and the loads, to FILE")
      ->type_name("FILE");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints the help (exit 0) or the error
    std::exit(code == 0 ? 0 : 2);
  }
  c.flush = !no_flush;
  for (const auto& s : kShapes) {
    if (shape != s.name) continue;
    if (app.count("--d-model") == 0) c.model_dim = s.model_dim;
    if (app.count("--d-ff") == 0) c.hidden_dim = s.hidden_dim;
    if (app.count("--experts") == 0) c.num_experts = s.num_experts;
  }
  const bool custom = app.count("--d-model") + app.count("--d-ff") + app.count("--experts") > 0;
  c.shape = custom ? "custom" : shape;
  if (!gate_args.empty()) {
    c.gates.clear();
    for (const auto& arg : gate_args) {
      for (auto& spec : moet::split_gate_specs(arg)) c.gates.push_back(std::move(spec));
    }
    if (c.gates.empty()) usage("--gates names no gate");
  }
  // Every spec is checked (gate, keys, values, ranges for this shape) before any work.
  for (const auto& spec : c.gates) {
    try {
      moet::with_gate<Scalar>(spec, c.model_dim, c.num_experts, c.seed + 1,
                              [](const auto& gate) { static_cast<void>(gate); });
    } catch (const moet::Error& e) {
      usage(e.what());
    }
  }
  return c;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double now_ms() {
  using Clock = std::chrono::steady_clock;
  return std::chrono::duration<double, std::milli>(Clock::now().time_since_epoch()).count();
}

// --- machine measurements ---------------------------------------------------------------------

/// Sum of `n` floats with 8 independent accumulators (the compiler vectorises it for the build's
/// flags).
float sum_portable(const float* x, Index n) {
  float acc[8] = {};
  Index i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j];
  }
  for (; i < n; ++i) acc[0] += x[i];
  float total = 0.0f;
  for (const float a : acc) total += a;
  return total;
}
#if defined(__x86_64__) || defined(__i386__)
/// The same on AVX2 registers, eight independent 8-float accumulators.
__attribute__((target("avx2,fma"))) float sum_avx2(const float* x, Index n) {
  __m256 acc[8];
  for (auto& a : acc) a = _mm256_setzero_ps();
  Index i = 0;
  for (; i + 64 <= n; i += 64) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_add_ps(acc[j], _mm256_loadu_ps(x + i + 8 * j));
  }
  for (int j = 1; j < 8; ++j) acc[0] = _mm256_add_ps(acc[0], acc[j]);
  alignas(32) float out[8];
  _mm256_store_ps(out, acc[0]);
  float total = sum_portable(x + i, n - i);
  for (const float v : out) total += v;
  return total;
}
/// The same on AVX-512 registers, eight independent 16-float accumulators (fewer leave the
/// probe short of the memory's bandwidth: 33 against 40 GB/s on 2 cores here).
__attribute__((target("avx512f"))) float sum_avx512(const float* x, Index n) {
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  Index i = 0;
  for (; i + 128 <= n; i += 128) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_add_ps(acc[j], _mm512_loadu_ps(x + i + 16 * j));
  }
  for (int j = 1; j < 8; ++j) acc[0] = _mm512_add_ps(acc[0], acc[j]);
  // Not _mm512_reduce_add_ps: GCC 12.2's warns "'__Y' is used uninitialized" inside it.
  alignas(64) float out[16];
  _mm512_store_ps(out, acc[0]);
  float total = sum_portable(x + i, n - i);
  for (const float v : out) total += v;
  return total;
}
#endif
/// Sum of `n` floats on the vectors of kernel level `isa`.
float sum_block(moet::KernelIsa isa, const float* x, Index n) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa >= moet::KernelIsa::kAvx512) return sum_avx512(x, n);
  if (isa == moet::KernelIsa::kAvx2 || isa == moet::KernelIsa::kAvx2Vnni) return sum_avx2(x, n);
#endif
  static_cast<void>(isa);
  return sum_portable(x, n);
}

/// The cache flush and the bandwidth probe. Before each timed run, every thread writes its
/// share of a 256 MiB buffer (larger than all the cores' last-level caches together; a write,
/// as the peers' benchmarks flush, so that no weight line survives in any cache level and
/// decode runs stream their weights from DRAM). The bandwidth probe reads a 128 MiB buffer.
struct Memory {
  static constexpr Index kFloats = Index{32} << 20;       // 128 MiB read by the probe
  static constexpr Index kFlushFloats = Index{64} << 20;  // 256 MiB written by the flush
  // The same kind of memory as the packed weights (2 MiB aligned, huge-page candidates).
  moet::detail::AlignedVector<float> data =
      moet::detail::AlignedVector<float>(static_cast<std::size_t>(kFloats), 1.0f);
  moet::detail::AlignedVector<float> scrub =
      moet::detail::AlignedVector<float>(static_cast<std::size_t>(kFlushFloats), 0.0f);
  volatile float sink = 0.0f;
  float stamp = 0.0f;

  /// Sum of `data` in parallel, one contiguous share per thread, on the widest vectors of the
  /// kernel level in use (sum_block), from huge pages as the weights are. Each matters on this
  /// project's 2-core VM: a probe compiled for the build's flags alone reads with SSE in a
  /// default build (25 GB/s against 36 with -march=native), threads taking interleaved 4 MiB
  /// blocks read 34 GB/s where contiguous halves read 43 (4 KiB pages), and 4 KiB pages read
  /// 27 GB/s in this process where the huge pages the packed weights live in read about 50:
  /// the kernels beat a probe that reads other memory than theirs (roof > 1).
  float read_all() {
    const Index threads = std::max(1, moet::num_threads());
    const Index share = (kFloats + threads - 1) / threads;
    std::vector<float> partial(static_cast<std::size_t>(threads), 0.0f);
    const moet::KernelIsa isa = moet::kernel_isa();
    moet::detail::parallel_blocks(kFloats, share, [&](Index begin, Index end) {
      partial[static_cast<std::size_t>(begin / share)] =
          sum_block(isa, data.data() + begin, end - begin);
    });
    float total = 0.0f;
    for (const float p : partial) total += p;
    return total;
  }
  /// Writes the whole 256 MiB flush buffer in parallel (a new value each time).
  void flush() {
    stamp += 1.0f;
    const float v = stamp;
    constexpr Index kBlock = Index{1} << 20;
    moet::detail::parallel_blocks(kFlushFloats, kBlock, [&](Index begin, Index end) {
      std::fill(scrub.data() + begin, scrub.data() + end, v);
    });
    sink = scrub[static_cast<std::size_t>(kFlushFloats / 2)];
  }
  /// Read bandwidth in GB/s with the current thread count, best of 5.
  double bandwidth_gbs() {
    double best = 1e30;
    for (int r = 0; r < 5; ++r) {
      const double t0 = now_ms();
      sink = read_all();
      best = std::min(best, now_ms() - t0);
    }
    return static_cast<double>(kFloats) * sizeof(float) / (best * 1e-3) * 1e-9;
  }
};

#if defined(__x86_64__) || defined(__i386__)
/// `kChains` independent FMA chains of `iters` steps on 8-float (AVX2) registers; returns a
/// value that depends on every chain (so none is optimised away).
__attribute__((target("avx2,fma"))) float fma_chains_avx2(long iters) {
  constexpr int kChains = 12;
  __m256 acc[kChains];
#pragma GCC unroll 12
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i) * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999999f);
  const __m256 b = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  alignas(64) float out[8];
  __m256 sum = acc[0];
#pragma GCC unroll 12
  for (int i = 1; i < kChains; ++i) sum = _mm256_add_ps(sum, acc[i]);
  _mm256_store_ps(out, sum);
  return out[0];
}
/// The same on 16-float (AVX-512) registers.
__attribute__((target("avx512f,fma"))) float fma_chains_avx512(long iters) {
  constexpr int kChains = 12;
  __m512 acc[kChains];
#pragma GCC unroll 12
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i) * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f);
  const __m512 b = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  alignas(64) float out[16];
  __m512 sum = acc[0];
#pragma GCC unroll 12
  for (int i = 1; i < kChains; ++i) sum = _mm512_add_ps(sum, acc[i]);
  _mm512_store_ps(out, sum);
  return out[0];
}
#endif

/// FMA peak in GFLOP/s with `threads` threads: 12 independent FMA chains on the vector
/// registers of the kernel level in use (`moet::kernel_isa()`; 0 on the portable level).
double fma_peak_gflops(int threads) {
#if defined(__x86_64__) || defined(__i386__)
  const moet::KernelIsa isa = moet::kernel_isa();
  if (isa == moet::KernelIsa::kPortable) return 0.0;
  const bool wide = isa >= moet::KernelIsa::kAvx512;
  constexpr int kChains = 12;
  constexpr long kIters = 4'000'000;
  std::vector<float> sinks(static_cast<std::size_t>(threads) * 64, 0.0f);
  double best = 1e30;
  for (int r = 0; r < 3; ++r) {
    const double t0 = now_ms();
    moet::detail::parallel_for(threads, [&](Index task) {
      sinks[static_cast<std::size_t>(task) * 64] =
          wide ? fma_chains_avx512(kIters) : fma_chains_avx2(kIters);
    });
    best = std::min(best, now_ms() - t0);
  }
  const double width = wide ? 16.0 : 8.0;
  const double flops = 2.0 * kChains * width * static_cast<double>(kIters) * threads;
  return flops / (best * 1e-3) * 1e-9;
#else
  static_cast<void>(threads);
  return 0.0;
#endif
}

// --- inputs -----------------------------------------------------------------------------------

moet::RowMatrix<Scalar> make_inputs(const Config& c, Index tokens) {
  std::mt19937_64 gen(c.seed + 7);
  std::normal_distribution<double> normal(0.0, 1.0);
  moet::RowMatrix<Scalar> x(tokens, c.model_dim);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<Scalar>(normal(gen));
  if (c.inputs == "random") return x;
  const bool zipf = c.inputs == "zipf";
  const double exponent = zipf ? 1.2 : 0.6;
  const double centre_scale = zipf ? 2.0 : 1.0;
  const Index clusters = c.num_experts;
  moet::RowMatrix<Scalar> centres(clusters, c.model_dim);
  for (Index i = 0; i < centres.size(); ++i) {
    centres.data()[i] = static_cast<Scalar>(centre_scale * normal(gen));
  }
  std::vector<double> cdf(static_cast<std::size_t>(clusters));
  double total = 0.0;
  for (Index j = 0; j < clusters; ++j) {
    total += std::pow(static_cast<double>(j + 1), -exponent);
    cdf[static_cast<std::size_t>(j)] = total;
  }
  std::uniform_real_distribution<double> uniform(0.0, total);
  for (Index t = 0; t < tokens; ++t) {
    const double u = uniform(gen);
    const auto j = static_cast<Index>(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
    x.row(t) = 0.5f * x.row(t) + centres.row(std::min(j, clusters - 1));
  }
  return x;
}

// --- the OpenBLAS ceiling ---------------------------------------------------------------------

struct Ceiling {
  bool available = false;
  double ms_median = 0.0;
  double gflops = 0.0;
};

/// Top-2's activated FLOPs as an equal split of `2 tokens` rows over the experts, three
/// single-threaded sgemm per expert, experts in parallel (see the file comment).
Ceiling measure_ceiling(const Bank& bank, Index tokens, const Config& c, Memory& memory) {
  Ceiling out;
  if (!moet::bench::Ceiling::available()) return out;
  const Index rows = 2 * tokens;
  moet::bench::Ceiling ceiling(bank, rows);
  ceiling.run();  // warm-up
  std::vector<double> ms;
  for (int r = 0; r < c.repeat; ++r) {
    if (c.flush) memory.flush();
    const double t0 = now_ms();
    ceiling.run();
    ms.push_back(now_ms() - t0);
  }
  out.available = true;
  out.ms_median = median(ms);
  out.gflops = static_cast<double>(rows) * bank.flops_per_token() / (out.ms_median * 1e-3) * 1e-9;
  return out;
}

// --- gates ------------------------------------------------------------------------------------

/// A stand-in expert bank whose expert is the identity (one row copy): the grouped dispatch
/// run on it costs everything a layer forward does besides the router and the expert math
/// (expert-major view, task list, gather, the output write, combine), which `measure` reports
/// as the dispatch overhead.
struct CopyExperts {
  using Scalar = float;
  struct Scratch {};
  Index experts = 0;
  Index dim = 0;
  Index num_experts() const { return experts; }
  Index model_dim() const { return dim; }
  Index hidden_dim() const { return dim; }
  Index params_per_expert() const { return 0; }
  double flops_per_token() const { return 0.0; }
  void forward(Index /*e*/, const moet::ConstRows<float>& in, moet::Rows<float> out,
               Scratch& /*scratch*/) const {
    out = in;
  }
};

/// Times the whole layer forward, the gate alone, and the dispatch overhead (the grouped
/// dispatch of the gate's plan with identity experts) on the same batch.
template <class G>
Row measure(G gate, Bank& bank, const moet::RowMatrix<Scalar>& x, const moet::RouteContext& ctx,
            const Config& c, Memory& memory) {
  moet::MoELayer<G, Bank> layer(std::move(gate), std::move(bank));
  typename moet::MoELayer<G, Bank>::Workspace ws;
  moet::RowMatrix<Scalar> y(x.rows(), x.cols());
  moet::RoutingStats stats = layer.forward(x, y, ctx, ws);  // warm-up
  std::vector<double> layer_ms, router_ms;
  for (int r = 0; r < c.repeat; ++r) {
    if (c.flush) memory.flush();
    const double t0 = now_ms();
    stats = layer.forward(x, y, ctx, ws);
    layer_ms.push_back(now_ms() - t0);
  }
  moet::Routing<Scalar> routing;
  layer.gate().route(x, ctx, routing);  // warm-up
  for (int r = 0; r < c.repeat; ++r) {
    const double t0 = now_ms();
    layer.gate().route(x, ctx, routing);
    router_ms.push_back(now_ms() - t0);
  }
  const CopyExperts copy{.experts = layer.experts().num_experts(), .dim = x.cols()};
  moet::GroupedDispatch::Workspace<CopyExperts> copy_ws;
  std::vector<double> dispatch_ms;
  moet::GroupedDispatch{}.run(copy, x, routing, y, copy_ws);  // warm-up
  for (int r = 0; r < c.repeat; ++r) {
    const double t0 = now_ms();
    moet::GroupedDispatch{}.run(copy, x, routing, y, copy_ws);
    dispatch_ms.push_back(now_ms() - t0);
  }
  Row row;
  row.tokens = x.rows();
  row.mean_k = stats.mean_k;
  row.active_params = layer.activated_params_per_token(stats);
  row.ms_median = median(layer_ms);
  row.ms_min = *std::min_element(layer_ms.begin(), layer_ms.end());
  row.ms_max = *std::max_element(layer_ms.begin(), layer_ms.end());
  row.ms_all = layer_ms;
  row.num_assignments = stats.num_assignments;
  row.tokens_per_s = static_cast<double>(x.rows()) / (row.ms_median * 1e-3);
  row.gflops = static_cast<double>(stats.num_assignments) * layer.experts().flops_per_token() /
               (row.ms_median * 1e-3) * 1e-9;
  row.router_ms = median(router_ms);
  row.dispatch_ms = median(dispatch_ms);
  row.max_load_ratio = stats.max_mean_load_ratio;
  row.load = stats.load;
  row.live_experts = static_cast<Index>(
      std::count_if(stats.load.begin(), stats.load.end(), [](Index l) { return l > 0; }));
  bank = std::move(layer.experts());
  return row;
}

/// The `k` a top_k spec asks for (its default when not given).
Index spec_k(const std::string& spec) {
  return moet::with_gate_options<Scalar>(spec, 1, 1 << 20, 0, [](auto, const auto& options) {
    if constexpr (requires { options.k; }) {
      return options.k;
    } else {
      return Index{0};
    }
  });
}

/// Builds the gate named by `spec` (the router grammar, gates/spec.hpp) and measures it.
Row run_gate(const std::string& spec, const Config& c, Bank& bank, const moet::RowMatrix<Scalar>& x,
             const std::vector<float>& importance, Memory& memory) {
  moet::RouteContext ctx;
  ctx.seed = c.seed;
  Row row = moet::with_gate<Scalar>(spec, c.model_dim, c.num_experts, c.seed + 1, [&](auto gate) {
    using G = decltype(gate);
    if constexpr (std::is_same_v<G, moet::ImportanceGate<Scalar>>) {
      ctx.importance = std::span<const float>(importance.data(), std::size_t(x.rows()));
    }
    Row measured = measure(std::move(gate), bank, x, ctx, c, memory);
    if constexpr (std::is_same_v<G, moet::TopKGate<Scalar>>) {
      measured.is_top2 = spec_k(spec) == 2;
    }
    return measured;
  });
  const auto colon = spec.find(':');
  row.gate = spec.substr(0, colon);
  row.params = colon == std::string::npos ? "" : spec.substr(colon + 1);
  return row;
}

std::string label(const Row& r) { return r.params.empty() ? r.gate : r.gate + ":" + r.params; }

// --- output -----------------------------------------------------------------------------------

/// The CPU's model name from /proc/cpuinfo ("unknown" elsewhere).
std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) != 0) continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos) break;
    const auto first = line.find_first_not_of(" \t", colon + 1);
    return first == std::string::npos ? "unknown" : line.substr(first);
  }
  return "unknown";
}

/// The compiler that built this program.
std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("GCC ") + __VERSION__;
#else
  return "unknown";
#endif
}

/// Now, UTC, ISO 8601.
std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char out[32];
  std::strftime(out, sizeof out, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return out;
}

/// The results as `{"meta": {...}, "results": [...]}` (nlohmann-json: integers stay integers,
/// doubles are printed to round-trip precision).
void write_json(const std::string& path, const Config& c, const std::vector<Row>& rows) {
  using Json = nlohmann::ordered_json;
  Json meta = {
      {"tool", "moet-compare"},
      {"moet_version", moet::kVersion},
      {"commit", MOET_BUILD_COMMIT},
      {"cpu_model", cpu_model()},
      {"cpu_threads", std::thread::hardware_concurrency()},
      {"kernel_isa", moet::kernel_isa_name(moet::kernel_isa())},
      {"kernel_isa_cpu", moet::kernel_isa_name(moet::cpu_kernel_isa())},
      {"kernel_isa_default", moet::kernel_isa_name(moet::default_kernel_isa())},
      {"compiler", compiler()},
      {"cxx_flags", MOET_BUILD_CXX_FLAGS},
      {"build_type", MOET_BUILD_TYPE},
      {"openblas", moet::bench::Ceiling::available()},
      {"openblas_core", moet::bench::openblas_core()},
      {"seed", c.seed},
      {"repeat", c.repeat},
      {"flush", c.flush},
      {"shape", c.shape},
      {"d_model", c.model_dim},
      {"d_ff", c.hidden_dim},
      {"experts", c.num_experts},
      {"tokens", c.tokens},
      {"threads", c.threads},
      {"weights", c.weights},
      {"inputs", c.inputs},
      {"gates", c.gates},
      {"date_utc", utc_now()},
  };
  Json results = Json::array();
  for (const Row& r : rows) {
    results.push_back({
        {"gate", r.gate},
        {"params", r.params},
        {"tokens", r.tokens},
        {"threads", r.threads},
        {"d_model", c.model_dim},
        {"d_ff", c.hidden_dim},
        {"experts", c.num_experts},
        {"weights", r.weights},
        {"inputs", c.inputs},
        {"kernels", moet::kernel_isa_name(moet::kernel_isa())},
        {"mean_k", r.mean_k},
        {"assignments", r.num_assignments},
        {"active_params", r.active_params},
        {"ms_median", r.ms_median},
        {"ms_min", r.ms_min},
        {"ms_max", r.ms_max},
        {"ms_all", r.ms_all},
        {"tokens_per_s", r.tokens_per_s},
        {"gflops", r.gflops},
        {"router_ms", r.router_ms},
        {"router_share", r.router_ms / r.ms_median},
        {"dispatch_ms", r.dispatch_ms},
        {"dispatch_share", r.dispatch_ms / r.ms_median},
        {"max_load_ratio", r.max_load_ratio},
        {"live_experts", r.live_experts},
        {"ceiling_gflops", r.ceiling_gflops},
        {"ratio_to_ceiling", r.ceiling_gflops > 0 ? r.gflops / r.ceiling_gflops : 0.0},
        {"fma_peak_gflops", r.peak_gflops},
        {"peak_fraction", r.peak_gflops > 0 ? r.gflops / r.peak_gflops : 0.0},
        {"peak_fraction_limit", r.peak_limit},
        {"bandwidth_gbs", r.bandwidth_gbs},
        {"roofline_ms", r.roofline_ms},
        {"roofline_fraction", r.roofline_ms / r.ms_median},
        {"time_vs_top2", r.time_vs_top2},
        {"time_vs_top2_bound", r.mean_k / 2.0 + 0.1},
        {"load", r.load},
        {"flags", r.flags},
    });
  }
  const Json doc = {{"meta", std::move(meta)}, {"results", std::move(results)}};
  std::ofstream out(path);
  if (!out) usage("cannot write '" + path + "'");
  out << doc.dump(2) << "\n";
}

/// What each flag of the table means (printed under a table that raises it).
const std::map<std::string, std::string>& flag_notes() {
  static const std::map<std::string, std::string> notes = {
      {"peak",
       "peak > its limit: more FLOP/s than the FMA peak measured in this run allows (the peak "
       "probe read low, or the timing is off)"},
      {"roof",
       "roof > 1: faster than streaming the touched weights at the measured bandwidth allows "
       "(weights served from cache, e.g. --no-flush or a small bank, or the probe read low)"},
      {"router", "router > 100%: the router alone took longer than the whole layer (noisy timing)"},
      {"disp", "disp > 100%: the dispatch alone took longer than the whole layer (noisy timing)"},
      {"t/top2", "t/top2 above its bound m/2 + 0.1: slower than its activated experts justify"},
  };
  return notes;
}

/// Checks a row's ratios against their physical limits and the t/top2 bound; fills `flags`.
void flag_row(Row& r) {
  r.flags.clear();
  if (r.peak_gflops > 0 && r.gflops / r.peak_gflops > r.peak_limit) r.flags.emplace_back("peak");
  if (r.roofline_ms / r.ms_median > 1.0) r.flags.emplace_back("roof");
  if (r.router_ms > r.ms_median) r.flags.emplace_back("router");
  if (r.dispatch_ms > r.ms_median) r.flags.emplace_back("disp");
  if (r.time_vs_top2 > 0 && r.time_vs_top2 > r.mean_k / 2.0 + 0.1) r.flags.emplace_back("t/top2");
}

bool flagged(const Row& r, const char* column) {
  return std::find(r.flags.begin(), r.flags.end(), column) != r.flags.end();
}

/// Prints one series' table (rows [begin, end)) and the notes of the flags it raised.
void print_table(const std::vector<Row>& rows, std::size_t begin, std::size_t end) {
  std::printf("%-22s %6s %10s %26s %9s %8s %7s %7s %6s %7s %7s %8s %14s\n", "gate", "mean_k",
              "params/tok", "ms min / med / max", "tokens/s", "GFLOP/s", "vs_ceil", "peak", "roof",
              "router", "disp", "max/mean", "t/top2 (<=)");
  std::vector<std::string> raised;
  for (std::size_t i = begin; i < end; ++i) {
    const Row& r = rows[i];
    const auto mark = [&](const char* column) { return flagged(r, column) ? "!" : " "; };
    char times[64], target[40] = "";
    std::snprintf(times, sizeof times, "%.3f / %.3f / %.3f", r.ms_min, r.ms_median, r.ms_max);
    if (r.time_vs_top2 > 0) {
      std::snprintf(target, sizeof target, "%.2f (%.2f)%s", r.time_vs_top2, r.mean_k / 2.0 + 0.1,
                    mark("t/top2"));
    }
    std::printf(
        "%-22s %6.3f %10.0f %26s %9.0f %8.1f %7.2f %6.2f%s %5.2f%s %5.1f%%%s %5.1f%%%s %8.2f "
        "%14s\n",
        label(r).c_str(), r.mean_k, r.active_params, times, r.tokens_per_s, r.gflops,
        r.ceiling_gflops > 0 ? r.gflops / r.ceiling_gflops : 0.0,
        r.peak_gflops > 0 ? r.gflops / r.peak_gflops : 0.0, mark("peak"),
        r.roofline_ms / r.ms_median, mark("roof"), 100.0 * r.router_ms / r.ms_median,
        mark("router"), 100.0 * r.dispatch_ms / r.ms_median, mark("disp"), r.max_load_ratio,
        target);
    for (const auto& f : r.flags) {
      if (std::find(raised.begin(), raised.end(), f) == raised.end()) raised.push_back(f);
    }
  }
  for (const auto& f : raised) std::printf("  ! %s\n", flag_notes().at(f).c_str());
}

/// Left panel: tokens/s against mean k, one point per gate and series (tokens, threads), with
/// top-2's proportional line `tokens/s(top2) * 2 / k` and the ceiling at k = 2. Right panel: the
/// per-expert load of every gate on the last series' batch.
void write_svg(const std::string& path, const Config& c, const std::vector<Row>& rows,
               const std::vector<std::pair<double, double>>& ceilings) {
  using moet::bench::palette;
  // Series: (tokens, threads, weights) in order of appearance.
  using Key = std::tuple<Index, int, std::string>;
  std::vector<Key> series;
  for (const Row& r : rows) {
    const Key key{r.tokens, r.threads, r.weights};
    if (std::find(series.begin(), series.end(), key) == series.end()) series.push_back(key);
  }
  moet::bench::Svg svg(1200, 470 + 14 * static_cast<double>(series.size()));
  std::map<std::string, std::size_t> colour;
  for (const auto& spec : c.gates) colour.emplace(spec, colour.size());
  double k_max = 2.5, tps_lo = 1e300, tps_hi = 0;
  for (const Row& r : rows) {
    k_max = std::max(k_max, r.mean_k * 1.1);
    tps_lo = std::min(tps_lo, r.tokens_per_s);
    tps_hi = std::max(tps_hi, r.tokens_per_s);
  }
  for (const auto& [k, tps] : ceilings) tps_hi = std::max(tps_hi, tps), static_cast<void>(k);
  const bool log_y = tps_hi > 8 * tps_lo;
  const double y_lo = log_y ? std::pow(10.0, std::floor(std::log10(tps_lo))) : 0.0;
  const double y_hi = log_y ? std::pow(10.0, std::ceil(std::log10(tps_hi * 1.05))) : tps_hi * 1.1;
  char title[256];
  std::snprintf(title, sizeof title, "moet-compare %s (d %ld, ff %ld, E %ld, %s inputs, %s)",
                c.shape.c_str(), static_cast<long>(c.model_dim), static_cast<long>(c.hidden_dim),
                static_cast<long>(c.num_experts), c.inputs.c_str(),
                moet::kernel_isa_name(moet::kernel_isa()));
  svg.text(550, 22, title, 15, "middle", "#222", true);
  moet::bench::Plot left(svg, {.x = 80, .y = 60, .width = 420, .height = 360}, {0.0, k_max},
                         {y_lo, y_hi},
                         {.title = "tokens/s against mean k (dashed: top-2 scaled by 2/k)",
                          .x_label = "mean k (experts per token)",
                          .y_label = "tokens/s",
                          .log_y = log_y});
  // Marker shape: the token count's place in --tokens; filled for the first thread count and
  // weight format, hollow (white, outlined in the gate's colour) for the others (the legend
  // names each series).
  auto index_of = [](const auto& list, const auto& v) {
    return static_cast<int>(std::find(list.begin(), list.end(), v) - list.begin());
  };
  std::vector<int> thread_counts;
  for (const auto& key : series) {
    const int th = std::get<1>(key);
    if (std::find(thread_counts.begin(), thread_counts.end(), th) == thread_counts.end()) {
      thread_counts.push_back(th);
    }
  }
  for (std::size_t s = 0; s < series.size(); ++s) {
    const auto& [tokens, threads, weights] = series[s];
    const int shape = index_of(c.tokens, tokens);
    const bool hollow = index_of(thread_counts, threads) > 0 || index_of(c.weights, weights) > 0;
    const auto in_series = [&](const Row& r) {
      return r.tokens == tokens && r.threads == threads && r.weights == weights;
    };
    double top2 = 0;
    double k_right = 0;
    for (const Row& r : rows) {
      if (!in_series(r)) continue;
      if (r.is_top2 && top2 == 0) top2 = r.tokens_per_s;
      k_right = std::max(k_right, r.mean_k);
    }
    if (top2 > 0) {
      std::vector<std::pair<double, double>> curve;
      for (double k = 0.6; k <= k_max; k += 0.05) {
        const double v = top2 * 2.0 / k;
        if (v <= y_hi && v >= y_lo) curve.emplace_back(left.px(k), left.py(v));
      }
      svg.polyline(curve, "#999", 1.0, "4 3");
    }
    for (const Row& r : rows) {
      if (!in_series(r)) continue;
      const auto it = colour.find(label(r));
      const char* col = palette(it == colour.end() ? 0 : it->second);
      svg.marker(left.px(r.mean_k), left.py(r.tokens_per_s), 10, shape, hollow ? "#fff" : col,
                 hollow ? col : "#333");
    }
    if (s < ceilings.size() && ceilings[s].second > 0) {
      const double cx = left.px(2.0), cy = left.py(ceilings[s].second);
      svg.line(cx - 7, cy, cx + 7, cy, "#000", 2.5);
      char ceil_tag[48];
      std::snprintf(ceil_tag, sizeof ceil_tag, "ceiling T=%ld/%d", static_cast<long>(tokens),
                    threads);
      if (index_of(c.weights, weights) > 0) ceil_tag[0] = '\0';  // drawn with the first format
      svg.text(cx + 9 + (hollow ? 70 : 0), cy + 4, ceil_tag, 10, "start", "#000");
    }
    char tag[64];
    std::snprintf(tag, sizeof tag, "T=%ld, %d thread(s), %s weights", static_cast<long>(tokens),
                  threads, weights.c_str());
    const double legend_y = 468 + 14 * static_cast<double>(s);
    svg.marker(90, legend_y - 4, 9, shape, hollow ? "#fff" : "#888", "#333");
    svg.text(100, legend_y, tag, 11, "start", "#333");
    static_cast<void>(k_right);
  }
  // Legend.
  double ly = 70;
  for (const auto& spec : c.gates) {
    svg.circle(1010, ly - 4, 5, palette(colour[spec]), "#333");
    svg.text(1020, ly, spec, 11);
    ly += 17;
  }
  // Right panel: loads of the last series.
  const Index last_tokens = series.empty() ? 0 : std::get<0>(series.back());
  const int last_threads = series.empty() ? 0 : std::get<1>(series.back());
  const std::string last_weights = series.empty() ? "" : std::get<2>(series.back());
  std::vector<const Row*> last;
  double load_hi = 1;
  for (const Row& r : rows) {
    if (r.tokens == last_tokens && r.threads == last_threads && r.weights == last_weights) {
      last.push_back(&r);
      for (const Index l : r.load) load_hi = std::max(load_hi, static_cast<double>(l));
    }
  }
  char load_title[128];
  std::snprintf(load_title, sizeof load_title, "assignments per expert (T = %ld)",
                static_cast<long>(last_tokens));
  const double num_e = static_cast<double>(c.num_experts);
  moet::bench::Plot right(svg, {.x = 580, .y = 60, .width = 390, .height = 360}, {0.0, num_e},
                          {0.0, load_hi * 1.1},
                          {.title = load_title, .x_label = "expert", .y_label = "load"});
  const double group = right.frame().width / num_e;
  const double bar = group * 0.85 / static_cast<double>(std::max<std::size_t>(last.size(), 1));
  for (std::size_t g = 0; g < last.size(); ++g) {
    const Row& r = *last[g];
    const auto it = colour.find(label(r));
    const char* col = palette(it == colour.end() ? 0 : it->second);
    for (std::size_t e = 0; e < r.load.size(); ++e) {
      const double x0 = right.frame().x + group * static_cast<double>(e) + group * 0.075 +
                        bar * static_cast<double>(g);
      const double top = right.py(static_cast<double>(r.load[e]));
      svg.rect(x0, top, bar, right.py(0.0) - top, col);
    }
  }
  if (!svg.save(path)) usage("cannot write '" + path + "'");
}

}  // namespace

int main(int argc, char** argv) {
  moet::bench::choose_openblas_core(argv);
  const Config c = parse(argc, argv);
  std::string formats;
  for (const auto& w : c.weights) formats += (formats.empty() ? "" : ", ") + w;
  std::printf(
      "moet-compare %s: shape %s (d_model %ld, d_ff %ld, experts %ld, SwiGLU, %s weights), "
      "inputs %s, repeat %d%s, seed %llu, kernels %s%s\n",
      moet::kVersion, c.shape.c_str(), static_cast<long>(c.model_dim),
      static_cast<long>(c.hidden_dim), static_cast<long>(c.num_experts), formats.c_str(),
      c.inputs.c_str(), c.repeat, c.flush ? " (caches flushed)" : "",
      static_cast<unsigned long long>(c.seed), moet::kernel_isa_name(moet::kernel_isa()),
      moet::kernel_isa() == moet::default_kernel_isa() ? "" : " (set by MOET_ISA)");
  std::printf("commit %s, %s, %s %s (%s), %u hardware threads, OpenBLAS kernels %s\n",
              MOET_BUILD_COMMIT, cpu_model().c_str(), compiler().c_str(), MOET_BUILD_TYPE,
              MOET_BUILD_CXX_FLAGS, std::thread::hardware_concurrency(),
              moet::bench::openblas_core().c_str());
  // One bank per weight format, the same float weights (same seed).
  std::vector<Bank> banks;
  for (const auto& w : c.weights) {
    banks.emplace_back(
        Bank::Options{.model_dim = c.model_dim,
                      .hidden_dim = c.hidden_dim,
                      .num_experts = c.num_experts,
                      .init_seed = c.seed,
                      .weight_format = moet::parse_weight_format(w, "moet-compare")});
  }
  Memory memory;
  std::vector<Row> rows;
  std::vector<std::pair<double, double>> ceilings;  // per series: (k, tokens/s)
  for (const Index tokens : c.tokens) {
    const moet::RowMatrix<Scalar> x = make_inputs(c, tokens);
    // Synthetic importance for the importance gate: log-normal per token.
    std::vector<float> importance(static_cast<std::size_t>(tokens));
    moet::detail::Rng rng(c.seed + 11);
    for (auto& v : importance) v = static_cast<float>(std::exp(rng.normal()));
    for (const int threads : c.threads) {
      const int saved = moet::num_threads();
      if (threads > 0) moet::set_num_threads(threads);
      const int used = moet::num_threads();
      const double bandwidth = memory.bandwidth_gbs();
      const double peak = fma_peak_gflops(used);
      const Ceiling ceiling = measure_ceiling(banks.front(), tokens, c, memory);
      std::printf("\nT = %ld tokens, %d thread(s): read bandwidth %.1f GB/s, FMA peak %.0f GFLOP/s",
                  static_cast<long>(tokens), used, bandwidth, peak);
      if (ceiling.available) {
        std::printf(", ceiling (OpenBLAS sgemm, top-2 FLOPs) %.3f ms = %.1f GFLOP/s\n",
                    ceiling.ms_median, ceiling.gflops);
      } else {
        std::printf(", ceiling n/a (built without OpenBLAS)\n");
      }
      const std::size_t formats_begin = rows.size();
      for (std::size_t w = 0; w < banks.size(); ++w) {
        Bank& bank = banks[w];
        // Bytes the kernels stream per expert: the packed copy's (bf16: 2 per weight; the block
        // formats' codes and half scales).
        const double expert_bytes =
            static_cast<double>(bank.packed_bytes()) / static_cast<double>(bank.num_experts());
        ceilings.emplace_back(2.0, ceiling.available
                                       ? static_cast<double>(tokens) / (ceiling.ms_median * 1e-3)
                                       : 0.0);
        if (banks.size() > 1) std::printf("weights %s\n", c.weights[w].c_str());
        const std::size_t series_begin = rows.size();
        // bf16 dot products (vdpbf16ps) do two multiply-adds per lane: twice the FMA peak;
        // 8-bit ones (vpdpbusd on the levels with VNNI; vpmaddubsw, lanes of two, on kAvx2
        // and kAvx512: every x86 level) four.
        const bool top_level = moet::kernel_isa() == moet::KernelIsa::kAvx512Bf16;
        const bool int_dot_level = moet::kernel_isa() != moet::KernelIsa::kPortable;
        const bool bf16_dot = c.weights[w] == "bf16" && top_level;
        const bool int8_dot = int_dot_level && (c.weights[w] == "q8_0" || c.weights[w] == "q4_0" ||
                                                c.weights[w] == "q4_1");
        for (const auto& spec : c.gates) {
          Row row = run_gate(spec, c, bank, x, importance, memory);
          row.threads = used;
          row.weights = c.weights[w];
          row.ceiling_gflops = ceiling.gflops;
          row.peak_gflops = peak;
          row.peak_limit = int8_dot ? 4.0 : bf16_dot ? 2.0 : 1.0;
          row.bandwidth_gbs = bandwidth;
          row.roofline_ms =
              static_cast<double>(row.live_experts) * expert_bytes / (bandwidth * 1e9) * 1e3;
          rows.push_back(row);
        }
        double top2_ms = 0;
        for (std::size_t i = series_begin; i < rows.size(); ++i) {
          if (rows[i].is_top2 && top2_ms == 0) top2_ms = rows[i].ms_median;
        }
        for (std::size_t i = series_begin; i < rows.size(); ++i) {
          rows[i].time_vs_top2 = top2_ms > 0 ? rows[i].ms_median / top2_ms : 0.0;
          flag_row(rows[i]);
        }
        print_table(rows, series_begin, rows.size());
      }  // weight formats
      // Speed of every other format over the first one, gate by gate, in this same run.
      const std::size_t per_format = c.gates.size();
      for (std::size_t w = 1; w < banks.size(); ++w) {
        std::printf("%s over %s (same run, time ratio):", c.weights[w].c_str(),
                    c.weights.front().c_str());
        for (std::size_t g = 0; g < per_format; ++g) {
          const Row& base = rows[formats_begin + g];
          const Row& other = rows[formats_begin + w * per_format + g];
          std::printf(" %s %.2fx", label(base).c_str(), base.ms_median / other.ms_median);
        }
        std::printf("\n");
      }
      std::fflush(stdout);
      moet::set_num_threads(saved);
    }
  }
  if (!c.json.empty()) {
    write_json(c.json, c, rows);
    std::printf("\nwrote %s\n", c.json.c_str());
  }
  if (!c.svg.empty()) {
    write_svg(c.svg, c, rows, ceilings);
    std::printf("wrote %s\n", c.svg.c_str());
  }
  return 0;
}
