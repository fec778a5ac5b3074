// What this shows: example 06's character-level language model trained on several MPI ranks,
// its MoE experts split between them (expert parallelism: moet::mpi::ExpertParallelLayer) and
// every other parameter replicated (data parallelism: each rank trains on its share of the
// global batch and moet::mpi::GradientReducer sums the replicated gradients in rank order).
// Top-k routing with Switch's balance loss.
//
// It then checks itself: rank 0 trains the same model in one process with the same global
// batch, as gradient accumulation over the ranks' shares in rank order, and compares the two
// loss curves bit for bit (exit code 1 when they differ; --check 0 skips this).
// What to copy: the training step in train_distributed() and make_layer's slicing of the
// experts (a real model loads only its rank's experts from a checkpoint).
//
//   mpirun -np 2 example_09_distributed_lm [--steps 200] [--batch 16] [--len 64] [--k 2]
//                                          [--seed 1] [--check 1]
//
// The global batch (--batch windows) must split evenly over the ranks.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string_view>
#include <vector>

#include <mpi.h>

#include <moet/moet.hpp>
#include <moet/mpi/expert_parallel.hpp>
#include <moet/mpi/gradients.hpp>
#include <moet/train/optim.hpp>

#include "support/char_lm.hpp"
#include "support/cli.hpp"
#include "support/data.hpp"

