#pragma once
/// \file dispatch/column_split.hpp
/// Few tasks, many threads: one expert's columns shared between threads. When a call has fewer
/// (expert, row block) tasks than threads (decode: one token through k experts, or one shared
/// expert), task parallelism leaves cores idle while one core streams an expert's weights. A
/// bank with the staged forward (`ColumnSplitHook`) lets the dispatchers cut every task's
/// columns instead: all pieces of the hidden stage, then all pieces of the output stage. Each
/// element stays one chain over the whole depth in every piece, so the bits are those of the
/// unsplit `forward` for any thread count.

#include <cstddef>
#include <vector>

#include "moet/concepts.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gather_scatter.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/tensor.hpp"

namespace moet::detail {

/// One task of `split_columns`: expert `expert` on `rows` rows, which sit at rows
/// `[row, row + rows)` of the hidden and output buffers.
struct SplitTask {
  Index expert = 0;
  Index row = 0;
  Index rows = 0;
};

/// Runs `num_tasks` expert tasks (`task_of(i)`, a `SplitTask`) with their columns split
/// between the threads when there are fewer tasks than threads and `experts` has the staged
/// forward: every task is cut into `ceil(threads / num_tasks)` pieces of column panels; the
/// threads run every piece of stage 0 (the input rows `input_of(i, scratch)` `(rows,
/// model_dim)`, a view or a gather into the thread's `ExpertThreadScratch`, into `hidden`'s
/// rows), then every piece of stage 1 (into `out`'s rows). `hidden` grows to `(num_rows,
/// hidden_dim)`; `threads` must be prepared (`prepare_thread_scratch`) for the largest task.
/// Returns false, having done nothing, when the tasks already fill the threads or the bank
/// cannot split now (then the caller runs its tasks whole).
template <class X, class TaskOf, class InputOf, class Out>
bool split_columns(const X& experts, Index num_tasks, Index num_rows,
                   Buffer<typename X::Scalar>& hidden, std::vector<ExpertThreadScratch<X>>& threads,
                   TaskOf&& task_of, InputOf&& input_of, Out& out) {
  if constexpr (!HookCheck<X>::kColumnSplit) {
    return false;
  } else {
    const Index num_threads = max_threads();
    if (num_tasks == 0 || num_tasks >= num_threads) return false;
    const Index stage_panels[2] = {experts.stage_panels(0), experts.stage_panels(1)};
    if (stage_panels[0] < 2 || stage_panels[1] < 2) return false;
    const Index pieces = (num_threads + num_tasks - 1) / num_tasks;   // per task
    auto h = aligned_matrix(hidden, num_rows, experts.hidden_dim());  // (num_rows, hidden_dim)
    for (int stage = 0; stage < 2; ++stage) {
      parallel_for(num_tasks * pieces, [&](Index i) {
        const SplitTask task = task_of(i / pieces);
        const Index piece = i % pieces;
        const Index panels = stage_panels[stage];
        const PanelRange range{piece * panels / pieces, (piece + 1) * panels / pieces};
        auto& scratch = threads[static_cast<std::size_t>(thread_id())];
        if (stage == 0) {
          experts.forward_stage(0, task.expert, input_of(i / pieces, scratch),
                                h.middleRows(task.row, task.rows), range, scratch.expert);
        } else {
          experts.forward_stage(1, task.expert, h.middleRows(task.row, task.rows),
                                out.middleRows(task.row, task.rows), range, scratch.expert);
        }
      });
    }
    return true;
  }
}

}  // namespace moet::detail
