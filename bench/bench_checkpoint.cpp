// bench_checkpoint: how fast load_moe_layer reads a pretrained MoE layer from the page cache,
// and how much resident memory the loaded inference-only layer takes against its packed bytes.
//
// Writes a synthetic Mixtral-style checkpoint (config.json + model.safetensors: one MoE layer of
// --experts SwiGLU experts of --model-dim x --hidden-dim in BF16, about 176 MB at the default
// 8 x 1024 x 3584) to --dir, loads it once to warm the page cache (nothing is dropped from it),
// then times --repeat loads into a --weights bank (inference only) and reports the expert bytes
// on disk over the time (GB/s), and the resident-set growth of the last loaded layer (with the
// file unmapped) over its packed bytes. Exits 1 when a --min-gbps or --max-rss-ratio bound is
// given and missed.
//
//   bench_checkpoint [--dir /tmp/moet_bench_checkpoint] [--experts 8] [--model-dim 1024]
//                    [--hidden-dim 3584] [--weights bf16] [--repeat 5] [--threads N]
//                    [--min-gbps 1.0] [--max-rss-ratio 1.05] [--keep]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <sys/resource.h>
#include <unistd.h>

#include "moet/detail/rng.hpp"
#include "moet/io/checkpoint.hpp"

namespace {

using moet::Index;

// Resident set size in bytes (/proc/self/statm), 0 where unavailable.
double rss_bytes() {
  std::ifstream statm("/proc/self/statm");
  long pages = 0, resident = 0;
  if (!(statm >> pages >> resident)) return 0.0;
  return double(resident) * double(::sysconf(_SC_PAGESIZE));
}

// User + system CPU seconds of this process so far (all threads).
double cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * double(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

void trim() {
#if defined(__GLIBC__)
  ::malloc_trim(0);
#endif
}

// One layer of `experts` experts, BF16, with a config.json naming it a Mixtral.
void write_checkpoint(const std::filesystem::path& dir, Index experts, Index d, Index f) {
  std::filesystem::create_directories(dir);
  moet::SafetensorsWriter w;
  moet::detail::Rng rng(1);
  std::vector<float> values;
  const auto add = [&](const std::string& name, Index rows, Index cols, moet::Dtype dtype) {
    values.resize(std::size_t(rows * cols));
    const double scale = 1.0 / std::sqrt(double(cols));
    for (auto& v : values) v = float(rng.normal() * scale);
    const Index shape[2] = {rows, cols};
    w.add(name, shape, values, dtype);
  };
  const std::string p = "model.layers.0.block_sparse_moe.";
  add(p + "gate.weight", experts, d, moet::Dtype::kF32);
  for (Index e = 0; e < experts; ++e) {
    const std::string q = p + "experts." + std::to_string(e) + ".";
    add(q + "w1.weight", f, d, moet::Dtype::kBf16);
    add(q + "w3.weight", f, d, moet::Dtype::kBf16);
    add(q + "w2.weight", d, f, moet::Dtype::kBf16);
  }
  w.write(dir / "model.safetensors");
  std::ofstream(dir / "config.json")
      << "{\"model_type\": \"mixtral\", \"hidden_size\": " << d
      << ", \"num_hidden_layers\": 1, \"intermediate_size\": " << f
      << ", \"num_local_experts\": " << experts << ", \"num_experts_per_tok\": 2}\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("Load speed (page cache) and resident memory of a pretrained MoE layer");
  std::string dir = "/tmp/moet_bench_checkpoint", weights = "bf16";
  Index experts = 8, d = 1024, f = 3584;
  int repeat = 5, threads = 0;
  double min_gbps = 0.0, max_rss_ratio = 0.0;
  bool keep = false;
  app.add_option("--dir", dir, "where the synthetic checkpoint is written");
  app.add_option("--experts", experts, "experts")->check(CLI::PositiveNumber);
  app.add_option("--model-dim", d, "model_dim")->check(CLI::PositiveNumber);
  app.add_option("--hidden-dim", f, "expert width")->check(CLI::PositiveNumber);
  app.add_option("--weights", weights, "bank weight format (f32, bf16, q8_0, q4_0, q4_1)");
  app.add_option("--repeat", repeat, "timed loads")->check(CLI::PositiveNumber);
  app.add_option("--threads", threads, "OpenMP threads (0: the default)");
  app.add_option("--min-gbps", min_gbps, "fail below this load speed");
  app.add_option("--max-rss-ratio", max_rss_ratio, "fail above this RSS / packed bytes");
  app.add_flag("--keep", keep, "keep the checkpoint (and reuse it next time)");
  CLI11_PARSE(app, argc, argv);
  if (threads > 0) moet::set_num_threads(threads);
  const moet::WeightFormat format = moet::parse_weight_format(weights, "bench_checkpoint");

  const std::filesystem::path path(dir);
  const auto t_write = std::chrono::steady_clock::now();
  if (!keep || !std::filesystem::exists(path / "model.safetensors")) {
    write_checkpoint(path, experts, d, f);
  }
  const double write_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_write).count();
  const double file_bytes = double(std::filesystem::file_size(path / "model.safetensors"));
  double expert_bytes = 0.0;  // BF16 on disk, from the checkpoint (--keep may reuse another size)
  {
    const auto ckpt = moet::Checkpoint::open(path);
    const moet::CheckpointLayer& m = ckpt.moe_layer(0);
    experts = m.num_experts;
    f = m.hidden_dim;
    d = ckpt.info().model_dim;
    expert_bytes = double(experts * 3 * d * f * 2);
  }
  const moet::LoadOptions options{.weight_format = format, .inference_only = true};
  { (void)moet::load_moe_layer(moet::Checkpoint::open(path), 0, options); }  // page cache

  std::vector<double> seconds, cpu;
  double growth = 0.0, packed = 0.0;
  for (int r = 0; r < repeat; ++r) {
    trim();
    const double before = rss_bytes();
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = cpu_seconds();
    std::optional<moet::MoELayer<moet::GroupedTopKGate<float>, moet::SwiGluExperts<float>>> layer;
    {
      const auto ckpt = moet::Checkpoint::open(path);
      layer.emplace(moet::load_moe_layer(ckpt, 0, options));
      seconds.push_back(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      cpu.push_back(cpu_seconds() - c0);
    }  // the file is unmapped here
    trim();
    growth = rss_bytes() - before;
    packed = double(layer->experts().packed_bytes());
  }
  std::sort(seconds.begin(), seconds.end());
  std::sort(cpu.begin(), cpu.end());
  const double best = seconds.front(), median = seconds[seconds.size() / 2];
  const double gbps = expert_bytes / median / 1e9;
  const double ratio = growth / packed;
  std::printf(
      "checkpoint %s: %.1f MB (experts %.1f MB BF16: %ld x %ld x %ld x 3), written in %.2f s\n",
      path.c_str(), file_bytes / 1e6, expert_bytes / 1e6, long(experts), long(d), long(f), write_s);
  std::printf(
      "load into %s, inference only, %d threads, from the page cache: median %.3f s, "
      "best %.3f s over %d loads: %.2f GB/s (best %.2f)\n",
      weights.c_str(), moet::num_threads(), median, best, repeat, gbps, expert_bytes / best / 1e9);
  std::printf("CPU time per load (all threads): median %.3f s, %.2f GB per CPU second\n",
              cpu[cpu.size() / 2], expert_bytes / cpu[cpu.size() / 2] / 1e9);
  std::printf(
      "resident memory of the loaded layer (file unmapped): %.1f MB for %.1f MB packed: "
      "%.3fx\n",
      growth / 1e6, packed / 1e6, ratio);
  if (!keep) std::filesystem::remove_all(path);
  bool ok = true;
  if (min_gbps > 0.0 && gbps < min_gbps) {
    std::printf("FAIL: %.2f GB/s is below --min-gbps %.2f\n", gbps, min_gbps);
    ok = false;
  }
  if (max_rss_ratio > 0.0 && !(ratio <= max_rss_ratio)) {
    std::printf("FAIL: RSS ratio %.3f is above --max-rss-ratio %.3f\n", ratio, max_rss_ratio);
    ok = false;
  }
  return ok ? 0 : 1;
}
