#pragma once
/// \file detail/expert_bank.hpp
/// The pieces of experts/bank.hpp's `ExpertBank` that are not about one bank: the description
/// of a body's tensors (`TensorSpec`), views of one expert in a stacked matrix, the lazily
/// allocated gradients, the parameter visit, the seeded initialisation, and `PackedCopies`,
/// the packed kernel copies of the weights (float or bf16, by `Options::weight_format`) with
/// the flag that says whether they are current.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "moet/concepts.hpp"
#include "moet/detail/bf16.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/detail/quant.hpp"
#include "moet/detail/rng.hpp"
#include "moet/errors.hpp"
#include "moet/tensor.hpp"
#include "moet/weight_format.hpp"

namespace moet::detail {

/// A dimension of a bank tensor, resolved against the bank's options.
enum class BankDim { kModel, kHidden, kOne };

/// The size of `dim` in a bank of these widths.
constexpr Index bank_dim(BankDim dim, Index model_dim, Index hidden_dim) {
  return dim == BankDim::kModel ? model_dim : dim == BankDim::kHidden ? hidden_dim : 1;
}

/// The name of `dim` in messages.
constexpr const char* bank_dim_name(BankDim dim) {
  return dim == BankDim::kModel ? "model_dim" : dim == BankDim::kHidden ? "hidden_dim" : "1";
}

/// One tensor of an expert body, as the bank stores, checks, initialises and visits it.
/// Expert `e`'s tensor is `(rows, cols)` in moet's `(in, out)` layout; the bank stacks the
/// experts' tensors row-wise into one `(num_experts * rows, cols)` matrix.
struct TensorSpec {
  /// `visit_parameters` name (`"gate"`, `"in_bias"`).
  const char* name;
  /// Name in messages (`"gate weights"`).
  const char* label;
  /// The named setter (`"set_gate_weights"`), for messages.
  const char* setter;
  /// One expert's shape, `(in, out)`.
  BankDim rows;
  BankDim cols;
  /// A bias: present only with `Options::bias`, zero under `WeightInit::kRandom`, never packed
  /// (read in place by the kernels' epilogue), any vector orientation accepted by its setter.
  bool bias;
  /// Random initialisation: normal with standard deviation `1 / sqrt(fan_in)` drawn from
  /// `Rng(hash_key(init_seed, stream))` over the whole stack, row-major (weights only).
  BankDim fan_in;
  std::uint64_t stream;
};

/// The banks' check of their options: `model_dim`, `hidden_dim` and `num_experts` >= 1, then
/// `require_weight_format<S>`, then `inference_only` only for a float bank with `pack_weights`.
/// Throws `moet::Error` naming `op` otherwise.
template <class S, class Options>
void require_bank_options(const char* op, const Options& options) {
  require(options.model_dim >= 1 && options.hidden_dim >= 1 && options.num_experts >= 1, op,
          "model_dim, hidden_dim and num_experts must be >= 1, got (", options.model_dim, ", ",
          options.hidden_dim, ", ", options.num_experts, ")");
  require_weight_format<S>(op, options.weight_format, options.pack_weights);
  if (options.inference_only) {
    require(std::is_same_v<S, float> && options.pack_weights, op,
            "inference_only keeps only the packed kernel weights: it needs a float bank with "
            "pack_weights = true, got a ",
            sizeof(S), "-byte scalar and pack_weights = ", options.pack_weights ? "true" : "false");
  }
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

/// A `(1, n)` tensor view as a row vector (what Eigen's `rowwise() +=` takes): the FFN body's
/// bias rows. Keeps the view's constness.
template <class S>
Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>> row_vector(
    const Eigen::Map<const RowMatrix<S>>& m) {
  return Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>(m.data(), m.cols());
}
/// (Writable.)
template <class S>
Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>> row_vector(Eigen::Map<RowMatrix<S>> m) {
  return Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>>(m.data(), m.cols());
}

/// Adds every row of `rows` `(n, cols)` to the row `sum` `(1, cols)`, one row at a time in
/// row order: a fixed order, the same bits every run (the FFN body's bias gradients, in the
/// per-expert backward and in the split one alike).
template <class Sum, class Rows>
void add_rows(Sum&& sum, const Rows& rows) {
  for (Index r = 0; r < rows.rows(); ++r) sum.row(0) += rows.row(r);
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

/// Writes `size` normals of standard deviation `1 / sqrt(fan_in)` into `data`, continuing
/// `rng`'s stream: the banks' random initialisation. A stack drawn in one call equals its
/// expert blocks drawn one after the other from the same `rng`.
template <class S>
void fill_normal_fan_in(Rng& rng, S* data, Index size, Index fan_in) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(fan_in));
  for (Index i = 0; i < size; ++i) data[i] = static_cast<S>(rng.normal() * scale);
}

/// The packed element type and `WeightFormat` of a ggml block type (`BlockQ8_0` -> `Q8_0`,
/// `WeightFormat::kQ8_0`, ...): what `ExpertBank::set_tensor_blocks` checks and packs.
template <class Block>
struct BlockFormat;
template <>
struct BlockFormat<BlockQ8_0> {
  using Element = Q8_0;
  static constexpr WeightFormat kFormat = WeightFormat::kQ8_0;
  static constexpr const char* kName = "q8_0";
};
template <>
struct BlockFormat<BlockQ4_0> {
  using Element = Q4_0;
  static constexpr WeightFormat kFormat = WeightFormat::kQ4_0;
  static constexpr const char* kName = "q4_0";
};
template <>
struct BlockFormat<BlockQ4_1> {
  using Element = Q4_1;
  static constexpr WeightFormat kFormat = WeightFormat::kQ4_1;
  static constexpr const char* kName = "q4_1";
};

/// A counter that may be changed from several threads at once (the bank's count of tensors not
/// set yet, which concurrent setters of different experts decrement) and that copies with its
/// owner (an atomic alone is not copyable).
struct SharedCount {
  std::atomic<Index> value{0};
  SharedCount() = default;
  SharedCount(const SharedCount& other) noexcept : value(other.value.load()) {}
  SharedCount& operator=(const SharedCount& other) noexcept {
    value.store(other.value.load());
    return *this;
  }
};

/// A bank's packed copies of its weights for the kernels of detail/gemm.hpp: one `Expert<W>`
/// per expert (the body's struct of `PackedMatrix` / `PackedGluMatrix`) in the bank's
/// `WeightFormat` (float, bf16 or a block format), and whether they are current.
///
/// Only the copy of the bank's `weight_format` is filled, and only for float banks (`S`) with
/// `pack_weights` (`enabled()`); for the others every member is a no-op and the copies are
/// never current. The bank marks them stale (`mark_stale`) when it hands its weights out for
/// writing (`visit_parameters`, `edit()`); `run` then declines and the bank's `forward` throws
/// until a `rebuild` or an `update` of what changed plus `mark_current`.
///
/// \tparam S the bank's scalar type.
/// \tparam Expert the body's per-expert packed weights, `Expert<W>` for every packed element
///   type `W` (`float`, `Bf16`, `Q8_0`, `Q4_0`, `Q4_1`).
template <class S, template <class> class Expert>
class PackedCopies {
 public:
  /// Whether the bank can have packed copies at all (float banks).
  static constexpr bool kPackable = std::is_same_v<S, float>;

