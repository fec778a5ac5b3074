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
#include <type_traits>
#include <utility>
#include <vector>

#include <mpi.h>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gather_scatter.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/select.hpp"
#include "moet/dispatch/dense.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/errors.hpp"
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

namespace detail {

using moet::detail::fail;
using moet::detail::require;

/// Throws `moet::Error` naming `op` and the MPI function when `code` is not `MPI_SUCCESS` (the
/// communicators moet uses return errors instead of aborting: `MPI_ERRORS_RETURN`).
inline void check_mpi(int code, const char* op, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(code, text, &length);
  fail(op, call, " failed: ", std::string(text, static_cast<std::size_t>(length)));
}

/// The MPI datatype of `S` (float or double).
template <class S>
MPI_Datatype datatype() {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>,
                "moet::mpi supports float and double scalars");
  if constexpr (std::is_same_v<S, float>) {
    return MPI_FLOAT;
  } else {
    return MPI_DOUBLE;
  }
}

/// Collective: every rank of `comm` passes its own outcome (`failure` empty when it is fine).
/// Returns when every rank is fine; otherwise every rank throws the same `moet::Error`, naming
/// `op`, the lowest failing rank and that rank's message. Ranks agree before any exchange, so
/// bad input on one rank never leaves the others waiting.
inline void agree(MPI_Comm comm, int rank, const char* op, const std::string& failure) {
  const int mine = failure.empty() ? INT_MAX : rank;
  int first = INT_MAX;
  check_mpi(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm), op, "MPI_Allreduce");
  if (first == INT_MAX) return;
  int length = rank == first ? static_cast<int>(std::min<std::size_t>(failure.size(), 4096)) : 0;
  check_mpi(MPI_Bcast(&length, 1, MPI_INT, first, comm), op, "MPI_Bcast");
  std::string message(static_cast<std::size_t>(length), '\0');
  if (rank == first) message.assign(failure, 0, static_cast<std::size_t>(length));
  check_mpi(MPI_Bcast(message.data(), length, MPI_CHAR, first, comm), op, "MPI_Bcast");
  fail(op, "rank ", first, " failed: ", message);
}

/// Runs `f()`, returning the message of any exception it throws (empty when none): the local
/// half of `agree`.
template <class F>
std::string outcome(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return {};
}

/// An element count as MPI's `int`, or a message naming `what` when it does not fit.
inline int mpi_count(Index n, const char* what, std::string& failure) {
  if (n > static_cast<Index>(INT_MAX) && failure.empty()) {
    failure = moet::detail::concat(what, " needs ", n, " elements in one MPI call, more than ",
                                   INT_MAX, " (MPI's int counts); use smaller batches");
  }
  return static_cast<int>(std::min<Index>(n, INT_MAX));
}

}  // namespace detail

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
/// Not yet: training (`forward_train`/`backward`), the gated shared experts
/// (`SharedExpertGate`) and the column split of decode (one token, fewer tasks than threads):
/// results are the same, the split only changes speed.
///
/// MPI: initialise with at least `MPI_THREAD_FUNNELED` (moet calls MPI from the calling thread
/// only, outside its parallel regions). The layer works on its own duplicate of the
/// communicator (`MPI_Comm_dup`, freed by the destructor unless MPI is already finalised), with
/// `MPI_ERRORS_RETURN`: a failed MPI call is a `moet::Error` naming the function. A process
/// that dies is MPI's business: Open MPI's `mpirun` then ends every process of the job.
///
/// \tparam G the gate (`Gate` concept), all experts.
/// \tparam X the expert bank (`Experts` concept) of this rank's experts.
template <Gate G, Experts X>
class ExpertParallelLayer {
  static_assert(std::is_same_v<typename G::Scalar, typename X::Scalar>,
                "ExpertParallelLayer needs the gate and the experts to use the same Scalar");

 public:
  using Scalar = typename X::Scalar;

  /// Construction options.
  struct Options {
    /// Rows per expert task; keep `GroupedDispatch`'s (128) for results equal to the
    /// single-process layer's.
    Index block_rows = 128;
  };

  /// Seconds spent in each part of the last `forward` on a workspace (`MPI_Wtime`).
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

