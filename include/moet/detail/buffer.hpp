#pragma once
/// \file detail/buffer.hpp
/// Grow-only scratch storage: a reused workspace allocates only when a call needs more than
/// any earlier call did, so a steady stream of same-sized batches never allocates.

#include <cstddef>
#include <new>
#include <vector>

#include <Eigen/Core>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "moet/tensor.hpp"

namespace moet::detail {

/// Bytes of alignment of every `Buffer` and of packed weights (a cache line; the AVX-512
/// vector size).
inline constexpr std::size_t kBufferAlignBytes = 64;

/// A standard allocator returning `kBufferAlignBytes`-aligned storage (C++17 aligned `new`). Blocks
/// of 2 MiB or more are 2 MiB aligned and, on Linux, advised as transparent-huge-page candidates
/// (`madvise(MADV_HUGEPAGE)`; a no-op unless THP is enabled): the kernels stream packed weights
/// through many 4 KiB pages, and huge pages cut the TLB misses (about 3% on large products).
template <class T>
struct AlignedAllocator {
  using value_type = T;
  /// Size and alignment of a huge page.
  static constexpr std::size_t kHugePageBytes = std::size_t{2} << 20;

  AlignedAllocator() noexcept = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>& /*other*/) noexcept {
  }  // NOLINT(google-explicit-constructor)
  T* allocate(std::size_t n) {
    const std::size_t bytes = n * sizeof(T);
    void* p = ::operator new (bytes, std::align_val_t{alignment(bytes)});
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= kHugePageBytes) {
      // Only whole huge pages inside the block; failure just leaves 4 KiB pages.
      static_cast<void>(madvise(p, bytes / kHugePageBytes * kHugePageBytes, MADV_HUGEPAGE));
    }
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    // Unsized form: clang 14 declares sized aligned delete only with -fsized-deallocation.
    ::operator delete (p, std::align_val_t{alignment(n * sizeof(T))});
  }
  template <class U>
  bool operator==(const AlignedAllocator<U>& /*other*/) const noexcept {
    return true;
  }

 private:
  static constexpr std::size_t alignment(std::size_t bytes) {
    return bytes >= kHugePageBytes ? kHugePageBytes : kBufferAlignBytes;
  }
};

/// A `std::vector` whose data starts on a 64-byte boundary.
template <class T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

/// A grow-only array viewed as a row-major matrix or a span. Its storage starts on a
/// `kBufferAlignBytes` boundary, wherever the allocator places it: Eigen's vectorised
/// reductions (`sum`, `dot`, `norm`) peel their first elements up to the next aligned address,
/// so over storage of varying alignment the same values could sum in a different order and give
/// different bits from one run (or one allocation history) to the next.
template <class T>
class Buffer {
 public:
  /// A `(rows, cols)` row-major view of the first `rows * cols` elements (contents unspecified).
  Eigen::Map<RowMatrix<T>> matrix(Index rows, Index cols) {
    reserve(rows * cols);
    return Eigen::Map<RowMatrix<T>>(data_.data(), rows, cols);
  }
  /// A vector view of the first `n` elements (contents unspecified).
  Eigen::Map<Vector<T>> vector(Index n) {
    reserve(n);
    return Eigen::Map<Vector<T>>(data_.data(), n);
  }
  /// Pointer to at least `n` elements (contents unspecified).
  T* data(Index n) {
    reserve(n);
    return data_.data();
  }
  /// Grows the storage to hold at least `n` elements.
  void reserve(Index n) {
    if (static_cast<std::size_t>(n) > data_.size()) data_.resize(static_cast<std::size_t>(n));
  }
  /// The storage (may be null when empty).
  const T* data() const { return data_.data(); }
  /// Elements currently held.
  Index capacity() const { return static_cast<Index>(data_.size()); }

 private:
  AlignedVector<T> data_;
};

}  // namespace moet::detail
