#pragma once
/// \file dispatch/grouped.hpp
/// `GroupedDispatch`: group assignments by expert, one matrix product per (expert, row block),
/// combine per token in slot order (ggml's `mul_mat_id` scheme). Shared experts, which see every
/// token, run through dispatch/dense.hpp.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "moet/concepts.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gather_scatter.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/dispatch/backward_split.hpp"
#include "moet/dispatch/column_split.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

namespace detail {

/// Tokens per combine task (fixed, independent of the thread count).
inline constexpr Index kCombineBlock = 64;

/// `y_t = sum over t's slots, in slot order, of the row term(a)` of each assignment `a`: the
/// first slot assigns, later slots add, a token routed nowhere gets 0. Parallel over fixed
/// blocks of `kCombineBlock` tokens: the same bits for any thread count.
template <class S, class Term>
void combine_slots(const Routing<S>& routing, Rows<S>& y, Term&& term) {
  const auto token_offsets = routing.offsets();
  parallel_blocks(routing.num_tokens(), kCombineBlock, [&](Index begin, Index end) {
    for (Index t = begin; t < end; ++t) {
      const auto first = static_cast<std::size_t>(token_offsets[static_cast<std::size_t>(t)]);
      const auto last = static_cast<std::size_t>(token_offsets[static_cast<std::size_t>(t + 1)]);
      if (first == last) {
        y.row(t).setZero();
        continue;
      }
      y.row(t) = term(first);
      for (std::size_t a = first + 1; a < last; ++a) y.row(t) += term(a);
    }
  });
}

/// The combine of an expert-major dispatch: `y_t = sum over t's slots of w_a *
/// out[position(a)]`, slot order; `out` holds one row per assignment in `view`'s order.
template <class S, class Out>
void combine_weighted(const Routing<S>& routing, const ExpertMajor& view, const Out& out,
                      Rows<S> y) {
  const auto position = view.position();
  const auto weights = routing.weights();
  combine_slots(routing, y, [&](std::size_t a) { return weights[a] * out.row(position[a]); });
}

/// `y_t = sum over t's slots of rows[position(a)]` (unweighted), slot order: the input
/// gradients of an expert-major backward.
template <class S, class In>
void combine_unweighted(const Routing<S>& routing, const ExpertMajor& view, const In& rows,
                        Rows<S> y) {
  const auto position = view.position();
  combine_slots(routing, y, [&](std::size_t a) { return rows.row(position[a]); });
}

/// The combine weights' gradients: `d_weights[a] = dy_t · out[position(a)]` for every
/// assignment `a` of token `t` (routing order), a scalar loop over the columns (the same bits
/// wherever the rows sit), parallel over fixed token blocks.
template <class S, class Out>
void combine_weight_grads(const Routing<S>& routing, const ExpertMajor& view, const Out& out,
                          const ConstRows<S>& dy, std::span<S> d_weights) {
  const auto position = view.position();
  const auto token_offsets = routing.offsets();
  const Index model_dim = dy.cols();
  parallel_blocks(routing.num_tokens(), kCombineBlock, [&](Index begin, Index end) {
    for (Index t = begin; t < end; ++t) {
      for (Index a = token_offsets[static_cast<std::size_t>(t)];
           a < token_offsets[static_cast<std::size_t>(t + 1)]; ++a) {
        const S* o = out.row(position[static_cast<std::size_t>(a)]).data();
        S dot = S(0);
        for (Index c = 0; c < model_dim; ++c) dot += dy(t, c) * o[c];
        d_weights[static_cast<std::size_t>(a)] = dot;
      }
    }
  });
}

}  // namespace detail

