#pragma once
/// \file tensor.hpp
/// The matrix and vector types moet passes around. Token matrices are row-major
/// `(num_tokens, model_dim)`; ids are `std::int32_t`; sizes are `Eigen::Index`.

#include <Eigen/Core>
#include <cstdint>

namespace moet {

/// Sizes and counters.
using Index = Eigen::Index;

/// A dense row-major matrix: one token (or one expert input row) per row.
template <class S>
using RowMatrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A read-only view of a row-major matrix (what moet functions take).
template <class S>
using ConstRows = Eigen::Ref<const RowMatrix<S>>;

/// A writable view of a row-major matrix (what moet functions write through).
template <class S>
using Rows = Eigen::Ref<RowMatrix<S>>;

/// A dense column vector.
template <class S>
using Vector = Eigen::Matrix<S, Eigen::Dynamic, 1>;

/// Expert or token ids.
using IdVector = Eigen::Matrix<std::int32_t, Eigen::Dynamic, 1>;

/// Offsets into CSR arrays.
using IndexVector = Eigen::Matrix<Index, Eigen::Dynamic, 1>;

}  // namespace moet
