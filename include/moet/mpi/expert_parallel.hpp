#pragma once
/// \file mpi/expert_parallel.hpp
/// Expert parallelism over MPI (target `moet::mpi`, CMake option `MOET_WITH_MPI`): every rank
/// holds a slice of the routed experts and a replica of the gate; tokens travel to the rank
/// that holds their expert and back.
///
/// ```cpp
/// MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
/// const auto part = moet::mpi::ExpertPartition::even(8, world_size);   // experts per rank
/// moet::SwiGluExperts<float> local({.model_dim = 1024, .hidden_dim = 3584,
///                                   .num_experts = part.count(rank)});  // load this slice
/// moet::mpi::ExpertParallelLayer layer(MPI_COMM_WORLD, part, std::move(gate), std::move(local));
/// layer.forward(x, y, ctx, ws);   // collective: every rank calls it, with its own tokens
/// ```

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <mpi.h>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gather_scatter.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/param_names.hpp"
#include "moet/detail/select.hpp"
#include "moet/dispatch/backward_split.hpp"
#include "moet/dispatch/dense.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/dispatch/shared_gate.hpp"
#include "moet/errors.hpp"
#include "moet/mpi/common.hpp"
#include "moet/routing.hpp"
#include "moet/stats.hpp"
#include "moet/tensor.hpp"

namespace moet::mpi {

/// Which routed experts each rank holds: rank `r` holds the global experts
/// `[first(r), first(r) + count(r))`, after those of ranks `0 .. r - 1`. Any split is allowed,
/// uneven ones and ranks without experts included.
class ExpertPartition {
 public:
  /// `num_experts` experts over `num_ranks` ranks as evenly as possible: the first
  /// `num_experts % num_ranks` ranks hold one more; with more ranks than experts the last
  /// ranks hold none. Throws `moet::Error` unless `num_experts >= 1` and `num_ranks >= 1`.
  static ExpertPartition even(Index num_experts, int num_ranks) {
    detail::require(num_experts >= 1 && num_ranks >= 1, kOp,
                    "even needs num_experts >= 1 and num_ranks >= 1, got ", num_experts, " and ",
                    num_ranks);
    std::vector<Index> counts(static_cast<std::size_t>(num_ranks));
    for (int r = 0; r < num_ranks; ++r) {
      counts[static_cast<std::size_t>(r)] = num_experts / num_ranks + (r < num_experts % num_ranks);
    }
    return ExpertPartition(std::move(counts));
  }

  /// Rank `r` holds `counts[r]` experts. Throws `moet::Error` unless there is at least one
  /// rank, every count is >= 0 and the counts sum to at least 1.
  explicit ExpertPartition(std::vector<Index> counts) : counts_(std::move(counts)) {
    detail::require(!counts_.empty(), kOp, "needs at least one rank");
    first_.assign(counts_.size() + 1, 0);
    for (std::size_t r = 0; r < counts_.size(); ++r) {
      detail::require(counts_[r] >= 0, kOp, "rank ", r, " holds ", counts_[r],
                      " experts; counts must be >= 0");
      first_[r + 1] = first_[r] + counts_[r];
    }
    detail::require(first_.back() >= 1, kOp, "the ranks hold no expert at all");
  }

  /// Ranks.
  int num_ranks() const { return static_cast<int>(counts_.size()); }
  /// Routed experts over all ranks.
  Index num_experts() const { return first_.back(); }
  /// The first global expert of `rank`.
  Index first(int rank) const { return first_[checked(rank)]; }
  /// Experts `rank` holds (0 allowed).
  Index count(int rank) const { return counts_[checked(rank)]; }
  /// The most experts any rank holds.
  Index max_count() const { return *std::max_element(counts_.begin(), counts_.end()); }
  /// The rank that holds global expert `e`. Throws `moet::Error` when `e` is out of range.
  int owner(Index e) const {
    detail::require(e >= 0 && e < num_experts(), kOp, "expert ", e, " is outside [0, ",
                    num_experts(), ")");
    const auto it = std::upper_bound(first_.begin(), first_.end(), e);
    return static_cast<int>(it - first_.begin()) - 1;
  }
  /// Experts per rank.
  std::span<const Index> counts() const { return counts_; }

  friend bool operator==(const ExpertPartition&, const ExpertPartition&) = default;

