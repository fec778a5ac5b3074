// moet-soak: pushes many tokens through one MoE layer in batches of varying size and checks
// that resident memory stays flat once the workspaces have seen the largest batch.
//
//   moet-soak                                  # 10 million tokens, top-k (k = 2), 1 thread
//   moet-soak --tokens 200000 --gate top_any   # a short run of another gate
//
// Every batch takes a different window of a fixed token pool and a new ctx.step (so noisy and
// stochastic routing change every batch), and the batch sizes cycle between --batch / 4 and
// --batch (the first batch is the largest, so the grow-only buffers reach their final size at
// once). Resident memory (the second field of /proc/self/statm, in pages) is sampled after
// every batch. The report gives the first, warm-up, peak and last RSS; the exit code is 1 when
// the RSS after warm-up ever exceeds the warm-up RSS by more than --tolerance-kib, 2 on bad
// arguments.
//
// Options: --tokens N (10000000) --batch N (2048) --warmup N batches (8) --d-model N (32)
//          --d-ff N (64) --experts N (8) --threads N (1) --gate top_k|top_p|top_any|
//          importance|stochastic (top_k) --tolerance-kib N (256)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <unistd.h>

#include <moet/moet.hpp>

namespace {

using moet::Index;

struct Config {
  Index tokens = 10'000'000;
  Index batch = 2048;
  Index warmup = 8;
  Index model_dim = 32;
  Index hidden_dim = 64;
  Index num_experts = 8;
  int threads = 1;
  std::string gate = "top_k";
  Index tolerance_kib = 256;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "moet-soak: %s\n"
               "usage: moet-soak [--tokens N] [--batch N] [--warmup N] [--d-model N] [--d-ff N]\n"
               "                 [--experts N] [--threads N] [--tolerance-kib N]\n"
               "                 [--gate top_k|top_p|top_any|importance|stochastic]\n",
               why.c_str());
  std::exit(2);
}

Index parse_index(const std::string& flag, const char* text, Index min) {
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || v < min) {
    usage(flag + " needs an integer >= " + std::to_string(min) + ", got '" + text + "'");
  }
  return static_cast<Index>(v);
}

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) usage(flag + " needs a value");
    const char* value = argv[++i];
    if (flag == "--tokens")
      c.tokens = parse_index(flag, value, 1);
    else if (flag == "--batch")
      c.batch = parse_index(flag, value, 4);
    else if (flag == "--warmup")
      c.warmup = parse_index(flag, value, 1);
    else if (flag == "--d-model")
      c.model_dim = parse_index(flag, value, 1);
    else if (flag == "--d-ff")
      c.hidden_dim = parse_index(flag, value, 1);
    else if (flag == "--experts")
      c.num_experts = parse_index(flag, value, 2);
    else if (flag == "--threads")
      c.threads = static_cast<int>(parse_index(flag, value, 1));
    else if (flag == "--tolerance-kib")
      c.tolerance_kib = parse_index(flag, value, 0);
    else if (flag == "--gate")
      c.gate = value;
    else
      usage("unknown option " + flag);
  }
  return c;
}

/// Resident set size in KiB (/proc/self/statm: size resident shared ...; in pages).
Index rss_kib() {
  std::ifstream statm("/proc/self/statm");
  long long size = 0;
  long long resident = 0;
  statm >> size >> resident;
  return static_cast<Index>(resident * sysconf(_SC_PAGESIZE) / 1024);
}

struct Result {
  Index batches = 0;
  Index tokens = 0;
  Index first_kib = 0;
  Index warm_kib = 0;
  Index peak_after_warm_kib = 0;
  Index last_kib = 0;
  Index peak_kib = 0;
  double seconds = 0.0;
  double mean_k = 0.0;
};