namespace {

using S = float;
using examples::Index;
using examples::RowMatrix;
using Gate = moet::TopKGate<S>;
using Bank = moet::SwiGluExperts<S>;
using Distributed = examples::MoeCharLm<Gate, moet::mpi::ExpertParallelLayer<Gate, Bank>>;
using Single = examples::MoeCharLm<Gate>;

constexpr double kLn2 = 0.6931471805599453;

struct Config {
  long steps = 200, batch = 16, len = 64, k = 2, check = 1;
  std::uint64_t seed = 1;
};

// Share `r` of `ranks` of a global batch: windows [r * batch / ranks, (r + 1) * batch / ranks).
examples::CharBatch share(const examples::CharBatch& global, const Config& cfg, int r, int ranks) {
  const auto per = static_cast<std::ptrdiff_t>(cfg.batch / ranks * cfg.len);
  examples::CharBatch out;
  out.inputs.assign(global.inputs.begin() + r * per, global.inputs.begin() + (r + 1) * per);
  out.targets.assign(global.targets.begin() + r * per, global.targets.begin() + (r + 1) * per);
  return out;
}

// Experts [first, first + count) of `full`: what a rank that holds them loads.
std::optional<Bank> slice(const Bank& full, Index first, Index count) {
  if (count == 0) return std::nullopt;
  Bank bank({.model_dim = full.model_dim(),
             .hidden_dim = full.hidden_dim(),
             .num_experts = count,
             .init = moet::WeightInit::kNone});
  for (Index i = 0; i < count; ++i) {
    bank.set_gate_weights(i, full.gate_weights(first + i), moet::WeightLayout::kInOut);
    bank.set_up_weights(i, full.up_weights(first + i), moet::WeightLayout::kInOut);
    bank.set_down_weights(i, full.down_weights(first + i), moet::WeightLayout::kInOut);
  }
  return bank;
}

// The parameters every rank holds a replica of (all but the routed experts), as a module.
template <class Model>
struct Replicated {
  using Scalar = S;
  Model* model;
  template <class F>
  void visit_parameters(F&& f) {
    model->visit_replicated_parameters(f);
  }
};

// One share of the global batch: forward, the loss (its gradient scaled to the mean over the
// global batch), backward. Returns the share's mean loss.
template <class Model>
double train_share(Model& model, typename Model::Pass& pass, const examples::CharBatch& b,
                   const Config& cfg, int ranks, const moet::RouteContext& ctx, RowMatrix<S>& d) {
  model.forward(b.inputs, cfg.batch / ranks, cfg.len, ctx, pass);
  const double loss = examples::softmax_cross_entropy(pass.logits, b.targets, &d);
  d *= S(1) / static_cast<S>(ranks);
  model.backward(pass, d);
  return loss;
}

// The mean of the ranks' losses, added in rank order.
double mean_in_rank_order(const std::vector<double>& losses) {
  double sum = losses[0];
  for (std::size_t r = 1; r < losses.size(); ++r) sum += losses[r];
  return sum / static_cast<double>(losses.size());
}

template <class MakeGate>
std::vector<double> train_distributed(const Config& cfg, const examples::CharLmShape& shape,
                                      MakeGate&& make_gate, const std::vector<int>& tr, int rank,
                                      int ranks) {
  const auto part = moet::mpi::ExpertPartition::even(shape.experts, ranks);
  Distributed model(shape, make_gate, cfg.seed, [&](int, Gate gate, Bank experts) {
    return moet::mpi::ExpertParallelLayer<Gate, Bank>(
        MPI_COMM_WORLD, part, std::move(gate), slice(experts, part.first(rank), part.count(rank)));
  });
  moet::mpi::GradientReducer reducer(MPI_COMM_WORLD);
  moet::AdamW<S> opt({.lr = 3e-3, .weight_decay = 0.0});
  Distributed::Pass pass;
  RowMatrix<S> d;
  std::vector<double> curve, losses(static_cast<std::size_t>(ranks));
  const auto start = std::chrono::steady_clock::now();
  for (long step = 0; step < cfg.steps; ++step) {
    const auto global =
        examples::sample_windows(tr, cfg.batch, cfg.len, cfg.seed, std::uint64_t(step));
    const moet::RouteContext ctx{.training = true, .seed = cfg.seed, .step = std::uint64_t(step)};
    model.zero_grad();
    double loss = train_share(model, pass, share(global, cfg, rank, ranks), cfg, ranks, ctx, d);
    reducer.sum(Replicated<Distributed>{&model});  // the replicas' gradients, in rank order
    opt.step(model);                               // each rank: its experts and the replicas
    MPI_Allgather(&loss, 1, MPI_DOUBLE, losses.data(), 1, MPI_DOUBLE, MPI_COMM_WORLD);
    curve.push_back(mean_in_rank_order(losses));
    if (rank == 0 && (step % 50 == 0 || step + 1 == cfg.steps)) {
      std::printf("step %5ld  %.4f bits/char\n", step, curve.back() / kLn2);
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (rank == 0) {
    std::printf("%d ranks (experts per rank:", ranks);
    for (const Index c : part.counts()) std::printf(" %ld", static_cast<long>(c));
    std::printf("): %.1f ms per step\n", 1e3 * seconds / static_cast<double>(cfg.steps));
  }
  return curve;
}

// One process, the same global batch: the ranks' shares one after the other, the routed
// experts' gradients accumulating across them (as on their ranks) and the replicated ones
// computed per share and added in rank order (as GradientReducer adds them).
template <class MakeGate>
std::vector<double> train_single(const Config& cfg, const examples::CharLmShape& shape,
                                 MakeGate&& make_gate, const std::vector<int>& tr, int ranks) {
  Single model(shape, make_gate, cfg.seed);
  moet::AdamW<S> opt({.lr = 3e-3, .weight_decay = 0.0});
  Single::Pass pass;
  RowMatrix<S> d;
  std::vector<double> curve, losses(static_cast<std::size_t>(ranks));
  std::vector<S> sum;
  for (long step = 0; step < cfg.steps; ++step) {
    const auto global =
        examples::sample_windows(tr, cfg.batch, cfg.len, cfg.seed, std::uint64_t(step));
    const moet::RouteContext ctx{.training = true, .seed = cfg.seed, .step = std::uint64_t(step)};
    model.zero_grad();
    for (int r = 0; r < ranks; ++r) {
      if (r > 0) model.zero_replicated_grad();
      losses[static_cast<std::size_t>(r)] =
          train_share(model, pass, share(global, cfg, r, ranks), cfg, ranks, ctx, d);
      std::size_t at = 0;
      model.visit_replicated_parameters([&](std::string_view, auto, auto grad) {
        for (Index i = 0; i < grad.size(); ++i, ++at) {
          if (r == 0) {
            if (at == sum.size()) sum.push_back(0);
            sum[at] = grad.data()[i];
          } else {
            sum[at] += grad.data()[i];
          }
        }
      });
    }
    std::size_t at = 0;
    model.visit_replicated_parameters([&](std::string_view, auto, auto grad) {
      for (Index i = 0; i < grad.size(); ++i, ++at) grad.data()[i] = sum[at];
    });
    opt.step(model);
    curve.push_back(mean_in_rank_order(losses));
  }
  return curve;
}

int run(int argc, char** argv, int rank, int ranks) {
  Config cfg;
  examples::Flags flags;
  flags.add("--steps", cfg.steps).add("--batch", cfg.batch).add("--len", cfg.len);
  flags.add("--k", cfg.k).add("--seed", cfg.seed).add("--check", cfg.check);
  if (!flags.parse(argc, argv)) return 2;
  if (cfg.batch % ranks != 0 || cfg.batch < ranks) {
    if (rank == 0) {
      std::fprintf(stderr, "--batch %ld does not split over %d ranks\n", cfg.batch, ranks);
    }
    return 2;
  }
  if (!std::filesystem::is_directory(examples::kFortunesDir)) {
    if (rank == 0) {
      std::fprintf(stderr, "the fortunes package is not installed (apt-get install it); skipped\n");
    }
    return 77;  // ctest's skip code
  }
  const examples::TextCorpus corpus = examples::load_fortunes();
  const examples::CharVocab vocab(corpus.train);
  const std::vector<int> tr = vocab.encode(corpus.train);
  examples::CharLmShape shape;
  shape.vocab = vocab.size();
  const auto make_gate = [&](int b) {
    return Gate({.model_dim = shape.model_dim,
                 .num_experts = shape.experts,
                 .k = cfg.k,
                 .init_seed = cfg.seed + 50 + static_cast<std::uint64_t>(b)});
  };
  if (rank == 0) {
    std::printf(
        "fortunes: %zu training characters; global batch %ld windows of %ld, %ld per "
        "rank; top-%ld of %ld experts\n",
        tr.size(), cfg.batch, cfg.len, cfg.batch / ranks, cfg.k, static_cast<long>(shape.experts));
  }
  const std::vector<double> curve = train_distributed(cfg, shape, make_gate, tr, rank, ranks);
  if (rank != 0 || cfg.check == 0) return 0;
  const std::vector<double> single = train_single(cfg, shape, make_gate, tr, ranks);
  double worst = 0;
  for (std::size_t i = 0; i < curve.size(); ++i) {
    worst = std::max(worst, std::abs(curve[i] - single[i]));
  }
  const bool same = std::memcmp(curve.data(), single.data(), curve.size() * sizeof(double)) == 0;
  std::printf(
      "single process, same global batch: final %.6f bits/char; loss curves %s "
      "(largest difference %.3g)\n",
      single.back() / kLn2, same ? "bit-identical" : "DIFFER", worst);
  return same ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  int code = 0;
  try {
    code = run(argc, argv, rank, ranks);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  int worst = 0;
  MPI_Allreduce(&code, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