 private:
  static constexpr const char* kOp = "ExpertPartition";
  std::size_t checked(int rank) const {
    detail::require(rank >= 0 && rank < num_ranks(), kOp, "rank ", rank, " is outside [0, ",
                    num_ranks(), ")");
    return static_cast<std::size_t>(rank);
  }
  std::vector<Index> counts_;
  std::vector<Index> first_;
};

/// A Mixture-of-Experts layer whose routed experts are spread over the ranks of an MPI
/// communicator (expert parallelism, as DeepSpeed-MoE, Tutel and Megatron do on NCCL).
/// Every rank holds the whole gate (replicated), its slice of the routed experts
/// (`ExpertPartition`), and optionally the shared experts (replicated). `forward` is
/// collective: every rank calls it with its own tokens (any number, 0 included), and
///
/// 1. checks its input and routes its tokens with the gate; the ranks then agree on a status
///    (`MPI_Allreduce`), so bad input on one rank makes every rank throw the same
///    `moet::Error` naming that rank, before any exchange;
/// 2. sends each expert's load to the expert's rank (`MPI_Alltoall`, one count per expert);
/// 3. sends every routed row to the rank of its expert (`MPI_Alltoallv`), grouped by expert, in
///    token order;
/// 4. runs its experts on what it received: per source rank and expert, in blocks of
///    `block_rows` rows, as `GroupedDispatch` cuts that rank's rows;
/// 5. returns the outputs (`MPI_Alltoallv`) and combines them per token in slot order; the
///    shared experts run locally.
///
/// **Equal to the single-process layer, bit for bit**: each rank's `y` is what
/// `MoELayer<G, X, GroupedDispatch>` with all experts (same weights, same `block_rows`) gives
/// for that rank's tokens, for any number of ranks, any partition and any thread count. The
/// gate routes each rank's batch on its own, so gates that look at the whole batch (expert
/// choice, a capacity limit) see the rank's batch, as the single-process layer would see it.
///
/// **Training** (`forward_train`, `backward`, collective like `forward`): the rows' output
/// gradients travel to the experts' ranks with the rows' layout, each rank runs its experts'
/// backward (each expert's gradient summed over its source ranks in rank order, each one's
/// blocks in order; split into thread-count-independent pieces as the single-process backward
/// is, dispatch/backward_split.hpp), and the input gradients come back. What equals what, bit for
/// bit:
/// - each rank's `y` and `dx` equal the single-process layer's `forward_train` and `backward`
///   on that rank's tokens;
/// - each routed expert's gradients, on the rank that holds it, equal a single-process layer's
///   after `zero_grad()` and then `forward_train` + `backward` on rank 0's batch, rank 1's,
///   ... in rank order (gradient accumulation over the ranks' batches);
/// - the replicated parameters (gate, shared experts) get each rank's own gradient; sum them
///   with `GradientReducer` (mpi/gradients.hpp) over `replicated_parameters()`, which adds
///   them in rank order: then every rank holds the same bits, the sum in rank order of the
///   single-process gradients of each rank's batch.
/// Auxiliary losses are each rank's own (its `ws.routing`). A gate's training-forward hook
/// (`TopAnyGate`'s recording for DynMoE's expert updates) sees the rank's own tokens: each
/// replica records its own batch, and the replicas' recordings are not combined (yet), so
/// do not run the adaptive expert updates across ranks.
///
/// Shared experts may be gated per token (`SharedExpertGate`, Qwen2-MoE): the gate is
/// replicated with them, runs locally, and its gradient is reduced with theirs.
///
/// Not yet: the column split of decode (one token, fewer tasks than threads): results are the
/// same, the split only changes speed.
///
/// MPI: initialise with at least `MPI_THREAD_FUNNELED` (moet calls MPI from the calling thread
/// only, outside its parallel regions). The layer works on its own duplicate of the
/// communicator (`Communicator`), with `MPI_ERRORS_RETURN`: a failed MPI call is a
/// `moet::Error` naming the function. A process that dies is MPI's business: Open MPI's
/// `mpirun` then ends every process of the job; a rank that stops calling the layer's
/// collectives (an exception the program does not handle collectively) leaves the others
/// waiting in their next collective.
///
/// \tparam G the gate (`Gate` concept), all experts.
/// \tparam X the expert bank (`Experts` concept) of this rank's experts.
template <Gate G, Experts X>
class ExpertParallelLayer {
  static_assert(std::is_same_v<typename G::Scalar, typename X::Scalar>,
                "ExpertParallelLayer needs the gate and the experts to use the same Scalar");

 public:
  using Scalar = typename X::Scalar;
  using GateType = G;
  using ExpertsType = X;
  /// The loss-gradient inputs of the gate's backward (`NoLossGrad` for gates without).
  using LossGrad = LossGradOf<G>;

  /// Construction options.
  struct Options {
    /// Rows per expert task; keep `GroupedDispatch`'s (128) for results equal to the
    /// single-process layer's.
    Index block_rows = 128;
  };

  /// Seconds spent in each part of the last `forward` or `forward_train` on a workspace
  /// (`MPI_Wtime`).
  struct Timings {
    double route = 0;    ///< checks, routing, the status agreement
    double counts = 0;   ///< the count exchange
    double rows = 0;     ///< gathering and sending the rows
    double experts = 0;  ///< this rank's experts on the rows it received
    double back = 0;     ///< returning the expert outputs
    double combine = 0;  ///< the combine and the shared experts
  };

  /// One expert task: rows `[begin, begin + rows)` of the received buffer for local expert
  /// `expert`.
  struct Task {
    Index expert = 0;
    Index begin = 0;
    Index rows = 0;
  };

