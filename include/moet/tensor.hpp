#pragma once
/// \file tensor.hpp
/// The matrix and vector types moet passes around. Token matrices are row-major
/// `(num_tokens, model_dim)`; ids are `std::int32_t`; sizes are `Eigen::Index`. Also
/// `WeightLayout`, how a weight matrix handed to a setter is laid out.

#include <cstdint>

#include <Eigen/Core>

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

/// A range of column panels `[begin, end)` of packed weights (`end < 0`: to the last panel): the
/// unit in which an expert bank's staged forward (`ColumnSplitHook` in concepts.hpp) splits one
/// expert's output columns between threads.
struct PanelRange {
  Index begin = 0;
  Index end = -1;
};

/// How a weight matrix handed to a setter (`set_gate_weights`, `set_router`, ...) is laid out.
/// moet computes `y = x W` with `x` `(num_tokens, in)`, so it stores `W` as `(in, out)`;
/// PyTorch's `nn.Linear` computes `y = x W^T` and stores `weight` as `[out, in]`. Setters take
/// either and transpose the second; a matrix whose shape only fits the other layout is a
/// `moet::Error` that says it looks transposed.
///
/// ```cpp
/// bank.set_gate_weights(e, w1, moet::WeightLayout::kOutIn);  // HF Mixtral experts.e.w1.weight
/// gate.set_router(w, moet::WeightLayout::kOutIn);              // nn.Linear(d, E).weight [E, d]
/// ```
enum class WeightLayout {
  /// moet's `(in, out)`: the matrix `W` of `y = x W` (for example `(model_dim, num_experts)`).
  kInOut,
  /// PyTorch's `[out, in]` (`nn.Linear.weight`, `y = x W^T`): transposed on the way in.
  kOutIn,
};

/// `"kInOut"` or `"kOutIn"` (for messages).
constexpr const char* weight_layout_name(WeightLayout layout) {
  return layout == WeightLayout::kOutIn ? "kOutIn" : "kInOut";
}

}  // namespace moet
