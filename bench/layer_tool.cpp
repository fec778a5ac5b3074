// moet-layer: one MoE block of a pretrained checkpoint (Hugging Face directory or GGUF file) on
// float32 rows from a .npy file.
//
//   moet-layer --model PATH --info
//   moet-layer --model PATH --layer L --input x.npy --output y.npy [--gate SPEC]
//              [--weights f32|bf16|q8_0|q4_0|q4_1] [--threads N] [--repeat R]
//
// --info lists every layer (MoE or dense), its experts, k, widths, shared experts and router.
// Otherwise layer L's MoE block (router, routed and shared experts; no residual, no norm) runs
// on x [T, hidden_size] and y [T, hidden_size] is written as float32 .npy; it prints the load
// time, the mean experts per token, the load per expert and the forward time (median of R).
// Without --gate the checkpoint's own routing runs; --gate takes a router spec
// (top_k:k=K[,renorm=0|1], top_p:p=P[,max_k=M], importance:k_max=K with the rows' norms as
// importance) driving moet's dynamic gates with the checkpoint's router weights.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <CLI/CLI.hpp>

#include "moet/gates/importance.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/io/checkpoint.hpp"
#include "moet/io/npy.hpp"
#include "moet/kernel_isa.hpp"

namespace {

using moet::Index;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// `name:key=value,key=value` -> name and its keys.
std::pair<std::string, std::map<std::string, std::string>> split_spec(const std::string& spec) {
  const auto colon = spec.find(':');
  std::pair<std::string, std::map<std::string, std::string>> out{spec.substr(0, colon), {}};
  if (colon == std::string::npos) return out;
  std::string rest = spec.substr(colon + 1);
  while (!rest.empty()) {
    const auto comma = rest.find(',');
    const std::string kv = rest.substr(0, comma);
    const auto eq = kv.find('=');
    moet::detail::require(eq != std::string::npos && eq > 0, "moet-layer", "--gate '", spec,
                          "': expected key=value, got '", kv, "'");
    out.second[kv.substr(0, eq)] = kv.substr(eq + 1);
    rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
  }
  return out;
}

double number(const std::map<std::string, std::string>& keys, const std::string& key,
              const std::string& spec) {
  const auto it = keys.find(key);
  moet::detail::require(it != keys.end(), "moet-layer", "--gate '", spec, "' needs ", key, "=");
  std::size_t used = 0;
  double v = 0.0;
  try {
    v = std::stod(it->second, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  moet::detail::require(used == it->second.size() && used > 0, "moet-layer", "--gate '", spec,
                        "': ", key, " must be a number, got '", it->second, "'");
  return v;
}

// The router spec of --gate, turned into a gate type and its options for layer `m`: calls
// `run(std::type_identity<Gate>{}, options)`. A minimal parser of moet-compare's router grammar
// (top_k, top_p, importance); the shared grammar of the router-spec work replaces this one
// function at merge. An empty spec is the checkpoint's own routing (GroupedTopKGate).
template <class Run>
int with_gate(const std::string& spec, const moet::CheckpointLayer& m, Run&& run) {
  if (spec.empty()) {
    using G = moet::GroupedTopKGate<float>;
    return run(std::type_identity<G>{}, moet::checkpoint_gate_options<G>(m));
  }
  const auto [name, keys] = split_spec(spec);
  const auto allow = [&](std::initializer_list<const char*> known) {
    for (const auto& [key, value] : keys) {
      const bool ok =
          std::any_of(known.begin(), known.end(), [&](const char* k) { return key == k; });
      moet::detail::require(ok, "moet-layer", "--gate '", spec, "': unknown key '", key, "'");
    }
  };
  if (name == "top_k") {
    allow({"k", "renorm"});
    using G = moet::TopKGate<float>;
    auto o = moet::checkpoint_gate_options<G>(m);  // the checkpoint's renormalisation
    o.k = static_cast<Index>(number(keys, "k", spec));
    if (keys.contains("renorm")) o.renormalize = number(keys, "renorm", spec) != 0.0;
    return run(std::type_identity<G>{}, o);
  }
  if (name == "top_p") {
    allow({"p", "max_k"});
    using G = moet::TopPGate<float>;
    auto o = moet::checkpoint_gate_options<G>(m);
    o.p = number(keys, "p", spec);
    if (keys.contains("max_k")) o.max_k = static_cast<Index>(number(keys, "max_k", spec));
    return run(std::type_identity<G>{}, o);
  }
  if (name == "importance") {
    allow({"k_max", "k_min"});
    using G = moet::ImportanceGate<float>;
    auto o = moet::checkpoint_gate_options<G>(m);
    o.k_max = static_cast<Index>(number(keys, "k_max", spec));
    if (keys.contains("k_min")) o.k_min = static_cast<Index>(number(keys, "k_min", spec));
    return run(std::type_identity<G>{}, o);
  }
  moet::detail::fail("moet-layer", "--gate '", spec,
                     "': unknown router (expected top_k:k=K[,renorm=0|1], top_p:p=P[,max_k=M] or "
                     "importance:k_max=K)");
}

void print_info(const moet::Checkpoint& ckpt) {
  const moet::CheckpointInfo& info = ckpt.info();
  std::printf("%s: %s (%s), hidden size %ld, %zu layers, MoE layers:", info.path.c_str(),
              info.family.c_str(),
              info.format == moet::CheckpointFormat::kGguf ? "GGUF" : "safetensors",
              long(info.model_dim), info.layers.size());
  for (const Index l : info.moe_layers()) std::printf(" %ld", long(l));
  std::printf("\n%5s  %-5s  %7s  %3s  %6s  %-22s  %9s  %s\n", "layer", "kind", "experts", "k",
              "width", "shared (count x width)", "params", "router");
  for (const auto& m : info.layers) {
    if (!m.moe) {
      std::printf("%5ld  %-5s  %7s  %3s  %6ld  %-22s  %9s  %s\n", long(m.index), "dense", "-", "-",
                  long(m.hidden_dim), "-", "-", "-");
      continue;
    }
    std::string shared = "-";
    if (m.shared_hidden_dim > 0) {
      shared = std::to_string(m.num_shared_experts) + " x " +
               std::to_string(m.shared_hidden_dim / std::max<Index>(1, m.num_shared_experts)) +
               (m.shared_gate ? ", gated" : "");
    }
    const double params = 3.0 * double(info.model_dim) *
                          (double(m.num_experts * m.hidden_dim) + double(m.shared_hidden_dim));
    std::printf("%5ld  %-5s  %7ld  %3ld  %6ld  %-22s  %8.3gM  %s\n", long(m.index), "MoE",
                long(m.num_experts), long(m.k), long(m.hidden_dim), shared.c_str(), params / 1e6,
                m.router_kind().c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("moet-layer: one MoE block of a pretrained checkpoint on .npy rows");
  std::string model, input, output, gate, weights;
  Index layer = -1;
  int threads = 0, repeat = 3;
  bool info = false;
  app.add_option("--model", model, "Hugging Face checkpoint directory or .gguf file")->required();
  app.add_flag("--info", info, "list the layers and exit");
  app.add_option("--layer", layer, "the MoE layer to run");
  app.add_option("--input", input, "float32 .npy rows [T, hidden_size]");
  app.add_option("--output", output, "where to write the output rows (.npy)");
  app.add_option("--gate", gate,
                 "router spec (top_k:k=K[,renorm=0|1], top_p:p=P[,max_k=M], importance:k_max=K); "
                 "default: the checkpoint's routing");
  app.add_option("--weights", weights,
                 "expert weight format: f32, bf16, q8_0, q4_0, q4_1 (default: the file's own: "
                 "the GGUF block format of quantised experts, else f32)");
  app.add_option("--threads", threads, "OpenMP threads (default: all)");
  app.add_option("--repeat", repeat, "timed forward runs (the median is printed)")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  try {
    if (threads > 0) moet::set_num_threads(threads);
    const auto ckpt = moet::Checkpoint::open(model);
    if (info) {
      print_info(ckpt);
      return 0;
    }
    moet::detail::require(layer >= 0 && !input.empty() && !output.empty(), "moet-layer",
                          "--layer, --input and --output are required without --info");
    const moet::CheckpointLayer& m = ckpt.moe_layer(layer);
    const moet::RowMatrix<float> x = moet::read_npy(input).matrix();  // (T, hidden_size)
    moet::detail::require(x.cols() == ckpt.info().model_dim, "moet-layer", input, " has ", x.cols(),
                          " columns, the model's hidden size is ", ckpt.info().model_dim);
    moet::LoadOptions options;
    if (!weights.empty()) options.weight_format = moet::parse_weight_format(weights, "moet-layer");
    return with_gate(gate, m, [&](auto type, auto gate_options) {
      using G = typename decltype(type)::type;
      const auto t_load = Clock::now();
      auto moe = moet::load_moe_layer<G>(ckpt, layer, options, gate_options);
      const double load_s = seconds_since(t_load);
      const double expert_bytes =
          double(moe.experts().packed_bytes()) +
          (moe.has_shared_experts() ? double(moe.shared_experts().packed_bytes()) : 0.0);
      std::printf("%s layer %ld: %ld experts of width %ld, k %ld (%s)", ckpt.info().family.c_str(),
                  long(layer), long(m.num_experts), long(m.hidden_dim), long(m.k),
                  m.router_kind().c_str());
      if (m.shared_hidden_dim > 0) {
        std::printf(", shared width %ld%s", long(m.shared_hidden_dim),
                    m.shared_gate ? " (gated)" : "");
      }
      std::printf(
          "\ngate %s, weights %s, kernels %s, %d threads: loaded in %.3f s (%.1f MB packed)\n",
          gate.empty() ? "checkpoint" : gate.c_str(),
          moet::weight_format_name(moe.experts().options().weight_format),
          moet::kernel_isa_name(moet::kernel_isa()), moet::num_threads(), load_s,
          expert_bytes / 1e6);
      std::vector<float> importance(static_cast<std::size_t>(x.rows()));
      for (Index t = 0; t < x.rows(); ++t) importance[std::size_t(t)] = x.row(t).norm();
      moet::RouteContext ctx;
      ctx.importance = importance;  // used by importance:... only
      typename decltype(moe)::Workspace ws;
      moet::RowMatrix<float> y(x.rows(), x.cols());
      std::vector<double> times;
      for (int r = 0; r < repeat; ++r) {
        const auto t0 = Clock::now();
        moe.forward(x, y, ctx, ws);
        times.push_back(seconds_since(t0));
      }
      std::sort(times.begin(), times.end());
      const moet::RoutingStats& s = ws.stats;
      std::printf("%ld tokens: forward %.3f ms (median of %d), mean k %.3f, load max/mean %.2f:",
                  long(x.rows()), times[times.size() / 2] * 1e3, repeat, s.mean_k,
                  s.max_mean_load_ratio);
      for (const Index l : s.load) std::printf(" %ld", long(l));
      std::printf("\n");
      moet::write_npy(output, y);
      std::printf("wrote %s [%ld, %ld]\n", output.c_str(), long(y.rows()), long(y.cols()));
      return 0;
    });
  } catch (const moet::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
