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
// in moet's router grammar (`name:key=value,...`: top_k, top_p, importance with the rows' norms
// as importance, grouped_top_k; `moet-compare --help` lists the keys), its keys applied to
// the checkpoint's routing, driving that gate with the checkpoint's router weights.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <CLI/CLI.hpp>

#include "moet/gates/spec.hpp"
#include "moet/io/checkpoint.hpp"
#include "moet/io/npy.hpp"
#include "moet/kernel_isa.hpp"

namespace {

using moet::Index;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The gates that can run on a checkpoint's router weights (load_moe_layer's
// CheckpointRouterGate): the router grammar restricted to them.
using RouterGates =
    moet::GateList<moet::TopKGate, moet::TopPGate, moet::ImportanceGate, moet::GroupedTopKGate>;

// The router spec of --gate (moet's router grammar, gates/spec.hpp), turned into a gate type and
// its options for layer `m`: calls `run(std::type_identity<Gate>{}, options)`. The spec's keys
// apply on top of the checkpoint's options for that gate (its k and renormalisation for top_k,
// its whole routing for grouped_top_k), not on top of the gate's defaults. An empty spec is the
// checkpoint's own routing (GroupedTopKGate).
template <class Run>
int with_gate(const std::string& spec, const moet::CheckpointLayer& m, Run&& run) {
  if (spec.empty()) {
    using G = moet::GroupedTopKGate<float>;
    return run(std::type_identity<G>{}, moet::checkpoint_gate_options<G>(m));
  }
  const moet::GateSpec parsed = moet::parse_gate_spec(spec);
  return moet::with_gate_options<float, RouterGates>(
      spec, m.routing.model_dim, m.num_experts, 0, [&](auto type, auto /*defaults*/) {
        using G = typename decltype(type)::type;
        auto o = moet::checkpoint_gate_options<G>(m);
        moet::apply_gate_spec<G>(parsed, o);
        return run(type, o);
      });
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
                 "router spec in moet's grammar: top_k:k=K,renorm=0|1, top_p:p=P,max_k=M, "
                 "importance:k_max=K (importance = the rows' norms) or grouped_top_k:...; keys "
                 "apply to the checkpoint's routing; default: the checkpoint's routing");
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
