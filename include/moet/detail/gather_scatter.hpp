#pragma once
/// \file detail/gather_scatter.hpp
/// Internals shared by the dispatchers and the expert banks: aligned views into grow-only
/// scratch, per-thread scratch sets, row gathers, the argument checks every dispatcher runs
/// before its parallel region, and the banks' weight initialisation.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "moet/concepts.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/rng.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet::detail {

/// Alignment of every scratch matrix the dispatchers and experts write into. Every per-thread
/// buffer starts on the same boundary (64 bytes covers SSE, AVX and AVX-512 packets), so
/// Eigen's vectorised loops split an elementwise operation the same way whichever thread runs
/// the task: results stay bit-identical for any thread count even on `-march=native` builds.
inline constexpr std::size_t kScratchAlignBytes = 64;

/// Fills `w` with independent normals of standard deviation `1 / sqrt(fan_in)`, drawn in
/// row-major order from `Rng(seed)` (the expert banks' weight initialisation).
template <class S>
void fill_normal_fan_in(RowMatrix<S>& w, Index fan_in, std::uint64_t seed) {
  Rng rng(seed);
  const double scale = 1.0 / std::sqrt(static_cast<double>(fan_in));
  S* data = w.data();
  for (Index i = 0; i < w.size(); ++i) data[i] = static_cast<S>(rng.normal() * scale);
}

/// Elements of padding `aligned_matrix` may skip to reach the alignment boundary.
template <class T>
inline constexpr Index kAlignPad = static_cast<Index>(kScratchAlignBytes / sizeof(T));

/// Grows `buffer` so that `aligned_matrix(buffer, rows, cols)` fits without allocating.
template <class T>
void reserve_aligned(Buffer<T>& buffer, Index rows, Index cols) {
  buffer.reserve(rows * cols + kAlignPad<T>);
}

/// A `(rows, cols)` row-major view into `buffer` whose first element is `kScratchAlignBytes`
/// aligned (the buffer grows when needed). Contents unspecified; the view is invalidated when
/// `buffer` grows.
template <class T>
Eigen::Map<RowMatrix<T>> aligned_matrix(Buffer<T>& buffer, Index rows, Index cols) {
  static_assert(kScratchAlignBytes % sizeof(T) == 0, "scratch elements must divide 64 bytes");
  T* base = buffer.data(rows * cols + kAlignPad<T>);
  const std::size_t misalign = reinterpret_cast<std::uintptr_t>(base) % kScratchAlignBytes;
  const std::size_t offset = misalign == 0 ? 0 : (kScratchAlignBytes - misalign) / sizeof(T);
  return Eigen::Map<RowMatrix<T>>(base + offset, rows, cols);
}

/// What one thread needs to run an expert on a block of rows: the expert's own scratch, the
/// gathered input rows and the expert's output rows.
template <class X>
struct ExpertThreadScratch {
  typename X::Scratch expert{};
  Buffer<typename X::Scalar> rows_in;
  Buffer<typename X::Scalar> rows_out;
};

/// Grows `per_thread` so that every thread of the next parallel region (and the calling thread,
/// when the caller already runs inside a parallel region) has its own entry. Call before the
/// region; entries are indexed by `thread_id()`.
template <class T>
void size_per_thread(std::vector<T>& per_thread) {
  const auto need = static_cast<std::size_t>(std::max(max_threads(), thread_id() + 1));
  if (per_thread.size() < need) per_thread.resize(need);
}

/// Sizes `per_thread` (see `size_per_thread`) and grows every entry for blocks of up to
/// `max_rows` rows: gathered inputs (`gather`), output rows (`output`) and the expert's own
/// scratch (through `experts.reserve(scratch, max_rows)` when the bank has it). Done before the
/// region because a dynamic schedule gives each thread different blocks on every call: this
/// way a call whose blocks are no larger than an earlier call's never allocates, whichever
/// thread runs which block.
template <class X>
void prepare_thread_scratch(const X& experts, std::vector<ExpertThreadScratch<X>>& per_thread,
                            Index max_rows, bool gather, bool output) {
  size_per_thread(per_thread);
  const Index model_dim = experts.model_dim();
  for (auto& scratch : per_thread) {
    if (gather) reserve_aligned(scratch.rows_in, max_rows, model_dim);
    if (output) reserve_aligned(scratch.rows_out, max_rows, model_dim);
    if constexpr (HookCheck<X>::kReserve) experts.reserve(scratch.expert, max_rows);
  }
}

