// Expert parallelism (moet::mpi::ExpertParallelLayer), run by ctest under mpirun with 2, 3 and
// 4 ranks. The oracle is the single-process layer: MoELayer<G, SwiGluExperts, GroupedDispatch>
// with all experts, run on each rank's own tokens; every rank's output must equal it bit for
// bit, for every gate case of gate_cases.hpp, even and uneven partitions, ranks without experts,
// a rank without tokens and experts without tokens. Bad input on one rank must end, on every
// rank, in the same moet::Error naming that rank (ctest's timeout catches a rank left waiting).
//
// Training: each rank's y and dx must equal the single-process layer's forward_train and
// backward on its tokens; each routed expert's gradients, on its rank, the single-process
// layer's after forward_train + backward on every rank's batch in rank order (accumulated);
// the gate's and shared experts' gradients (and their SharedExpertGate's), after
// GradientReducer::sum, the rank-order sum of the single-process gradients of each rank's batch.
//
// Every rank runs every test case in the same order (Catch2, fixed order), so the collectives
// match; checks use CHECK, never REQUIRE, so that a failing rank keeps taking part.
#define CATCH_CONFIG_RUNNER
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>
#include <mpi.h>

#include "moet/experts/glu.hpp"
#include "moet/layer.hpp"
#include "moet/mpi/expert_parallel.hpp"
#include "moet/mpi/gradients.hpp"

#include "gate_cases.hpp"
#include "mpi_test_main.hpp"  // world_rank(), world_size(), main()

namespace {

using moet::Index;
using moet::mpi::ExpertParallelLayer;
using moet::mpi::ExpertPartition;
using mpi_test::world_rank;
using mpi_test::world_size;
using Bank = moet::SwiGluExperts<float>;
using Matrix = moet::RowMatrix<float>;

constexpr Index kHidden = 24;

Bank full_bank(Index num_experts, std::uint64_t seed) {
  return Bank({.model_dim = gate_cases::kModelDim,
               .hidden_dim = kHidden,
               .num_experts = num_experts,
               .init_seed = seed});
}

// Experts [first, first + count) of `full`, as the rank that holds them loads them.
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

// Tokens of each rank: rank 1 has none; rank 0 has enough for experts with more than one
// 128-row block; multiples of gate_cases::kSeqLen for the gates that need sequences.
Index tokens_of(int rank) {
  static constexpr Index kTokens[] = {420, 0, 30, 10};
  return kTokens[rank % 4];
}

// The partitions every gate case runs under, for `ranks` ranks and `experts` experts: even,
// then uneven ones with ranks that hold no expert.
std::vector<ExpertPartition> partitions(int ranks, Index experts) {
  std::vector<ExpertPartition> out{ExpertPartition::even(experts, ranks)};
  std::vector<Index> last_holds_all(static_cast<std::size_t>(ranks), 0);
  last_holds_all.back() = experts;
  out.emplace_back(last_holds_all);
  if (ranks >= 2 && experts >= 3) {
    std::vector<Index> uneven(static_cast<std::size_t>(ranks), 0);
    uneven[0] = experts - 1;  // rank 0 holds all but one; the last rank one; others none
    uneven.back() = 1;
    out.emplace_back(uneven);
  }
  return out;
}

// What one rank's message says, gathered from every rank: true when all are equal.
bool same_on_every_rank(const std::string& message) {
  const int length = static_cast<int>(message.size());
  std::vector<int> lengths(static_cast<std::size_t>(world_size()));
  MPI_Allgather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, MPI_COMM_WORLD);
  for (const int l : lengths) {
    if (l != length) return false;
  }
  std::vector<char> all(static_cast<std::size_t>(length) * lengths.size());
  MPI_Allgather(message.data(), length, MPI_CHAR, all.data(), length, MPI_CHAR, MPI_COMM_WORLD);
  for (std::size_t r = 0; r < lengths.size(); ++r) {
    if (std::string(all.data() + r * message.size(), message.size()) != message) return false;
  }
  return true;
}

