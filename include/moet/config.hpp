#pragma once
/// \file config.hpp
/// Build configuration: OpenMP on or off, and the thread count moet's kernels use.

#include <atomic>

#if defined(_OPENMP)
#include <omp.h>
#define MOET_HAS_OPENMP 1
#else
#define MOET_HAS_OPENMP 0
#endif

namespace moet {

/// Sets the number of threads moet's parallel regions use (OpenMP's `omp_set_num_threads`).
/// Results do not depend on it: every kernel splits work into thread-count-independent tasks.
/// A no-op without OpenMP.
inline void set_num_threads(int n) {
#if MOET_HAS_OPENMP
  omp_set_num_threads(n < 1 ? 1 : n);
#else
  static_cast<void>(n);
#endif
}

/// The number of threads the next parallel region will use (1 without OpenMP).
inline int num_threads() {
#if MOET_HAS_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace detail {
inline std::atomic<bool>& flush_denormals_flag() {
  static std::atomic<bool> flag{true};
  return flag;
}
}  // namespace detail

/// Whether moet's parallel tasks run with subnormal floats flushed to zero: flush-to-zero and
/// denormals-are-zero set in each thread of a task's region and put back when the region ends,
/// so the caller's floating-point mode is never changed. The tasks are all of moet's work on a
/// batch (routers, experts, combine, backward, optimiser steps, packing). On by default: a
/// saturated router gives combine weights below `FLT_MIN`, and the rows, gradients and optimiser
/// moments they touch then take the CPU's slow microcode assists (a training step 17x slower;
/// docs/algorithms.md, §10.5). With it a router probability below `FLT_MIN` (a logit about 87 below
/// the largest) is 0; without it, one about 103 below is, so such experts are ordered by index
/// either way. Off gives IEEE gradual underflow. Results stay bit-identical for any thread count
/// either way. x86 only (elsewhere a no-op).
inline void set_flush_denormals(bool on) {
  detail::flush_denormals_flag().store(on, std::memory_order_relaxed);
}

/// See `set_flush_denormals`.
inline bool flush_denormals() {
  return detail::flush_denormals_flag().load(std::memory_order_relaxed);
}

}  // namespace moet
