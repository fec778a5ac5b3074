#pragma once
/// \file detail/parallel.hpp
/// The only place in moet with `#pragma omp`. Every parallel loop splits its work into tasks
/// whose boundaries do not depend on the thread count, so results are bit-identical for any
/// number of threads. Inside a region each thread limits its own nested thread count to 1, so
/// Eigen products called from a task never start threads of their own.
///
/// Task bodies must not throw: check arguments before the region, collect failures in flags.
///
/// Tasks run with subnormal floats flushed to zero while `moet::flush_denormals()` is on
/// (`DenormalGuard`, in every thread of the region, the caller's thread included).

#include <algorithm>
#include <cstdint>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define MOET_HAS_MXCSR 1
#else
#define MOET_HAS_MXCSR 0
#endif

#include "moet/config.hpp"
#include "moet/tensor.hpp"

namespace moet::detail {

/// The calling thread's id inside a moet parallel region (0 outside one).
inline int thread_id() {
#if MOET_HAS_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// While alive, the calling thread runs with flush-to-zero and denormals-are-zero (MXCSR bits 15
/// and 6) if `moet::flush_denormals()` was on when it was made; its destructor puts back only
/// those two bits, so the status flags the tasks raised and the caller's rounding mode stay.
class DenormalGuard {
 public:
  DenormalGuard() {
#if MOET_HAS_MXCSR
    if (flush_denormals()) {
      saved_ = _mm_getcsr() & kBits;
      _mm_setcsr(_mm_getcsr() | kBits);
      active_ = true;
    }
#endif
  }
  ~DenormalGuard() {
#if MOET_HAS_MXCSR
    if (active_) _mm_setcsr((_mm_getcsr() & ~kBits) | saved_);
#endif
  }
  DenormalGuard(const DenormalGuard&) = delete;
  DenormalGuard& operator=(const DenormalGuard&) = delete;

 private:
  static constexpr std::uint32_t kBits = 0x8040;  // FTZ (bit 15) | DAZ (bit 6)
  std::uint32_t saved_ = 0;
  bool active_ = false;
};

/// Upper bound on `thread_id() + 1` for the next region: size per-thread scratch with it.
inline int max_threads() { return num_threads(); }

/// Calls `task(i)` for every `i` in `[0, num_tasks)`, spread dynamically over the threads.
/// Tasks run in parallel only when there are at least two of them.
template <class Task>
void parallel_for(Index num_tasks, Task&& task) {
  if (num_tasks <= 0) return;
#if MOET_HAS_OPENMP
  if (num_tasks > 1 && omp_get_max_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel default(none) shared(num_tasks, task)
    {
      const DenormalGuard guard;
      omp_set_num_threads(1);  // this thread's nested regions (Eigen's) stay serial
#pragma omp for schedule(dynamic, 1)
      for (Index i = 0; i < num_tasks; ++i) task(i);
    }
    return;
  }
  // Serial: still inside a one-thread region so that Eigen sees a single thread.
  if (!omp_in_parallel()) {
#pragma omp parallel num_threads(1) default(none) shared(num_tasks, task)
    {
      const DenormalGuard guard;
      omp_set_num_threads(1);
      for (Index i = 0; i < num_tasks; ++i) task(i);
    }
    return;
  }
#endif
  const DenormalGuard guard;
  for (Index i = 0; i < num_tasks; ++i) task(i);
}

/// Values per task of elementwise passes over parameters (optimiser steps, zeroing): 64 KiB of
/// floats, large enough to amortise a task, small enough to balance two threads on any tensor.
inline constexpr Index kElementwiseBlock = Index{1} << 14;

/// Splits `[0, n)` into blocks of `block` items (the last one shorter) and calls
/// `body(begin, end)` for each block in parallel. The split depends only on `n` and `block`.
template <class Body>
void parallel_blocks(Index n, Index block, Body&& body) {
  if (n <= 0) return;
  block = std::max<Index>(block, 1);
  const Index num_blocks = (n + block - 1) / block;
  parallel_for(num_blocks, [&](Index b) {
    const Index begin = b * block;
    body(begin, std::min(n, begin + block));
  });
}

/// Splits `[0, n)` into one contiguous range per thread (`max_threads()` ranges as equal as
/// `granule` allows: every range but the last starts and ends on a multiple of it) and calls
/// `body(begin, end)` for each in parallel. For streaming passes over large arrays: against
/// small blocks handed out dynamically, which interleave the threads' streams in memory, it
/// packs an S2 bank's weights in 17-21 ms instead of 26-29 (kernels/packed.hpp). Use it only
/// where the result does not depend on the split.
template <class Body>
void parallel_ranges(Index n, Index granule, Body&& body) {
  if (n <= 0) return;
  granule = std::max<Index>(granule, 1);
  const Index units = (n + granule - 1) / granule;
  const Index parts = std::min<Index>(units, std::max(1, max_threads()));
  parallel_for(parts, [&](Index i) {
    const Index begin = std::min(n, units * i / parts * granule);
    const Index end = std::min(n, units * (i + 1) / parts * granule);
    if (begin < end) body(begin, end);
  });
}

}  // namespace moet::detail