  /// Everything one call writes besides `y` (and `dx`); reuse it across calls (storage only
  /// grows: a call with no more tokens on this rank, and no more rows received from each rank
  /// for each local expert, than an earlier one allocates nothing). Between
  /// `forward_train` and `backward` it holds the received rows, the experts' caches and the
  /// returned outputs.
  struct Workspace {
    Routing<Scalar> routing;
    ExpertMajor view;
    std::vector<int> send_loads, recv_loads;  // (num_ranks, max_count) expert loads
    std::vector<int> send_counts, send_displs, recv_counts, recv_displs;  // elements per rank
    moet::detail::Buffer<Scalar> send_rows, recv_rows, expert_out, returned;
    Index received = 0;  // rows received from all ranks
    std::vector<Task> tasks;
    std::vector<moet::detail::ExpertThreadScratch<X>> threads;
    DenseWorkspace<X> shared;
    GatedSharedWorkspace<X> gated_shared;
    RoutingStats stats;
    Timings timings;
    // Training only.
    moet::detail::Buffer<Scalar> cache, recv_dout, expert_din, din_back, d_weights;
    std::vector<Index> active;  // local experts with rows
    moet::detail::BackwardSplitWorkspace<X> split;  // the split backward's buffers
    Index train_tokens = -1;    // tokens of the last forward_train, -1 after a forward
  };

  /// Collective over `comm`. `local_experts` holds this rank's `partition.count(rank)`
  /// experts (global experts `first(rank) ...`), none when the count is 0; `shared_experts`
  /// (optional) are replicated. Every rank throws the same `moet::Error` when any rank's
  /// arguments disagree: the partition's ranks and the communicator's size, the gate's
  /// `num_experts` and the partition's, a local bank of the wrong size or `model_dim`, or
  /// partitions or `model_dim` that differ between ranks.
  ExpertParallelLayer(MPI_Comm comm, ExpertPartition partition, G gate,
                      std::optional<X> local_experts, std::optional<X> shared_experts = {},
                      Options options = {})
      : ExpertParallelLayer(comm, std::move(partition), std::move(gate), std::move(local_experts),
                            std::move(shared_experts), std::nullopt, options) {}

  /// As above, with shared experts whose summed output is scaled per token by `shared_gate`
  /// (replicated, as `MoELayer`'s gated shared experts); also throws when its `model_dim`
  /// differs from the gate's.
  ExpertParallelLayer(MPI_Comm comm, ExpertPartition partition, G gate,
                      std::optional<X> local_experts, X shared_experts,
                      SharedExpertGate<Scalar> shared_gate, Options options = {})
      : ExpertParallelLayer(comm, std::move(partition), std::move(gate), std::move(local_experts),
                            std::optional<X>(std::move(shared_experts)),
                            std::optional<SharedExpertGate<Scalar>>(std::move(shared_gate)),
                            options) {}

 private:
  ExpertParallelLayer(MPI_Comm comm, ExpertPartition partition, G gate,
                      std::optional<X> local_experts, std::optional<X> shared_experts,
                      std::optional<SharedExpertGate<Scalar>> shared_gate, Options options)
      : partition_(std::move(partition)),
        gate_(std::move(gate)),
        local_(std::move(local_experts)),
        shared_(std::move(shared_experts)),
        shared_gate_(std::move(shared_gate)),
        options_(options),
        comm_(comm, kOp) {
    detail::agree(comm_.get(), rank(), kOp, detail::outcome([&] { check_local(); }));
    // Every rank's partition and width, compared with rank 0's (the same verdict everywhere).
    std::vector<long long> mine;
    for (const Index c : partition_.counts()) mine.push_back(static_cast<long long>(c));
    mine.push_back(static_cast<long long>(gate_.model_dim()));
    mine.push_back(shared_ ? static_cast<long long>(shared_->num_experts()) : -1LL);
    mine.push_back(shared_gate_ ? 1LL : 0LL);
    std::vector<long long> all(mine.size() * static_cast<std::size_t>(num_ranks()));
    detail::check_mpi(
        MPI_Allgather(mine.data(), static_cast<int>(mine.size()), MPI_LONG_LONG, all.data(),
                      static_cast<int>(mine.size()), MPI_LONG_LONG, comm_.get()),
        kOp, "MPI_Allgather");
    for (int r = 1; r < num_ranks(); ++r) {
      const auto* theirs = all.data() + static_cast<std::size_t>(r) * mine.size();
      moet::detail::require(
          std::equal(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(mine.size()), theirs),
          kOp, "rank ", r,
          "'s partition, model_dim or shared experts differ from rank 0's: every rank must "
          "pass the same partition, gate width, shared experts and shared-expert gate");
    }
  }

