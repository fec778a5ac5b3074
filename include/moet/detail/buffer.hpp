#pragma once
/// \file detail/buffer.hpp
/// Grow-only scratch storage: a reused workspace allocates only when a call needs more than
/// any earlier call did, so a steady stream of same-sized batches never allocates.

#include <Eigen/Core>
#include <cstddef>
#include <vector>

#include "moet/tensor.hpp"

namespace moet::detail {

/// A grow-only array viewed as a row-major matrix or a span.
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
  std::vector<T> data_;
};

}  // namespace moet::detail
