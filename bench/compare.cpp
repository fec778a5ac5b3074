// moet-compare: runs every router on the same seeded batch through the same SwiGLU expert bank
// and prints, per gate, the experts it activates, the time the layer takes, and how that time
// compares with an OpenBLAS per-expert ceiling, the FMA peak and the memory roofline.
//
//   moet-compare                              # every gate, shape S2, T = 512, all threads
//   moet-compare --shape S1 --tokens 1,32,512,4096 --threads 1,2 --gates "top_k:k=2 top_p:p=0.4"
//   moet-compare --d-model 256 --d-ff 512 --experts 16 --repeat 9 --json out.json --svg out.svg
//   moet-compare --inputs zipf                # skewed loads (Zipf over token clusters)
//   moet-compare --weights f32,bf16,q8_0,q4_0 # weight formats, same weights, same run
//
// Gates (separated by spaces or commas; parameters after ':' separated by ','):
//   top_k:k=K[,renorm=0|1]  top_p:p=P[,max_k=M]  top_any[:active=A]
//   importance:k_max=K[,k_min=K,norm=max|minmax|budget]  stochastic[:mode=token|ensemble]
//
// Columns: mean_k; activated parameters per token; median layer time over --repeat runs (caches
// flushed before each run unless --no-flush); tokens/s; GFLOP/s on the routed assignments
// (6 d f per assignment); vs_ceil = GFLOP/s over the ceiling's; peak = GFLOP/s over the
// measured FMA peak; roof = memory-roofline time (weight bytes of the experts the call touches
// over the measured bandwidth) over the measured time; router = gate time over layer time;
// disp = dispatch overhead over layer time (the gate's plan through GroupedDispatch with
// identity experts: expert-major view, gather, output write and combine, no expert math);
// max/mean load; t/top2 = time over top_k:k=2's time on the same batch, next to the target
// m/2 + 0.1 for a gate with mean k = m.
//
// The ceiling (needs OpenBLAS at build time): the activated FLOPs of top-2 done as an equal
// split of the 2T rows over the experts, three single-threaded cblas_sgemm per expert (gate, up,
// down; no routing, gather, activation or combine), experts in parallel, same process.
//
// Weights (--weights, a list): f32, bf16, q8_0, q4_0, q4_1 expert kernel weights (WeightFormat),
// one bank per format built from the same float weights; with several, each format gets its own
// block of rows and a final line gives every gate's time ratio over the first format. The
// roofline uses the packed bytes of the format (bf16: 2 per weight; the block formats' codes
// and half scales); the ceiling is always float OpenBLAS sgemm.
//
// Inputs (--inputs): random (standard normal: near-uniform loads), zipf (tokens drawn around E
// cluster centres with Zipf(1.2) cluster frequencies: the linear routers send each cluster to
// the same few experts, so loads are skewed) and trained (Zipf(0.6), weaker centres: a milder,
// realistic spread). Same seed, same batch for every gate.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "moet/detail/parallel.hpp"
#include <moet/moet.hpp>

#include "bench_common.hpp"
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
  std::vector<std::string> gates = {"top_k:k=1", "top_k:k=2",          "top_p:p=0.4",
                                    "top_any",   "importance:k_max=4", "stochastic"};
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
  double tokens_per_s = 0.0;
  double gflops = 0.0;
  double router_ms = 0.0;
  double dispatch_ms = 0.0;  // gather + combine (+ plan view): the dispatch with identity experts
  double max_load_ratio = 0.0;
  Index live_experts = 0;
  std::vector<Index> load;
  // Filled per series (tokens, threads, weights).
  double ceiling_gflops = 0.0;
  double peak_gflops = 0.0;
  double bandwidth_gbs = 0.0;
  double roofline_ms = 0.0;
  double time_vs_top2 = 0.0;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "moet-compare: %s\n"
               "usage: moet-compare [--shape S1|S2|S3] [--d-model N --d-ff N --experts N]\n"
               "                    [--tokens T1,T2,..] [--threads N1,N2,..] [--repeat N]\n"
               "                    [--gates \"g1 g2 ..\"] [--weights f32,bf16,q8_0,..] "
               "[--inputs random|zipf|trained]\n"
               "                    [--seed N] [--no-flush] [--json FILE] [--svg FILE]\n",
               why.c_str());
  std::exit(2);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::string cur;
  for (const char c : s) {
    if (c == sep) {
      if (!cur.empty()) parts.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) parts.push_back(cur);
  return parts;
}

long parse_int(const std::string& s, const char* what) {
  char* end = nullptr;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0') usage(std::string("bad ") + what + ": '" + s + "'");
  return v;
}

double parse_double(const std::string& s, const char* what) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0') usage(std::string("bad ") + what + ": '" + s + "'");
  return v;
}

