#pragma once
/// \file config.hpp
/// Build configuration: OpenMP on or off, and the thread count moet's kernels use.

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

}  // namespace moet