/// Copies rows `tokens[i]` of `x` into row `i` of `out` `(tokens.size(), model_dim)`.
template <class S, class Out>
void gather_rows(const ConstRows<S>& x, std::span<const std::int32_t> tokens, Out&& out) {
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    out.row(static_cast<Index>(i)) = x.row(tokens[i]);
  }
}

/// True when the storage of `a` and `b` overlaps (empty matrices overlap nothing).
template <class A, class B>
bool storage_overlaps(const A& a, const B& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  using T = typename A::Scalar;
  const T* a_begin = a.data();
  const T* a_end = a.data() + (a.rows() - 1) * a.outerStride() + a.cols();
  const T* b_begin = b.data();
  const T* b_end = b.data() + (b.rows() - 1) * b.outerStride() + b.cols();
  const std::less<const T*> before;
  return before(a_begin, b_end) && before(b_begin, a_end);
}

/// Throws `Error` naming `op` unless `x` has `model_dim` columns and `y` has `x`'s shape and does
/// not overlap it: the first checks of the dispatchers, the dense experts and `MoELayer`.
template <class S>
void check_rows_in_out(const char* op, Index model_dim, const ConstRows<S>& x, const Rows<S>& y) {
  require(x.cols() == model_dim, op, "x must have model_dim = ", model_dim, " columns, got (",
          x.rows(), ", ", x.cols(), ")");
  require(y.rows() == x.rows() && y.cols() == x.cols(), op, "y must have x's shape (", x.rows(),
          ", ", x.cols(), "), got (", y.rows(), ", ", y.cols(), ")");
  require(!storage_overlaps(x, y), op, "y must not overlap x");
}

/// Throws when the bank cannot run now (`experts.check_ready(training)`, for banks that have
/// it: weights not set yet, a stale packed copy, an inference-only bank asked to train). Every
/// dispatcher calls it before its parallel region, so that no bank throws inside one.
template <class X>
void check_experts_ready(const X& experts, bool training) {
  if constexpr (HookCheck<X>::kCheckReady) experts.check_ready(training);
}

/// The checks every dispatcher runs at entry (throws `Error` naming `op`): `x` is
/// `(num_tokens, model_dim)`, `y` has `x`'s shape and does not overlap it, the plan covers
/// `x.rows()` tokens over the bank's `num_experts`, every expert id is in range, and the bank
/// is ready to run `forward` (`training = false`) or `forward_train` / `backward` (`true`).
template <class X, class S>
void check_dispatch(const char* op, const X& experts, const ConstRows<S>& x,
                    const Routing<S>& routing, const Rows<S>& y, bool training = false) {
  check_rows_in_out(op, experts.model_dim(), x, y);
  require(routing.num_tokens() == x.rows(), op, "the routing plan has ", routing.num_tokens(),
          " tokens but x has ", x.rows(), " rows");
  require(routing.num_experts() == experts.num_experts(), op, "the routing plan has ",
          routing.num_experts(), " experts but the expert bank has ", experts.num_experts());
  const auto ids = routing.experts();
  const auto bad = std::find_if(
      ids.begin(), ids.end(), [&](std::int32_t e) { return e < 0 || e >= experts.num_experts(); });
  if (bad != ids.end()) {
    fail(op, "expert id ", *bad, " at assignment ", bad - ids.begin(), " is outside [0, ",
         experts.num_experts(), ")");
  }
  check_experts_ready(experts, training);
}

}  // namespace moet::detail