 public:
  /// Collective: runs the layer on this rank's `x` `(num_tokens, model_dim)` and writes `y`
  /// (every row; must not overlap `x`). Returns this rank's routing statistics (a reference to
  /// `ws.stats`). Throws on every rank the same `moet::Error` when any rank's input is bad (the
  /// checks of `MoELayer::forward`, the gate's own, a batch too large for MPI's int counts),
  /// naming the lowest such rank.
  const RoutingStats& forward(const ConstRows<Scalar>& x, Rows<Scalar> y, const RouteContext& ctx,
                              Workspace& ws) const {
    ws.train_tokens = -1;
    route_and_send(x, y, ctx, ws, /*training=*/false, [&] {});
    double t3 = MPI_Wtime();
    auto out = ws.expert_out.matrix(ws.received, model_dim());
    if (ws.received > 0) {
      run_local(ws, /*output=*/false, [&](const Task& task, const auto& in, auto& scratch) {
        local_->forward(task.expert, in, out.middleRows(task.begin, task.rows), scratch);
      });
    }
    return finish_forward(y, ws, t3, [&] {
      moet::detail::add_shared_experts(shared_, shared_gate_, x, y, ws.shared, ws.gated_shared);
    });
  }

  // --- training -------------------------------------------------------------------------

  /// Collective training forward: `forward`, keeping what `backward` needs in `ws` (this
  /// rank's received rows, its experts' caches, the returned outputs; see the class comment
  /// for what equals what). Calls the gate's `on_training_forward(x, routing)` hook when it has
  /// one, on this rank's tokens. Not `const`; throws like `forward`, and on every rank when a
  /// bank is inference-only.
  const RoutingStats& forward_train(const ConstRows<Scalar>& x, Rows<Scalar> y,
                                    const RouteContext& ctx,
                                    Workspace& ws) requires TrainableExperts<X> {
    ws.train_tokens = -1;
    route_and_send(x, y, ctx, ws, /*training=*/true, [&] {
      if constexpr (HookCheck<G>::kTrainingForward) gate_.on_training_forward(x, ws.routing);
    });
    double t3 = MPI_Wtime();
    const Index d = model_dim();
    auto out = ws.expert_out.matrix(ws.received, d);
    if (ws.received > 0) {
      auto cache = ws.cache.matrix(ws.received, local_->cache_width());
      run_local(ws, /*output=*/false, [&](const Task& task, const auto& in, auto& scratch) {
        local_->forward_train(task.expert, in, out.middleRows(task.begin, task.rows),
                              cache.middleRows(task.begin, task.rows), scratch);
      });
    }
    const RoutingStats& stats = finish_forward(y, ws, t3, [&] {
      moet::detail::add_shared_experts_train(shared_, shared_gate_, x, y, ws.shared,
                                             ws.gated_shared);
    });
    ws.train_tokens = x.rows();
    return stats;
  }

  /// Collective backward of the `forward_train` that filled `ws` (same `x` and `ctx`, nothing
  /// else run on `ws` in between), given this rank's `dy` = dL/dy and the gate's
  /// `loss_grad`. **Writes** `dx` and **accumulates** the gradients of the gate, this rank's
  /// routed experts (for the rows of every rank) and the shared experts, in `MoELayer::backward`'s
  /// order: the routed input gradients, then the gate's term, then the shared experts'.
  /// Throws on every rank the same `moet::Error` when any rank's call is bad (no
  /// `forward_train` of `x.rows()` tokens on `ws`, wrong shapes, `dx` overlapping `x` or `dy`,
  /// the gate's own checks), naming the lowest such rank.
  void backward(const ConstRows<Scalar>& x, const ConstRows<Scalar>& dy, const RouteContext& ctx,
                Workspace& ws, Rows<Scalar> dx,
                const LossGrad& loss_grad = {}) requires TrainableGate<G> && TrainableExperts<X> {
    const Index d = model_dim();
    const auto num_assignments = ws.routing.num_assignments();
    std::span<Scalar> d_weights(ws.d_weights.data(num_assignments),
                                static_cast<std::size_t>(num_assignments));
    auto send = ws.send_rows.matrix(num_assignments, d);
    // 1. Checks, the combine weights' gradients and the rows' output gradients, then agree.
    detail::agree(comm_.get(), rank(), kOp, detail::outcome([&] {
                    moet::detail::require(x.cols() == d, kOp, "x must have model_dim = ", d,
                                          " columns, got (", x.rows(), ", ", x.cols(), ")");
                    moet::detail::require(
                        ws.train_tokens >= 0 && ws.train_tokens == x.rows(), kOp,
                        "backward needs a forward_train of the same x on this workspace first "
                        "(it saw ",
                        ws.train_tokens, " tokens, x has ", x.rows(), ")");
                    moet::detail::require(dy.rows() == x.rows() && dy.cols() == d, kOp,
                                          "dy must have x's shape (", x.rows(), ", ", d, "), got (",
                                          dy.rows(), ", ", dy.cols(), ")");
                    moet::detail::require(dx.rows() == x.rows() && dx.cols() == d, kOp,
                                          "dx must have x's shape (", x.rows(), ", ", d, "), got (",
                                          dx.rows(), ", ", dx.cols(), ")");
                    moet::detail::require(!moet::detail::storage_overlaps(x, dx) &&
                                              !moet::detail::storage_overlaps(dy, dx),
                                          kOp, "dx must not overlap x or dy");
                    const auto back = ws.returned.matrix(num_assignments, d);
                    moet::detail::combine_weight_grads(ws.routing, ws.view, back, dy, d_weights);
                    const auto tokens = ws.view.tokens();
                    const auto assignments = ws.view.assignments();
                    const auto weights = ws.routing.weights();
                    moet::detail::parallel_blocks(
                        num_assignments, moet::detail::kCombineBlock, [&](Index b, Index e) {
                          for (Index j = b; j < e; ++j) {
                            const auto i = static_cast<std::size_t>(j);
                            send.row(j) = weights[static_cast<std::size_t>(assignments[i])] *
                                          dy.row(tokens[i]);
                          }
                        });
                  }));
    // 2. The output gradients to the experts' ranks, with the rows' layout.
    const MPI_Datatype type = detail::datatype<Scalar>();
    auto dout = ws.recv_dout.matrix(ws.received, d);
    detail::check_mpi(
        MPI_Alltoallv(send.data(), ws.send_counts.data(), ws.send_displs.data(), type, dout.data(),
                      ws.recv_counts.data(), ws.recv_displs.data(), type, comm_.get()),
        kOp, "MPI_Alltoallv");
    // 3. This rank's experts: every expert's gradient over its source ranks in order, each
    // one's blocks in order (GroupedDispatch's order within each source rank's rows).
    auto din = ws.expert_din.matrix(ws.received, d);
    if (ws.received > 0) backward_local(dout, din, ws);
    // 4. The input gradients back, combined per token in slot order; then the gate and the
    // shared experts, as MoELayer::backward.
    auto din_back = ws.din_back.matrix(num_assignments, d);
    detail::check_mpi(MPI_Alltoallv(din.data(), ws.recv_counts.data(), ws.recv_displs.data(), type,
                                    din_back.data(), ws.send_counts.data(), ws.send_displs.data(),
                                    type, comm_.get()),
                      kOp, "MPI_Alltoallv");
    detail::agree(
        comm_.get(), rank(), kOp, detail::outcome([&] {
          moet::detail::combine_unweighted(ws.routing, ws.view, din_back, dx);
          gate_.backward(x, ctx, ws.routing, std::span<const Scalar>(d_weights), loss_grad, dx);
          moet::detail::backward_shared_experts(shared_, shared_gate_, x, dy, dx, ws.shared,
                                                ws.gated_shared);
        }));
  }