// Runs `f()` and returns the moet::Error's message ("" when nothing was thrown).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const moet::Error& e) {
    return e.what();
  }
  return {};
}

// Copies of every gradient `module` visits whose name starts with one of `prefixes`, in order.
// Visiting hands the weights out for writing, so the banks' packed copies are stale afterwards:
// parameters_changed() repacks them (the same bits), as an optimiser step would.
template <class M>
std::vector<float> grads_of(M& module, std::vector<std::string> prefixes) {
  std::vector<float> out;
  module.visit_parameters([&](std::string_view name, auto, auto grad) {
    for (const auto& p : prefixes) {
      if (name.substr(0, p.size()) == p) {
        out.insert(out.end(), grad.data(), grad.data() + grad.size());
        return;
      }
    }
  });
  module.parameters_changed();
  return out;
}

// The stacked gradients of experts [first, first + count) of a bank of `num_experts`, in
// visit order (each stacked tensor holds its experts' blocks one after the other).
std::vector<float> expert_grads(Bank& bank, Index first, Index count) {
  std::vector<float> out;
  const Index experts = bank.num_experts();
  bank.visit_parameters([&](std::string_view, auto, auto grad) {
    const Index per = grad.size() / experts;
    out.insert(out.end(), grad.data() + first * per, grad.data() + (first + count) * per);
  });
  bank.parameters_changed();
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("ExpertPartition splits, owns and rejects", "[mpi][partition]") {
  const auto even = ExpertPartition::even(8, 3);
  CHECK(std::vector<Index>(even.counts().begin(), even.counts().end()) ==
        std::vector<Index>{3, 3, 2});
  CHECK(even.first(2) == 6);
  CHECK(even.owner(0) == 0);
  CHECK(even.owner(5) == 1);
  CHECK(even.owner(7) == 2);
  const auto sparse = ExpertPartition::even(2, 4);
  CHECK(std::vector<Index>(sparse.counts().begin(), sparse.counts().end()) ==
        std::vector<Index>{1, 1, 0, 0});
  const ExpertPartition gaps({0, 2, 0, 1});
  CHECK(gaps.owner(0) == 1);
  CHECK(gaps.owner(1) == 1);
  CHECK(gaps.owner(2) == 3);
  CHECK(gaps.max_count() == 2);
  CHECK(error_of([] { ExpertPartition({2, -1}); }).find("must be >= 0") != std::string::npos);
  CHECK(error_of([] { ExpertPartition({0, 0}); }).find("no expert") != std::string::npos);
  CHECK(error_of([] { ExpertPartition::even(0, 2); }).find("num_experts >= 1") !=
        std::string::npos);
  CHECK(error_of([&] { (void)gaps.owner(3); }).find("outside [0, 3)") != std::string::npos);
}

TEST_CASE("Every gate: each rank's output equals the single-process layer's, bit for bit",
          "[mpi][forward]") {
  const int rank = world_rank();
  const int ranks = world_size();
  const Bank full = full_bank(gate_cases::kExperts, 21);
  const Index num_tokens = tokens_of(rank);
  const Matrix x = gate_cases::tokens(num_tokens, 100u + static_cast<std::uint32_t>(rank));
  for (const auto& part : partitions(ranks, gate_cases::kExperts)) {
    gate_cases::for_each_gate(
        5, [&](const std::string& name, const auto& gate, const gate_cases::ContextSpec& spec) {
          using G = std::decay_t<decltype(gate)>;
          INFO(name << ", rank " << rank << " of " << ranks << ", " << num_tokens
                    << " tokens, partition starting " << part.count(0));
          const auto c =
              gate_cases::make_context(spec, num_tokens, 7u + static_cast<std::uint32_t>(rank));
          moet::MoELayer<G, Bank> single{G(gate), Bank(full)};
          Matrix expected(num_tokens, gate_cases::kModelDim);
          typename moet::MoELayer<G, Bank>::Workspace single_ws;
          const std::string single_error =
              error_of([&] { single.forward(x, expected, c.ctx, single_ws); });
          CHECK(single_error.empty());

          ExpertParallelLayer<G, Bank> layer(MPI_COMM_WORLD, part, G(gate),
                                             slice(full, part.first(rank), part.count(rank)));
          Matrix y(num_tokens, gate_cases::kModelDim);
          typename ExpertParallelLayer<G, Bank>::Workspace ws;
          const std::string error = error_of([&] { layer.forward(x, y, c.ctx, ws); });
          CHECK(error.empty());
          CHECK(gate_cases::bit_identical(y, expected));
          CHECK(ws.stats.mean_k == single_ws.stats.mean_k);
          // Again on the same workspace: reuse changes nothing.
          Matrix again(num_tokens, gate_cases::kModelDim);
          layer.forward(x, again, c.ctx, ws);
          CHECK(gate_cases::bit_identical(again, expected));
        });
  }
}

TEST_CASE("More ranks than experts, and shared experts", "[mpi][forward]") {
  const int rank = world_rank();
  const int ranks = world_size();
  using Gate = moet::TopKGate<float>;
  const Gate gate({.model_dim = gate_cases::kModelDim, .num_experts = 2, .k = 2, .init_seed = 3});
  const Bank full = full_bank(2, 8);
  const Bank shared = full_bank(1, 9);
  const auto part = ExpertPartition::even(2, ranks);  // ranks 2 and 3 hold none
  const Index num_tokens = tokens_of(rank);
  const Matrix x = gate_cases::tokens(num_tokens, 40u + static_cast<std::uint32_t>(rank));

  moet::MoELayer<Gate, Bank> single(gate, Bank(full), Bank(shared));
  const Matrix expected = single.forward(x);
  ExpertParallelLayer<Gate, Bank> layer(
      MPI_COMM_WORLD, part, gate, slice(full, part.first(rank), part.count(rank)), Bank(shared));
  Matrix y(num_tokens, gate_cases::kModelDim);
  ExpertParallelLayer<Gate, Bank>::Workspace ws;
  layer.forward(x, y, {}, ws);
  CHECK(gate_cases::bit_identical(y, expected));
  CHECK(layer.has_local_experts() == (rank < 2));
}

TEST_CASE("Bad input on one rank: every rank throws the same error naming it, then recovers",
          "[mpi][bad_input]") {
  const int rank = world_rank();
  const int ranks = world_size();
  const int last = ranks - 1;
  using Gate = moet::TopKGate<float>;
  const Gate gate(
      {.model_dim = gate_cases::kModelDim, .num_experts = gate_cases::kExperts, .k = 2});
  const Bank full = full_bank(gate_cases::kExperts, 2);
  const auto part = ExpertPartition::even(gate_cases::kExperts, ranks);
  ExpertParallelLayer<Gate, Bank> layer(MPI_COMM_WORLD, part, gate,
                                        slice(full, part.first(rank), part.count(rank)));
  ExpertParallelLayer<Gate, Bank>::Workspace ws;
  const Index num_tokens = 20;

  Matrix x = gate_cases::tokens(num_tokens, 3u + static_cast<std::uint32_t>(rank));
  Matrix y(num_tokens, gate_cases::kModelDim);
  {
    INFO("a NaN on the last rank");
    Matrix bad = x;
    if (rank == last) bad(3, 5) = std::numeric_limits<float>::quiet_NaN();
    const std::string message = error_of([&] { layer.forward(bad, y, {}, ws); });
    CAPTURE(message);
    CHECK(message.find("rank " + std::to_string(last) + " failed") != std::string::npos);
    CHECK(message.find("must be finite") != std::string::npos);
    CHECK(same_on_every_rank(message));
  }
  {
    INFO("a wrong width on rank 0");
    const Matrix wide = Matrix::Zero(num_tokens, gate_cases::kModelDim + (rank == 0 ? 1 : 0));
    const std::string message = error_of([&] { layer.forward(wide, y, {}, ws); });
    CAPTURE(message);
    CHECK(message.find("rank 0 failed") != std::string::npos);
    CHECK(message.find("model_dim = 16") != std::string::npos);
    CHECK(same_on_every_rank(message));
  }
  {
    INFO("after the errors, the same layer and workspace give the single-process output");
    moet::MoELayer<Gate, Bank> single(gate, Bank(full));
    const Matrix expected = single.forward(x);
    layer.forward(x, y, {}, ws);
    CHECK(gate_cases::bit_identical(y, expected));
  }
}

TEST_CASE("Construction: disagreeing ranks make every rank throw the same error",
          "[mpi][bad_input]") {
  const int rank = world_rank();
  const int ranks = world_size();
  using Gate = moet::TopKGate<float>;
  using Layer = ExpertParallelLayer<Gate, Bank>;
  const Gate gate(
      {.model_dim = gate_cases::kModelDim, .num_experts = gate_cases::kExperts, .k = 2});
  const Bank full = full_bank(gate_cases::kExperts, 2);
  const auto part = ExpertPartition::even(gate_cases::kExperts, ranks);
  {
    INFO("the last rank's bank has one expert too many");
    const Index count = part.count(rank) + (rank == ranks - 1 ? 1 : 0);
    const std::string message =
        error_of([&] { Layer(MPI_COMM_WORLD, part, gate, slice(full, 0, count)); });
    CAPTURE(message);
    CHECK(message.find("rank " + std::to_string(ranks - 1) + " failed") != std::string::npos);
    CHECK(message.find("its bank has") != std::string::npos);
    CHECK(same_on_every_rank(message));
  }
  {
    INFO("rank 1 passes another partition");
    std::vector<Index> counts(part.counts().begin(), part.counts().end());
    if (rank == 1) {  // one expert moves from rank 0 to the last rank
      counts.front() -= 1;
      counts.back() += 1;
    }
    const ExpertPartition mine(counts);
    const std::string message = error_of([&] {
      Layer(MPI_COMM_WORLD, mine, gate, slice(full, mine.first(rank), mine.count(rank)));
    });
    CAPTURE(message);
    CHECK(message.find("rank 1's partition") != std::string::npos);
    CHECK(same_on_every_rank(message));
  }
  {
    INFO("a partition for another number of ranks");
    const auto other = ExpertPartition::even(gate_cases::kExperts, ranks + 1);
    const std::string message = error_of([&] {
      Layer(MPI_COMM_WORLD, other, gate, slice(full, other.first(rank), other.count(rank)));
    });
    CAPTURE(message);
    CHECK(message.find("the partition has " + std::to_string(ranks + 1) + " ranks") !=
          std::string::npos);
    CHECK(same_on_every_rank(message));
  }
}

TEST_CASE("Training, every trainable gate: y, dx and every gradient equal the single process",
          "[mpi][train]") {
  const int rank = world_rank();
  const int ranks = world_size();
  const Bank full = full_bank(gate_cases::kExperts, 31);
  const Bank shared = full_bank(1, 32);
  moet::mpi::GradientReducer reducer(MPI_COMM_WORLD);
  for (const auto& part : partitions(ranks, gate_cases::kExperts)) {
    gate_cases::for_each_gate(
        6, [&](const std::string& name, const auto& gate, const gate_cases::ContextSpec& spec) {
          using G = std::decay_t<decltype(gate)>;
          if constexpr (moet::TrainableGate<G>) {
            INFO(name << ", rank " << rank << " of " << ranks << ", partition starting "
                      << part.count(0));
            // The single process, on every rank's batch in rank order.
            moet::MoELayer<G, Bank> single{G(gate), Bank(full), Bank(shared)};
            typename moet::MoELayer<G, Bank>::Workspace single_ws;
            single.zero_grad();
            std::vector<float> replicated_sum;
            Matrix expected_y, expected_dx;
            for (int r = 0; r < ranks; ++r) {
              const Index n = tokens_of(r);
              const Matrix x = gate_cases::tokens(n, 100u + static_cast<std::uint32_t>(r));
              const Matrix dy = gate_cases::tokens(n, 300u + static_cast<std::uint32_t>(r));
              auto c = gate_cases::make_context(spec, n, 7u + static_cast<std::uint32_t>(r));
              c.ctx.training = true;  // training forwards (TopAnyGate records only those)
              single.gate().zero_grad();
              single.shared_experts().zero_grad();
              Matrix y(n, gate_cases::kModelDim), dx(n, gate_cases::kModelDim);
              single.forward_train(x, y, c.ctx, single_ws);
              single.backward(x, dy, c.ctx, single_ws, dx);
              const auto g = grads_of(single, {"gate.", "shared."});
              if (r == 0) {
                replicated_sum = g;
              } else {
                for (std::size_t i = 0; i < g.size(); ++i) replicated_sum[i] += g[i];
              }
              if (r == rank) {
                expected_y = y;
                expected_dx = dx;
              }
            }

            // This rank, expert-parallel.
            const Index n = tokens_of(rank);
            const Matrix x = gate_cases::tokens(n, 100u + static_cast<std::uint32_t>(rank));
            const Matrix dy = gate_cases::tokens(n, 300u + static_cast<std::uint32_t>(rank));
            auto c = gate_cases::make_context(spec, n, 7u + static_cast<std::uint32_t>(rank));
            c.ctx.training = true;
            ExpertParallelLayer<G, Bank> layer(MPI_COMM_WORLD, part, G(gate),
                                               slice(full, part.first(rank), part.count(rank)),
                                               Bank(shared));
            typename ExpertParallelLayer<G, Bank>::Workspace ws;
            layer.zero_grad();
            Matrix y(n, gate_cases::kModelDim), dx(n, gate_cases::kModelDim);
            CHECK(error_of([&] { layer.forward_train(x, y, c.ctx, ws); }).empty());
            CHECK(error_of([&] { layer.backward(x, dy, c.ctx, ws, dx); }).empty());
            CHECK(gate_cases::bit_identical(y, expected_y));
            CHECK(gate_cases::bit_identical(dx, expected_dx));
            if (layer.has_local_experts()) {
              CHECK(same_bits(expert_grads(layer.local_experts(), 0, part.count(rank)),
                              expert_grads(single.experts(), part.first(rank), part.count(rank))));
            }
            // Before the reduction each rank holds its own batch's replicated gradients.
            reducer.sum(layer.replicated_parameters());
            CHECK(same_bits(grads_of(layer, {"gate.", "shared."}), replicated_sum));
          }
        });
  }
}

TEST_CASE("Gated shared experts: forward, training and gradients equal the single process",
          "[mpi][train][shared_gate]") {
  const int rank = world_rank();
  const int ranks = world_size();
  using Gate = moet::TopKGate<float>;
  using Layer = ExpertParallelLayer<Gate, Bank>;
  const Gate gate({.model_dim = gate_cases::kModelDim,
                   .num_experts = gate_cases::kExperts,
                   .k = 2,
                   .init_seed = 5});
  const Bank full = full_bank(gate_cases::kExperts, 41);
  const Bank shared = full_bank(2, 42);
  const moet::SharedExpertGate<float> shared_gate(
      {.model_dim = gate_cases::kModelDim, .init_seed = 43});
  moet::mpi::GradientReducer reducer(MPI_COMM_WORLD);
  for (const auto& part : partitions(ranks, gate_cases::kExperts)) {
    INFO("rank " << rank << " of " << ranks << ", partition starting " << part.count(0));
    moet::MoELayer<Gate, Bank> single(gate, Bank(full), Bank(shared), shared_gate);
    moet::MoELayer<Gate, Bank>::Workspace single_ws;
    single.zero_grad();
    std::vector<float> replicated_sum;
    Matrix expected_y, expected_dx, expected_inference;
    for (int r = 0; r < ranks; ++r) {
      const Index n = tokens_of(r);
      const Matrix x = gate_cases::tokens(n, 500u + static_cast<std::uint32_t>(r));
      const Matrix dy = gate_cases::tokens(n, 600u + static_cast<std::uint32_t>(r));
      single.gate().zero_grad();
      single.shared_experts().zero_grad();
      single.shared_gate().zero_grad();
      Matrix y(n, gate_cases::kModelDim), dx(n, gate_cases::kModelDim);
      single.forward_train(x, y, {}, single_ws);
      single.backward(x, dy, {}, single_ws, dx);
      const auto g = grads_of(single, {"gate.", "shared.", "shared_gate."});
      if (r == 0) {
        replicated_sum = g;
      } else {
        for (std::size_t i = 0; i < g.size(); ++i) replicated_sum[i] += g[i];
      }
      if (r == rank) {
        expected_y = y;
        expected_dx = dx;
        expected_inference = single.forward(x);
      }
    }

    const Index n = tokens_of(rank);
    const Matrix x = gate_cases::tokens(n, 500u + static_cast<std::uint32_t>(rank));
    const Matrix dy = gate_cases::tokens(n, 600u + static_cast<std::uint32_t>(rank));
    Layer layer(MPI_COMM_WORLD, part, gate, slice(full, part.first(rank), part.count(rank)),
                Bank(shared), shared_gate);
    CHECK(layer.has_shared_gate());
    Layer::Workspace ws;
    Matrix y(n, gate_cases::kModelDim), dx(n, gate_cases::kModelDim);
    CHECK(error_of([&] { layer.forward(x, y, {}, ws); }).empty());
    CHECK(gate_cases::bit_identical(y, expected_inference));
    layer.zero_grad();
    CHECK(error_of([&] { layer.forward_train(x, y, {}, ws); }).empty());
    CHECK(error_of([&] { layer.backward(x, dy, {}, ws, dx); }).empty());
    CHECK(gate_cases::bit_identical(y, expected_y));
    CHECK(gate_cases::bit_identical(dx, expected_dx));
    if (layer.has_local_experts()) {
      CHECK(same_bits(expert_grads(layer.local_experts(), 0, part.count(rank)),
                      expert_grads(single.experts(), part.first(rank), part.count(rank))));
    }
    reducer.sum(layer.replicated_parameters());
    CHECK(same_bits(grads_of(layer, {"gate.", "shared.", "shared_gate."}), replicated_sum));
  }
  {
    INFO("rank 0 leaves the shared experts ungated: every rank throws the same error");
    const auto part = ExpertPartition::even(gate_cases::kExperts, ranks);
    const std::string message = error_of([&] {
      if (rank == 0) {
        Layer(MPI_COMM_WORLD, part, gate, slice(full, part.first(rank), part.count(rank)),
              Bank(shared));
      } else {
        Layer(MPI_COMM_WORLD, part, gate, slice(full, part.first(rank), part.count(rank)),
              Bank(shared), shared_gate);
      }
    });
    CAPTURE(message);
    CHECK(message.find("rank 1's partition, model_dim or shared experts differ") !=
          std::string::npos);
    CHECK(same_on_every_rank(message));
  }
}

TEST_CASE("Training: a bad backward on one rank is the same error everywhere, then it works",
          "[mpi][train][bad_input]") {
  const int rank = world_rank();
  const int ranks = world_size();
  using Gate = moet::TopKGate<float>;
  const Gate gate(
      {.model_dim = gate_cases::kModelDim, .num_experts = gate_cases::kExperts, .k = 2});
  const Bank full = full_bank(gate_cases::kExperts, 4);
  const auto part = ExpertPartition::even(gate_cases::kExperts, ranks);
  ExpertParallelLayer<Gate, Bank> layer(MPI_COMM_WORLD, part, gate,
                                        slice(full, part.first(rank), part.count(rank)));
  ExpertParallelLayer<Gate, Bank>::Workspace ws;
  const Index n = 20;
  const Matrix x = gate_cases::tokens(n, 5u + static_cast<std::uint32_t>(rank));
  const Matrix dy = gate_cases::tokens(n, 9u + static_cast<std::uint32_t>(rank));
  Matrix y(n, gate_cases::kModelDim), dx(n, gate_cases::kModelDim);
  layer.zero_grad();
  {
    INFO("backward after a plain forward on the last rank");
    if (rank == ranks - 1) {
      layer.forward(x, y, {}, ws);
    } else {
      layer.forward_train(x, y, {}, ws);
    }
    // The ranks' calls differ (forward vs forward_train) but both are the same collectives.
    const std::string message = error_of([&] { layer.backward(x, dy, {}, ws, dx); });
    CAPTURE(message);
    CHECK(message.find("rank " + std::to_string(ranks - 1) + " failed") != std::string::npos);
    CHECK(message.find("needs a forward_train") != std::string::npos);
    CHECK(same_on_every_rank(message));
  }
  layer.forward_train(x, y, {}, ws);
  {
    INFO("dy of the wrong shape on rank 0");
    const Matrix short_dy = gate_cases::tokens(rank == 0 ? n - 1 : n, 9u);
    const std::string message = error_of([&] { layer.backward(x, short_dy, {}, ws, dx); });
    CAPTURE(message);
    CHECK(message.find("rank 0 failed") != std::string::npos);
    CHECK(message.find("dy must have x's shape") != std::string::npos);
    CHECK(same_on_every_rank(message));
  }
  {
    INFO("after the errors the gradients are those of one clean step");
    layer.backward(x, dy, {}, ws, dx);
    moet::MoELayer<Gate, Bank> single(gate, Bank(full));
    single.zero_grad();
    typename moet::MoELayer<Gate, Bank>::Workspace single_ws;
    Matrix expected_dx(n, gate_cases::kModelDim);
    single.forward_train(x, y, {}, single_ws);
    single.backward(x, dy, {}, single_ws, expected_dx);
    CHECK(gate_cases::bit_identical(dx, expected_dx));
    CHECK(same_bits(grads_of(layer, {"gate."}), grads_of(single, {"gate."})));
  }
}

namespace {
// A module of `sizes[i]` scalars per tensor, values and gradients owned.
struct Params {
  using Scalar = float;
  std::vector<Matrix> values, grads;
  explicit Params(const std::vector<Index>& sizes) {
    for (const Index n : sizes) {
      values.emplace_back(Matrix::Zero(1, n));
      grads.emplace_back(Matrix::Zero(1, n));
    }
  }
  template <class F>
  void visit_parameters(F&& f) {
    for (std::size_t i = 0; i < values.size(); ++i) {
      f(std::string_view("p"), moet::ParamMap<float>(values[i].data(), 1, values[i].cols()),
        moet::ParamMap<float>(grads[i].data(), 1, grads[i].cols()));
    }
  }
};
}  // namespace

TEST_CASE("GradientReducer adds in rank order, the same bits on every rank, and rejects",
          "[mpi][gradients]") {
  const int rank = world_rank();
  const int ranks = world_size();
  moet::mpi::GradientReducer reducer(MPI_COMM_WORLD);
  // Values whose sum depends on the order of the additions: 1e8, then small terms.
  const auto value = [](int r, Index i) {
    return r == 0 ? 1e8f + static_cast<float>(i) : 3.0f + 0.25f * static_cast<float>(r + i % 7);
  };
  Params params({5, 0, 11, 1});  // 17 scalars: slices of 4 and 5 for 4 ranks
  for (auto& g : params.grads) {
    for (Index i = 0; i < g.cols(); ++i) g(0, i) = value(rank, i);
  }
  reducer.sum(params);
  for (auto& g : params.grads) {
    for (Index i = 0; i < g.cols(); ++i) {
      float expected = value(0, i);
      for (int r = 1; r < ranks; ++r) expected += value(r, i);
      CHECK(g(0, i) == expected);
    }
  }
  {
    INFO("the last rank has one scalar more");
    Params odd({5, rank == ranks - 1 ? 2 : 1});
    odd.grads[0](0, 0) = 42.0f;
    const std::string message = error_of([&] { reducer.sum(odd); });
    CAPTURE(message);
    CHECK(message.find("GradientReducer") != std::string::npos);
    CHECK(message.find("rank " + std::to_string(ranks - 1) + " has 2 gradient tensors of 7") !=
          std::string::npos);
    CHECK(same_on_every_rank(message));
    CHECK(odd.grads[0](0, 0) == 42.0f);  // nothing changed
  }
}
