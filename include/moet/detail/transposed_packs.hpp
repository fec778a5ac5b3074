#pragma once
/// \file detail/transposed_packs.hpp
/// The backward's packed weights: every expert's weight tensors packed transposed (`W^T`, from
/// the float master weights: bf16 for a bf16 bank, float otherwise), for the input-gradient
/// products `dX = dY W^T` on the packed kernels; and `BackwardRows`, the packed activations of
/// the weight-gradient products `dW = X^T dY` in the same element type. Packed lazily, by the
/// backward of each expert, once per version of the weights (`PackedCopies::generation()`): a
/// training step repacks each weight once, in the task that runs that expert.
#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "moet/config.hpp"
#include "moet/detail/kernels/packed.hpp"
#include "moet/weight_format.hpp"

namespace moet::detail {

/// `N` transposed packs of element type `W` (`float` or `Bf16`) per expert (indexed like the
/// bank's tensors; biases stay empty).
template <std::size_t N, class W = float>
class TransposedPacks {
 public:
  using Expert = std::array<PackedMatrix<W>, N>;

  /// Holds `num_experts` experts (new ones never packed). Not concurrently with `get`.
  void resize(Index num_experts) {
    experts_.resize(static_cast<std::size_t>(num_experts));
    generations_.resize(static_cast<std::size_t>(num_experts), kNever);
  }
  Index size() const { return static_cast<Index>(experts_.size()); }

  /// Expert `e`'s packs for the weights of version `generation`: calls `pack(expert)` first
  /// when they were packed from another version (or never). Calls for different experts may
  /// run concurrently; `0 <= e < size()`.
  template <class Pack>
  const Expert& get(Index e, Index generation, Pack&& pack) {
    const auto slot = static_cast<std::size_t>(e);
    if (generations_[slot] != generation) {
      pack(experts_[slot]);
      generations_[slot] = generation;
    }
    return experts_[slot];
  }

  /// Bytes held (part of `ExpertBank::packed_bytes`).
  std::size_t bytes() const {
    std::size_t total = 0;
    for (const Expert& x : experts_) {
      for (const PackedMatrix<W>& m : x) total += m.bytes();
    }
    return total;
  }

 private:
  static constexpr Index kNever = -1;
  std::vector<Expert> experts_;
  std::vector<Index> generations_;
};

/// A packed backward's activations (the `B` of `dW = X^T dY`, `gemm_packed_at`), in the element
/// type of the weights it runs with: `like(wt)` is the one for transposed packs `wt`.
struct BackwardRows {
  PackedMatrix<float> f32;
  PackedMatrix<Bf16> bf16;

  PackedMatrix<float>& like(const PackedMatrix<float>& /*wt*/) { return f32; }
  PackedMatrix<Bf16>& like(const PackedMatrix<Bf16>& /*wt*/) { return bf16; }
  const PackedMatrix<float>& like(const PackedMatrix<float>& /*wt*/) const { return f32; }
  const PackedMatrix<Bf16>& like(const PackedMatrix<Bf16>& /*wt*/) const { return bf16; }

  /// Reserves `rows x cols` for the backward of a bank of weight format `format`.
  void reserve(Index rows, Index cols, WeightFormat format) {
    if (format == WeightFormat::kBf16) {
      bf16.reserve(rows, cols);
    } else {
      f32.reserve(rows, cols);
    }
  }
};

/// One weight-gradient product `dW = A^T B` of the split backward (`BackwardSplitHook`): the
/// gradient of weight tensor `tensor` from operands `a` and `b`, each `kSplitIn` (the expert's
/// input rows), `kSplitDout` (its dL/dout rows) or `j >= 0`: columns `[j f, (j + 1) f)` of the
/// rows its row pieces kept (`f` the hidden width); and the bias `bias` (a tensor index, or
/// `kSplitNoBias`) whose gradient is the column sum of `b`.
struct SplitProduct {
  std::size_t tensor = 0;
  int a = 0;
  int b = 0;
  int bias = -1;
};
inline constexpr int kSplitIn = -1;
inline constexpr int kSplitDout = -2;
inline constexpr int kSplitNoBias = -1;

}  // namespace moet::detail