  /// The combine-weight gradients of the last `backward` on `ws` (one per assignment, routing
  /// order).
  std::span<const Scalar> weight_grads(const Workspace& ws) const {
    return {ws.d_weights.data(), static_cast<std::size_t>(ws.routing.num_assignments())};
  }

  /// Sets this rank's gradients (gate, local experts, shared experts and their gate) to zero.
  /// Local.
  void zero_grad() requires TrainableGate<G> && TrainableExperts<X> {
    gate_.zero_grad();
    if (local_) local_->zero_grad();
    if (shared_) shared_->zero_grad();
    if (shared_gate_) shared_gate_->zero_grad();
  }

  /// Calls `f(name, value, grad)` for this rank's parameters: the gate's (`gate.`), the local
  /// experts' (`experts.`, this rank's slice), the shared experts' (`shared.`) and their
  /// gate's (`shared_gate.weight`), as `MoELayer` names them. For the
  /// optimisers of train/optim.hpp, after the replicated gradients are summed
  /// (`GradientReducer`). Local.
  template <class F>
  void visit_parameters(F&& f) requires TrainableGate<G> && TrainableExperts<X> {
    visit(f, /*local=*/true);
  }

  /// Calls `f(name, value, grad)` for the replicated parameters only: the gate's, the shared
  /// experts' and their gate's, as `visit_parameters` names them. Local.
  template <class F>
  void visit_replicated_parameters(F&& f) requires TrainableGate<G> && TrainableExperts<X> {
    visit(f, /*local=*/false);
  }

  /// The replicated parameters as a module of their own (`visit_parameters` visits them):
  /// what `GradientReducer::sum` reduces in a data- plus expert-parallel step.
  struct ReplicatedParameters {
    using Scalar = typename ExpertParallelLayer::Scalar;
    ExpertParallelLayer* layer;
    template <class F>
    void visit_parameters(F&& f) {
      layer->visit_replicated_parameters(std::forward<F>(f));
    }
  };
  ReplicatedParameters replicated_parameters() { return {this}; }

  /// Tells the gate and the banks that their parameters changed in place (the optimisers call
  /// this after a step). Local.
  void parameters_changed() {
    notify_parameters_changed(gate_);
    if (local_) notify_parameters_changed(*local_);
    if (shared_) notify_parameters_changed(*shared_);
  }