  /// Empty, stale copies for a bank with these options.
  PackedCopies(bool pack_weights, WeightFormat format)
      : pack_weights_(pack_weights), format_(format) {}

  /// True when the bank keeps packed copies (a float bank with `pack_weights`).
  bool enabled() const { return kPackable && pack_weights_; }
  /// The format of the copies.
  WeightFormat format() const { return format_; }

  /// Resizes the copy of the bank's format to `num_experts` experts, calls `pack(copy, e)` for
  /// every expert `e` in order (it packs expert `e`'s weights into `copy`, an `Expert<W>&`),
  /// and marks the copies current. A no-op unless `enabled()`.
  /// Returns the and of every call's result when `pack` returns a bool (whether the values it
  /// read were finite), false when it returns nothing (not known), true when nothing is packed.
  template <class Pack>
  bool rebuild(Index num_experts, Pack&& pack) {
    bool finite = true;
    if constexpr (kPackable) {
      if (!pack_weights_) return true;
      with_copies([&](auto& copies) {
        copies.resize(static_cast<std::size_t>(num_experts));
        for (Index e = 0; e < num_experts; ++e) {
          auto& copy = copies[static_cast<std::size_t>(e)];
          if constexpr (std::is_same_v<decltype(pack(copy, e)), bool>) {
            finite = pack(copy, e) && finite;
          } else {
            pack(copy, e);
            finite = false;
          }
        }
      });
      current_ = true;
      generation_.value.fetch_add(1, std::memory_order_relaxed);
    }
    return finite;
  }

  /// True when the copies are float or bf16: their packing reports a NaN or Inf (packing it as
  /// it is) instead of throwing, so a repack can be the finiteness check.
  bool packing_reports_finiteness() const {
    return enabled() && (format_ == WeightFormat::kF32 || format_ == WeightFormat::kBf16);
  }

