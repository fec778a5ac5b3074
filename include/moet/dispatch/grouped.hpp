#pragma once
/// \file dispatch/grouped.hpp
/// `GroupedDispatch`: group assignments by expert, one matrix product per (expert, row block),
/// combine per token in slot order (ggml's `mul_mat_id` scheme). Also `add_dense_expert`, which
/// runs one expert on every token (shared experts).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "moet/concepts.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gather_scatter.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// The fast dispatcher. Per call:
///
/// 1. builds the expert-major view of the plan (`ExpertMajor`: each expert's tokens in token
///    order);
/// 2. splits every expert's rows into blocks of `Options::block_rows` (default 128) and runs
///    one task per (expert, block): gather the block's token rows into a contiguous
///    `(n, model_dim)` buffer, run the expert on it (one product per weight matrix), and write
///    the results into rows of a per-assignment output buffer `(num_assignments, model_dim)`
///    in expert-major order. An expert with no tokens creates no task; a hot expert creates
///    many, so a skewed load still keeps every thread busy;
/// 3. combines per token, in parallel over fixed token blocks:
///    `y_t = sum_j w_j * out[position(a_j)]` in slot order (the first slot assigns, later slots
///    add; `k = 0` gives `y_t = 0`).
///
/// The task split depends only on the plan and `block_rows`, never on the thread count, and
/// every per-thread buffer is aligned alike, so `y` is bit-identical for any number of threads.
/// It matches `ReferenceDispatch` to rounding (a row's product may round differently inside a
/// block than alone).
///
/// After a warm-up call, calls whose plan has no more assignments and no larger blocks do not
/// allocate (float banks on their packed kernels never do; Eigen's product, used by double banks
/// and by stale packed copies, may allocate for large shapes; see `GluExperts`).
///
/// ```cpp
/// moet::GroupedDispatch dispatch;
/// moet::GroupedDispatch::Workspace<decltype(experts)> ws;
/// dispatch.run(experts, x, routing, y, ws);
/// ```
class GroupedDispatch {
 public:
  /// Construction options.
  struct Options {
    /// Rows per expert task (>= 1). Larger blocks make bigger products; smaller ones balance
    /// a skewed load over more tasks. Results depend on it (to rounding), not on threads.
    Index block_rows = 128;
  };

  /// Tokens per combine task (fixed, independent of the thread count).
  static constexpr Index kCombineBlock = 64;

  /// One expert task: expert-major entries `[begin, end)` of `expert`.
  struct Task {
    std::int32_t expert = 0;
    Index begin = 0;
    Index end = 0;
  };

  /// Everything reused between calls; storage only grows.
  /// \tparam X the expert bank type.
  template <class X>
  struct Workspace {
    /// The plan grouped by expert.
    ExpertMajor view;
    /// Expert outputs, one row per assignment in expert-major order `(num_assignments,
    /// model_dim)`.
    detail::Buffer<typename X::Scalar> expert_out;
    /// The (expert, block) tasks of the current call (the first `num_tasks` entries).
    std::vector<Task> tasks;
    Index num_tasks = 0;
    /// Per-thread expert scratch and gather buffers, indexed by `detail::thread_id()`.
    std::vector<detail::ExpertThreadScratch<X>> threads;
  };

  /// Default options (128-row blocks).
  GroupedDispatch() = default;
  /// Throws `moet::Error` unless `options.block_rows >= 1`.
  explicit GroupedDispatch(const Options& options) : options_(options) {
    detail::require(options_.block_rows >= 1, "GroupedDispatch", "block_rows must be >= 1, got ",
                    options_.block_rows);
  }

  /// The options in use.
  const Options& options() const { return options_; }

