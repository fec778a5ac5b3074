#pragma once
/// \file detail/expert_bank.hpp
/// What the expert banks (`FfnExperts`, `GluExperts`) share: the check of their options, views
/// of one expert in a stacked weight matrix, the lazily allocated gradients, the parameter
/// visit, and `PackedCopies`, the packed kernel copies of the weights (float or bf16, by
/// `Options::weight_format`) with the flag that says whether they are current.

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "moet/detail/bf16.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/errors.hpp"
#include "moet/experts/weight_format.hpp"
#include "moet/tensor.hpp"
#include "moet/train/grad.hpp"

namespace moet::detail {

/// The banks' check of their options: `model_dim`, `hidden_dim` and `num_experts` >= 1, then
/// `require_weight_format<S>`. Throws `moet::Error` naming `op` otherwise.
template <class S, class Options>
void require_bank_options(const char* op, const Options& options) {
  require(options.model_dim >= 1 && options.hidden_dim >= 1 && options.num_experts >= 1, op,
          "model_dim, hidden_dim and num_experts must be >= 1, got (", options.model_dim, ", ",
          options.hidden_dim, ", ", options.num_experts, ")");
  require_weight_format<S>(op, options.weight_format, options.pack_weights);
}

/// Expert `e`'s `(rows, stack.cols())` block of a stacked weight matrix `stack`
/// `(num_experts * rows, cols)`, viewed in place.
template <class S>
Eigen::Map<const RowMatrix<S>> expert_block(const RowMatrix<S>& stack, Index e, Index rows) {
  MOET_ASSERT(e >= 0 && (e + 1) * rows <= stack.rows(), "expert id out of range");
  return Eigen::Map<const RowMatrix<S>>(stack.data() + e * rows * stack.cols(), rows, stack.cols());
}
/// (Writable.)
template <class S>
Eigen::Map<RowMatrix<S>> expert_block(RowMatrix<S>& stack, Index e, Index rows) {
  MOET_ASSERT(e >= 0 && (e + 1) * rows <= stack.rows(), "expert id out of range");
  return Eigen::Map<RowMatrix<S>>(stack.data() + e * rows * stack.cols(), rows, stack.cols());
}

/// Sets `grad` to zeros shaped like `value` unless it has that shape already (the banks' lazily
/// allocated gradients; a no-op once allocated).
template <class S>
void ensure_grad_like(RowMatrix<S>& grad, const RowMatrix<S>& value) {
  if (grad.rows() != value.rows() || grad.cols() != value.cols()) {
    grad = RowMatrix<S>::Zero(value.rows(), value.cols());
  }
}

/// Calls `f(name, value, grad)` with `ParamMap` views of a stacked parameter and its gradient
/// (one step of a bank's `visit_parameters`).
template <class F, class S>
void visit_stack(F& f, const char* name, RowMatrix<S>& value, RowMatrix<S>& grad) {
  f(name, ParamMap<S>(value.data(), value.rows(), value.cols()),
    ParamMap<S>(grad.data(), grad.rows(), grad.cols()));
}

/// A bank's packed copies of its weights for the kernels of detail/gemm.hpp: one `Expert<W>`
/// per expert (the bank's own struct of `PackedMatrix` / `PackedGluMatrix`), in float or bf16
/// (`WeightFormat`), and whether they are current.
///
/// Only the copy of the bank's `weight_format` is filled, and only for float banks (`S`) with
/// `pack_weights`; for the others `rebuild` is a no-op and the copies are never current. A bank
/// marks them stale (`mark_stale`) in every member that hands out its weights for writing; then
/// `run` declines and the bank's `forward` takes its Eigen path until `rebuild` (the bank's
/// `parameters_changed()`).
///
/// \tparam S the bank's scalar type.
/// \tparam Expert the bank's per-expert packed weights, `Expert<float>` and `Expert<Bf16>`.
template <class S, template <class> class Expert>
class PackedCopies {
 public:
  /// Whether the bank can have packed copies at all (float banks).
  static constexpr bool kPackable = std::is_same_v<S, float>;

  /// Empty, stale copies for a bank with these options.
  PackedCopies(bool pack_weights, WeightFormat format)
      : pack_weights_(pack_weights), format_(format) {}

  /// Resizes the copy of the bank's format to `num_experts` experts, calls `pack(copy, e)` for
  /// every expert `e` in order (it packs expert `e`'s weights into `copy`, an `Expert<W>&`),
  /// and marks the copies current. A no-op for double banks and without `pack_weights`.
  template <class Pack>
  void rebuild(Index num_experts, Pack&& pack) {
    if constexpr (kPackable) {
      if (!pack_weights_) return;
      if (format_ == WeightFormat::kBf16) {
        fill(bf16_, num_experts, pack);
      } else {
        fill(f32_, num_experts, pack);
      }
      current_ = true;
    }
  }

  /// True when the copies are current (never for double banks or without `pack_weights`).
  bool current() const { return current_; }

  /// Marks the copies stale until the next `rebuild`.
  void mark_stale() { current_ = false; }
  /// Marks the copies stale and returns `value` (for the bank's writable weight accessors).
  template <class T>
  T& mark_stale(T& value) {
    current_ = false;
    return value;
  }

  /// When the copies are current, calls `run(copy)` with expert `e`'s packed weights (a
  /// `const Expert<W>&`) and returns true; otherwise returns false without calling it.
  template <class Run>
  bool run(Index e, Run&& run) const {
    if constexpr (kPackable) {
      if (current_) {
        const auto slot = static_cast<std::size_t>(e);
        if (format_ == WeightFormat::kBf16) {
          run(bf16_[slot]);
        } else {
          run(f32_[slot]);
        }
        return true;
      }
    }
    return false;
  }

  /// Grows the packed kernels' workspace `kernel` for blocks of up to `max_rows` rows of a bank
  /// of these widths (a no-op where the bank has no packed copies).
  void reserve(Buffer<float>& kernel, Index max_rows, Index model_dim, Index hidden_dim) const {
    if constexpr (kPackable) {
      if (pack_weights_) reserve_packed_scratch(kernel, max_rows, std::max(model_dim, hidden_dim));
    }
  }

 private:
  template <class W, class Pack>
  static void fill(std::vector<Expert<W>>& copies, Index num_experts, Pack& pack) {
    copies.resize(static_cast<std::size_t>(num_experts));
    for (Index e = 0; e < num_experts; ++e) pack(copies[static_cast<std::size_t>(e)], e);
  }

  bool pack_weights_;
  WeightFormat format_;
  // Only the one of format_ is filled (neither for double banks or without pack_weights).
  std::vector<Expert<float>> f32_;
  std::vector<Expert<Bf16>> bf16_;
  // False after any writable weight access until rebuild().
  bool current_ = false;
};

}  // namespace moet::detail
