#pragma once
/// \file tests/no_alloc_harness.hpp
/// The no-allocation harness of test_no_alloc.cpp and test_no_alloc_train.cpp. Include it
/// FIRST in the test file (before anything that pulls in Eigen): Eigen's own allocations are
/// caught by EIGEN_RUNTIME_NO_MALLOC (its assertion is redirected to a counter, since it is
/// compiled out under NDEBUG), everything else (std::vector growth, Buffer growth) by counting
/// calls to the replaced global operator new below while `no_alloc::counting` is set. Clear the
/// flag (`Window::close`) before any Catch2 assertion, which allocates itself.

// The replaced operator new/delete below pair malloc with free by design; GCC cannot see that
// through inlining and warns.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

// Both must come before any include that could pull in Eigen.
#define EIGEN_RUNTIME_NO_MALLOC
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace no_alloc {
inline std::atomic<bool> counting{false};
inline std::atomic<long> new_calls{0};
inline std::atomic<long> eigen_violations{0};
inline void eigen_assert_failed() { eigen_violations.fetch_add(1); }
}  // namespace no_alloc

#define eigen_assert(x) ((x) ? static_cast<void>(0) : ::no_alloc::eigen_assert_failed())
#include <Eigen/Core>

// Replaced global allocation functions: count while `counting` is set.
void* operator new(std::size_t size) {
  if (no_alloc::counting.load(std::memory_order_relaxed)) no_alloc::new_calls.fetch_add(1);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return ::operator new(size); }
void* operator new(std::size_t size, std::align_val_t align) {
  if (no_alloc::counting.load(std::memory_order_relaxed)) no_alloc::new_calls.fetch_add(1);
  const auto a = static_cast<std::size_t>(align);
  const std::size_t rounded = (size + a - 1) / a * a;
  if (void* p = std::aligned_alloc(a, rounded == 0 ? a : rounded)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size, std::align_val_t align) {
  return ::operator new(size, align);
}
// The nothrow forms too, so that every allocation the program frees came from malloc
// (Catch2 uses them; AddressSanitizer reports a mismatch otherwise).
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(size);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  return ::operator new(size, std::nothrow);
}
void* operator new(std::size_t size, std::align_val_t align, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(size, align);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, std::align_val_t align, const std::nothrow_t&) noexcept {
  return ::operator new(size, align, std::nothrow);
}
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace no_alloc {

// Opens a no-allocation window; `close()` ends it and returns what was counted.
struct Window {
  struct Counts {
    long new_calls = 0;
    long eigen_violations = 0;
  };
  void open() {
    no_alloc::new_calls = 0;
    no_alloc::eigen_violations = 0;
    Eigen::internal::set_is_malloc_allowed(false);
    no_alloc::counting = true;
  }
  Counts close() {
    no_alloc::counting = false;
    Eigen::internal::set_is_malloc_allowed(true);
    return {no_alloc::new_calls.load(), no_alloc::eigen_violations.load()};
  }
};

}  // namespace no_alloc