/// The fast dispatcher. Per call:
///
/// 1. builds the expert-major view of the plan (`ExpertMajor`: each expert's tokens in token
///    order);
/// 2. splits every expert's rows into blocks of `Options::block_rows` (default 128) and runs
///    one task per (expert, block): gather the block's token rows into a contiguous
///    `(n, model_dim)` buffer, run the expert on it (one product per weight matrix), and write
///    the results into rows of a per-assignment output buffer `(num_assignments, model_dim)`
///    in expert-major order. An expert with no tokens creates no task; a hot expert creates
///    many, so a skewed load still keeps every thread busy. With fewer tasks than threads
///    (decode: one token, k experts) and a bank with the staged forward (`ColumnSplitHook`),
///    each task's columns are cut between the threads instead: all hidden-activation pieces,
///    then all output pieces (dispatch/column_split.hpp), so top-1 decode streams its expert's
///    weights on every core;
/// 3. combines per token, in parallel over fixed token blocks:
///    `y_t = sum_j w_j * out[position(a_j)]` in slot order (the first slot assigns, later slots
///    add; `k = 0` gives `y_t = 0`).
///
/// The row split depends only on the plan and `block_rows`, never on the thread count; the
/// column split depends on the thread count but changes no element's bits (each is one chain
/// over the whole depth in every piece); every per-thread buffer is aligned alike. So `y` is
/// bit-identical for any number of threads.
/// It matches `ReferenceDispatch` to rounding (a row's product may round differently inside a
/// block than alone).
///
/// After a warm-up call, calls whose plan has no more assignments and no larger blocks do not
/// allocate (float banks on their packed kernels never do; Eigen's product, used by double banks
/// and by stale packed copies, may allocate for large shapes; see `GluExperts`).
///
/// Training: `forward_train` is `run` keeping every assignment's expert output and expert
/// cache in the workspace; `backward` computes the combine-weight gradients, runs the experts'
/// backward (in thread-count-independent pieces, dispatch/backward_split.hpp, or one task per
/// expert with tokens for banks without that hook: deterministic weight gradients either way)
/// and combines the input gradients per token in slot order. dispatch/dense.hpp's
/// `add_dense_experts_train` / `backward_dense_experts` do the same for shared experts.
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
  static constexpr Index kCombineBlock = detail::kCombineBlock;

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
    /// The hidden activations of every assignment, expert-major `(num_assignments,
    /// hidden_dim)`, when the experts' columns are split between threads (fewer tasks than
    /// threads; see `run`).
    detail::Buffer<typename X::Scalar> hidden;
    /// Per-thread expert scratch and gather buffers, indexed by `detail::thread_id()`.
    std::vector<detail::ExpertThreadScratch<X>> threads;
    /// Training only (`forward_train`): every assignment's expert cache, expert-major
    /// `(num_assignments, experts.cache_width())`; `expert_out` is kept for `backward`.
    detail::Buffer<typename X::Scalar> cache;
    /// Training only (`backward`): every assignment's dL/d(expert input), expert-major
    /// `(num_assignments, model_dim)`.
    detail::Buffer<typename X::Scalar> expert_din;
    /// Training only: the experts with at least one assignment.
    std::vector<std::int32_t> active;
    /// Training only: the split backward's buffers (dispatch/backward_split.hpp).
    detail::BackwardSplitWorkspace<X> split;
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
    const Index max_rows = plan_tasks(routing, ws);

    // 2. One task per (expert, block): gather, run, write per-assignment rows.
    detail::prepare_thread_scratch(experts, ws.threads, max_rows, /*gather=*/true,
                                   /*output=*/false);
    auto out = detail::aligned_matrix(ws.expert_out, routing.num_assignments(),
                                      model_dim);  // (num_assignments, model_dim)
    if (!run_split(experts, x, out, ws)) {
      for_each_task(x, ws, [&](const Task& task, const auto& in, auto& scratch) {
        experts.forward(task.expert, in, out.middleRows(task.begin, in.rows()), scratch);
      });
    }

    // 3. Combine per token in slot order.
    detail::combine_weighted(routing, ws.view, out, y);
  }

  // --- training -------------------------------------------------------------------------

  /// `run`, keeping what `backward` needs in `ws`: every assignment's expert output
  /// (`ws.expert_out`) and expert cache (`ws.cache`, `experts.cache_width()` scalars per
  /// assignment), both expert-major. Same tasks, same combine and same checks as `run`
  /// (errors name `GroupedDispatch`); the experts run `forward_train` instead of `forward`.
  ///
  /// \tparam X a trainable expert bank (`TrainableExperts` concept).
  template <TrainableExperts X>
  void forward_train(const X& experts, const ConstRows<typename X::Scalar>& x,
                     const Routing<typename X::Scalar>& routing, Rows<typename X::Scalar> y,
                     Workspace<X>& ws) const {
    detail::check_dispatch("GroupedDispatch", experts, x, routing, y, /*training=*/true);
    const Index num_tokens = x.rows();
    const Index model_dim = x.cols();
    if (num_tokens == 0) return;
    const Index max_rows = plan_tasks(routing, ws);
    detail::prepare_thread_scratch(experts, ws.threads, max_rows, /*gather=*/true,
                                   /*output=*/false);
    auto out = ws.expert_out.matrix(routing.num_assignments(),
                                    model_dim);  // (num_assignments, model_dim)
    auto cache = ws.cache.matrix(routing.num_assignments(),
                                 experts.cache_width());  // (num_assignments, cache_width)
    for_each_task(x, ws, [&](const Task& task, const auto& in, auto& scratch) {
      const Index n = in.rows();
      experts.forward_train(task.expert, in, out.middleRows(task.begin, n),
                            cache.middleRows(task.begin, n), scratch);
    });
    detail::combine_weighted(routing, ws.view, out, y);
  }

  /// Backward of `forward_train` (same `experts`, `x`, `routing` and `ws`, nothing run on `ws`
  /// in between), given `dy` = dL/dy `(num_tokens, model_dim)`:
  ///
  /// 1. writes `d_weights[a] = dy_t · out_a` for every assignment `a` (routing order), the
  ///    gradient of the combine weights (a scalar loop: the same bits wherever the rows sit);
  /// 2. runs the experts' backward on the rows `x_t` with `dout = w_a dy_t`: for a bank with the
  ///    split backward that can run it now (`BackwardSplitHook`: float banks with current
  ///    packed weights), in pieces that fill every core however few experts have rows
  ///    (dispatch/backward_split.hpp: row blocks of `block_rows`, then slices of every weight
  ///    gradient, each element one sum over the expert's rows in order); otherwise one task per
  ///    expert with tokens over its rows in blocks of `block_rows`, **in order**, calling
  ///    `experts.backward` (parallelism bounded by the number of experts with tokens). Either
  ///    way every gradient sum runs in a fixed order: bit-identical for any thread count;
  /// 3. **writes** `dx_t = sum over t's slots, in slot order, of din_a` (0 for `k = 0`).
  ///
  /// Throws `moet::Error` naming `GroupedDispatch` when the shapes disagree (`dy`, `dx` of `x`'s
  /// shape, `d_weights` one per assignment), `dx` overlaps `x` or `dy`, or `ws` does not hold
  /// a `forward_train` of this plan.
  template <TrainableExperts X>
  void backward(X& experts, const ConstRows<typename X::Scalar>& x,
                const Routing<typename X::Scalar>& routing, const ConstRows<typename X::Scalar>& dy,
                Workspace<X>& ws, std::span<typename X::Scalar> d_weights,
                Rows<typename X::Scalar> dx) const {
    constexpr const char* kOp = "GroupedDispatch";
    detail::check_dispatch(kOp, experts, x, routing, dx, /*training=*/true);
    detail::require(dy.rows() == x.rows() && dy.cols() == x.cols(), kOp, "dy must have x's shape (",
                    x.rows(), ", ", x.cols(), "), got (", dy.rows(), ", ", dy.cols(), ")");
    detail::require(!detail::storage_overlaps(dy, dx), kOp, "dx must not overlap dy");
    detail::require(static_cast<Index>(d_weights.size()) == routing.num_assignments(), kOp,
                    "d_weights must hold one value per assignment (", routing.num_assignments(),
                    "), got ", d_weights.size());
    const Index num_tokens = x.rows();
    const Index model_dim = x.cols();
    if (num_tokens == 0) return;
    const Index num_assignments = routing.num_assignments();
    detail::require(ws.view.num_experts() == routing.num_experts() &&
                        static_cast<Index>(ws.view.tokens().size()) == num_assignments &&
                        ws.expert_out.capacity() >= num_assignments * model_dim &&
                        ws.cache.capacity() >= num_assignments * experts.cache_width(),
                    kOp, "backward needs the workspace of a forward_train of this plan");
    // Views of the buffers forward_train wrote. They start at offset 0 (not `aligned_matrix`,
    // whose offset depends on the storage address): a copied workspace reads the same rows.
    auto out = ws.expert_out.matrix(num_assignments, model_dim);
    auto cache = ws.cache.matrix(num_assignments, experts.cache_width());
    auto din = detail::aligned_matrix(ws.expert_din, num_assignments, model_dim);

    // 1. Combine-weight gradients, token-major.
    detail::combine_weight_grads(routing, ws.view, out, dy, d_weights);
    const auto weights = routing.weights();

    // 2. The experts' backward: split, or one task per expert with tokens, its blocks in order.
    ws.active.clear();
    Index max_rows = 0;
    for (Index e = 0; e < ws.view.num_experts(); ++e) {
      if (ws.view.load(e) > 0) {
        ws.active.push_back(static_cast<std::int32_t>(e));
        max_rows = std::max(max_rows, std::min(ws.view.load(e), options_.block_rows));
      }
    }
    detail::prepare_thread_scratch(experts, ws.threads, max_rows, /*gather=*/true,
                                   /*output=*/true);
    if constexpr (HookCheck<X>::kEnsureGrad) experts.ensure_grad();
    const auto offsets = ws.view.offsets();
    const auto tokens = ws.view.tokens();
    const auto assignments = ws.view.assignments();
    const Index block = options_.block_rows;
    const auto gather = [&](Index begin, Index n, auto&& in, auto&& dout) {
      for (Index r = 0; r < n; ++r) {
        const auto j = static_cast<std::size_t>(begin + r);
        in.row(r) = x.row(tokens[j]);
        dout.row(r) = weights[static_cast<std::size_t>(assignments[j])] * dy.row(tokens[j]);
      }
    };
    if (detail::split_backward(experts, offsets, ws.active, block,
                               ConstRows<typename X::Scalar>(cache), din, ws.split, ws.threads,
                               gather)) {
      detail::combine_unweighted(routing, ws.view, din, dx);
      return;
    }
    detail::parallel_for(static_cast<Index>(ws.active.size()), [&](Index i) {
      const std::int32_t e = ws.active[static_cast<std::size_t>(i)];
      auto& scratch = ws.threads[static_cast<std::size_t>(detail::thread_id())];
      const Index end = offsets[static_cast<std::size_t>(e) + 1];
      for (Index begin = offsets[static_cast<std::size_t>(e)]; begin < end; begin += block) {
        const Index n = std::min(block, end - begin);
        auto in = detail::aligned_matrix(scratch.rows_in, n, model_dim);     // (n, model_dim)
        auto dout = detail::aligned_matrix(scratch.rows_out, n, model_dim);  // (n, model_dim)
        gather(begin, n, in, dout);
        experts.backward(e, in, cache.middleRows(begin, n), dout, din.middleRows(begin, n),
                         scratch.expert);
      }
    });

    // 3. Input gradients per token, in slot order.
    detail::combine_unweighted(routing, ws.view, din, dx);
  }

 private:
  // Step 2 of `run` when there are fewer tasks than threads (decode, or a few experts with few
  // rows) and the bank has the staged forward: dispatch/column_split.hpp. Returns false, having
  // done nothing, when it does not apply.
  template <class X, class Out>
  static bool run_split(const X& experts, const ConstRows<typename X::Scalar>& x, Out& out,
                        Workspace<X>& ws) {
    const auto tokens = ws.view.tokens();
    const Index model_dim = x.cols();
    return detail::split_columns(
        experts, ws.num_tasks, static_cast<Index>(tokens.size()), ws.hidden, ws.threads,
        [&](Index i) {
          const Task& task = ws.tasks[static_cast<std::size_t>(i)];
          return detail::SplitTask{task.expert, task.begin, task.end - task.begin};
        },
        [&](Index i, auto& scratch) {
          const Task& task = ws.tasks[static_cast<std::size_t>(i)];
          const Index n = task.end - task.begin;
          auto in = detail::aligned_matrix(scratch.rows_in, n, model_dim);  // (n, model_dim)
          detail::gather_rows(
              x, tokens.subspan(static_cast<std::size_t>(task.begin), static_cast<std::size_t>(n)),
              in);
          return in;
        },
        out);
  }

  // Step 1 of `run`: fills ws.view and ws.tasks (one per (expert, block); idle experts add
  // none) for `routing`; returns the largest task's rows.
  template <class X>
  Index plan_tasks(const Routing<typename X::Scalar>& routing, Workspace<X>& ws) const {
    ws.view.build(routing);
    const Index block = options_.block_rows;
    Index num_tasks = 0;
    for (Index e = 0; e < ws.view.num_experts(); ++e) {
      num_tasks += (ws.view.load(e) + block - 1) / block;
    }
    const auto offsets = ws.view.offsets();
    // Sized for any routing of this many assignments (sum of ceil(load / block) is at most
    // assignments / block + experts), so that a routing change between steps (the router
    // trained) never grows it.
    const Index bound = offsets.back() / block + ws.view.num_experts();
    if (ws.tasks.size() < static_cast<std::size_t>(bound)) {
      ws.tasks.resize(static_cast<std::size_t>(bound));
    }
    ws.num_tasks = num_tasks;
    std::size_t next = 0;
    Index max_rows = 0;
    for (Index e = 0; e < ws.view.num_experts(); ++e) {
      const Index end = offsets[static_cast<std::size_t>(e + 1)];
      for (Index begin = offsets[static_cast<std::size_t>(e)]; begin < end; begin += block) {
        const Index task_end = std::min(begin + block, end);
        ws.tasks[next++] = Task{static_cast<std::int32_t>(e), begin, task_end};
        max_rows = std::max(max_rows, task_end - begin);
      }
    }
    return max_rows;
  }

  // Step 2 of `run` and `forward_train`: one task per (expert, block), in parallel; `f(task,
  // in, scratch)` runs the task's expert on its rows of `x` gathered into `in` `(n, model_dim)`
  // with the thread's expert scratch.
  template <class X, class F>
  static void for_each_task(const ConstRows<typename X::Scalar>& x, Workspace<X>& ws, F&& f) {
    const Index model_dim = x.cols();
    const auto tokens = ws.view.tokens();
    detail::parallel_for(ws.num_tasks, [&](Index i) {
      const Task& task = ws.tasks[static_cast<std::size_t>(i)];
      auto& scratch = ws.threads[static_cast<std::size_t>(detail::thread_id())];
      const Index n = task.end - task.begin;
      auto in = detail::aligned_matrix(scratch.rows_in, n, model_dim);  // (n, model_dim)
      detail::gather_rows(
          x, tokens.subspan(static_cast<std::size_t>(task.begin), static_cast<std::size_t>(n)), in);
      f(task, in, scratch.expert);
    });
  }

  Options options_{};
};

}  // namespace moet