  /// The partition.
  const ExpertPartition& partition() const { return partition_; }
  /// This rank and the number of ranks.
  int rank() const { return comm_.rank(); }
  int num_ranks() const { return comm_.size(); }
  /// The gate (replicated).
  const G& gate() const { return gate_; }
  G& gate() { return gate_; }
  /// Whether this rank holds routed experts, and them.
  bool has_local_experts() const { return local_.has_value(); }
  const X& local_experts() const {
    moet::detail::require(local_.has_value(), kOp, "rank ", rank(), " holds no routed experts");
    return *local_;
  }
  X& local_experts() {
    moet::detail::require(local_.has_value(), kOp, "rank ", rank(), " holds no routed experts");
    return *local_;
  }
  /// Whether the layer has shared experts, and them (replicated).
  bool has_shared_experts() const { return shared_.has_value(); }
  const X& shared_experts() const {
    moet::detail::require(shared_.has_value(), kOp, "this layer has no shared experts");
    return *shared_;
  }
  X& shared_experts() {
    moet::detail::require(shared_.has_value(), kOp, "this layer has no shared experts");
    return *shared_;
  }
  /// Whether the shared experts are gated (`SharedExpertGate`), and the gate (replicated).
  bool has_shared_gate() const { return shared_gate_.has_value(); }
  const SharedExpertGate<Scalar>& shared_gate() const {
    moet::detail::require(shared_gate_.has_value(), kOp, "this layer has no shared-expert gate");
    return *shared_gate_;
  }
  SharedExpertGate<Scalar>& shared_gate() {
    moet::detail::require(shared_gate_.has_value(), kOp, "this layer has no shared-expert gate");
    return *shared_gate_;
  }
  /// Width of a token.
  Index model_dim() const { return static_cast<Index>(gate_.model_dim()); }
  /// Routed experts over all ranks.
  Index num_experts() const { return partition_.num_experts(); }

 private:
  static constexpr const char* kOp = "ExpertParallelLayer";

  template <class F>
  void visit(F& f, bool local) {
    moet::detail::ParamNamer namer;  // no allocation: an optimiser step stays off the heap
    const auto prefixed = [&](std::string_view prefix) {
      return moet::detail::prefixed_visitor<Scalar>(f, namer, prefix);
    };
    gate_.visit_parameters(prefixed("gate."));
    if (local && local_) local_->visit_parameters(prefixed("experts."));
    if (shared_) shared_->visit_parameters(prefixed("shared."));
    if (shared_gate_) shared_gate_->visit_parameters(prefixed("shared_gate."));
  }

  void check_local() const {
    moet::detail::require(partition_.num_ranks() == num_ranks(), kOp, "the partition has ",
                          partition_.num_ranks(), " ranks but the communicator has ", num_ranks());
    moet::detail::require(static_cast<Index>(gate_.num_experts()) == partition_.num_experts(), kOp,
                          "the gate routes to ", gate_.num_experts(),
                          " experts but the partition holds ", partition_.num_experts());
    moet::detail::require(options_.block_rows >= 1, kOp, "block_rows must be >= 1, got ",
                          options_.block_rows);
    const Index count = partition_.count(rank());
    moet::detail::require(local_.has_value() == (count > 0), kOp, "rank ", rank(), " holds ", count,
                          " experts in the partition but was given ",
                          local_ ? "a bank" : "no bank");
    if (local_) {
      moet::detail::require(local_->num_experts() == count, kOp, "rank ", rank(), " holds ", count,
                            " experts in the partition but its bank has ", local_->num_experts());
      moet::detail::require(local_->model_dim() == model_dim(), kOp, "the experts' model_dim is ",
                            local_->model_dim(), " but the gate's is ", model_dim());
    }
    if (shared_) {
      moet::detail::require(shared_->model_dim() == model_dim(), kOp,
                            "the shared experts' model_dim is ", shared_->model_dim(),
                            " but the gate's is ", model_dim());
    }
    if (shared_gate_) {
      moet::detail::require(shared_gate_->model_dim() == model_dim(), kOp,
                            "the shared-expert gate's model_dim is ", shared_gate_->model_dim(),
                            " but the gate's is ", model_dim());
    }
  }