void set_shape(Config& c, const std::string& name) {
  // The shapes of the performance issue (SwiGLU experts).
  if (name == "S1") {
    c.model_dim = 512, c.hidden_dim = 1024, c.num_experts = 8;
  } else if (name == "S2") {
    c.model_dim = 1024, c.hidden_dim = 3584, c.num_experts = 8;
  } else if (name == "S3") {
    c.model_dim = 1024, c.hidden_dim = 512, c.num_experts = 64;
  } else {
    usage("unknown shape '" + name + "'");
  }
  c.shape = name;
}

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value after " + arg);
      return argv[++i];
    };
    if (arg == "--shape") {
      set_shape(c, value());
    } else if (arg == "--d-model") {
      c.model_dim = parse_int(value(), "--d-model"), c.shape = "custom";
    } else if (arg == "--d-ff") {
      c.hidden_dim = parse_int(value(), "--d-ff"), c.shape = "custom";
    } else if (arg == "--experts") {
      c.num_experts = parse_int(value(), "--experts"), c.shape = "custom";
    } else if (arg == "--tokens") {
      c.tokens.clear();
      for (const auto& t : split(value(), ',')) c.tokens.push_back(parse_int(t, "--tokens"));
    } else if (arg == "--threads") {
      c.threads.clear();
      for (const auto& t : split(value(), ',')) {
        c.threads.push_back(static_cast<int>(parse_int(t, "--threads")));
      }
    } else if (arg == "--repeat") {
      c.repeat = static_cast<int>(parse_int(value(), "--repeat"));
    } else if (arg == "--seed") {
      c.seed = static_cast<std::uint64_t>(parse_int(value(), "--seed"));
    } else if (arg == "--json") {
      c.json = value();
    } else if (arg == "--svg") {
      c.svg = value();
    } else if (arg == "--no-flush") {
      c.flush = false;
    } else if (arg == "--weights") {
      c.weights = split(value(), ',');
      if (c.weights.empty()) usage("--weights needs a list of f32, bf16, q8_0, q4_0, q4_1");
      for (const auto& w : c.weights) {
        if (w != "f32" && w != "bf16" && w != "q8_0" && w != "q4_0" && w != "q4_1")
          usage("--weights must list f32, bf16, q8_0, q4_0 and/or q4_1, got '" + w + "'");
      }
    } else if (arg == "--inputs") {
      c.inputs = value();
      if (c.inputs != "random" && c.inputs != "zipf" && c.inputs != "trained") {
        usage("--inputs must be random, zipf or trained, got '" + c.inputs + "'");
      }
    } else if (arg == "--gates") {
      // Gates are separated by spaces, or by commas where a piece starts a new gate (contains
      // ':' or no '='); parameters within a gate use ','.
      c.gates.clear();
      std::string list = value();
      std::replace(list.begin(), list.end(), ' ', ',');
      std::string current;
      for (const auto& piece : split(list, ',')) {
        const bool starts =
            piece.find('=') == std::string::npos || piece.find(':') != std::string::npos;
        if (starts && !current.empty()) c.gates.push_back(current), current.clear();
        current += current.empty() ? piece : "," + piece;
      }
      if (!current.empty()) c.gates.push_back(current);
    } else if (arg == "--help" || arg == "-h") {
      usage("help");
    } else {
      usage("unknown argument '" + arg + "'");
    }
  }
  if (c.repeat < 1) usage("--repeat must be >= 1");
  if (c.model_dim < 1 || c.hidden_dim < 1 || c.num_experts < 1) usage("sizes must be >= 1");
  if (c.tokens.empty() || c.threads.empty() || c.gates.empty()) usage("empty list");
  for (const auto t : c.tokens) {
    if (t < 1) usage("--tokens must be >= 1");
  }
  return c;
}

