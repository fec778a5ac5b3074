#pragma once
/// \file detail/weights.hpp
/// The checks every weight setter runs (expert banks, gate routers): the shape of the given
/// matrix in the given `WeightLayout`, with a "looks transposed" hint when it has the other
/// layout's shape, and finiteness, naming the first non-finite entry. Each throws `moet::Error`
/// naming the owner (`op`), the setter and the tensor; nothing is formatted unless it throws.

#include <cmath>
#include <string>

#include <Eigen/Core>

#include "moet/errors.hpp"
#include "moet/tensor.hpp"

namespace moet::detail {

/// The tensor a weight check is about, for messages: `label` (`"gate weights"`, `"router"`)
/// and, for an expert bank, the expert (`expert < 0`: none); `rows_name` and `cols_name` name
/// the dimensions of its `(in, out)` shape (`"model_dim"`, `"hidden_dim"`, `"num_experts"`).
struct WeightName {
  const char* label;
  Index expert = -1;
  const char* rows_name = "rows";
  const char* cols_name = "cols";

  /// `"expert 2's gate weights"` or `"router"`.
  std::string describe() const {
    return expert >= 0 ? concat("expert ", expert, "'s ", label) : std::string(label);
  }
};

/// Throws unless a matrix of shape `(got_rows, got_cols)` given in `layout` holds a tensor
/// whose `(in, out)` shape is `(rows, cols)`: `(rows, cols)` for `kInOut`, `(cols, rows)` for
/// `kOutIn`. `op` names the owner (`"GluExperts"`), `setter` the call (`"set_gate_weights"`).
/// When the matrix has the other layout's shape (and the tensor is not square) the message
/// says it looks transposed and which layout to pass.
inline void check_weight_shape(const char* op, const char* setter, const WeightName& name,
                               Index rows, Index cols, Index got_rows, Index got_cols,
                               WeightLayout layout) {
  const bool out_in = layout == WeightLayout::kOutIn;
  const Index want_rows = out_in ? cols : rows;
  const Index want_cols = out_in ? rows : cols;
  if (got_rows == want_rows && got_cols == want_cols) [[likely]] {
    return;
  }
  const std::string want =
      out_in ? concat("[", name.cols_name, ", ", name.rows_name, "] = [", cols, ", ", rows,
                      "] in WeightLayout::kOutIn (PyTorch's [out, in])")
             : concat("(", name.rows_name, ", ", name.cols_name, ") = (", rows, ", ", cols,
                      ") in WeightLayout::kInOut (moet's (in, out))");
  const bool transposed = got_rows == want_cols && got_cols == want_rows;
  const std::string hint = !transposed ? std::string()
                           : out_in
                               ? std::string(
                                     ": looks transposed (that is moet's (in, out) layout: pass "
                                     "WeightLayout::kInOut)")
                               : std::string(
                                     ": looks transposed (that is PyTorch's [out, in] layout, "
                                     "nn.Linear.weight: pass WeightLayout::kOutIn)");
  fail(op, setter, ": ", name.describe(), " must be ", want, ", got (", got_rows, ", ", got_cols,
       ")", hint);
}

/// Throws unless every entry of `w` is finite, naming the first NaN or Inf by its row and
/// column in `w` (row-major order), its value, and `where` (`"in set_gate_weights"`, `"after
/// edit()"`).
template <class Derived>
void check_weights_finite(const char* op, const char* where, const WeightName& name,
                          const Eigen::DenseBase<Derived>& w) {
  // x * 0 is 0 for finite x and NaN for NaN or Inf, so the sum is 0 exactly when every entry is
  // finite; unlike allFinite(), whose early-exit reduction is scalar, the sum vectorises.
  using S = typename Derived::Scalar;
  if (w.size() == 0 || (w.derived().array() * S(0)).sum() == S(0)) [[likely]] {
    return;
  }
  for (Index r = 0; r < w.rows(); ++r) {
    for (Index c = 0; c < w.cols(); ++c) {
      const auto v = w.derived().coeff(r, c);
      if (!std::isfinite(v)) {
        fail(op, where, ": ", name.describe(), " must be finite, got ", v, " at row ", r,
             ", column ", c);
      }
    }
  }
}

}  // namespace moet::detail
