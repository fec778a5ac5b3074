// moet-ep-bench: expert parallelism under mpirun. Per token count (tokens per rank), the parts of
// ExpertParallelLayer::forward (route and agree, the count exchange, the row exchange, the
// local experts, the return of the outputs, the combine), each the median over calls of the
// slowest rank's time, the layer's time and tokens/s over all ranks, and the single-process
// MoELayer on all the ranks' tokens and the same cores (rank 0 with ranks x threads-per-rank
// OpenMP threads while the other ranks sleep), for the ratio.
//
//   mpirun -np 2 -x OMP_NUM_THREADS=1 moet-ep-bench [--d-model 1024] [--d-ff 3584]
//        [--experts 8] [--k 2] [--tokens 8,32,128,512,2048] [--repeat 9] [--json FILE]
//
// Expert weights are zeros (the kernels' speed does not depend on the values, and a bank of
// random S2 weights takes seconds to draw); the router is random, so the loads are those of a
// random top-k router on normal inputs.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <mpi.h>
#include <nlohmann/json.hpp>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "moet/detail/rng.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/layer.hpp"
#include "moet/mpi/expert_parallel.hpp"

namespace {

using moet::Index;
using Bank = moet::SwiGluExperts<float>;
using Gate = moet::TopKGate<float>;
using Matrix = moet::RowMatrix<float>;
using Layer = moet::mpi::ExpertParallelLayer<Gate, Bank>;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Every rank waits here without spinning on a core (MPI_Barrier busy-polls in Open MPI):
// an MPI_Ibarrier tested every millisecond. Between the timed parts, so that a waiting rank
// leaves the cores to the working one.
void idle_barrier(MPI_Comm comm) {
  MPI_Request request = MPI_REQUEST_NULL;
  MPI_Ibarrier(comm, &request);
  int done = 0;
  while (MPI_Test(&request, &done, MPI_STATUS_IGNORE), !done) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

Matrix normal_tokens(Index rows, Index cols, std::uint64_t seed) {
  moet::detail::Rng rng(seed);
  Matrix x(rows, cols);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(rng.normal());
  return x;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_threads(int n) {
#ifdef _OPENMP
  omp_set_num_threads(n);
#else
  (void)n;
#endif
}

double max_over_ranks(double v) {
  double out = 0;
  MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);

  CLI::App app("moet-ep-bench: expert parallelism under mpirun against the single-process layer");
  Index d = 1024, f = 3584, experts = 8, k = 2;
  int repeat = 9;
  std::vector<Index> token_counts{8, 32, 128, 512, 2048};
  std::string json_path;
  app.add_option("--d-model", d, "model width")->check(CLI::PositiveNumber);
  app.add_option("--d-ff", f, "expert hidden width")->check(CLI::PositiveNumber);
  app.add_option("--experts", experts, "routed experts")->check(CLI::PositiveNumber);
  app.add_option("--k", k, "experts per token")->check(CLI::PositiveNumber);
  app.add_option("--tokens", token_counts, "tokens per rank")->delimiter(',');
  app.add_option("--repeat", repeat, "timed calls per token count")->check(CLI::Range(1, 1000));
  app.add_option("--json", json_path, "also write the results as JSON (rank 0)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = rank == 0 ? app.exit(e) : 1;
    MPI_Finalize();
    return code;
  }
  const int threads = max_threads();
  const auto part = moet::mpi::ExpertPartition::even(experts, ranks);
  const Gate gate({.model_dim = d, .num_experts = experts, .k = k, .init_seed = 7});
  std::optional<Bank> local;
  if (part.count(rank) > 0) {
    local.emplace(Bank::Options{.model_dim = d,
                                .hidden_dim = f,
                                .num_experts = part.count(rank),
                                .init = moet::WeightInit::kZeros});
  }
  Layer layer(MPI_COMM_WORLD, part, gate, std::move(local));
  std::optional<moet::MoELayer<Gate, Bank>> single;
  if (rank == 0) {
    single.emplace(gate, Bank({.model_dim = d,
                               .hidden_dim = f,
                               .num_experts = experts,
                               .init = moet::WeightInit::kZeros}));
    std::printf("moet-ep-bench: %d ranks x %d threads, d %ld, hidden %ld, %ld experts (", ranks,
                threads, static_cast<long>(d), static_cast<long>(f), static_cast<long>(experts));
    for (int r = 0; r < ranks; ++r) {
      std::printf("%s%ld", r ? "/" : "", static_cast<long>(part.count(r)));
    }
    std::printf(" per rank), top-%ld, %d calls per row, median of the slowest rank (ms)\n\n",
                static_cast<long>(k), repeat);
    std::printf(
        "| tokens/rank | route | counts | rows | experts | back | combine | layer | "
        "tokens/s | single process | tokens/s | ratio |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  }
  nlohmann::json rows = nlohmann::json::array();
  for (const Index tokens : token_counts) {
    const Matrix x = normal_tokens(tokens, d, 100 + static_cast<std::uint64_t>(rank));
    Matrix y(tokens, d);
    Layer::Workspace ws;
    std::vector<double> route, counts, sent, compute, back, combine, total;
    for (int call = -2; call < repeat; ++call) {  // two warm-up calls
      idle_barrier(MPI_COMM_WORLD);               // the ranks leave it up to 1 ms apart,
      MPI_Barrier(MPI_COMM_WORLD);                // this one aligns them to microseconds
      const double t0 = MPI_Wtime();
      layer.forward(x, y, {}, ws);
      const double wall = max_over_ranks(MPI_Wtime() - t0);
      const auto& t = ws.timings;
      const double parts[6] = {t.route, t.counts, t.rows, t.experts, t.back, t.combine};
      double worst[6];
      MPI_Allreduce(parts, worst, 6, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      if (call < 0) continue;
      route.push_back(worst[0]);
      counts.push_back(worst[1]);
      sent.push_back(worst[2]);
      compute.push_back(worst[3]);
      back.push_back(worst[4]);
      combine.push_back(worst[5]);
      total.push_back(wall);
    }
    // The single-process layer on every rank's tokens, on the same cores: rank 0 alone.
    double single_ms = 0;
    idle_barrier(MPI_COMM_WORLD);
    if (rank == 0) {
      Matrix all(tokens * ranks, d);
      for (int r = 0; r < ranks; ++r) {
        all.middleRows(r * tokens, tokens) =
            normal_tokens(tokens, d, 100 + static_cast<std::uint64_t>(r));
      }
      Matrix out(all.rows(), d);
      moet::MoELayer<Gate, Bank>::Workspace single_ws;
      set_threads(threads * ranks);
      std::vector<double> times;
      for (int call = -2; call < repeat; ++call) {
        const auto start = std::chrono::steady_clock::now();
        single->forward(all, out, {}, single_ws);
        const double s =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (call >= 0) times.push_back(s);
      }
      set_threads(threads);
      single_ms = 1e3 * median(times);
    }
    idle_barrier(MPI_COMM_WORLD);
    if (rank == 0) {
      const double layer_ms = 1e3 * median(total);
      const double global = static_cast<double>(tokens * ranks);
      std::printf(
          "| %ld | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.0f | %.3f | %.0f | "
          "%.2f |\n",
          static_cast<long>(tokens), 1e3 * median(route), 1e3 * median(counts), 1e3 * median(sent),
          1e3 * median(compute), 1e3 * median(back), 1e3 * median(combine), layer_ms,
          1e3 * global / layer_ms, single_ms, 1e3 * global / single_ms, single_ms / layer_ms);
      rows.push_back({{"tokens_per_rank", tokens},
                      {"route_ms", 1e3 * median(route)},
                      {"counts_ms", 1e3 * median(counts)},
                      {"rows_ms", 1e3 * median(sent)},
                      {"experts_ms", 1e3 * median(compute)},
                      {"back_ms", 1e3 * median(back)},
                      {"combine_ms", 1e3 * median(combine)},
                      {"layer_ms", layer_ms},
                      {"single_process_ms", single_ms}});
    }
  }
  if (rank == 0) {
    std::printf(
        "\nratio: single-process time / expert-parallel time (> 1: the ranks are faster)\n");
    if (!json_path.empty()) {
      std::ofstream(json_path)
          << nlohmann::json{{"ranks", ranks},     {"threads_per_rank", threads},
                            {"d_model", d},       {"d_ff", f},
                            {"experts", experts}, {"k", k},
                            {"repeat", repeat},   {"rows", rows}}
                 .dump(2)
          << "\n";
    }
  }
  MPI_Finalize();
  return 0;
}