  /// Writes `y[t] = sum over t's slots j of weights(t)[j] * experts(t)[j](x[t])`.
  ///
  /// Shapes: `x` `(num_tokens, model_dim)`, `y` `(num_tokens, model_dim)` (every row written),
  /// `routing` over `num_tokens` tokens and `experts.num_experts()` experts. Throws
  /// `moet::Error` naming `GroupedDispatch` and the shapes when they disagree, when `y`
  /// overlaps `x`, or when an expert id is out of range.
  ///
  /// \tparam X an expert bank (`Experts` concept).
  template <Experts X>
  void run(const X& experts, const ConstRows<typename X::Scalar>& x,
           const Routing<typename X::Scalar>& routing, Rows<typename X::Scalar> y,
           Workspace<X>& ws) const {
    detail::check_dispatch("GroupedDispatch", experts, x, routing, y);
    const Index num_tokens = x.rows();
    const Index model_dim = x.cols();
    if (num_tokens == 0) return;

    // 1. Group by expert and cut every expert's rows into fixed blocks.
    ws.view.build(routing);
    const Index block = options_.block_rows;
    Index num_tasks = 0;
    for (Index e = 0; e < ws.view.num_experts(); ++e) {
      num_tasks += (ws.view.load(e) + block - 1) / block;  // idle experts add no task
    }
    if (ws.tasks.size() < static_cast<std::size_t>(num_tasks)) {
      ws.tasks.resize(static_cast<std::size_t>(num_tasks));
    }
    ws.num_tasks = num_tasks;
    const auto offsets = ws.view.offsets();
    std::size_t next = 0;
    Index max_rows = 0;  // rows of the largest task
    for (Index e = 0; e < ws.view.num_experts(); ++e) {
      const Index end = offsets[static_cast<std::size_t>(e + 1)];
      for (Index begin = offsets[static_cast<std::size_t>(e)]; begin < end; begin += block) {
        const Index task_end = std::min(begin + block, end);
        ws.tasks[next++] = Task{static_cast<std::int32_t>(e), begin, task_end};
        max_rows = std::max(max_rows, task_end - begin);
      }
    }

    // 2. One task per (expert, block): gather, run, write per-assignment rows.
    detail::prepare_thread_scratch(experts, ws.threads, max_rows, /*gather=*/true,
                                   /*output=*/false);
    auto out = detail::aligned_matrix(ws.expert_out, routing.num_assignments(),
                                      model_dim);  // (num_assignments, model_dim)
    const auto tokens = ws.view.tokens();
    detail::parallel_for(num_tasks, [&](Index i) {
      const Task& task = ws.tasks[static_cast<std::size_t>(i)];
      auto& scratch = ws.threads[static_cast<std::size_t>(detail::thread_id())];
      const Index n = task.end - task.begin;
      auto in = detail::aligned_matrix(scratch.rows_in, n, model_dim);  // (n, model_dim)
      detail::gather_rows(
          x, tokens.subspan(static_cast<std::size_t>(task.begin), static_cast<std::size_t>(n)), in);
      experts.forward(task.expert, in, out.middleRows(task.begin, n), scratch.expert);
    });

    // 3. Combine per token in slot order.
    const auto position = ws.view.position();
    const auto weights = routing.weights();
    const auto token_offsets = routing.offsets();
    detail::parallel_blocks(num_tokens, kCombineBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        const auto first = static_cast<std::size_t>(token_offsets[static_cast<std::size_t>(t)]);
        const auto last = static_cast<std::size_t>(token_offsets[static_cast<std::size_t>(t + 1)]);
        if (first == last) {
          y.row(t).setZero();
          continue;
        }
        y.row(t) = weights[first] * out.row(position[first]);
        for (std::size_t a = first + 1; a < last; ++a) {
          y.row(t) += weights[a] * out.row(position[a]);
        }
      }
    });
  }

 private:
  Options options_{};
};

/// Workspace of `add_dense_expert`: per-thread expert scratch and output rows. Grow-only.
/// \tparam X the expert bank type.
template <class X>
struct DenseWorkspace {
  std::vector<detail::ExpertThreadScratch<X>> threads;
};

/// Rows per `add_dense_expert` task (fixed, independent of the thread count).
inline constexpr Index kDenseRowBlock = 128;

/// Runs expert `e` on every row of `x` and adds `weight * expert(x)` into `y`:
/// `y[t] += weight * E_e(x[t])` for every token. This is how shared experts (DeepSeekMoE) run:
/// every token passes through them with weight 1. Parallel over fixed row blocks of
/// `kDenseRowBlock`, so the result is bit-identical for any thread count.
///
/// Shapes: `x` `(num_tokens, model_dim)`, `y` `(num_tokens, model_dim)`. Throws `moet::Error`
/// naming `add_dense_expert` when the shapes disagree, `y` overlaps `x`, or `e` is out of range.
///
/// \tparam X an expert bank (`Experts` concept).
template <Experts X>
void add_dense_expert(const X& experts, Index e, typename X::Scalar weight,
                      const ConstRows<typename X::Scalar>& x, Rows<typename X::Scalar> y,
                      DenseWorkspace<X>& ws) {
  constexpr const char* kOp = "add_dense_expert";
  detail::require(e >= 0 && e < experts.num_experts(), kOp, "expert id ", e, " is outside [0, ",
                  experts.num_experts(), ")");
  detail::require(x.cols() == experts.model_dim(), kOp,
                  "x must have model_dim = ", experts.model_dim(), " columns, got (", x.rows(),
                  ", ", x.cols(), ")");
  detail::require(y.rows() == x.rows() && y.cols() == x.cols(), kOp, "y must have x's shape (",
                  x.rows(), ", ", x.cols(), "), got (", y.rows(), ", ", y.cols(), ")");
  detail::require(!detail::storage_overlaps(x, y), kOp, "y must not overlap x");
  detail::prepare_thread_scratch(experts, ws.threads, std::min(kDenseRowBlock, x.rows()),
                                 /*gather=*/false, /*output=*/true);
  const Index model_dim = x.cols();
  detail::parallel_blocks(x.rows(), kDenseRowBlock, [&](Index begin, Index end) {
    auto& scratch = ws.threads[static_cast<std::size_t>(detail::thread_id())];
    const Index n = end - begin;
    auto out = detail::aligned_matrix(scratch.rows_out, n, model_dim);  // (n, model_dim)
    experts.forward(e, x.middleRows(begin, n), out, scratch.expert);
    y.middleRows(begin, n) += weight * out;
  });
}

}  // namespace moet