  /// Everything one `forward` writes besides `y`; reuse it across calls (storage only grows).
  struct Workspace {
    Routing<Scalar> routing;
    ExpertMajor view;
    std::vector<int> send_loads, recv_loads;  // (num_ranks, max_count) expert loads
    std::vector<int> send_counts, send_displs, recv_counts, recv_displs;  // elements per rank
    moet::detail::Buffer<Scalar> send_rows, recv_rows, expert_out, returned;
    std::vector<Task> tasks;
    std::vector<moet::detail::ExpertThreadScratch<X>> threads;
    DenseWorkspace<X> shared;
    RoutingStats stats;
    Timings timings;
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
      : partition_(std::move(partition)),
        gate_(std::move(gate)),
        local_(std::move(local_experts)),
        shared_(std::move(shared_experts)),
        options_(options) {
    detail::check_mpi(MPI_Comm_dup(comm, &comm_), kOp, "MPI_Comm_dup");
    detail::check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), kOp,
                      "MPI_Comm_set_errhandler");
    detail::check_mpi(MPI_Comm_rank(comm_, &rank_), kOp, "MPI_Comm_rank");
    detail::check_mpi(MPI_Comm_size(comm_, &size_), kOp, "MPI_Comm_size");
    try {
      detail::agree(comm_, rank_, kOp, detail::outcome([&] { check_local(); }));
      // Every rank's partition and width, compared with rank 0's (the same verdict everywhere).
      std::vector<long long> mine;
      for (const Index c : partition_.counts()) mine.push_back(static_cast<long long>(c));
      mine.push_back(static_cast<long long>(gate_.model_dim()));
      std::vector<long long> all(mine.size() * static_cast<std::size_t>(size_));
      detail::check_mpi(
          MPI_Allgather(mine.data(), static_cast<int>(mine.size()), MPI_LONG_LONG, all.data(),
                        static_cast<int>(mine.size()), MPI_LONG_LONG, comm_),
          kOp, "MPI_Allgather");
      for (int r = 1; r < size_; ++r) {
        const auto* theirs = all.data() + static_cast<std::size_t>(r) * mine.size();
        moet::detail::require(
            std::equal(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(mine.size()), theirs),
            kOp, "rank ", r,
            "'s partition or model_dim differs from rank 0's: "
            "every rank must pass the same partition and gate width");
      }
    } catch (...) {
      free_comm();
      throw;
    }
  }

  ExpertParallelLayer(const ExpertParallelLayer&) = delete;
  ExpertParallelLayer& operator=(const ExpertParallelLayer&) = delete;
  ExpertParallelLayer(ExpertParallelLayer&& other) noexcept
      : partition_(std::move(other.partition_)),
        gate_(std::move(other.gate_)),
        local_(std::move(other.local_)),
        shared_(std::move(other.shared_)),
        options_(other.options_),
        comm_(std::exchange(other.comm_, MPI_COMM_NULL)),
        rank_(other.rank_),
        size_(other.size_) {}
  ExpertParallelLayer& operator=(ExpertParallelLayer&&) = delete;
  ~ExpertParallelLayer() { free_comm(); }

  /// Collective: runs the layer on this rank's `x` `(num_tokens, model_dim)` and writes `y`
  /// (every row; must not overlap `x`). Returns this rank's routing statistics (a reference to
  /// `ws.stats`). Throws on every rank the same `moet::Error` when any rank's input is bad (the
  /// checks of `MoELayer::forward`, the gate's own, a batch too large for MPI's int counts),
  /// naming the lowest such rank.
  const RoutingStats& forward(const ConstRows<Scalar>& x, Rows<Scalar> y, const RouteContext& ctx,
                              Workspace& ws) const {
    const Index d = model_dim();
    double t0 = MPI_Wtime();
    // 1. Check and route, then agree.
    std::string failure = detail::outcome([&] {
      moet::detail::check_rows_in_out(kOp, d, x, y);
      moet::detail::require(moet::detail::all_finite(x), kOp, "x (", x.rows(), ", ", x.cols(),
                            ") must be finite, found a NaN or Inf");
      gate_.route(x, ctx, ws.routing);
      moet::detail::require(ws.routing.num_experts() == partition_.num_experts(), kOp,
                            "the gate routed over ", ws.routing.num_experts(), " experts, not ",
                            partition_.num_experts());
      if (local_) moet::detail::check_experts_ready(*local_, /*training=*/false);
      if (shared_) moet::detail::check_experts_ready(*shared_, /*training=*/false);
      ws.view.build(ws.routing);
    });
    detail::agree(comm_, rank_, kOp, failure);
    double t1 = MPI_Wtime();
    ws.timings.route = t1 - t0;

    // 2. Expert loads to the experts' ranks.
    const Index width = partition_.max_count();
    const auto ranks = static_cast<std::size_t>(size_);
    ws.send_loads.assign(ranks * static_cast<std::size_t>(width), 0);
    ws.recv_loads.assign(ranks * static_cast<std::size_t>(width), 0);
    for (int r = 0; r < size_; ++r) {
      for (Index i = 0; i < partition_.count(r); ++i) {
        ws.send_loads[static_cast<std::size_t>(r) * static_cast<std::size_t>(width) +
                      static_cast<std::size_t>(i)] =
            detail::mpi_count(ws.view.load(partition_.first(r) + i), "an expert's load", failure);
      }
    }
    detail::check_mpi(MPI_Alltoall(ws.send_loads.data(), static_cast<int>(width), MPI_INT,
                                   ws.recv_loads.data(), static_cast<int>(width), MPI_INT, comm_),
                      kOp, "MPI_Alltoall");
    // Element counts and offsets of both exchanges; a batch past MPI's int counts fails on
    // every rank.
    ws.send_counts.assign(ranks, 0);
    ws.send_displs.assign(ranks, 0);
    ws.recv_counts.assign(ranks, 0);
    ws.recv_displs.assign(ranks, 0);
    const auto offsets = ws.view.offsets();
    Index received = 0;
    for (int r = 0; r < size_; ++r) {
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
    detail::agree(comm_, rank_, kOp, failure);
    double t2 = MPI_Wtime();
    ws.timings.counts = t2 - t1;

    // 3. The rows, grouped by expert in token order: the view's order, whose experts of one
    // rank are contiguous.
    const Index num_assignments = ws.routing.num_assignments();
    auto send = moet::detail::aligned_matrix(ws.send_rows, num_assignments, d);
    const auto tokens = ws.view.tokens();
    moet::detail::parallel_blocks(num_assignments, GroupedDispatch::kCombineBlock,
                                  [&](Index begin, Index end) {
                                    for (Index j = begin; j < end; ++j) {
                                      send.row(j) = x.row(tokens[static_cast<std::size_t>(j)]);
                                    }
                                  });
    auto recv = moet::detail::aligned_matrix(ws.recv_rows, received, d);
    const MPI_Datatype type = detail::datatype<Scalar>();
    detail::check_mpi(
        MPI_Alltoallv(send.data(), ws.send_counts.data(), ws.send_displs.data(), type, recv.data(),
                      ws.recv_counts.data(), ws.recv_displs.data(), type, comm_),
        kOp, "MPI_Alltoallv");
    double t3 = MPI_Wtime();
    ws.timings.rows = t3 - t2;

    // 4. This rank's experts: per source rank and expert, blocks of block_rows.
    auto out = moet::detail::aligned_matrix(ws.expert_out, received, d);
    if (received > 0) run_experts(recv, out, ws);
    double t4 = MPI_Wtime();
    ws.timings.experts = t4 - t3;

    // 5. The outputs back, in the order they were sent, then the combine.
    auto back = moet::detail::aligned_matrix(ws.returned, num_assignments, d);
    detail::check_mpi(
        MPI_Alltoallv(out.data(), ws.recv_counts.data(), ws.recv_displs.data(), type, back.data(),
                      ws.send_counts.data(), ws.send_displs.data(), type, comm_),
        kOp, "MPI_Alltoallv");
    double t5 = MPI_Wtime();
    ws.timings.back = t5 - t4;
    combine(ws.routing, ws.view, back, y);
    if (shared_) {
      for (Index s = 0; s < shared_->num_experts(); ++s) {
        add_dense_expert(*shared_, s, Scalar(1), x, y, ws.shared);
      }
    }
    compute_stats(ws.routing, ws.stats);
    ws.timings.combine = MPI_Wtime() - t5;
    return ws.stats;
  }

  /// The partition.
  const ExpertPartition& partition() const { return partition_; }
  /// This rank and the number of ranks.
  int rank() const { return rank_; }
  int num_ranks() const { return size_; }
  /// The gate (replicated).
  const G& gate() const { return gate_; }
  /// Whether this rank holds routed experts, and them.
  bool has_local_experts() const { return local_.has_value(); }
  const X& local_experts() const {
    moet::detail::require(local_.has_value(), kOp, "rank ", rank_, " holds no routed experts");
    return *local_;
  }
  /// Width of a token.
  Index model_dim() const { return static_cast<Index>(gate_.model_dim()); }
  /// Routed experts over all ranks.
  Index num_experts() const { return partition_.num_experts(); }

 private:
  static constexpr const char* kOp = "ExpertParallelLayer";

  void check_local() const {
    moet::detail::require(partition_.num_ranks() == size_, kOp, "the partition has ",
                          partition_.num_ranks(), " ranks but the communicator has ", size_);
    moet::detail::require(static_cast<Index>(gate_.num_experts()) == partition_.num_experts(), kOp,
                          "the gate routes to ", gate_.num_experts(),
                          " experts but the partition holds ", partition_.num_experts());
    moet::detail::require(options_.block_rows >= 1, kOp, "block_rows must be >= 1, got ",
                          options_.block_rows);
    const Index count = partition_.count(rank_);
    moet::detail::require(local_.has_value() == (count > 0), kOp, "rank ", rank_, " holds ", count,
                          " experts in the partition but was given ",
                          local_ ? "a bank" : "no bank");
    if (local_) {
      moet::detail::require(local_->num_experts() == count, kOp, "rank ", rank_, " holds ", count,
                            " experts in the partition but its bank has ", local_->num_experts());
      moet::detail::require(local_->model_dim() == model_dim(), kOp, "the experts' model_dim is ",
                            local_->model_dim(), " but the gate's is ", model_dim());
    }
    if (shared_) {
      moet::detail::require(shared_->model_dim() == model_dim(), kOp,
                            "the shared experts' model_dim is ", shared_->model_dim(),
                            " but the gate's is ", model_dim());
    }
  }

  // Step 4: one task per (source rank, local expert, block of block_rows rows), in parallel.
  template <class In, class Out>
  void run_experts(const In& recv, Out& out, Workspace& ws) const {
    const Index width = partition_.max_count();
    const Index count = partition_.count(rank_);
    const Index block = options_.block_rows;
    ws.tasks.clear();
    Index begin = 0;
    Index max_rows = 0;
    for (int s = 0; s < size_; ++s) {
      for (Index i = 0; i < count; ++i) {
        const Index load =
            ws.recv_loads[static_cast<std::size_t>(s) * static_cast<std::size_t>(width) +
                          static_cast<std::size_t>(i)];
        for (Index b = 0; b < load; b += block) {
          const Index n = std::min(block, load - b);
          ws.tasks.push_back(Task{i, begin + b, n});
          max_rows = std::max(max_rows, n);
        }
        begin += load;
      }
    }
    const X& experts = *local_;
    moet::detail::prepare_thread_scratch(experts, ws.threads, max_rows, /*gather=*/true,
                                         /*output=*/false);
    const Index d = model_dim();
    moet::detail::parallel_for(static_cast<Index>(ws.tasks.size()), [&](Index t) {
      const Task& task = ws.tasks[static_cast<std::size_t>(t)];
      auto& scratch = ws.threads[static_cast<std::size_t>(moet::detail::thread_id())];
      // The rows are copied into aligned scratch, as GroupedDispatch gathers them.
      auto in = moet::detail::aligned_matrix(scratch.rows_in, task.rows, d);  // (rows, d)
      in = recv.middleRows(task.begin, task.rows);
      experts.forward(task.expert, in, out.middleRows(task.begin, task.rows), scratch.expert);
    });
  }

  // Step 5: y_t = sum over t's slots, in slot order, of w_a * back[position(a)] (as
  // GroupedDispatch combines: the first slot assigns, later slots add, k = 0 gives 0).
  template <class Back>
  static void combine(const Routing<Scalar>& routing, const ExpertMajor& view, const Back& back,
                      Rows<Scalar>& y) {
    const auto position = view.position();
    const auto weights = routing.weights();
    const auto token_offsets = routing.offsets();
    moet::detail::parallel_blocks(
        routing.num_tokens(), GroupedDispatch::kCombineBlock, [&](Index begin, Index end) {
          for (Index t = begin; t < end; ++t) {
            const auto first = static_cast<std::size_t>(token_offsets[static_cast<std::size_t>(t)]);
            const auto last =
                static_cast<std::size_t>(token_offsets[static_cast<std::size_t>(t + 1)]);
            if (first == last) {
              y.row(t).setZero();
              continue;
            }
            y.row(t) = weights[first] * back.row(position[first]);
            for (std::size_t a = first + 1; a < last; ++a) {
              y.row(t) += weights[a] * back.row(position[a]);
            }
          }
        });
  }

  void free_comm() {
    if (comm_ == MPI_COMM_NULL) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }

  ExpertPartition partition_;
  G gate_;
  std::optional<X> local_;
  std::optional<X> shared_;
  Options options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace moet::mpi
