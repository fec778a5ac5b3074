// moet-compare: runs every router on the same seeded batch through the same SwiGLU expert bank
// and prints, per gate, the experts it activates and the time the layer takes.
//
//   moet-compare                              # every gate, shape S2, T = 512, all threads
//   moet-compare --shape S1 --tokens 32,512 --threads 1,2 --gates top_k:k=2,top_p:p=0.4
//   moet-compare --d-model 256 --d-ff 512 --experts 16 --repeat 9 --json out.json
//
// Gates: top_k:k=K[,renorm=0|1]  top_p:p=P[,max_k=M]  top_any[:active=A]
//        importance:k_max=K[,k_min=K,norm=max|minmax|budget]  stochastic[:mode=token|ensemble]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <moet/moet.hpp>

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
  std::vector<std::string> gates = {"top_k:k=1", "top_k:k=2",  "top_p:p=0.4",
                                    "top_any",   "importance:k_max=4", "stochastic"};
  std::string json;
  std::uint64_t seed = 42;
};

/// One measured (gate, tokens, threads) combination.
struct Row {
  std::string gate;
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
  double max_load_ratio = 0.0;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "moet-compare: %s\n"
               "usage: moet-compare [--shape S1|S2|S3] [--d-model N --d-ff N --experts N]\n"
               "                    [--tokens T1,T2,..] [--threads N1,N2,..] [--repeat N]\n"
               "                    [--gates g1,g2,..] [--seed N] [--json FILE]\n",
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
  // Gates may be separated by commas or spaces; parameters within a gate use ','.
  // To keep "top_k:k=2,renorm=1" unambiguous, a new gate starts at a token with a known name.
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
    } else if (arg == "--gates") {
      c.gates.clear();
      std::string current;
      for (const auto& piece : split(value(), ',')) {
        // A piece containing ':' or naming a gate alone starts a new gate spec.
        const bool starts = piece.find('=') == std::string::npos || piece.find(':') != std::string::npos;
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

/// Times the whole layer forward and the gate alone on the same batch.
template <class G>
Row measure(G gate, Bank& bank, const moet::RowMatrix<Scalar>& x, const moet::RouteContext& ctx,
            int repeat) {
  moet::MoELayer<G, Bank> layer(std::move(gate), std::move(bank));
  typename moet::MoELayer<G, Bank>::Workspace ws;
  moet::RowMatrix<Scalar> y(x.rows(), x.cols());
  moet::RoutingStats stats = layer.forward(x, y, ctx, ws);  // warm-up
  std::vector<double> layer_ms, router_ms;
  for (int r = 0; r < repeat; ++r) {
    const double t0 = now_ms();
    stats = layer.forward(x, y, ctx, ws);
    layer_ms.push_back(now_ms() - t0);
  }
  moet::Routing<Scalar> routing;
  for (int r = 0; r < repeat; ++r) {
    const double t0 = now_ms();
    layer.gate().route(x, ctx, routing);
    router_ms.push_back(now_ms() - t0);
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
  row.max_load_ratio = stats.max_mean_load_ratio;
  bank = std::move(layer.experts());
  return row;
}

template <class Map>
double get(const Map& kv, const char* key, double fallback) {
  const auto it = kv.find(key);
  return it == kv.end() ? fallback : parse_double(it->second, key);
}

/// Builds the gate named by `spec` and measures it.
Row run_gate(const std::string& spec, const Config& c, Bank& bank,
             const moet::RowMatrix<Scalar>& x, const std::vector<float>& importance) {
  const auto [name, kv] = parse_gate(spec);
  moet::RouteContext ctx;
  ctx.seed = c.seed;
  const Index d = c.model_dim, e = c.num_experts;
  const std::uint64_t init_seed = c.seed + 1;
  Row row;
  if (name == "top_k") {
    const auto k = static_cast<Index>(get(kv, "k", 2));
    const bool renorm = get(kv, "renorm", k > 1 ? 1 : 0) != 0;
    row = measure(moet::TopKGate<Scalar>({.model_dim = d, .num_experts = e, .k = k,
                                          .renormalize = renorm, .init_seed = init_seed}),
                  bank, x, ctx, c.repeat);
  } else if (name == "top_p") {
    const double p = get(kv, "p", 0.4);
    const auto max_k = static_cast<Index>(get(kv, "max_k", 0));
    row = measure(moet::TopPGate<Scalar>({.model_dim = d, .num_experts = e, .p = p,
                                          .max_k = max_k, .init_seed = init_seed}),
                  bank, x, ctx, c.repeat);
  } else if (name == "top_any") {
    const auto active = static_cast<Index>(get(kv, "active", static_cast<double>(e)));
    row = measure(moet::TopAnyGate<Scalar>({.model_dim = d, .num_experts = active,
                                            .max_experts = e, .init_seed = init_seed}),
                  bank, x, ctx, c.repeat);
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
    row = measure(moet::ImportanceGate<Scalar>({.model_dim = d, .num_experts = e, .k_min = k_min,
                                                .k_max = k_max, .norm = norm,
                                                .init_seed = init_seed}),
                  bank, x, ctx, c.repeat);
  } else if (name == "stochastic") {
    const std::string mode = kv.count("mode") ? kv.at("mode") : "token";
    const auto inference = mode == "ensemble" ? moet::StochasticInference::kEnsemble
                           : mode == "token"  ? moet::StochasticInference::kToken
                                              : (usage("unknown stochastic mode '" + mode + "'"),
                                                 moet::StochasticInference::kToken);
    row = measure(moet::StochasticGate<Scalar>({.model_dim = d, .num_experts = e,
                                                .inference = inference}),
                  bank, x, ctx, c.repeat);
  } else {
    usage("unknown gate '" + name + "'");
  }
  row.gate = name;
  row.params = spec.find(':') == std::string::npos ? "" : spec.substr(spec.find(':') + 1);
  return row;
}

void write_json(const std::string& path, const Config& c, const std::vector<Row>& rows) {
  std::ofstream out(path);
  if (!out) usage("cannot write '" + path + "'");
  out << "[\n";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    out << "  {\"gate\": \"" << r.gate << "\", \"params\": \"" << r.params
        << "\", \"tokens\": " << r.tokens << ", \"threads\": " << r.threads
        << ", \"d_model\": " << c.model_dim << ", \"d_ff\": " << c.hidden_dim
        << ", \"experts\": " << c.num_experts << ", \"weights\": \"f32\", \"mean_k\": " << r.mean_k
        << ", \"active_params\": " << r.active_params << ", \"ms_median\": " << r.ms_median
        << ", \"ms_min\": " << r.ms_min << ", \"tokens_per_s\": " << r.tokens_per_s
        << ", \"gflops\": " << r.gflops << ", \"router_ms\": " << r.router_ms
        << ", \"max_load_ratio\": " << r.max_load_ratio << "}"
        << (i + 1 < rows.size() ? ",\n" : "\n");
  }
  out << "]\n";
}

}  // namespace

int main(int argc, char** argv) {
  const Config c = parse(argc, argv);
  std::printf("moet-compare %s: shape %s (d_model %ld, d_ff %ld, experts %ld, SwiGLU, f32), "
              "repeat %d, seed %llu\n",
              moet::kVersion, c.shape.c_str(), static_cast<long>(c.model_dim),
              static_cast<long>(c.hidden_dim), static_cast<long>(c.num_experts), c.repeat,
              static_cast<unsigned long long>(c.seed));
  Bank bank({.model_dim = c.model_dim, .hidden_dim = c.hidden_dim, .num_experts = c.num_experts,
             .init_seed = c.seed});
  std::vector<Row> rows;
  for (const Index tokens : c.tokens) {
    // Same seeded batch for every gate: standard normal tokens.
    moet::RowMatrix<Scalar> x(tokens, c.model_dim);
    moet::detail::Rng rng(c.seed + 7);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<Scalar>(rng.normal());
    // Synthetic importance for the importance gate: log-normal per token.
    std::vector<float> importance(static_cast<std::size_t>(tokens));
    for (auto& v : importance) v = static_cast<float>(std::exp(rng.normal()));
    for (const int threads : c.threads) {
      const int saved = moet::num_threads();
      if (threads > 0) moet::set_num_threads(threads);
      const int used = moet::num_threads();
      std::printf("\nT = %ld tokens, %d thread(s)\n", static_cast<long>(tokens), used);
      std::printf("%-24s %7s %14s %10s %12s %9s %10s %9s\n", "gate", "mean_k", "params/token",
                  "ms(med)", "tokens/s", "GFLOP/s", "router_ms", "max/mean");
      for (const auto& spec : c.gates) {
        Row row = run_gate(spec, c, bank, x, importance);
        row.threads = used;
        std::printf("%-24s %7.3f %14.0f %10.3f %12.0f %9.1f %10.3f %9.3f\n", spec.c_str(),
                    row.mean_k, row.active_params, row.ms_median, row.tokens_per_s, row.gflops,
                    row.router_ms, row.max_load_ratio);
        std::fflush(stdout);
        rows.push_back(row);
      }
      moet::set_num_threads(saved);
    }
  }
  if (!c.json.empty()) {
    write_json(c.json, c, rows);
    std::printf("\nwrote %s\n", c.json.c_str());
  }
  return 0;
}