  // Steps 1-3 of forward and forward_train: check, route (then `hook()`), agree, exchange the
  // loads and the rows; fills ws.recv_rows (ws.received rows), ws.tasks and the timings.
  template <class Hook>
  void route_and_send(const ConstRows<Scalar>& x, const Rows<Scalar>& y, const RouteContext& ctx,
                      Workspace& ws, bool training, Hook&& hook) const {
    const Index d = model_dim();
    double t0 = MPI_Wtime();
    // 1. Check and route, then agree.
    std::string failure = detail::outcome([&] {
      moet::detail::check_rows_in_out(kOp, d, x, y);
      moet::detail::require(moet::detail::all_finite(x), kOp, "x (", x.rows(), ", ", x.cols(),
                            ") must be finite, found a NaN or Inf");
      if (local_) moet::detail::check_experts_ready(*local_, training);
      if (shared_) moet::detail::check_experts_ready(*shared_, training);
      gate_.route(x, ctx, ws.routing);
      moet::detail::require(ws.routing.num_experts() == partition_.num_experts(), kOp,
                            "the gate routed over ", ws.routing.num_experts(), " experts, not ",
                            partition_.num_experts());
      hook();
      ws.view.build(ws.routing);
    });
    detail::agree(comm_.get(), rank(), kOp, failure);
    double t1 = MPI_Wtime();
    ws.timings.route = t1 - t0;

    // 2. Expert loads to the experts' ranks.
    const int ranks = num_ranks();
    const Index width = partition_.max_count();
    const auto r_count = static_cast<std::size_t>(ranks);
    ws.send_loads.assign(r_count * static_cast<std::size_t>(width), 0);
    ws.recv_loads.assign(r_count * static_cast<std::size_t>(width), 0);
    for (int r = 0; r < ranks; ++r) {
      for (Index i = 0; i < partition_.count(r); ++i) {
        ws.send_loads[static_cast<std::size_t>(r) * static_cast<std::size_t>(width) +
                      static_cast<std::size_t>(i)] =
            detail::mpi_count(ws.view.load(partition_.first(r) + i), "an expert's load", failure);
      }
    }
    detail::check_mpi(
        MPI_Alltoall(ws.send_loads.data(), static_cast<int>(width), MPI_INT, ws.recv_loads.data(),
                     static_cast<int>(width), MPI_INT, comm_.get()),
        kOp, "MPI_Alltoall");
    // Element counts and offsets of both exchanges; a batch past MPI's int counts fails on
    // every rank.
    ws.send_counts.assign(r_count, 0);
    ws.send_displs.assign(r_count, 0);
    ws.recv_counts.assign(r_count, 0);
    ws.recv_displs.assign(r_count, 0);
    const auto offsets = ws.view.offsets();
    Index received = 0;
    for (int r = 0; r < ranks; ++r) {
      const auto ri = static_cast<std::size_t>(r);
      const Index begin = offsets[static_cast<std::size_t>(partition_.first(r))];
      const Index end =
          offsets[static_cast<std::size_t>(partition_.first(r) + partition_.count(r))];
      ws.send_counts[ri] = detail::mpi_count((end - begin) * d, "the row exchange", failure);
      ws.send_displs[ri] = detail::mpi_count(begin * d, "the row exchange", failure);
      Index rows = 0;
      for (Index i = 0; i < width; ++i) {
        rows += ws.recv_loads[ri * static_cast<std::size_t>(width) + static_cast<std::size_t>(i)];
      }
      ws.recv_counts[ri] = detail::mpi_count(rows * d, "the row exchange", failure);
      ws.recv_displs[ri] = detail::mpi_count(received * d, "the row exchange", failure);
      received += rows;
    }
    detail::mpi_count(received * d, "the row exchange", failure);
    detail::agree(comm_.get(), rank(), kOp, failure);
    ws.received = received;
    plan_tasks(ws);
    double t2 = MPI_Wtime();
    ws.timings.counts = t2 - t1;

    // 3. The rows, grouped by expert in token order: the view's order, whose experts of one
    // rank are contiguous.
    const Index num_assignments = ws.routing.num_assignments();
    auto send = ws.send_rows.matrix(num_assignments, d);
    const auto tokens = ws.view.tokens();
    moet::detail::parallel_blocks(num_assignments, moet::detail::kCombineBlock,
                                  [&](Index begin, Index end) {
                                    for (Index j = begin; j < end; ++j) {
                                      send.row(j) = x.row(tokens[static_cast<std::size_t>(j)]);
                                    }
                                  });
    auto recv = ws.recv_rows.matrix(received, d);
    const MPI_Datatype type = detail::datatype<Scalar>();
    detail::check_mpi(
        MPI_Alltoallv(send.data(), ws.send_counts.data(), ws.send_displs.data(), type, recv.data(),
                      ws.recv_counts.data(), ws.recv_displs.data(), type, comm_.get()),
        kOp, "MPI_Alltoallv");
    ws.timings.rows = MPI_Wtime() - t2;
  }

  // Steps 5 of forward and forward_train: the outputs back, the combine, then `shared()`.
  template <class Shared>
  const RoutingStats& finish_forward(Rows<Scalar>& y, Workspace& ws, double t3,
                                     Shared&& shared) const {
    const Index d = model_dim();
    double t4 = MPI_Wtime();
    ws.timings.experts = t4 - t3;
    auto out = ws.expert_out.matrix(ws.received, d);
    auto back = ws.returned.matrix(ws.routing.num_assignments(), d);
    const MPI_Datatype type = detail::datatype<Scalar>();
    detail::check_mpi(
        MPI_Alltoallv(out.data(), ws.recv_counts.data(), ws.recv_displs.data(), type, back.data(),
                      ws.send_counts.data(), ws.send_displs.data(), type, comm_.get()),
        kOp, "MPI_Alltoallv");
    double t5 = MPI_Wtime();
    ws.timings.back = t5 - t4;
    moet::detail::combine_weighted(ws.routing, ws.view, back, y);
    shared();
    compute_stats(ws.routing, ws.stats);
    ws.timings.combine = MPI_Wtime() - t5;
    return ws.stats;
  }