  /// Calls `update(copy)` with expert `e`'s packed weights (an `Expert<W>&`) to repack part of
  /// them; leaves the current flag alone. A no-op unless `enabled()` (and before `rebuild`).
  template <class Update>
  void update(Index e, Update&& update) {
    if constexpr (kPackable) {
      const auto slot = static_cast<std::size_t>(e);
      with_copies([&](auto& copies) {
        if (slot < copies.size()) update(copies[slot]);
      });
      generation_.value.fetch_add(1, std::memory_order_relaxed);
    }
  }

  /// True when the copies are current (never unless `enabled()`).
  bool current() const { return current_; }
  /// The version of the weights: changes whenever the copies may have (`rebuild`, `update`,
  /// `mark_stale`, `mark_current`), so that what is derived from the weights (the backward's
  /// transposed packs) knows when to follow.
  Index generation() const { return generation_.value.load(std::memory_order_relaxed); }

  /// Marks the copies stale until the next `rebuild` or `mark_current`.
  void mark_stale() {
    current_ = false;
    generation_.value.fetch_add(1, std::memory_order_relaxed);
  }
  /// Marks the copies current (after `update` brought every changed tensor in); a no-op unless
  /// `enabled()`.
  void mark_current() {
    current_ = enabled();
    generation_.value.fetch_add(1, std::memory_order_relaxed);
  }

  /// When the copies are current, calls `run(copy)` with expert `e`'s packed weights (a
  /// `const Expert<W>&`) and returns true; otherwise returns false without calling it.
  template <class Run>
  bool run(Index e, Run&& run) const {
    if constexpr (kPackable) {
      if (current_) {
        const auto slot = static_cast<std::size_t>(e);
        with_copies([&](const auto& copies) { run(copies[slot]); });
        return true;
      }
    }
    return false;
  }

  /// Calls `visit(copy)` for every expert's packed weights (a `const Expert<W>&`), current or
  /// not; a no-op unless `enabled()`.
  template <class Visit>
  void for_each(Visit&& visit) const {
    if constexpr (kPackable) {
      std::apply([&](const auto&... all) { ((visit_all(all, visit)), ...); }, copies_);
    }
  }

  /// Grows the packed kernels' workspace `kernel` for blocks of up to `max_rows` rows of a bank
  /// of these widths (a no-op where the bank has no packed copies).
  void reserve(Buffer<float>& kernel, Index max_rows, Index model_dim, Index hidden_dim) const {
    if constexpr (kPackable) {
      if (pack_weights_) reserve_packed_scratch(kernel, max_rows, std::max(model_dim, hidden_dim));
    }
  }

 private:
  template <class Copies, class Visit>
  static void visit_all(const Copies& copies, Visit& visit) {
    for (const auto& copy : copies) visit(copy);
  }

  // Calls f(copies) with the vector of the bank's format (a row of the format table).
  template <class F>
  void with_copies(F&& f) {
    switch (format_) {
      case WeightFormat::kBf16:
        return f(std::get<1>(copies_));
      case WeightFormat::kQ8_0:
        return f(std::get<2>(copies_));
      case WeightFormat::kQ4_0:
        return f(std::get<3>(copies_));
      case WeightFormat::kQ4_1:
        return f(std::get<4>(copies_));
      case WeightFormat::kF32:
        break;
    }
    f(std::get<0>(copies_));
  }
  template <class F>
  void with_copies(F&& f) const {
    const_cast<PackedCopies*>(this)->with_copies(  // NOLINT: f receives a const view
        [&](const auto& copies) { f(copies); });
  }

  bool pack_weights_;
  WeightFormat format_;
  // One vector per packed element type, in WeightFormat's order; only the one of format_ is
  // filled (none for double banks or without pack_weights).
  std::tuple<std::vector<Expert<float>>, std::vector<Expert<Bf16>>, std::vector<Expert<Q8_0>>,
             std::vector<Expert<Q4_0>>, std::vector<Expert<Q4_1>>>
      copies_;
  // False after the bank handed its weights out for writing, until rebuild() or mark_current().
  bool current_ = false;
  SharedCount generation_;  // bumped by concurrent `update`s of different experts
};

/// A flag that a copy or a move of its owner does not inherit: the bank's "an `edit()` is
/// open" (the handle points at the original bank, not at a copy).
struct UncopiedFlag {
  bool value = false;
  UncopiedFlag() = default;
  UncopiedFlag(const UncopiedFlag& /*other*/) noexcept {}
  UncopiedFlag& operator=(const UncopiedFlag& /*other*/) noexcept {
    value = false;
    return *this;
  }
};

}  // namespace moet::detail