template <class Gate>
Result soak(const Config& c, Gate gate) {
  using Layer = moet::MoELayer<Gate, moet::SwiGluExperts<float>>;
  const Layer layer(std::move(gate), moet::SwiGluExperts<float>({.model_dim = c.model_dim,
                                                                 .hidden_dim = c.hidden_dim,
                                                                 .num_experts = c.num_experts,
                                                                 .init_seed = 2}));
  // A pool of 2 * batch tokens; batch b reads rows [offset, offset + n).
  const Index pool_rows = 2 * c.batch;
  moet::RowMatrix<float> pool(pool_rows, c.model_dim);
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index i = 0; i < pool.size(); ++i) pool.data()[i] = normal(gen);
  std::vector<float> importance(static_cast<std::size_t>(c.batch));
  for (auto& v : importance) v = std::abs(normal(gen));
  moet::RowMatrix<float> y(c.batch, c.model_dim);
  typename Layer::Workspace ws;
  moet::RouteContext ctx;
  ctx.seed = 11;
  ctx.training = true;  // noise, the stochastic training draw, DynMoE's token dropping

  Result r;
  double assignments = 0.0;
  const auto start = std::chrono::steady_clock::now();
  // Batch sizes cycle through batch, batch / 4, batch / 2, 3 batch / 4 (all multiples of 4 when
  // batch is): the first is the largest.
  const Index sizes[] = {c.batch, std::max<Index>(1, c.batch / 4), std::max<Index>(1, c.batch / 2),
                         std::max<Index>(1, 3 * c.batch / 4)};
  for (Index done = 0; done < c.tokens; ++r.batches) {
    const Index n = std::min(sizes[r.batches % 4], c.tokens - done);
    const Index offset = (r.batches * 97) % (pool_rows - n + 1);
    ctx.step = static_cast<std::uint64_t>(r.batches);
    ctx.importance = std::span<const float>(importance.data(), static_cast<std::size_t>(n));
    const auto& stats = layer.forward(pool.middleRows(offset, n), y.topRows(n), ctx, ws);
    assignments += static_cast<double>(stats.num_assignments);
    done += n;
    const Index rss = rss_kib();
    if (r.batches == 0) r.first_kib = rss;
    if (r.batches + 1 == c.warmup) r.warm_kib = rss;
    if (r.batches + 1 > c.warmup) r.peak_after_warm_kib = std::max(r.peak_after_warm_kib, rss);
    r.peak_kib = std::max(r.peak_kib, rss);
    r.last_kib = rss;
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.tokens = c.tokens;
  r.mean_k = assignments / static_cast<double>(c.tokens);
  if (r.batches <= c.warmup) r.warm_kib = r.peak_after_warm_kib = r.last_kib;
  return r;
}

Result run(const Config& c) {
  const Index d = c.model_dim;
  const Index e = c.num_experts;
  if (c.gate == "top_k") {
    return soak(
        c, moet::TopKGate<float>(
               {.model_dim = d, .num_experts = e, .k = 2, .renormalize = true, .noisy = true}));
  }
  if (c.gate == "top_p") {
    return soak(c, moet::TopPGate<float>({.model_dim = d, .num_experts = e, .p = 0.5}));
  }
  if (c.gate == "top_any") {
    return soak(c, moet::TopAnyGate<float>({.model_dim = d, .num_experts = e}));
  }
  if (c.gate == "importance") {
    return soak(c, moet::ImportanceGate<float>(
                       {.model_dim = d, .num_experts = e, .k_max = std::min<Index>(4, e)}));
  }
  if (c.gate == "stochastic") {
    return soak(c, moet::StochasticGate<float>({.model_dim = d, .num_experts = e}));
  }
  usage("unknown gate " + c.gate);
}

}  // namespace

int main(int argc, char** argv) {
  const Config c = parse(argc, argv);
  if (c.warmup < 1) usage("--warmup must be >= 1");
  moet::set_num_threads(c.threads);
  const Result r = run(c);
  const Index growth = r.peak_after_warm_kib - r.warm_kib;
  const bool flat = growth <= c.tolerance_kib;
  std::printf(
      "moet-soak: gate %s, d_model %ld, d_ff %ld, experts %ld, threads %d\n"
      "  tokens %ld in %ld batches (<= %ld tokens), mean k %.3f, %.1f s, %.0f tokens/s\n"
      "  RSS KiB: first %ld, after warm-up (%ld batches) %ld, peak after warm-up %ld, "
      "last %ld, peak %ld\n"
      "  growth after warm-up %ld KiB (tolerance %ld KiB): %s\n",
      c.gate.c_str(), static_cast<long>(c.model_dim), static_cast<long>(c.hidden_dim),
      static_cast<long>(c.num_experts), c.threads, static_cast<long>(r.tokens),
      static_cast<long>(r.batches), static_cast<long>(c.batch), r.mean_k, r.seconds,
      static_cast<double>(r.tokens) / r.seconds, static_cast<long>(r.first_kib),
      static_cast<long>(c.warmup), static_cast<long>(r.warm_kib),
      static_cast<long>(r.peak_after_warm_kib), static_cast<long>(r.last_kib),
      static_cast<long>(r.peak_kib), static_cast<long>(growth), static_cast<long>(c.tolerance_kib),
      flat ? "flat" : "GROWS");
  return flat ? 0 : 1;
}
