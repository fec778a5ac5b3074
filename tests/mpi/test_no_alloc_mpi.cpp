// After a warm-up, expert parallelism runs without touching the heap, like the single-process
// layer (tests/test_no_alloc.cpp, tests/test_no_alloc_train.cpp, the same harness): an
// inference forward, and a whole training step (zero_grad, forward_train, backward, the
// GradientReducer's sum of the replicated gradients, then an AdamW or SGD step with its repack),
// once the workspace has held as large a receipt.
// Run by ctest under mpirun with 2 and 3 ranks. Only moet's own allocations are counted (the
// replaced operator new and Eigen's); what the MPI library allocates inside its calls (with
// malloc) is MPI's business. Every rank runs the same steps (the collectives match); checks use
// CHECK, so a failing rank keeps taking part.

// clang-format off
#include "no_alloc_harness.hpp"  // first: it configures Eigen and replaces operator new
// clang-format on

#define CATCH_CONFIG_RUNNER
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>
#include <mpi.h>

#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/layer.hpp"
#include "moet/mpi/expert_parallel.hpp"
#include "moet/mpi/gradients.hpp"
#include "moet/train/optim.hpp"

#include "mpi_test_main.hpp"  // world_rank(), world_size(), main()
#include "random_rows.hpp"

namespace {

using moet::Index;
using moet::mpi::ExpertParallelLayer;
using moet::mpi::ExpertPartition;
using moet_test::random_rows;
using mpi_test::world_rank;
using mpi_test::world_size;
using no_alloc::Window;

// Experts [first, first + count) of a bank of `num_experts` built from `options`: each rank
// draws the whole bank with the same seed and keeps its slice (what a loader would give it).
template <class Bank>
std::optional<Bank> local_bank(typename Bank::Options options, Index first, Index count) {
  if (count == 0) return std::nullopt;
  Bank full(options);
  options.num_experts = count;
  options.init = moet::WeightInit::kZeros;
  Bank bank(options);
  // Copy the experts' stacked tensors: each holds its experts' blocks one after the other.
  std::vector<std::vector<float>> tensors;
  full.visit_parameters([&](std::string_view, auto value, auto) {
    const Index per = value.size() / full.num_experts();
    tensors.emplace_back(value.data() + first * per, value.data() + (first + count) * per);
  });
  std::size_t t = 0;
  bank.visit_parameters([&](std::string_view, auto value, auto) {
    std::copy(tensors[t].begin(), tensors[t].end(), value.data());
    ++t;
  });
  bank.parameters_changed();
  return bank;
}

// Tokens of each rank: uneven, so that ranks receive different row counts.
Index tokens_of(int rank) { return 40 + 8 * static_cast<Index>(rank); }

// A warm-up (each optimiser's first step allocates its state; the first backward the
// transposed packs), then an inference forward and training steps with AdamW and SGD in a
// no-allocation window, three times over on the warm-up's tokens, then on their first half.
// The workspace grows to the largest receipt it has held (the rows each rank receives depend on
// the routing), so the optimisers' learning rate is too small to change a weight's bits: the
// routing, and each rank's receipt, repeat; the half batch receives a subset of those rows.
template <class Bank>
void check_expert_parallel_does_not_allocate(typename Bank::Options options) {
  const int rank = world_rank();
  const int ranks = world_size();
  const Index d = options.model_dim;
  const Index n = tokens_of(rank);
  using Gate = moet::TopKGate<float>;
  const auto part = ExpertPartition::even(options.num_experts, ranks);
  auto shared_options = options;
  shared_options.num_experts = 1;
  shared_options.init_seed = 77;
  ExpertParallelLayer<Gate, Bank> layer(
      MPI_COMM_WORLD, part, Gate(Gate::mixtral_options(d, options.num_experts)),
      local_bank<Bank>(options, part.first(rank), part.count(rank)), Bank(shared_options),
      {.block_rows = 16});
  typename ExpertParallelLayer<Gate, Bank>::Workspace ws;
  moet::mpi::GradientReducer reducer(MPI_COMM_WORLD);
  moet::AdamW<float> adamw({.lr = 1e-30, .weight_decay = 0.01});
  moet::Sgd<float> sgd({.lr = 1e-30, .momentum = 0.9});
  const auto x = random_rows(n, d, 11u + static_cast<std::uint32_t>(rank));
  const auto dy = random_rows(n, d, 21u + static_cast<std::uint32_t>(rank));
  moet::RowMatrix<float> y(n, d), dx(n, d);
  const moet::RouteContext ctx;
  const auto step = [&](Index rows, auto& optimizer) {
    const auto xs = x.topRows(rows);
    layer.forward(xs, y.topRows(rows), ctx, ws);
    layer.zero_grad();
    layer.forward_train(xs, y.topRows(rows), ctx, ws);
    layer.backward(xs, dy.topRows(rows), ctx, ws, dx.topRows(rows));
    reducer.sum(layer.replicated_parameters());
    optimizer.step(layer);  // the update, then parameters_changed(): the repack
  };
  step(n, adamw);
  step(n, sgd);
  const moet::RowMatrix<float> first_y = y;
  Window window;
  window.open();
  for (int repeat = 0; repeat < 3; ++repeat) {
    step(n, adamw);
    step(n, sgd);
  }
  step(n / 2, adamw);
  step(n / 2, sgd);
  const auto counts = window.close();
  CAPTURE(rank, ranks);
  CHECK(counts.new_calls == 0);
  CHECK(counts.eigen_violations == 0);
  CHECK(y.bottomRows(n - n / 2) == first_y.bottomRows(n - n / 2));  // the same routing
  CHECK(y.allFinite());
  CHECK(dx.allFinite());
}

}  // namespace

TEST_CASE("Expert parallelism does not allocate after a warm-up: SwiGLU, f32 and bf16",
          "[mpi][no_alloc]") {
  for (const auto format : {moet::WeightFormat::kF32, moet::WeightFormat::kBf16}) {
    CAPTURE(moet::weight_format_name(format));
    check_expert_parallel_does_not_allocate<moet::SwiGluExperts<float>>(
        {.model_dim = 16, .hidden_dim = 24, .num_experts = 6, .weight_format = format});
  }
}

TEST_CASE("Expert parallelism does not allocate after a warm-up: GELU FFN", "[mpi][no_alloc]") {
  check_expert_parallel_does_not_allocate<moet::GeluFfnExperts<float>>(
      {.model_dim = 24, .hidden_dim = 16, .num_experts = 5});
}