  // The tasks of this rank's experts: per (source rank, local expert, block of block_rows
  // rows), in that order, over the received rows.
  void plan_tasks(Workspace& ws) const {
    const Index width = partition_.max_count();
    const Index count = partition_.count(rank());
    const Index block = options_.block_rows;
    ws.tasks.clear();
    Index begin = 0;
    for (int s = 0; s < num_ranks(); ++s) {
      for (Index i = 0; i < count; ++i) {
        const Index load =
            ws.recv_loads[static_cast<std::size_t>(s) * static_cast<std::size_t>(width) +
                          static_cast<std::size_t>(i)];
        for (Index b = 0; b < load; b += block) {
          ws.tasks.push_back(Task{i, begin + b, std::min(block, load - b)});
        }
        begin += load;
      }
    }
  }

  // Step 4: every task in parallel; `f(task, in, scratch)` with the task's received rows
  // copied into aligned scratch, as GroupedDispatch gathers them.
  template <class F>
  void run_local(Workspace& ws, bool output, F&& f) const {
    Index max_rows = 0;
    for (const Task& task : ws.tasks) max_rows = std::max(max_rows, task.rows);
    moet::detail::prepare_thread_scratch(*local_, ws.threads, max_rows, /*gather=*/true, output);
    const Index d = model_dim();
    const auto recv = ws.recv_rows.matrix(ws.received, d);
    moet::detail::parallel_for(static_cast<Index>(ws.tasks.size()), [&](Index t) {
      const Task& task = ws.tasks[static_cast<std::size_t>(t)];
      auto& scratch = ws.threads[static_cast<std::size_t>(moet::detail::thread_id())];
      auto in = moet::detail::aligned_matrix(scratch.rows_in, task.rows, d);  // (rows, d)
      in = recv.middleRows(task.begin, task.rows);
      f(task, in, scratch.expert);
    });
  }

  // Backward step 3: the local experts' backward over the received rows, every expert's
  // gradient summed over its tasks in order (source ranks in rank order, blocks in order):
  // split into thread-count-independent pieces (dispatch/backward_split.hpp, the tasks as row
  // pieces) when the bank can, else one task per local expert with rows.
  template <class Dout, class Din>
  void backward_local(const Dout& dout, Din& din, Workspace& ws) {
    const Index count = partition_.count(rank());
    Index max_rows = 0;
    for (const Task& task : ws.tasks) max_rows = std::max(max_rows, task.rows);
    X& experts = *local_;
    moet::detail::prepare_thread_scratch(experts, ws.threads, max_rows, /*gather=*/true,
                                         /*output=*/true);
    if constexpr (HookCheck<X>::kEnsureGrad) experts.ensure_grad();
    const Index d = model_dim();
    const auto recv = ws.recv_rows.matrix(ws.received, d);
    const auto cache = ws.cache.matrix(ws.received, experts.cache_width());
    if constexpr (HookCheck<X>::kBackwardSplit) {
      // As many pieces as any plan of as many rows can have: a block per `block_rows` rows,
      // plus a partial one per (source rank, local expert).
      const Index block = options_.block_rows;
      const Index max_pieces =
          (ws.received + block - 1) / block +
          std::min(ws.received, static_cast<Index>(num_ranks()) * std::max<Index>(count, 1));
      auto& pieces = ws.split.row_pieces;
      pieces.reserve(static_cast<std::size_t>(max_pieces));
      pieces.clear();
      for (const Task& task : ws.tasks) pieces.push_back({task.expert, task.begin, task.rows});
      const auto fill = [&](Index begin, Index n, auto&& in, auto&& grad) {
        in = recv.middleRows(begin, n);
        grad = dout.middleRows(begin, n);
      };
      if (moet::detail::split_backward_pieces(experts, ws.received, max_pieces, block,
                                              ConstRows<Scalar>(cache), Rows<Scalar>(din), ws.split,
                                              ws.threads, fill)) {
        return;
      }
    }
    ws.active.clear();
    for (Index i = 0; i < count; ++i) {
      for (const Task& task : ws.tasks) {
        if (task.expert == i) {
          ws.active.push_back(i);
          break;
        }
      }
    }
    moet::detail::parallel_for(static_cast<Index>(ws.active.size()), [&](Index a) {
      const Index e = ws.active[static_cast<std::size_t>(a)];
      auto& scratch = ws.threads[static_cast<std::size_t>(moet::detail::thread_id())];
      for (const Task& task : ws.tasks) {
        if (task.expert != e) continue;
        const Index n = task.rows;
        auto in = moet::detail::aligned_matrix(scratch.rows_in, n, d);     // (n, d)
        auto grad = moet::detail::aligned_matrix(scratch.rows_out, n, d);  // (n, d)
        in = recv.middleRows(task.begin, n);
        grad = dout.middleRows(task.begin, n);
        experts.backward(e, in, cache.middleRows(task.begin, n), grad,
                         din.middleRows(task.begin, n), scratch.expert);
      }
    });
  }

  ExpertPartition partition_;
  G gate_;
  std::optional<X> local_;
  std::optional<X> shared_;
  std::optional<SharedExpertGate<Scalar>> shared_gate_;
  Options options_;
  Communicator comm_;
};

}  // namespace moet::mpi