/// "name:k=v,k=v" -> name and a key/value map.
std::pair<std::string, std::map<std::string, std::string>> parse_gate(const std::string& spec) {
  const auto colon = spec.find(':');
  std::pair<std::string, std::map<std::string, std::string>> out;
  out.first = spec.substr(0, colon);
  if (colon != std::string::npos) {
    for (const auto& kv : split(spec.substr(colon + 1), ',')) {
      const auto eq = kv.find('=');
      if (eq == std::string::npos) usage("gate parameter without '=': '" + kv + "'");
      out.second[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
  }
  return out;
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

/// The cache flush and the bandwidth probe. Before each timed run, every thread writes its
/// share of a 256 MiB buffer (larger than all the cores' last-level caches together; a write,
/// as the peers' benchmarks flush, so that no weight line survives in any cache level and
/// decode runs stream their weights from DRAM). The bandwidth probe reads a 128 MiB buffer.
struct Memory {
  static constexpr Index kFloats = Index{32} << 20;        // 128 MiB read by the probe
  static constexpr Index kFlushFloats = Index{64} << 20;   // 256 MiB written by the flush
  std::vector<float> data = std::vector<float>(static_cast<std::size_t>(kFloats), 1.0f);
  std::vector<float> scrub = std::vector<float>(static_cast<std::size_t>(kFlushFloats), 0.0f);
  volatile float sink = 0.0f;
  float stamp = 0.0f;

  /// Sum of `data` in parallel over fixed blocks (Eigen's vectorised sum).
  float read_all() {
    constexpr Index kBlock = Index{1} << 20;
    std::vector<float> partial(static_cast<std::size_t>(kFloats / kBlock), 0.0f);
    moet::detail::parallel_blocks(kFloats, kBlock, [&](Index begin, Index end) {
      partial[static_cast<std::size_t>(begin / kBlock)] =
          Eigen::Map<const Eigen::VectorXf>(data.data() + begin, end - begin).sum();
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

template <class Map>
double get(const Map& kv, const char* key, double fallback) {
  const auto it = kv.find(key);
  return it == kv.end() ? fallback : parse_double(it->second, key);
}

/// Builds the gate named by `spec` and measures it.
Row run_gate(const std::string& spec, const Config& c, Bank& bank, const moet::RowMatrix<Scalar>& x,
             const std::vector<float>& importance, Memory& memory) {
  const auto [name, kv] = parse_gate(spec);
  moet::RouteContext ctx;
  ctx.seed = c.seed;
  const Index d = c.model_dim, e = c.num_experts;
  const std::uint64_t init_seed = c.seed + 1;
  Row row;
  if (name == "top_k") {
    const auto k = static_cast<Index>(get(kv, "k", 2));
    const bool renorm = get(kv, "renorm", k > 1 ? 1 : 0) != 0;
    row = measure(moet::TopKGate<Scalar>({.model_dim = d,
                                          .num_experts = e,
                                          .k = k,
                                          .renormalize = renorm,
                                          .init_seed = init_seed}),
                  bank, x, ctx, c, memory);
  } else if (name == "top_p") {
    const double p = get(kv, "p", 0.4);
    const auto max_k = static_cast<Index>(get(kv, "max_k", 0));
    row = measure(
        moet::TopPGate<Scalar>(
            {.model_dim = d, .num_experts = e, .p = p, .max_k = max_k, .init_seed = init_seed}),
        bank, x, ctx, c, memory);
  } else if (name == "top_any") {
    const auto active = static_cast<Index>(get(kv, "active", static_cast<double>(e)));
    row = measure(
        moet::TopAnyGate<Scalar>(
            {.model_dim = d, .num_experts = e, .initial_experts = active, .init_seed = init_seed}),
        bank, x, ctx, c, memory);
  } else if (name == "importance") {
    const auto k_max = static_cast<Index>(get(kv, "k_max", 4));
    const auto k_min = static_cast<Index>(get(kv, "k_min", 1));
    moet::ImportanceNorm norm = moet::ImportanceNorm::kMax;
    if (kv.count("norm")) {
      const auto& n = kv.at("norm");
      norm = n == "minmax"   ? moet::ImportanceNorm::kMinMax
             : n == "budget" ? moet::ImportanceNorm::kBudget
             : n == "max"    ? moet::ImportanceNorm::kMax
                             : (usage("unknown importance norm '" + n + "'"), norm);
    }
    ctx.importance = std::span<const float>(importance.data(), static_cast<std::size_t>(x.rows()));
    row = measure(moet::ImportanceGate<Scalar>({.model_dim = d,
                                                .num_experts = e,
                                                .k_min = k_min,
                                                .k_max = k_max,
                                                .norm = norm,
                                                .init_seed = init_seed}),
                  bank, x, ctx, c, memory);
  } else if (name == "stochastic") {
    const std::string mode = kv.count("mode") ? kv.at("mode") : "token";
    const auto inference = mode == "ensemble" ? moet::StochasticInference::kEnsemble
                           : mode == "token"  ? moet::StochasticInference::kToken
                                              : (usage("unknown stochastic mode '" + mode + "'"),
                                                moet::StochasticInference::kToken);
    row = measure(
        moet::StochasticGate<Scalar>({.model_dim = d, .num_experts = e, .inference = inference}),
        bank, x, ctx, c, memory);
  } else {
    usage("unknown gate '" + name + "'");
  }
  row.gate = name;
  row.params = spec.find(':') == std::string::npos ? "" : spec.substr(spec.find(':') + 1);
  return row;
}

std::string label(const Row& r) { return r.params.empty() ? r.gate : r.gate + ":" + r.params; }

// --- output -----------------------------------------------------------------------------------

void write_json(const std::string& path, const Config& c, const std::vector<Row>& rows) {
  std::ofstream out(path);
  if (!out) usage("cannot write '" + path + "'");
  out << "[\n";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    out << "  {\"gate\": \"" << r.gate << "\", \"params\": \"" << r.params
        << "\", \"tokens\": " << r.tokens << ", \"threads\": " << r.threads
        << ", \"d_model\": " << c.model_dim << ", \"d_ff\": " << c.hidden_dim
        << ", \"experts\": " << c.num_experts << ", \"weights\": \"" << r.weights
        << "\", \"inputs\": \"" << c.inputs << "\", \"kernels\": \"" << moet::kernel_isa_name(moet::kernel_isa())
        << "\", \"mean_k\": " << r.mean_k << ", \"active_params\": " << r.active_params
        << ", \"ms_median\": " << r.ms_median << ", \"ms_min\": " << r.ms_min
        << ", \"tokens_per_s\": " << r.tokens_per_s << ", \"gflops\": " << r.gflops
        << ", \"router_ms\": " << r.router_ms << ", \"router_share\": " << r.router_ms / r.ms_median
        << ", \"dispatch_ms\": " << r.dispatch_ms
        << ", \"dispatch_share\": " << r.dispatch_ms / r.ms_median
        << ", \"max_load_ratio\": " << r.max_load_ratio << ", \"live_experts\": " << r.live_experts
        << ", \"ceiling_gflops\": " << r.ceiling_gflops
        << ", \"ratio_to_ceiling\": " << (r.ceiling_gflops > 0 ? r.gflops / r.ceiling_gflops : 0.0)
        << ", \"fma_peak_gflops\": " << r.peak_gflops << ", \"bandwidth_gbs\": " << r.bandwidth_gbs
        << ", \"roofline_ms\": " << r.roofline_ms
        << ", \"roofline_fraction\": " << r.roofline_ms / r.ms_median
        << ", \"time_vs_top2\": " << r.time_vs_top2 << ", \"load\": [";
    for (std::size_t e = 0; e < r.load.size(); ++e) out << (e ? ", " : "") << r.load[e];
    out << "]}" << (i + 1 < rows.size() ? ",\n" : "\n");
  }
  out << "]\n";
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
                static_cast<long>(c.num_experts), c.inputs.c_str(), moet::kernel_isa_name(moet::kernel_isa()));
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
      if (label(r) == "top_k:k=2") top2 = r.tokens_per_s;
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
      moet::kernel_isa() == moet::cpu_kernel_isa() ? "" : " (lowered by MOET_ISA)");
  // One bank per weight format, the same float weights (same seed).
  std::vector<Bank> banks;
  for (const auto& w : c.weights) {
    banks.emplace_back(Bank::Options{
        .model_dim = c.model_dim,
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
        std::printf("%-22s %6s %12s %9s %10s %8s %7s %6s %6s %7s %7s %8s %12s\n", "gate", "mean_k",
                    "params/tok", "ms(med)", "tokens/s", "GFLOP/s", "vs_ceil", "peak", "roof",
                    "router", "disp", "max/mean", "t/top2 (<=)");
        const std::size_t series_begin = rows.size();
        for (const auto& spec : c.gates) {
          Row row = run_gate(spec, c, bank, x, importance, memory);
          row.threads = used;
          row.weights = c.weights[w];
          row.ceiling_gflops = ceiling.gflops;
          row.peak_gflops = peak;
          row.bandwidth_gbs = bandwidth;
          row.roofline_ms =
              static_cast<double>(row.live_experts) * expert_bytes / (bandwidth * 1e9) * 1e3;
          rows.push_back(row);
        }
        double top2_ms = 0;
        for (std::size_t i = series_begin; i < rows.size(); ++i) {
          if (label(rows[i]) == "top_k:k=2") top2_ms = rows[i].ms_median;
        }
        for (std::size_t i = series_begin; i < rows.size(); ++i) {
          Row& row = rows[i];
          row.time_vs_top2 = top2_ms > 0 ? row.ms_median / top2_ms : 0.0;
          char target[32] = "";
          if (top2_ms > 0) {
            std::snprintf(target, sizeof target, "%.2f (%.2f)", row.time_vs_top2,
                          row.mean_k / 2.0 + 0.1);
          }
          std::printf(
              "%-22s %6.3f %12.0f %9.3f %10.0f %8.1f %7.2f %6.2f %6.2f %6.1f%% %6.1f%% %8.2f "
              "%12s\n",
              label(row).c_str(), row.mean_k, row.active_params, row.ms_median, row.tokens_per_s,
              row.gflops, row.ceiling_gflops > 0 ? row.gflops / row.ceiling_gflops : 0.0,
              row.peak_gflops > 0 ? row.gflops / row.peak_gflops : 0.0,
              row.roofline_ms / row.ms_median, 100.0 * row.router_ms / row.ms_median,
              100.0 * row.dispatch_ms / row.ms_median, row.max_load_ratio, target);
        }
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
